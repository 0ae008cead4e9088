"""Studies: a YAML grid (placements × ranks|budgets × seeds × other axes) run into a crash-safe store.

Each trial's id is a hash of its fully resolved spec, so re-running a spec finds its finished trials and runs only
the rest. :func:`run_study` checks the spec, registers the grid in the store and hands it to the runner core
(:mod:`loraplace.runner`) with the executor of the chosen backend.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, create_model, field_validator

from loraplace.data import DataSpec
from loraplace.errors import ConfigError, LoraplaceError
from loraplace.formatting import plural
from loraplace.placement.spec import DEFAULT_AUTO_METHOD, DEFAULT_FILL, DEFAULT_RANK, Fill, PlacementSpec
from loraplace.records import GroupKey, Size, StudyInfo, TrialLabels, TrialOutcome, config_without_seed
from loraplace.reuse import check_sources, reuse_finished
from loraplace.runner import FusedExecutor, LocalExecutor, PlannedTrial, RungTask, RunHooks, RunSummary, execute
from loraplace.search import (
    Candidate,
    SearchSpec,
    SearchState,
    confirmed,
    describe,
    hedge_candidates,
    is_preset,
    run_rungs,
    rung_steps,
    rungs_of,
)
from loraplace.search import state_dir as search_state_dir
from loraplace.specs import StrictModel, bare_on_off, load_yaml, validate
from loraplace.store import Store, StoreError, StudyRecord, TrialRecord, artifacts_dir
from loraplace.tracking import Tracker, TrackingSpec, check_tracking
from loraplace.train_config import TrainSpec
from loraplace.trial import EvalSpec, TrialSpec, library_versions
from loraplace.tuning import TUNED_AXIS, Selection, TuneSpec, extended_lrs, selections_of

BACKENDS = ("local", "ray")
MAX_NAME_LEN = 48  # a placement name is a column value in every table; longer ones break terminal layouts

# A kill loses at most this much training of the trial in flight; a save costs a copy of the adapters and AdamW's
# moments (3 × the adapter's size: 12 MB at 1M parameters) — negligible at this interval.
DEFAULT_SAVE_STATE_EVERY_S = 600.0

AXIS_FIELDS = ("lr", "steps", "batch", "warmup", "schedule", "weight_decay", "quantize")


def _axes_model() -> type[StrictModel]:
    """``axes:`` — each sweepable field of :class:`TrainSpec` as a list of values with *that field's* type and
    constraints, so ``axes: {lr: [-1]}`` fails at load time as ``axes.lr[0]`` (one home for each rule)."""
    fields: dict[str, Any] = {}
    for name in AXIS_FIELDS:
        info = TrainSpec.model_fields[name]
        item = info.annotation
        if typing.get_origin(item) in (typing.Union, types.UnionType):  # `int | None` → int: an axis value is set
            kinds = [a for a in typing.get_args(item) if a is not type(None)]
            item = kinds[0] if len(kinds) == 1 else typing.Union[tuple(kinds)]  # noqa: UP007 - built at run time
        if info.metadata:
            item = Annotated[(item, *info.metadata)]
        fields[name] = (list[item] | None, Field(default=None, min_length=1, description=info.description))
    return create_model("Axes", __base__=StrictModel, **fields)


Axes = _axes_model()


class Resources(StrictModel):
    cpus: float = Field(default=1, gt=0)
    gpus: float = Field(default=0, ge=0)


class ExecutionSpec(StrictModel):
    """How a study runs its trials (local, or each fused group as one Ray task)."""

    fuse: int | Literal["auto", "off"] = Field(
        default="auto", description="train up to K claimed trials together in one pass over the base model "
        "(loraplace.fused); off: one at a time; auto: on CUDA as many as the free memory holds (at most "
        "loraplace.fused.FUSE_AUTO_MAX), elsewhere one at a time (measured not to pay on a CPU: "
        "benchmarks/bench_study.py --fuse); with the ray backend auto is off")

    save_state_every: Annotated[float, Field(ge=0)] | Literal["off"] = Field(
        default=DEFAULT_SAVE_STATE_EVERY_S, description="seconds of training between saves of a running "
        "trial's state (adapters, AdamW, schedule, RNG, data position) under its artifacts directory, so a run "
        "killed mid-trial continues it from there with the same numbers; removed when the trial ends; 0: at every "
        "step read back; off: a killed trial starts again. Local backend")

    @field_validator("fuse", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return bare_on_off(value, on="auto")

    @field_validator("save_state_every", mode="before")
    @classmethod
    def _yaml_off_state(cls, value: object) -> object:
        return "off" if value is False else value

    @property
    def save_state_every_s(self) -> float | None:
        return None if self.save_state_every == "off" else float(self.save_state_every)

    @field_validator("fuse")
    @classmethod
    def _at_least_two(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 2:
            raise ValueError("fuse groups at least 2 trials (off: one at a time)")
        return value

    def ray_group_size(self) -> int:
        """Trials per Ray task; 1 = no fusion. auto is 1 there: the driver does not know its workers' devices."""
        return self.fuse if isinstance(self.fuse, int) else 1


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
    axes: Axes = Field(default_factory=Axes, description=f"other train fields to sweep: {', '.join(AXIS_FIELDS)}")
    baseline: str | None = None
    resources: Resources = Resources()
    allow_unassigned: bool = Field(
        default=False, description="every placement may leave out weights that have no role (`run "
        "--allow-unassigned`); their trials and the report warn")
    fill: Fill = Field(default=DEFAULT_FILL, description="with budget(s): exact (rank r+1 on an evenly spread "
                       "subset of each placement's sites, within ~1 % of the budget) or uniform (one rank)")
    tune: TuneSpec | None = Field(default=None, description="per-placement LR selection on the validation split "
                                  "(see loraplace.tuning)")

    tracking: TrackingSpec | None = Field(default=None, description="log every trial to MLflow and/or TensorBoard "
                                          "(loraplace.tracking); changes no trial")
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec, description="fused trials (local and Ray)")
    search: SearchSpec | None = Field(default=None, description="successive halving over placements × tune.lr "
                                      "instead of the full grid (loraplace.search); search: {} for the defaults")

    added_fields = frozenset({"allow_unassigned", "fill", "tune", "tracking", "execution", "search"})

    @field_validator("search")
    @classmethod
    def _search_needs(cls, value: SearchSpec | None, info: ValidationInfo) -> SearchSpec | None:
        if value is None:
            return value
        problems = []
        data, train, axes, tune = (info.data.get(k) for k in ("data", "train", "axes", "tune"))
        seeds = info.data.get("seeds")
        if data is not None and not data.has_validation:
            problems.append("search judges candidates on the validation split: give data.validation, "
                            "validation_count or validation_fraction")
        if axes is not None and cls.axis_values(axes):
            problems.append("search compares placements × tune.lr at one setting: it takes no axes")
        if any(info.data.get(k) for k in ("ranks", "budgets")) and len(info.data.get("ranks") or
                                                                      info.data.get("budgets") or []) > 1:
            problems.append("search compares placements at one size: give one rank or one budget")
        if train is not None and value.rungs is not None and value.rungs[-1] >= train.steps:
            problems.append(f"search.rungs must stay below train.steps ({train.steps}): the finalists run the "
                            "full horizon")
        if train is not None and train.steps < 2:
            problems.append("search needs train.steps ≥ 2 (a rung below the full horizon)")
        if tune is not None and tune.extend:
            problems.append("tune.extend adds LRs past an edge once a grid's selection reaches it; a search's "
                            "candidates are fixed when it starts: add the LR past the edge to tune.lr instead")
        if tune is not None and tune.seeds is not None and seeds and tune.seeds != seeds[:1]:
            problems.append(f"search runs its rungs on the first seed ({seeds[0]}); tune.seeds {tune.seeds} would "
                            "not be used: leave it out")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("tune")
    @classmethod
    def _tune_needs(cls, value: TuneSpec | None, info: ValidationInfo) -> TuneSpec | None:
        if value is None:
            return value
        problems = []
        data, axes, seeds = info.data.get("data"), info.data.get("axes"), info.data.get("seeds")
        placements = info.data.get("placements")
        if isinstance(value.lr, dict) and placements is not None:
            missing = [p for p in placements if p not in value.lr]
            unknown = [p for p in value.lr if p not in placements]
            if missing:
                problems.append(f"tune.lr gives a list per placement but none for {', '.join(missing)}: name every "
                                "placement (or give one list for all)")
            if unknown:
                problems.append(f"tune.lr names {', '.join(unknown)}, not among placements "
                                f"({', '.join(placements)})")
        if data is not None and not data.has_validation:
            problems.append("tune selects on the validation split: give data.validation, validation_count or "
                            "validation_fraction (the test split is never used to select)")
        if axes is not None and axes.lr is not None:
            problems.append("tune.lr and axes.lr both sweep the learning rate: axes compares each LR cell by cell, "
                            "tune selects one per placement; give one")
        if seeds is not None and value.seeds is not None and not set(value.seeds) <= set(seeds):
            problems.append(f"tune.seeds {sorted(set(value.seeds) - set(seeds))} are not among seeds {seeds}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def tune_seeds(self) -> list[int]:
        """The seeds of the selection pass (all seeds unless tune.seeds says fewer)."""
        assert self.tune is not None
        return [s for s in self.seeds if self.tune.seeds is None or s in self.tune.seeds]

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
    def _axes_with_train(cls, value, info: ValidationInfo):
        """Each axis value must also make a valid TrainSpec with the rest of ``train`` (e.g. batch vs micro_batch)."""
        train = info.data.get("train")
        if train is None:
            return value
        problems = []
        for name, values in cls.axis_values(value).items():
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                problems.append(f"{name} has duplicates ({', '.join(map(str, repeated))}): the same trials twice")
            for i, v in enumerate(values):
                try:
                    TrainSpec.model_validate(train.model_dump() | {name: v})
                except ValidationError as exc:
                    problems += [f"{name}[{i}]: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @staticmethod
    def axis_values(axes) -> dict[str, list[Any]]:
        """axis name → values, for the axes the spec sweeps, sorted by name (the grid's order)."""
        return {k: v for k, v in sorted(axes.model_dump().items()) if v is not None}

    @field_validator("placements")
    @classmethod
    def _placement_names(cls, value: dict[str, PlacementSpec]) -> dict[str, PlacementSpec]:
        long = [name for name in value if len(name) > MAX_NAME_LEN]
        if long:
            raise ValueError(f"placement names are labels in tables and figures: at most {MAX_NAME_LEN} "
                             f"characters (got {len(long[0])}: {long[0][:24]!r}…)")
        # A trial's id hashes its spec, not its arm's name: two arms with one placement would be the same trials,
        # and one of them would vanish from the store and the comparison.
        same: dict[str, list[str]] = {}
        for name, placement in value.items():
            same.setdefault(placement.model_dump_json(), []).append(name)
        twins = [names for names in same.values() if len(names) > 1]
        if twins:
            raise ValueError("; ".join(f"placements {', '.join(names)} are the same placement: they would train the "
                                       "same trials (a trial is its spec, not its name), so only one arm would "
                                       "remain" for names in twins) + " — give each placement once (seeds: measure "
                                       "seed-to-seed noise)")
        return value

    @field_validator("ranks", "budgets")
    @classmethod
    def _distinct_sizes(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            repeated = sorted({v for v in value if value.count(v) > 1})
            raise ValueError(f"{info.field_name} has duplicates ({', '.join(map(str, repeated))}): the same trials "
                             "twice")
        return value

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, value: str | None, info: ValidationInfo) -> str | None:
        placements = info.data.get("placements")
        if value is not None and placements is not None and value not in placements:
            raise ValueError(f"baseline {value!r} is not one of the placements ({', '.join(placements)})")
        return value

    def placement_specs(self) -> dict[str, PlacementSpec]:
        """The placements as trials resolve them (with the study-wide ``allow_unassigned``)."""
        if not self.allow_unassigned:
            return dict(self.placements)
        return {name: p.model_copy(update={"allow_unassigned": True}) for name, p in self.placements.items()}

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
                         versions=library_versions(),
                         tune_lrs=tuple(self.search_lrs()) if self.search is not None else
                         tuple(self.tune.all_lrs()) if self.tune is not None else (),
                         tune_lrs_by_placement={p: tuple(self.tune.lrs_for(p)) for p in self.placements}
                         if self.tune is not None and isinstance(self.tune.lr, dict) else {},
                         tune_seeds=(self.seeds[0],) if self.search is not None else
                         tuple(self.tune_seeds()) if self.tune is not None else (),
                         tune_extend=self.tune.extend if self.tune is not None and self.search is None else 0,
                         search=self.search is not None)

    def search_lrs(self, placement: str | None = None) -> list[float]:
        """The learning rates a search's (or a tuned grid's) candidates are drawn from: ``placement``'s tune.lr
        (every placement's: their union), else the one train.lr."""
        if self.tune is None:
            return [self.train.lr]
        return self.tune.all_lrs() if placement is None else self.tune.lrs_for(placement)


def load_study(path: str | Path) -> StudySpec:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a study spec is a mapping at the top level"], "invalid study spec")
    # Data file paths are relative to the spec file, so a study runs the same from any directory.
    data_section = data.get("data")
    if isinstance(data_section, dict):
        base = Path(path).resolve().parent
        for key in ("train", "eval", "test", "validation"):
            value = data_section.get(key)
            if isinstance(value, str) and ":" not in value.split("/")[0] and not Path(value).is_absolute():
                data_section[key] = str((base / value).resolve())
    return validate(StudySpec, data, f"invalid study spec {path}")


def expand_grid(study: StudySpec, selections: dict[GroupKey, Selection] | None = None,
                lrs: dict[GroupKey, list[float]] | None = None) -> list[PlannedTrial]:
    """Every trial of the grid, in spec order: placements × sizes × seeds × axes (axes sorted by name).

    With ``tune:``, per cell (placement × size × axes): the selection pass (every tune LR × the selection seeds;
    ``lrs``: a cell's LRs when they differ from its tune.lr list — the extensions past an edge that
    ``tune.extend`` earned, :func:`loraplace.tuning.extended_lrs`), then — for the cells in ``selections`` (see
    :func:`loraplace.tuning.select_lrs`) — the other seeds at the selected LR. The LR is an axis of the group key,
    so each (cell, LR) is a group."""
    sweep = study.axis_values(study.axes)
    axis_names = list(sweep)
    placements = study.placement_specs().items()
    if study.tune is None:
        return [_planned(study, pname, placement, size, seed, tuple(zip(axis_names, axis_values, strict=True)))
                for (pname, placement), size, seed, *axis_values in itertools.product(
                    placements, study.sizes(), study.seeds, *sweep.values())]
    out = []
    tune_seeds = study.tune_seeds()
    for (pname, placement), size, *axis_values in itertools.product(placements, study.sizes(), *sweep.values()):
        axes = tuple(zip(axis_names, axis_values, strict=True))

        def with_lr(lr: float, axes=axes) -> tuple:
            return tuple(sorted(axes + ((TUNED_AXIS, lr),)))

        cell = GroupKey(placement=pname, size=size, axes=axes)
        out += [_planned(study, pname, placement, size, seed, with_lr(lr))
                for lr in (lrs or {}).get(cell, study.tune.lrs_for(pname)) for seed in tune_seeds]
        selection = (selections or {}).get(cell)
        if selection is not None:
            out += [_planned(study, pname, placement, size, seed, with_lr(selection.lr)) for seed in study.seeds
                    if seed not in tune_seeds]
    return out


def _planned(study: StudySpec, pname: str, placement: PlacementSpec, size: Size, seed: int,
             axes: tuple) -> PlannedTrial:
    train = TrainSpec.model_validate(study.train.model_dump() | dict(axes) | {"seed": seed})
    spec = TrialSpec(model=study.model, data=study.data, placement=placement, train=train, eval=study.eval,
                     rank=size.value if size.kind == "rank" else None,
                     budget=size.value if size.kind == "budget" else None, fill=study.fill)
    labels = TrialLabels(group=GroupKey(placement=pname, size=size, axes=axes), seed=seed)
    return PlannedTrial(trial_id(spec), labels, spec)


def trial_id(spec: TrialSpec) -> str:
    """The hash of the resolved trial spec: a study resumes by it."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _stored(study: StudySpec, store_path: Path) -> tuple[StudyRecord, list[TrialRecord]] | None:
    """This study's record and trials as the store holds them (read-only), or None: no store, or no study of this
    name in it yet (a new one). The one read every resume check starts from."""
    if not store_path.exists():
        return None
    with Store.open_readonly(store_path) as store:
        try:
            record = store.study(study.name)
        except StoreError:
            return None
        return record, store.trials(record.id)


def _stored_plan(study: StudySpec, store_path: Path) -> list[PlannedTrial]:
    """The grid as the store's results so far make it (read-only): a resumed tuned study plans its follow-up
    trials — the other seeds at each selection made, and the LRs past an edge that ``tune.extend`` earned."""
    stored = _stored(study, store_path) if study.tune is not None else None
    return expand_grid(study) if stored is None else _planned_from(study, stored[1])


def _planned_from(study: StudySpec, records: list[TrialRecord]) -> list[PlannedTrial]:
    info = study.info()
    lrs = extended_lrs(info, info.tune_extend, records) if info.tune_extend else None
    return expand_grid(study, selections_of(info, records), lrs)


def check_placements(study: StudySpec, force: bool = False) -> None:
    """Resolve every placement on the meta-device model (no weights) before anything is written or trained:
    an unknown or absent role, an empty layer selection, a fused-qkv request, a size given twice or adapters
    bigger than the model fail the whole spec at once. A budget too small for rank 1 is not checked here: that
    is one trial's failure, the others still run."""
    from loraplace.errors import PlacementError
    from loraplace.placement import meta_architecture, resolve_placement

    arch = meta_architecture(study.model)
    problems: list[str] = []
    for name, placement in study.placement_specs().items():
        if placement.auto is not None:  # its sites are chosen by the probe when the trial runs
            if placement.auto.budget is None and study.budget is None and study.budgets is None:
                problems.append(f"placements.{name}: an auto placement needs a budget (auto: {{budget: N}} or the "
                                "study's budget:/budgets:)")
            continue
        for size in study.sizes():
            try:
                plan = resolve_placement(arch, placement, model=study.model,
                                         rank=size.value if size.kind == "rank" else None,
                                         budget=size.value if size.kind == "budget" else None, fill=study.fill,
                                         check_budget_fits=False)
                plan.check_size(force)
            except PlacementError as exc:
                problem = f"placements.{name}: {exc}"
                if problem not in problems:
                    problems.append(problem)
    if problems:
        raise ConfigError(problems, f"placements that do not resolve on {study.model}",
                          f"see the roles of this model with: loraplace plan {study.model} --placement all")


def check_inputs(study: StudySpec) -> list[str]:
    """Everything a study can get wrong before a trial runs, checked before the store is written: the device,
    the model reference (its config), the data (readable, non-empty, a known format in every record, at least
    one trainable example in every split after tokenisation) and the placements.
    Returns warnings (e.g. eval examples that are also training examples)."""
    from loraplace.data import check_data, load_splits
    from loraplace.models import load_tokenizer
    from loraplace.train import resolve_device

    resolve_device(study.train.device)
    warnings = check_data(study.data)
    # Tokenised once here (cached on disk, so the trials read it back): data that leaves no trainable example,
    # e.g. every one longer than max_len, is refused now rather than failing every trial after the store exists.
    load_splits(study.data, load_tokenizer(study.model))
    return warnings


def default_store(study: StudySpec) -> Path:
    return Path("runs") / f"{study.name}.db"


# --------------------------------------------------------------------------------------------- running


class StudyChanged(LoraplaceError):
    """The spec differs from the one the store's study was run with."""


def spec_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Every difference between two JSON-like specs, one line each: ``train.lr: 0.001 → 0.002``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"{where}: removed (was {json.dumps(old[key])})")
            elif key not in old:
                out.append(f"{where}: added ({json.dumps(new[key])})")
            else:
                out += spec_differences(old[key], new[key], where)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} → {json.dumps(new)}"]


def _as_read_now(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as this loraplace reads it: a field added since it was stored takes its default, so an added
    field left at its default is not a change (a spec this version cannot read is compared as stored)."""
    try:
        return StudySpec.model_validate(stored).model_dump(mode="json")
    except ValidationError:
        return stored


def _auto_default_hint(differences: list[str]) -> str:
    """The likely cause when a stored ``auto`` arm read ``probe`` and the spec now reads the default: ``auto``
    without ``method`` meant ``probe`` until 2026-12-04 and means ``DEFAULT_AUTO_METHOD`` since."""
    moved = f'.auto.method: "probe" → "{DEFAULT_AUTO_METHOD}"'
    if not any(d.endswith(moved) for d in differences):
        return ""
    return (f"auto without method means {DEFAULT_AUTO_METHOD} since 2026-12-04 (it meant probe): if this spec's "
            "auto placements name no method, write method: probe in them to resume the stored study; ")


def _check_unchanged(study: StudySpec, store_path: Path, planned: list[PlannedTrial], extend: bool) -> None:
    """A study's identity is its resolved spec, i.e. its trials. Re-running a spec with the same trials resumes; a
    spec whose trials differ is refused with the differences, or with ``extend`` adds cells as long as no group
    would mix configurations (a group's trials may differ only by seed). Reads the store read-only: a refusal
    changes nothing."""
    stored = _stored(study, store_path)
    if stored is None:
        return  # no study of this name yet: a new one
    record, existing = stored
    existing_ids, planned_ids = {t.id for t in existing}, {p.id for p in planned}
    if existing_ids == planned_ids:
        return  # the same trials: a resume (a change that touches no trial, e.g. the baseline, is kept)
    old = _as_read_now({k: v for k, v in record.spec.items() if k != "versions"})
    differences = spec_differences(old, study.model_dump(mode="json"))
    if not differences and existing_ids <= planned_ids:
        return  # the same spec, its grid registered in part (another runner of it is starting right now)
    differences = differences or ["(the spec reads the same, but its trials resolve differently: another "
                                  "loraplace version? A budget study stored before budgets were filled exactly "
                                  "resumes with fill: uniform)"]
    shown = "\n".join(f"  {d}" for d in differences[:20]) + (f"\n  … {len(differences) - 20} more"
                                                            if len(differences) > 20 else "")
    if not extend:
        raise StudyChanged(f"study {study.name!r} in {store_path} was run with a different spec:\n{shown}",
                           _auto_default_hint(differences) + "to compare new settings, use a new store (--store) or "
                           "a new name:; to add placements, sizes, seeds or axis values to this study, run with "
                           "--extend")
    by_group: dict[GroupKey, dict[str, Any]] = {}
    for trial in existing:
        by_group.setdefault(trial.labels.group, config_without_seed(trial.spec))
    # group → (what its stored trials ran with, what this spec gives it), seed aside
    clashes = {p.labels.group.label: (by_group[p.labels.group], new)
               for p in planned if p.labels.group in by_group
               and by_group[p.labels.group] != (new := config_without_seed(p.spec.model_dump(mode="json")))}
    mixed = sorted(clashes)
    if mixed:
        # The trial-level difference can be a setting the spec never wrote (a field this version added, with a
        # default the stored trials did not run with): name it, not only the spec's own changes.
        clash = spec_differences(*clashes[mixed[0]])
        first = "\n".join(f"  {d}" for d in clash[:10])
        raise StudyChanged(f"--extend would mix configurations inside group(s) {', '.join(mixed[:8])}"
                           f"{' …' if len(mixed) > 8 else ''}: their stored trials were run with other settings "
                           f"than this spec gives them. In {mixed[0]}, stored → now:\n{first}\nChanges to the "
                           f"spec:\n{shown}",
                           _auto_default_hint(clash + differences) + "--extend only adds cells (placements, "
                           "sizes, seeds, axis values); to change settings, use a new store (--store) or a new name:")
    dropped = sorted({t.labels.group.label for t in existing if t.id not in planned_ids
                      and not _in_spec(study, t.labels)})
    if dropped:  # the store would keep arms the spec no longer names, and report and recommend them
        raise StudyChanged(f"--extend only adds cells, but this spec drops stored ones: group(s) "
                           f"{', '.join(dropped[:8])}{' …' if len(dropped) > 8 else ''} are in the store and not in "
                           f"the spec. Changes:\n{shown}",
                           "keep every stored placement, size, seed and axis value in the spec and add to it; to "
                           "compare a different set, use a new store (--store) or a new name:")


def _in_spec(study: StudySpec, labels: TrialLabels) -> bool:
    """Whether a stored trial's cell is still one the spec names (its placement, size, seed and axis values; a
    tuned LR among tune.lr). A tuned study's other seeds at a selected LR are planned only once selection is made,
    so a stored one that is not planned now (a new LR not yet run) is still in the spec."""
    group = labels.group
    sweep = study.axis_values(study.axes)
    if group.placement not in study.placements:
        return False
    tuned = study.search_lrs(group.placement) if study.tune is not None or study.search is not None else []
    return (group.size in study.sizes() and labels.seed in study.seeds
            and all((v in tuned) if (k == TUNED_AXIS and tuned) else v in sweep.get(k, []) for k, v in group.axes))


def _tracked(hooks: RunHooks, tracker: Tracker) -> RunHooks:
    """The hooks, plus: every finished trial goes to the trackers (after the store has recorded it)."""

    def on_end(trial: PlannedTrial, outcome: TrialOutcome) -> None:
        if hooks.on_end is not None:
            hooks.on_end(trial, outcome)
        tracker.log_trial(trial.id, trial.labels, trial.spec.model_dump(mode="json"), outcome)

    return dataclasses.replace(hooks, on_end=on_end)


def _check_precision(study: StudySpec, store_path: Path) -> None:
    """``precision: auto`` is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere: a study started on one
    kind of machine and resumed on another would compare arms computed in different precisions (differences of the
    size the arms differ by). Refused, naming both, unless the spec pins the precision. Reads the store read-only."""
    stored = _stored(study, store_path) if study.train.precision == "auto" else None
    if stored is None:
        return
    ran = [t.outcome.environment.dtype for t in stored[1]
           if t.status == "done" and t.outcome is not None and t.outcome.environment.dtype]
    here = _auto_dtype_here(study)  # torch is imported only now, when there is a store to resume
    if ran and here not in ran:
        kinds = " and ".join(f"{d} ({plural(n, 'trial')})" for d, n in sorted(collections.Counter(ran).items()))
        raise StudyChanged(
            f"study {study.name!r} in {store_path}: its finished trials ran in {kinds} under precision: auto; on this "
            f"machine auto is {here}{' (this CPU has no native bf16)' if here == 'float32' else ''}, so the "
            "study would compare arms trained in different precisions",
            "resume it on a machine of the kind that started it; or run with --allow-mixed-precision (the report "
            "names both); a new study can pin train.precision: fp32 to run the same everywhere")


def _auto_dtype_here(study: StudySpec) -> str | None:
    """What ``precision: auto`` resolves to on this machine ("float32" / "bfloat16"); None when it is pinned."""
    if study.train.precision != "auto":
        return None
    from loraplace.train import resolve_device, resolve_dtype

    return str(resolve_dtype("auto", resolve_device(study.train.device))).removeprefix("torch.")


def run_study(study: StudySpec, store_path: str | Path, *, backend: Literal["local", "ray"] = "local",
              address: str | None = None, retry_failed: bool = False, extend: bool = False, force: bool = False,
              allow_mixed_precision: bool = False, reuse_from: Sequence[str | Path] = (),
              hooks: RunHooks = RunHooks(), timeout_s: float | None = None) -> RunSummary:
    """Run every unfinished trial of ``study`` into ``store_path``. Everything checkable — backend, device, model,
    data, placements, an edited spec — is checked before the store is written. Ctrl-C marks the trials in flight
    interrupted and re-raises ``KeyboardInterrupt``. ``reuse_from``: other stores whose finished trials of the
    same id are taken over instead of trained (:mod:`loraplace.reuse`). ``timeout_s``: seconds after which no
    trial (or search rung run) starts; those in flight finish, ``timed_out`` is set when work is left (a tuned
    study's other seeds are added for every cell whose LR selection is complete, so they count), and the next run
    continues with it."""
    t0 = time.perf_counter()

    def stop_starting() -> bool:
        return timeout_s is not None and time.perf_counter() - t0 >= timeout_s
    store_path = Path(store_path)
    if backend not in BACKENDS:
        raise LoraplaceError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    Store.check_writable(store_path)  # before the model and the data are read: seconds, not a minute
    check_placements(study, force)
    if not allow_mixed_precision and backend == "local":  # Ray workers resolve auto on their own machines
        _check_precision(study, store_path)
    sources = [Path(s) for s in reuse_from]
    if sources:
        if study.search is not None:
            raise LoraplaceError("--reuse-from does not apply to a search (its rungs decide between steps of "
                                 "trials it trains itself)", "run the search without it")
        check_sources(sources, store_path)
    warnings = check_inputs(study)
    if study.tracking is not None:
        check_tracking(study.tracking)
    if study.search is not None:
        if backend != "local":
            raise LoraplaceError("a search runs on the local backend (its rungs decide between steps)",
                                 "run it without --backend ray; execution.fuse still fuses its candidates")
        if extend:
            raise LoraplaceError("--extend does not apply to a search: its candidates and rungs come from the spec",
                                 "to search other placements or LRs, use a new store (--store) or a new name:")
        planned = search_candidates(study)
        _check_search_unchanged(study, store_path)
    else:
        planned = _stored_plan(study, store_path)
        _check_unchanged(study, store_path, planned, extend)
    by_id = {p.id: p for p in planned}
    with Store(store_path) as store:
        record = store.open_study(study.info(), study.model_dump(mode="json"))
        if study.search is None:
            store.add_trials(record.id, [(p.id, p.labels, p.spec.model_dump(mode="json")) for p in planned])
        summary = RunSummary(recovered=store.recover_stale(record.id), warnings=warnings)
        summary.skipped = sum(1 for t in store.trials(record.id) if t.id in by_id and t.status == "done")
        artifacts = artifacts_dir(store_path)
        dtype_here = _auto_dtype_here(study) if sources and not allow_mixed_precision and backend == "local" else None

        def take_over(trials: dict[str, PlannedTrial]) -> None:  # --reuse-from: before training any of them
            if not sources:
                return
            reused = reuse_finished(store, record.id, trials, sources, artifacts, dtype_here=dtype_here,
                                    retry_failed=retry_failed)
            summary.reused += reused.count
            summary.warnings.extend(reused.warnings)
            for source, ids in reused.taken.items():
                if hooks.on_note is not None:
                    hooks.on_note(f"reused {plural(len(ids), 'finished trial')} from {source}")

        if backend == "ray":
            from loraplace.ray_backend import RayExecutor

            executor = RayExecutor(cpus=study.resources.cpus, gpus=study.resources.gpus, artifacts=artifacts,
                                   address=address, fuse=study.execution.ray_group_size())
        elif study.execution.fuse != "off":
            widest = max(planned, key=lambda p: (p.spec.train.micro_batch or p.spec.train.batch)
                         * p.spec.data.max_len).spec  # the most tokens one forward holds
            executor = FusedExecutor(study.model, fuse=study.execution.fuse, widest=widest,
                                     device=study.train.device, precision=study.train.precision,
                                     artifacts=artifacts, progress=hooks.progress,
                                     save_state_every=study.execution.save_state_every_s)
        else:
            executor = LocalExecutor(study.model, device=study.train.device, precision=study.train.precision,
                                     artifacts=artifacts, progress=hooks.progress,
                                     save_state_every=study.execution.save_state_every_s)
        tracker = None if study.tracking is None else Tracker(study.tracking, study.name, record.spec)
        if tracker is not None:
            hooks = _tracked(hooks, tracker)
        with executor, contextlib.ExitStack() as stack:
            if tracker is not None:
                stack.callback(lambda: summary.warnings.extend(tracker.warnings))
                stack.callback(tracker.close)
            if study.search is not None:
                try:
                    by_id = _search(study, store, record.id, planned, executor, artifacts, hooks, summary,
                                    retry_failed, stop_starting)
                except _TimedOut:  # between two rung runs: the store holds every result so far
                    summary.timed_out = True
            else:
                take_over(by_id)
                execute(store, record.id, by_id, executor, retry_failed=retry_failed, hooks=hooks, summary=summary,
                        stop_starting=stop_starting)
            while study.tune is not None and study.search is None and not summary.timed_out:
                # the other seeds at each cell's selected LR; with tune.extend, first the LRs past an edge
                more = {p.id: p for p in _planned_from(study, store.trials(record.id)) if p.id not in by_id}
                if not more:
                    break
                store.add_trials(record.id, [(p.id, p.labels, p.spec.model_dump(mode="json"))
                                             for p in more.values()])
                by_id |= more
                take_over(more)
                execute(store, record.id, more, executor, retry_failed=retry_failed, hooks=hooks,
                        summary=summary, stop_starting=stop_starting)
        summary.execution = getattr(executor, "decision", None)
        summary.failed_earlier = sum(1 for t in store.trials(record.id) if t.id in by_id and t.status == "failed") \
            - summary.failed
    summary.wall_s = time.perf_counter() - t0
    return summary


# --------------------------------------------------------------------------------------------- search


def search_candidates(study: StudySpec) -> list[PlannedTrial]:
    """A search's candidates as the full-horizon trials of its first seed: placements × LRs, in spec order (the
    ids are the tuned grid's own: the trial a candidate reaches at the full horizon is the grid's)."""
    assert study.search is not None
    size = study.sizes()[0]
    return [_planned(study, pname, placement, size, study.seeds[0], ((TUNED_AXIS, lr),))
            for pname, placement in study.placement_specs().items() for lr in study.search_lrs(pname)]


def candidates_of(study: StudySpec, planned: list[PlannedTrial] | None = None) -> list[Candidate]:
    """The search's candidates (placement, LR, preset or not) keyed by their first-seed trial ids."""
    planned = search_candidates(study) if planned is None else planned
    return [Candidate(p.id, p.labels.group.placement, float(dict(p.labels.group.axes)[TUNED_AXIS]),
                      is_preset(study.placements[p.labels.group.placement]), p.labels.group) for p in planned]


def _check_search_unchanged(study: StudySpec, store_path: Path) -> None:
    """A search resumes only under the spec it was started with (its rung decisions were made under it)."""
    stored = _stored(study, store_path)
    if stored is None:
        return
    record = stored[0]
    differences = spec_differences(_as_read_now({k: v for k, v in record.spec.items() if k != "versions"}),
                                   study.model_dump(mode="json"))
    if differences:
        shown = "\n".join(f"  {d}" for d in differences[:20])
        raise StudyChanged(f"search {study.name!r} in {store_path} was run with a different spec:\n{shown}",
                           "a search resumes only under its own spec: use a new store (--store) or a new name:")


class _TimedOut(Exception):
    """A search's rung run was not started: the run's timeout had passed."""


def _search(study: StudySpec, store: Store, study_id: int, planned: list[PlannedTrial], executor, artifacts: Path,
            hooks: RunHooks, summary: RunSummary, retry_failed: bool,
            stop_starting: Callable[[], bool]) -> dict[str, PlannedTrial]:
    """The rungs (each candidate's results and each rung's decision recorded in the store), then the finalists
    at every seed as ordinary trials. Returns the finalists' trials. Raises :class:`_TimedOut` instead of starting
    a rung run once ``stop_starting`` says so."""
    assert study.search is not None
    search = study.search
    specs = study.placement_specs()
    candidates = candidates_of(study, planned)
    by_key = {p.id: p for p in planned}
    rungs = rungs_of(rung_steps(search, len(candidates), study.train.steps, study.train.warmup))
    if hooks.on_note is not None:
        hooks.on_note(describe(candidates, rungs, search))

    def run(alive: list[Candidate], rung) -> Iterator:
        previous = rungs[rung.index - 1].steps if rung.index > 0 else 0
        tasks = [RungTask(c.key, by_key[c.key].spec, search_state_dir(artifacts, c.key), rung.index, rung.steps,
                          search.rung_examples, previous) for c in alive]
        names = {c.key: f"{c.placement} lr={c.lr:g}" for c in alive}
        if hooks.on_note is not None:
            hooks.on_note(f"rung {rung.index + 1}/{len(rungs)}: {len(tasks)} candidate(s) to {rung.steps} steps")
        step = max(1, executor.capacity)  # fused: the executor trains up to capacity candidates together
        for chunk in (tasks[i:i + step] for i in range(0, len(tasks), step)):
            if stop_starting():
                raise _TimedOut
            if hooks.on_rung_start is not None:
                hooks.on_rung_start(f"rung {rung.index + 1} ({rung.steps} steps) " + " + ".join(
                    names[t.candidate] for t in chunk))
            for result in executor.run_rung(chunk):
                summary.rung_runs += 1
                if hooks.on_note is not None:
                    told = f"val_loss={result.val_loss:.4f}" if result.val_loss is not None else \
                        f"failed: {result.failure.message if result.failure else ''}"
                    hooks.on_note(f"  {names[result.candidate]} @ {rung.steps} steps → {told}")
                yield result

    state = SearchState.of(store.rung_results(study_id), store.rung_decisions(study_id))
    finalists = run_rungs(candidates, rungs, search, state, run, lambda r: store.record_rung(study_id, r),
                          lambda d: store.record_decision(study_id, d), retry_failed=retry_failed,
                          note=hooks.on_note)
    first = study.seeds[0]
    hedge = [c for c in hedge_candidates(candidates, search, first) if c not in finalists]
    entrants = finalists + hedge  # every one runs the full horizon on the first seed
    staged = search.confirm is not None or bool(hedge)

    def trial_of(c: Candidate, seed: int) -> PlannedTrial:
        p = _planned(study, c.placement, specs[c.placement], study.sizes()[0], seed, c.group.axes)
        # a finalist's first seed continues its search state; a hedge candidate starts from scratch
        return dataclasses.replace(p, state=search_state_dir(artifacts, c.key)) \
            if seed == first and c in finalists else p

    def compare_with(compared: list[Candidate]) -> None:
        """The finalists are compared with the best preset among them (a search always keeps one)."""
        preset = next((c.placement for c in compared if c.preset), None)
        info = study.info()
        if preset is not None:
            info = info.model_copy(update={"baseline": preset, "baseline_given": True})
        elif compared:
            info = info.model_copy(update={"baseline": compared[0].placement, "baseline_given": True})
        store.open_study(info, study.model_dump(mode="json"))

    def run_trials(trials: dict[str, PlannedTrial]) -> None:
        store.add_trials(study_id, [(p.id, p.labels, p.spec.model_dump(mode="json")) for p in trials.values()])
        summary.skipped += sum(1 for t in store.trials(study_id) if t.id in trials and t.status == "done")
        execute(store, study_id, trials, executor, retry_failed=retry_failed, hooks=hooks, summary=summary,
                stop_starting=stop_starting)

    seeds = [first] if staged else study.seeds
    summary.skipped = 0  # the finalists' trials found done (run_trials adds them)
    trials = {p.id: p for c in entrants for seed in seeds for p in [trial_of(c, seed)]}
    compare_with(entrants)
    if hooks.on_note is not None:
        hooks.on_note(f"finalists: {', '.join(c.label for c in finalists)}"
                      + (f"; hedge bracket: {', '.join(c.label for c in hedge)}" if hedge else "")
                      + (f" at seed {first}, then the best {search.confirm} at every seed" if staged
                         else f" at {len(study.seeds)} seed(s)"))
    run_trials(trials)
    if staged and not summary.timed_out:
        done = {t.id: t for t in store.trials(study_id) if t.id in trials and t.status in ("done", "failed")}
        if len(done) == len(trials):  # every first-seed trial has its result: the choice can be made
            val = {c.key: done[c.key].metrics.val_loss if done[c.key].metrics is not None else None
                   for c in entrants}
            chosen = confirmed(entrants, val, search)
            compare_with(chosen)
            more = {p.id: p for c in chosen for seed in study.seeds[1:] for p in [trial_of(c, seed)]}
            if hooks.on_note is not None:
                hooks.on_note(f"confirmed: {', '.join(c.label for c in chosen)} at {len(study.seeds)} seed(s)")
            run_trials(more)
            trials |= more
    return trials
