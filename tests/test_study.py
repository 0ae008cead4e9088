import subprocess
import sys
from pathlib import Path

import pytest

from loraplace.errors import ConfigError
from loraplace.store import Store
from loraplace.study import expand_grid, load_study, run_study

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

TINY = """\
name: tiny
model: tiny:llama
data: {train: "builtin:arithmetic?n=60", eval_count: 8, max_len: 160}
train: {steps: STEPS, batch: 4, lr: 1.0e-3, precision: fp32}
placements:
  all: {roles: [all]}
  attn: {roles: [attn]}
ranks: [4]
seeds: [0, 1]
baseline: all
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))


def tiny_spec(tmp_path, steps=3, extra=""):
    path = tmp_path / "study.yaml"
    path.write_text(TINY.replace("STEPS", str(steps)) + extra)
    return path


def test_every_shipped_yaml_validates():
    assert {p.name for p in EXAMPLES} >= {"quickstart.yaml", "seed-study-gpt2-medium.yaml", "gsm8k.yaml"}
    for path in EXAMPLES:
        study = load_study(path)
        grid = expand_grid(study)
        assert len(grid) == len(study.placements) * len(study.sizes()) * len(study.seeds)
        assert len({t.id for t in grid}) == len(grid)
        if study.baseline:
            assert study.baseline in study.placements


def test_trial_ids_are_stable_and_config_sensitive(tmp_path):
    a = expand_grid(load_study(tiny_spec(tmp_path)))
    b = expand_grid(load_study(tiny_spec(tmp_path)))
    assert [t.id for t in a] == [t.id for t in b]
    c = expand_grid(load_study(tiny_spec(tmp_path, steps=4)))
    assert not {t.id for t in a} & {t.id for t in c}


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        (TINY.replace("STEPS", "3").replace("seeds:", "seedz:"), ["seedz: unknown key; did you mean 'seeds'?"]),
        (TINY.replace("STEPS", "3").replace("lr: 1.0e-3", "lr: fast").replace("ranks: [4]", "ranks: [-1]")
         .replace("baseline: all", "baseline: nope"),
         ["3 problems", "train.lr", "ranks.0: Input should be greater than 0", "baseline 'nope'"]),
        ("name: x\nmodel: [unclosed\n", ["study.yaml:3:1", "YAML syntax error"]),
        (TINY.replace("STEPS", "3").replace("roles: [attn]", "rolez: [attn]"),
         ["placements.attn.rolez: unknown key; did you mean 'roles'?"]),
    ],
)
def test_bad_specs_report_everything_and_write_nothing(tmp_path, text, messages):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_study(path)
    for message in messages:
        assert message in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "loraplace", "run", str(path), "--store", str(tmp_path / "s.db")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.db").exists()


def test_run_then_resume_does_no_training(tmp_path):
    spec = load_study(tiny_spec(tmp_path))
    first = run_study(spec, tmp_path / "s.db")
    assert (first.ran, first.done, first.failed) == (4, 4, 0)
    with Store(tmp_path / "s.db") as store:
        study = store.study("tiny")
        before = {t.id: t.metrics for t in store.trials(study.id)}
        assert all(t.status == "done" and t.completions == 1 for t in store.trials(study.id))
        assert all(Path(t.result["adapter_dir"]).is_dir() for t in store.trials(study.id))
    again = run_study(spec, tmp_path / "s.db")
    assert (again.ran, again.skipped) == (0, 4)
    with Store(tmp_path / "s.db") as store:
        assert {t.id: t.metrics for t in store.trials(study.id)} == before


def test_a_failing_trial_does_not_stop_the_study(tmp_path):
    # tiny llama, per rank: attn = 2 layers × (128+96+96+128) = 896; all = 896 + 2 × 3 × 192 = 2048.
    # Budget 1000 fits rank 1 for attn but not for all → that trial fails, the other one runs.
    text = TINY.replace("STEPS", "2").replace("ranks: [4]", "budget: 1000").replace("seeds: [0, 1]", "seeds: [0]")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    summary = run_study(load_study(path), tmp_path / "s.db")
    with Store(tmp_path / "s.db") as store:
        trials = {t.config["labels"]["placement"]: t for t in store.trials(store.study().id)}
    assert trials["all"].status == "failed" and "smaller than rank 1" in trials["all"].error
    assert trials["attn"].status == "done"
    assert (summary.done, summary.failed) == (1, 1)


def test_ray_backend_two_trials(tmp_path):
    ray = pytest.importorskip("ray")
    text = TINY.replace("STEPS", "2").replace("seeds: [0, 1]", "seeds: [0]")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"LORAPLACE_CACHE": str(tmp_path / "cache")}})
    try:
        summary = run_study(load_study(path), tmp_path / "s.db", backend="ray")
    finally:
        ray.shutdown()
    assert (summary.ran, summary.done) == (2, 2)
    with Store(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
        assert all(t.status == "done" and t.metrics["eval_loss"] > 0 for t in trials)
