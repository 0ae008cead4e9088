"""The Ray backend: warm workers (Ray actors holding the base) run trials, fused groups and a search's rung runs;
outcomes are recorded by the driver, the only writer. One local Ray runtime with two CPUs (so two workers) serves
the module's tests."""

import pytest

from loraplace.runner import RunHooks
from loraplace.store import Store
from loraplace.study import load_study, run_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


def test_an_unreachable_cluster_is_one_error_and_no_store(tmp_path):
    """--address that answers nothing: one clear error within seconds (Ray's client would retry for minutes),
    before the store exists, and no Ray runtime left started."""
    import time

    from loraplace.errors import LoraplaceError
    from loraplace.ray_backend import check_cluster

    ray = pytest.importorskip("ray")
    running = ray.is_initialized()  # another test's runtime (test processes share modules): left as it was
    t0 = time.perf_counter()
    with pytest.raises(LoraplaceError, match="no Ray cluster could be reached"):
        check_cluster("127.0.0.1:9", tmp_path / "s_artifacts", cpus=1, gpus=0)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "s_artifacts").exists() and ray.is_initialized() == running


@pytest.fixture(scope="module")
def ray_runtime(tmp_path_factory):
    ray = pytest.importorskip("ray")
    cache = tmp_path_factory.mktemp("ray") / "cache"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"LORAPLACE_CACHE": str(cache)}})
    yield ray
    ray.shutdown()


def test_the_ray_backend_runs_a_fused_group_on_one_worker(tmp_path, ray_runtime):
    from helpers import tiny_study_yaml

    (tmp_path / "s.yaml").write_text(tiny_study_yaml("rayfz", steps=2, extra="execution: {fuse: 4}\n"))
    summary = run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db", backend="ray")
    assert (summary.ran, summary.done) == (4, 4)
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
    assert all(t.status == "done" and t.completions == 1 and t.outcome.fused_with == 3 for t in trials)


def _run_in_thread(spec, db, **kwargs):
    """run_study in a thread (the test kills a worker meanwhile); its result or exception in the returned dict."""
    import threading

    box: dict = {}

    def target():
        try:
            box["summary"] = run_study(load_study(spec), db, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _kill_worker(ray, index: int = 0) -> int:
    import os
    import signal

    from loraplace.ray_backend import worker_name

    pid = ray.get(ray.get_actor(worker_name(index)).pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def _search_yaml(name: str) -> str:
    from helpers import tiny_study_yaml

    spec = tiny_study_yaml(name, steps=6, seeds=[0, 1], baseline=None, n=80,
                           extra="tune: {lr: [1.0e-4, 1.0e-2]}\nsearch: {eta: 2}\n")
    return spec.replace("eval_count: 8,", "eval_count: 8, validation_count: 8,")


def _search_record(db):
    with Store.open_readonly(db) as store:
        sid = store.study().id
        decisions = [(d.rung, d.ranked, d.kept) for d in store.rung_decisions(sid)]
        losses = {(r.candidate, r.rung): r.val_loss for r in store.rung_results(sid)}
        finals = {t.id: t.metrics.eval_loss for t in store.trials(sid) if t.status == "done"}
    return decisions, losses, finals


def test_a_search_on_ray_decides_and_answers_as_on_the_local_backend_even_when_a_worker_dies(tmp_path, ray_runtime):
    """The rungs' candidates spread over two warm workers, and one worker's process is SIGKILLed mid-search: Ray
    restarts it, the call is retried from the candidate's previous rung state, and the decisions, rung losses and
    finalists' test losses still equal the local backend's. (A search on Ray without a kill runs the same calls
    minus the retry: the retry is the harder case, so it is the one run here.)"""
    import time

    (tmp_path / "s.yaml").write_text(_search_yaml("raysearch"))
    run_study(load_study(tmp_path / "s.yaml"), tmp_path / "local.db")
    local = _search_record(tmp_path / "local.db")
    assert local[0] and local[2]

    thread, box = _run_in_thread(tmp_path / "s.yaml", tmp_path / "killed.db", backend="ray")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (tmp_path / "killed.db").exists():
        time.sleep(0.2)
    killed = None
    while time.monotonic() < deadline and killed is None and thread.is_alive():
        try:
            with Store.open_readonly(tmp_path / "killed.db") as store:
                started = bool(store.rung_results(store.study().id))
        except Exception:  # noqa: BLE001 - the store is being created
            started = False
        if started:
            killed = _kill_worker(ray_runtime)
        time.sleep(0.1)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert killed is not None, "the search ended before a worker could be killed"
    assert "warm Ray worker" in (box["summary"].execution or "")
    after = _search_record(tmp_path / "killed.db")
    assert after[0] == local[0]
    assert after[1] == pytest.approx(local[1], rel=1e-6) and after[2] == pytest.approx(local[2], rel=1e-6)


def test_a_killed_worker_s_trial_continues_from_its_saved_state(tmp_path, ray_runtime):
    """A plain study saving states every step: a worker killed mid-trial is restarted and its trial continues from
    the last saved state; every trial ends with the losses of an uninterrupted local run, recorded once. The
    driver runs the same hooks as the local backend (each trial started and ended once, the retry unseen), and
    leaves a Ray runtime it did not start running."""
    import time

    from helpers import tiny_study_yaml
    from loraplace.store import STATE_DIR, artifacts_dir

    (tmp_path / "s.yaml").write_text(tiny_study_yaml("raystate", steps=20, seeds=[0],
                                                     extra="execution: {save_state_every: 0}\n"))
    run_study(load_study(tmp_path / "s.yaml"), tmp_path / "local.db")
    started, ended = [], []
    hooks = RunHooks(on_start=lambda t, i, n: started.append((t.id, i, n)),
                     on_end=lambda t, o: ended.append((t.id, o.status)))
    thread, box = _run_in_thread(tmp_path / "s.yaml", tmp_path / "ray.db", backend="ray", hooks=hooks)
    deadline, killed = time.monotonic() + 240, None
    while time.monotonic() < deadline and killed is None and thread.is_alive():
        if list(artifacts_dir(tmp_path / "ray.db").glob(f"*/{STATE_DIR}/*.pt")):
            killed = _kill_worker(ray_runtime)
        time.sleep(0.05)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert killed is not None, "no trial saved a state before the study ended"
    assert ray_runtime.is_initialized()  # the backend used the running runtime and left it running
    assert (box["summary"].ran, box["summary"].done) == (2, 2)
    assert sorted(i for _, i, _ in started) == [1, 2] and {n for _, _, n in started} == {2}
    assert sorted(ended) == sorted((tid, "done") for tid, _, _ in started)

    def losses(db):
        with Store.open_readonly(db) as store:
            trials = store.trials(store.study().id)
            assert all(t.status == "done" and t.completions == 1 for t in trials)
            return {t.id: (t.metrics.eval_loss, [p.loss for p in t.outcome.curve]) for t in trials}

    with Store.open_readonly(tmp_path / "ray.db") as store:
        assert all(t.outcome.sites is not None for t in store.trials(store.study().id))
    local, remote = losses(tmp_path / "local.db"), losses(tmp_path / "ray.db")
    assert remote.keys() == local.keys()
    for tid, (loss, curve) in remote.items():
        assert loss == pytest.approx(local[tid][0], rel=1e-6) and curve == pytest.approx(local[tid][1], rel=1e-6)
