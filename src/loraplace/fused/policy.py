"""Which trials fuse, and how many: the fusion policy (what cannot share a base model, auto group size)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from loraplace.data.batching import PACKING_VERIFIED
from loraplace.errors import ConfigError
from loraplace.memory import estimate_activations
from loraplace.models import causal_lm
from loraplace.placement.plan import Plan
from loraplace.stepper import Continuation
from loraplace.train import (
    base_dropout_sites,
)
from loraplace.train_config import TrainSpec

# DoRA's math is per trial (its magnitude vector and the norm of its own W + ΔW), so it fuses; EVA is plain LoRA
# after PEFT's data-driven init (run per trial, as alone); PiSSA rewrites the shared base weights: not fusable.
FUSABLE_VARIANTS = ("lora", "rslora", "dora", "eva")
BNB_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' quantized linears (a QLoRA base)
# execution.fuse: auto. Fusion trades memory (activations grow with K) for fewer, larger kernels: it pays where a
# step is launch-bound (a GPU at small batch), not where it is compute-bound. On a 2-core CPU it did not pay
# (benchmarks/RESULTS.md, bench_study.py --fuse and bench_fused.py), so auto leaves it off on a CPU; on CUDA (once
# verified there) it groups as many trials as fit, up to FUSE_AUTO_MAX.
FUSE_AUTO_MAX = 8
FUSE_AUTO_MEMORY_SHARE = 0.8  # of the device's free memory (after the base model) the group's activations may use
# A default must be a path that has run on the hardware it is the default for. Fusion on CUDA is tested on the CPU
# only until benchmarks/gpu_check.py has run on a GPU (its equality tests and bench_fused.py there); until then
# fuse: auto on CUDA runs trials one at a time, and fuse: K forces fusion. Set from what gpu_check measures.
CUDA_FUSE_VERIFIED = False


@dataclass(frozen=True)
class FusedMember:
    key: str  # the trial id
    plan: Plan
    train: TrainSpec
    eval_every: int | None = None  # eval.every: a fused eval of the watched split every that many steps
    eval_batch: int | None = None  # examples per eval batch (the trial's eval.batch); None: not evaluated fused
    continuation: Continuation | None = None  # continue a saved state, stop and save there (as alone)
    eval_at: tuple[int, ...] = ()  # eval.at_steps: a fused eval of the watched split at these steps too
    watch_examples: int | None = None  # eval.watch_examples: those evals read the watched split's first N


def base_dropout(lm) -> str:
    """The dropout the base model applies in training mode, in words ('' if none)."""
    return ", ".join(sorted({f"{name.rsplit('.', 1)[-1] or 'model'}.{attr} {getattr(module, attr):g}"
                             for name, module, attr in base_dropout_sites(lm)}))


def fusion_problems(model, members: list[FusedMember]) -> tuple[list[str], dict[str, list[str]]]:
    """Why these members cannot all be fused: (problems of the group — the model, duplicate ids —, member key →
    its own problems). Members with no problem of their own fuse together when the group has none."""
    group: list[str] = []
    own: dict[str, list[str]] = defaultdict(list)
    lm = causal_lm(model)
    family = getattr(lm.config, "model_type", None)
    if family not in PACKING_VERIFIED:
        group.append(f"family {family!r}: fused rows need packing, which is not verified for it")
    if len({m.key for m in members}) != len(members):
        group.append("two members share a trial id")
    quantized = sorted({type(mod).__name__ for mod in lm.modules() if type(mod).__name__ in BNB_LAYERS})
    if quantized:
        group.append(f"the base is quantized by bitsandbytes ({', '.join(quantized)}): fused LoRA layers wrap plain "
                     "linear weights")
    dropout = base_dropout(lm)
    for m in members:
        if dropout and m.train.base_dropout == "keep":
            own[m.key].append(f"the base model drops out while training ({dropout}): a fused trial would draw other "
                              "masks than it draws alone (GPT-2 checkpoints ship 0.1); train.base_dropout: off "
                              "turns it off and lets it fuse")
        if m.plan.variant not in FUSABLE_VARIANTS:
            own[m.key].append(f"variant {m.plan.variant} cannot share a base model (fusable: "
                              f"{', '.join(FUSABLE_VARIANTS)})")
        if any(pm.expert_paths for pm in m.plan.modules):
            own[m.key].append("per-expert linear modules (expert_paths sites) are not fusable yet")
        if m.train.compile:
            own[m.key].append("train.compile is not fusable (the fused layers pick each trial's rows in Python: a "
                              "compiled graph would be specialised to one group's row layout)")
        if (m.eval_every or m.eval_at) and not m.eval_batch:
            own[m.key].append("evals during training (eval.every) need an eval batch size")
        if m.plan.dropout:
            own[m.key].append(f"LoRA dropout {m.plan.dropout} is not fusable yet (each trial's dropout masks would "
                              "differ from PEFT's)")
    return group, dict(own)


def check_fusable(model, members: list[FusedMember]) -> None:
    """Every reason this group cannot be fused, at once (:func:`fusion_problems`)."""
    group, own = fusion_problems(model, members)
    problems = group + [f"{key}: {problem}" for key, found in own.items() for problem in found]
    if problems:
        raise ConfigError(problems, "these trials cannot be fused")


def auto_group_size(config, device_type: str, free_bytes: int | None, dtype_bytes: int, forward_tokens: int,
                    loss_chunk: int | None, cuda_verified: bool | None = None) -> tuple[int, str]:
    """(trials per fused group, why) for ``execution.fuse: auto``. ``forward_tokens``: the most tokens one trial's
    forward can hold (micro-batch × max_len); each trial of a group needs that forward's activations
    (:func:`loraplace.memory.estimate_activations`), and ``free_bytes`` is what the device has with the base model
    loaded. ``cuda_verified`` (default :data:`CUDA_FUSE_VERIFIED`): whether fusion has run on a GPU."""
    if device_type != "cuda":
        why = ("measured not to pay on a CPU" if device_type == "cpu" else f"not measured on {device_type}")
        return 1, f"trials run one at a time (execution.fuse: auto — fusion is {why}; fuse: K forces it)"
    if not (CUDA_FUSE_VERIFIED if cuda_verified is None else cuda_verified):
        return 1, ("trials run one at a time (execution.fuse: auto — fusion has not yet run on a GPU through "
                   "benchmarks/gpu_check.py, so it is not a CUDA default; fuse: K forces it)")
    if free_bytes is None:
        return 1, "trials run one at a time (execution.fuse: auto — the device's free memory is unknown)"
    per_trial = estimate_activations(config, forward_tokens, forward_tokens, dtype_bytes, loss_chunk).full_bytes
    fits = int(FUSE_AUTO_MEMORY_SHARE * free_bytes // max(per_trial, 1))
    memory = (f"≈ {per_trial / 2**30:.2f} GiB of activations per trial ({forward_tokens} tokens a forward), "
              f"{FUSE_AUTO_MEMORY_SHARE:.0%} of the {free_bytes / 2**30:.1f} GiB free on {device_type}")
    if fits < 2:
        return 1, f"trials run one at a time (execution.fuse: auto — two trials do not fit: {memory})"
    k = min(FUSE_AUTO_MAX, fits)
    return k, f"trials fused in groups of up to {k} (execution.fuse: auto — {memory})"
