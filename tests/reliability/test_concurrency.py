"""2. Stale running rows and two live runners; 3. concurrent readers while a study writes."""

import subprocess
import threading
import time

import pytest
from reliability_helpers import attempts, cli, cli_env, start_run, wait_for, write_study

from loraplace.analysis import analyze_store
from loraplace.analysis.report import write_report
from loraplace.store import Owner, Store
from loraplace.study import expand_grid, load_study, run_study


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this pid now (pids are not reused this fast)


def test_row_left_running_by_a_dead_process_is_rerun(tmp_path):
    spec = load_study(write_study(tmp_path / "s.yaml", seeds=1))
    db = tmp_path / "s.db"
    planned = expand_grid(spec)
    with Store(db) as store:  # a run that claimed a trial and died without a trace
        study = store.write_study(spec.info(), spec.model_dump(mode="json"))
        store.add_trials(study.id, [(p.id, p.labels, p.spec.model_dump(mode="json")) for p in planned])
        ghost = Owner(Owner.current().host, dead_pid())
        claimed = store.claim_trial(study.id, ghost)
        assert store.trial(claimed.id).status == "running"
    summary = run_study(spec, db)
    assert summary.recovered == [claimed.id]
    with Store(db) as store:
        trials = store.trials(store.study().id)
        assert all(t.status == "done" and t.completions == 1 for t in trials)
        assert store.trial(claimed.id).attempts == 2  # the ghost's claim, then the real run


@pytest.mark.slow
def test_two_live_runners_never_run_the_same_trial(tmp_path, fork_server):
    """Two `loraplace run` processes (forked from the fork server: imports paid once) on one store."""
    spec = write_study(tmp_path / "s.yaml", steps=3, seeds=2)
    db = tmp_path / "s.db"
    env = cli_env(tmp_path)
    first = start_run(spec, db, env, server=fork_server)
    assert wait_for(lambda: attempts(db) > 0)
    second = start_run(spec, db, env, server=fork_server)  # starts while the first one is mid-study
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    with Store(db) as store:
        trials = store.trials(store.study().id)
        assert [t.status for t in trials] == ["done"] * 6
        # Each trial was claimed once and completed once: the runners shared the grid, never a trial.
        assert [(t.attempts, t.completions) for t in trials] == [(1, 1)] * 6
        assert store.integrity_check() == "ok"


@pytest.mark.slow
def test_status_and_report_while_a_study_writes(tmp_path, fork_server):
    """The writer is a `loraplace run` process and the commands are `loraplace status|report` processes, all forked
    from the fork server; in-process analysis/report calls read as fast as they go."""
    spec = write_study(tmp_path / "s.yaml", steps=6, seeds=2)
    db = tmp_path / "s.db"
    env = cli_env(tmp_path)
    runner = start_run(spec, db, env, server=fork_server)
    assert wait_for(lambda: attempts(db) > 0)
    errors: list[str] = []
    reads = {"store": 0, "report": 0, "cli": 0}

    def read_loop():  # in-process readers, as fast as they go
        while runner.poll() is None:
            try:
                analysis = analyze_store(db)
                reads["store"] += 1
                if analysis.groups:
                    write_report(analysis, tmp_path / "report", ["html", "csv"])
                    reads["report"] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=read_loop)
    thread.start()
    (tmp_path / "output").mkdir()
    while runner.poll() is None:  # the commands a user types in another terminal (forked: no import each time)
        for command in ("status", "report"):
            done = cli(command, db, env=env, server=fork_server, capture=tmp_path / "output")
            reads["cli"] += 1
            if done.returncode != 0 and "no finished trial yet" not in done.stderr:
                errors.append(f"loraplace {command}: rc {done.returncode}: {done.stderr.strip()}")
        time.sleep(0.1)
    thread.join()
    assert runner.returncode == 0
    assert not errors, errors[:5]
    assert not any("locked" in e for e in errors)
    assert reads["store"] > 5 and reads["cli"] >= 2, reads
    assert analyze_store(db).counts["done"] == 6
