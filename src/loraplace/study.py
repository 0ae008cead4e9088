"""Studies: a YAML grid (placements × ranks|budgets × seeds × other axes) run into a crash-safe store.

Each trial's id is a hash of its fully resolved config, so re-running a spec finds its finished trials and
runs only the rest. The local backend runs trials one after another in one process with one loaded base model
(adapters injected and removed per trial); the Ray backend runs them as Ray tasks while this process alone
writes the store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator

from loraplace.data import DataSpec
from loraplace.errors import LoraplaceError
from loraplace.placement.spec import PlacementSpec
from loraplace.specs import StrictModel, load_yaml, validate
from loraplace.store import Owner, Store
from loraplace.train import TrainSpec
from loraplace.trial import EvalSpec, Session, TrialSpec, library_versions, run_trial

AXIS_FIELDS = ("lr", "steps", "batch", "warmup", "schedule", "weight_decay")


class Resources(StrictModel):
    cpus: float = Field(default=1, gt=0)
    gpus: float = Field(default=0, ge=0)


PositiveInt = Annotated[int, Field(gt=0)]


class StudySpec(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    data: DataSpec
    train: TrainSpec = TrainSpec(steps=40)
    eval: EvalSpec = EvalSpec()
    placements: dict[str, PlacementSpec] = Field(min_length=1)
    ranks: list[PositiveInt] | None = Field(default=None, min_length=1)
    budget: PositiveInt | None = None
    budgets: list[PositiveInt] | None = Field(default=None, min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="other train fields to sweep (lr, steps)")
    baseline: str | None = None
    resources: Resources = Resources()

    # Field validators (not one model validator) so these problems are reported together with type errors.
    @field_validator("budget", "budgets")
    @classmethod
    def _one_size(cls, value, info: ValidationInfo):
        if value is not None:
            given = [k for k in ("ranks", "budget") if k != info.field_name and info.data.get(k) is not None]
            if given:
                raise ValueError(f"give one of ranks, budget, budgets (also got {', '.join(given)})")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds has duplicates")
        return value

    @field_validator("axes")
    @classmethod
    def _axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        problems = [f"{axis}: not a sweepable train field ({', '.join(AXIS_FIELDS)})" for axis in value
                    if axis not in AXIS_FIELDS]
        problems += [f"{axis}: empty list" for axis, values in value.items() if not values]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, value: str | None, info: ValidationInfo) -> str | None:
        placements = info.data.get("placements")
        if value is not None and placements is not None and value not in placements:
            raise ValueError(f"baseline {value!r} is not one of the placements ({', '.join(placements)})")
        return value

    def sizes(self) -> list[tuple[str, int]]:
        """("rank", r) or ("budget", b) per size point; rank 16 when none is given."""
        if self.budgets is not None:
            return [("budget", b) for b in self.budgets]
        if self.budget is not None:
            return [("budget", self.budget)]
        return [("rank", r) for r in (self.ranks or [16])]


def load_study(path: str | Path) -> StudySpec:
    data = load_yaml(path)
    if not isinstance(data, dict):
        from loraplace.errors import ConfigError

        raise ConfigError([f"{path}: a study spec is a mapping at the top level"], "invalid study spec")
    # Data file paths are relative to the spec file, so a study runs the same from any directory.
    data_section = data.get("data")
    if isinstance(data_section, dict):
        base = Path(path).resolve().parent
        for key in ("train", "eval"):
            value = data_section.get(key)
            if isinstance(value, str) and ":" not in value.split("/")[0] and not Path(value).is_absolute():
                data_section[key] = str((base / value).resolve())
    return validate(StudySpec, data, f"invalid study spec {path}")


@dataclass(frozen=True)
class PlannedTrial:
    id: str
    labels: dict[str, Any]  # placement name, rank/budget, seed, axis values
    spec: TrialSpec

    def config(self) -> dict[str, Any]:
        return {"labels": self.labels, "trial": self.spec.model_dump(mode="json")}


def expand_grid(study: StudySpec) -> list[PlannedTrial]:
    axis_names = sorted(study.axes)
    out = []
    for (pname, placement), (size_kind, size), seed, *axis_values in itertools.product(
            study.placements.items(), study.sizes(), study.seeds, *[study.axes[a] for a in axis_names]):
        overrides = dict(zip(axis_names, axis_values, strict=True)) | {"seed": seed}
        train = TrainSpec.model_validate(study.train.model_dump() | overrides)
        spec = TrialSpec(model=study.model, data=study.data, placement=placement, train=train, eval=study.eval,
                         rank=size if size_kind == "rank" else None, budget=size if size_kind == "budget" else None)
        canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
        trial_id = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        labels = {"placement": pname, size_kind: size, "seed": seed} | dict(zip(axis_names, axis_values, strict=True))
        out.append(PlannedTrial(trial_id, labels, spec))
    return out


def check_placements(study: StudySpec) -> None:
    """Resolve every placement on the meta-device model (no weights) before anything is written or trained:
    an unknown or absent role, an empty layer selection or a fused-qkv request fails the whole spec at once.
    A budget too small for rank 1 is not checked here: that is one trial's failure, the others still run."""
    from loraplace.errors import ConfigError, PlacementError
    from loraplace.placement import meta_architecture, resolve_placement

    arch = meta_architecture(study.model)
    problems: list[str] = []
    for name, placement in study.placements.items():
        if placement.auto is not None:  # its sites are chosen by the probe when the trial runs
            if placement.auto.budget is None and study.budget is None and study.budgets is None:
                problems.append(f"placements.{name}: an auto placement needs a budget (auto: {{budget: N}} or the "
                                "study's budget:/budgets:)")
            continue
        for kind, size in study.sizes():
            try:
                resolve_placement(arch, placement, model=study.model, rank=size if kind == "rank" else 1)
            except PlacementError as exc:
                problem = f"placements.{name}: {exc}"
                if problem not in problems:
                    problems.append(problem)
    if problems:
        raise ConfigError(problems, f"placements that do not resolve on {study.model}",
                          f"see the roles of this model with: loraplace plan {study.model} --placement all")


def default_store(study: StudySpec) -> Path:
    return Path("runs") / f"{study.name}.db"


def artifacts_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.stem + "_artifacts")


# --------------------------------------------------------------------------------------------- running


@dataclass
class RunSummary:
    ran: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already done before this run
    recovered: list[str] | None = None
    wall_s: float = 0.0


def run_study(study: StudySpec, store_path: str | Path, *, backend: str = "local", address: str | None = None,
              retry_failed: bool = False, on_trial_start: Callable[[PlannedTrial, int, int], None] | None = None,
              on_trial_end: Callable[[PlannedTrial, Any], None] | None = None, progress_factory=None) -> RunSummary:
    """Run every unfinished trial of ``study`` into ``store_path``. Ctrl-C marks the current trial interrupted
    and re-raises ``KeyboardInterrupt``."""
    t0 = time.perf_counter()
    store_path = Path(store_path)
    check_placements(study)
    planned = expand_grid(study)
    by_id = {p.id: p for p in planned}
    summary = RunSummary()
    with Store(store_path) as store:
        record = store.open_study(study.name, study.model_dump(mode="json") | {"versions": library_versions()})
        store.add_trials(record.id, [(p.id, p.config()) for p in planned])
        summary.recovered = store.recover_stale(record.id)
        summary.skipped = sum(1 for t in store.trials(record.id) if t.id in by_id and t.status == "done")
        if backend == "ray":
            from loraplace.ray_backend import run_with_ray

            run_with_ray(study, store, record.id, by_id, store_path, summary, retry_failed, address, on_trial_end)
        elif backend == "local":
            _run_local(study, store, record.id, by_id, store_path, summary, retry_failed, on_trial_start,
                       on_trial_end, progress_factory)
        else:
            raise LoraplaceError(f"unknown backend {backend!r}", "use local or ray")
    summary.wall_s = time.perf_counter() - t0
    return summary


def _run_local(study, store: Store, study_id: int, by_id: dict[str, PlannedTrial], store_path: Path,
               summary: RunSummary, retry_failed: bool, on_trial_start, on_trial_end, progress_factory) -> None:
    owner = Owner.current()
    remaining = set(by_id)
    session: Session | None = None
    total = len(by_id) - summary.skipped
    while True:
        claimed = store.claim_trial(study_id, owner, retry_failed=retry_failed, only=remaining)
        if claimed is None:
            return
        remaining.discard(claimed.id)  # each trial at most once per run (a failing retry is not looped)
        planned = by_id[claimed.id]
        if on_trial_start is not None:
            on_trial_start(planned, summary.ran + 1, total)
        summary.ran += 1
        try:
            if session is None:  # loaded once, reused by every trial of the study
                session = Session(study.model, device=study.train.device, precision=study.train.precision)
            last_beat = [time.monotonic()]

            def beat(step, total_steps, loss, tokens, _inner=progress_factory, _last=last_beat, _id=claimed.id):
                if time.monotonic() - _last[0] > 5:
                    store.heartbeat(_id, owner)
                    _last[0] = time.monotonic()
                if _inner is not None:
                    _inner(step, total_steps, loss, tokens)

            result = run_trial(planned.spec, session=session, out_dir=artifacts_dir(store_path) / claimed.id,
                               progress=beat)
        except KeyboardInterrupt:
            store.interrupt_trial(claimed.id, "interrupted by the user (Ctrl-C)", owner)
            raise
        except LoraplaceError as exc:  # e.g. a budget below rank 1 for this placement: this trial fails
            store.fail_trial(claimed.id, str(exc), owner=owner)
            summary.failed += 1
            continue
        except Exception as exc:  # noqa: BLE001 - anything else in one trial must not stop the study
            store.fail_trial(claimed.id, f"{type(exc).__name__}: {exc}", owner=owner)
            summary.failed += 1
            continue
        if result.status == "done":
            store.finish_trial(claimed.id, result.store_payload(), owner)
            summary.done += 1
        else:
            store.fail_trial(claimed.id, result.error or "failed", result.failed_step, owner)
            summary.failed += 1
        if on_trial_end is not None:
            on_trial_end(planned, result)
