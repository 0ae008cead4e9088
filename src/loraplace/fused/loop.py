"""The fused training pass: each member's stepper over its own adapters, one forward and backward per step over
the shared base, the periodic and final fused evals (:func:`train_fused`)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraplace.data import TokenizedSet
from loraplace.data.batching import Batch, batching_mode, eval_batches
from loraplace.errors import ConfigError, TrialFailed
from loraplace.fused.layers import (
    FusedBlock,
    FusedLoRA,
    _head_of,
    _ParamSite,
    _Segment,
    _Segments,
    _site_weights,
    _wrap,
)
from loraplace.fused.policy import FusedMember, check_fusable
from loraplace.models import causal_lm
from loraplace.peft_io import (
    SiteInit,
    TrainedAdapters,
    named_tensors,
    read_sites,
)
from loraplace.placement.plan import Plan, resulting_plan
from loraplace.stepper import TrainClock, TrialStepper, sync
from loraplace.train import (
    autocast,
    base_dropout_off,
    checkpointing_for,
    head_loss_sum,
    peak_memory_mb,
    reset_peak_memory,
    set_activation_checkpointing,
    step_batcher,
)


def initial_weights(session, member: FusedMember, data: TokenizedSet) -> tuple[Plan, dict[str, SiteInit]]:
    """The trial's adapters as PEFT initialises them alone (its seed, its plan; EVA's SVD on ``data``, the training
    split, unless its continuation has a saved state to load over them): (the plan as PEFT built it — EVA moves
    rank between sites —, path → its :class:`SiteInit`)."""
    with session.adapter(member.plan, member.train.seed, init_data=data, state=member.continuation) as peft_model:
        plan = resulting_plan(peft_model, member.plan)
        return plan, read_sites(peft_model, plan)


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
        group = _FusedPass.start(session, data, members, plans, segments, wrapped, pad_id, evals or {})
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


@dataclass
class _FusedPass:
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
              evals: dict[str, TokenizedSet]) -> _FusedPass:
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
                            watched = self.evals[self.watched].first(n or None)
                            for key, (value, _) in self._eval(watched, [m for m in due
                                                                        if (m.watch_examples or 0) == n]).items():
                                self.steppers[key].add_eval(value, self.watched, len(watched) if n else None)
                        self.model.train()
                if on_step is not None:
                    on_step(iteration, longest, loss, sum(st.tokens_taken for st in self.steppers.values()))
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

