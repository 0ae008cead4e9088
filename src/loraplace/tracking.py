"""A study's trials where people already look: MLflow runs, TensorBoard event files and W&B runs.

The contract: tracking happens on the driver, after the store has recorded a trial's outcome, from that outcome
(its curve, evals, metrics, adapter), so every backend (local, Ray) is tracked alike and nothing a tracker does can
fail a trial or lose store data — every tracker error becomes a warning, and a tracker that failed once is switched
off for the rest of the run. What can be checked or opened before the first trial is, and refused when it fails
(``check_tracking``; MLflow's experiment and parent run, opened by ``Tracker`` before the store is written).

MLflow: one parent run per study (found again by its tags on resume), one child run per
trial with its resolved config as params, per-step ``train_loss``/``lr``/``tokens``, ``eval_loss`` at each eval,
the final metrics, tags (placement, size, seed, study, trial id) and the adapter directory as an artifact.
TensorBoard: one event-file directory per trial under ``dir/STUDY/``, the same curves as scalars. Weights &
Biases: one run per trial in the project, grouped by study (``group``), the resolved trial spec as its config, the
same curves by step and the final metrics in its summary; ``mode: offline`` writes the runs locally for
``wandb sync``.

Each is an optional extra: ``pip install 'loraplace[mlflow]'`` / ``'loraplace[tensorboard]'`` /
``'loraplace[wandb]'``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from loraplace.errors import ConfigError
from loraplace.records import TrialLabels, TrialOutcome
from loraplace.specs import StrictModel

MLFLOW_PARAM_CHARS = 500  # params longer than this are cut (MLflow's own limit varies by version and backend)


class MlflowSpec(StrictModel):
    tracking_uri: str = Field(description="e.g. sqlite:///mlflow.db, http://host:5000, databricks")
    experiment: str = Field(default="loraplace", min_length=1, description="experiment name (created if missing)")
    artifact_location: str | None = Field(
        default=None, description="where a new experiment keeps artifacts (adapters); default: beside a sqlite:/// "
        "database (DB_DIR/mlartifacts), else the server's own default")

    def experiment_artifacts(self) -> str | None:
        """A new experiment's artifact location. MLflow's own default for a database store is ./mlruns in the
        current directory, which scatters adapters wherever the command happened to run."""
        if self.artifact_location is not None:
            return self.artifact_location
        if self.tracking_uri.startswith("sqlite:///"):
            return (Path(self.tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        return None


class TensorBoardSpec(StrictModel):
    dir: str = Field(min_length=1, description="event files go to DIR/STUDY/TRIAL")


class WandbSpec(StrictModel):
    project: str = Field(min_length=1, description="W&B project (created if missing)")
    entity: str | None = Field(default=None, description="W&B team or user (default: your default entity)")
    mode: Literal["online", "offline"] | None = Field(
        default=None, description="offline: runs are written under dir for `wandb sync` later; default: W&B's own "
        "(WANDB_MODE, else online)")
    dir: str | None = Field(default=None, description="where W&B's wandb/ run folders go (default: W&B's own)")

    def resolved_mode(self) -> str:
        return self.mode or os.environ.get("WANDB_MODE", "online")


class TrackingSpec(StrictModel):
    """``tracking:`` in a study spec (and ``--mlflow-uri``/``--tensorboard-dir``/``--wandb-project`` on
    ``train``)."""

    mlflow: MlflowSpec | None = Field(default=None, description="MLflow: a parent run per study, a child run per "
                                      "trial")
    tensorboard: TensorBoardSpec | None = Field(default=None, description="TensorBoard: event files per trial "
                                                "under dir/STUDY/")
    wandb: WandbSpec | None = Field(default=None, description="Weights & Biases: one run per trial, grouped by study")


REACH_TIMEOUT_S = 3.0  # a tracking server that does not answer a TCP connect in this long is refused up front
MLFLOW_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def check_tracking(spec: TrackingSpec) -> None:
    """Before anything runs, one error naming every problem: the extras a spec asks for are installed, an MLflow
    server answers (a TCP connect within ``REACH_TIMEOUT_S``; MLflow's own client would retry for minutes), a
    ``sqlite:///`` or file store's folder and a TensorBoard directory can be written."""
    problems = []
    if spec.mlflow is not None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            problems.append("tracking.mlflow needs MLflow: pip install 'loraplace[mlflow]'")
        problems += _mlflow_uri_problems(spec.mlflow.tracking_uri)
    if spec.tensorboard is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            problems.append("tracking.tensorboard needs TensorBoard: pip install 'loraplace[tensorboard]'")
        problem = _unwritable_dir(Path(spec.tensorboard.dir))
        if problem:
            problems.append(f"tracking.tensorboard.dir: {problem}")
    if spec.wandb is not None:
        problems += _wandb_problems(spec.wandb)
    if problems:
        raise ConfigError(problems, "tracking cannot work", "fix the tracking settings, or leave tracking out")


def _mlflow_uri_problems(uri: str) -> list[str]:
    import socket
    from urllib.parse import urlparse

    where = f"tracking.mlflow.tracking_uri {uri!r}"
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0].lower()
    if scheme == "" or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a plain path (or a Windows drive)
        problem = _unwritable_dir(Path(uri))
        return [f"{where}: {problem}"] if problem else []
    if scheme not in MLFLOW_SCHEMES:
        return [f"{where}: unknown scheme {parsed.scheme!r} (MLflow takes {', '.join(MLFLOW_SCHEMES)} or a path)"]
    if scheme in ("http", "https"):
        if not parsed.hostname:
            return [f"{where}: no host"]
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=REACH_TIMEOUT_S):
                return []
        except OSError as exc:
            return [f"{where}: the server does not answer ({parsed.hostname}:{port}: "
                    f"{exc.strerror or type(exc).__name__}, {REACH_TIMEOUT_S:g} s)"]
    if scheme == "sqlite":
        path = uri.removeprefix(f"{parsed.scheme}:///")
        problem = _unwritable_dir(Path(path).parent) if path and path != ":memory:" else None
        return [f"{where}: the database's folder {problem}"] if problem else []
    if scheme == "file":
        problem = _unwritable_dir(Path(parsed.path))
        return [f"{where}: {problem}"] if problem else []
    return []  # a database server or Databricks: MLflow's own client says what is wrong


def _wandb_problems(spec: WandbSpec) -> list[str]:
    import socket

    try:
        import wandb  # noqa: F401
    except ImportError:
        return ["tracking.wandb needs Weights & Biases: pip install 'loraplace[wandb]'"]
    problems = []
    if spec.dir is not None:
        problem = _unwritable_dir(Path(spec.dir))
        if problem:
            problems.append(f"tracking.wandb.dir: {problem}")
    if spec.resolved_mode() in ("offline", "disabled", "dryrun"):
        return problems
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text(
        errors="replace"))
    if not logged_in:
        problems.append("tracking.wandb: online mode needs a W&B login (`wandb login`, or WANDB_API_KEY); or set "
                        "mode: offline and `wandb sync` later")
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443),
                                 timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        problems.append(f"tracking.wandb: {host} does not answer ({exc.strerror or type(exc).__name__}, "
                        f"{REACH_TIMEOUT_S:g} s); set mode: offline to write runs locally and `wandb sync` later")
    return problems


def _unwritable_dir(path: Path) -> str | None:
    """Why files cannot be written in directory ``path`` (created if missing, as the tracker would), or None."""
    import tempfile

    from loraplace.paths import folder_problem

    if (problem := folder_problem(path)) is not None:  # notes.txt/tb: names the file in the way
        return problem
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".loraplace-write-check-"):
            pass
    except OSError as exc:
        return f"{path} cannot be written ({exc.strerror or type(exc).__name__})"
    return None


def _first_line(exc: Exception) -> str:
    """MLflow's and SQLAlchemy's messages run to many lines (SQL, background links): the first says what failed."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _flat(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        text = json.dumps(value) if not isinstance(value, str) else value
        out[prefix] = text if len(text) <= MLFLOW_PARAM_CHARS else text[:MLFLOW_PARAM_CHARS - 1] + "…"
    return out


def trial_run_name(labels: TrialLabels) -> str:
    return f"{labels.group.label} seed={labels.seed}"


class Tracker:
    """Logs finished trials to the configured trackers; see the module docstring for the contract."""

    def __init__(self, spec: TrackingSpec, study: str, study_spec: dict[str, Any] | None = None):
        """Opens what can be opened before any trial (MLflow's experiment and the study's parent run): a target
        that fails here can only fail later, so it is refused (``ConfigError``) instead of found after the first
        trial and switched off for the rest of the study."""
        self.spec, self.study = spec, study
        self.warnings: list[str] = []
        self._mlflow = None  # (client, experiment id, parent run id)
        if spec.mlflow is not None:
            try:
                self._open_mlflow(spec.mlflow, study_spec or {})
            except Exception as exc:  # noqa: BLE001 - whatever MLflow or its database raises, named for the user
                raise ConfigError([f"tracking.mlflow: experiment {spec.mlflow.experiment!r} at "
                                   f"{spec.mlflow.tracking_uri!r} cannot be opened: {type(exc).__name__}: "
                                   f"{_first_line(exc)}"], "tracking cannot work",
                                  "fix the tracking settings, or leave tracking out") from None

    # ----------------------------------------------------------------------------------------- plumbing

    def _guard(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a tracker never fails a trial; it warns and steps aside
            message = f"{name} tracking failed and is off for the rest of this run: {type(exc).__name__}: {exc}"
            self.warnings.append(message)  # the caller prints them (run's summary, train's output)
            if name == "mlflow":
                self._mlflow = None
            else:
                self.spec = self.spec.model_copy(update={name: None})

    def _open_mlflow(self, spec: MlflowSpec, study_spec: dict[str, Any]) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        # MLflow's and its database migrations' INFO lines are not the user's business on a study's stderr.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        client = MlflowClient(tracking_uri=spec.tracking_uri)
        experiment = client.get_experiment_by_name(spec.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            spec.experiment, artifact_location=spec.experiment_artifacts())
        found = client.search_runs([experiment_id], filter_string=f"tags.`loraplace.study` = '{self.study}' and "
                                   "tags.`loraplace.kind` = 'study'", max_results=1)
        if found:
            parent = found[0].info.run_id
        else:
            parent = client.create_run(experiment_id, run_name=self.study, tags={
                "loraplace.study": self.study, "loraplace.kind": "study"}).info.run_id
            client.log_text(parent, json.dumps(study_spec, indent=2, default=str), "study_spec.json")
        self._mlflow = (client, experiment_id, parent)

    # ----------------------------------------------------------------------------------------- logging

    def log_trial(self, trial_id: str, labels: TrialLabels, trial_spec: dict[str, Any],
                  outcome: TrialOutcome) -> None:
        if self._mlflow is not None:
            self._guard("mlflow", lambda: self._mlflow_trial(trial_id, labels, trial_spec, outcome))
        if self.spec.tensorboard is not None:
            self._guard("tensorboard", lambda: self._tensorboard_trial(trial_id, labels, trial_spec, outcome))
        if self.spec.wandb is not None:
            self._guard("wandb", lambda: self._wandb_trial(trial_id, labels, trial_spec, outcome))

    def _wandb_trial(self, trial_id: str, labels: TrialLabels, trial_spec: dict[str, Any],
                     outcome: TrialOutcome) -> None:
        import wandb

        spec = self.spec.wandb
        if spec.dir is not None:
            Path(spec.dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=spec.project, entity=spec.entity, group=self.study, job_type="trial",
                         name=trial_run_name(labels), config=trial_spec, dir=spec.dir, mode=spec.mode,
                         reinit="create_new", tags=[labels.group.placement, labels.group.size_label],
                         settings=wandb.Settings(silent=True, console="off"))
        try:
            by_step: dict[int, dict[str, float]] = {}  # W&B wants each step's values together, steps in order
            for point in outcome.curve:
                by_step.setdefault(point.step, {}).update({"train/loss": point.loss, "train/lr": point.lr,
                                                           "train/tokens": float(point.tokens)})
            for e in outcome.evals:
                by_step.setdefault(e.step, {})[f"{e.split}/loss_during_training"] = e.eval_loss
            for step in sorted(by_step):
                run.log(by_step[step], step=step)
            run.summary.update({"trial_id": trial_id, "study": self.study, "status": outcome.status, "seed":
                                labels.seed, "trainable_params": outcome.trainable_params}
                               | ({f"final/{k}": v for k, v in outcome.metrics.measured().items()}
                                  if outcome.metrics is not None else {})
                               | ({"error": outcome.failure.message} if outcome.failure is not None else {}))
        finally:
            run.finish(exit_code=0 if outcome.status == "done" else 1)

    def _mlflow_trial(self, trial_id: str, labels: TrialLabels, trial_spec: dict[str, Any],
                      outcome: TrialOutcome) -> None:
        from mlflow.entities import Metric, Param

        client, experiment_id, parent = self._mlflow
        tags = {"mlflow.parentRunId": parent, "loraplace.study": self.study, "loraplace.kind": "trial",
                "loraplace.trial_id": trial_id, "placement": labels.group.placement,
                "size": labels.group.size_label, "seed": str(labels.seed), "status": outcome.status}
        if outcome.failure is not None:
            tags["error"] = outcome.failure.message[:5000]
        run = client.create_run(experiment_id, run_name=trial_run_name(labels), tags=tags)
        run_id = run.info.run_id
        params = _flat("", trial_spec, {}) | {"trainable_params": str(outcome.trainable_params)}
        now = int(run.info.start_time or 0)
        metrics = []
        for point in outcome.curve:
            metrics += [Metric("train_loss", point.loss, now, point.step), Metric("lr", point.lr, now, point.step),
                        Metric("tokens", float(point.tokens), now, point.step)]
        metrics += [Metric(f"{e.split}_loss_during_training", e.eval_loss, now, e.step) for e in outcome.evals]
        if outcome.metrics is not None:
            metrics += [Metric(name, float(value), now, outcome.steps)
                        for name, value in outcome.metrics.measured().items()]
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limits: 100 params, 1000 metrics per call
            client.log_batch(run_id, params=items[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        if outcome.adapter is not None and Path(outcome.adapter.path).is_dir():
            client.log_artifacts(run_id, outcome.adapter.path, "adapter")
        client.set_terminated(run_id, "FINISHED" if outcome.status == "done" else "FAILED")

    def _tensorboard_trial(self, trial_id: str, labels: TrialLabels, trial_spec: dict[str, Any],
                           outcome: TrialOutcome) -> None:
        from torch.utils.tensorboard import SummaryWriter

        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{trial_run_name(labels)}_{trial_id[:8]}")
        with SummaryWriter(log_dir=str(Path(self.spec.tensorboard.dir) / self.study / name)) as writer:
            for point in outcome.curve:
                writer.add_scalar("train/loss", point.loss, point.step)
                writer.add_scalar("train/lr", point.lr, point.step)
                writer.add_scalar("train/tokens", point.tokens, point.step)
            for e in outcome.evals:
                writer.add_scalar(f"{e.split}/loss_during_training", e.eval_loss, e.step)
            if outcome.metrics is not None:
                for metric, value in outcome.metrics.measured().items():
                    writer.add_scalar(f"final/{metric}", value, outcome.steps)
            writer.add_text("trial", f"study {self.study}, trial {trial_id}, status {outcome.status}\n\n```\n"
                            f"{json.dumps(trial_spec, indent=2, default=str)}\n```")

    def close(self) -> None:
        if self._mlflow is not None:
            client, _, parent = self._mlflow
            self._guard("mlflow", lambda: client.set_terminated(parent, "FINISHED"))
