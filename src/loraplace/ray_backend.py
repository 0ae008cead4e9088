"""Ray execution on **warm workers**: Ray actors that each hold a loaded base model and run trials, fused groups and
a search's rung runs on it; outcomes flow back to the driver, the only writer of the store.

- One actor per `resources:` slot the cluster has (``resources: {gpus: 1}``: one per GPU; on CPUs one per
  ``cpus``), each loading the base once and keeping it (again only when a trial wants it quantized otherwise:
  ``axes: {quantize: …}``). The run summary says how many loads that took and how long each.
- A trial's saved training state (``execution.save_state_every``) and a search candidate's rung state live under
  the store's artifacts directory, which every worker must reach at the same path (a shared filesystem, as Ray
  Train's ``storage_path``): checked before the store is written (:func:`check_cluster`).
- **Worker loss**: an actor whose process dies (a preempted node, an out-of-memory kill) is restarted by Ray and
  its call retried there (``max_restarts``/``max_task_retries``); the retried trial continues from its last saved
  state, a retried rung run from the previous rung's, so no step is counted twice and the driver records each
  outcome once.

An :class:`~loraplace.runner.Executor` for :func:`loraplace.runner.execute` (and for the search's rung runs), which
does all the bookkeeping (claims, hooks, recording, interruption) exactly as for the local backend.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplace.errors import LoraplaceError
from loraplace.records import Failure, RungResult, TrialOutcome
from loraplace.runner import Heartbeat, PlannedTrial, RungTask
from loraplace.store import HEARTBEAT_EVERY_S, trial_dir

RAY_WAIT_S = HEARTBEAT_EVERY_S  # how often the driver wakes to send heartbeats for the trials in flight
WORKER_RESTARTS = 3  # a worker process that dies is restarted (and its call retried) this many times
SHARED_PROBE = ".ray-shared-probe"  # written by the driver under the artifacts directory, read by a worker


class TrialWorker:
    """A Ray actor (made remote by :class:`RayExecutor`): one loaded base, reused by every call."""

    def __init__(self, model: str, device: str, precision: str, artifacts: str, save_state_every: float | None):
        from loraplace.runner import LocalExecutor

        self._local = LocalExecutor(model, device=device, precision=precision, artifacts=Path(artifacts),
                                    save_state_every=save_state_every)
        self._loads: list[float] = []  # seconds each load of the base took in this process

    def _load(self, spec) -> Failure | None:
        before, t0 = self._local._session, time.perf_counter()
        failure = self._local._load(spec)
        if self._local._session is not None and self._local._session is not before:
            self._loads.append(time.perf_counter() - t0)
        return failure

    def run_trials(self, trials: list[PlannedTrial]) -> list[tuple[str, TrialOutcome]]:
        """One trial, or a fused group trained together on this worker's base."""
        from loraplace.runner import fused_outcomes

        failure = self._load(trials[0].spec)
        if failure is not None:  # the model did not load: these trials fail like any other
            return [(t.id, TrialOutcome.failed(failure)) for t in trials]
        if len(trials) == 1:
            return [(trials[0].id, self._local._run(trials[0], lambda: None))]
        members = [(t.id, t.spec, trial_dir(self._local.artifacts, t.id)) for t in trials]
        return list(fused_outcomes(self._local._session, members, save_state_every=self._local.save_state_every))

    def run_rung(self, task: RungTask) -> RungResult:
        self._load(task.spec)
        (result,) = self._local.run_rung([task])
        return result

    def loads(self) -> list[float]:
        return list(self._loads)

    def pid(self) -> int:
        import os

        return os.getpid()


def worker_name(index: int) -> str:
    import os

    return f"loraplace-{os.getpid()}-worker-{index}"


def _ray():
    try:
        import ray
    except ImportError:
        raise LoraplaceError("the ray backend needs Ray", "pip install 'loraplace[ray]'") from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (or start a local one); True when this process started Ray. A cluster that
    cannot be reached is one clear error."""
    ray = _ray()
    unreachable = _unreachable(address)  # first: Ray's client would retry an address that answers nothing for minutes
    if unreachable:
        raise LoraplaceError(f"--address {address}: no Ray cluster could be reached ({unreachable})",
                             "start one with `ray start --head` and give its address (or `auto` on a node of it), "
                             "or leave --address out for a local cluster")
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LoraplaceError(f"--address {address}: no Ray cluster could be reached ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})",
                             "start one with `ray start --head` and give its address (or `auto` on a node of it), "
                             "or leave --address out for a local cluster") from None
    return True


REACH_TIMEOUT_S = 3.0  # Ray's own client retries an address that does not answer for minutes


def _unreachable(address: str | None) -> str | None:
    """Why ``HOST:PORT`` (or ``ray://HOST:PORT``) cannot be a cluster: no TCP connect within ``REACH_TIMEOUT_S``;
    None when it answers, or for ``auto``/``local``/none (Ray finds those itself, quickly)."""
    import socket

    if address is None or address in ("auto", "local"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return "not HOST:PORT, ray://HOST:PORT or auto"
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}, {REACH_TIMEOUT_S:g} s"
    return None


def worker_count(cpus: float, gpus: float) -> int:
    """How many warm workers the cluster holds at ``resources:`` each: its GPUs / gpus, or its CPUs / cpus."""
    total = _ray().cluster_resources()
    count = int(total.get("GPU", 0) // gpus) if gpus > 0 else int(total.get("CPU", 1) // cpus)
    if count < 1:
        raise LoraplaceError(f"the Ray cluster has {total.get('GPU' if gpus > 0 else 'CPU', 0):g} "
                             f"{'GPU' if gpus > 0 else 'CPU'}(s): not one worker of resources {{cpus: {cpus:g}, "
                             f"gpus: {gpus:g}}} fits", "lower resources: or add nodes")
    return count


def check_cluster(address: str | None, artifacts: Path, *, cpus: float, gpus: float) -> bool:
    """Before the store is written: the cluster answers, one worker fits, and a worker reads a file the driver
    writes under ``artifacts`` (saved states and adapters must be reachable by every worker and the driver).
    Returns whether this process started Ray (the executor shuts it down at the end)."""
    ray = _ray()
    started = connect(address)
    created = not artifacts.exists()
    try:
        worker_count(cpus, gpus)
        artifacts.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        probe = artifacts / SHARED_PROBE
        probe.write_text(token)
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            reads = ray.remote(_reads)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            calls = [reads.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=n["NodeID"], soft=False)).remote(str(probe), token) for n in nodes]
            blind = [n.get("NodeManagerAddress", n["NodeID"])
                     for n, seen in zip(nodes, ray.get(calls, timeout=120), strict=True) if not seen]
        finally:
            probe.unlink(missing_ok=True)
        if blind:
            raise LoraplaceError(f"Ray node(s) {', '.join(blind)} cannot read {artifacts}: the store's artifacts "
                                 "directory is not shared with every worker (saved states and adapters go there)",
                                 "put the store on a filesystem every node mounts at the same path (--store)")
    except BaseException:
        if created and artifacts.is_dir() and not any(artifacts.iterdir()):
            artifacts.rmdir()  # nothing is left behind by a refused run
        if started:
            ray.shutdown()
        raise
    return started


def _reads(path: str, token: str) -> bool:
    """On one node: ``path`` holds ``token`` (the driver wrote it there)."""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


class RayExecutor:
    """Claimed trials go to idle warm workers (alone, or in fused groups of ``fuse``); a search's rung runs spread
    over them the same way. ``capacity``: workers × fuse, so the driver claims no more than the workers run."""

    def __init__(self, model: str, *, device: str, precision: str, cpus: float, gpus: float, artifacts: Path,
                 address: str | None = None, fuse: int = 1, save_state_every: float | None = None,
                 started_here: bool | None = None):
        ray = _ray()
        self._ray = ray
        self._started_here = connect(address) if started_here is None else started_here
        count = worker_count(cpus, gpus)
        actor = ray.remote(TrialWorker)
        # named (driver pid, index): a worker can be found from outside, e.g. by a test that kills its process
        self.workers = [actor.options(num_cpus=cpus, num_gpus=gpus, max_restarts=WORKER_RESTARTS,
                                      max_task_retries=WORKER_RESTARTS, name=worker_name(i))
                        .remote(model, device, precision, str(artifacts), save_state_every) for i in range(count)]
        self.artifacts = artifacts
        self.fuse = fuse
        self.capacity = count * fuse
        self._queue: list[tuple[PlannedTrial, Heartbeat]] = []
        self._pending: dict[Any, tuple[Any, list[tuple[str, Heartbeat]]]] = {}  # call → (worker, its trials)
        self.decision: str | None = None

    def _idle(self) -> list[Any]:
        busy = {id(worker) for worker, _ in self._pending.values()}
        return [w for w in self.workers if id(w) not in busy]

    def prepare(self) -> None:
        """Nothing to do: each worker loads the base on its first call."""

    def submit(self, trial: PlannedTrial, heartbeat: Heartbeat) -> None:
        self._queue.append((trial, heartbeat))

    def _dispatch(self) -> None:
        for worker in self._idle():
            if not self._queue:
                return
            group, self._queue = self._queue[:self.fuse], self._queue[self.fuse:]
            ref = worker.run_trials.remote([t for t, _ in group])
            self._pending[ref] = (worker, [(t.id, heartbeat) for t, heartbeat in group])

    def wait(self) -> Iterator[tuple[str, TrialOutcome]]:
        self._dispatch()
        while True:
            ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=RAY_WAIT_S)
            for _, members in self._pending.values():
                for _, heartbeat in members:
                    heartbeat()
            if ready:
                break
        for ref in ready:
            _, members = self._pending.pop(ref)
            try:
                outcomes = dict(self._ray.get(ref))
                results = {tid: outcomes[tid] for tid, _ in members}
            except Exception as exc:  # noqa: BLE001 - the worker died for good or raised: these trials fail
                failed = TrialOutcome.failed(Failure(kind="error", message=f"{type(exc).__name__}: "
                                                                          f"{str(exc)[-500:]}"))
                results = {tid: failed for tid, _ in members}
            yield from results.items()

    def run_rung(self, tasks: list[RungTask]) -> Iterator[RungResult]:
        """A rung's candidates spread over the workers, each result as it is ready (the search records them and
        decides from the recorded results alone, so the order they arrive in changes no decision)."""
        waiting = list(tasks)
        running: dict[Any, tuple[Any, RungTask]] = {}
        while waiting or running:
            busy = {id(w) for w, _ in running.values()}
            for worker in [w for w in self.workers if id(w) not in busy]:
                if not waiting:
                    break
                task = waiting.pop(0)
                running[worker.run_rung.remote(task)] = (worker, task)
            ready, _ = self._ray.wait(list(running), num_returns=1)
            for ref in ready:
                _, task = running.pop(ref)
                try:
                    yield self._ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died for good: the candidate fails this rung
                    yield RungResult(candidate=task.candidate, rung=task.rung, steps=task.steps, status="failed",
                                     failure=Failure(kind="error", message=f"{type(exc).__name__}: "
                                                                           f"{str(exc)[-500:]}"), trained_steps=0)

    def cancel(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        self._queue.clear()

    def close(self) -> None:
        try:
            loads = [s for w in self.workers for s in self._ray.get(w.loads.remote(), timeout=30)]
        except Exception:  # noqa: BLE001 - a worker gone at the end: no figure, nothing else lost
            loads = []
        if loads:
            self.decision = (f"{len(self.workers)} warm Ray worker(s): the base was loaded {len(loads)} time(s), "
                             f"{sum(loads) / len(loads):.1f} s each on average, and reused by every trial after")
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []
        if self._started_here:
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
