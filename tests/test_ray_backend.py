"""The Ray backend: trials (and fused groups) run as Ray tasks, outcomes recorded by the driver, the only writer.
One local Ray runtime serves the module's tests (its workers, once started, are reused: each would otherwise pay
Ray's start-up and a worker's torch import again)."""

import pytest

from loraplace.runner import RunHooks
from loraplace.store import Store
from loraplace.study import load_study, run_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


@pytest.fixture(scope="module")
def ray_runtime(tmp_path_factory):
    ray = pytest.importorskip("ray")
    cache = tmp_path_factory.mktemp("ray") / "cache"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"LORAPLACE_CACHE": str(cache)}})
    yield ray
    ray.shutdown()


def test_ray_backend_runs_the_same_hooks_and_records(tmp_path, write_study, ray_runtime):
    path = write_study(seeds=[0], steps=2)
    started, ended = [], []
    summary = run_study(load_study(path), tmp_path / "s.db", backend="ray",
                        hooks=RunHooks(on_start=lambda t, i, n: started.append((t.id, i, n)),
                                       on_end=lambda t, o: ended.append((t.id, o.status))))
    assert ray_runtime.is_initialized()  # the backend used the running runtime and left it running
    assert (summary.ran, summary.done) == (2, 2)
    assert sorted(i for _, i, _ in started) == [1, 2] and {n for _, _, n in started} == {2}
    assert sorted(ended) == sorted((tid, "done") for tid, _, _ in started)
    with Store(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
        assert all(t.status == "done" and t.metrics.eval_loss > 0 and t.outcome.sites is not None for t in trials)


def test_the_ray_backend_runs_a_fused_group_as_one_task(tmp_path, ray_runtime):
    from helpers import tiny_study_yaml

    (tmp_path / "s.yaml").write_text(tiny_study_yaml("rayfz", steps=2, extra="execution: {fuse: 4}\n"))
    summary = run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db", backend="ray")
    assert (summary.ran, summary.done) == (4, 4)
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
    assert all(t.status == "done" and t.completions == 1 and t.outcome.fused_with == 3 for t in trials)
