"""1. Kill stress: SIGKILL a running study at seeded random moments (≥ 20 kills), resume each time.

At the end every trial is done exactly once (the store counts completions), the database passes
``PRAGMA integrity_check``, and a result, once finished, never changed afterwards.
"""

import random
import time

import pytest
from reliability_helpers import attempts, cli_env, start_run, wait_for, write_study

from loraplace.store import STATE_DIR, Store, artifacts_dir
from loraplace.study import load_study, run_study

KILLS = 20


def snapshot(db) -> dict[str, str]:
    """trial id → its stored outcome, for every finished trial."""
    with Store.open_readonly(db) as store:
        return {t.id: t.outcome.model_dump_json() for t in store.trials(store.study().id) if t.status == "done"}


def by_cell(db) -> dict[tuple[str, int], tuple[float, list[float]]]:
    """(placement, seed) → (eval loss, curve losses) of every finished trial."""
    with Store.open_readonly(db) as store:
        return {(t.labels.group.placement, t.labels.seed): (t.outcome.metrics.eval_loss,
                                                            [p.loss for p in t.outcome.curve])
                for t in store.trials(store.study().id) if t.status == "done"}


def state_files(db) -> list:
    return list(artifacts_dir(db).glob(f"*/{STATE_DIR}/*.pt"))


def saved_states(db) -> int:
    return len(state_files(db))


def saved_since(db, moment: float) -> bool:
    """Whether some trial's training state was written after ``moment`` (time.time())."""
    return any(p.stat().st_mtime > moment for p in state_files(db))


@pytest.mark.slow
@pytest.mark.parametrize("execution", ["", "execution: {fuse: 4}\n", "execution: {save_state_every: 0}\n"],
                         ids=["one-at-a-time", "fused", "saved-states"])
def test_twenty_random_kills_lose_and_duplicate_nothing(tmp_path, execution, fork_server):
    """Fused: a kill during a group leaves its claimed trials to be re-run on resume, nothing half-written. Saved
    states (a trial's training state saved at every step): a killed trial continues from its last one. Every
    way, each trial ends with what the same study records uninterrupted. The runs are forked from a fork server
    (tests/reliability/forkserver.py): real processes, killed with SIGKILL, that start at the command line with
    the imports already paid."""
    rng = random.Random(20261123)
    env = cli_env(tmp_path)
    steps = 8 if "save_state_every" in execution else 4  # long enough for a kill to land mid-trial, after a save
    reference_db = tmp_path / "reference.db"
    run_study(load_study(write_study(tmp_path / "reference.yaml", name="reference", steps=steps, seeds=4,
                                     extra=execution)), reference_db)
    reference = by_cell(reference_db)
    kills, rounds, runs, resumable = 0, 0, 0, 0
    while kills < KILLS:
        rounds += 1  # one store per round; a new round starts when a study finishes before the kills are done
        spec = write_study(tmp_path / f"s{rounds}.yaml", name=f"stress{rounds}", steps=steps, seeds=4,
                           extra=execution)
        db = tmp_path / f"s{rounds}.db"
        seen: dict[str, str] = {}
        while True:
            before, started = attempts(db), time.time()
            proc = start_run(spec, db, env, server=fork_server)
            runs += 1
            # Wait until this run has claimed a trial (past imports and set-up), then kill it at a random moment:
            # inside training, around record_outcome, or in the next claim.
            assert wait_for(lambda b=before, p=proc, d=db: attempts(d) > b or p.poll() is not None), "no trial claimed"
            if "save_state_every" in execution and runs % 2:
                # Every other run waits for a save first: on a slow or busy machine (CI) the model's set-up alone can
                # outlast the random delay, and then no kill would ever test continuing from a saved state.
                wait_for(lambda p=proc, d=db, t=started: saved_since(d, t) or p.poll() is not None)
            if proc.poll() is None:
                time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait()
            assert proc.returncode in (0, -9), f"run exited with {proc.returncode}"
            resumable += proc.returncode == -9 and saved_states(db) > 0
            now = snapshot(db)
            changed = [tid for tid, result in seen.items() if now.get(tid) != result]
            assert not changed, f"finished trials changed or vanished after a kill: {changed}"
            seen = now
            if proc.returncode == 0 or kills >= KILLS:
                break
        summary = run_study(load_study(spec), db)  # resume: re-runs what the last kill interrupted
        assert summary.failed == 0
        with Store(db) as store:
            trials = store.trials(store.study().id)
            assert [t.status for t in trials] == ["done"] * 12
            assert all(t.completions == 1 for t in trials), [(t.id, t.completions) for t in trials]
            assert "fuse" not in execution or any(t.outcome.fused_with for t in trials)  # groups really fused
            assert store.integrity_check() == "ok"
        final = snapshot(db)
        assert all(final[tid] == result for tid, result in seen.items())
        assert saved_states(db) == 0  # every state is dropped once its trial is done
        for cell, (loss, curve) in by_cell(db).items():  # as uninterrupted (1e-6: another process's threads)
            assert loss == pytest.approx(reference[cell][0], rel=1e-6), cell
            assert curve == pytest.approx(reference[cell][1], rel=1e-6), cell
    print(f"{kills} kills over {runs} runs and {rounds} store(s); {resumable} left a saved state to continue")
    assert kills >= KILLS
    assert resumable > 0 or "save_state_every" not in execution  # kills really landed after a save
