"""A search run (``search:`` in a study): the rungs through the executor (each result and decision recorded),
then the finalists — and the hedge bracket — at the full horizon, and their other seeds. The rule itself (rung
steps, decisions, hedge draw, confirmation) is :mod:`loraplace.search`; this is the loop that runs it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from loraplace.errors import LoraplaceError
from loraplace.runner import RungTask, RunHooks, RunSummary, execute
from loraplace.search import (
    SEARCH_DIR,
    Candidate,
    SearchState,
    confirmed,
    describe,
    hedge_candidates,
    run_rungs,
    rung_steps,
    rungs_of,
)
from loraplace.search import state_dir as search_state_dir
from loraplace.store import Store
from loraplace.study.grid import _planned, candidates_of
from loraplace.study.spec import StudySpec
from loraplace.trial_spec import PlannedTrial


class TimedOut(Exception):
    """A search's rung run was not started: the run's timeout had passed."""


def run_search(study: StudySpec, store: Store, study_id: int, planned: list[PlannedTrial], executor, artifacts: Path,
            hooks: RunHooks, summary: RunSummary, retry_failed: bool,
            stop_starting: Callable[[], bool]) -> dict[str, PlannedTrial]:
    """The rungs (each candidate's results and each rung's decision recorded in the store), then the finalists
    at every seed as ordinary trials. Returns the finalists' trials. Raises :class:`TimedOut` instead of starting
    a rung run once ``stop_starting`` says so."""
    assert study.search is not None
    with one_runner(artifacts):
        return _run_search(study, store, study_id, planned, executor, artifacts, hooks, summary, retry_failed,
                           stop_starting)


@contextlib.contextmanager
def one_runner(artifacts: Path) -> Iterator[None]:
    """One process runs a search at a time: a second `loraplace run` of it is refused before it trains (the two
    trained the same rung candidates, and the second then failed with "already recorded"). An advisory lock on a
    file under the store's artifacts, released when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks to take
        yield
        return
    folder = artifacts / SEARCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "runner.lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "owner unknown"
            raise LoraplaceError(f"another loraplace run is running this search ({owner}): its rungs decide once "
                                 "every candidate's result is in, in one process",
                                 "wait for it to finish (loraplace status shows its progress), or stop it first") \
                from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield


def _run_search(study: StudySpec, store: Store, study_id: int, planned: list[PlannedTrial], executor,
                artifacts: Path, hooks: RunHooks, summary: RunSummary, retry_failed: bool,
                stop_starting: Callable[[], bool]) -> dict[str, PlannedTrial]:
    assert study.search is not None
    search = study.search
    specs = study.placement_specs()
    candidates = candidates_of(study, planned)
    by_key = {p.id: p for p in planned}
    rungs = rungs_of(rung_steps(search, len(candidates), study.train.steps, study.train.warmup))
    if hooks.on_note is not None:
        hooks.on_note(describe(candidates, rungs, search, study.data.held_out_size("validation")))
        early = [r.steps for r in rungs if r.steps < study.train.warmup]
        if early:
            hooks.on_note(f"warning: rung(s) at {', '.join(map(str, early))} steps are inside the warm-up "
                          f"({study.train.warmup} steps): they rank candidates before each has reached its LR")

    def run(alive: list[Candidate], rung) -> Iterator:
        previous = rungs[rung.index - 1].steps if rung.index > 0 else 0
        tasks = [RungTask(c.key, by_key[c.key].spec, search_state_dir(artifacts, c.key), rung.index, rung.steps,
                          search.rung_examples, previous) for c in alive]
        names = {c.key: f"{c.placement} lr={c.lr:g}" for c in alive}
        if hooks.on_note is not None:
            hooks.on_note(f"rung {rung.index + 1}/{len(rungs)}: {len(tasks)} candidate(s) to {rung.steps} steps")
        step = max(1, executor.capacity)  # fused: the executor trains up to capacity candidates together
        for chunk in (tasks[i:i + step] for i in range(0, len(tasks), step)):
            if stop_starting():
                raise TimedOut
            if hooks.on_rung_start is not None:
                hooks.on_rung_start(f"rung {rung.index + 1} ({rung.steps} steps) " + " + ".join(
                    names[t.candidate] for t in chunk))
            for result in executor.run_rung(chunk):
                summary.rung_runs += 1
                if hooks.on_note is not None:
                    told = f"val_loss={result.val_loss:.4f}" if result.val_loss is not None else \
                        f"failed: {result.failure.message if result.failure else ''}"
                    hooks.on_note(f"  {names[result.candidate]} @ {rung.steps} steps → {told}")
                yield result

    state = SearchState.of(store.rung_results(study_id), store.rung_decisions(study_id))
    finalists = run_rungs(candidates, rungs, search, state, run, lambda r: store.record_rung(study_id, r),
                          lambda d: store.record_decision(study_id, d), retry_failed=retry_failed,
                          note=hooks.on_note)
    first = study.seeds[0]
    hedge = [c for c in hedge_candidates(candidates, search, first) if c not in finalists]
    entrants = finalists + hedge  # every one runs the full horizon on the first seed
    staged = search.confirm is not None or bool(hedge)

    def trial_of(c: Candidate, seed: int) -> PlannedTrial:
        p = _planned(study, c.placement, specs[c.placement], study.sizes()[0], seed, c.group.axes)
        # a finalist's first seed continues its search state; a hedge candidate starts from scratch
        return dataclasses.replace(p, state=search_state_dir(artifacts, c.key)) \
            if seed == first and c in finalists else p

    def compare_with(compared: list[Candidate]) -> None:
        """The finalists are compared with the best preset among them (a search always keeps one)."""
        preset = next((c.placement for c in compared if c.preset), None)
        info = store.study(study.name).info  # as run_study wrote it (with its data fingerprints)
        if preset is not None:
            info = info.model_copy(update={"baseline": preset, "baseline_given": True})
        elif compared:
            info = info.model_copy(update={"baseline": compared[0].placement, "baseline_given": True})
        store.write_study(info, study.model_dump(mode="json"))

    def run_trials(trials: dict[str, PlannedTrial]) -> None:
        store.add_trials(study_id, [(p.id, p.labels, p.spec.model_dump(mode="json")) for p in trials.values()])
        summary.skipped += sum(1 for t in store.trials(study_id) if t.id in trials and t.status == "done")
        execute(store, study_id, trials, executor, retry_failed=retry_failed, hooks=hooks, summary=summary,
                stop_starting=stop_starting)

    seeds = [first] if staged else study.seeds
    summary.skipped = 0  # the finalists' trials found done (run_trials adds them)
    trials = {p.id: p for c in entrants for seed in seeds for p in [trial_of(c, seed)]}
    compare_with(entrants)
    finished = {t.id for t in store.trials(study_id) if t.status == "done"}
    if hooks.on_note is not None and not set(trials) <= finished:
        then = f"the best {search.confirm}" if search.confirm is not None else "every one"
        hooks.on_note(f"finalists: {', '.join(c.label for c in finalists)}"
                      + (f"; hedge bracket: {', '.join(c.label for c in hedge)}" if hedge else "")
                      + (f" at seed {first}, then {then} at every seed" if staged
                         else f" at {len(study.seeds)} seed(s)"))
    run_trials(trials)
    if staged and not summary.timed_out:
        done = {t.id: t for t in store.trials(study_id) if t.id in trials and t.status in ("done", "failed")}
        if len(done) == len(trials):  # every first-seed trial has its result: the choice can be made
            val = {c.key: done[c.key].metrics.val_loss if done[c.key].metrics is not None else None
                   for c in entrants}
            chosen = confirmed(entrants, val, search)
            compare_with(chosen)
            more = {p.id: p for c in chosen for seed in study.seeds[1:] for p in [trial_of(c, seed)]}
            if hooks.on_note is not None:
                hooks.on_note(f"confirmed: {', '.join(c.label for c in chosen)} at {len(study.seeds)} seed(s)")
            run_trials(more)
            trials |= more
    return trials
