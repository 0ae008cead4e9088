import math
import multiprocessing as mp
import os
import shutil
import sqlite3

import pytest

from helpers import FIXTURES
from loraplace.records import (
    CurvePoint,
    Failure,
    GroupKey,
    Metrics,
    Size,
    StudyInfo,
    TrialLabels,
    TrialOutcome,
)
from loraplace.store import SCHEMA_VERSION, Owner, Store, StoreError

INFO = StudyInfo(name="demo", model="tiny:llama", placements=("all",), baseline="all", baseline_given=True)


def labels(i: int) -> TrialLabels:
    return TrialLabels(group=GroupKey(placement="all", size=Size(kind="rank", value=2)), seed=i)


def done(loss: float = 1.5) -> TrialOutcome:
    return TrialOutcome(status="done", metrics=Metrics(eval_loss=loss, perplexity=4.48, tokens_per_s=10.0,
                                                       train_s=1.0, peak_mem_mb=100.0),
                        trainable_params=400, curve=(CurvePoint(step=1, loss=2.0, tokens=10, lr=1e-3),))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s.db") as s:
        yield s


def _study(store, n=3):
    study = store.write_study(INFO, {"name": "demo"})
    store.add_trials(study.id, [(f"t{i}", labels(i), {"i": i}) for i in range(n)])
    return study


def test_wal_and_schema(store):
    assert store.journal_mode() == "wal"
    assert store.schema_version() == SCHEMA_VERSION
    assert store.integrity_check() == "ok"


def test_lifecycle_and_immutable_records(store):
    study = _study(store)
    trial = store.claim_trial(study.id)
    assert trial.id == "t0" and trial.status == "running" and trial.attempts == 1
    assert trial.labels == labels(0) and trial.spec == {"i": 0}
    outcome = done()
    store.record_outcome(trial.id, outcome)
    record = store.trial("t0")
    assert record.status == "done" and record.completions == 1
    assert record.outcome == outcome  # the typed record round-trips exactly
    assert store.trial("t0").outcome.curve == (CurvePoint(step=1, loss=2.0, tokens=10, lr=1e-3),)
    with pytest.raises(AttributeError):
        record.status = "pending"  # frozen
    with pytest.raises(ValueError):
        record.outcome.metrics.eval_loss = 0.0  # records are immutable all the way down
    with pytest.raises(StoreError, match="not running"):
        store.record_outcome("t0", outcome)  # a second completion is refused
    assert store.trial("t0").completions == 1


def test_metrics_table_holds_measured_quantities_only(store):
    study = _study(store, 1)
    store.record_outcome(store.claim_trial(study.id).id, done())
    names = {r[0] for r in store._conn.execute("SELECT name FROM metrics WHERE trial_id = 't0'")}
    assert names == {"eval_loss", "perplexity", "tokens_per_s", "train_s", "peak_mem_mb"}  # no counters, no sizes


def test_non_finite_values_round_trip(store):
    study = _study(store, 1)
    outcome = TrialOutcome(status="done", metrics=Metrics(eval_loss=800.0, perplexity=float("inf")))
    store.record_outcome(store.claim_trial(study.id).id, outcome)
    assert store.trial("t0").outcome.metrics.perplexity == float("inf")


def test_add_trials_is_idempotent(store):
    study = _study(store)
    store.record_outcome(store.claim_trial(study.id).id, done(1.0))
    assert store.add_trials(study.id, [(f"t{i}", labels(i), {"i": i}) for i in range(4)]) == 1
    assert store.trial("t0").status == "done"


def test_trials_added_later_come_after_the_first(store):
    """A tuned study's other seeds (or an --extend's cells) are added by a later call: they are claimed and listed
    after every trial already there, in the order given — not interleaved by their index in their own call."""
    study = _study(store, 3)
    assert store.add_trials(study.id, [(f"x{i}", labels(i), {"x": i}) for i in range(2)]) == 2
    assert [t.id for t in store.trials(study.id)] == ["t0", "t1", "t2", "x0", "x1"]
    claimed = [store.claim_trial(study.id).id for _ in range(5)]
    assert claimed == ["t0", "t1", "t2", "x0", "x1"]


def test_only_owner_can_finish(store):
    study = _study(store)
    trial = store.claim_trial(study.id)
    with pytest.raises(StoreError, match="not running under"):
        store.record_outcome(trial.id, done(1.0), owner=Owner("elsewhere", 1))


def test_failed_and_retry(store):
    study = _study(store, 1)
    failure = Failure(kind="non_finite", message="boom", step=3)
    store.record_outcome(store.claim_trial(study.id).id, TrialOutcome.failed(failure))
    failed = store.trial("t0")
    assert (failed.status, failed.error, failed.failed_step) == ("failed", "boom", 3)
    assert failed.outcome.failure == failure and failed.metrics is None
    assert store.claim_trial(study.id) is None
    again = store.claim_trial(study.id, retry_failed=True)
    assert again.id == "t0" and again.attempts == 2 and again.error is None and again.outcome is None


def _dead_pid() -> int:
    proc = mp.get_context("spawn").Process(target=os.getpid)
    proc.start()
    proc.join()
    return proc.pid


def test_stale_running_rows_are_recovered(store):
    study = _study(store, 2)
    dead = Owner(Owner.current().host, _dead_pid())
    store.claim_trial(study.id, owner=dead)
    live_elsewhere = Owner("other-host", 42)
    store.claim_trial(study.id, owner=live_elsewhere)
    assert store.recover_stale(study.id, stale_after_s=3600) == ["t0"]  # pid gone on this host
    assert store.trial("t0").status == "interrupted"
    assert store.trial("t1").status == "running"  # other host, fresh heartbeat: left alone
    assert store.recover_stale(study.id, stale_after_s=0.0) == ["t1"]  # heartbeat too old
    assert store.claim_trial(study.id).id == "t0"


def _claimer(path, out):
    with Store(path) as s:
        study = s.study("demo")
        got = []
        while (t := s.claim_trial(study.id)) is not None:
            got.append(t.id)
        out.put(got)


def test_two_processes_never_claim_the_same_trial(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as s:
        _study(s, 40)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(path, out)) for _ in range(2)]
    for p in procs:
        p.start()
    claimed = out.get(timeout=60) + out.get(timeout=60)
    for p in procs:
        p.join()
    assert sorted(claimed) == sorted(f"t{i}" for i in range(40))  # each exactly once


def test_v1_store_migrates(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(FIXTURES / "store_v1.db", path)
    with Store(path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        study = s.study("old-study")
        record = s.trial("t-done")
        assert record.status == "done" and record.completions == 0
        assert record.metrics == Metrics(eval_loss=1.25, perplexity=math.exp(1.25))  # the rest was never recorded
        assert s.claim_trial(study.id).id == "t-pending"
        assert s.integrity_check() == "ok"


def test_v2_store_migrates_to_typed_records(tmp_path):
    path = tmp_path / "v2.db"
    shutil.copy(FIXTURES / "store_v2.db", path)
    with Store(path) as s:
        assert s.schema_version() == SCHEMA_VERSION and s.integrity_check() == "ok"
        study = s.study()
        assert study.info.placements == ("all", "attn", "top", "auto")  # spec order, from the grid
        assert (study.info.baseline, study.info.baseline_given) == ("all", True)
        trials = s.trials(study.id)
        assert len(trials) == 16 and all(t.outcome is not None for t in trials)
        failed = [t for t in trials if t.status == "failed"]
        assert len(failed) == 1 and failed[0].outcome.failure.kind == "non_finite"
        assert failed[0].outcome.failure.step == 2 == failed[0].failed_step
        auto = next(t for t in trials if t.labels.group.placement == "auto" and t.status == "done")
        assert auto.labels.group.size == Size(kind="budget", value=2100)
        assert dict(auto.labels.group.axes) in ({"lr": 0.001}, {"lr": 0.003})
        assert auto.outcome.probe is not None and len(auto.outcome.probe.sites) == 14
        assert auto.outcome.sites is not None and auto.outcome.sites.sites
        assert 2100 - 200 < auto.outcome.trainable_params <= 2100
        assert all(len(t.outcome.curve) == 3 for t in trials if t.status == "done")
        names = {r[0] for r in s._conn.execute("SELECT DISTINCT name FROM metrics")}
        assert names <= set(Metrics.model_fields) and "trainable_params" not in names


def test_v2_store_is_read_without_being_written(tmp_path):
    path = tmp_path / "v2.db"
    shutil.copy(FIXTURES / "store_v2.db", path)
    before = path.read_bytes()
    with Store.open_readonly(path) as s:  # migrated in memory
        assert s.schema_version() == SCHEMA_VERSION and len(s.trials(s.study().id)) == 16
        with pytest.raises(StoreError, match="read-only"):
            s.claim_trial(s.study().id)
    assert path.read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} <= {"v2.db", "v2.db-wal", "v2.db-shm"}  # SQLite's sidecars only


@pytest.mark.parametrize("content", [b"", b"hello, not a database\n" * 10])
def test_a_file_that_is_not_a_store_is_refused_untouched(tmp_path, content):
    path = tmp_path / "x.db"
    path.write_bytes(content)
    for opener in (Store, Store.open_readonly):
        with pytest.raises(StoreError, match="not a loraplace store"):
            opener(path)
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


def test_newer_store_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer loraplace"):
        Store(path)


def test_v4_search_reads_the_fields_it_left_out_as_they_were_then(tmp_path):
    """A search stored before a SearchSpec field existed lacks that field: v5 writes it out at the value it read as
    then, so a later change of ``search: {}``'s defaults does not change what a stored search was. Read-only opens
    see the same, and write nothing."""
    from loraplace.store.migrations import SEARCH_DEFAULTS_V4

    path = tmp_path / "v4.db"
    with Store(path) as s:
        s.write_study(INFO, {"name": "demo", "search": {"eta": 4, "rungs": [3, 10], "rung_examples": 24}})
        s.write_study(INFO.model_copy(update={"name": "grid"}), {"name": "grid", "search": None})
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 4")
    db.commit()
    db.close()
    before = path.read_bytes()
    expected = SEARCH_DEFAULTS_V4 | {"eta": 4, "rungs": [3, 10], "rung_examples": 24}
    with Store.open_readonly(path) as s:
        assert s.study("demo").spec["search"] == expected and s.study("grid").spec["search"] is None
    assert path.read_bytes() == before
    with Store(path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.study("demo").spec["search"] == expected
        assert expected["stop_when_stable"] is False and expected["finalists"] == 2


def test_readonly_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        Store.open_readonly(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()


def test_a_full_disk_is_one_clear_error_naming_the_store_and_the_write_is_rolled_back(store):
    """`internal error: OperationalError: database or disk is full` named neither the disk nor the file. SQLite's
    max_page_count makes the file full as a full disk would."""
    study = _study(store)
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match=r"the disk holding .* is full .*; the write was rolled back") as exc:
        store.add_trials(study.id, [(f"x{i}", labels(i), {"i": i, "pad": "x" * 4000}) for i in range(50)])
    assert "run the same command" in exc.value.hint
    assert len(store.trials(study.id)) == 3  # nothing of the failed write
