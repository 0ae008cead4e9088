"""The fused layers: the row layout of a forward (which rows are whose), a FusedLoRA per adapted linear, a
parameter site per expert stack, a FusedBlock per MoE block, and wrapping / restoring the model."""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplace.errors import ConfigError
from loraplace.fused.policy import FusedMember
from loraplace.peft_io import (
    ParamLayout,
    SiteInit,
    SiteWeights,
)
from loraplace.placement.plan import Plan


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
        self._gathers: dict[tuple, _Gather] = {}

    @contextlib.contextmanager
    def bound(self, rows: list[_Segment]) -> Iterator[None]:
        if self._rows is not None:
            raise RuntimeError("fused rows are already bound (nested forwards)")
        self._rows, self._gathers = rows, {}
        try:
            yield
        finally:
            self._rows, self._gathers = None, {}

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
        cached = self._gathers.get((keys, scales, device))
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
            cached = self._gathers[(keys, scales, device)] = _Gather(
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


def _site_weights(layer: FusedLoRA | _ParamSite, key: str) -> SiteWeights:
    """One trial's trainable tensors at one site (the live parameters), as PEFT lays them out."""
    return SiteWeights(layer.lora_A[key], layer.lora_B[key], layer.magnitude.get(key))


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
