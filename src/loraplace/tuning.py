"""Per-placement learning-rate tuning: selection on the validation split, never on the test split.

A study with ``tune: {lr: [...]}`` trains every (placement, size, other axes) cell at each learning rate — on
``tune.seeds`` (default: every seed) — and selects, per cell, the LR with the lowest mean **validation** loss over
those seeds. The remaining seeds then run at the selected LR only. Comparisons, Pareto frontier and paired tests
use each placement at its own selected LR and report the **test** split. Selection reads ``Metrics.val_loss``
only, so nothing measured on the test split can move it (a test checks this by permuting the test split).

This is the one home of the selection rule: the runner (which trials run next) and the analysis (which groups are
compared) both call :func:`select_lrs`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import Discriminator, Field, NonNegativeInt, PositiveFloat, Tag, field_validator

from loraplace.records import GroupKey, StudyInfo
from loraplace.specs import StrictModel, by_shape
from loraplace.store import TrialRecord

TUNED_AXIS = "lr"


class TuneSpec(StrictModel):
    """``tune:`` in a study: the learning rates every cell is trained at, and how one is selected."""

    lr: Annotated[Annotated[list[PositiveFloat], Tag("one-list")] | Annotated[dict[str, list[PositiveFloat]],
                                                                               Tag("per-name")],
                  Discriminator(by_shape)] = Field(
        description="learning rates to select from (each cell its own): one list for every placement, or a list per "
        "placement (`{all: [1.5e-3, 3e-3], mlp: [5e-3, 1e-2]}`: each arm around the LR it is known to want; every "
        "placement named)")
    on: Literal["validation"] = Field(default="validation", description="the split selection reads (only this)")
    seeds: list[int] | None = Field(default=None, min_length=1, description="seeds of the selection pass (default: "
                                    "every seed); the other seeds run at the selected LR only")
    extend: NonNegativeInt = Field(default=0, description="LRs a cell may add past the edge of its list: while "
                                   "its selected LR is the highest (lowest) it has tried, the next one beyond it "
                                   "(the list's outermost ratio again: 3.33e-2 after 3e-3, 1e-2) runs on the "
                                   "selection seeds, at most this many per cell; the other seeds wait for the "
                                   "selection this ends with (0: the list is the grid)")

    added_fields = frozenset({"extend"})

    @field_validator("lr")
    @classmethod
    def _distinct(cls, value: list[float] | dict[str, list[float]]) -> list[float] | dict[str, list[float]]:
        lists = value if isinstance(value, dict) else {"": value}
        problems = []
        for name, lrs in lists.items():
            where = f"tune.lr.{name}" if name else "tune.lr"
            if len(lrs) < 2:
                problems.append(f"{where} has {len(lrs)} LR(s): selection needs at least 2 (one LR: set train.lr "
                                "or an axis instead)")
            if len(set(lrs)) != len(lrs):
                problems.append(f"{where} has duplicates")
        if problems:
            raise ValueError("; ".join(problems))
        return {name: sorted(lrs) for name, lrs in value.items()} if isinstance(value, dict) else sorted(value)

    def lrs_for(self, placement: str) -> list[float]:
        """The LRs ``placement``'s cells select from."""
        return self.lr[placement] if isinstance(self.lr, dict) else self.lr

    def all_lrs(self) -> list[float]:
        """Every LR any placement tries, ascending."""
        return sorted({lr for lrs in self.lr.values() for lr in lrs}) if isinstance(self.lr, dict) else self.lr

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("tune.seeds has duplicates")
        return value


def tuned_cell(key: GroupKey) -> GroupKey:
    """A group's key without its tuned LR: the cell whose LRs compete."""
    return key.model_copy(update={"axes": tuple((k, v) for k, v in key.axes if k != TUNED_AXIS)})


def tuned_lr(key: GroupKey) -> float | None:
    return next((float(v) for k, v in key.axes if k == TUNED_AXIS), None)


@dataclass(frozen=True)
class Selection:
    """The LR a cell selected, and the mean validation loss of every LR it tried (NaN: every trial failed)."""

    cell: GroupKey
    lr: float
    val_loss_by_lr: dict[float, float]
    seeds: tuple[int, ...]
    grid: tuple[float, ...] = ()  # the LRs it selected among (a search's finalist: its candidates' LRs, of which
    #                               it measured one at the full horizon); empty: those of val_loss_by_lr

    @property
    def at_edge(self) -> bool:
        """The selected LR is the smallest or largest of its grid: the best may lie outside it."""
        tried = sorted(self.grid or self.val_loss_by_lr)
        return len(tried) > 1 and self.lr in (tried[0], tried[-1])


@dataclass(frozen=True)
class TrialResult:
    """What selection reads of one trial: where it sits, its seed, and its validation loss (None: not done)."""

    key: GroupKey
    seed: int
    val_loss: float | None


def select_lrs(results: Iterable[TrialResult], lrs: Iterable[float], seeds: Iterable[int],
               *, complete_only: bool = True) -> dict[GroupKey, Selection]:
    """cell → its selection. Only trials of the selection ``seeds`` count. With ``complete_only`` a cell selects
    only once every (LR, seed) of its selection pass has a result (done, or failed: a failed LR loses); a cell
    whose every LR failed selects nothing."""
    lrs, seeds = sorted(lrs), sorted(seeds)
    by_cell: dict[GroupKey, dict[float, dict[int, float | None]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        lr = tuned_lr(r.key)
        if lr is None or r.seed not in seeds:
            continue
        by_cell[tuned_cell(r.key)][lr][r.seed] = r.val_loss
    out = {}
    for cell, by_lr in by_cell.items():
        if complete_only and any(len(by_lr.get(lr, {})) < len(seeds) for lr in lrs):
            continue  # the selection pass of this cell has not finished
        means = {}
        for lr in lrs:
            values = [v for v in by_lr.get(lr, {}).values() if v is not None and math.isfinite(v)]
            # An LR with a failed seed is out: its mean would be over fewer, luckier seeds.
            means[lr] = sum(values) / len(values) if values and len(values) == len(by_lr.get(lr, {})) else math.nan
        finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
        if finite:
            best = min(finite, key=lambda lr: (finite[lr], lr))
            out[cell] = Selection(cell, best, means, tuple(seeds))
    return out


def past_edge(lrs: list[float], upward: bool) -> float:
    """The next LR past an edge of ``lrs``: beyond the outermost by the ratio of the two outermost on that side
    (3 significant digits: 1e-2 after 3e-3 gives 3.33e-2)."""
    ordered = sorted(lrs)
    value = ordered[-1] ** 2 / ordered[-2] if upward else ordered[0] ** 2 / ordered[1]
    return float(f"{value:.3g}")


def cell_lrs(base: list[float], extend: int, results: list[TrialResult], seeds: Iterable[int]) -> list[float]:
    """The LRs one cell tries (``results``: its trials'): ``base``, plus one past the edge for each time its
    complete selection pass selected an edge LR, at most ``extend`` times. A function of the stored results, so
    the runner (what to run next) and the analysis (what was selected among) agree."""
    lrs = sorted(base)
    seeds = list(seeds)
    for _ in range(extend):
        found = select_lrs(results, lrs, seeds)
        if len(found) != 1:
            break  # its selection pass over these LRs is not finished (or every LR failed)
        selection = next(iter(found.values()))
        if selection.lr not in (lrs[0], lrs[-1]):
            break
        lrs = sorted(lrs + [past_edge(lrs, upward=selection.lr == lrs[-1])])
    return lrs


def extended_lrs(info: StudyInfo, extend: int, records: list[TrialRecord]) -> dict[GroupKey, list[float]]:
    """cell → the LRs it tries, for a tuned study with ``tune.extend``: its base list plus the extensions its
    stored results have earned."""
    results = [TrialResult(r.labels.group, r.labels.seed, r.metrics.val_loss if r.metrics is not None else None)
               for r in records if r.status in ("done", "failed")]
    by_cell: dict[GroupKey, list[TrialResult]] = defaultdict(list)
    for r in results:
        by_cell[tuned_cell(r.key)].append(r)
    return {cell: cell_lrs(list(info.tune_lrs_by_placement.get(cell.placement, info.tune_lrs)), extend, found,
                           info.tune_seeds) for cell, found in by_cell.items()}


def _confirmed_groups(records: list[TrialRecord]) -> set[GroupKey]:
    """A search's trials that ``search.confirm`` ran at every seed: the groups (placement at one LR) with the most
    seeds, pending trials counted — every group while the entrants' first-seed pass runs, only the confirmed ones
    once their seeds are added."""
    seeds: dict[GroupKey, set[int]] = defaultdict(set)
    for r in records:
        seeds[r.labels.group].add(r.labels.seed)
    most = max((len(v) for v in seeds.values()), default=0)
    return {group for group, v in seeds.items() if len(v) == most}


def unconfirmed_finalists(info: StudyInfo, records: list[TrialRecord]) -> set[GroupKey]:
    """A search's cells (tuned LR dropped) that ``search.confirm`` left at the first seed: none of their trials was
    confirmed. Not a search: none."""
    if not info.search:
        return set()
    confirmed = {tuned_cell(group) for group in _confirmed_groups(records)}
    return {cell for r in records if (cell := tuned_cell(r.labels.group)) not in confirmed}


def selections_of(info: StudyInfo, records: list[TrialRecord]) -> dict[GroupKey, Selection]:
    """The LR each cell of a tuned study has selected so far, from its stored trials (a cell whose selection pass
    is unfinished has none)."""
    results = [TrialResult(r.labels.group, r.labels.seed, r.metrics.val_loss if r.metrics is not None else None)
               for r in records if r.status in ("done", "failed")]
    if info.search:  # a search's trials are its finalists, each placement at the one LR its rungs selected
        # search.confirm: an entrant that was not confirmed stopped at the first seed and is not compared, even
        # where its one seed scored better than the mean of a confirmed entrant's seeds
        confirmed = _confirmed_groups(records)
        results = [r for r in results if r.key in confirmed]
        found = select_lrs(results, {lr for r in results if (lr := tuned_lr(r.key)) is not None}, info.tune_seeds,
                           complete_only=False)
        return {cell: replace(s, grid=tuple(info.tune_lrs_by_placement.get(cell.placement, info.tune_lrs)))
                for cell, s in found.items()}
    if info.tune_extend:  # each cell selects among its own LRs, the extensions it earned included
        chosen: dict[GroupKey, Selection] = {}
        for cell, lrs in extended_lrs(info, info.tune_extend, records).items():
            chosen |= select_lrs([r for r in results if tuned_cell(r.key) == cell], lrs, info.tune_seeds)
        return chosen
    if not info.tune_lrs_by_placement:
        return select_lrs(results, info.tune_lrs, info.tune_seeds)
    out: dict[GroupKey, Selection] = {}
    for placement, lrs in info.tune_lrs_by_placement.items():  # each placement selects from its own list
        out |= select_lrs([r for r in results if r.key.placement == placement], lrs, info.tune_seeds)
    return out
