"""Ray execution: each trial is a Ray task; outcomes flow back to the driver, the only writer of the store.

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
from loraplace.runner import Heartbeat, PlannedTrial, trial_dir

RAY_WAIT_S = 5.0  # how often the driver wakes to send heartbeats for the trials in flight


def _trial_task(spec_json: str, out_dir: str) -> str:
    # Runs in a Ray worker: no store access here; the outcome goes back as JSON (a typed record on both ends).
    from loraplace.trial import TrialSpec, run_trial

    return run_trial(TrialSpec.model_validate_json(spec_json), out_dir=out_dir).model_dump_json()


class RayExecutor:
    """Every claimed trial is submitted at once; Ray schedules them on the cluster's resources."""

    capacity = sys.maxsize

    def __init__(self, *, cpus: float, gpus: float, artifacts: Path, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise LoraplaceError("the ray backend needs Ray", "pip install 'loraplace[ray]'") from None
        self._ray = ray
        self._started_here = not ray.is_initialized()
        if self._started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        self._remote = ray.remote(_trial_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        self.artifacts = artifacts
        self._pending: dict[Any, tuple[str, Heartbeat]] = {}

    def submit(self, trial: PlannedTrial, heartbeat: Heartbeat) -> None:
        ref = self._remote.remote(trial.spec.model_dump_json(), str(trial_dir(self.artifacts, trial.id)))
        self._pending[ref] = (trial.id, heartbeat)

    def wait(self) -> Iterator[tuple[str, TrialOutcome]]:
        while True:
            ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=RAY_WAIT_S)
            for _, heartbeat in self._pending.values():
                heartbeat()
            if ready:
                break
        for ref in ready:
            trial_id, _ = self._pending.pop(ref)
            try:
                outcome = TrialOutcome.model_validate_json(self._ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - the worker died or raised: that trial fails, the others go on
                outcome = TrialOutcome.failed(Failure(kind="error", message=f"{type(exc).__name__}: "
                                                                           f"{str(exc)[-500:]}"))
            yield trial_id, outcome

    def cancel(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()

    def close(self) -> None:
        if self._started_here:
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
