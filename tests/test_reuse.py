"""`loraplace run --reuse-from OTHER.db`: finished trials of the same id are taken over, not trained again."""

import shutil
from pathlib import Path

import pytest

from helpers import tiny_study_yaml
from loraplace.analysis import analyze_store
from loraplace.runner import RunHooks
from loraplace.store import Store, artifacts_dir
from loraplace.study import load_study, run_study

pytestmark = pytest.mark.usefixtures("isolated_cache")

TUNED = "tune: {lr: [1.0e-3, 3.0e-3], seeds: [0]}\n"


def _spec(tmp_path: Path, name: str, placements: dict[str, str], tune: bool = True) -> Path:
    text = tiny_study_yaml(name, steps=2, seeds=[0, 1], placements=placements).replace(
        "eval_count: 8", "eval_count: 8, validation_count: 8")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + (TUNED if tune else ""))
    return path


def _done(store_path: Path, name: str) -> dict[str, object]:
    with Store.open_readonly(store_path) as store:
        return {t.id: t.outcome for t in store.trials(store.study(name).id) if t.status == "done"}


def test_a_new_study_takes_over_the_trials_another_store_finished(tmp_path):
    """A tuned study of `all` (its LR pass and its other seed) in one store; a second study — another name, `all`
    and a new arm — in another store reuses every `all` trial (the other seed's too, added once the selection is
    made from the reused trials) and trains only the new arm. The copies keep every measurement, point at their
    own adapter, say where they came from, and the report says so."""
    first = run_study(load_study(_spec(tmp_path, "first", {"all": "{preset: all}"})), tmp_path / "a.db")
    assert first.done == 3  # 2 LRs on seed 0, then seed 1 at the selected LR
    source = _done(tmp_path / "a.db", "first")
    notes = []
    second = run_study(load_study(_spec(tmp_path, "second", {"all": "{preset: all}", "mlp": "{preset: mlp}"})),
                       tmp_path / "b.db", reuse_from=[tmp_path / "a.db"], hooks=RunHooks(on_note=notes.append))
    assert (second.reused, second.ran, second.done) == (3, 3, 3)  # only mlp's 3 trials trained
    assert notes == [f"reused 2 finished trials from {tmp_path / 'a.db'}",
                     f"reused 1 finished trial from {tmp_path / 'a.db'}"]  # the LR pass, then the other seed
    taken = _done(tmp_path / "b.db", "second")
    assert set(source) < set(taken)
    for trial_id, outcome in source.items():
        copy = taken[trial_id]
        assert copy.metrics == outcome.metrics and copy.curve == outcome.curve and copy.sites == outcome.sites
        assert copy.reused_from == str(tmp_path / "a.db") and outcome.reused_from is None
        assert Path(copy.adapter.path).parent == artifacts_dir(tmp_path / "b.db") / trial_id
        assert (Path(copy.adapter.path) / "adapter_model.safetensors").read_bytes() == (
            Path(outcome.adapter.path) / "adapter_model.safetensors").read_bytes()
    assert all(taken[i].reused_from is None for i in set(taken) - set(source))
    assert any("taken over from other stores" in w and f"3 from {tmp_path / 'a.db'}" in w
               for w in analyze_store(tmp_path / "b.db", "second").warnings)
    # Nothing left to take over: a rerun trains nothing and reuses nothing.
    again = run_study(load_study(tmp_path / "second.yaml"), tmp_path / "b.db", reuse_from=[tmp_path / "a.db"])
    assert (again.reused, again.ran, again.skipped) == (0, 0, 6)


def test_a_source_without_its_files_gives_outcomes_without_adapters(tmp_path):
    """A committed store travels without its `_artifacts` (they are git-ignored): its trials are still taken over
    — the losses are the point — with the missing adapter said, not pointed at."""
    run_study(load_study(_spec(tmp_path, "first", {"all": "{preset: all}"}, tune=False)), tmp_path / "a.db")
    shutil.rmtree(artifacts_dir(tmp_path / "a.db"))
    summary = run_study(load_study(tmp_path / "first.yaml"), tmp_path / "b.db", reuse_from=[tmp_path / "a.db"])
    assert (summary.reused, summary.ran) == (2, 0)
    assert all(o.adapter is None for o in _done(tmp_path / "b.db", "first").values())
    assert sum("is not on disk; reused without one" in w for w in summary.warnings) == 2


def test_trials_that_ran_in_another_precision_under_auto_are_trained_here(tmp_path, monkeypatch):
    """precision: auto resolves per machine kind: a trial the source ran in bf16 is not what auto means on an fp32
    machine, so it is trained here (with a warning) rather than mixed in; pinned precisions are in the id."""
    import loraplace.train

    text = tiny_study_yaml("p", steps=1, seeds=[0], placements={"all": "{preset: all}"}).replace(
        "precision: fp32", "precision: auto")
    (tmp_path / "p.yaml").write_text(text)
    monkeypatch.setattr(loraplace.train, "cpu_has_bf16", lambda: True)  # the source's machine: bf16
    run_study(load_study(tmp_path / "p.yaml"), tmp_path / "a.db")
    monkeypatch.setattr(loraplace.train, "cpu_has_bf16", lambda: False)  # this one: fp32
    summary = run_study(load_study(tmp_path / "p.yaml"), tmp_path / "b.db", reuse_from=[tmp_path / "a.db"])
    assert (summary.reused, summary.ran, summary.done) == (0, 1, 1)
    assert any("ran in bfloat16 under precision: auto, which is float32 here" in w for w in summary.warnings)
    assert [o.environment.dtype for o in _done(tmp_path / "b.db", "p").values()] == ["float32"]


def test_bad_sources_are_refused_before_anything_is_written(tmp_path, cli):
    spec = _spec(tmp_path, "first", {"all": "{preset: all}"}, tune=False)
    (tmp_path / "notes.txt").write_text("not a store")
    for source, said in ((tmp_path / "missing.db", "no such file"), (tmp_path / "notes.txt", "not a loraplace"),
                         (tmp_path / "s.db", "is the store being run")):
        if source.name == "s.db":
            source.write_bytes(b"")  # the store named by --store itself
        result = cli("run", spec, "--store", tmp_path / "s.db", "--reuse-from", source, "-q")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert said in " ".join(result.stderr.split()), result.stderr
    assert not artifacts_dir(tmp_path / "s.db").exists()


def test_the_cli_says_how_many_trials_it_reused(tmp_path, cli):
    spec = _spec(tmp_path, "first", {"all": "{preset: all}"}, tune=False)
    assert cli("run", spec, "--store", tmp_path / "a.db", "-q").returncode == 0
    result = cli("run", spec, "--store", tmp_path / "b.db", "--reuse-from", tmp_path / "a.db")
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "ran 0 trial(s): 0 done, 0 failed; 0 already done; 2 reused from another store" in said
