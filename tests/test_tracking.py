"""tracking: a study's trials as MLflow runs (read back with MLflow's own client) and TensorBoard event files."""

import pytest

from helpers import tiny_study_yaml
from loraplace.store import Store
from loraplace.study import load_study, run_study

pytestmark = pytest.mark.usefixtures("isolated_cache")
mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (make test installs it)")
pytest.importorskip("tensorboard", reason="the tensorboard extra (make test installs it)")


def _run(tmp_path, tracking: str):
    spec = tmp_path / "spec.yaml"
    spec.write_text(tiny_study_yaml("tracked", steps=3, extra=f"tracking: {tracking}\n"))
    summary = run_study(load_study(spec), tmp_path / "s.db")
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
    return summary, trials


def test_every_trial_is_an_mlflow_run_and_a_tensorboard_run(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary, trials = _run(tmp_path, f"{{mlflow: {{tracking_uri: '{uri}', experiment: exp}}, "
                                     f"tensorboard: {{dir: '{tmp_path}/tb'}}}}")
    assert summary.done == len(trials) == 4 and not summary.warnings
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("loraplace.kind") == "study"]
    children = {r.data.tags["loraplace.trial_id"]: r for r in runs if r.data.tags.get("loraplace.kind") == "trial"}
    assert len(parents) == 1 and set(children) == {t.id for t in trials}
    for trial in trials:
        run = children[trial.id]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["placement"] == trial.labels.group.placement
        assert run.data.tags["seed"] == str(trial.labels.seed) and run.info.status == "FINISHED"
        assert float(run.data.params["train.lr"]) == trial.spec["train"]["lr"]
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
            [(p.step, pytest.approx(p.loss)) for p in trial.outcome.curve]
        assert run.data.metrics["eval_loss"] == pytest.approx(trial.outcome.metrics.eval_loss)
        if trial.outcome.adapter is not None:
            assert any(a.path == "adapter/adapter_config.json"
                       for a in client.list_artifacts(run.info.run_id, "adapter"))
        # TensorBoard: the same curve, read back from the event files.
        tb_dir = next((tmp_path / "tb" / "tracked").glob(f"*_{trial.id[:8]}"))
        events = EventAccumulator(str(tb_dir))
        events.Reload()
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == \
            [(p.step, pytest.approx(p.loss)) for p in trial.outcome.curve]
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not ./mlruns wherever the test ran
    # A resumed run finds its parent run again instead of making a second one.
    run_study(load_study(tmp_path / "spec.yaml"), tmp_path / "s.db")
    again = client.search_runs([experiment.experiment_id], filter_string="tags.`loraplace.kind` = 'study'")
    assert len(again) == 1


def test_a_broken_tracker_warns_and_loses_nothing(tmp_path, monkeypatch):
    """A tracker that fails mid-run (the server went away, a disk filled): a warning, every trial still stored."""
    from loraplace.tracking import Tracker

    def broken(*_args, **_kw):
        raise RuntimeError("the tracking server went away")

    monkeypatch.setattr(Tracker, "_mlflow_trial", broken)
    summary, trials = _run(tmp_path, f"{{mlflow: {{tracking_uri: 'sqlite:///{tmp_path}/mlflow.db'}}}}")
    assert summary.done == 4 and all(t.status == "done" for t in trials)
    assert any("mlflow tracking failed" in w and "went away" in w for w in summary.warnings)


@pytest.mark.parametrize(("tracking", "message"), [
    ("{mlflow: {tracking_uri: 'http://127.0.0.1:9'}}", "the server does not answer (127.0.0.1:9"),
    ("{mlflow: {tracking_uri: 'sqlite:///TMP/a-file/mlflow.db'}}", "folder TMP/a-file is a file, not a folder"),
    ("{tensorboard: {dir: 'TMP/a-file/runs/tb'}}", "tracking.tensorboard.dir: TMP/a-file is a file, not a folder"),
    ("{mlflow: {tracking_uri: 'gopher://x'}}", "unknown scheme 'gopher'"),
    ("{tensorboard: {dir: 'TMP/a-file'}}", "tracking.tensorboard.dir: TMP/a-file is a file"),
])
def test_tracking_that_cannot_work_is_refused_before_any_trial(tmp_path, tracking, message):
    """An unreachable server, a store or event folder that cannot be written, an unknown scheme: one error within
    seconds, before the store exists — not minutes of retries, nor a warning after every trial has run."""
    import time

    from loraplace.errors import ConfigError

    (tmp_path / "a-file").write_text("not a directory")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="tracking cannot work") as info:
        _run(tmp_path, tracking.replace("TMP", str(tmp_path)))
    assert message.replace("TMP", str(tmp_path)) in str(info.value)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("target", ["not-a-database", "deleted-experiment"])
def test_an_mlflow_target_that_cannot_open_is_refused_before_the_store(tmp_path, target):
    """What passes the up-front checks but can only fail (a file that is not an SQLite database; an experiment
    deleted in MLflow) is refused before the store exists, naming the experiment and URI — not found after the
    first trial and switched off for the rest of the study."""
    from mlflow.tracking import MlflowClient

    from loraplace.errors import ConfigError

    if target == "not-a-database":
        (tmp_path / "runs.db").write_text("these are my notes, not an MLflow database\n" * 50)
        before = (tmp_path / "runs.db").read_bytes()
    else:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/runs.db")
        client.delete_experiment(client.create_experiment("exp"))
    with pytest.raises(ConfigError, match="tracking cannot work") as info:
        _run(tmp_path, f"{{mlflow: {{tracking_uri: 'sqlite:///{tmp_path}/runs.db', experiment: exp}}}}")
    assert f"tracking.mlflow: experiment 'exp' at 'sqlite:///{tmp_path}/runs.db' cannot be opened" in str(info.value)
    assert not (tmp_path / "s.db").exists()
    if target == "not-a-database":
        assert (tmp_path / "runs.db").read_bytes() == before


def test_train_command_tracks_its_trial(cli, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    result = cli("train", "--model", "tiny:llama", "--data", "builtin:arithmetic?n=40", "--steps", "3",
                 "--batch", "4", "--precision", "fp32", "--placement", "attn", "--rank", "2", "--quiet",
                 "--mlflow-uri", uri, "--tensorboard-dir", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("loraplace").experiment_id],
                              filter_string="tags.`loraplace.kind` = 'trial'")
    assert len(runs) == 1 and runs[0].data.tags["placement"] == "attn"
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 3
    assert list((tmp_path / "tb" / "train").iterdir())


def _wandb_records(run_file):
    """The records of an offline W&B run file (``run-ID.wandb``): W&B's header, then LevelDB-log records of
    ``wandb_internal_pb2.Record`` (read here because the W&B SDK no longer ships a reader for them)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block, pos = run_file.read_bytes(), 32768, 7  # ':W&B', a 2-byte magic, a version byte
    assert raw.startswith(b":W&B")
    out, pending = [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def test_every_trial_is_a_wandb_run(tmp_path, monkeypatch):
    """Offline W&B (no network): one run per trial, grouped by the study, its curve by step, its final metrics in
    the summary — read back from the run files."""
    pytest.importorskip("wandb", reason="the wandb extra (make test installs it)")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary, trials = _run(tmp_path, f"{{wandb: {{project: loraplace-test, mode: offline, dir: '{tmp_path}/wb'}}}}")
    assert summary.done == 4 and not summary.warnings
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 4
    seen = {}
    for run_file in runs:
        records = _wandb_records(run_file)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == "tracked" and run.project == "loraplace-test"
        def key(item):  # a key with "/" is stored as its nested_key
            return item.key or "/".join(item.nested_key)

        history = [values for r in records if r.WhichOneof("record_type") == "history"
                   for values in [{key(i): float(i.value_json) for i in r.history.item
                                   if key(i) in ("_step", "train/loss")}] if "train/loss" in values]
        final = {key(i): i.value_json for r in records if r.WhichOneof("record_type") == "summary"
                 for i in r.summary.update if key(i)}
        seen[final["trial_id"].strip('"')] = (run.display_name, history, float(final["final/eval_loss"]))
    for trial in trials:
        name, history, eval_loss = seen[trial.id]
        assert name == f"{trial.labels.group.label} seed={trial.labels.seed}"
        assert [(h["_step"], pytest.approx(h["train/loss"])) for h in history] == \
            [(p.step, pytest.approx(p.loss)) for p in trial.outcome.curve]
        assert eval_loss == pytest.approx(trial.outcome.metrics.eval_loss)


def test_wandb_online_without_a_login_is_refused_up_front(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (make test installs it)")
    from loraplace.errors import ConfigError

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="online mode needs a W&B login"):
        _run(tmp_path, "{wandb: {project: p}}")
    assert not (tmp_path / "s.db").exists()
