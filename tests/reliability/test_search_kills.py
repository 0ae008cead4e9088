"""Kill stress on a placement search: SIGKILL a search in the middle of its rungs (and of its finalists), resume
each time; it must take the same decisions and give the same answer as the same search run uninterrupted, keep
the store intact, and train no step twice beyond what its saved states allow."""

import random
import time

import pytest
from reliability_helpers import cli_env, start_run, wait_for

from helpers import tiny_study_yaml
from loraplace.analysis.recommend import recommend_from_store
from loraplace.store import Store
from loraplace.study import load_study, run_study

KILLS = 12


def search_spec(path, name: str):
    text = tiny_study_yaml(name, placements={"all": "{preset: all}", "attn": "{preset: attn}",
                                             "mlp": "{preset: mlp}", "q": "{roles: [attn.q, attn.v]}"},
                           steps=9, seeds=[0, 1], n=80, baseline=None,
                           extra="tune: {lr: [1.0e-3, 1.0e-2]}\nsearch: {eta: 2, rungs: [2, 5]}\n")
    path.write_text(text.replace("eval_count: 8,", "eval_count: 8, validation_count: 8,"))
    return path


def progress(db) -> int:
    """Rung results + trial claims so far: grows whenever the search gets anywhere."""
    if not db.exists():
        return 0
    try:
        with Store.open_readonly(db) as store:
            study = store.study()
            return len(store.rung_results(study.id)) + sum(t.attempts for t in store.trials(study.id))
    except Exception:  # noqa: BLE001 - mid-creation: not a store yet
        return 0


def recorded(db):
    with Store.open_readonly(db) as store:
        study = store.study()
        results = {(r.candidate, r.rung): r for r in store.rung_results(study.id)}
        decisions = store.rung_decisions(study.id)
        trials = {t.id: t for t in store.trials(study.id)}
    return results, decisions, trials


@pytest.mark.slow
def test_a_killed_search_decides_and_answers_as_an_uninterrupted_one(tmp_path, fork_server, monkeypatch):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    reference = tmp_path / "reference.db"
    run_study(load_study(search_spec(tmp_path / "reference.yaml", "search")), reference)
    rng = random.Random(20261202)
    env = cli_env(tmp_path)
    ref_results, ref_decisions, ref_trials = recorded(reference)
    ref_choice = recommend_from_store(str(reference)).chosen
    kills = runs = rounds = 0
    while kills < KILLS:  # a new store (round) whenever a search finishes before the kills are done
        rounds += 1
        spec = search_spec(tmp_path / f"stress{rounds}.yaml", "search")
        db = tmp_path / f"stress{rounds}.db"
        while True:
            before = progress(db)
            proc = start_run(spec, db, env, server=fork_server)
            runs += 1
            assert wait_for(lambda b=before, p=proc, d=db: progress(d) > b or p.poll() is not None), "no progress"
            if proc.poll() is None and kills < KILLS:
                time.sleep(rng.uniform(0.0, 1.2))  # inside a rung's training or eval, or a finalist's
                if proc.poll() is None:
                    proc.kill()
                    kills += 1
            proc.wait()
            assert proc.returncode in (0, -9), f"run exited with {proc.returncode}"
            if proc.returncode == 0:
                break
        results, decisions, trials = recorded(db)
        assert decisions == ref_decisions  # the same rungs, rankings, kept and cut
        assert results.keys() == ref_results.keys()
        for key, r in results.items():  # the same losses: each rung continued the same state
            assert r.val_loss == pytest.approx(ref_results[key].val_loss, abs=1e-6), key
            # a rung's recorded steps run from the previous rung's saved state, whatever was redone after a kill
            assert r.trained_steps == ref_results[key].trained_steps, key
        assert trials.keys() == ref_trials.keys()
        for tid, t in trials.items():
            assert t.status == "done" and t.completions == 1
            assert [p.loss for p in t.outcome.curve] == pytest.approx(
                [p.loss for p in ref_trials[tid].outcome.curve], abs=1e-6)
            assert t.outcome.steps == ref_trials[tid].outcome.steps  # no step counted twice in a continued state
        with Store(db) as store:
            assert store.integrity_check() == "ok"
        ours = recommend_from_store(str(db)).chosen
        assert (ours.placement, ours.lr) == (ref_choice.placement, ref_choice.lr)
    print(f"{kills} kills over {runs} runs and {rounds} search(es)")
