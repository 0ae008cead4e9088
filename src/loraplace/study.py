"""Studies: a YAML grid (placements × ranks|budgets × seeds × other axes) run into a crash-safe store.

Each trial's id is a hash of its fully resolved spec, so re-running a spec finds its finished trials and runs only
the rest. :func:`run_study` checks the spec, registers the grid in the store and hands it to the runner core
(:mod:`loraplace.runner`) with the executor of the chosen backend.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from loraplace.data import DataSpec
from loraplace.errors import ConfigError, LoraplaceError
from loraplace.placement.spec import DEFAULT_RANK, PlacementSpec
from loraplace.records import GroupKey, Size, StudyInfo, TrialLabels
from loraplace.runner import LocalExecutor, PlannedTrial, RunHooks, RunSummary, execute
from loraplace.specs import StrictModel, load_yaml, validate
from loraplace.store import Store
from loraplace.train import TrainSpec
from loraplace.trial import EvalSpec, TrialSpec, library_versions

BACKENDS = ("local", "ray")

AXIS_FIELDS = ("lr", "steps", "batch", "warmup", "schedule", "weight_decay")


class Resources(StrictModel):
    cpus: float = Field(default=1, gt=0)
    gpus: float = Field(default=0, ge=0)


PositiveInt = Annotated[int, Field(gt=0)]


class StudySpec(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str
    data: DataSpec
    train: TrainSpec = TrainSpec()
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

    def sizes(self) -> list[Size]:
        """The size points of the grid: budgets, or ranks (the default rank when none is given)."""
        if self.budgets is not None:
            return [Size(kind="budget", value=b) for b in self.budgets]
        if self.budget is not None:
            return [Size(kind="budget", value=self.budget)]
        return [Size(kind="rank", value=r) for r in (self.ranks or [DEFAULT_RANK])]

    def baseline_placement(self) -> str:
        """The placement the others are compared with: ``baseline``, else the first placement in spec order."""
        return self.baseline if self.baseline is not None else next(iter(self.placements))

    def info(self) -> StudyInfo:
        return StudyInfo(name=self.name, model=self.model, placements=tuple(self.placements),
                         baseline=self.baseline_placement(), baseline_given=self.baseline is not None,
                         versions=library_versions())


def load_study(path: str | Path) -> StudySpec:
    data = load_yaml(path)
    if not isinstance(data, dict):
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


def expand_grid(study: StudySpec) -> list[PlannedTrial]:
    """Every trial of the grid, in spec order: placements × sizes × seeds × axes (axes sorted by name)."""
    axis_names = sorted(study.axes)
    out = []
    for (pname, placement), size, seed, *axis_values in itertools.product(
            study.placements.items(), study.sizes(), study.seeds, *[study.axes[a] for a in axis_names]):
        axes = tuple(zip(axis_names, axis_values, strict=True))
        train = TrainSpec.model_validate(study.train.model_dump() | dict(axes) | {"seed": seed})
        spec = TrialSpec(model=study.model, data=study.data, placement=placement, train=train, eval=study.eval,
                         rank=size.value if size.kind == "rank" else None,
                         budget=size.value if size.kind == "budget" else None)
        canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
        trial_id = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        labels = TrialLabels(group=GroupKey(placement=pname, size=size, axes=axes), seed=seed)
        out.append(PlannedTrial(trial_id, labels, spec))
    return out


def check_placements(study: StudySpec) -> None:
    """Resolve every placement on the meta-device model (no weights) before anything is written or trained:
    an unknown or absent role, an empty layer selection or a fused-qkv request fails the whole spec at once.
    A budget too small for rank 1 is not checked here: that is one trial's failure, the others still run."""
    from loraplace.errors import PlacementError
    from loraplace.placement import meta_architecture, resolve_placement

    arch = meta_architecture(study.model)
    problems: list[str] = []
    for name, placement in study.placements.items():
        if placement.auto is not None:  # its sites are chosen by the probe when the trial runs
            if placement.auto.budget is None and study.budget is None and study.budgets is None:
                problems.append(f"placements.{name}: an auto placement needs a budget (auto: {{budget: N}} or the "
                                "study's budget:/budgets:)")
            continue
        for size in study.sizes():
            try:
                resolve_placement(arch, placement, model=study.model, rank=size.value if size.kind == "rank" else 1)
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


def run_study(study: StudySpec, store_path: str | Path, *, backend: Literal["local", "ray"] = "local",
              address: str | None = None, retry_failed: bool = False, hooks: RunHooks = RunHooks()) -> RunSummary:
    """Run every unfinished trial of ``study`` into ``store_path``. Ctrl-C marks the trials in flight
    interrupted and re-raises ``KeyboardInterrupt``."""
    t0 = time.perf_counter()
    store_path = Path(store_path)
    if backend not in BACKENDS:
        raise LoraplaceError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    check_placements(study)
    planned = expand_grid(study)
    by_id = {p.id: p for p in planned}
    with Store(store_path) as store:
        record = store.open_study(study.info(), study.model_dump(mode="json"))
        store.add_trials(record.id, [(p.id, p.labels, p.spec.model_dump(mode="json")) for p in planned])
        summary = RunSummary(recovered=store.recover_stale(record.id))
        summary.skipped = sum(1 for t in store.trials(record.id) if t.id in by_id and t.status == "done")
        artifacts = artifacts_dir(store_path)
        if backend == "ray":
            from loraplace.ray_backend import RayExecutor

            executor = RayExecutor(cpus=study.resources.cpus, gpus=study.resources.gpus, artifacts=artifacts,
                                   address=address)
        else:
            executor = LocalExecutor(study.model, device=study.train.device, precision=study.train.precision,
                                     artifacts=artifacts, progress=hooks.progress)
        with executor:
            execute(store, record.id, by_id, executor, retry_failed=retry_failed, hooks=hooks, summary=summary)
    summary.wall_s = time.perf_counter() - t0
    return summary
