"""export-placement: the PEFT export is exact in vanilla PEFT; the one-rank formats say what they lose."""

import json

import pytest
import yaml
from peft import LoraConfig, get_peft_model

from loraplace.data import DataSpec, load_tokenized
from loraplace.errors import LoraplaceError
from loraplace.exports import export_plan
from loraplace.models import load_config, load_model
from loraplace.placement import plan_for_model
from loraplace.trial import Session

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _adapted(model) -> dict[str, int]:
    """Every module (or parameter) PEFT put a LoRA on → its rank."""
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and "default" in lora_a:
            out[name.removeprefix("base_model.model.")] = module.r["default"]
    return out


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _planned(plan) -> dict[str, int]:
    out = {}
    for m in plan.modules:
        for target in m.module_targets or (m.path.rpartition(".")[0],):
            out[target] = m.rank
    return out


@pytest.fixture(scope="module")
def auto_plan():
    """A per-site-rank auto placement of the tiny llama (the probe reads builtin arithmetic)."""
    session = Session("tiny:llama", precision="fp32")
    data = load_tokenized("builtin:arithmetic?n=64", session.tokenizer, DataSpec(train="x", max_len=160))[0]
    plan = session.plan({"auto": {"method": "probe", "budget": 6000, "batches": 2, "batch": 4, "rank": 2}},
                        data=data, data_key="arith64")
    assert len({m.rank for m in plan.modules}) > 1 or len(plan.modules) < 14  # really selective
    return plan


CASES = [("llama", {"roles": ["all"]}, 8, None),
         ("llama", {"roles": ["attn.q", "mlp.down"], "layers": "top:1"}, 4, None),
         ("llama", {"roles": ["all"]}, None, 5000), ("gpt2", {"roles": ["attn", "mlp.up"]}, 4, None),
         ("qwen3_moe", {"roles": ["all"]}, 2, None), ("mixtral", {"roles": ["moe.experts", "attn.q"]}, 2, None),
         ("llama", {"roles": ["all"], "variant": "dora"}, 4, None)]


@pytest.mark.parametrize(("family", "placement", "rank", "budget"), CASES)
def test_peft_export_loads_in_vanilla_peft_exactly(tmp_path, family, placement, rank, budget):
    plan = plan_for_model(f"tiny:{family}", placement, rank=rank, budget=budget)
    _check_peft_export(tmp_path, plan, f"tiny:{family}")


def test_peft_export_of_an_auto_placement_is_exact(tmp_path, auto_plan):
    _check_peft_export(tmp_path, auto_plan, "tiny:llama")


def _check_peft_export(tmp_path, plan, model_ref):
    exported = export_plan(plan, "peft", model_ref)
    assert exported.exact and exported.params == plan.trainable_params
    (tmp_path / "adapter_config.json").write_text(exported.text)
    config = LoraConfig.from_pretrained(str(tmp_path))  # PEFT's own reader
    model = get_peft_model(load_model(model_ref), config)
    assert _trainable(model) == plan.trainable_params
    adapted = _adapted(model)
    if not any(m.parameter for m in plan.modules):  # parameter targets wrap a module of their own
        assert adapted == _planned(plan)
    else:
        assert set(adapted.values()) <= {m.rank for m in plan.modules}


def test_trl_script_builds_the_same_lora_config(auto_plan):
    script = export_plan(auto_plan, "trl", "tiny:llama").text
    compile(script, "train_sft.py", "exec")  # valid Python
    line = next(x for x in script.splitlines() if x.startswith("peft_config = "))
    namespace = {"LoraConfig": LoraConfig}
    exec(line, namespace)  # noqa: S102 - our own generated line
    model = get_peft_model(load_model("tiny:llama"), namespace["peft_config"])
    assert _trainable(model) == auto_plan.trainable_params
    assert _adapted(model) == _planned(auto_plan)
    assert "SFTTrainer(" in script and "peft_config=peft_config" in script


def _from_one_rank_yaml(text: str, fmt: str) -> LoraConfig:
    """What axolotl / LLaMA-Factory hand PEFT, from the fields we wrote (their docs' meaning of each field)."""
    cfg = yaml.safe_load(text)
    if fmt == "axolotl":
        return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["lora_target_modules"],
                          lora_dropout=cfg["lora_dropout"], use_dora=bool(cfg.get("peft_use_dora")))
    return LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["lora_target"].split(","),
                      lora_dropout=cfg["lora_dropout"], use_dora=bool(cfg.get("use_dora")))


@pytest.mark.parametrize("fmt", ["axolotl", "llamafactory"])
@pytest.mark.parametrize(("family", "placement", "bare"), [
    ("llama", {"roles": ["attn", "mlp.up"]}, True),
    ("llama", {"roles": ["attn.v"], "layers": "top:1"}, False),
    # GPT-2's c_proj is the attention output and the MLP's down projection: "[c_attn, c_proj]" would adapt both
    # (the seed study's mistake), so an attention-only plan must be written by full path.
    ("gpt2", {"roles": ["attn"]}, False),
    ("gpt2", {"roles": ["all"]}, True)])
def test_one_rank_formats_are_exact_when_the_plan_has_one_rank(fmt, family, placement, bare):
    plan = plan_for_model(f"tiny:{family}", placement, rank=4)
    base = load_model(f"tiny:{family}")
    exported = export_plan(plan, fmt, f"tiny:{family}", module_paths=[n for n, _ in base.named_modules()])
    assert exported.exact and exported.params == plan.trainable_params
    config = _from_one_rank_yaml(exported.text, fmt)
    assert all("." not in t for t in config.target_modules) == bare
    if family == "gpt2":
        config.fan_in_fan_out = True  # Conv1D; what axolotl / LLaMA-Factory let PEFT infer for GPT-2
    model = get_peft_model(base, config)
    assert _trainable(model) == plan.trainable_params
    assert _adapted(model) == _planned(plan)


@pytest.mark.parametrize("fmt", ["axolotl", "llamafactory"])
def test_per_site_ranks_fail_unless_lossy_and_the_difference_is_true(fmt, auto_plan):
    with pytest.raises(LoraplaceError, match="per-site ranks") as info:
        export_plan(auto_plan, fmt, "tiny:llama")
    assert "--lossy" in info.value.hint
    exported = export_plan(auto_plan, fmt, "tiny:llama", lossy=True)
    assert exported.lost and "LOSSY" in exported.text
    model = get_peft_model(load_model("tiny:llama"), _from_one_rank_yaml(exported.text, fmt))
    assert _trainable(model) == exported.params  # the count we print is the count the config gives
    assert set(_adapted(model)) == set(_planned(auto_plan))  # the same modules, one rank


def test_torchtune_export():
    config = load_config("tiny:llama")
    plan = plan_for_model("tiny:llama", {"roles": ["attn.q", "attn.v", "mlp"]}, rank=8)
    with pytest.raises(LoraplaceError, match="no LoRA builder"):
        export_plan(plan, "torchtune", "tiny:llama", config=config)
    exported = export_plan(plan, "torchtune", "tiny:llama", config=config,
                           torchtune_component="torchtune.models.llama3_2.lora_llama3_2_1b")
    model = yaml.safe_load(exported.text)["model"]
    assert exported.exact and exported.params == plan.trainable_params
    assert model["lora_attn_modules"] == ["q_proj", "v_proj"] and model["apply_lora_to_mlp"] is True
    assert model["lora_rank"] == 8 and model["lora_alpha"] == 16
    subset = plan_for_model("tiny:llama", {"roles": ["attn.q", "mlp.up"], "layers": "top:1"}, rank=8)
    with pytest.raises(LoraplaceError, match="layer subsets") as info:
        export_plan(subset, "torchtune", "tiny:llama", torchtune_component="x.lora_y")
    assert "whole MLP" in str(info.value)
    lossy = export_plan(subset, "torchtune", "tiny:llama", torchtune_component="x.lora_y", lossy=True)
    assert lossy.params > subset.trainable_params and "LOSSY" in lossy.text


def test_export_placement_command(cli, tmp_path):
    out = tmp_path / "adapter_config.json"
    result = cli("export-placement", "tiny:llama", "--placement", "attn", "--rank", "4", "--to", "peft",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["r"] == 4 and "exact" in result.stderr
    failed = cli("export-placement", "tiny:llama", "--placement", "{roles: [all], budget: 5000}", "--to",
                 "axolotl")
    assert failed.returncode == 2 and "per-site ranks" in failed.stderr and "--lossy" in failed.stderr
    lossy = cli("export-placement", "tiny:llama", "--placement", "{roles: [all], budget: 5000}", "--to",
                "axolotl", "--lossy")
    assert lossy.returncode == 0 and "lossy:" in lossy.stderr and "lora_r:" in lossy.stdout
    bad = cli("export-placement", "tiny:llama", "--to", "unsloth")
    assert bad.returncode == 2 and "peft" in bad.stderr


@pytest.mark.parametrize("fmt", ["axolotl", "llamafactory", "torchtune"])
def test_one_rank_formats_count_dora_magnitudes(fmt):
    """The export's own count and the plan's agree for DoRA (an exact export prints no difference)."""
    plan = plan_for_model("tiny:llama", {"roles": ["all"], "variant": "dora"}, rank=4)
    exported = export_plan(plan, fmt, "tiny:llama", config=load_config("tiny:llama"),
                           torchtune_component="torchtune.models.llama3_2.lora_llama3_2_1b")
    assert exported.exact and exported.params == plan.trainable_params
    assert "this config trains" not in exported.text


def test_a_quantized_base_is_carried_into_every_format():
    """QLoRA: axolotl's adapter qlora + load_in_4bit, LLaMA-Factory's quantization_bit, TRL's BitsAndBytesConfig,
    torchtune's qlora_ builder (NF4 only: fp4 refused)."""
    import ast

    from loraplace.exports import TrainingHints

    plan = plan_for_model("tiny:llama", {"roles": ["attn"]}, rank=4)
    hints = TrainingHints(quantize="nf4")
    axolotl = yaml.safe_load(export_plan(plan, "axolotl", "tiny:llama", hints=hints).text)
    assert axolotl["adapter"] == "qlora" and axolotl["load_in_4bit"] is True
    assert axolotl["bnb_config_kwargs"] == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    factory = yaml.safe_load(export_plan(plan, "llamafactory", "tiny:llama", hints=hints).text)
    assert (factory["quantization_bit"], factory["quantization_type"], factory["double_quantization"]) == (
        4, "nf4", True)
    trl = export_plan(plan, "trl", "tiny:llama", hints=hints).text
    ast.parse(trl)
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'" in trl and "model=model" in trl
    component = "torchtune.models.llama3_2.lora_llama3_2_1b"
    tune = yaml.safe_load(export_plan(plan, "torchtune", "tiny:llama", hints=hints,
                                      torchtune_component=component).text)
    assert tune["model"]["_component_"] == "torchtune.models.llama3_2.qlora_llama3_2_1b"
    with pytest.raises(LoraplaceError, match="NF4 only"):
        export_plan(plan, "torchtune", "tiny:llama", hints=TrainingHints(quantize="fp4"),
                    torchtune_component=component)
    plain = yaml.safe_load(export_plan(plan, "axolotl", "tiny:llama").text)
    assert plain["adapter"] == "lora" and "load_in_4bit" not in plain
