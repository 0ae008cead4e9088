"""Fused trials: several LoRA trials trained in one pass over one frozen base model (issue "Fused studies").

Each adapted site of the base model is wrapped once by a :class:`FusedLoRA` that holds the adapters of every
trial of the group adapting it. A step's batch holds each trial's own rows, contiguous per trial (its own data
order: seeds differ); the frozen base runs once over all rows, then each trial's ``scale · B(A(x_rows))`` is
added to its rows only, and rows of trials that do not adapt a site pass through unchanged. Shapes: the batch is
[R, W] — each trial's packed rows (``data.batching.make_batch``) padded to the widest trial's width W and stacked,
so attention (block-diagonal within a row) never mixes trials. The plain LoRA trials' terms at a site are batched
matmuls — each trial one batch entry of its own rows — so the step's kernel count does not grow with K (what a
launch-bound GPU step needs) and no sum ever mixes two trials' numbers. (On the 2-core CPU a loop over trials ran
bench_fused.py's fused phase 6 % faster — 211.8 vs 224.6 s, while the two runs' sequential phases differed by 4 % —
and fusion is off on a CPU by default; the one path CUDA needs is kept, so the suite tests what a GPU runs.)

Per trial, everything else is its own: its loss (token-weighted mean over its labels; the step's objective is the
sum, so each trial's gradients are exactly its own — its adapters are disjoint parameters and no op mixes rows),
and its :class:`~loraplace.stepper.TrialStepper` — the one a trial alone has: AdamW state, LR schedule, gradient
clipping by its own norm, data order, step count (a trial that has finished leaves the group), a non-finite loss
(that trial fails at its step and leaves; the others go on), and a saved state to continue from or stop at.

Initial weights come from PEFT itself: each trial's adapters are injected with ``Session.adapter`` (its seed, its
plan) and copied out (``peft_io.read_sites``), so a fused trial starts exactly where the same trial alone starts.
Each member's result is a ``peft_io.TrainedAdapters``: the caller (``trial.run_trial(trained_in_group=…)``)
injects the plan PEFT built again and loads the trained weights (:func:`load_weights`) to save through the usual
path (and to evaluate what the fused eval did not cover: accuracy by generation) — the saved PEFT adapter is the
standalone one.

Scope now: LoRA, rsLoRA, DoRA and EVA (PEFT's init per trial, as alone) on ``nn.Linear`` / GPT-2 ``Conv1D`` sites
and on parameter sites (PEFT ``target_parameters``: fused expert stacks, router weights) of families whose
packing is verified. A mixture-of-experts block routes tokens across rows, so it is the one place the rows do not
share a pass: a :class:`FusedBlock` runs it once per trial's rows with that trial's adapters (its expert stacks as
W + ΔW in PEFT's layout; linears inside it, e.g. shared experts, see only that trial's rows). Each trial cuts its
steps into micro-batches, packs or pads its rows and evaluates every ``eval.every`` steps as it does alone: forward
j of a step stacks every trial's j-th micro-batch, and a periodic eval is one fused pass for the trials due.
Activation checkpointing is on for the whole group when a member asks for it (or ``auto`` finds the group's
forward too big). Not covered: compile (the row routing is Python), dropout (LoRA's or the base model's: a fused
trial would draw other masks than alone) and per-expert linear modules (``expert_paths``).
Anything else is refused up front (:func:`fusion_problems`): the study runner runs such a trial alone, says why in
its warnings, and fuses the rest of its group. After training, the surviving trials' validation and test losses are
computed fused as well (each eval batch repeated once per trial); generation-based accuracy runs per trial.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraplace.data import TokenizedSet
from loraplace.data.batching import PACKING_VERIFIED, Batch, batching_mode, eval_batches
from loraplace.errors import ConfigError, TrialFailed
from loraplace.memory import estimate_activations
from loraplace.models import causal_lm
from loraplace.peft_io import (
    ParamLayout,
    SiteInit,
    SiteWeights,
    TrainedAdapters,
    load_weights,
    named_tensors,
    read_sites,
)
from loraplace.placement.plan import Plan, resulting_plan
from loraplace.stepper import Continuation, TrainClock, TrialStepper, sync
from loraplace.train import (
    autocast,
    base_dropout_off,
    base_dropout_sites,
    checkpointing_for,
    head_loss_sum,
    peak_memory_mb,
    reset_peak_memory,
    set_activation_checkpointing,
    step_batcher,
)
from loraplace.train_config import TrainSpec

# DoRA's math is per trial (its magnitude vector and the norm of its own W + ΔW), so it fuses; EVA is plain LoRA
# after PEFT's data-driven init (run per trial, as alone); PiSSA rewrites the shared base weights: not fusable.
FUSABLE_VARIANTS = ("lora", "rslora", "dora", "eva")
BNB_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' quantized linears (a QLoRA base)
# execution.fuse: auto. Fusion trades memory (activations grow with K) for fewer, larger kernels: it pays where a
# step is launch-bound (a GPU at small batch), not where it is compute-bound. On the 2-core CPU it was measured at
# 1.01× the sequential wall time on the quickstart and 0.76× on bench_fused.py (benchmarks/RESULTS.md, 2026-11-24),
# so auto leaves it off on a CPU; on CUDA (once verified there) it groups as many trials as fit, up to FUSE_AUTO_MAX.
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


@dataclass
class _Segment:
    key: str
    lo: int  # first row of this trial in the step's batch
    hi: int


class _Segments:
    """The current forward's row layout, shared by every FusedLoRA and FusedBlock of the model: bound for one
    forward (and its backward, whose checkpoint recompute runs the layers again) by ``with segments.bound(rows)``,
    cleared on exit; a fused layer run outside such a block raises. Inside a FusedBlock's per-trial pass
    (``with segments.alone(key)``) every row is that trial's. Caches the batched layouts the layers use
    (:meth:`gather`) while the rows stay bound."""

    def __init__(self):
        self._rows: list[_Segment] | None = None
        self.only: str | None = None
        self._plans: dict[tuple, _Gather] = {}

    @contextlib.contextmanager
    def bound(self, rows: list[_Segment]) -> Iterator[None]:
        if self._rows is not None:
            raise RuntimeError("fused rows are already bound (nested forwards)")
        self._rows, self._plans = rows, {}
        try:
            yield
        finally:
            self._rows, self._plans = None, {}

    @contextlib.contextmanager
    def alone(self, key: str) -> Iterator[None]:
        self.only = key
        try:
            yield
        finally:
            self.only = None

    @property
    def rows(self) -> list[_Segment]:
        if self._rows is None:
            raise RuntimeError("a fused layer ran outside a bound row layout (segments.bound)")
        return self._rows

    def gather(self, keys: tuple[str, ...], scales: tuple[float, ...], device: torch.device) -> _Gather:
        """How the rows of ``keys`` are laid out as a [K, R_max, ·] batch and put back (cached until the rows
        change: every site with the same trials and scales shares it)."""
        cached = self._plans.get((keys, scales, device))
        if cached is None:
            where = {seg.key: seg for seg in self.rows}
            r_max = max(where[key].hi - where[key].lo for key in keys)
            slots, rows, slot_of_row = [], [], []
            for i, key in enumerate(keys):
                seg = where[key]
                own = list(range(seg.lo, seg.hi))
                # Spare slots repeat the trial's own first row: whatever they compute stays in its batch entry,
                # and their outputs are never read.
                slots += own + [seg.lo] * (r_max - len(own))
                rows += own
                slot_of_row += [i * r_max + j for j in range(len(own))]
            as_index = functools.partial(torch.tensor, dtype=torch.long)
            cached = self._plans[(keys, scales, device)] = _Gather(
                as_index(slots).to(device, non_blocking=True), as_index(rows).to(device, non_blocking=True),
                as_index(slot_of_row).to(device, non_blocking=True),
                torch.tensor(scales).view(-1, 1, 1).to(device, non_blocking=True))
        return cached


@dataclass(frozen=True)
class _Gather:
    """Rows of K trials as one batched matmul's [K, R_max, ·] operand (``slots`` [K·R_max] → a row of x), and back
    (``rows`` [n]: the trials' rows in x; ``slot_of_row`` [n]: where each sits in the batch); ``scales`` [K, 1, 1]."""

    slots: torch.Tensor
    rows: torch.Tensor
    slot_of_row: torch.Tensor
    scales: torch.Tensor


class _TrialAdapters(nn.Module):
    """The LoRA factors of several trials at one site, keyed by trial id (DoRA's magnitude where a trial has one)."""

    def __init__(self):
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.magnitude = nn.ParameterDict()  # DoRA trials only: [out]
        self.scaling: dict[str, float] = {}

    def add(self, key: str, weights: SiteWeights, scale: float) -> None:
        self.lora_A[key] = nn.Parameter(weights.lora_A.detach().clone().float())
        self.lora_B[key] = nn.Parameter(weights.lora_B.detach().clone().float())
        if weights.magnitude is not None:
            self.magnitude[key] = nn.Parameter(weights.magnitude.detach().clone().float())
        self.scaling[key] = scale

    def remove(self, key: str) -> None:
        for store in (self.lora_A, self.lora_B, self.magnitude):
            if key in store:
                del store[key]
        self.scaling.pop(key, None)


class FusedLoRA(_TrialAdapters):
    """A frozen base linear (``nn.Linear`` or GPT-2 ``Conv1D``) plus the LoRA adapters of several trials."""

    def __init__(self, base: nn.Module, segments: _Segments):
        super().__init__()
        self.base = base
        self._segments = segments
        self._conv1d = type(base).__name__ == "Conv1D"  # weight stored [in, out] (PEFT: fan_in_fan_out)

    def _dora(self, key: str, rows: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA (``DoraLinearLayer.forward``, no dropout): rows + (m/‖W + s·BA‖ − 1)·(rows − bias)
        + m/‖W + s·BA‖ · s·B(A(x)); the row norm [out] is detached, as in the paper (§4.3) and PEFT."""
        a, b, scale = self.lora_A[key], self.lora_B[key], self.scaling[key]
        weight = self.base.weight.T if self._conv1d else self.base.weight  # [out, in]
        lora_weight = (b @ a).detach().to(lora.dtype)  # [out, in]
        weight = weight.to(lora.dtype)
        norm = torch.linalg.norm(weight + scale * lora_weight, dim=1).to(weight.dtype).detach()  # [out]
        mag_norm_scale = (self.magnitude[key] / norm).view(1, -1)
        base_rows = rows if self.base.bias is None else rows - self.base.bias
        return rows + (mag_norm_scale - 1) * base_rows + mag_norm_scale * lora * scale

    def _one_trial(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y = base(x) plus trial ``key``'s LoRA term on every row of x (x [..., d_in], y [..., d_out])."""
        if key not in self.scaling:
            return y
        lora = F.linear(F.linear(x, self.lora_A[key]), self.lora_B[key])
        return self._dora(key, y, lora) if key in self.magnitude else y + lora * self.scaling[key]

    def forward_for(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """The layer for trial ``key`` alone: for the LM head, which sees one trial's label positions at a time
        (and, with a chunked loss, again during backward, so the trial is bound here, not in shared state)."""
        return self._one_trial(key, x, self.base(x))

    def _plain(self, x: torch.Tensor, y: torch.Tensor, keys: tuple[str, ...]) -> torch.Tensor:
        """y plus every plain-LoRA trial's ``scale · B(A(x))`` on its own rows, as batched matmuls: one set of
        kernels per distinct rank at this site, whatever K (a GPU step at small batch is launch-bound; a loop over
        trials launches 4 kernels per trial). Each trial is its own batch entry — its rows, padded to the
        group's most rows — so no reduction ever sums over two trials' numbers: a NaN in one trial's adapters
        stays in its rows and its gradients. Shapes: x [R, T, d_in], y [R, T, d_out]."""
        by_rank: dict[int, list[str]] = defaultdict(list)
        for key in keys:
            by_rank[self.lora_A[key].shape[0]].append(key)
        t = x.shape[1]
        for group in by_rank.values():
            plan = self._segments.gather(tuple(group), tuple(self.scaling[key] for key in group), x.device)
            xs = x.index_select(0, plan.slots).view(len(group), -1, x.shape[-1])  # [K, R_max·T, d_in]
            a = torch.stack([self.lora_A[key] for key in group])  # [K, r, d_in]
            b = torch.stack([self.lora_B[key] for key in group])  # [K, d_out, r]
            out = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * plan.scales  # [K, R_max·T, d_out]
            delta = out.view(-1, t, out.shape[-1]).index_select(0, plan.slot_of_row)  # [n, T, d_out]
            y = y.index_add(0, plan.rows, delta.to(y.dtype))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [R, T, d_in] → [R, T, d_out]
        y = self.base(x)
        if not self.scaling:
            return y
        if self._segments.only is not None:  # inside a FusedBlock: all of x is one trial's
            return self._one_trial(self._segments.only, x, y)
        segments = self._segments.rows
        if x.dim() != 3 or x.shape[0] != segments[-1].hi:  # never guess which trial a gathered token belongs to
            raise RuntimeError(f"a fused LoRA layer expects [rows, T, d] input, got {tuple(x.shape)}")
        plain = tuple(seg.key for seg in segments if seg.key in self.scaling and seg.key not in self.magnitude)
        if plain:
            y = self._plain(x, y, plain)
        if not self.magnitude:
            return y
        # DoRA trials (their output depends on their own weight norm): one at a time on their rows.
        return torch.cat([self._one_trial(seg.key, x[seg.lo:seg.hi], y[seg.lo:seg.hi]) if seg.key in self.magnitude
                          else y[seg.lo:seg.hi] for seg in segments], 0)


class _ParamSite(_TrialAdapters):
    """The LoRA factors of several trials on one parameter (PEFT ``target_parameters``: a fused expert stack
    [E, ·, ·] or a 2-D weight such as a router's), and PEFT's layout of them (``ParamWrapper``; no DoRA there)."""

    def __init__(self, layout: ParamLayout):
        super().__init__()
        self.num_experts, self.swapped, self.fan_in_fan_out = layout.experts, layout.swapped, layout.fan_in_fan_out

    def weight(self, key: str, w: torch.Tensor) -> torch.Tensor:
        """W + ΔW of trial ``key``, as PEFT's ParamWrapper builds it (``get_delta_factors`` folded with one
        ``baddbmm`` for an expert stack; ``W + B·A·s`` for a 2-D weight)."""
        a, b, scale = self.lora_A[key], self.lora_B[key], self.scaling[key]
        if self.num_experts > 1:
            a = a.reshape(self.num_experts, -1, a.shape[-1])  # [E, r, in]
            b = b.reshape(b.shape[0], -1, self.num_experts).permute(2, 0, 1)  # [E, out, r]
            lhs, rhs = (b, a) if self.swapped else (a.transpose(-2, -1), b.transpose(-2, -1))
            with torch.autocast(device_type=w.device.type, enabled=False):
                return torch.baddbmm(w, lhs.to(w.dtype), rhs.to(w.dtype), alpha=scale)
        delta = (b @ a) * scale
        return w + (delta.T if self.fan_in_fan_out else delta).to(w.dtype)


class FusedBlock(nn.Module):
    """A mixture-of-experts block (the decoder layer's child that holds expert-stack or router sites), run once per
    trial's rows with that trial's adapters: its routing and expert matmuls gather tokens across rows, so rows of
    different trials cannot share one pass. Inside, :class:`FusedLoRA` layers see ``segments.only`` and parameter
    sites are substituted with ``torch.func.functional_call``. Shapes: hidden [R, T, H] → each trial's [R_k, T, H]."""

    def __init__(self, block: nn.Module, segments: _Segments):
        super().__init__()
        self.block = block
        self.sites = nn.ModuleDict()  # parameter name relative to the block ('.' → '__') → _ParamSite
        self._segments = segments

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        rows = self._segments.rows
        if hidden.dim() != 3 or hidden.shape[0] != rows[-1].hi:
            raise RuntimeError(f"a fused MoE block expects [rows, T, H] input, got {tuple(hidden.shape)}")
        outs = []
        for seg in rows:
            overrides = {name.replace("__", "."): site.weight(seg.key, self.block.get_parameter(
                name.replace("__", "."))) for name, site in self.sites.items() if seg.key in site.scaling}
            with self._segments.alone(seg.key):
                outs.append(torch.func.functional_call(self.block, overrides, (hidden[seg.lo:seg.hi], *args),
                                                       kwargs, strict=False))
        return _cat_outputs(outs)


def _cat_outputs(outs: list):
    """Per-trial outputs of a block joined along dim 0 (tensors; tuples element-wise; None stays None)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, 0)
    if isinstance(first, tuple):
        return tuple(_cat_outputs([o[i] for o in outs]) for i in range(len(first)))
    if first is None:
        return None
    raise TypeError(f"a fused MoE block cannot join outputs of type {type(first).__name__}")


def _head_of(lm, key: str):
    """The LM head as trial ``key`` sees it: its own fused adapter when the head is adapted, else the plain head."""
    head = lm.get_output_embeddings()
    return functools.partial(head.forward_for, key) if isinstance(head, FusedLoRA) else head


def _block_path(site_path: str) -> str | None:
    """The decoder layer's child holding a site: model.layers.3.mlp.experts.down_proj → model.layers.3.mlp (None
    outside the decoder layers, e.g. lm_head)."""
    parts = site_path.split(".")
    layer = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return None if layer is None or layer + 2 > len(parts) else ".".join(parts[:layer + 2])


def _is_moe_block(module: nn.Module) -> bool:
    """A block whose forward routes tokens to experts (transformers 5 keeps them as [E, ·, ·] stacks): linears
    inside it (shared experts, a linear router) see gathered tokens, not rows."""
    return any(p.dim() == 3 for p in module.parameters())


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


def initial_weights(session, member: FusedMember, data: TokenizedSet) -> tuple[Plan, dict[str, SiteInit]]:
    """The trial's adapters as PEFT initialises them alone (its seed, its plan; EVA's SVD on ``data``, the training
    split, unless its continuation has a saved state to load over them): (the plan as PEFT built it — EVA moves
    rank between sites —, path → its :class:`SiteInit`)."""
    with session.adapter(member.plan, member.train.seed, init_data=data, state=member.continuation) as peft_model:
        plan = resulting_plan(peft_model, member.plan)
        return plan, read_sites(peft_model, plan)


def _site_weights(layer: FusedLoRA | _ParamSite, key: str) -> SiteWeights:
    """One trial's trainable tensors at one site (the live parameters), as PEFT lays them out."""
    return SiteWeights(layer.lora_A[key], layer.lora_B[key], layer.magnitude.get(key))


def _combined(batches: list[tuple[str, Batch]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, list[_Segment], list[torch.Tensor]]:
    """Each trial's rows (packed or padded, as it trains alone) stacked and padded to the widest: (input_ids,
    position_ids) [ΣR_k, W], the row range of each trial, and each trial's target indices re-based into the stacked
    [ΣR_k·W] positions."""
    width = max(b.input_ids.shape[1] for _, b in batches)
    ids, pos, segments, targets = [], [], [], []
    row = 0
    for key, b in batches:
        r, t = b.input_ids.shape
        pad = width - t
        ids.append(F.pad(b.input_ids, (0, pad), value=pad_id))
        # A padded (unpacked) trial's rows are one sequence each: the positions its forward alone defaults to.
        own = b.position_ids if b.position_ids is not None else torch.arange(t).expand(r, t)
        # Tail padding restarts its positions: a separate sequence nobody attends to (as in make_batch).
        tail = torch.arange(pad, dtype=own.dtype).expand(r, pad)
        pos.append(torch.cat([own, tail], 1))
        rows, cols = b.target_index // t, b.target_index % t
        targets.append((rows + row) * width + cols)
        segments.append(_Segment(key, row, row + r))
        row += r
    return torch.cat(ids), torch.cat(pos), segments, targets


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


@torch.no_grad()
def _eval_fused(lm, segments: _Segments, data: TokenizedSet, keys: list[str], batch: int, mode: str, pad_id: int,
                device: torch.device, dtype: torch.dtype) -> dict[str, tuple[float, int]]:
    """Each trial's token-weighted eval loss over ``data``, all trials in one pass per batch: the batches are
    :func:`loraplace.evaluate.eval_loss`'s (:func:`~loraplace.data.batching.eval_batches`), each repeated once per
    trial, so every trial sees exactly the rows it would see alone. → key → (loss, label tokens)."""
    totals = {key: torch.zeros((), dtype=torch.float64, device=device) for key in keys}
    count = 0
    for b in eval_batches(data, batch, mode, pad_id):
        input_ids, position_ids, rows, target_index = _combined([(key, b) for key in keys], pad_id)
        targets = b.targets.to(device)
        with segments.bound(rows), autocast(device, dtype):
            hidden = lm.base_model(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                                   use_cache=False).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1])  # [K·R·W, H]
            for key, index in zip(keys, target_index, strict=True):
                totals[key] += head_loss_sum(lm, hidden.index_select(0, index.to(device)), targets,
                                             head=_head_of(lm, key)).double()
        count += b.label_tokens
    return {key: (float(total.item()) / count, count) for key, total in totals.items()}


def train_fused(session, data: TokenizedSet, members: list[FusedMember], *, pad_id: int,
                evals: dict[str, TokenizedSet] | None = None,
                fault: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None,
                on_step: Callable[[int, int, float | None, int], None] | None = None) -> dict[str, TrainedAdapters]:
    """Train every member in one pass per step over ``session.model``; see the module docstring.
    ``evals``: split name → data each surviving member with an ``eval_batch`` is then evaluated on (its own rows,
    packed or padded), fused too; the watched split (validation, else test) also every ``eval_every`` steps of a
    member that sets it. A member with a ``continuation`` continues its saved state (if any), stops at its
    ``stop_after`` and saves its state there, as alone.
    ``on_step(step, steps of the longest member, the step's mean loss over the members still in, real tokens
    of all members so far)`` after every step (heartbeats, progress)."""
    model = session.model
    check_fusable(model, members)
    reset_peak_memory(session.device)  # the group's peak: its members' inits, training and fused evals
    plans, inits = {}, {}
    for m in members:
        plans[m.key], inits[m.key] = initial_weights(session, m, data)
    segments = _Segments()
    wrapped: dict[str, FusedLoRA | _ParamSite] = {}
    blocks: dict[str, FusedBlock] = {}  # MoE blocks (parameter sites, or linears that see gathered tokens)
    try:
        _wrap(model, members, plans, inits, segments, wrapped, blocks)
        group = _Group.start(session, data, members, plans, segments, wrapped, pad_id, evals or {})
        group.train(fault, on_step)
        return group.collect(plans)
    finally:  # the session's base model goes back as it was: MoE blocks first (linears' paths run through them)
        for path, block in blocks.items():
            parent_path, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent_path), leaf, block.block)
        for path, layer in wrapped.items():
            if isinstance(layer, FusedLoRA):
                parent_path, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent_path), leaf, layer.base)
        model.eval()


def _wrap(model, members: list[FusedMember], plans: dict[str, Plan], inits: dict[str, dict[str, SiteInit]],
          segments: _Segments, wrapped: dict[str, FusedLoRA | _ParamSite], blocks: dict[str, FusedBlock]) -> None:
    """Put every member's adapters into the model: a FusedLoRA per adapted linear, a _ParamSite per parameter site,
    a FusedBlock per MoE block (set last: the linears inside are found by their original paths)."""
    for m in members:
        for pm in plans[m.key].modules:
            block = _block_path(pm.path)
            if block is not None and block not in blocks and (pm.parameter or _is_moe_block(
                    model.get_submodule(block))):
                blocks[block] = FusedBlock(model.get_submodule(block), segments)
            init = inits[m.key][pm.path]
            if pm.path not in wrapped and pm.parameter:
                if block is None:
                    raise ConfigError([f"{pm.path}: a parameter site outside the decoder layers"],
                                      "these trials cannot be fused")
                wrapped[pm.path] = _ParamSite(init.layout)
                blocks[block].sites[pm.path[len(block) + 1:].replace(".", "__")] = wrapped[pm.path]
            elif pm.path not in wrapped:
                parent_path, _, leaf = pm.path.rpartition(".")
                parent = model.get_submodule(parent_path)
                wrapped[pm.path] = FusedLoRA(getattr(parent, leaf), segments)
                setattr(parent, leaf, wrapped[pm.path])
            wrapped[pm.path].add(m.key, init.weights, init.scale)
    for path, block in blocks.items():
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, block)


@dataclass
class _Group:
    """A fused pass in progress: the wrapped model, one :class:`TrialStepper` per member (its optimizer, schedule,
    data order, curve — exactly as alone), how each member cuts its steps into micro-batches and packs its rows, and
    the members that have failed so far."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    pad_id: int
    members: list[FusedMember]
    segments: _Segments
    wrapped: dict[str, FusedLoRA | _ParamSite]
    evals: dict[str, TokenizedSet]  # split → data, for the final and periodic fused evals
    watched: str  # the split periodic evals read: validation when there is one, else test (as alone)
    steppers: dict[str, TrialStepper]
    step_batches: dict[str, Callable[[np.ndarray], list[Batch]]]  # a step's examples → its micro-batches, as alone
    modes: dict[str, str]  # packed or padded rows, as alone
    chunks: dict[str, int | None]  # each member's loss chunk
    failures: dict[str, TrialFailed] = field(default_factory=dict)
    final_evals: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)  # key → split → (loss, n)
    eval_s: float = 0.0  # the final fused evals' time
    peak_mem_mb: float = 0.0  # the group's peak, from before the members' inits to after the final evals

    @classmethod
    def start(cls, session, data: TokenizedSet, members: list[FusedMember], plans: dict[str, Plan],
              segments: _Segments, wrapped: dict[str, FusedLoRA | _ParamSite], pad_id: int,
              evals: dict[str, TokenizedSet]) -> _Group:
        """Each member's stepper over its own adapters (in plan order, the order a saved state keeps), its saved
        state restored when its continuation has one."""
        model, device = session.model, session.device
        watched = "validation" if "validation" in evals else "test"
        if any(m.eval_every or m.eval_at for m in members) and watched not in evals:
            raise ConfigError(["evals during training (eval.every) need the eval splits passed as evals"],
                              "these trials cannot be fused")
        steppers, step_batches, modes = {}, {}, {}
        for m in members:
            params, names = named_tensors({pm.path: _site_weights(wrapped[pm.path], m.key)
                                           for pm in plans[m.key].modules})
            stepper = TrialStepper.resuming(params, names, m.train, len(data), device, eval_every=m.eval_every,
                                            eval_at=m.eval_at, continuation=m.continuation)
            modes[m.key] = batching_mode(model, m.train.packing)
            step_batches[m.key], stepper.outcome.static_shape = step_batcher(data, m.train, stepper.order,
                                                                             modes[m.key], pad_id)
            steppers[m.key] = stepper
        return cls(model, device, session.dtype, pad_id, members, segments, wrapped, evals, watched, steppers,
                   step_batches, modes, {m.key: m.train.resolved_loss_chunk(device.type) for m in members})

    # ----------------------------------------------------------------------------------------- training

    def train(self, fault, on_step) -> None:
        """Step every member until it stops (its last step, its continuation's stop, or a failure); then the
        final fused evals of the survivors."""
        lm = causal_lm(self.model)
        longest = max(st.stop - st.step for st in self.steppers.values())
        with contextlib.ExitStack() as cleanup:  # undone in reverse order, failed or not
            cleanup.callback(self.model.eval)
            if all(m.train.base_dropout == "off" for m in self.members):  # check_fusable: else there is none
                cleanup.enter_context(base_dropout_off(lm))
            if self._checkpointing(lm.config):
                set_activation_checkpointing(lm, True)  # the session's base model is shared by the next trial
                cleanup.callback(set_activation_checkpointing, lm, False)
            self.model.train()
            clock = TrainClock(self.device)
            for iteration in range(1, longest + 1):
                active = [m for m in self.members if m.key not in self.failures and not self.steppers[m.key].finished]
                if not active:
                    break
                losses, tokens = self._step(lm, active, fault)
                # Each member its own clipping (by its own norm), AdamW step and schedule; its loss is read back at
                # the next sync, where a non-finite one fails it (below).
                lrs = {m.key: self.steppers[m.key].optimizer_step() for m in active}
                due = [m for m in active if self.steppers[m.key].eval_due()]
                sync_now = bool(due) or any(self.steppers[m.key].sync_due() for m in active)
                elapsed = clock.elapsed(synchronize=sync_now or iteration == 1)  # the group's, evals excluded
                for m in active:
                    self.steppers[m.key].record(losses[m.key], *tokens[m.key], lrs[m.key], elapsed)
                loss = self._sync() if sync_now else None
                if sync_now:  # periodic saves of the members' states (execution.save_state_every)
                    for m in active:
                        if m.key not in self.failures:
                            self.steppers[m.key].save_if_due(clock)
                due = [m for m in due if m.key not in self.failures]
                if due:
                    with clock.excluded():
                        self.model.eval()
                        for n in sorted({m.watch_examples or 0 for m in due}):  # 0: the whole split
                            watched = self.evals[self.watched]
                            watched = watched.subset(range(min(n, len(watched)))) if n else watched
                            for key, (value, _) in self._eval(watched, [m for m in due
                                                                        if (m.watch_examples or 0) == n]).items():
                                self.steppers[key].add_eval(value, self.watched, len(watched) if n else None)
                        self.model.train()
                if on_step is not None:
                    on_step(iteration, longest, loss, sum(st.tokens_taken for st in self.steppers.values()))
            self._sync()  # (every member's last step already synced; nothing is left behind)
            self.model.eval()
            t_eval = time.perf_counter()
            self.final_evals = self._final_evals()
            self.eval_s = time.perf_counter() - t_eval
        self.peak_mem_mb = peak_memory_mb(self.device)

    def _step(self, lm, active: list[FusedMember], fault) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
        """One step of every active member: forward j stacks every member's j-th micro-batch (members may cut their
        steps into different counts), one backward per forward. → key → the step's loss (token-weighted mean, on
        the device), key → (real tokens, label tokens)."""
        micro = {m.key: self.step_batches[m.key](self.steppers[m.key].examples()) for m in active}
        n_labels = {key: sum(b.label_tokens for b in bs) for key, bs in micro.items()}  # per trial, its step's
        step_loss = {key: torch.zeros((), device=self.device) for key in micro}
        for j in range(max(len(bs) for bs in micro.values())):
            batches = [(key, bs[j]) for key, bs in micro.items() if j < len(bs)]
            input_ids, position_ids, rows, target_index = _combined(batches, self.pad_id)
            # Bound through the backward too: checkpointing recomputes the layers there.
            with self.segments.bound(rows):
                with autocast(self.device, self.dtype):
                    hidden = lm.base_model(input_ids=input_ids.to(self.device),
                                           position_ids=position_ids.to(self.device),
                                           use_cache=False).last_hidden_state
                    hidden = hidden.reshape(-1, hidden.shape[-1])  # [ΣR_k·W, H]
                    parts = {}
                    for (key, b), index in zip(batches, target_index, strict=True):
                        part = head_loss_sum(lm, hidden.index_select(0, index.to(self.device)),
                                             b.targets.to(self.device), self.chunks[key], head=_head_of(lm, key))
                        if fault is not None:
                            part = fault(key, self.steppers[key].step + 1, part)
                        parts[key] = part / n_labels[key]  # this trial's token-weighted mean over its whole step
                sum(parts.values()).backward()  # each trial's gradient reaches its own adapters only
            for key, part in parts.items():
                step_loss[key] += part.detach()
        return step_loss, {key: (sum(b.real_tokens for b in bs), n_labels[key]) for key, bs in micro.items()}

    def _sync(self) -> float | None:
        """Read every member's pending losses back in one host sync (:func:`loraplace.stepper.sync`). A member whose
        loss is non-finite fails at that step and leaves the group: its adapters are removed (the steps it took
        after it, with NaN in its own adapters only — rows never mix — are dropped). → the mean of the members'
        latest losses read now."""
        live = {key: st for key, st in self.steppers.items() if key not in self.failures}
        before = {key: st.outcome.steps for key, st in live.items()}
        failed = sync(live)
        for key in failed:
            for layer in self.wrapped.values():
                layer.remove(key)
        self.failures |= failed
        read = [st.outcome.curve[-1].loss for key, st in live.items()
                if key not in failed and st.outcome.steps > before[key]]
        return sum(read) / len(read) if read else None

    def _eval(self, data: TokenizedSet, members: list[FusedMember]) -> dict[str, tuple[float, int]]:
        """:func:`_eval_fused` for ``members``: one fused pass per (eval batch size, batching mode) they use."""
        groups: dict[tuple[int, str], list[str]] = defaultdict(list)
        for m in members:
            groups[(m.eval_batch, self.modes[m.key])].append(m.key)
        out = {}
        for (batch, mode), keys in groups.items():
            out.update(_eval_fused(causal_lm(self.model), self.segments, data, keys, batch, mode, self.pad_id,
                                   self.device, self.dtype))
        return out

    def _final_evals(self) -> dict[str, dict[str, tuple[float, int]]]:
        """key → split → (loss, label tokens) of every surviving member with an eval batch."""
        survivors = [m for m in self.members if m.key not in self.failures and m.eval_batch]
        evaluated: dict[str, dict[str, tuple[float, int]]] = defaultdict(dict)
        for split, split_data in self.evals.items():
            for key, value in self._eval(split_data, survivors).items():
                evaluated[key][split] = value
        return dict(evaluated)

    def _checkpointing(self, config) -> bool:
        """Activation checkpointing for the group's forwards: on when a member sets it on, or when ``auto`` finds the
        group's largest forward (every trial's first micro-batch, stacked) too big for the device. It changes no
        number (no dropout is fused), so one member's setting serves all; each member whose own setting did not
        ask for it gets a note saying why it was on."""
        firsts = [self.step_batches[key](st.order[0])[0] for key, st in self.steppers.items() if st.order]
        forward = (sum(b.input_ids.shape[0] for b in firsts) * max(b.input_ids.shape[1] for b in firsts),
                   sum(b.label_tokens for b in firsts)) if firsts else None
        why = None
        if any(m.train.checkpointing == "on" for m in self.members):
            why = "activation checkpointing on: a trial of its fused group sets train.checkpointing: on"
        elif any(m.train.checkpointing == "auto" for m in self.members):
            chunk = max((c for c in self.chunks.values() if c), default=None)
            _, why = checkpointing_for("auto", config, forward, self.device, self.dtype, chunk,
                                       whose="the fused group's")
        if why is None:
            return False
        for m in self.members:
            if m.train.checkpointing != "on":
                self.steppers[m.key].note(why)
        return True

    # ----------------------------------------------------------------------------------------- results

    def collect(self, plans: dict[str, Plan]) -> dict[str, TrainedAdapters]:
        """Each member's :class:`TrainedAdapters`: copies of its trained tensors (none when it failed), its
        outcome, fused eval losses, the group's size and training peak; a member with a continuation has its state
        saved."""
        out = {}
        for m in self.members:
            stepper, failure = self.steppers[m.key], self.failures.get(m.key)
            if failure is None and m.continuation is not None:
                stepper.state().save(m.continuation.file)
            weights = {} if failure is not None else {
                pm.path: _site_weights(self.wrapped[pm.path], m.key).detached() for pm in plans[m.key].modules}
            evaluated = self.final_evals.get(m.key, {})
            out[m.key] = TrainedAdapters(outcome=stepper.outcome, weights=weights, plan=plans[m.key], failure=failure,
                                         group_size=len(self.members), eval_losses=evaluated,
                                         eval_s=self.eval_s if evaluated else 0.0, peak_mem_mb=self.peak_mem_mb)
        return out


__all__ = ["FUSE_AUTO_MAX", "FusedLoRA", "FusedMember", "TrainedAdapters", "auto_group_size", "check_fusable",
           "fusion_problems", "initial_weights", "load_weights", "train_fused"]
