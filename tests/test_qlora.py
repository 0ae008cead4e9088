"""QLoRA: trials on a base loaded 4-bit by bitsandbytes (nf4, double quantization), through PEFT's own bnb LoRA
layers and our training loop. The tiny model's seeded weights are quantized while loading, as a real
checkpoint's are."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the qlora extra (make test installs it)")

from peft import PeftModel  # noqa: E402

from loraplace.data import DataSpec, load_splits  # noqa: E402
from loraplace.evaluate import eval_loss  # noqa: E402
from loraplace.models import load_model, load_tokenizer  # noqa: E402
from loraplace.placement import parse_placement  # noqa: E402
from loraplace.train_config import TrainSpec  # noqa: E402
from loraplace.trial import TrialSpec, run_trial  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated_cache")

DATA = DataSpec(train="builtin:arithmetic?n=60", eval_count=12, max_len=160)


def _spec(quantize: str) -> TrialSpec:
    return TrialSpec(model="tiny:llama", data=DATA, placement=parse_placement({"roles": ["all"]}), rank=4,
                     train=TrainSpec(steps=10, batch=4, lr=5e-3, precision="fp32", quantize=quantize))


def test_a_4bit_trial_trains_near_the_full_precision_one_and_vanilla_peft_loads_it(tmp_path):
    full = run_trial(_spec("none"))
    nf4 = run_trial(_spec("nf4"), out_dir=tmp_path / "nf4")
    assert nf4.status == "done", nf4.failure
    assert nf4.curve[-1].loss < nf4.curve[0].loss - 0.02  # it trains
    assert nf4.environment.quantize == "nf4" and full.environment.quantize == "none"
    assert nf4.trainable_params == full.trainable_params  # the adapters are the same size on either base
    assert nf4.total_params == full.total_params  # a 4-bit weight counts its parameters, not its packed bytes
    # A random tiny model's 4-bit weights lose ~10 % of their precision; the eval loss stays close.
    assert nf4.metrics.eval_loss == pytest.approx(full.metrics.eval_loss, rel=0.02)
    assert nf4.metrics.eval_loss != full.metrics.eval_loss  # the base really was quantized

    # Vanilla PEFT on the same 4-bit base: the same eval loss.
    base = load_model("tiny:llama", quantize="nf4")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = PeftModel.from_pretrained(base, tmp_path / "nf4" / "adapter")
    splits = load_splits(DATA, load_tokenizer("tiny:llama"))
    loss, _ = eval_loss(model, splits.eval, device=torch.device("cpu"), dtype=torch.float32, pad_id=0)
    assert loss == pytest.approx(nf4.metrics.eval_loss, abs=1e-4)


def test_a_study_compares_bases_on_a_quantize_axis_and_never_fuses_a_quantized_one(tmp_path, monkeypatch):
    from helpers import tiny_study_yaml
    from loraplace.store import Store
    from loraplace.study import load_study, run_study

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    text = tiny_study_yaml("q", steps=2, seeds=[0]) + "axes: {quantize: [none, nf4]}\nexecution: {fuse: 2}\n"
    (tmp_path / "s.yaml").write_text(text)
    summary = run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db")
    assert (summary.done, summary.failed) == (4, 0)
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
    by_base = {(t.labels.group.placement, dict(t.labels.group.axes)["quantize"]): t.outcome for t in trials}
    assert {o.environment.quantize for o in by_base.values()} == {"none", "nf4"}
    for (_, base), outcome in by_base.items():
        assert outcome.environment.quantize == base
        if base == "nf4":
            assert outcome.fused_with == 0 and any("not fused: the base is quantized" in w for w in outcome.warnings), \
                outcome.warnings
    # The report compares each placement on nf4 with itself on the full-precision base (one seed: no test).
    from loraplace.analysis import analyze_store

    effects = analyze_store(tmp_path / "s.db").axis_effects
    assert sorted((e.group.placement, dict(e.reference.axes)["quantize"], dict(e.group.axes)["quantize"])
                  for e in effects) == [(p, "none", "nf4") for p in sorted({p for p, _ in by_base})]
    for e in effects:
        assert e.delta_loss.mean_diff == pytest.approx(
            by_base[e.group.placement, "nf4"].metrics.eval_loss - by_base[e.group.placement, "none"].metrics.eval_loss)
    from loraplace.analysis.report import write_report

    written = write_report(analyze_store(tmp_path / "s.db"), tmp_path / "report", formats=["md", "tex"])
    for name in ("results.md", "results.tex"):  # the paper's second table, and the Markdown's
        assert "Effect of each swept axis" in (tmp_path / "report" / name).read_text(), written
    assert "figures/axis.png" in (tmp_path / "report" / "results.md").read_text()  # its figure: one line a placement


def _bnb_bytes(model) -> int:
    """What bitsandbytes allocates for a loaded model's weights: every parameter (4-bit ones packed two a byte) and
    each quantized weight's constants (absmax, code, offset, and the nested ones of double quantization)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            parts = [state.absmax, state.code, getattr(state, "offset", None)]
            if state.state2 is not None:
                parts += [state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return total


@pytest.mark.parametrize(("quantize", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_the_planned_base_memory_is_what_bitsandbytes_allocates(quantize, double_quant):
    from loraplace.memory import base_weight_bytes
    from loraplace.placement import meta_architecture

    model = load_model("tiny:llama", dtype=torch.bfloat16, quantize=quantize, double_quant=double_quant)
    planned = base_weight_bytes(meta_architecture("tiny:llama"), 2, quantize, double_quant)
    assert planned == pytest.approx(_bnb_bytes(model), rel=0.02)
    assert planned < base_weight_bytes(meta_architecture("tiny:llama"), 2)


def test_plan_says_the_4bit_base_memory(cli):
    import json

    done = cli("plan", "tiny:llama", "--quantize", "nf4", "--json")
    data = json.loads(done.stdout)["training_memory"]
    assert data["quantize"] == "nf4" and data["base_weights_bytes"] < data["base_weights_bf16_bytes"]
    # One plan, one answer: the plan's own estimate gave the bf16 figure under --quantize nf4
    estimate = json.loads(done.stdout)["memory_estimate"]
    assert (estimate["quantize"], estimate["base_weights_bytes"], estimate["base_weights_bf16_bytes"]) == \
        ("nf4", data["base_weights_bytes"], data["base_weights_bf16_bytes"])
    text = cli("plan", "tiny:llama", "--quantize", "nf4").stdout
    assert "base weights quantized nf4 (double quantization)" in " ".join(text.split())
    bad = cli("plan", "tiny:llama", "--quantize", "nf3")
    assert bad.returncode == 2 and "--quantize 'nf3'" in bad.stderr


def test_the_probes_read_a_4bit_base_as_its_forward_does():
    """NFN dequantizes a bitsandbytes weight (the packed bytes are not the weight): on the nf4 base every site's
    score is close to the full-precision base's. The warm-up probe runs there too."""
    from loraplace.data import load_tokenized
    from loraplace.trial import Session

    scores = {}
    for quantize in ("none", "nf4"):
        session = Session("tiny:llama", precision="fp32", quantize=quantize)
        data = load_tokenized("builtin:arithmetic?n=16", session.tokenizer, DataSpec(train="x", max_len=160))[0]
        scores[quantize] = {s.path: s.score for s in session.probe(data, batches=1, batch=4, measure="nfn").sites}
    for path, value in scores["none"].items():
        assert scores["nf4"][path] == pytest.approx(value, rel=0.1), path
    # The warm-up probe trains PEFT's bitsandbytes LoRA layers on the 4-bit base, then reads them: every site scored.
    warm = session.probe(data, batches=1, batch=4, measure="warmup", warmup_steps=2, warmup_lr=1e-2)
    assert {s.path for s in warm.sites} == set(scores["nf4"])
    assert all(s.update_norm > 0 and s.output_norm > 0 and math.isfinite(s.score) for s in warm.sites)
    assert type(session.model.get_submodule(warm.sites[0].path)).__name__ == "Linear4bit"  # the base, unwrapped


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_expert_parameters_on_a_4bit_base_train(family):
    """Experts are 3-D parameter stacks (PEFT target_parameters), which bitsandbytes leaves unquantized: on a nf4
    base the attention/dense linears are 4-bit and the expert stacks train through PEFT's parameter LoRA as on any
    base — the same adapter size, a falling loss, and a loss near the full-precision base's."""
    placement = parse_placement({"roles": ["moe.experts", "attn.q"]})

    def spec(quantize: str) -> TrialSpec:
        return TrialSpec(model=f"tiny:{family}", data=DATA, placement=placement, rank=4,
                         train=TrainSpec(steps=8, batch=4, lr=5e-3, precision="fp32", quantize=quantize))

    full, nf4 = run_trial(spec("none")), run_trial(spec("nf4"))
    assert nf4.status == "done", nf4.failure
    assert nf4.trainable_params == full.trainable_params > 0 and nf4.total_params == full.total_params
    assert nf4.curve[-1].loss < nf4.curve[0].loss
    assert nf4.metrics.eval_loss == pytest.approx(full.metrics.eval_loss, rel=0.02)
