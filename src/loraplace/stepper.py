"""One trial's optimisation, step by step: the bookkeeping both training engines share.

A :class:`TrialStepper` owns one trial's AdamW, LR schedule, gradient clipping, data order and step counter, the
losses of the steps not yet read back to the host, the non-finite check, and the curve and eval points. A
training loop owns only the forward and backward: ``train.train`` drives one stepper over PEFT's own model (the
reference), ``fused.train_fused`` drives K of them over ``FusedLoRA`` layers. So the two engines agree by
construction on everything but the forward, which the fused-vs-alone tests compare.

Per step, a loop calls :meth:`TrialStepper.examples` (the step's example indices), runs forward/backward, then
:meth:`~TrialStepper.optimizer_step` (clip → AdamW step → schedule step → zero grads) and
:meth:`~TrialStepper.record` (the step's loss, still on the device). :func:`sync` reads the pending losses of any
number of steppers back in one host sync; the first non-finite one fails its trial at its own step.

The state saves and restores (:meth:`~TrialStepper.state`, :meth:`~TrialStepper.restore`, :class:`TrainerState`):
adapter tensors, optimizer moments, schedule position, RNG, the position in the data order (the order itself is
a function of the seed) and everything recorded so far. A trial stopped after k steps (``Continuation``) continues
later, in a fresh process and in either engine, exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loraplace.atomic import atomic_file
from loraplace.errors import TrialFailed
from loraplace.records import CurvePoint, EvalPoint, TrainerProgress
from loraplace.train_config import TrainSpec

# The one hint of a non-finite training loss, whichever engine trained the trial.
NON_FINITE_HINT = "lower the learning rate, or check the data (precision: try fp32)"


@dataclass
class TrainOutcome:
    """What one trial's training recorded (alone or in a fused group)."""

    steps: int
    train_s: float
    real_tokens: int
    label_tokens: int
    curve: list[CurvePoint] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. why activation checkpointing was turned on
    static_shape: tuple[int, int] | None = None  # [R, T] of every forward, when shapes are static
    first_step_s: float = 0.0  # the first step alone (torch.compile compiles there)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.train_s if self.train_s > 0 else 0.0


# --------------------------------------------------------------------------------------------- optimizer, data order


def lr_lambda(schedule: str, warmup: int, total: int):
    """The LR multiplier of step ``step`` (0-based): linear warm-up, then linear, cosine or constant to ``total``."""
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return fn


def optimizer(params: list[torch.nn.Parameter], spec: TrainSpec, device: torch.device, total: int):
    """(AdamW, its LR schedule) for one trial's adapters."""
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                            foreach=device.type != "cpu" or None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.schedule, spec.warmup, total))


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """Example indices per step: seeded permutations back to back (an epoch's remainder opens the next batch),
    so the same seed always gives the same data order."""
    rng = np.random.default_rng(seed)
    pool = np.zeros(0, dtype=np.int64)
    out: list[np.ndarray] = []
    for _ in range(steps):
        while len(pool) < batch:
            pool = np.concatenate([pool, rng.permutation(n)])
        out.append(pool[:batch])
        pool = pool[batch:]
    return out


# --------------------------------------------------------------------------------------------- saved state


@dataclass(frozen=True)
class Continuation:
    """Where a trial keeps its training state between runs: train until ``stop_after`` steps (None: to the end),
    then save the state in ``path``; a state already saved there is continued, not restarted. ``save_every_s``:
    also save it every that many seconds of training (at the first read-back after; 0: at every one), so a run
    killed mid-trial continues from there (a study's ``execution.save_state_every``)."""

    path: Path
    stop_after: int | None = None
    save_every_s: float | None = None

    @property
    def file(self) -> Path:
        return Path(self.path) / TrainerState.FILE

    def saved(self) -> TrainerState | None:
        return TrainerState.load(self.file) if self.file.is_file() else None


@dataclass(frozen=True)
class TrainerState:
    """A trial's training state after ``progress.steps`` steps: the adapter tensors (``progress.tensors`` names
    them, in order), AdamW's and the schedule's state dicts, the RNG states, and what was recorded (``progress``).
    Saved with ``torch.save`` and read back with ``weights_only=True`` (tensors, numbers and strings only)."""

    FILE = "trainer_state.pt"
    FORMAT = 1

    progress: TrainerProgress
    tensors: tuple[torch.Tensor, ...]
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor]

    def save(self, file: Path) -> None:
        """Written to a temporary file and renamed into place: a kill leaves the old state or the new one."""
        with atomic_file(file, "wb") as fh:
            torch.save({"format": self.FORMAT, "progress": self.progress.model_dump_json(),
                        "tensors": list(self.tensors), "optimizer": self.optimizer, "scheduler": self.scheduler,
                        "rng": self.rng}, fh)

    @classmethod
    def load(cls, file: Path) -> TrainerState:
        raw = torch.load(file, map_location="cpu", weights_only=True)
        if raw.get("format") != cls.FORMAT:
            raise TrialFailed(f"{file}: a trainer state of format {raw.get('format')!r}; this loraplace reads "
                              f"format {cls.FORMAT}", hint="delete it to train the trial from the start")
        return cls(TrainerProgress.model_validate_json(raw["progress"]), tuple(raw["tensors"]), raw["optimizer"],
                   raw["scheduler"], raw["rng"])


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a step may draw from (dropout masks): the CPU's, and the device's on CUDA. The data order and
    the init are functions of the seed, not of these."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------- the stepper


class TrainClock:
    """A trial's (or a group's) training wall time: periodic evals excluded (:meth:`excluded`); on CUDA read after a
    synchronize when asked, so the queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self._t0 = time.perf_counter()
        self._excluded = 0.0

    def elapsed(self, synchronize: bool = True) -> float:
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self._t0 - self._excluded

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t


@dataclass
class _PendingStep:
    """A step whose loss is still on the device (read back at the next :func:`sync`)."""

    step: int
    loss: torch.Tensor  # [] the token-weighted mean over the step's labels
    real_tokens: int
    label_tokens: int
    lr: float
    elapsed: float  # training time when the step ended, earlier runs of the trial included


class TrialStepper:
    """One trial's optimisation state; see the module docstring. ``names`` name ``params`` (saved with the state
    and checked on restore: a state never lands on other tensors). ``eval_every``: a periodic eval is due every
    that many steps, and ``eval_at``: at these steps, except at the last step (the final eval covers it).
    ``stop_after``: stop there (a :class:`Continuation`); the schedule still runs to the spec's full length."""

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], spec: TrainSpec, n_examples: int,
                 device: torch.device, *, eval_every: int | None = None, eval_at: Collection[int] = (),
                 stop_after: int | None = None):
        if not params:
            raise TrialFailed("the model has no trainable parameters")
        if len(names) != len(params):
            raise ValueError("one name per parameter")
        self.params, self.names, self.spec, self.device = params, names, spec, device
        self.total = spec.total_steps(n_examples)
        self.stop = self.total if stop_after is None else min(stop_after, self.total)
        self.eval_every = eval_every
        self.eval_at = frozenset(eval_at)
        self.opt, self.sched = optimizer(params, spec, device, self.total)
        self.order = batch_order(n_examples, spec.batch, self.total, spec.seed)
        self.sync_every = spec.resolved_sync_every(device.type)
        self.step = 0  # optimizer steps taken (read back or not)
        self.tokens_taken = 0  # real tokens of those steps
        self.outcome = TrainOutcome(steps=0, train_s=0.0, real_tokens=0, label_tokens=0)  # what has been read back
        self._earlier_s = 0.0  # training time of the runs before a restore
        self._pending: list[_PendingStep] = []
        self.continuation: Continuation | None = None  # where :meth:`save` writes (set by :meth:`resuming`)
        self._saved_at = 0.0  # this run's training seconds at the last periodic save

    @classmethod
    def resuming(cls, params: list[torch.nn.Parameter], names: list[str], spec: TrainSpec, n_examples: int,
                 device: torch.device, *, eval_every: int | None = None, eval_at: Collection[int] = (),
                 continuation: Continuation | None = None) -> TrialStepper:
        """A stepper that stops where ``continuation`` says and starts from the state saved there, if any (a
        fresh one without a continuation)."""
        stepper = cls(params, names, spec, n_examples, device, eval_every=eval_every, eval_at=eval_at,
                      stop_after=continuation.stop_after if continuation is not None else None)
        stepper.continuation = continuation
        saved = continuation.saved() if continuation is not None else None
        if saved is not None:
            stepper.restore(saved)
        return stepper

    def save_if_due(self, clock: TrainClock) -> None:
        """After a read-back (nothing pending): save the state into the continuation's file when its
        ``save_every_s`` of this run's training (``clock``) have passed since the last save, or since the run
        began; the save's own time is not training time. The state at the stop is saved anyway, by the loop."""
        every = None if self.continuation is None else self.continuation.save_every_s
        trained_s = clock.elapsed(synchronize=False)
        if every is None or self._pending or self.finished or trained_s - self._saved_at < every:
            return
        with clock.excluded():
            self.state().save(self.continuation.file)
        self._saved_at = trained_s

    # ----------------------------------------------------------------------------------------- per step

    @property
    def finished(self) -> bool:
        return self.step >= self.stop

    def examples(self) -> np.ndarray:
        """The next step's example indices."""
        return self.order[self.step]

    def optimizer_step(self) -> float:
        """After the step's backward: clip by this trial's own norm, AdamW step, schedule step, zero grads. → the
        LR the step used."""
        if self.spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm,
                                           foreach=self.device.type != "cpu" or None)
        self.opt.step()
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return lr

    def record(self, loss: torch.Tensor, real_tokens: int, label_tokens: int, lr: float, elapsed: float) -> None:
        """The step just taken: its loss (on the device, not read), its tokens, LR and the clock after it."""
        self.tokens_taken += real_tokens
        self._pending.append(_PendingStep(self.step, loss, real_tokens, label_tokens, lr, self._earlier_s + elapsed))

    def sync_due(self) -> bool:
        return self.step % self.sync_every == 0 or self.finished

    def eval_due(self) -> bool:
        periodic = bool(self.eval_every) and self.step % self.eval_every == 0
        return (periodic or self.step in self.eval_at) and self.step != self.total

    def add_eval(self, eval_loss: float, split: str, examples: int | None = None) -> None:
        self.outcome.evals.append(EvalPoint(step=self.step, eval_loss=eval_loss, split=split, examples=examples))

    def note(self, why: str | None) -> None:
        if why and why not in self.outcome.notes:  # a restored trial already carries it
            self.outcome.notes.append(why)

    def _read_back(self, done: _PendingStep, value: float) -> None:
        if not math.isfinite(value):
            raise TrialFailed(f"non-finite training loss ({value}) at step {done.step}", step=done.step,
                              hint=NON_FINITE_HINT)
        out = self.outcome
        out.steps = done.step
        out.real_tokens += done.real_tokens
        out.label_tokens += done.label_tokens
        out.curve.append(CurvePoint(step=done.step, loss=value, tokens=out.real_tokens, lr=done.lr))
        out.train_s = done.elapsed
        if done.step == 1:
            out.first_step_s = done.elapsed

    # ----------------------------------------------------------------------------------------- saved state

    def state(self) -> TrainerState:
        """The state after the last step read back (call :func:`sync` first: pending steps are not saved)."""
        if self._pending:
            raise RuntimeError("sync the pending steps before saving the state")
        out = self.outcome
        progress = TrainerProgress(steps=self.step, total=self.total, real_tokens=out.real_tokens,
                                   label_tokens=out.label_tokens, train_s=out.train_s, first_step_s=out.first_step_s,
                                   curve=tuple(out.curve), evals=tuple(out.evals), notes=tuple(out.notes),
                                   tensors=tuple(self.names), train=self.spec.model_dump_json())
        return TrainerState(progress, tuple(p.detach().cpu().clone() for p in self.params), self.opt.state_dict(),
                            self.sched.state_dict(), _rng_state(self.device))

    def restore(self, state: TrainerState) -> None:
        """Continue from ``state``: the same trial (same training spec, same adapter tensors) after its steps."""
        progress = state.progress
        problems = []
        if progress.train != self.spec.model_dump_json():
            problems.append("it was trained under another training spec")
        if list(progress.tensors) != self.names:
            problems.append("it holds other adapter tensors (another placement or rank)")
        if not problems and any(t.shape != p.shape for t, p in zip(state.tensors, self.params, strict=True)):
            problems.append("its tensors' shapes differ")
        if progress.steps > self.stop:
            problems.append(f"it is at step {progress.steps}, past this run's stop at step {self.stop}")
        if problems:
            raise TrialFailed("the saved trainer state does not belong to this trial: " + "; ".join(problems),
                              hint="delete it to train the trial from the start")
        with torch.no_grad():
            for p, t in zip(self.params, state.tensors, strict=True):
                p.copy_(t.to(p.device, p.dtype))
        self.opt.load_state_dict(state.optimizer)
        self.sched.load_state_dict(state.scheduler)
        _set_rng_state(state.rng, self.device)
        self.step = progress.steps
        self.tokens_taken = progress.real_tokens
        self._earlier_s = progress.train_s
        self.outcome = TrainOutcome(steps=progress.steps, train_s=progress.train_s, real_tokens=progress.real_tokens,
                                    label_tokens=progress.label_tokens, curve=list(progress.curve),
                                    evals=list(progress.evals), notes=list(progress.notes),
                                    first_step_s=progress.first_step_s)


def sync(steppers: Mapping[str, TrialStepper]) -> dict[str, TrialFailed]:
    """Read every stepper's pending losses back in one host sync and record them. → the trials whose loss was
    non-finite, each failed at its first such step (its later pending steps are dropped)."""
    pending = [(key, done) for key, st in steppers.items() for done in st._pending]
    failures: dict[str, TrialFailed] = {}
    if not pending:
        return failures
    values = torch.stack([done.loss for _, done in pending]).tolist()
    for (key, done), value in zip(pending, values, strict=True):
        if key in failures:
            continue
        try:
            steppers[key]._read_back(done, value)
        except TrialFailed as exc:
            failures[key] = exc
    for st in steppers.values():
        st._pending.clear()
    return failures
