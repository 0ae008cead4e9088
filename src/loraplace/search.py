"""Placement search: a tuned grid's answer — placement and learning rate — for a fraction of its cost.

``search:`` in a study turns its grid into successive halving over *candidates* = placements × ``tune.lr`` (or the
one ``train.lr``), on the first seed. Each rung trains every surviving candidate up to the rung's step count and
judges it on the **validation** split; the best ``1/eta`` go on. A promoted candidate continues from its saved
state (:class:`loraplace.stepper.Continuation`): its LR schedule is the full horizon's (``train.steps``), so a
candidate's rung-k model is exactly the first steps of the run the full grid would make, and the step it reaches
at the last rung is the grid's trial itself. The last rung picks the ``finalists``: the best placements, each at
its own best LR. Those then run every seed at the full horizon (seed 0 continues its search state) as ordinary
trials, and the usual seed-paired analysis on the **test** split compares them.

**A preset always reaches the finalists.** Placements given as a bare ``preset:`` are the presets. At every
rung the preset candidate ranked best *at that rung* is kept even if it ranks below the cut
(:attr:`RungDecision.anchored` records it), so a preset is always among the finalists, and
:func:`loraplace.analysis.recommend.recommend` answers with that preset whenever the winner is not distinguishable
from it. What this does **not** promise: that the finalist preset is the preset that would rank best at the full
horizon — a preset ranked below another preset at an early rung can be cut there (on GSM8K, ``mlp`` at 1e-2 was
cut at step 3 of 40 because ``ff-up`` ranked higher; docs/search.md). The answer is never worse than the best
preset *as the rungs ranked them*.

**Cut rate.** Each rung but the last keeps the best 1/eta. When the floor of the first rung (the warm-up, or
``min_fraction`` of the horizon) would push rungs together, every rung is spread geometrically between the floor
and the last rung (:func:`rung_steps`); when they still cannot each have their own step count, every rung cuts by
the same larger factor (:func:`keep_rate`), never one rung the whole excess.

**Policies** (``docs/replay.md``, compared by replaying them on stored grids): ``screen_lrs`` (the first rungs
cut across LRs within each placement), ``min_fraction`` (no rung before that share of the horizon),
``stop_when_stable`` (PASHA: the rungs end once the finalists stop changing), ``hedge`` (Hyperband's bracket
with no early stop: a seeded draw of candidates straight to the full horizon beside the finalists) and
``confirm`` (only the best N of those, by their full-horizon validation loss on the first seed, run the other
seeds). A rung whose every candidate failed raises :class:`SearchFailed` and stays undecided.

**The rule is native to the store, not Optuna's pruner.** Optuna's ``SuccessiveHalvingPruner`` is asynchronous
(ASHA): whether a trial is pruned depends on which trials happened to report first, so a search resumed after a
kill could decide differently, and its decisions would live in Optuna's storage beside ours. Here a rung decides
once all its results are in, from those results alone (ties: spec order), and the decision is written once to
the store (``rung_decisions``); a resumed search recomputes it and the store refuses a different one.

Kill safety: a candidate's training state is saved atomically at each rung (``artifacts/search/<id>/``); a rung
result is recorded after its state is saved, so a kill between the two re-evaluates (no step is trained twice)
and a kill mid-rung continues from the previous rung's state (only the steps since then are redone).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from loraplace.errors import LoraplaceError
from loraplace.placement.spec import PlacementSpec
from loraplace.records import GroupKey, RungDecision, RungResult
from loraplace.specs import StrictModel

# A rung as a fraction of the horizon (train.steps): the same policy at any number of steps.
RungFraction = Annotated[float, Field(gt=0, lt=1)]

SEARCH_DIR = "search"  # under the store's artifacts: one folder of saved training state per candidate

# ``search: {}`` is the policy chosen by replay on the nl2bash and e2e grids (docs/replay.md, "diverse"): a first
# rung at 5 % of the horizon that cuts LRs within each placement (each keeps its best), a second at 20 % that cuts
# placements (eta 4) down to two finalists, of which the better by full-horizon validation loss runs every seed;
# each rung reads the first 24 validation examples.
DEFAULT_RUNGS: tuple[float, ...] = (0.05, 0.2)
DEFAULT_RUNG_EXAMPLES = 24


class SearchSpec(StrictModel):
    """``search:`` in a study. Every field has a default: ``search: {}`` is the policy chosen by replaying
    policies on stored grids of two tasks (docs/replay.md): rungs at 5 and 20 % of the horizon, the first cutting
    LRs within each placement, eta 4, two finalists of which the better confirms at every seed, 24 validation
    examples a rung."""

    eta: int = Field(default=4, ge=2, description="each rung keeps the best 1/eta of its candidates (rounded up); "
                     "faster when the rungs are fewer than the cuts to the finalists need")
    finalists: PositiveInt = Field(default=2, description="placements that reach the full horizon on the first "
                                   "seed (and every seed, unless confirm picks among them)")
    rungs: list[PositiveInt] | list[RungFraction] | None = Field(
        default=list(DEFAULT_RUNGS), min_length=1, description="the rungs, increasing: step counts, each below "
        "train.steps, or fractions of train.steps (0 < f < 1: [0.05, 0.2] is steps 2 and 8 of 40, 8 and 32 of "
        "160), rounded to the nearest step (default: [0.05, 0.2]); null: the computed ladder, "
        "train.steps / eta^k from min_steps / min_fraction up — what min_steps or min_fraction without rungs gives")
    min_steps: PositiveInt | None = Field(default=None, description="the computed ladder's first rung's least step "
                                          "count (default: train.warmup, at least 1)")
    rung_examples: PositiveInt | None = Field(default=DEFAULT_RUNG_EXAMPLES, description="validation examples a "
                                              "rung evaluates (the split's first N, the same for every candidate; "
                                              "null: all). The finalists are always evaluated on the whole split")
    min_fraction: float | None = Field(default=None, gt=0, lt=1, description="the computed ladder's first rung's "
                                       "least step count as a fraction of train.steps (with min_steps: the later "
                                       "of the two); a rung earlier than that ranks how fast a candidate starts, "
                                       "not where it ends")
    screen_lrs: NonNegativeInt = Field(default=1, description="the first N rungs cut across learning rates only: "
                                       "each placement keeps its best ceil(n/eta) LRs, and no placement is cut "
                                       "before rung N+1 (diversity: a placement is not lost to its worst LRs)")
    stop_when_stable: bool = Field(default=False, description="PASHA: a rung whose finalists (the best LR of "
                                   "each of the best placements) are the ones the previous rung would have "
                                   "picked ends the rungs there; later rungs run only while that choice moves")
    hedge: NonNegativeInt = Field(default=0, description="Hyperband's hedge bracket: this many candidates, drawn "
                                  "at random (seeded by the first seed) before any rung, train straight to the full "
                                  "horizon on the first seed with no early stop and join the finalists")
    confirm: PositiveInt | None = Field(default=1, description="how many of the finalists (and hedge "
                                        "candidates) run the other seeds: the best by full-horizon validation loss "
                                        "on the first seed; the others stop at one seed and are not compared "
                                        "(null: every finalist runs every seed)")

    @model_validator(mode="before")
    @classmethod
    def _floor_means_the_ladder(cls, data: object) -> object:
        # min_steps / min_fraction place the computed ladder's first rung: given without rungs, they ask for it.
        if isinstance(data, dict) and "rungs" not in data and (data.get("min_steps") is not None
                                                               or data.get("min_fraction") is not None):
            return {**data, "rungs": None}
        return data

    @model_validator(mode="after")
    def _floor_with_given_rungs(self) -> SearchSpec:
        if self.rungs is not None and (self.min_steps is not None or self.min_fraction is not None):
            raise ValueError("search.min_steps and search.min_fraction place the computed ladder's first rung: "
                             "with rungs given, put the first rung where you want it (or write rungs: null)")
        return self

    @field_validator("rungs", mode="before")
    @classmethod
    def _one_kind(cls, value: object) -> object:
        # A list mixing both kinds would fail both branches of the union with two unrelated messages; one says why.
        if isinstance(value, list | tuple):
            fractions = [v for v in value if isinstance(v, float) and not v.is_integer()]
            odd = [v for v in fractions if not 0 < v < 1]
            if odd:
                raise ValueError(f"search.rungs: {odd[0]:g} is neither a step count (a whole number) nor a "
                                 "fraction of train.steps (0 < f < 1)")
            if fractions and len(fractions) < len(value):
                raise ValueError("search.rungs are step counts (whole numbers) or fractions of train.steps "
                                 f"(0 < f < 1), not both: {list(value)}")
        return value

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: list[int] | list[float] | None) -> list[int] | list[float] | None:
        if value is not None and any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("search.rungs must be strictly increasing")
        return value


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One placement at one LR, on the first seed: ``key`` is the id of its full-horizon trial."""

    key: str
    placement: str
    lr: float
    preset: bool
    group: GroupKey

    @property
    def label(self) -> str:
        return f"{self.placement} lr={self.lr:g}"


@dataclasses.dataclass(frozen=True)
class Rung:
    index: int
    steps: int
    last: bool  # picks the finalists (best placement each) rather than the best 1/eta


def is_preset(spec: PlacementSpec) -> bool:
    """A placement written as a bare preset (``{preset: all}``): what every framework's ``target_modules`` says."""
    return spec.preset is not None and spec.model_dump(exclude_defaults=True).keys() == {"preset"}


def rung_steps(search: SearchSpec, candidates: int, total_steps: int, warmup: int) -> list[int]:
    """The rungs' step counts. Default: one rung per cut needed to go from ``candidates`` to ``finalists`` keeping
    1/eta at each, at total/eta^k steps (k = cuts … 1). Rungs that would fall below the floor (``min_steps``, else
    the warm-up; ``min_fraction`` of the horizon) move every rung: they are spread geometrically between the floor
    and the last rung instead of merging, so each still cuts about eta; only when the steps in between are too
    few to give every cut its own rung do rungs merge (and :func:`keep_rate` cuts faster at each)."""
    if search.rungs is not None:
        return given_rung_steps(search.rungs, total_steps)
    floor = min(first_rung_floor(search, total_steps, warmup), total_steps - 1)
    cuts = max(1, math.ceil(math.log(max(candidates / search.finalists, 1.0)) / math.log(search.eta) - 1e-9))
    ideal = [total_steps / search.eta ** k for k in range(cuts, 0, -1)]
    top = min(max(floor, round(ideal[-1])), total_steps - 1)
    if ideal[0] >= floor:
        steps = [min(round(s), total_steps - 1) for s in ideal]
    else:  # geometric from the floor to the last rung: the same ratio between consecutive rungs
        steps = [round(floor * (top / floor) ** (i / (cuts - 1))) if cuts > 1 else top for i in range(cuts)]
    out: list[int] = []
    for s in steps:
        if s >= 1 and (not out or s > out[-1]):
            out.append(s)
    return out or [max(1, total_steps - 1)]


def given_rung_steps(rungs: list[int] | list[float], total_steps: int) -> list[int]:
    """``search.rungs`` as step counts: step counts as given; fractions of the horizon to the nearest step (half
    up), at least 1 and below ``total_steps``. Fractions that round to the same step make one rung."""
    if not any(isinstance(r, float) for r in rungs):
        return [int(r) for r in rungs]
    out: list[int] = []
    for fraction in rungs:
        step = min(max(1, math.floor(fraction * total_steps + 0.5 + 1e-9)), total_steps - 1)
        if not out or step > out[-1]:
            out.append(step)
    return out


def first_rung_floor(search: SearchSpec, total_steps: int, warmup: int) -> int:
    """The first rung's least step count: ``min_steps`` (default: the warm-up, at least 1), raised to
    ``min_fraction`` of the horizon when that is given."""
    floor = search.min_steps if search.min_steps is not None else max(1, warmup)
    if search.min_fraction is not None:
        floor = max(floor, math.ceil(search.min_fraction * total_steps - 1e-9))
    return floor


def keep_rate(search: SearchSpec, candidates: int, rungs: int) -> float:
    """The cut rate of every rung but the last: eta, or faster when there are fewer rungs than cuts (rungs merged,
    or given): then each rung cuts by the same factor, (candidates / finalists)^(1 / rungs), so no single rung
    takes the whole excess (100 candidates, 2 rungs, 2 finalists: 100 → 15 → 2, not 100 → 34 → 2)."""
    needed = max(candidates / search.finalists, 1.0) ** (1 / max(rungs, 1))
    return max(float(search.eta), needed)


def rungs_of(steps: list[int]) -> list[Rung]:
    return [Rung(i, s, i == len(steps) - 1) for i, s in enumerate(steps)]


def decide(rung: Rung, candidates: list[Candidate], results: dict[str, RungResult], eta: float, finalists: int,
           screen: bool = False) -> RungDecision:
    """The rung's decision from its results alone. Ranked by validation loss (failed last), ties in candidate
    order. Not the last rung: keep the best ceil(n/eta) — or, ``screen``-ing LRs, each placement's best
    ceil(n_p/eta). The last: the best candidate of each of the best ``finalists`` placements. Either way the
    preset candidate ranked best *at this rung* is kept (replacing the lowest kept one): a preset always reaches
    the finalists, though not necessarily the preset that would rank best at the full horizon."""
    order = {c.key: i for i, c in enumerate(candidates)}

    def rank(c: Candidate) -> tuple[float, int]:
        r = results[c.key]
        loss = r.val_loss if r.status == "done" and r.val_loss is not None and math.isfinite(r.val_loss) else math.inf
        return loss, order[c.key]

    ranked = sorted(candidates, key=rank)
    alive = [c for c in ranked if math.isfinite(rank(c)[0])]
    if rung.last:
        kept, seen = [], set()
        for c in alive:
            if c.placement not in seen and len(kept) < finalists:
                kept.append(c)
                seen.add(c.placement)
    elif screen:
        kept = []
        for placement in dict.fromkeys(c.placement for c in candidates):
            mine = [c for c in candidates if c.placement == placement]
            kept += [c for c in alive if c.placement == placement][:max(1, math.ceil(len(mine) / eta - 1e-9))]
    else:
        kept = alive[:max(1, math.ceil(len(candidates) / eta - 1e-9))]
    anchored = None
    best_preset = next((c for c in alive if c.preset), None)
    if best_preset is not None and best_preset not in kept and kept:
        # It takes the lowest kept place; a lone survivor (finalists: 1, or a rung keeping one) keeps its place.
        anchored = best_preset.key
        kept = kept[:-1] + [best_preset] if len(kept) >= 2 else kept + [best_preset]
    kept_keys = {c.key for c in kept}
    return RungDecision(rung=rung.index, steps=rung.steps, ranked=tuple(c.key for c in ranked),
                        kept=tuple(c.key for c in ranked if c.key in kept_keys), anchored=anchored, last=rung.last)


class SearchFailed(LoraplaceError):
    """Every candidate of a rung failed: nothing to promote. The rung is left undecided."""

    def __init__(self, rung: Rung, results: list[RungResult]):
        causes = list(dict.fromkeys(r.failure.message for r in results if r.failure is not None))
        shown = "; ".join(causes[:3]) + (f"; … {len(causes) - 3} more" if len(causes) > 3 else "")
        super().__init__(f"every candidate failed at rung {rung.index + 1} ({rung.steps} steps): "
                         f"{shown or 'no result'}",
                         "the rung is left undecided: fix the cause (a non-finite loss: lower tune.lr; out of "
                         "memory: a smaller train.batch or micro_batch), then run again with --retry-failed")


@dataclasses.dataclass(frozen=True)
class SearchState:
    """Where a search stands, read from the store: results and decisions per rung."""

    results: dict[int, dict[str, RungResult]]
    decisions: dict[int, RungDecision]

    @classmethod
    def of(cls, results: list[RungResult], decisions: list[RungDecision]) -> SearchState:
        by_rung: dict[int, dict[str, RungResult]] = {}
        for r in results:
            by_rung.setdefault(r.rung, {})[r.candidate] = r
        return cls(by_rung, {d.rung: d for d in decisions})


def alive_at(rung: int, candidates: list[Candidate], decisions: dict[int, RungDecision]) -> list[Candidate]:
    """The candidates a rung runs: all at rung 0, then those the previous rung kept (in candidate order)."""
    if rung == 0:
        return list(candidates)
    kept = set(decisions[rung - 1].kept)
    return [c for c in candidates if c.key in kept]


RunRung = Callable[[list[Candidate], Rung], Iterator[RungResult]]  # an executor's run_rung


def run_rungs(candidates: list[Candidate], rungs: list[Rung], search: SearchSpec, state: SearchState,
              run: RunRung, record_result: Callable[[RungResult], None],
              record_decision: Callable[[RungDecision], None], *, retry_failed: bool = False,
              note: Callable[[str], None] | None = None) -> list[Candidate]:
    """Every rung in turn: run the candidates with no recorded result, then decide (and record the decision;
    the store refuses one that differs from a recorded one). A rung already decided runs nothing: its recorded
    decision stands, whatever its failed candidates would give now. In a rung not decided yet a failed candidate
    is run again only with ``retry_failed`` (a failure that repeats is otherwise not paid for on every resume).
    Returns the finalists, best first."""
    decisions = dict(state.decisions)
    rate = keep_rate(search, len(candidates), len(rungs))
    measured: dict[int, dict[str, RungResult]] = {}
    for rung in rungs:
        alive = alive_at(rung.index, candidates, decisions)
        results = dict(state.results.get(rung.index, {}))
        measured[rung.index] = results
        if rung.index in decisions:
            failed = [c.key for c in alive if c.key in results and results[c.key].status == "failed"]
            if failed and retry_failed and note is not None:
                note(f"rung {rung.index + 1} is decided: its {len(failed)} failed candidate(s) are not retried "
                     "(the recorded decision stands)")
            if decisions[rung.index].last:
                break
            continue
        pending = [c for c in alive if c.key not in results
                   or (retry_failed and results[c.key].status == "failed")]
        if pending:
            for result in run(pending, rung):
                record_result(result)
                results[result.candidate] = result
        decision = decide(rung, alive, results, rate, search.finalists, screen=rung.index < search.screen_lrs)
        if not decision.kept:  # not recorded: a run with --retry-failed tries this rung's candidates again
            raise SearchFailed(rung, [results[c.key] for c in alive if c.key in results])
        if search.stop_when_stable and not rung.last and rung.index > 0:
            # PASHA: would the previous rung have picked the same finalists among these candidates?
            previous = rungs[rung.index - 1]
            now = decide(dataclasses.replace(rung, last=True), alive, results, rate, search.finalists)
            before = decide(dataclasses.replace(previous, last=True), alive, measured[previous.index], rate,
                            search.finalists)
            if set(now.kept) == set(before.kept):
                decision = now
        record_decision(decision)
        decisions[rung.index] = decision
        if decision.last:
            break
    final = next(d for d in decisions.values() if d.last or d.rung == rungs[-1].index)
    by_key = {c.key: c for c in candidates}
    return [by_key[k] for k in final.kept]


def hedge_candidates(candidates: list[Candidate], search: SearchSpec, seed: int) -> list[Candidate]:
    """The hedge bracket: ``search.hedge`` candidates drawn before any rung (a seeded draw: the same every run),
    in candidate order."""
    if not search.hedge:
        return []
    drawn = set(random.Random(f"hedge:{seed}").sample(range(len(candidates)), min(search.hedge, len(candidates))))
    return [c for i, c in enumerate(candidates) if i in drawn]


def confirmed(finalists: list[Candidate], val_loss: dict[str, float | None], search: SearchSpec) -> list[Candidate]:
    """The finalists that run the other seeds: all of them (no ``confirm``), else the best ``confirm`` by their
    full-horizon validation loss on the first seed (``val_loss``: candidate key → it; failed last, ties in
    finalist order), one per placement."""
    if search.confirm is None:
        return list(finalists)
    order = {c.key: i for i, c in enumerate(finalists)}

    def rank(c: Candidate) -> tuple[float, int]:
        value = val_loss.get(c.key)
        return (value if value is not None and math.isfinite(value) else math.inf), order[c.key]

    out: list[Candidate] = []
    for c in sorted(finalists, key=rank):
        if len(out) < search.confirm and c.placement not in {o.placement for o in out}:
            out.append(c)
    return [c for c in finalists if c in out]


def state_dir(artifacts: Path, candidate: str) -> Path:
    """Where a candidate keeps its training state between rungs (and the EVA plan it was built with)."""
    return artifacts / SEARCH_DIR / candidate


def describe(candidates: list[Candidate], rungs: list[Rung], search: SearchSpec,
             validation_size: int | None = None) -> str:
    """One line for the terminal: what the search will do (``validation_size``: the split's examples, when known,
    so that a ``rung_examples`` above it is not announced as what the rungs read)."""
    rate = keep_rate(search, len(candidates), len(rungs))
    cut = f"eta {search.eta}" if rate == search.eta else f"keeping 1/{rate:.2f} at each rung: fewer rungs than cuts"
    screen = f", the first {search.screen_lrs} cutting LRs within each placement" if search.screen_lrs else ""
    return (f"search: {len(candidates)} candidates ({_candidate_shape(candidates)}), "
            f"rungs at {', '.join(str(r.steps) for r in rungs)} steps "
            f"({cut}{screen}; validation: {_rung_examples(search, validation_size)}), then the best "
            f"{search.finalists} placement(s) at every seed")


def _candidate_shape(candidates: list[Candidate]) -> str:
    """"4 placements × 3 LRs" when every placement tries the same LRs; else each placement's own count, e.g.
    "4 placements × their own 3 LRs" or "3 placements × their own 2–4 LRs" (tune.lr given per placement)."""
    lrs: dict[str, set[float]] = {}
    for c in candidates:
        lrs.setdefault(c.placement, set()).add(c.lr)
    if len({frozenset(v) for v in lrs.values()}) <= 1:
        return f"{len(lrs)} placements × {len({c.lr for c in candidates})} LRs"
    counts = sorted({len(v) for v in lrs.values()})
    each = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"{len(lrs)} placements × their own {each} LRs"


def _rung_examples(search: SearchSpec, validation_size: int | None) -> str:
    wanted = search.rung_examples
    if wanted is None:
        return "all examples" if validation_size is None else f"all {validation_size} examples"
    if validation_size is not None and wanted > validation_size:
        return f"all {validation_size} examples (rung_examples {wanted} is more than the split holds)"
    return f"the first {wanted} examples"
