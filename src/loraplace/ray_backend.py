"""Ray execution: each trial is a Ray task (with ``execution.fuse: K``, each group of up to K trials is one task
that trains them together, :func:`loraplace.runner.fused_outcomes`); outcomes flow back to the driver, the only
writer of the store.

An :class:`~loraplace.runner.Executor` for :func:`loraplace.runner.execute`, which does all the bookkeeping (claims,
hooks, recording, interruption) exactly as for the local backend.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplace.errors import LoraplaceError
from loraplace.records import Failure, TrialOutcome
from loraplace.runner import Heartbeat, PlannedTrial
from loraplace.store import HEARTBEAT_EVERY_S, trial_dir

RAY_WAIT_S = HEARTBEAT_EVERY_S  # how often the driver wakes to send heartbeats for the trials in flight


def _trial_task(spec_json: str, out_dir: str) -> str:
    # Runs in a Ray worker: no store access here; the outcome goes back as JSON (a typed record on both ends).
    from loraplace.trial import TrialSpec, run_trial

    return run_trial(TrialSpec.model_validate_json(spec_json), out_dir=out_dir).model_dump_json()


def _group_task(members_json: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    # A fused group in one Ray worker: one session, the members trained together, each evaluated and saved.
    from loraplace.runner import fused_outcomes
    from loraplace.trial import Session, TrialSpec, failure_of

    members = [(tid, TrialSpec.model_validate_json(spec), Path(out_dir)) for tid, spec, out_dir in members_json]
    first = members[0][1]
    try:
        session = Session(first.model, device=first.train.device, precision=first.train.precision)
    except Exception as exc:  # noqa: BLE001 - the model did not load: the group's trials fail like any other
        failed = TrialOutcome.failed(failure_of(exc)).model_dump_json()
        return [(tid, failed) for tid, _, _ in members]
    return [(tid, outcome.model_dump_json()) for tid, outcome in fused_outcomes(session, members)]


class RayExecutor:
    """Every claimed trial is submitted at once (alone, or in fused groups of ``fuse``); Ray schedules the tasks on
    the cluster's resources."""

    capacity = sys.maxsize

    def __init__(self, *, cpus: float, gpus: float, artifacts: Path, address: str | None = None, fuse: int = 1):
        try:
            import ray
        except ImportError:
            raise LoraplaceError("the ray backend needs Ray", "pip install 'loraplace[ray]'") from None
        self._ray = ray
        self._started_here = not ray.is_initialized()
        if self._started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        self._remote = ray.remote(_trial_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        self._group_remote = ray.remote(_group_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        self.artifacts = artifacts
        self.fuse = fuse
        self._forming: list[tuple[PlannedTrial, Heartbeat]] = []  # a fused group not submitted yet
        self._pending: dict[Any, list[tuple[str, Heartbeat]]] = {}  # task → its trials

    def prepare(self) -> None:
        """Nothing to do: Ray schedules the tasks."""

    def submit(self, trial: PlannedTrial, heartbeat: Heartbeat) -> None:
        if self.fuse <= 1:
            ref = self._remote.remote(trial.spec.model_dump_json(), str(trial_dir(self.artifacts, trial.id)))
            self._pending[ref] = [(trial.id, heartbeat)]
            return
        self._forming.append((trial, heartbeat))
        if len(self._forming) == self.fuse:
            self._launch_group()

    def _launch_group(self) -> None:
        group, self._forming = self._forming, []
        ref = self._group_remote.remote([(t.id, t.spec.model_dump_json(), str(trial_dir(self.artifacts, t.id)))
                                         for t, _ in group])
        self._pending[ref] = [(t.id, heartbeat) for t, heartbeat in group]

    def wait(self) -> Iterator[tuple[str, TrialOutcome]]:
        if self._forming:  # no more claims came: the last group goes as it is
            self._launch_group()
        while True:
            ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=RAY_WAIT_S)
            for members in self._pending.values():
                for _, heartbeat in members:
                    heartbeat()
            if ready:
                break
        for ref in ready:
            members = self._pending.pop(ref)
            try:
                value = self._ray.get(ref)
                results = dict(value) if isinstance(value, list) else {members[0][0]: value}
                outcomes = {tid: TrialOutcome.model_validate_json(results[tid]) for tid, _ in members}
            except Exception as exc:  # noqa: BLE001 - the worker died or raised: its trials fail, the others go on
                failed = TrialOutcome.failed(Failure(kind="error", message=f"{type(exc).__name__}: "
                                                                          f"{str(exc)[-500:]}"))
                outcomes = {tid: failed for tid, _ in members}
            yield from outcomes.items()

    def cancel(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        self._forming.clear()

    def close(self) -> None:
        if self._started_here:
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
