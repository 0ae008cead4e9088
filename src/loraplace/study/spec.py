"""The study spec (``loraplace run SPEC.yaml``): placements × sizes × seeds × axes, with tune:, search:, execution:
and tracking:, validated in one place (every problem at once). No torch: read commands load it."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, create_model, field_validator

from loraplace.data import DataSpec
from loraplace.errors import ConfigError
from loraplace.formatting import parse_duration
from loraplace.placement.spec import DEFAULT_FILL, DEFAULT_RANK, Fill, PlacementSpec
from loraplace.records import Size, StudyInfo
from loraplace.search import SearchSpec
from loraplace.specs import StrictModel, bare_on_off, load_yaml, validate
from loraplace.tracking import TrackingSpec
from loraplace.train_config import TrainSpec
from loraplace.trial_spec import EvalSpec, eval_steps_problem, library_versions, variant_base_problem
from loraplace.tuning import TuneSpec

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
    """What one trial asks of a Ray cluster (--backend ray)."""

    cpus: float = Field(default=1, gt=0, description="CPUs per Ray task")
    gpus: float = Field(default=0, ge=0, description="GPUs per Ray task (fractions share a GPU)")


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
        "step read back; off: a killed trial starts again. On Ray the directory must be shared with the workers")

    @field_validator("fuse", mode="before", json_schema_input_type=int | Literal["auto", "off"] | bool)
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return bare_on_off(value, on="auto")

    @field_validator("save_state_every", mode="before",  # seconds, a duration ("10m") or off (YAML: false)
                     json_schema_input_type=Annotated[float, Field(ge=0)] | str | Literal[False])
    @classmethod
    def _yaml_off_state(cls, value: object) -> object:
        if value is False:
            return "off"
        if value is True:  # a bool is an int to pydantic: `on` would silently have meant every 1 s
            raise ValueError("save_state_every takes seconds (600), a duration ('10m', '1h') or off; on/true is "
                             f"not an interval (the default saves every {DEFAULT_SAVE_STATE_EVERY_S:g} s)")
        if isinstance(value, str) and value.strip().lower() != "off":
            return parse_duration(value, "save_state_every")  # "10m", as `run --timeout` takes
        return value

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
NonNegativeInt = Annotated[int, Field(ge=0)]


class StudySpec(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="the study's name in its store "
                      "(default store: runs/NAME.db)")
    model: str = Field(description="hub id, checkpoint directory, builtin:smollm2-135m or tiny:FAMILY")
    data: DataSpec = Field(description="the examples and their train / validation / test splits")
    train: TrainSpec = Field(default=TrainSpec(), description="how every trial trains")
    eval: EvalSpec = Field(default=EvalSpec(), description="how every trial is evaluated")
    placements: dict[str, PlacementSpec] = Field(min_length=1, description="name → placement: the arms compared")
    ranks: list[PositiveInt] | None = Field(default=None, min_length=1, description="ranks to compare every "
                                            "placement at (one size each)")
    budget: PositiveInt | None = Field(default=None, description="one trainable-parameter budget: each "
                                       "placement's rank is solved to it")
    budgets: list[PositiveInt] | None = Field(default=None, min_length=1, description="several budgets, each a "
                                              "compared size")
    seeds: list[NonNegativeInt] = Field(default=[0], min_length=1, description="seeds of every compared cell "
                                        "(3 for an interval; NumPy's seeding takes no negative seed)")
    axes: Axes = Field(default_factory=Axes, validate_default=True,  # its checks cover the grid without axes too
                       description=f"other train fields to sweep: {', '.join(AXIS_FIELDS)}")
    baseline: str | None = Field(default=None, description="the placement every other is compared with (default: "
                                 "the first, with a warning)")
    resources: Resources = Field(default=Resources(), description="per-trial resources on Ray")
    allow_unassigned: bool = Field(
        default=False, description="every placement may leave out weights that have no role (`run "
        "--allow-unassigned`); their trials and the report warn")
    fill: Fill = Field(default=DEFAULT_FILL, description="with budget(s): exact (rank r+1 on an evenly spread "
                       "subset of each placement's sites, within ~1 % of the budget) or uniform (one rank)")
    tune: TuneSpec | None = Field(default=None, description="per-placement LR selection on the validation split "
                                  "(see loraplace.tuning)")

    tracking: TrackingSpec | None = Field(default=None, description="log every trial to MLflow, TensorBoard and/or "
                                          "Weights & Biases (loraplace.tracking); changes no trial")
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

    @field_validator("axes")
    @classmethod
    def _every_trial_valid(cls, value, info: ValidationInfo):
        """What a single trial refuses, checked here over every value the grid will give it (a trial spec refused
        while the grid is expanded would be an internal error): PiSSA on a quantized base, eval points at or past
        the last step."""
        train, placements, eval_spec = (info.data.get(k) for k in ("train", "placements", "eval"))
        if train is None:
            return value
        sweep = cls.axis_values(value)
        problems = []
        for name, placement in (placements or {}).items():
            for quantize in dict.fromkeys(sweep.get("quantize", [train.quantize])):
                problem = variant_base_problem(placement.variant, quantize)
                if problem:
                    problems.append(f"placements.{name}: {problem}")
        if eval_spec is not None:
            for steps in dict.fromkeys(sweep.get("steps", [train.steps])):
                problem = eval_steps_problem(eval_spec, steps)
                if problem:
                    problems.append(problem)
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))
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
        if self.ranks is None and any(p.sets_own_size for p in self.placements.values()):
            # No size in the study, some placement sets its own: each keeps its own (the others: the default
            # rank), all in one cell so that they are compared — not a study-wide rank that clashes with theirs.
            return [Size(kind="own", value=DEFAULT_RANK)]
        return [Size(kind="rank", value=r) for r in (self.ranks or [DEFAULT_RANK])]

    def baseline_placement(self) -> str:
        """The placement the others are compared with: ``baseline``, else the first placement in spec order."""
        return self.baseline if self.baseline is not None else next(iter(self.placements))

    def info(self) -> StudyInfo:
        return StudyInfo(name=self.name, model=self.model, placements=tuple(self.placements),
                         baseline=self.baseline_placement(), baseline_given=self.baseline is not None,
                         versions=library_versions(),
                         tune_lrs=tuple(self.tuned_lrs()) if self.search is not None else
                         tuple(self.tune.all_lrs()) if self.tune is not None else (),
                         tune_lrs_by_placement={p: tuple(self.tune.lrs_for(p)) for p in self.placements}
                         if self.tune is not None and isinstance(self.tune.lr, dict) else {},
                         tune_seeds=(self.seeds[0],) if self.search is not None else
                         tuple(self.tune_seeds()) if self.tune is not None else (),
                         tune_extend=self.tune.extend if self.tune is not None and self.search is None else 0,
                         search=self.search is not None)

    def tuned_lrs(self, placement: str | None = None) -> list[float]:
        """The learning rates a search's (or a tuned grid's) candidates are drawn from: ``placement``'s tune.lr
        (every placement's: their union), else the one train.lr."""
        if self.tune is None:
            return [self.train.lr]
        return self.tune.all_lrs() if placement is None else self.tune.lrs_for(placement)


OPTIONAL_SECTIONS = ("search", "tune", "tracking", "execution", "eval", "axes", "resources")
DEFAULT_SECTIONS = ("search", "execution", "eval", "resources")  # `{}` is a valid value: every field has a default


def spec_as_written(stored: dict[str, Any]) -> dict[str, Any]:
    """A study spec as its store holds it, less the library ``versions`` that v1 and v2 stores kept inside it (they
    live in ``StudyInfo.versions`` since): the spec as the user wrote it."""
    return {k: v for k, v in stored.items() if k != "versions"}


def study_from_store(stored: dict[str, Any]) -> StudySpec:
    """A store's study spec (``StudyRecord.spec``) validated as this loraplace reads it."""
    return StudySpec.model_validate(spec_as_written(stored))


def load_study(path: str | Path) -> StudySpec:
    data = load_yaml(path)
    if data is None:  # not "not a mapping": there is nothing in it
        raise ConfigError([f"{path}: the file is empty (or only comments)"], "invalid study spec",
                          "a study spec names at least model, data and placements: see examples/quickstart.yaml")
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a study spec is a mapping at the top level"], "invalid study spec")
    # `search:` with nothing after it is YAML null, which would mean "no search": the full grid would run without a
    # word. An optional section written empty is refused instead, saying what {} does.
    empty = [key for key in OPTIONAL_SECTIONS if key in data and data[key] is None]
    if empty:
        raise ConfigError([f"{path}: {key}: is empty (nothing after the colon reads as null) — "
                           + (f"write {key}: {{}} for its defaults, or " if key in DEFAULT_SECTIONS else "give its "
                              "settings, or ") + "leave the key out" for key in empty], "invalid study spec")
    # Data file paths are relative to the spec file, so a study runs the same from any directory.
    data_section = data.get("data")
    if isinstance(data_section, dict):
        base = Path(path).resolve().parent
        for key in ("train", "eval", "test", "validation"):
            value = data_section.get(key)
            if isinstance(value, str) and ":" not in value.split("/")[0] and not Path(value).is_absolute():
                data_section[key] = str((base / value).resolve())
    return validate(StudySpec, data, f"invalid study spec {path}")


SCHEMA_FILE = "docs/study.schema.json"  # the committed copy of study_json_schema(), beside the docs


def study_json_schema() -> dict[str, Any]:
    """The study YAML's JSON Schema (draft 2020-12), from :class:`StudySpec` itself: every key, type, default and
    description, so an editor (yaml-language-server: ``# yaml-language-server: $schema=…`` on a spec's first
    line) completes and checks keys as the user types. What the schema cannot say (one of several keys, a
    data file that must exist) ``load_study`` still checks."""
    schema = StudySpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "loraplace study spec",
            "description": "A loraplace study: placements × sizes × seeds (× axes) trained on one model and "
            "data and compared on the test split; `loraplace run SPEC.yaml`."} | {
                k: v for k, v in schema.items() if k not in ("title", "description")}


def default_store(study: StudySpec) -> Path:
    return Path("runs") / f"{study.name}.db"
