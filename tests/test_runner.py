"""The runner core on a fake executor: bookkeeping (claims, hooks, records, interruption) is the same whatever runs
the trials — one at a time, all at once (Ray) or several together (fused)."""

import pytest

from loraplace.data import DataSpec
from loraplace.placement import parse_placement
from loraplace.records import Failure, GroupKey, Metrics, Size, StudyInfo, TrialLabels, TrialOutcome
from loraplace.runner import PlannedTrial, RunHooks, execute
from loraplace.store import Store
from loraplace.trial import TrialSpec

SPEC = TrialSpec(model="tiny:llama", data=DataSpec(train="builtin:arithmetic"), placement=parse_placement("all"))
INFO = StudyInfo(name="s", model="tiny:llama", placements=("all",), baseline="all", baseline_given=True)


def planned(n: int) -> dict[str, PlannedTrial]:
    trials = [PlannedTrial(f"t{i}", TrialLabels(group=GroupKey(placement="all", size=Size(kind="rank", value=2)),
                                                seed=i), SPEC) for i in range(n)]
    return {t.id: t for t in trials}


class FakeExecutor:
    """Runs nothing: trial t<i> is done with eval loss i, except those listed in ``fail`` (and ``interrupt_at``
    raises KeyboardInterrupt when that trial is waited for)."""

    def __init__(self, capacity: int, fail=(), interrupt_at=None, prepared_capacity: int | None = None):
        self.capacity = capacity
        self.prepared_capacity = prepared_capacity  # what prepare() sets the capacity to (as fuse: auto does)
        self.prepared_after: list[list[str]] = []  # what had been submitted when prepare() ran
        self.fail, self.interrupt_at = set(fail), interrupt_at
        self.submitted: list[str] = []
        self.batches: list[list[str]] = []
        self.queue: list[str] = []
        self.cancelled = False

    def submit(self, trial, heartbeat):
        heartbeat()  # rate-limited: calling it is always allowed
        self.submitted.append(trial.id)
        self.queue.append(trial.id)

    def wait(self):
        batch, self.queue = self.queue, []
        self.batches.append(batch)
        for trial_id in batch:
            if trial_id == self.interrupt_at:
                raise KeyboardInterrupt
            if trial_id in self.fail:
                yield trial_id, TrialOutcome.failed(Failure(kind="error", message=f"{trial_id} broke"))
            else:
                yield trial_id, TrialOutcome(status="done", metrics=Metrics(eval_loss=float(trial_id[1:]),
                                                                            perplexity=1.0))

    def prepare(self):
        self.prepared_after.append(list(self.submitted))
        if self.prepared_capacity is not None:
            self.capacity = self.prepared_capacity

    def cancel(self):
        self.cancelled = True

    def close(self):
        pass


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s.db") as s:
        yield s


def register(store, trials):
    study = store.write_study(INFO, {})
    store.add_trials(study.id, [(t.id, t.labels, {"i": t.labels.seed}) for t in trials.values()])
    return study.id


@pytest.mark.parametrize("capacity", [1, 3, 100])
def test_every_trial_is_claimed_run_and_recorded_once_in_grid_order(store, capacity):
    trials = planned(5)
    study_id = register(store, trials)
    executor = FakeExecutor(capacity, fail={"t3"})
    started, ended = [], []
    summary = execute(store, study_id, trials, executor, hooks=RunHooks(
        on_start=lambda t, i, n: started.append((t.id, i, n)), on_end=lambda t, o: ended.append((t.id, o.status))))
    assert executor.submitted == ["t0", "t1", "t2", "t3", "t4"]
    assert all(len(b) <= capacity for b in executor.batches)
    assert started == [(f"t{i}", i + 1, 5) for i in range(5)]
    assert ended == [("t0", "done"), ("t1", "done"), ("t2", "done"), ("t3", "failed"), ("t4", "done")]
    assert (summary.ran, summary.done, summary.failed) == (5, 4, 1)
    records = {t.id: t for t in store.trials(study_id)}
    assert records["t2"].metrics.eval_loss == 2.0 and records["t3"].error == "t3 broke"
    assert all(t.attempts == 1 and t.completions == int(t.status == "done") for t in records.values())


def test_prepare_runs_once_after_the_first_claim_and_may_size_the_capacity(store):
    """An executor is prepared (e.g. the base model loaded and fused groups sized) once a trial is claimed — never
    for a study with nothing left to run — and the capacity it sets then applies to the next claims."""
    trials = planned(5)
    study_id = register(store, trials)
    executor = FakeExecutor(1, prepared_capacity=3)
    execute(store, study_id, trials, executor)
    assert executor.prepared_after == [["t0"]]
    assert executor.batches == [["t0", "t1", "t2"], ["t3", "t4"]]
    idle = FakeExecutor(1, prepared_capacity=3)
    assert execute(store, study_id, trials, idle).ran == 0 and idle.prepared_after == []


def test_a_failed_trial_is_not_retried_in_the_same_run_even_with_retry_failed(store):
    trials = planned(2)
    study_id = register(store, trials)
    summary = execute(store, study_id, trials, FakeExecutor(1, fail={"t0"}), retry_failed=True)
    assert (summary.ran, summary.failed) == (2, 1) and store.trial("t0").attempts == 1
    again = execute(store, study_id, trials, FakeExecutor(1), retry_failed=True)  # a new run retries it
    assert (again.ran, again.done) == (1, 1) and store.trial("t0").status == "done"


def test_an_interruption_marks_what_was_in_flight_and_keeps_what_finished(store):
    trials = planned(4)
    study_id = register(store, trials)
    executor = FakeExecutor(2, interrupt_at="t3")
    with pytest.raises(KeyboardInterrupt):
        execute(store, study_id, trials, executor)
    status = {t.id: t.status for t in store.trials(study_id)}
    assert status == {"t0": "done", "t1": "done", "t2": "done", "t3": "interrupted"}
    assert executor.cancelled
    resumed = execute(store, study_id, trials, FakeExecutor(2))
    assert resumed.ran == 1 and store.trial("t3").status == "done" and store.trial("t3").attempts == 2


def test_once_stop_starting_says_so_nothing_more_is_claimed_and_what_is_in_flight_finishes(store):
    """``loraplace run --timeout``: checked before every claim; the trials in flight are recorded, the others stay
    pending for the next run, which runs only them."""
    trials = planned(5)
    study_id = register(store, trials)
    executor = FakeExecutor(2)
    summary = execute(store, study_id, trials, executor, stop_starting=lambda: len(executor.submitted) >= 3)
    assert executor.batches == [["t0", "t1"], ["t2"]] and summary.timed_out
    status = {t.id: t.status for t in store.trials(study_id)}
    assert status == {"t0": "done", "t1": "done", "t2": "done", "t3": "pending", "t4": "pending"}
    rest = execute(store, study_id, trials, FakeExecutor(2))
    assert (rest.ran, rest.done, rest.timed_out) == (2, 2, False)
    assert all(t.status == "done" and t.attempts == 1 for t in store.trials(study_id))


def test_a_stop_that_comes_once_every_trial_is_claimed_leaves_nothing_and_is_not_a_timeout(store):
    trials = planned(2)
    study_id = register(store, trials)
    executor = FakeExecutor(1)
    summary = execute(store, study_id, trials, executor, stop_starting=lambda: len(executor.submitted) >= 2)
    assert summary.ran == 2 and not summary.timed_out
