"""``run_study``: check everything, register the grid in the store, and hand it to the runner core
(:mod:`loraplace.runner`) with the executor of the chosen backend — or, for a search, to its rungs
(:mod:`loraplace.study.search_run`)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from loraplace.errors import LoraplaceError
from loraplace.formatting import plural
from loraplace.records import TrialOutcome
from loraplace.reuse import check_sources, reuse_finished
from loraplace.runner import FusedExecutor, LocalExecutor, RunHooks, RunSummary, execute
from loraplace.store import Store, artifacts_dir
from loraplace.study import checks
from loraplace.study.checks import auto_dtype_here, check_placements, check_precision
from loraplace.study.grid import search_candidates
from loraplace.study.resume import (
    check_data_unchanged,
    check_search_unchanged,
    check_unchanged,
    planned_from,
    stored_plan,
)
from loraplace.study.search_run import TimedOut, run_search
from loraplace.study.spec import BACKENDS, StudySpec
from loraplace.tracking import Tracker, check_tracking
from loraplace.trial_spec import PlannedTrial


def _tracked(hooks: RunHooks, tracker: Tracker) -> RunHooks:
    """The hooks, plus: every finished trial goes to the trackers (after the store has recorded it)."""

    def on_end(trial: PlannedTrial, outcome: TrialOutcome) -> None:
        if hooks.on_end is not None:
            hooks.on_end(trial, outcome)
        tracker.log_trial(trial.id, trial.labels, trial.spec.model_dump(mode="json"), outcome)

    return dataclasses.replace(hooks, on_end=on_end)


def run_study(study: StudySpec, store_path: str | Path, *, backend: Literal["local", "ray"] = "local",
              address: str | None = None, retry_failed: bool = False, extend: bool = False, force: bool = False,
              allow_mixed_precision: bool = False, reuse_from: Sequence[str | Path] = (),
              hooks: RunHooks = RunHooks(), timeout_s: float | None = None) -> RunSummary:
    """Run every unfinished trial of ``study`` into ``store_path``. Everything checkable — backend, device, model,
    data, placements, an edited spec — is checked before the store is written. Ctrl-C marks the trials in flight
    interrupted and re-raises ``KeyboardInterrupt``. ``reuse_from``: other stores whose finished trials of the
    same id are taken over instead of trained (:mod:`loraplace.reuse`). ``timeout_s``: seconds after which no
    trial (or search rung run) starts; those in flight finish, ``timed_out`` is set when work is left (a tuned
    study's other seeds are added for every cell whose LR selection is complete, so they count), and the next run
    continues with it."""
    t0 = time.perf_counter()

    started: list[bool] = [False]

    def stop_starting() -> bool:
        # The first unit of work always starts: a timeout shorter than loading the model would otherwise stop every
        # run before it did anything, and a job loop that reruns it would never end.
        if timeout_s is not None and time.perf_counter() - t0 >= timeout_s and started[0]:
            return True
        started[0] = True
        return False
    store_path = Path(store_path)
    if backend not in BACKENDS:
        raise LoraplaceError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":  # it would run here, on this machine, without a word
        raise LoraplaceError(f"--address {address} is a Ray cluster's address, but the backend is {backend}",
                             "add --backend ray to run on that cluster, or leave --address out")
    Store.check_writable(store_path)  # before the model and the data are read: seconds, not a minute
    check_placements(study, force)
    if not allow_mixed_precision and backend == "local":  # Ray workers resolve auto on their own machines
        check_precision(study, store_path)
    sources = [Path(s) for s in reuse_from]
    if sources:
        if study.search is not None:
            raise LoraplaceError("--reuse-from does not apply to a search (its rungs decide between steps of "
                                 "trials it trains itself)", "run the search without it")
        check_sources(sources, store_path)
    warnings = checks.check_inputs(study)
    if backend != "ray" and study.resources.model_fields_set:  # the same spec may run on Ray later: said, not refused
        warnings.append(f"resources: ({', '.join(sorted(study.resources.model_fields_set))}) is what a trial asks "
                        f"of a Ray cluster; this {backend} run uses this machine as it is (--backend ray reads it)")
    if study.tracking is not None:
        check_tracking(study.tracking)
    if study.search is not None:
        if extend:
            raise LoraplaceError("--extend does not apply to a search: its candidates and rungs come from the spec",
                                 "to search other placements or LRs, use a new store (--store) or a new name:")
        planned = search_candidates(study)
        check_search_unchanged(study, store_path)
    else:
        planned = stored_plan(study, store_path)
        check_unchanged(study, store_path, planned, extend)
    fingerprints = study.data.fingerprints()
    check_data_unchanged(study, store_path, fingerprints)
    by_id = {p.id: p for p in planned}
    # Opened before the store exists: a tracking target that cannot work is refused, not found after a trial.
    tracker = None if study.tracking is None else Tracker(study.tracking, study.name, study.model_dump(mode="json"))
    ray_started = None
    if backend == "ray":  # the cluster answers and shares the artifacts directory: checked before the store exists
        from loraplace.ray_backend import check_cluster

        ray_started = check_cluster(address, artifacts_dir(store_path), cpus=study.resources.cpus,
                                    gpus=study.resources.gpus)
    with Store(store_path) as store:
        record = store.write_study(study.info().model_copy(update={"data_fingerprints": fingerprints}),
                                   study.model_dump(mode="json"))
        if study.search is None:
            store.add_trials(record.id, [(p.id, p.labels, p.spec.model_dump(mode="json")) for p in planned])
        summary = RunSummary(recovered=store.recover_stale(record.id), warnings=warnings)
        summary.skipped = sum(1 for t in store.trials(record.id) if t.id in by_id and t.status == "done")
        artifacts = artifacts_dir(store_path)
        dtype_here = auto_dtype_here(study) if sources and not allow_mixed_precision and backend == "local" else None

        def take_over(trials: dict[str, PlannedTrial]) -> None:  # --reuse-from: before training any of them
            if not sources:
                return
            reused = reuse_finished(store, record.id, trials, sources, artifacts, dtype_here=dtype_here,
                                    retry_failed=retry_failed, fingerprints=fingerprints)
            summary.reused += reused.count
            summary.warnings.extend(reused.warnings)
            for source, ids in reused.taken.items():
                if hooks.on_note is not None:
                    hooks.on_note(f"reused {plural(len(ids), 'finished trial')} from {source}")

        if backend == "ray":
            from loraplace.ray_backend import RayExecutor

            executor = RayExecutor(study.model, device=study.train.device, precision=study.train.precision,
                                   cpus=study.resources.cpus, gpus=study.resources.gpus, artifacts=artifacts,
                                   address=address, fuse=study.execution.ray_group_size(),
                                   save_state_every=study.execution.save_state_every_s, started_here=ray_started)
        elif study.execution.fuse != "off":
            widest = max(planned, key=lambda p: (p.spec.train.micro_batch or p.spec.train.batch)
                         * p.spec.data.max_len).spec  # the most tokens one forward holds
            executor = FusedExecutor(study.model, fuse=study.execution.fuse, widest=widest,
                                     device=study.train.device, precision=study.train.precision,
                                     artifacts=artifacts, progress=hooks.progress,
                                     save_state_every=study.execution.save_state_every_s)
        else:
            executor = LocalExecutor(study.model, device=study.train.device, precision=study.train.precision,
                                     artifacts=artifacts, progress=hooks.progress,
                                     save_state_every=study.execution.save_state_every_s)
        if tracker is not None:
            hooks = _tracked(hooks, tracker)
        with executor, contextlib.ExitStack() as stack:
            if tracker is not None:
                stack.callback(lambda: summary.warnings.extend(tracker.warnings))
                stack.callback(tracker.close)
            if study.search is not None:
                try:
                    by_id = run_search(study, store, record.id, planned, executor, artifacts, hooks, summary,
                                    retry_failed, stop_starting)
                except TimedOut:  # between two rung runs: the store holds every result so far
                    summary.timed_out = True
            else:
                take_over(by_id)
                execute(store, record.id, by_id, executor, retry_failed=retry_failed, hooks=hooks, summary=summary,
                        stop_starting=stop_starting)
            while study.tune is not None and study.search is None and not summary.timed_out:
                # the other seeds at each cell's selected LR; with tune.extend, first the LRs past an edge
                more = {p.id: p for p in planned_from(study, store.trials(record.id)) if p.id not in by_id}
                if not more:
                    break
                store.add_trials(record.id, [(p.id, p.labels, p.spec.model_dump(mode="json"))
                                             for p in more.values()])
                by_id |= more
                take_over(more)
                execute(store, record.id, more, executor, retry_failed=retry_failed, hooks=hooks,
                        summary=summary, stop_starting=stop_starting)
        summary.execution = getattr(executor, "decision", None)
        summary.failed_earlier = sum(1 for t in store.trials(record.id) if t.id in by_id and t.status == "failed") \
            - summary.failed
    summary.wall_s = time.perf_counter() - t0
    return summary
