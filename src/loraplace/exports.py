"""Carry a plan to the framework people train with: PEFT, TRL, axolotl, LLaMA-Factory, torchtune.

``peft`` and ``trl`` are exact: PEFT's ``LoraConfig`` takes full-path ``target_modules``, per-target
``rank_pattern``/``alpha_pattern`` and ``target_parameters``, so whatever a plan says survives. The YAML formats
have one rank and one alpha for every adapted module, so a plan with per-site ranks (an ``auto`` placement, an
exact budget fill), or with sites they cannot name, cannot be written exactly: :func:`export_plan` then fails,
naming what would be lost, or with ``lossy=True`` writes the closest expressible form and reports the parameter
count it gives against the plan's. Field names follow each project's own config schema (cited where used).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from loraplace.errors import LoraplaceError
from loraplace.formatting import plural
from loraplace.placement.plan import Plan, PlannedModule
from loraplace.records import lora_params

ExportFormat = Literal["peft", "trl", "axolotl", "llamafactory", "torchtune"]
EXPORT_FORMATS: tuple[str, ...] = ("peft", "trl", "axolotl", "llamafactory", "torchtune")
DEFAULT_FILENAMES = {"peft": "adapter_config.json", "trl": "train_sft.py", "axolotl": "axolotl.yaml",
                     "llamafactory": "llamafactory.yaml", "torchtune": "torchtune.yaml"}


@dataclass(frozen=True)
class TrainingHints:
    """What a study measured with, carried into the exported training config when known."""

    lr: float | None = None
    batch: int | None = None
    steps: int | None = None
    max_len: int | None = None
    warmup: int | None = None
    schedule: str | None = None
    quantize: str = "none"  # the base as the study loaded it (TrainSpec.quantize): QLoRA when nf4/fp4
    double_quant: bool = True


@dataclass(frozen=True)
class Export:
    fmt: str
    text: str
    plan_params: int  # trainable parameters of the plan
    params: int  # trainable parameters the exported config gives
    lost: tuple[str, ...] = field(default_factory=tuple)  # what the format could not express (written lossy)

    @property
    def exact(self) -> bool:
        return not self.lost


def hub_id(model_ref: str) -> str:
    """The name a training framework loads the base model by: a builtin's hub id, else the reference itself."""
    from loraplace.models import BUILTIN_MODELS

    name = model_ref.removeprefix("builtin:")
    if model_ref.startswith("builtin:") and name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].get("hub_id", model_ref)
    return model_ref.removeprefix("hf:")


def peft_config_dict(plan: Plan, model_ref: str) -> dict[str, Any]:
    """``adapter_config.json`` content: PEFT's own ``LoraConfig.to_dict()`` (sets written as lists, as PEFT's
    ``save_pretrained`` does), with the base model's name."""
    config = plan.to_lora_config(base_model_name_or_path=hub_id(model_ref))
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    if out.get("eva_config") is not None and not isinstance(out["eva_config"], dict):
        out["eva_config"] = vars(out["eva_config"])
    return out


def export_plan(plan: Plan, fmt: str, model_ref: str, *, hints: TrainingHints | None = None, lossy: bool = False,
                torchtune_component: str | None = None, config: Any = None,
                module_paths: Collection[str] | None = None) -> Export:
    """``module_paths``: every module name of the model; with it the one-rank formats may name modules by their
    bare leaf (``q_proj``) where that selects exactly the plan's modules, else they list full paths."""
    if fmt not in EXPORT_FORMATS:
        raise LoraplaceError(f"--to {fmt!r}: one of {', '.join(EXPORT_FORMATS)}")
    hints = hints or TrainingHints()
    if fmt == "peft":
        text = json.dumps(peft_config_dict(plan, model_ref), indent=2, sort_keys=True) + "\n"
        return Export(fmt, text, plan.trainable_params, plan.trainable_params)
    if fmt == "trl":
        return Export(fmt, _trl_script(plan, model_ref, hints), plan.trainable_params, plan.trainable_params)
    uniform = _uniform(plan, fmt, lossy)
    if fmt == "axolotl":
        return _axolotl(plan, model_ref, hints, uniform, module_paths)
    if fmt == "llamafactory":
        return _llamafactory(plan, model_ref, hints, uniform, lossy, module_paths)
    return _torchtune(plan, hints, uniform, torchtune_component, config, lossy)


# --------------------------------------------------------------------------------------------- one rank for all


@dataclass(frozen=True)
class Uniform:
    """A plan brought to one rank and one alpha (what the YAML formats can say)."""

    modules: tuple[PlannedModule, ...]
    rank: int
    alpha: float
    lost: tuple[str, ...]

    def params(self, modules: tuple[PlannedModule, ...] | None = None) -> int:
        return sum(m.params_at(self.rank) for m in (self.modules if modules is None else modules))


# How each one-rank format switches a LoRA variant on (axolotl: peft_use_dora / peft_use_rslora /
# peft_init_lora_weights; LLaMA-Factory: use_dora / use_rslora / pissa_init; torchtune's builders: use_dora).
VARIANT_FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "axolotl": {"dora": {"peft_use_dora": True}, "rslora": {"peft_use_rslora": True},
                "pissa": {"peft_init_lora_weights": "pissa"}},
    "llamafactory": {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"pissa_init": True}},
    "torchtune": {"dora": {"use_dora": True}},
}


def _variant_fields(fmt: str, variant: str) -> dict[str, Any]:
    return {} if variant == "lora" else VARIANT_FIELDS[fmt][variant]


def _uniform(plan: Plan, fmt: str, lossy: bool) -> Uniform:
    if plan.variant != "lora" and plan.variant not in VARIANT_FIELDS[fmt]:
        raise LoraplaceError(f"{fmt} has no {plan.variant} option" + (
            " (EVA initialises from the training data through PEFT)" if plan.variant == "eva" else ""),
            "use --to peft or --to trl, which run PEFT's own code for every variant")
    ranks = Counter(m.rank for m in plan.modules)
    per_unit = sum(m.experts * lora_params(1, m.in_features, m.out_features) for m in plan.modules)
    lora_total = plan.trainable_params - sum(m.magnitude_params for m in plan.modules)
    lost: list[str] = []
    if len(ranks) == 1:
        rank = next(iter(ranks))
    else:
        # The one rank whose parameter count is nearest the plan's.
        rank = max(1, round(lora_total / per_unit))
        per_rank = ", ".join(f"r={r}: {plural(n, 'site')}" for r, n in sorted(ranks.items()))
        lost.append(f"per-site ranks ({per_rank}) become one rank r={rank}")
    ratios = {m.alpha / m.rank for m in plan.modules}
    alpha_values = {m.alpha for m in plan.modules}
    if len(alpha_values) == 1:
        alpha = next(iter(alpha_values))
    elif len(ratios) == 1:
        alpha = next(iter(ratios)) * rank  # the same alpha/rank ratio at the one rank
    else:
        alpha = Counter(m.alpha for m in plan.modules).most_common(1)[0][0]
        lost.append(f"per-site alphas become one alpha {alpha:g}")
    if lost and not lossy:
        raise LoraplaceError(f"{fmt} cannot express this placement exactly: " + "; ".join(lost),
                             "pass --lossy to write the closest form (the parameter difference is printed), or "
                             "use --to peft / --to trl, which are exact")
    return Uniform(plan.modules, rank, alpha, tuple(lost))


def _leaf(path: str) -> str:
    return path.rpartition(".")[2]


def _module_names(modules: tuple[PlannedModule, ...], module_paths: Collection[str] | None) -> list[str]:
    """Target names PEFT matches (exact path or ``.``-suffix): the bare leaf names when, among every module of the
    model (``module_paths``), they select exactly these modules; otherwise every module's full path. GPT-2's
    ``c_proj`` is the reason: it names the attention output *and* the MLP's down projection, so an attention-only
    plan must not be written as ``[c_attn, c_proj]``."""
    targets = [t for m in modules if not m.parameter for t in m.module_targets]
    if module_paths is None:
        return targets
    leaves = {_leaf(t) for t in targets}
    selected = {path for path in module_paths if _leaf(path) in leaves}
    return sorted(leaves) if selected == set(targets) else targets


def _lossy_note(lost: tuple[str, ...]) -> list[str]:
    return [f"# LOSSY: {item}" for item in lost]


def _header(plan: Plan, exp_params: int, lost: tuple[str, ...], fmt: str) -> str:
    label = str(plan.placement.get("label", ""))
    label = label if len(label) <= 80 else label[:77] + "…"
    lines = [f"# loraplace export-placement --to {fmt}: {plan.model}" + (f", placement {label}" if label else ""),
             f"# {plural(len(plan.modules), 'site')}, {plan.trainable_params:,} trainable parameters in the plan"]
    if lost:
        lines += _lossy_note(lost)
        diff = exp_params - plan.trainable_params
        lines.append(f"# this config trains {exp_params:,} parameters ({diff:+,}, "
                     f"{100.0 * diff / plan.trainable_params:+.1f} % against the plan)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- formats


def bnb_config_source(quantize: str, double_quant: bool) -> str:
    """Python source of the ``BitsAndBytesConfig`` that loads a base as a study quantized it (``quantize`` not
    "none"; compute in bf16, what a GPU user runs; needs ``import torch``)."""
    if quantize == "int8":
        return "BitsAndBytesConfig(load_in_8bit=True)"
    return (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={quantize!r}, "
            f"bnb_4bit_use_double_quant={double_quant!r}, bnb_4bit_compute_dtype=torch.bfloat16)")


def _trl_script(plan: Plan, model_ref: str, hints: TrainingHints) -> str:
    """A runnable TRL script: the exact LoraConfig handed to ``SFTTrainer(peft_config=...)``; SFTConfig fields per
    TRL's docs (``output_dir``, ``learning_rate``, ``per_device_train_batch_size``, ``max_steps``,
    ``lr_scheduler_type``, ``warmup_steps``, ``max_length``)."""
    config = peft_config_dict(plan, model_ref)
    kwargs = {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern",
                                     "alpha_pattern", "bias", "task_type", "fan_in_fan_out", "use_rslora",
                                     "use_dora", "target_parameters") if config.get(k) not in (None, {}, [])}
    if config.get("init_lora_weights") not in (None, True):
        kwargs["init_lora_weights"] = config["init_lora_weights"]
    args = {"output_dir": "sft-lora", "learning_rate": hints.lr or 2e-4,
            "per_device_train_batch_size": hints.batch or 8}
    if hints.steps:
        args["max_steps"] = hints.steps
    if hints.schedule:
        args["lr_scheduler_type"] = hints.schedule
    if hints.warmup:
        args["warmup_steps"] = hints.warmup
    if hints.max_len:
        args["max_length"] = hints.max_len
    eva = plan.variant == "eva"
    quantized = hints.quantize != "none"
    if quantized:
        bnb = bnb_config_source(hints.quantize, hints.double_quant)
        model_line = [f"# The base quantized as the study measured it (quantize: {hints.quantize}): QLoRA.",
                      f"model = AutoModelForCausalLM.from_pretrained({hub_id(model_ref)!r}, "
                      f"quantization_config={bnb})", ""]
    lines = [
        f'"""Train {hub_id(model_ref)} with the placement loraplace planned ({plan.trainable_params:,} trainable',
        'parameters), using TRL\'s SFTTrainer and PEFT\'s exact LoraConfig. Written by loraplace export-placement."""',
        "",
        *(["import torch"] if quantized else []),
        "from datasets import load_dataset",
        "from peft import " + ("EvaConfig, LoraConfig" if eva else "LoraConfig"),
        *(["from transformers import AutoModelForCausalLM, BitsAndBytesConfig"] if quantized else []),
        "from trl import SFTConfig, SFTTrainer",
        "",
        *(model_line if quantized else []),
        f"peft_config = LoraConfig(**{_py(kwargs)}" + (f", eva_config=EvaConfig(rho={plan.eva_rho!r}))"
                                                      if eva else ")"),
        "",
        "# A prompt/completion JSONL (TRL puts the loss on the completion only); replace with your data.",
        'train_dataset = load_dataset("json", data_files="train.jsonl", split="train")',
        f"args = SFTConfig(**{_py(args)})",
        f"trainer = SFTTrainer(model={'model' if quantized else repr(hub_id(model_ref))}, args=args, "
        "train_dataset=train_dataset, "
        "peft_config=peft_config)",
        "trainer.model.print_trainable_parameters()  # " + f"{plan.trainable_params:,} expected",
        "trainer.train()",
        "trainer.save_model()",
        "",
    ]
    return "\n".join(lines)


def _py(value: Any) -> str:
    """A Python literal (json-like but with True/False/None) for the generated script."""
    return repr(value)


def _axolotl(plan: Plan, model_ref: str, hints: TrainingHints, uniform: Uniform,
             module_paths: Collection[str] | None) -> Export:
    """axolotl's LoRA fields (``axolotl.utils.schemas.peft.LoraConfig``): ``adapter``, ``lora_r``,
    ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``, ``lora_target_parameters``, ``peft_use_dora``,
    ``peft_use_rslora``, ``peft_init_lora_weights``; plus ``base_model``, ``learning_rate``, ``micro_batch_size``,
    ``max_steps``, ``sequence_len``, ``lr_scheduler``, ``warmup_steps``."""
    cfg: dict[str, Any] = {"base_model": hub_id(model_ref), "adapter": "lora", "lora_r": uniform.rank,
                           "lora_alpha": _num(uniform.alpha), "lora_dropout": plan.dropout,
                           "lora_target_modules": _module_names(uniform.modules, module_paths)}
    params = [m.path for m in uniform.modules if m.parameter]
    if params:
        cfg["lora_target_parameters"] = params
    cfg |= _variant_fields("axolotl", plan.variant)
    if hints.quantize == "int8":
        cfg["load_in_8bit"] = True
    elif hints.quantize != "none":  # QLoRA: axolotl's adapter qlora, a 4-bit base and its bitsandbytes settings
        cfg |= {"adapter": "qlora", "load_in_4bit": True, "bnb_config_kwargs": {
            "bnb_4bit_quant_type": hints.quantize, "bnb_4bit_use_double_quant": hints.double_quant}}
    cfg |= {k: v for k, v in {"learning_rate": hints.lr, "micro_batch_size": hints.batch, "max_steps": hints.steps,
                              "sequence_len": hints.max_len, "lr_scheduler": hints.schedule,
                              "warmup_steps": hints.warmup}.items() if v is not None}
    exp = uniform.params()
    text = _header(plan, exp, uniform.lost, "axolotl") + yaml.safe_dump(cfg, sort_keys=False)
    return Export("axolotl", text, plan.trainable_params, exp, uniform.lost)


def _llamafactory(plan: Plan, model_ref: str, hints: TrainingHints, uniform: Uniform, lossy: bool,
                  module_paths: Collection[str] | None) -> Export:
    """LLaMA-Factory's fields (``hparams/finetuning_args.py`` ``LoraArguments``): ``finetuning_type: lora``,
    ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_target`` (comma-separated names PEFT matches),
    ``use_rslora``, ``use_dora``, ``pissa_init``; plus ``model_name_or_path``, ``stage: sft``, ``learning_rate``,
    ``per_device_train_batch_size``, ``max_steps``, ``cutoff_len``, ``lr_scheduler_type``, ``warmup_steps``."""
    lost = list(uniform.lost)
    modules = uniform.modules
    if any(m.parameter for m in modules):
        # LoraArguments has no target-parameter field: fused expert stacks and router weights cannot be named.
        dropped = tuple(m for m in modules if m.parameter)
        item = f"{len(dropped)} parameter sites (fused experts / routers) are dropped: no field targets them"
        if not lossy:
            raise LoraplaceError(f"llamafactory cannot express this placement exactly: {item}",
                                 "pass --lossy, or use --to peft / --to trl")
        lost.append(item)
        modules = tuple(m for m in modules if not m.parameter)
    cfg: dict[str, Any] = {"model_name_or_path": hub_id(model_ref), "stage": "sft", "do_train": True,
                           "finetuning_type": "lora", "lora_rank": uniform.rank, "lora_alpha": _num(uniform.alpha),
                           "lora_dropout": plan.dropout, "lora_target": ",".join(_module_names(modules, module_paths))}
    cfg |= _variant_fields("llamafactory", plan.variant)
    if hints.quantize != "none":  # ModelArguments' on-the-fly bitsandbytes quantization (the default method)
        cfg |= {"quantization_bit": 8} if hints.quantize == "int8" else {
            "quantization_bit": 4, "quantization_type": hints.quantize, "double_quantization": hints.double_quant}
    cfg |= {k: v for k, v in {"learning_rate": hints.lr, "per_device_train_batch_size": hints.batch,
                              "max_steps": hints.steps, "cutoff_len": hints.max_len,
                              "lr_scheduler_type": hints.schedule, "warmup_steps": hints.warmup}.items()
            if v is not None}
    exp = uniform.params(modules)
    text = _header(plan, exp, tuple(lost), "llamafactory") + yaml.safe_dump(cfg, sort_keys=False)
    return Export("llamafactory", text, plan.trainable_params, exp, tuple(lost))


# torchtune LoRA builders (torchtune.models.*): (model_type, hidden_size, num_hidden_layers) → component.
TORCHTUNE_BUILDERS = {
    ("llama", 2048, 16): "torchtune.models.llama3_2.lora_llama3_2_1b",
    ("llama", 3072, 28): "torchtune.models.llama3_2.lora_llama3_2_3b",
    ("llama", 4096, 32): "torchtune.models.llama3_1.lora_llama3_1_8b",
    ("qwen2", 896, 24): "torchtune.models.qwen2_5.lora_qwen2_5_0_5b",
    ("qwen2", 1536, 28): "torchtune.models.qwen2_5.lora_qwen2_5_1_5b_instruct",
    ("qwen2", 2048, 36): "torchtune.models.qwen2_5.lora_qwen2_5_3b",
    ("qwen2", 3584, 28): "torchtune.models.qwen2_5.lora_qwen2_5_7b_instruct",
    ("mistral", 4096, 32): "torchtune.models.mistral.lora_mistral_7b",
    ("gemma", 2048, 18): "torchtune.models.gemma.lora_gemma_2b",
    ("gemma", 3072, 28): "torchtune.models.gemma.lora_gemma_7b",
}
# torchtune's names for attention projections (LORA_ATTN_MODULES) and what apply_lora_to_mlp/_output adapt.
_TORCHTUNE_ATTN = {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj", "attn.o": "output_proj"}
_TORCHTUNE_MLP = ("mlp.gate", "mlp.up", "mlp.down")


def _torchtune(plan: Plan, hints: TrainingHints, uniform: Uniform, component: str | None, config: Any,
               lossy: bool) -> Export:
    """torchtune's LoRA builder arguments (its recipe configs, e.g. ``llama3_2/1B_lora_single_device.yaml``):
    ``model._component_``, ``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output``, ``lora_rank``,
    ``lora_alpha``, ``lora_dropout``; plus ``optimizer.lr``, ``batch_size``, ``max_steps_per_epoch``.
    Its builders adapt the chosen projections on every layer, and the MLP as a whole or not at all."""
    if component is None and config is not None:
        key = (getattr(config, "model_type", None), getattr(config, "hidden_size", None),
               getattr(config, "num_hidden_layers", None))
        component = TORCHTUNE_BUILDERS.get(key)
    if component is None:
        raise LoraplaceError(f"torchtune has no LoRA builder known to loraplace for {plan.model} "
                             f"({plan.family}, {plan.num_layers} layers)",
                             "pass --torchtune-component torchtune.models.<family>.lora_<size> (its builder)")
    if hints.quantize not in ("none", "nf4"):
        raise LoraplaceError(f"torchtune's QLoRA builders quantize to NF4 only; the study's base was {hints.quantize}",
                             "use --to peft / trl / axolotl / llamafactory, which take bitsandbytes' settings")
    if hints.quantize == "nf4":  # torchtune's QLoRA builders: the same arguments, the base in NF4 (torchao)
        module, _, name = component.rpartition(".")
        component = f"{module}.q{name}" if name.startswith("lora_") else component
    lost = list(uniform.lost)
    roles_layers: dict[str, set[int | None]] = {}
    for m in uniform.modules:
        roles_layers.setdefault(m.role, set()).add(m.layer)
    attn = sorted({_TORCHTUNE_ATTN[r] for r in roles_layers if r in _TORCHTUNE_ATTN})
    mlp_roles = {r for r in roles_layers if r in _TORCHTUNE_MLP}
    other = sorted(r for r in roles_layers if r not in _TORCHTUNE_ATTN and r not in _TORCHTUNE_MLP)
    partial_layers = sorted(r for r, layers in roles_layers.items() if len(layers) < plan.num_layers)
    if partial_layers:
        lost.append(f"layer subsets ({', '.join(partial_layers)}) become every layer")
    if mlp_roles and mlp_roles != set(_TORCHTUNE_MLP):
        lost.append(f"MLP roles {', '.join(sorted(mlp_roles))} become the whole MLP (apply_lora_to_mlp)")
    if other:
        lost.append(f"roles torchtune cannot name are dropped: {', '.join(other)}")
    if lost[len(uniform.lost):] and not lossy:
        raise LoraplaceError("torchtune cannot express this placement exactly: " + "; ".join(lost),
                             "pass --lossy, or use --to peft / --to trl")
    # What the exported config adapts: the kept roles on every layer that has them (the plan's own modules where
    # they exist; layers a subset left out cost the same as their neighbours).
    widths = {m.role: m for m in uniform.modules}
    full_mlp = bool(mlp_roles)
    roles = [r for r in _TORCHTUNE_ATTN if r in roles_layers] + (list(_TORCHTUNE_MLP) if full_mlp else [])
    exp = 0
    for role in roles:
        m = widths.get(role)
        if m is None:  # an MLP role the plan did not adapt: sized from a sibling's width (gate ≈ up)
            sibling = next(widths[r] for r in _TORCHTUNE_MLP if r in widths)
            m = sibling if role != "mlp.down" else PlannedModule("", None, role, sibling.out_features,
                                                                 sibling.in_features, 1, 1.0)
        magnitude = m.out_features if plan.variant == "dora" else 0  # DoRA: one per output feature
        exp += plan.num_layers * (lora_params(uniform.rank, m.in_features, m.out_features) + magnitude)
    cfg: dict[str, Any] = {"model": {"_component_": component, "lora_attn_modules": attn,
                                     "apply_lora_to_mlp": full_mlp, "apply_lora_to_output": False,
                                     "lora_rank": uniform.rank, "lora_alpha": _num(uniform.alpha),
                                     "lora_dropout": plan.dropout}}
    cfg["model"] |= _variant_fields("torchtune", plan.variant)
    if hints.lr is not None:
        cfg["optimizer"] = {"_component_": "torch.optim.AdamW", "lr": hints.lr}
    if hints.batch is not None:
        cfg["batch_size"] = hints.batch
    if hints.steps is not None:
        cfg["max_steps_per_epoch"] = hints.steps
    text = _header(plan, exp, tuple(lost), "torchtune") + yaml.safe_dump(cfg, sort_keys=False)
    return Export("torchtune", text, plan.trainable_params, exp, tuple(lost))


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value

