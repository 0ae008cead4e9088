import multiprocessing as mp
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from loraplace.store import SCHEMA_VERSION, Owner, Store, StoreError

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s.db") as s:
        yield s


def _study(store, n=3):
    study = store.open_study("demo", {"name": "demo"})
    store.add_trials(study.id, [(f"t{i}", {"i": i}) for i in range(n)])
    return study


def test_wal_and_schema(store):
    assert store.journal_mode() == "wal"
    assert store.schema_version() == SCHEMA_VERSION
    assert store.integrity_check() == "ok"


def test_lifecycle_and_immutable_records(store):
    study = _study(store)
    trial = store.claim_trial(study.id)
    assert trial.id == "t0" and trial.status == "running" and trial.attempts == 1
    result = {"eval_loss": 1.5, "perplexity": 4.48, "curve": [{"step": 1, "loss": 2.0, "tokens": 10}],
              "evals": [], "adapter_dir": "/x/adapter", "status": "done"}
    store.finish_trial(trial.id, result)
    done = store.trial("t0")
    assert done.status == "done" and done.completions == 1 and done.metrics["eval_loss"] == 1.5
    assert store.curve("t0") == [(1, 2.0, 10)]
    with pytest.raises(AttributeError):
        done.status = "pending"  # frozen
    with pytest.raises(StoreError, match="not running"):
        store.finish_trial("t0", result)  # a second completion is refused
    assert store.trial("t0").completions == 1


def test_add_trials_is_idempotent(store):
    study = _study(store)
    store.finish_trial(store.claim_trial(study.id).id, {"eval_loss": 1.0})
    assert store.add_trials(study.id, [(f"t{i}", {"i": i}) for i in range(4)]) == 1
    assert store.trial("t0").status == "done"


def test_only_owner_can_finish(store):
    study = _study(store)
    trial = store.claim_trial(study.id)
    with pytest.raises(StoreError, match="not running under"):
        store.finish_trial(trial.id, {"eval_loss": 1.0}, owner=Owner("elsewhere", 1))


def test_failed_and_retry(store):
    study = _study(store, 1)
    store.fail_trial(store.claim_trial(study.id).id, "boom", step=3)
    assert store.trial("t0").failed_step == 3
    assert store.claim_trial(study.id) is None
    again = store.claim_trial(study.id, retry_failed=True)
    assert again.id == "t0" and again.attempts == 2 and again.error is None


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
        done = s.trial("t-done")
        assert done.status == "done" and done.metrics == {"eval_loss": 1.25} and done.completions == 0
        assert s.claim_trial(study.id).id == "t-pending"
        assert s.integrity_check() == "ok"


def test_newer_store_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer loraplace"):
        Store(path)


def test_readonly_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        Store(tmp_path / "nope.db", readonly=True)
