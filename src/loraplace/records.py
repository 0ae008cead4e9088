"""The records that cross layer boundaries: what a trial produces, what the store keeps, what analysis reads.

Every record is an immutable pydantic model with ``extra="forbid"``: it is built once by its producer, written as
JSON by the store, and validated again when read back, so a consumer never guesses at keys. This module imports
no torch and no SQL; the store, the runners and the analysis all depend on it and on nothing of each other's.

* :class:`TrialOutcome` — the one result of a trial, done or failed (``status`` + :class:`Failure`).
  :class:`Metrics` holds only *measured* quantities (each with its unit); counters and sizes are typed fields.
* :class:`CurvePoint` / :class:`EvalPoint` — the training and periodic-eval curves.
* :class:`Site` / :class:`SiteMap` — where adapters sit (layer × role) and at what rank.
* :class:`Size`, :class:`GroupKey`, :class:`TrialLabels` — a trial's place in a study grid; a group of trials
  (one cell, all seeds) is identified by a :class:`GroupKey` value, never by a formatted string.
* :class:`StudyInfo` — what analysis needs to know about a study (model, placements in spec order, baseline).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Record(BaseModel):
    """Immutable, strict: an unknown key in stored JSON is an error, not something silently dropped."""

    # inf/NaN are written as JSON's Infinity/NaN (not null), so a record reads back exactly as it was written.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


def lora_params(rank: int, in_features: int, out_features: int) -> int:
    """Trainable parameters of one LoRA adapter: A is [rank, in], B is [out, rank]."""
    return rank * (in_features + out_features)


# --------------------------------------------------------------------------------------------- sites


class Site(Record):
    """One adapted site. ``layer`` is None for the LM head."""

    layer: int | None
    role: str
    rank: int = Field(gt=0)


class SiteMap(Record):
    """Where a placement put its adapters: enough to draw the layers × roles map without the model."""

    num_layers: int = Field(ge=0)
    roles: tuple[str, ...] = Field(description="the roles this architecture has, in canonical order")
    sites: tuple[Site, ...] = ()

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sites if s.layer is not None})

    @property
    def layer_selective(self) -> bool:
        """True when some layers carry no adapter at all."""
        return bool(self.sites) and len(self.layers) < self.num_layers

    @property
    def ranks(self) -> list[int]:
        return sorted({s.rank for s in self.sites})


# --------------------------------------------------------------------------------------------- trial outcome


class CurvePoint(Record):
    step: int = Field(ge=1, description="optimizer step (1-based)")
    loss: float = Field(description="token-weighted mean train loss of the step, nats/token")
    tokens: int = Field(ge=0, description="non-pad training tokens seen up to and including this step")
    lr: float = Field(ge=0, description="learning rate used by this step")


class EvalPoint(Record):
    """A loss measured during training: on the validation split when the data has one (the test split is never
    looked at before the end), else on the test split (older specs)."""

    step: int = Field(ge=1)
    eval_loss: float = Field(description="nats/token over the split's evaluated examples")
    split: Literal["validation", "test"] = "test"
    examples: int | None = Field(default=None, ge=1, description="the split's first N examples were evaluated "
                                 "(eval.watch_examples: what a search's rung reads); None: the whole split")


class TrainerProgress(Record):
    """What a trial's training recorded up to a saved state (``stepper.TrainerState``: the part that is not
    tensors). A continued run starts from it and appends to it."""

    steps: int = Field(ge=0, description="optimizer steps taken and read back")
    total: int = Field(ge=1, description="the run's full length in steps (its LR schedule's horizon)")
    real_tokens: int = Field(ge=0)
    label_tokens: int = Field(ge=0)
    train_s: float = Field(ge=0, description="training wall time so far, s (periodic evals excluded)")
    first_step_s: float = Field(ge=0)
    curve: tuple[CurvePoint, ...] = ()
    evals: tuple[EvalPoint, ...] = ()
    notes: tuple[str, ...] = ()
    tensors: tuple[str, ...] = Field(description="the adapter tensors saved beside it, in order ('path:lora_A', …)")
    train: str = Field(description="the TrainSpec JSON it trains under (a state continues only the same spec)")


class BuiltRanks(Record):
    """The rank and alpha a data-driven init (EVA) gave each of a trial's sites, kept beside its saved training
    state (``built_ranks.json``): a continued run injects its adapters at these ranks and loads the state over
    them, instead of redoing the init's SVD passes, whose weights the state overwrites anyway."""

    FILE: ClassVar[str] = "built_ranks.json"

    variant: str = Field(description="the variant whose init chose them (eva)")
    ranks: dict[str, int] = Field(description="site path → rank; a site the init dropped is absent")
    alphas: dict[str, float] = Field(description="site path → lora_alpha, as the init left it")


class Metrics(Record):
    """The measured quantities a study compares. Units are in the names or the descriptions."""

    eval_loss: float = Field(description="token-weighted mean loss on the test split, nats/token")
    perplexity: float = Field(description="exp(eval_loss)")
    accuracy: float | None = Field(default=None, ge=0, le=1,
                                   description="exact-match fraction on the test split (generation)")
    val_loss: float | None = Field(default=None, description="token-weighted mean loss on the validation split "
                                   "(selection only; None when the data has no validation split)")
    # None below: not recorded (only in stores written by loraplace's first schema).
    tokens_per_s: float | None = Field(default=None, ge=0, description="non-pad training tokens per second")
    train_s: float | None = Field(default=None, ge=0, description="seconds in the training loop (evals excluded)")
    peak_mem_mb: float | None = Field(default=None, ge=0,
                                      description="peak memory, MiB (CUDA allocator peak, or the process's RSS peak)")

    def measured(self) -> dict[str, float]:
        """metric name → value, for the metrics that were measured (accuracy only when generation ran)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Timings(Record):
    """Seconds spent outside the training loop."""

    load_s: float = Field(default=0.0, ge=0, description="model load (0 when a session reused a loaded model)")
    tokenize_s: float = Field(default=0.0, ge=0)
    eval_s: float = Field(default=0.0, ge=0, description="final eval loss + generation")
    first_step_s: float = Field(default=0.0, ge=0, description="the first training step alone, part of train_s "
                                "(torch.compile compiles there; the rest of train_s is the steady state)")


class Environment(Record):
    device: str = ""
    dtype: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    quantize: str = Field(default="none", description="how the frozen base was loaded: none, or the bitsandbytes "
                          "quantization (nf4 | fp4 | int8)")


class GenerationSample(Record):
    prompt: str
    generated: str
    expected: str | None
    extracted: str | None


class AccuracyDetail(Record):
    accuracy: float | None
    n: int = Field(ge=0, description="examples with a gold final number")
    correct: int = Field(ge=0)
    generate_s: float = Field(ge=0)
    samples: tuple[GenerationSample, ...] = ()


class Failure(Record):
    """Why a trial did not finish. ``user_error``: a problem in the user's inputs (placement, data, model), shown
    like any other configuration error; otherwise something went wrong while training or saving."""

    kind: Literal["invalid", "non_finite", "error"]
    message: str
    step: int | None = Field(default=None, description="the optimizer step it failed at, when known")
    hint: str | None = None

    @property
    def user_error(self) -> bool:
        return self.kind == "invalid"


class Adapter(Record):
    path: str = Field(description="directory of the PEFT-format adapter")
    bytes: int = Field(ge=0, description="size on disk of every file in it")


class ProbeSite(Record):
    """One probed site: its importance score and shape (how it is computed: :mod:`loraplace.probe`)."""

    layer: int
    role: str
    path: str
    in_features: int
    out_features: int
    score: float = Field(description="the measure's score (ProbeScores.measure): gradient — ‖G_r‖_F of the loss "
                         "gradient, per label token; nfn — the normalized feature norm (actual / random); warmup — "
                         "the relative update (update_norm / output_norm)")
    grad_norm: float = Field(description="‖G‖_F (gradient; 0 for nfn and warmup)")
    rank: int = Field(description="the r the score is taken at")
    spectrum: tuple[float, ...] = Field(default=(), description="σ_i² of G, largest first (may be dropped); for "
                                        "an expert site, summed over experts per index")
    experts: int = Field(default=1, ge=1, description="LoRA pairs a rank buys here: one per expert (1: a linear)")
    actual: float | None = Field(default=None, description="nfn: mean over real tokens of ‖Ŵẑ‖/√d_in (Ŵ = W/rms(W), "
                                 "ẑ = z/‖z‖), averaged over batches")
    random: float | None = Field(default=None, description="nfn: the same for normalised Gaussian inputs")
    update_norm: float | None = Field(default=None, description="warmup: mean over real tokens of ‖ΔW·x‖, the "
                                      "warmed-up adapter's output (scaling included)")
    output_norm: float | None = Field(default=None, description="warmup: mean over the same tokens of the frozen "
                                      "module's output norm ‖W·x + b‖")

    def value(self, rank: int) -> float:
        """‖G_rank‖_F: what a rank-``rank`` adapter on this site can buy, to first order."""
        return math.sqrt(sum(self.spectrum[:rank]))

    def params_at(self, rank: int) -> int:
        """Trainable parameters of a rank-``rank`` adapter here (every expert counted)."""
        return self.experts * lora_params(rank, self.in_features, self.out_features)

    @property
    def params(self) -> int:
        return self.params_at(self.rank)

    @property
    def efficiency(self) -> float:
        return self.score / self.params

    @property
    def captured(self) -> float:
        """Share of G's energy in its top-r directions (how low-rank the useful update is)."""
        return (self.score / self.grad_norm) ** 2 if self.grad_norm > 0 else 0.0


# What a probe measures (``ProbeScores.measure``): the auto methods probe and gradient read the gradient probe.
ProbeMeasure = Literal["gradient", "nfn", "warmup"]


class ProbeScores(Record):
    """The importance probe's scores of every (layer, role) site of a model on some data."""

    measure: ProbeMeasure = Field(
        default="gradient", description="gradient: ‖G_r‖_F of the loss gradient (forward + backward); nfn: PLoP's "
        "normalized feature norm (forward only); warmup: the relative update of rank-r adapters on every linear "
        "after a short warm-up (trains warmup_steps steps, then forward only)")
    model: str
    rank: int
    batches: int
    label_tokens: int
    seconds: float
    passes: int = Field(description="passes over the batches (sites are probed in memory-bounded groups)")
    num_layers: int
    roles: tuple[str, ...]
    sites: tuple[ProbeSite, ...]
    warmup_steps: int | None = Field(default=None, description="warmup: optimizer steps the adapters trained")
    warmup_lr: float | None = Field(default=None, description="warmup: their constant learning rate")

    def matrix(self, value: str = "score") -> list[list[float]]:
        """layers × roles (``self.roles`` order) of a site attribute; NaN where the architecture has no such site."""
        out = [[math.nan] * len(self.roles) for _ in range(self.num_layers)]
        for s in self.sites:
            v = getattr(s, value)
            out[s.layer][self.roles.index(s.role)] = math.nan if v is None else v
        return out

    def without_spectra(self) -> ProbeScores:
        return self.model_copy(update={"sites": tuple(s.model_copy(update={"spectrum": ()}) for s in self.sites)})

    def to_dict(self) -> dict[str, Any]:
        """probe.json and ``loraplace probe --json``: the record plus each site's params, efficiency, captured."""
        data = self.model_dump(mode="json")
        for site, out in zip(self.sites, data["sites"], strict=True):
            out |= {"params": site.params, "efficiency": site.efficiency, "captured": site.captured}
        return data


class TrialOutcome(Record):
    """Everything one trial produced. ``status == "done"`` ⇔ ``metrics`` is set and ``failure`` is not."""

    status: Literal["done", "failed"]
    failure: Failure | None = None
    metrics: Metrics | None = None
    trainable_params: int = Field(default=0, ge=0)
    total_params: int = Field(default=0, ge=0, description="base model parameters (no adapters)")
    steps: int = Field(default=0, ge=0, description="optimizer steps completed")
    train_tokens: int = Field(default=0, ge=0, description="non-pad training tokens")
    label_tokens: int = Field(default=0, ge=0, description="training tokens that carried a loss")
    eval_tokens: int = Field(default=0, ge=0, description="label tokens of the eval split")
    curve: tuple[CurvePoint, ...] = ()
    evals: tuple[EvalPoint, ...] = ()
    sites: SiteMap | None = None
    probe: ProbeScores | None = None
    accuracy_detail: AccuracyDetail | None = None
    timings: Timings = Timings()
    environment: Environment = Environment()
    adapter: Adapter | None = None
    warnings: tuple[str, ...] = ()
    fused_with: int = Field(default=0, ge=0, description="other trials trained in the same pass over the base model "
                            "(loraplace.fused); 0: trained alone")
    init_examples: int | None = Field(default=None, ge=0, description="examples a data-driven init (EVA's SVD) ran "
                                      "forward for this trial (0: none, e.g. its saved state was continued); None: "
                                      "not measured (trained in a fused group, or by an older loraplace)")
    reused_from: str | None = Field(default=None, description="the store this outcome was taken over from by "
                                    "`run --reuse-from` (the trial was trained there, under the same id and spec; "
                                    "its timings are that run's); None: trained in this store")

    @model_validator(mode="after")
    def _consistent(self) -> TrialOutcome:
        if self.status == "done" and (self.metrics is None or self.failure is not None):
            raise ValueError("a done trial has metrics and no failure")
        if self.status == "failed" and (self.failure is None or self.metrics is not None):
            raise ValueError("a failed trial has a failure and no metrics")
        return self

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @classmethod
    def failed(cls, failure: Failure, **known: Any) -> TrialOutcome:
        return cls(status="failed", failure=failure, **known)

    def summary(self, scalars_only: bool = False) -> dict[str, Any]:
        """A flat view for scripts (``train --json``, exports): measured metrics, sizes, counters and timings."""
        out: dict[str, Any] = {} if scalars_only else {"status": self.status}
        if self.failure is not None and not scalars_only:
            out |= {"error": self.failure.message, "failed_step": self.failure.step}
        if self.metrics is not None:
            out |= self.metrics.measured()
        out |= {"trainable_params": self.trainable_params, "trainable_percent": self.trainable_percent,
                "total_params": self.total_params, "steps": self.steps, "train_tokens": self.train_tokens,
                "label_tokens": self.label_tokens, "eval_tokens": self.eval_tokens} | self.timings.model_dump()
        if not scalars_only:
            out |= {"device": self.environment.device, "dtype": self.environment.dtype,
                    "adapter_dir": self.adapter.path if self.adapter is not None else None,
                    "adapter_bytes": self.adapter.bytes if self.adapter is not None else None,
                    "versions": self.environment.versions, "warnings": list(self.warnings)}
        return out


# --------------------------------------------------------------------------------------------- study grid


class Size(Record):
    """A size point of the grid: a fixed rank, a trainable-parameter budget the rank is solved for, or (``own``,
    a study that sets no size while some placement sets its own rank, ranks or budget) each placement's own size,
    ``value`` being the rank of those that set none."""

    kind: Literal["rank", "budget", "own"]
    value: int = Field(gt=0)

    @property
    def label(self) -> str:
        return {"rank": f"r={self.value}", "budget": f"B={self.value:,}", "own": "own size"}[self.kind]


AxisValue = int | float | str


class GroupKey(Record):
    """One cell of a study grid: (placement, size, other axes). Its trials differ only by seed."""

    placement: str
    size: Size
    axes: tuple[tuple[str, AxisValue], ...] = Field(default=(), description="(train field, value), sorted by name")

    @property
    def cell(self) -> tuple[Size, tuple[tuple[str, AxisValue], ...]]:
        """What a comparison holds fixed: the size and the other axes (placements differ)."""
        return self.size, self.axes

    @property
    def size_label(self) -> str:
        return " ".join([self.size.label] + [f"{k}={v}" for k, v in self.axes])

    @property
    def label(self) -> str:
        return f"{self.placement} {self.size_label}"


class TrialLabels(Record):
    group: GroupKey
    seed: int


class StudyInfo(Record):
    """What a study is, for readers of its store (the full spec is stored beside it, as written)."""

    name: str
    model: str
    placements: tuple[str, ...] = Field(description="placement names in the spec's order")
    baseline: str = Field(description="the placement others are compared with")
    baseline_given: bool = Field(description="False: the spec named none and the first placement is used")
    versions: dict[str, str] = Field(default_factory=dict)
    tune_lrs: tuple[float, ...] = Field(default=(), description="tune: the LRs each cell selects from (empty: "
                                        "no tuning)")
    tune_lrs_by_placement: dict[str, tuple[float, ...]] = Field(
        default_factory=dict, description="tune with a list per placement: placement → the LRs its cells select "
        "from (tune_lrs is then their union); empty: every placement selects from tune_lrs")
    tune_seeds: tuple[int, ...] = Field(default=(), description="tune: the seeds of the selection pass")
    tune_extend: int = Field(default=0, ge=0, description="tune.extend: LRs each cell may add past an edge of its "
                             "list (loraplace.tuning.cell_lrs)")
    search: bool = Field(default=False, description="a placement search (loraplace.search): its trials are the "
                         "finalists, tune_lrs the LRs its candidates were drawn from")
    data_fingerprints: dict[str, str] = Field(default_factory=dict, description="each data source → its content "
                                              "when the study last ran (DataSpec.fingerprints): a resume on other "
                                              "content is refused; empty: stored before this was recorded")



def config_without_seed(trial_spec: dict[str, Any]) -> dict[str, Any]:
    """A resolved trial spec (JSON) minus its seed: what every trial of one group must share."""
    train = trial_spec.get("train")
    if not isinstance(train, dict):
        return trial_spec
    return trial_spec | {"train": {k: v for k, v in train.items() if k != "seed"}}


class Candidate(Record):
    """One compared group of a study, as ``loraplace recommend`` states it."""

    placement: str
    size: str = Field(description="the group's size label (r=…, B=…, plus other axes)")
    lr: float | None = Field(default=None, description="the learning rate its trials ran at")
    trainable_params: int = Field(ge=0)
    value: float = Field(description="mean over seeds of the metric")
    interval: tuple[float, float] | None = Field(default=None, description="95 % t interval of the mean "
                                                 "(None: one seed)")
    seeds: int = Field(ge=1)


class Recommendation(Record):
    """What ``loraplace recommend`` answers: the placement to use, the evidence, and the exact placement spec."""

    study: str
    model: str
    metric: str = Field(description="the Metrics field compared (eval_loss: the test split; accuracy)")
    metric_label: str = Field(description="how the report names it, with its split")
    lower_is_better: bool
    budget: int | None = Field(default=None, description="only placements with at most this many trainable "
                               "parameters were considered")
    chosen: Candidate
    runner_up: Candidate | None = None
    distinguishable: bool | None = Field(default=None, description="the seed-paired 95 % interval of the "
                                         "difference excludes 0 (None: no runner-up)")
    difference: float | None = Field(default=None, description="chosen − runner-up, mean over shared seeds")
    difference_interval: tuple[float, float] | None = None
    p_value: float | None = None
    reason: str = Field(description="the choice and its evidence in one plain paragraph")
    placement_spec: dict[str, Any] = Field(description="a placement spec that resolves to exactly the chosen "
                                           "trials' sites and ranks (plan / export-placement take it)")
    tuned: bool = Field(description="each placement ran at its own selected learning rate")
    trial_spec: dict[str, Any] = Field(default_factory=dict, description="the resolved spec of the chosen group's "
                                       "first trial (model, data, train: what the result was measured with)")
    adapter: str | None = Field(default=None, description="the trained PEFT adapter of the chosen group's best seed "
                                "(a directory PeftModel.from_pretrained loads), when the store kept it")
    adapter_seed: int | None = Field(default=None, description="the seed whose adapter that is")
    at: dict[str, str] = Field(default_factory=dict, description="recommended among the groups at these values of "
                               "the study's swept axes only (--at; empty: across every value)")
    quantize: str = Field(default="none", description="how the chosen trials' frozen base was loaded (none | nf4 | "
                          "fp4 | int8): the adapter is loaded onto the base quantized the same way")
    bnb_4bit_use_double_quant: bool = Field(default=True, description="4-bit: the base's constants were quantized too")
    incomplete: str | None = Field(default=None, description="what the study has not finished (trials pending, "
                                   "running, interrupted or failed; seeds the chosen placement has not run): the "
                                   "answer may change; None: finished")


# --------------------------------------------------------------------------------------------- search


class RungResult(Record):
    """One candidate of a placement search measured at one rung: trained (continuing its saved state) up to
    ``steps`` and evaluated on the validation split (or its first ``val_examples``). The cost fields count what
    this rung spent on this candidate, for the search's compute ledger."""

    candidate: str = Field(description="the candidate's key: its seed-0 trial id")
    rung: int = Field(ge=0)
    steps: int = Field(ge=1, description="optimizer steps the candidate has taken at this rung")
    status: Literal["done", "failed"]
    val_loss: float | None = Field(default=None, description="validation loss at ``steps``, nats/token")
    failure: Failure | None = None
    trained_steps: int = Field(ge=0, description="steps this rung adds: from the previous rung's on (what it costs "
                               "uninterrupted; steps a kill made it redo are not counted)")
    trained_examples: int = Field(default=0, ge=0, description="training examples those steps read (fwd+bwd)")
    eval_examples: int = Field(default=0, ge=0, description="validation examples evaluated (forward only)")
    init_examples: int = Field(default=0, ge=0, description="examples a data-driven init (EVA's SVD) ran forward "
                               "when the candidate's adapters were injected for this rung")
    train_s: float = Field(default=0.0, ge=0)
    eval_s: float = Field(default=0.0, ge=0)
    fused_with: int = Field(default=0, ge=0, description="other candidates trained in the same pass (0: alone)")
    notes: tuple[str, ...] = Field(default=(), description="e.g. why a candidate of a fused rung ran alone")

    @model_validator(mode="after")
    def _consistent(self) -> RungResult:
        if (self.status == "done") != (self.val_loss is not None and self.failure is None):
            raise ValueError("a done rung result has a validation loss and no failure; a failed one a failure")
        return self


class RungDecision(Record):
    """What a search decided at one rung, from the rung's results (recorded once; a resumed search must take
    the same decision)."""

    rung: int = Field(ge=0)
    steps: int = Field(ge=1)
    ranked: tuple[str, ...] = Field(description="the candidates in, best first (failed last)")
    kept: tuple[str, ...] = Field(description="promoted to the next rung (at the last rung: the finalists)")
    anchored: str | None = Field(default=None, description="a preset kept only because it was the preset ranked "
                                 "best at this rung (so a preset always reaches the finalists)")
    last: bool = Field(default=False, description="the search's last rung: ``kept`` are its finalists (a decision "
                       "stored before this field existed reads False; :meth:`same_as` compares it only when both "
                       "have it)")

    def same_as(self, other: RungDecision) -> bool:
        """The same decision: ``last`` compared only when both records carry it (older stores do not)."""
        if "last" not in self.model_fields_set or "last" not in other.model_fields_set:
            return self.model_copy(update={"last": other.last}) == other
        return self == other
