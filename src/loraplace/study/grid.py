"""A study's trials: the grid (placements × sizes × seeds × axes; a tuned study's selection pass, then its other
seeds) and a search's candidates (the tuned grid's own first-seed trials). No torch."""

from __future__ import annotations

import itertools

from loraplace.placement.spec import PlacementSpec
from loraplace.records import GroupKey, Size, TrialLabels
from loraplace.search import Candidate, is_preset
from loraplace.study.spec import StudySpec
from loraplace.train_config import TrainSpec
from loraplace.trial_spec import PlannedTrial, TrialSpec, trial_id
from loraplace.tuning import TUNED_AXIS, Selection


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


def search_candidates(study: StudySpec) -> list[PlannedTrial]:
    """A search's candidates as the full-horizon trials of its first seed: placements × LRs, in spec order (the
    ids are the tuned grid's own: the trial a candidate reaches at the full horizon is the grid's)."""
    assert study.search is not None
    size = study.sizes()[0]
    return [_planned(study, pname, placement, size, study.seeds[0], ((TUNED_AXIS, lr),))
            for pname, placement in study.placement_specs().items() for lr in study.tuned_lrs(pname)]


def candidates_of(study: StudySpec, planned: list[PlannedTrial] | None = None) -> list[Candidate]:
    """The search's candidates (placement, LR, preset or not) keyed by their first-seed trial ids."""
    planned = search_candidates(study) if planned is None else planned
    return [Candidate(p.id, p.labels.group.placement, float(dict(p.labels.group.axes)[TUNED_AXIS]),
                      is_preset(study.placements[p.labels.group.placement]), p.labels.group) for p in planned]
