"""The runner core: claim → run → record, the same for every backend.

:func:`execute` owns the bookkeeping — it claims trials from the store, calls the hooks, records each
:class:`TrialOutcome` (done or failed, one way), and on Ctrl-C/SIGTERM marks what was in flight ``interrupted``.
An :class:`Executor` owns only *how* trials run: :class:`LocalExecutor` one at a time in this process on one loaded
base model; :class:`loraplace.ray_backend.RayExecutor` as Ray tasks (results return here, the only writer); a fused
executor, several at once on one base. Executors never touch the store; they get a heartbeat to call.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch

from loraplace.records import Failure, RungResult, TrialOutcome
from loraplace.stepper import Continuation
from loraplace.store import HEARTBEAT_EVERY_S, STATE_DIR, Owner, Store, trial_dir
from loraplace.trial import Session, failure_of, run_rung, run_trial
from loraplace.trial_spec import PlannedTrial, TrialSpec


@dataclass(frozen=True)
class RungTask:
    """One candidate of a placement search at one rung (loraplace.search): continue the state in ``state`` up to
    ``steps``, then evaluate the validation split (its first ``val_examples``)."""

    candidate: str
    spec: TrialSpec
    state: Path
    rung: int
    steps: int
    val_examples: int | None = None
    from_steps: int = 0  # the previous rung's steps: where an uninterrupted search would continue from


ProgressFn = Callable[[int, int, "float | None", int], None]  # (step, total steps, loss or None, tokens so far)


@dataclass(frozen=True)
class RunHooks:
    """Callbacks of a run, called by :func:`execute` for every backend alike."""

    on_start: Callable[[PlannedTrial, int, int], None] | None = None  # (trial, its 1-based index, trials to run)
    on_end: Callable[[PlannedTrial, TrialOutcome], None] | None = None
    progress: ProgressFn | None = None  # per optimizer step, where the executor can report steps
    on_note: Callable[[str], None] | None = None  # a line for the user (a search's rungs and their results)
    on_rung_start: Callable[[str], None] | None = None  # a search's candidate(s) start a rung (their label)


@dataclass
class RunSummary:
    ran: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already done before this run
    reused: int = 0  # taken over, done, from another store (--reuse-from; loraplace.reuse)
    recovered: list[str] = field(default_factory=list)  # left running by a dead process, re-run now
    failed_earlier: int = 0  # failed in an earlier run and not retried in this one (see --retry-failed)
    warnings: list[str] = field(default_factory=list)  # about the inputs, found before anything ran
    execution: str | None = None  # how the trials ran, when fused or sized by execution.fuse: auto
    rung_runs: int = 0  # a search's candidate runs to a rung in this run
    fused: int = 0  # trials of this run that trained fused with others
    timed_out: bool = False  # the run's --timeout passed: it stopped starting trials (and search rungs)
    wall_s: float = 0.0


class Heartbeat:
    """Tells the store a trial's owner is alive; rate-limited, so an executor may call it every step."""

    def __init__(self, store: Store, trial_id: str, owner: Owner, every_s: float = HEARTBEAT_EVERY_S):
        self.store, self.trial_id, self.owner, self.every_s = store, trial_id, owner, every_s
        self._last = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.store.heartbeat(self.trial_id, self.owner)
            self._last = time.monotonic()


class Executor(Protocol):
    """How trials run. :func:`execute` submits up to ``capacity`` trials, then waits for outcomes; once the first
    trial is claimed it calls :meth:`prepare` (so nothing is loaded for a study with nothing left to run), which
    may set ``capacity``."""

    capacity: int

    def prepare(self) -> None:
        """Get ready to run (e.g. load the base model and size fused groups from it); called once, after the first
        trial is submitted."""

    def submit(self, trial: PlannedTrial, heartbeat: Heartbeat) -> None:
        """Take a claimed trial; it may start now or in :meth:`wait`."""

    def wait(self) -> Iterator[tuple[str, TrialOutcome]]:
        """Block until at least one submitted trial has finished; yield (trial id, outcome) for each that has.
        Every trial's failure is a failed outcome: nothing but an interruption raises."""

    def cancel(self) -> None:
        """Drop every submitted trial (after an interruption)."""

    def close(self) -> None:
        """Release what the executor holds (a model, a Ray runtime it started)."""


def execute(store: Store, study_id: int, planned: dict[str, PlannedTrial], executor: Executor, *,
            retry_failed: bool = False, hooks: RunHooks = RunHooks(), summary: RunSummary | None = None,
            stop_starting: Callable[[], bool] | None = None) -> RunSummary:
    """Run every claimable trial of ``planned`` through ``executor``, each at most once in this run (a failing
    retry is not looped). ``KeyboardInterrupt`` marks the trials in flight ``interrupted`` and is re-raised.
    ``stop_starting`` is asked before each claim: once it says True nothing more is claimed, the trials in flight
    finish, and ``summary.timed_out`` is set when some of ``planned`` is left for the next run."""
    summary = summary or RunSummary()
    owner = Owner.current()
    remaining = set(planned)
    # What this call will run, after what earlier calls of this run ran (a tuned study calls again for the other
    # seeds): the progress bar's total grows with it instead of showing "8/4".
    runnable = ("pending", "interrupted") + (("failed",) if retry_failed else ())
    to_run = summary.ran + sum(1 for t in store.trials(study_id) if t.id in planned and t.status in runnable)
    in_flight: dict[str, PlannedTrial] = {}
    prepared = False
    try:
        while True:
            while len(in_flight) < executor.capacity:
                if stop_starting is not None and stop_starting():
                    summary.timed_out = summary.timed_out or any(  # or did it pass as the last one was claimed?
                        t.status in runnable for t in store.trials(study_id) if t.id in remaining)
                    break
                claimed = store.claim_trial(study_id, owner, retry_failed=retry_failed, only=remaining)
                if claimed is None:
                    break
                remaining.discard(claimed.id)
                trial = planned[claimed.id]
                in_flight[trial.id] = trial
                summary.ran += 1
                if hooks.on_start is not None:
                    hooks.on_start(trial, summary.ran, max(to_run, summary.ran))
                executor.submit(trial, Heartbeat(store, trial.id, owner))
                if not prepared:
                    executor.prepare()
                    prepared = True
            if not in_flight:
                return summary
            for trial_id, outcome in executor.wait():
                trial = in_flight.pop(trial_id)
                store.record_outcome(trial_id, outcome, owner)
                if outcome.status == "done":
                    summary.done += 1
                else:
                    summary.failed += 1
                summary.fused += outcome.fused_with > 0
                if hooks.on_end is not None:
                    hooks.on_end(trial, outcome)
    except KeyboardInterrupt:
        executor.cancel()
        for trial_id in in_flight:
            store.interrupt_trial(trial_id, "interrupted by the user", owner)
        raise


def trial_state(out_dir: Path, every_s: float | None) -> Continuation | None:
    """The continuation of a study trial whose directory is ``out_dir`` (None when ``every_s`` is None): its
    training state is saved every ``every_s`` seconds of training there, so a killed run continues it — exactly:
    the stepper restores adapters, AdamW, schedule, RNG and data position. :func:`drop_state` once the trial has an
    outcome; an interrupted run leaves it for the next."""
    return None if every_s is None else Continuation(out_dir / STATE_DIR, save_every_s=every_s)


def drop_state(continuation: Continuation | None) -> None:
    """A trial with an outcome, done or failed, is never continued (a failure must not be resumed into)."""
    if continuation is not None:
        shutil.rmtree(continuation.path, ignore_errors=True)


class LocalExecutor:
    """One trial at a time in this process; the base model is loaded once (on the first trial) and reused."""

    capacity = 1

    def __init__(self, model: str, *, device: str, precision: str, artifacts: Path,
                 progress: ProgressFn | None = None, save_state_every: float | None = None):
        self.model, self.device, self.precision = model, device, precision
        self.artifacts = artifacts
        self.progress = progress
        self.save_state_every = save_state_every  # seconds of training between saves of a trial's state (None: off)
        self._session: Session | None = None
        self._queue: list[tuple[PlannedTrial, Heartbeat]] = []

    def prepare(self) -> None:
        """Nothing to do before the first trial: the model loads when it runs."""

    def submit(self, trial: PlannedTrial, heartbeat: Heartbeat) -> None:
        self._queue.append((trial, heartbeat))

    def wait(self) -> Iterator[tuple[str, TrialOutcome]]:
        trial, heartbeat = self._queue.pop(0)
        failure = self._load(trial.spec)
        if failure is not None:  # the model did not load: this trial fails like any other
            yield trial.id, TrialOutcome.failed(failure)
            return
        yield trial.id, self._run(trial, heartbeat)

    def _load(self, spec: TrialSpec | None = None) -> Failure | None:
        """The session for ``spec``'s base (loaded on first use; loaded again when a trial wants the base
        quantized otherwise — ``axes: {quantize: …}`` — the previous one released first)."""
        base = ("none", True) if spec is None else spec.train.base
        try:
            if self._session is not None and self._session.quantization != base:
                self._session = None
                gc.collect()
            if self._session is None:
                self._session = Session(self.model, device=self.device, precision=self.precision,
                                        quantize=base[0], double_quant=base[1])
        except Exception as exc:  # noqa: BLE001
            return failure_of(exc)
        return None

    def _run(self, trial: PlannedTrial, heartbeat: Heartbeat, notes: tuple[str, ...] = ()) -> TrialOutcome:
        def on_step(step: int, total: int, loss: float | None, tokens: int) -> None:
            heartbeat()
            if self.progress is not None:
                self.progress(step, total, loss, tokens)

        if trial.state is not None:  # a search finalist: its last rung's state, continued (and saved there)
            return run_trial(trial.spec, session=self._session, out_dir=trial_dir(self.artifacts, trial.id),
                             progress=on_step, continuation=Continuation(trial.state,
                                                                         save_every_s=self.save_state_every),
                             notes=notes)
        out_dir = trial_dir(self.artifacts, trial.id)
        continuation = trial_state(out_dir, self.save_state_every)
        outcome = run_trial(trial.spec, session=self._session, out_dir=out_dir, progress=on_step,
                            continuation=continuation, notes=notes)
        drop_state(continuation)  # (an interruption propagates from run_trial: its state stays)
        return outcome

    def run_rung(self, tasks: list[RungTask]) -> Iterator[RungResult]:
        """A search rung's candidates, one at a time; each result as it is ready."""
        for task in tasks:
            failure = self._load(task.spec)
            if failure is not None:
                yield RungResult(candidate=task.candidate, rung=task.rung, steps=task.steps, status="failed",
                                 failure=failure, trained_steps=0)
                continue
            yield run_rung(task.spec, session=self._session, state_dir=task.state, steps=task.steps,
                           candidate=task.candidate, rung=task.rung, val_examples=task.val_examples,
                           from_steps=task.from_steps, progress=self.progress)

    def cancel(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FusedExecutor(LocalExecutor):
    """Up to ``fuse`` claimed trials at a time, trained together in one pass over the shared base model
    (:func:`fused_outcomes`), then each evaluated, saved and yielded on its own, so the store records every trial
    separately. ``fuse="auto"``: the group size comes from the device and a memory estimate for ``widest`` (the
    study's trial with the most tokens per step), set by :meth:`prepare` once the base model is loaded
    (:func:`loraplace.fused.auto_group_size`); ``decision`` then says what was chosen and why. Until then (and
    for a study with nothing left to run) ``capacity`` is 1."""

    def __init__(self, model: str, *, fuse: int | Literal["auto"], widest: TrialSpec | None = None, **kwargs):
        super().__init__(model, **kwargs)
        if fuse == "auto" and widest is None:
            raise ValueError("fuse='auto' needs the widest trial spec to size its groups")
        self.capacity = fuse if isinstance(fuse, int) else 1
        self._auto = fuse == "auto"
        self._widest = widest
        self._load_failure: Failure | None = None
        self.decision = None if fuse == "auto" else f"trials fused in groups of up to {fuse} (execution.fuse)"

    def prepare(self) -> None:
        if self._auto:
            self.capacity = self._auto_group_size()

    def _auto_group_size(self) -> int:
        from loraplace.fused import auto_group_size
        from loraplace.models import causal_lm
        from loraplace.train import free_memory_bytes

        if self._load(self._widest) is not None:  # the load failure surfaces as the first trial's outcome
            self.decision = "trials run one at a time (the base model did not load)"
            return 1
        session, spec = self._session, self._widest
        size, self.decision = auto_group_size(
            causal_lm(session.model).config, session.device.type, free_memory_bytes(session.device),
            torch.finfo(session.dtype).bits // 8, (spec.train.micro_batch or spec.train.batch) * spec.data.max_len,
            spec.train.resolved_loss_chunk(session.device.type))
        return size

    def _load(self, spec: TrialSpec | None = None) -> Failure | None:
        if self._load_failure is None:
            self._load_failure = super()._load(spec)
        return self._load_failure

    def run_rung(self, tasks: list[RungTask]) -> Iterator[RungResult]:
        """A search rung's candidates in fused groups of up to ``capacity`` (alone when that is 1, or on a
        quantized base)."""
        if self.capacity <= 1 or len(tasks) == 1 or any(t.spec.train.quantize != "none" for t in tasks) \
                or self._load(tasks[0].spec) is not None:
            yield from super().run_rung(tasks)
            return
        for i in range(0, len(tasks), self.capacity):
            yield from fused_rung(self._session, tasks[i:i + self.capacity], self.progress)

    def wait(self) -> Iterator[tuple[str, TrialOutcome]]:
        quantized = [item for item in self._queue if item[0].spec.train.quantize != "none"]
        if quantized:  # fused LoRA layers wrap plain linears, not bitsandbytes ones: these run alone, saying so
            trial, heartbeat = quantized[0]
            self._queue.remove(quantized[0])
            failure = self._load(trial.spec)
            note = (f"not fused: the base is quantized ({trial.spec.train.quantize}); fused LoRA layers wrap plain "
                    "linear weights, not bitsandbytes ones",)
            yield trial.id, TrialOutcome.failed(failure) if failure is not None else self._run(trial, heartbeat,
                                                                                                 note)
            return
        if len(self._queue) == 1:  # alone (auto chose 1, or the study's last trial): the plain path, with losses
            yield from super().wait()
            return
        continuing = [item for item in self._queue if item[0].state is not None]
        if continuing:  # a search finalist continuing its saved state runs alone (fused groups start fresh)
            self._queue = [item for item in self._queue if item[0].state is None] + continuing[1:]
            trial, heartbeat = continuing[0]
            failure = self._load(trial.spec)
            yield trial.id, TrialOutcome.failed(failure) if failure is not None else self._run(trial, heartbeat)
            return
        group, self._queue = self._queue, []
        failure = self._load(group[0][0].spec)
        if failure is not None:
            for trial, _ in group:
                yield trial.id, TrialOutcome.failed(failure)
            return
        heartbeats = {trial.id: heartbeat for trial, heartbeat in group}

        def on_step(step: int, total: int, loss: float | None, tokens: int) -> None:
            for heartbeat in heartbeats.values():
                heartbeat()
            if self.progress is not None:  # the group's steps, mean loss and tokens
                self.progress(step, total, loss, tokens)

        members = [(trial.id, trial.spec, trial_dir(self.artifacts, trial.id)) for trial, _ in group]
        yield from fused_outcomes(self._session, members, on_step, on_out_of_memory=self._shrink,
                                  save_state_every=self.save_state_every)

    def _shrink(self, failed: int) -> None:
        """A group of ``failed`` trials ran out of memory: later groups are at most half as large."""
        smaller = max(1, failed // 2)
        if smaller < self.capacity:
            self.capacity = smaller
            self.decision = (f"{self.decision}; then groups of up to {smaller}, after a group of {failed} ran out "
                             "of memory")


def fused_outcomes(session: Session, members: list[tuple[str, TrialSpec, Path]],
                   on_step: ProgressFn | None = None, on_out_of_memory: Callable[[int], None] | None = None,
                   save_state_every: float | None = None) -> Iterator[tuple[str, TrialOutcome]]:
    """(trial id, outcome) of each member. Members that read the same data (source, splits, max_len) are trained
    together by :func:`loraplace.fused.train_fused` and evaluated fused; a member that cannot be fused runs alone
    (the reason goes into its warnings), as does every member of a group that ran out of memory; every trial is
    then saved (and scored by generation) through ``run_trial``; ``on_out_of_memory(group size)`` hears of such a
    group. ``save_state_every``: each member's training state is saved that often under its directory and
    continued by a later run (:func:`trial_state`; in a group or alone). The local fused executor and the Ray
    backend's group tasks both run groups through here."""
    by_data: dict[str, list[tuple[str, TrialSpec, Path]]] = {}
    for member in members:
        by_data.setdefault(member[1].data.model_dump_json(), []).append(member)
    for part in by_data.values():
        saved = {tid: trial_state(out_dir, save_state_every) for tid, _, out_dir in part}
        yield from _one_data_group(session, part, on_step, on_out_of_memory, saved)


def _one_data_group(session: Session, members: list[tuple[str, TrialSpec, Path]], on_step: ProgressFn | None,
                    on_out_of_memory: Callable[[int], None] | None,
                    saved: dict[str, Continuation | None]) -> Iterator[tuple[str, TrialOutcome]]:
    from loraplace.errors import ConfigError
    from loraplace.fused import FusedMember, fusion_problems, train_fused
    from loraplace.trial import plan_of

    results = {}
    not_fused: dict[str, str] = {}  # why a trial of a group ran alone (it goes into the trial's warnings)
    failed: dict[str, Failure] = {}
    if len(members) > 1:
        fusable = []
        try:
            fused = [FusedMember(tid, plan_of(session, spec), spec.train, spec.eval.every, spec.eval.batch,
                                 saved[tid], tuple(spec.eval.at_steps or ()), spec.eval.watch_examples)
                     for tid, spec, _ in members]
            group, own = fusion_problems(session.model, fused)
            if group:
                not_fused = {m.key: "not fused: " + "; ".join(group) for m in fused}
            else:  # the members with a problem of their own run alone; the others still fuse
                not_fused = {key: "not fused: " + "; ".join(found) for key, found in own.items()}
                fusable = [m for m in fused if m.key not in own]
                if len(fusable) == 1:
                    not_fused[fusable[0].key] = "not fused: no other trial of its group could be fused with it"
                elif fusable:
                    splits = session.data(members[0][1].data)
                    evals = {"test": splits.eval} | ({"validation": splits.validation}
                                                     if splits.validation is not None else {})
                    results = train_fused(session, splits.train, fusable, pad_id=session.pad_id, evals=evals,
                                          on_step=on_step)
        except ConfigError as exc:  # a site kind or setting fused training does not cover, found while wrapping
            results = {}
            not_fused |= dict.fromkeys(_in_group(fusable, members), "not fused: " + "; ".join(exc.problems))
        except torch.OutOfMemoryError as exc:  # K trials' activations did not fit: each runs alone instead
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            results = {}
            not_fused |= {m.key: f"not fused: the fused group ran out of memory ({str(exc).splitlines()[0]}); "
                                 "its trials ran one at a time (a smaller execution.fuse avoids it)" for m in fusable}
            if on_out_of_memory is not None:
                on_out_of_memory(len(fusable))
        except Exception as exc:  # noqa: BLE001 - the group's trials fail (the others still run), the study goes on
            results = {}
            failed = dict.fromkeys(_in_group(fusable, members), failure_of(exc))
    for tid, spec, out_dir in members:
        if tid in failed:
            yield tid, TrialOutcome.failed(failed[tid])
            drop_state(saved[tid])
            continue
        grouped = results.get(tid)
        yield tid, run_trial(spec, session=session, out_dir=out_dir, trained_in_group=grouped,
                             continuation=saved[tid] if grouped is None else None,
                             notes=(not_fused[tid],) if tid in not_fused else ())
        drop_state(saved[tid])  # recorded (the caller resumes this generator after it stored the outcome)


def _in_group(fusable: list, members: list[tuple[str, TrialSpec, Path]]) -> list[str]:
    """The trials a failure of the fused pass concerns: the members being fused, or every member when it came
    before they were known (e.g. while planning)."""
    return [m.key for m in fusable] or [tid for tid, _, _ in members]


def fused_rung(session: Session, tasks: list[RungTask], on_step: ProgressFn | None = None) -> Iterator[RungResult]:
    """A search rung's candidates trained together in one pass per step over the base model
    (:func:`loraplace.fused.train_fused`, each continuing its own saved state to the rung), then evaluated fused on
    the validation split. Candidates that cannot be fused, or a group that fails as a whole, run alone."""
    from loraplace.fused import FusedMember, fusion_problems, train_fused
    from loraplace.trial import plan_of

    splits = session.data(tasks[0].spec.data)
    alone: dict[str, str] = {}  # candidate → why it runs alone
    out: list[RungResult] = []
    try:
        if splits.validation is None or any(t.spec.data != tasks[0].spec.data for t in tasks):
            raise ValueError("the candidates do not share one validation split")
        n = tasks[0].val_examples
        watched = splits.validation.first(n)
        before = {t.candidate: _saved(t.state) for t in tasks}  # (steps, train_s) of each saved state
        members = [FusedMember(t.candidate, plan_of(session, t.spec), t.spec.train, None, t.spec.eval.batch,
                               continuation=Continuation(t.state, stop_after=t.steps)) for t in tasks]
        group, own = fusion_problems(session.model, members)
        if group:
            raise ValueError("; ".join(group))
        alone = {key: "; ".join(found) for key, found in own.items()}
        fusable = [m for m in members if m.key not in own]
        if len(fusable) < 2:
            alone |= {m.key: "no other candidate of its rung could be fused with it" for m in fusable}
        else:
            init_before = session.init_forward_examples
            trained = train_fused(session, splits.train, fusable, pad_id=session.pad_id,
                                  evals={"validation": watched}, on_step=on_step)
            # a data-driven init (EVA) run for the group, shared out over the members that have one
            inits = session.init_forward_examples - init_before
            eva = [m.key for m in fusable if m.plan.variant == "eva"]
            by_task = {t.candidate: t for t in tasks}
            for m in fusable:
                r, task = trained[m.key], by_task[m.key]
                steps = max(r.outcome.steps - task.from_steps, 0)
                share = (inits // len(eva) + (inits % len(eva) if m.key == eva[0] else 0)) if m.key in eva else 0
                common = dict(candidate=m.key, rung=task.rung, steps=task.steps, trained_steps=steps,
                              trained_examples=steps * task.spec.train.batch, fused_with=len(fusable) - 1)
                if r.failure is not None:
                    out.append(RungResult(status="failed", failure=failure_of(r.failure), **common))
                else:
                    out.append(RungResult(status="done", val_loss=r.eval_losses["validation"][0],
                                          eval_examples=len(watched), init_examples=share,
                                          train_s=max(r.outcome.train_s - before[m.key][1], 0.0),
                                          eval_s=r.eval_s / len(fusable), **common))
    except Exception as exc:  # noqa: BLE001 - the group as a whole could not be fused: every candidate runs alone
        alone, out = {t.candidate: f"{type(exc).__name__}: {exc}" for t in tasks}, []
    yield from out
    for task in (t for t in tasks if t.candidate in alone):
        result = run_rung(task.spec, session=session, state_dir=task.state, steps=task.steps,
                          candidate=task.candidate, rung=task.rung, val_examples=task.val_examples,
                          from_steps=task.from_steps, progress=on_step)
        yield result.model_copy(update={"notes": result.notes + (f"not fused: {alone[task.candidate]}",)})


def _saved(state: Path) -> tuple[int, float]:
    """(steps, training seconds) of the state saved in ``state`` ((0, 0) when there is none)."""
    saved = Continuation(state).saved()
    return (saved.progress.steps, saved.progress.train_s) if saved is not None else (0, 0.0)
