"""Placement search: a tuned grid's answer — placement and learning rate — for a fraction of its cost.

``search:`` in a study turns its grid into successive halving over *candidates* = placements × ``tune.lr`` (or the
one ``train.lr``), on the first seed. Each rung trains every surviving candidate up to the rung's step count and
judges it on the **validation** split; the best ``1/eta`` go on. A promoted candidate continues from its saved
state (:class:`loraplace.stepper.Continuation`): its LR schedule is the full horizon's (``train.steps``), so a
candidate's rung-k model is exactly the first steps of the run the full grid would make, and the step it reaches
at the last rung is the grid's trial itself. The last rung picks the ``finalists``: the best placements, each at
its own best LR. Those then run every seed at the full horizon (seed 0 continues its search state) as ordinary
trials, and the usual seed-paired analysis on the **test** split compares them.

**Never worse than the best preset.** Placements given as a bare ``preset:`` are the presets. At every rung the
best-ranked preset candidate is kept even if it ranks below the cut (:attr:`RungDecision.anchored` records it), so
a preset is always among the finalists; :func:`loraplace.analysis.recommend.recommend` answers with that preset
whenever the winner is not distinguishable from it.

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
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import Field, PositiveInt, field_validator

from loraplace.placement.spec import PlacementSpec
from loraplace.records import GroupKey, RungDecision, RungResult
from loraplace.specs import StrictModel

SEARCH_DIR = "search"  # under the store's artifacts: one folder of saved training state per candidate


class SearchSpec(StrictModel):
    """``search:`` in a study. Every field has a default: ``search: {}`` is a search."""

    eta: int = Field(default=3, ge=2, description="each rung keeps the best 1/eta of its candidates (rounded up)")
    finalists: PositiveInt = Field(default=2, description="placements that run every seed at the full horizon")
    rungs: list[PositiveInt] | None = Field(default=None, min_length=1, description="the rungs' step counts, "
                                            "increasing, each below train.steps (default: train.steps / eta^k, "
                                            "never below min_steps)")
    min_steps: PositiveInt | None = Field(default=None, description="the first rung's least step count (default: "
                                          "train.warmup, at least 1: before that the ranking is mostly the LR)")
    rung_examples: PositiveInt | None = Field(default=None, description="validation examples a rung evaluates "
                                              "(the split's first N, the same for every candidate; default: all). "
                                              "The finalists are always evaluated on the whole split")

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
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
    """The rungs' step counts. Default: enough rungs to go from ``candidates`` to ``finalists`` keeping 1/eta at
    each, at total/eta^k steps (k = number of rungs … 1), none below ``min_steps``; rungs that coincide merge."""
    if search.rungs is not None:
        return list(search.rungs)
    floor = search.min_steps if search.min_steps is not None else max(1, warmup)
    cuts = max(1, math.ceil(math.log(max(candidates / search.finalists, 1.0)) / math.log(search.eta) - 1e-9))
    steps: list[int] = []
    for k in range(cuts, 0, -1):
        s = min(max(floor, round(total_steps / search.eta ** k)), total_steps - 1)
        if s >= 1 and (not steps or s > steps[-1]):
            steps.append(s)
    return steps or [max(1, total_steps - 1)]


def rungs_of(steps: list[int]) -> list[Rung]:
    return [Rung(i, s, i == len(steps) - 1) for i, s in enumerate(steps)]


def decide(rung: Rung, candidates: list[Candidate], results: dict[str, RungResult], eta: int,
           finalists: int) -> RungDecision:
    """The rung's decision from its results alone. Ranked by validation loss (failed last), ties in candidate
    order. Not the last rung: keep the best ceil(n/eta). The last: the best candidate of each of the best
    ``finalists`` placements. Either way the best preset candidate is kept (replacing the lowest kept one)."""
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
    else:
        kept = alive[:max(1, math.ceil(len(candidates) / eta))]
    anchored = None
    best_preset = next((c for c in alive if c.preset), None)
    if best_preset is not None and best_preset not in kept and kept:
        # It takes the lowest kept place; a lone survivor (finalists: 1, or a rung keeping one) keeps its place.
        anchored = best_preset.key
        kept = kept[:-1] + [best_preset] if len(kept) >= 2 else kept + [best_preset]
    kept_keys = {c.key for c in kept}
    return RungDecision(rung=rung.index, steps=rung.steps, ranked=tuple(c.key for c in ranked),
                        kept=tuple(c.key for c in ranked if c.key in kept_keys), anchored=anchored)


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
              record_decision: Callable[[RungDecision], None]) -> list[Candidate]:
    """Every rung in turn: run the candidates with no recorded result, then decide (and record the decision;
    the store refuses one that differs from a recorded one). Returns the finalists, best first."""
    decisions = dict(state.decisions)
    for rung in rungs:
        alive = alive_at(rung.index, candidates, decisions)
        results = dict(state.results.get(rung.index, {}))
        pending = [c for c in alive if c.key not in results or results[c.key].status != "done"]
        if pending:
            for result in run(pending, rung):
                record_result(result)
                results[result.candidate] = result
        decision = decide(rung, alive, results, search.eta, search.finalists)
        record_decision(decision)
        decisions[rung.index] = decision
    final = decisions[rungs[-1].index]
    by_key = {c.key: c for c in candidates}
    return [by_key[k] for k in final.kept]


def state_dir(artifacts: Path, candidate: str) -> Path:
    """Where a candidate keeps its training state between rungs (and the EVA plan it was built with)."""
    return artifacts / SEARCH_DIR / candidate


def describe(candidates: list[Candidate], rungs: list[Rung], search: SearchSpec) -> str:
    """One line for the terminal: what the search will do."""
    return (f"search: {len(candidates)} candidates ({len({c.placement for c in candidates})} placements × "
            f"{len({c.lr for c in candidates})} LRs), rungs at {', '.join(str(r.steps) for r in rungs)} steps "
            f"(eta {search.eta}, validation: {search.rung_examples or 'all'} examples), then the best "
            f"{search.finalists} placement(s) at every seed")
