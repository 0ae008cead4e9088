"""A study's results, read from its store and grouped across seeds: the numbers every report format shows.

A *group* is one (placement, size, other axes) cell of the grid; its trials differ only by seed. Each group is
compared with the baseline group of the same size and axes: differences are seed-paired (same seed = same data
order and adapter init draw), so the test is the paired t-test and the interval is on the per-seed differences.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplace.analysis.stats import Paired, Summary, holm, paired, pareto_front, summarize
from loraplace.formatting import one_line
from loraplace.records import (
    AxisValue,
    CurvePoint,
    GroupKey,
    Metrics,
    ProbeScores,
    SiteMap,
    StudyInfo,
    TrialOutcome,
    config_without_seed,
)
from loraplace.store import StudyRecord, TrialRecord

if TYPE_CHECKING:
    from loraplace.analysis.search import SearchAnalysis
from loraplace.tuning import TUNED_AXIS, Selection, selections_of, tuned_cell, tuned_lr, unconfirmed_finalists

# metric → (label, lower is better); the keys are :class:`Metrics` fields, the quantities a study compares
METRICS: dict[str, tuple[str, bool]] = {
    "eval_loss": ("eval loss", True),
    "val_loss": ("validation loss", True),
    "perplexity": ("perplexity", True),
    "accuracy": ("accuracy", False),
    "tokens_per_s": ("tokens/s", False),
    "train_s": ("train time (s)", True),
    "peak_mem_mb": ("peak memory (MiB)", True),
}
assert set(METRICS) <= set(Metrics.model_fields)
BUDGET_MATCH_TOLERANCE = 0.10  # placements whose params differ by more than this are "not budget-matched"


@dataclass(frozen=True)
class TrialRow:
    id: str
    key: GroupKey
    seed: int
    status: str
    error: str | None
    outcome: TrialOutcome | None  # done and failed trials

    @property
    def placement(self) -> str:
        return self.key.placement

    @property
    def metrics(self) -> dict[str, float]:
        """Measured metric → value (empty unless the trial is done)."""
        if self.outcome is None or self.outcome.metrics is None:
            return {}
        return self.outcome.metrics.measured()

    @property
    def curve(self) -> tuple[CurvePoint, ...]:
        return self.outcome.curve if self.outcome is not None else ()


@dataclass(frozen=True)
class Comparison:
    """A group against the baseline group of the same size and axes."""

    baseline: GroupKey
    delta_loss: Paired | None  # eval loss, candidate − baseline, seed-paired
    delta_loss_pct: float | None  # mean difference in % of the baseline's mean eval loss
    params_saved_pct_of_baseline: float  # (P_base − P) / P_base × 100
    params_saved_pct_of_model: float  # (P_base − P) / total model params × 100
    speedup: float | None  # baseline train time / this train time (means)
    memory_ratio: float | None  # this peak memory / baseline peak memory (means)
    delta_accuracy: Paired | None = None  # task accuracy (test split), candidate − baseline, seed-paired


@dataclass(frozen=True)
class Group:
    key: GroupKey
    trials: tuple[TrialRow, ...]  # done trials only
    trainable_params: int
    total_params: int
    stats: dict[str, Summary]  # metric → summary over seeds
    by_seed: dict[str, dict[int, float]]  # metric → seed → value
    sites: SiteMap | None  # where the adapters are (None: unknown, e.g. an old store of an unreachable model)
    probe: ProbeScores | None = None  # importance-probe scores of an auto placement (first seed)
    comparison: Comparison | None = None
    dominated_by: GroupKey | None = None  # a group with ≤ params and ≤ mean eval loss
    dominated_on_accuracy: GroupKey | None = None  # a group with ≤ params and ≥ mean accuracy (when measured)
    selected: bool | None = None  # tuned studies: this is its cell's selected LR (None: the study is not tuned)

    @property
    def compared(self) -> bool:
        """Part of the comparison: every group, or in a tuned study only the selected LR of each cell."""
        return self.selected is not False

    @property
    def placement(self) -> str:
        return self.key.placement

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def is_baseline(self) -> bool:
        return self.comparison is not None and self.comparison.baseline == self.key


@dataclass(frozen=True)
class AxisEffect:
    """What moving one swept axis (``axes:``) off its first listed value does to one placement, the rest of its
    cell held — in a tuned study each side at its own selected LR: eval loss, seed-paired (group − reference)."""

    axis: str
    reference: GroupKey  # the placement's group at the axis's first value (e.g. quantize=none)
    group: GroupKey  # the same placement and cell at another value (e.g. quantize=nf4)
    delta_loss: Paired | None  # None: no seed in common
    delta_loss_pct: float | None  # mean difference in % of the reference's mean eval loss


@dataclass(frozen=True)
class PairDifference:
    """Two compared placements of one cell (same size and axes; tuned: each at its own selected LR), seed-paired
    on eval loss. ``better`` is the one with the lower mean, so ``delta_loss`` (better − other) is ≤ 0 in mean."""

    better: GroupKey
    other: GroupKey
    delta_loss: Paired
    p_holm: float | None  # Holm-adjusted over every pair of the cell (None: this pair has no test, n < 2)


@dataclass(frozen=True)
class EnvironmentSummary:
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    versions: dict[str, str]
    quantize: tuple[str, ...] = ("none",)  # how the trials' base was loaded (bitsandbytes quantization)

    def to_dict(self) -> dict[str, Any]:
        return {"device": list(self.devices), "dtype": list(self.dtypes), "base quantization": list(self.quantize),
                "versions": self.versions}


@dataclass(frozen=True)
class StudyAnalysis:
    name: str
    store: str
    spec: dict[str, Any]  # as the user wrote it, for display
    info: StudyInfo
    groups: tuple[Group, ...]
    trials: tuple[TrialRow, ...]  # every trial, any status
    counts: dict[str, int]
    warnings: tuple[str, ...]
    environment: EnvironmentSummary = field(default_factory=lambda: EnvironmentSummary((), (), {}))
    selections: dict[GroupKey, Selection] = field(default_factory=dict)  # tuned: cell → its selected LR
    search: SearchAnalysis | None = None  # a placement search: its rungs, decisions and cost
    swept_axes: dict[str, tuple[AxisValue, ...]] = field(default_factory=dict)  # see :func:`swept_axes`
    axis_effects: tuple[AxisEffect, ...] = ()  # every swept axis's effect per placement (compared groups)
    pairwise: tuple[PairDifference, ...] = ()  # every pair of placements in cells of three or more, best first

    @property
    def tuned(self) -> bool:
        return bool(self.info.tune_lrs)

    @property
    def compared(self) -> tuple[Group, ...]:
        """The groups the comparison, the Pareto frontier and the budget/site tables are about."""
        return tuple(g for g in self.groups if g.compared)

    @property
    def model(self) -> str:
        return self.info.model

    @property
    def baseline(self) -> str:
        return self.info.baseline

    def group(self, key: GroupKey) -> Group:
        return next(g for g in self.groups if g.key == key)

    @property
    def frontier(self) -> list[Group]:
        """Every frontier's groups, condition by condition (see :attr:`frontiers`), fewest params first in each."""
        return [g for front in self.frontiers.values() for g in front]

    @property
    def frontiers(self) -> dict[tuple[tuple[str, AxisValue], ...], list[Group]]:
        """The Pareto frontier (trainable params vs eval loss) per cost condition (:func:`condition`: the values
        of the swept quantize/steps/batch axes), fewest params first. One entry, key ``()``, when none is swept."""
        out: dict[tuple[tuple[str, AxisValue], ...], list[Group]] = {}
        for g in sorted((g for g in self.compared if g.dominated_by is None and "eval_loss" in g.stats),
                        key=lambda g: g.trainable_params):
            out.setdefault(condition(g.key), []).append(g)
        return out


def compact_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0–2, 5, 7–8"."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}–{v}")
            start = None
    return ", ".join(out)


def _replan(trial_spec: dict[str, Any]) -> SiteMap | None:
    """Site map for trials stored before outcomes kept one: re-resolve the placement on the meta-device model.
    Best effort: a model that cannot be reached (hub, offline) or an auto placement just means no heatmap."""
    try:
        from loraplace.placement import plan_for_model
        from loraplace.trial_spec import TrialSpec

        spec = TrialSpec.model_validate(trial_spec)
        return plan_for_model(spec.model, spec.placement, rank=spec.rank, budget=spec.budget).site_map()
    except Exception:  # noqa: BLE001 - optional: the report goes on without this figure
        return None


def analyze_store(store_path: str | Path, name: str | None = None) -> StudyAnalysis:
    """Read a study from its store (read-only: changes nothing, safe while it runs) and compute every summary."""
    from loraplace.store import Store

    with Store.open_readonly(store_path) as store:
        study = store.study(name)
        records = store.trials(study.id)
        counts = store.counts(study.id)
        rung_results, rung_decisions = store.rung_results(study.id), store.rung_decisions(study.id)
    analysis = analyze_records(study, str(store_path), records, counts)
    if study.info.search:
        from loraplace.analysis.search import analyze_search

        analysis = replace(analysis, search=analyze_search(study.spec, study.info, rung_results, rung_decisions,
                                                            records))
    return analysis


def analyze_records(study: StudyRecord, store: str, records: list[TrialRecord],
                    counts: dict[str, int]) -> StudyAnalysis:
    warnings: list[str] = []
    rows = [TrialRow(rec.id, rec.labels.group, rec.labels.seed, rec.status, rec.error, rec.outcome)
            for rec in records]
    specs = {rec.id: rec.spec for rec in records}
    members: dict[GroupKey, list[TrialRow]] = defaultdict(list)
    trial_warnings: dict[str, list[str]] = defaultdict(list)  # placement → unique warnings (plan, data)
    for row in rows:
        members.setdefault(row.key, [])
        if row.status == "done" and row.outcome is not None:
            members[row.key].append(row)
            for w in row.outcome.warnings:
                if w not in trial_warnings[row.placement]:
                    trial_warnings[row.placement].append(w)

    groups: dict[GroupKey, Group] = {}
    for key, done in members.items():
        if not done:
            continue
        by_seed = {m: {r.seed: r.metrics[m] for r in done if m in r.metrics} for m in METRICS}
        stats = {m: s for m, values in by_seed.items() if (s := summarize(list(values.values()))) is not None}
        first = done[0].outcome
        assert first is not None
        sites = first.sites if first.sites is not None else _replan(specs[done[0].id])
        groups[key] = Group(key, tuple(done), first.trainable_params, first.total_params, stats, by_seed, sites,
                            first.probe)

    rank = _grid_rank(study.info.placements, rows)
    groups = dict(sorted(groups.items(), key=lambda item: rank(item[0])))
    for key, done in members.items():  # a group's trials may differ only by seed (run_study enforces it)
        configs = {json.dumps(config_without_seed(specs[r.id]), sort_keys=True) for r in done}
        if len(configs) > 1:
            warnings.append(f"group {key.label} mixes {len(configs)} different configurations: its statistics "
                            "are not meaningful")
    if not study.info.baseline_given:
        warnings.append(f"no baseline set in the spec: comparing against the first placement, "
                        f"{study.info.baseline!r}")
    selections: dict[GroupKey, Selection] = {}
    cell = _plain_cell
    if study.info.tune_lrs:
        selections = selections_of(study.info, records)
        chosen = {s.cell: s.lr for s in selections.values()}
        groups = {k: replace(g, selected=chosen.get(tuned_cell(k)) == tuned_lr(k)) for k, g in groups.items()}
        cell = _tuned_cell
        warnings += _tune_warnings(groups, selections, unconfirmed_finalists(study.info, records))
    elif groups and not any("val_loss" in g.stats for g in groups.values()):
        warnings.append("no validation split: every number here is on the test (eval) split, and nothing was "
                        "selected on a separate split; to pick a winner or an LR without selection bias, add "
                        "data.validation_count (and tune:)")
    groups = _compare(groups, study.info.baseline, warnings, cell)
    groups = _pareto(groups)
    warnings += _warnings(groups, rows, counts, trial_warnings, cell)
    environment = _environment(rows, study.info)
    if len(environment.dtypes) > 1:
        warnings.append(f"the trials ran in {' and '.join(environment.dtypes)} (precision: auto on machines of "
                        "different kinds): a difference between arms of the size of the rounding difference is not "
                        "evidence")
    reused = Counter(r.outcome.reused_from for r in rows
                     if r.status == "done" and r.outcome is not None and r.outcome.reused_from is not None)
    if reused:
        warnings.append("trials taken over from other stores (run --reuse-from), trained there under the same spec: "
                        + ", ".join(f"{n} from {source}" for source, n in reused.items())
                        + "; their timings and memory were measured in that run, on its machine")
    swept = swept_axes(rows, bool(study.info.tune_lrs))
    return StudyAnalysis(study.name, store, study.spec, study.info, tuple(groups.values()), tuple(rows), counts,
                         tuple(warnings), environment, selections, swept_axes=swept,
                         axis_effects=_axis_effects(groups, swept, cell), pairwise=_pairwise(groups, cell))


def _grid_rank(placements: tuple[str, ...], rows: list[TrialRow]) -> Callable[[GroupKey], tuple]:
    """A group key → its place in the grid's order: placements in the spec's order, then sizes, then each axis's
    values in the order the trials first show them, then a tuned LR, smallest first — whatever order the store
    lists trials in (a store written before 2026-12-03 numbered each batch of added trials from 0, interleaving
    a tuned study's later seeds with the first)."""
    sizes = list(dict.fromkeys(r.key.size for r in rows))
    values: dict[str, list[AxisValue]] = defaultdict(list)
    for r in rows:
        for name, value in r.key.axes:
            if value not in values[name]:
                values[name].append(value)

    def rank(key: GroupKey) -> tuple:
        placement = placements.index(key.placement) if key.placement in placements else len(placements)
        axes = tuple(values[name].index(value) for name, value in key.axes if name != TUNED_AXIS)
        lrs = tuple(float(value) for name, value in key.axes if name == TUNED_AXIS)  # a tuned LR: in its cell
        return placement, sizes.index(key.size), axes, lrs

    return rank


def _plain_cell(key: GroupKey) -> tuple:
    return key.cell


def _tuned_cell(key: GroupKey) -> tuple:
    """Tuned: placements are compared each at its own selected LR, so the LR is not part of the cell."""
    return tuned_cell(key).cell


def _tune_warnings(groups: dict[GroupKey, Group], selections: dict[GroupKey, Selection],
                   unconfirmed: set[GroupKey]) -> list[str]:
    out = []
    edge = [f"{s.cell.label} (lr={s.lr:g})" for s in selections.values() if s.at_edge]
    if edge:
        out.append(f"the selected LR is at the edge of the LRs tried for {', '.join(edge)}: the best LR may lie "
                   "outside them; widen tune.lr (or tune.extend: LRs past the edge, run when it is reached)")
    cells = {tuned_cell(k) for k in groups}
    left_at_one_seed = sorted(c.label for c in cells if c in unconfirmed)
    if left_at_one_seed:
        out.append(f"finalist {', '.join(left_at_one_seed)} not confirmed: search.confirm ran every seed only "
                   "for the best finalist(s) by validation loss; one seed, not compared")
    unselected = sorted(c.label for c in cells if c not in selections and c not in unconfirmed)
    if unselected:
        out.append(f"no LR selected yet for {', '.join(unselected)} (its selection pass is unfinished, or every LR "
                   "failed): not compared")
    return out


def _ratio(a: Summary | None, b: Summary | None) -> float | None:
    if a is None or b is None or b.mean == 0:
        return None
    return a.mean / b.mean


def _compare(groups: dict[GroupKey, Group], baseline: str, warnings: list[str],
             cell=_plain_cell) -> dict[GroupKey, Group]:
    base_by_cell = {cell(g.key): g for g in groups.values() if g.placement == baseline and g.compared}
    out = {}
    for key, g in groups.items():
        base = base_by_cell.get(cell(key))
        if base is None or not g.compared:
            out[key] = g
            continue
        loss = paired(g.by_seed["eval_loss"], base.by_seed["eval_loss"]) if "eval_loss" in base.stats else None
        base_loss = base.stats.get("eval_loss")
        pct = None if loss is None or base_loss is None else 100.0 * loss.mean_diff / base_loss.mean
        saved = base.trainable_params - g.trainable_params
        comparison = Comparison(
            base.key, loss, pct,
            100.0 * saved / base.trainable_params if base.trainable_params else 0.0,
            100.0 * saved / g.total_params if g.total_params else 0.0,
            _ratio(base.stats.get("train_s"), g.stats.get("train_s")),
            _ratio(g.stats.get("peak_mem_mb"), base.stats.get("peak_mem_mb")),
            paired(g.by_seed["accuracy"], base.by_seed["accuracy"])
            if "accuracy" in g.stats and "accuracy" in base.stats else None)
        out[key] = replace(g, comparison=comparison)
    missing = sorted({g.key.size.label for g in groups.values() if g.compared and cell(g.key) not in base_by_cell})
    if missing:
        warnings.append(f"baseline {baseline!r} has no finished trial at {', '.join(missing)}: no comparison there")
    return out


def _pairwise(groups: dict[GroupKey, Group], cell=_plain_cell) -> tuple[PairDifference, ...]:
    """Every pair of compared placements within a cell that holds three or more (with two, the baseline comparison
    is the pair), ordered by the better one's mean eval loss, then the other's; p-values Holm-adjusted per cell."""
    by_cell: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups.values():
        if g.compared and "eval_loss" in g.stats:
            by_cell[cell(g.key)].append(g)
    out: list[PairDifference] = []
    for members in by_cell.values():
        if len(members) < 3:
            continue
        ranked = sorted(members, key=lambda g: g.stats["eval_loss"].mean)
        pairs = [(a, b, d) for i, a in enumerate(ranked) for b in ranked[i + 1:]
                 if (d := paired(a.by_seed["eval_loss"], b.by_seed["eval_loss"])) is not None]
        tested = [d.p_value for _, _, d in pairs if d.p_value is not None]
        adjusted = iter(holm(tested))
        out += [PairDifference(a.key, b.key, d, None if d.p_value is None else next(adjusted)) for a, b, d in pairs]
    return tuple(out)


def swept_axes(rows: list[TrialRow], tuned: bool) -> dict[str, tuple[AxisValue, ...]]:
    """The axes the study sweeps (``axes:`` with more than one value; a tuned study's LR is selected, not swept) →
    their values in the spec's order: trials are stored in grid order, which follows the spec's lists."""
    out: dict[str, list[AxisValue]] = {}
    for row in rows:
        for name, value in row.key.axes:
            if not (tuned and name == TUNED_AXIS) and value not in out.setdefault(name, []):
                out[name].append(value)
    return {name: tuple(values) for name, values in out.items() if len(values) > 1}


def axis_cell_label(key: GroupKey, axis: str, tuned: bool) -> str:
    """What an axis comparison holds fixed for a group: its size and its other swept axes (not a tuned LR)."""
    return " ".join([key.size.label] + [f"{k}={v}" for k, v in key.axes
                                        if k != axis and not (tuned and k == TUNED_AXIS)])


def _axis_effects(groups: dict[GroupKey, Group], swept: dict[str, tuple[AxisValue, ...]],
                  cell=_plain_cell) -> tuple[AxisEffect, ...]:
    """Per swept axis and per compared group at another value: the seed-paired eval-loss difference to the same
    placement and cell at the axis's first value."""
    scored = [g for g in groups.values() if g.compared and "eval_loss" in g.stats]
    out = []
    for axis, values in swept.items():
        def rest(key: GroupKey, axis: str = axis) -> tuple:  # everything but this axis's value
            size, axes = cell(key)
            return key.placement, size, tuple((k, v) for k, v in axes if k != axis)

        references = {rest(g.key): g for g in scored if dict(g.key.axes)[axis] == values[0]}
        for g in scored:
            ref = references.get(rest(g.key))
            if ref is None or ref is g:
                continue
            delta = paired(g.by_seed["eval_loss"], ref.by_seed["eval_loss"])
            pct = None if delta is None else 100.0 * delta.mean_diff / ref.stats["eval_loss"].mean
            out.append(AxisEffect(axis, ref.key, g.key, delta, pct))
    return tuple(out)


# Swept axes (study.AXIS_FIELDS) that change what a trial costs beyond its adapter — the base's memory (quantize)
# or the compute (steps, batch) — so arms under different values do not share a Pareto frontier. The others (lr,
# warmup, schedule, weight_decay) are free choices: the best arm at a size, whatever its LR, is on the frontier.
COST_AXES = frozenset({"quantize", "steps", "batch"})


def condition(key: GroupKey) -> tuple[tuple[str, AxisValue], ...]:
    """The cost condition a group ran under: its values of :data:`COST_AXES`. No axis changes the adapter's size,
    so one frontier across conditions would set a nf4 arm against an fp32 arm of equal size and call it
    "dominated" for its base, not its placement: each condition has its own."""
    return tuple((k, v) for k, v in key.axes if k in COST_AXES)


def condition_label(cond: tuple[tuple[str, AxisValue], ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in cond) or "all runs"


def _pareto(groups: dict[GroupKey, Group]) -> dict[GroupKey, Group]:
    out = dict(groups)
    by_condition: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups.values():
        if "eval_loss" in g.stats and g.compared:
            by_condition[condition(g.key)].append(g)
    for scored in by_condition.values():
        dominators = pareto_front([(g.trainable_params, g.stats["eval_loss"].mean) for g in scored])
        for g, d in zip(scored, dominators, strict=True):
            if d is not None:
                out[g.key] = replace(g, dominated_by=scored[d].key)
        # The same frontier on task accuracy (higher is better: minimise −accuracy).
        with_acc = [out[g.key] for g in scored if "accuracy" in g.stats]
        on_acc = pareto_front([(g.trainable_params, -g.stats["accuracy"].mean) for g in with_acc])
        for g, d in zip(with_acc, on_acc, strict=True):
            if d is not None:
                out[g.key] = replace(out[g.key], dominated_on_accuracy=with_acc[d].key)
    return out


def _warnings(groups: dict[GroupKey, Group], rows: list[TrialRow], counts: dict[str, int],
              trial_warnings: dict[str, list[str]], cell=_plain_cell) -> list[str]:
    out = []
    # (a tuned study's LRs that lost the selection have one seed by design: not a weakness of the comparison)
    single = sorted(g.key.label for g in groups.values() if g.n == 1 and g.compared)
    if single:
        out.append(f"one seed only for {', '.join(single)}: no confidence interval and no test; "
                   "add seeds to the spec")
    by_cell: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups.values():
        if g.compared:
            by_cell[cell(g.key)].append(g)
    for (size, _), members in by_cell.items():
        params = [g.trainable_params for g in members if g.trainable_params]
        if len(params) > 1 and max(params) > (1 + BUDGET_MATCH_TOLERANCE) * min(params):
            out.append(f"placements at {size.label} are not budget-matched (trainable params "
                       f"{min(params):,}–{max(params):,}): lower loss may only mean more parameters; "
                       "read the Pareto plot, or run with budget:/budgets:")
    # A warning every placement shares (the data's truncation, say) is said once, not once per placement.
    shared = [w for w in next(iter(trial_warnings.values()), []) if len(trial_warnings) > 1
              and all(w in ws for ws in trial_warnings.values())]
    out += [f"every placement: {w}" for w in shared]
    out += [f"{placement}: {w}" for placement, ws in trial_warnings.items() for w in ws if w not in shared]
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        out.append(f"{len(failed)} trial(s) failed: " + "; ".join(
            f"{r.key.label} seed {r.seed}: {one_line(r.error, 200) if r.error else 'no message'}"
            for r in failed[:5]) + (" …" if len(failed) > 5 else ""))
    fused = [r.outcome.fused_with for r in rows if r.status == "done" and r.outcome is not None]
    if any(fused):
        out.append(f"{sum(1 for k in fused if k)} of {len(fused)} finished trial(s) trained fused with up to "
                   f"{max(fused)} other(s) (execution.fuse): their train time, tokens/s and peak memory are their "
                   "group's, so speed and memory comparisons between placements do not hold; run with "
                   "execution.fuse: off to compare them")
    unfinished = counts.get("pending", 0) + counts.get("running", 0) + counts.get("interrupted", 0)
    if unfinished:
        out.append(f"{unfinished} trial(s) not finished yet (pending, running or interrupted): "
                   "the figures cover finished trials only")
    return list(dict.fromkeys(out))  # cells that differ only by another axis (e.g. lr) would repeat a warning


def _environment(rows: list[TrialRow], info: StudyInfo) -> EnvironmentSummary:
    done = [r.outcome for r in rows if r.status == "done" and r.outcome is not None]
    if not done:
        return EnvironmentSummary((), (), info.versions)
    return EnvironmentSummary(tuple(sorted({o.environment.device for o in done})),
                              tuple(sorted({o.environment.dtype for o in done})), done[0].environment.versions,
                              tuple(sorted({o.environment.quantize for o in done})))
