"""Findings across studies: the same placements in several studies (tasks, horizons, bases), each study at its own
selected LRs, lined up against each study's baseline, and pooled.

A *column* is one compared cell of one study (a study with one size and no swept axis has one; ``quantize:
[none, nf4]`` gives two). In each column every placement is compared with the column's baseline on the test
split, seed-paired (:class:`loraplace.analysis.core.Comparison`), and ranked by its mean test loss.

Across columns the effect is the **relative** difference, Δ % = 100 × (placement − baseline) / baseline mean test
loss, per seed: losses of different tasks have different scales, their ratios do not. The pooled estimate takes
the **task** as its unit of replication: studies of one task share its data and test examples (and often their
seeds and half their trials), so two of them agreeing is not two independent findings. Each task's Δ % is the
mean of its studies'; over k ≥ 2 tasks the pooled Δ % is the mean of the tasks' with a t interval on k − 1
degrees of freedom — a random-effects model in which the true Δ % may differ from task to task and every task
counts once. On one task there is nothing to replicate over: one study gives its own seed-paired interval, and
several give the hull of theirs. Columns are not weighted by their own standard errors, as an inverse-variance
meta-analysis would: with two or three seeds a standard error rests on one or two degrees of freedom, and a
study whose seeds agree by chance would take nearly all the weight (on 2026-12-07 the 160-step GSM8K study's two
seeds of ``attn`` differed by 0.0002 nats and narrowed an inverse-variance interval over four studies to
± 0.02 %). With few tasks the interval is wide; that is the honest answer. Entries that repeat the very same
trials (a study that took another's over with ``run --reuse-from``) are counted once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraplace.analysis.core import Group, StudyAnalysis, analyze_store
from loraplace.analysis.stats import CONFIDENCE, Paired, paired
from loraplace.errors import LoraplaceError
from loraplace.tuning import tuned_cell

METRIC = "eval_loss"  # the test split's loss: what every study compares (validation only selects)


@dataclass(frozen=True)
class Column:
    """One compared cell of one study."""

    study: str
    store: str
    cell: str  # the cell's size and axes (e.g. "B=1,000,000 quantize=nf4")
    label: str  # the column's header: the study's name, with the cell where the study has several
    task: str  # what the study trained on (its training data source), so columns of one task can be told apart
    model: str
    steps: int | None
    baseline: str
    baseline_spec: dict[str, Any] | None  # the baseline placement as written (None: the study has no such key)
    has_baseline: bool  # the baseline finished in this cell (else the column gives ranks only)


@dataclass(frozen=True)
class Entry:
    """One placement in one column."""

    placement: str
    column: int  # index into :attr:`CrossStudy.columns`
    spec: dict[str, Any] | None  # the placement as the study wrote it
    size: str
    trainable_params: int
    n: int  # seeds with a test loss
    mean: float  # mean test loss
    rank: int  # 1: the lowest mean test loss among the column's placements
    of: int  # placements ranked in the column
    lr: float | None  # the selected LR (tuned studies)
    delta: Paired | None  # test loss, placement − baseline, seed-paired (None: no baseline, or it is the baseline)
    delta_pct: Paired | None  # the same per seed in % of the baseline's mean test loss
    vs_preset: str | None  # the best other preset of the column (lowest mean test loss)
    delta_vs_preset: Paired | None  # test loss, placement − that preset, seed-paired
    is_baseline: bool = False  # the column's baseline itself
    repeats: str | None = None  # an earlier column measured these very trials and the baseline's (counted once)


@dataclass(frozen=True)
class Pooled:
    """Δ % pooled over ``k`` tasks (see :func:`pool`)."""

    k: int  # tasks
    studies: int  # studies (columns) behind them
    estimate: float
    ci_low: float
    ci_high: float
    spread: float | None  # standard deviation of the tasks' Δ % (None: one task)
    interval: Literal["tasks", "one study", "hull"]  # t over tasks; one study's own; the hull of one task's studies


@dataclass(frozen=True)
class Tally:
    """Columns where the interval lies wholly below 0 (win), wholly above (loss), or holds 0 (tie); ``untested``:
    one shared seed, no interval."""

    wins: int = 0
    ties: int = 0
    losses: int = 0
    untested: int = 0

    def add(self, d: Paired | None) -> Tally:
        if d is None:
            return self
        verdict = d.verdict()
        return Tally(self.wins + (verdict == "better"), self.ties + (verdict == "not distinguishable"),
                     self.losses + (verdict == "worse"), self.untested + (verdict == "one seed: no test"))

    @property
    def text(self) -> str:
        return f"{self.wins}/{self.ties}/{self.losses}" + (f" (+{self.untested} untested)" if self.untested else "")


@dataclass(frozen=True)
class PlacementSummary:
    placement: str
    columns: int  # columns that hold it (repeats counted once)
    vs_baseline: Tally
    vs_preset: Tally
    pooled: Pooled | None  # over the columns with a Δ % interval (None: none has one)
    tasks: int  # distinct tasks it was compared on against the baseline
    tasks_better: int  # tasks on which every column's Δ % interval lies below 0
    tasks_worse: int  # … above 0
    mean_rank: float


@dataclass(frozen=True)
class CrossStudy:
    columns: tuple[Column, ...]
    entries: tuple[Entry, ...]
    summaries: tuple[PlacementSummary, ...]  # best pooled estimate first
    placements: tuple[str, ...]  # every placement: the baselines, then as the summaries
    notes: tuple[str, ...]  # mismatches and caveats a reader must see

    def entry(self, placement: str, column: int) -> Entry | None:
        return next((e for e in self.entries if e.placement == placement and e.column == column), None)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.task for c in self.columns))


def task_of(analysis: StudyAnalysis) -> str:
    """A name for what a study trained on: its training source's folder (data/tasks/nl2bash/train.jsonl →
    nl2bash), a builtin source's name, or a hub dataset's id."""
    data = analysis.spec.get("data") or {}
    train = str(data.get("train") or "")
    if train.startswith("builtin:"):
        return train.split("?")[0]
    path = Path(train)
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet", ".txt"):
        return path.parent.name or path.stem
    return train or "(unknown data)"


def _placement_specs(analysis: StudyAnalysis) -> dict[str, dict[str, Any]]:
    placements = analysis.spec.get("placements") or {}
    return {name: dict(value) if isinstance(value, dict) else {"value": value} for name, value in placements.items()}


def _steps(analysis: StudyAnalysis) -> int | None:
    steps = (analysis.spec.get("train") or {}).get("steps")
    return int(steps) if isinstance(steps, int) else None


def _cell_of(analysis: StudyAnalysis, group: Group):
    return tuned_cell(group.key).cell if analysis.tuned else group.key.cell


def _pct(group: Group, baseline: Group) -> Paired | None:
    base = baseline.stats.get(METRIC)
    if base is None or base.mean == 0:
        return None
    scale = 100.0 / base.mean
    return paired({s: v * scale for s, v in group.by_seed[METRIC].items()},
                  {s: v * scale for s, v in baseline.by_seed[METRIC].items()})


def _trial_ids(group: Group) -> frozenset[str]:
    return frozenset(t.id for t in group.trials)


def cross_study(analyses: Sequence[StudyAnalysis]) -> CrossStudy:
    """Line the studies' compared placements up by name; see the module docstring. Raises when nothing can be
    compared (no column holds its baseline and another placement)."""
    columns: list[Column] = []
    entries: list[Entry] = []
    notes: list[str] = []
    measured: dict[tuple[frozenset[str], frozenset[str]], str] = {}  # (trial ids, baseline's) → first column
    for analysis in analyses:
        cells: dict[Any, list[Group]] = {}
        for g in analysis.compared:
            if METRIC in g.stats:
                cells.setdefault(_cell_of(analysis, g), []).append(g)
        if not cells:
            notes.append(f"{analysis.name} ({analysis.store}): no finished trial with a test loss; left out")
            continue
        specs = _placement_specs(analysis)
        for groups in cells.values():
            cell_label = groups[0].key.size_label if not analysis.tuned else tuned_cell(groups[0].key).size_label
            label = analysis.name if len(cells) == 1 else f"{analysis.name} [{cell_label}]"
            base = next((g for g in groups if g.placement == analysis.baseline), None)
            if base is None:
                notes.append(f"{label}: its baseline {analysis.baseline!r} has no finished trial here: the column "
                             "gives ranks only")
            index = len(columns)
            ranked = sorted(groups, key=lambda g: g.stats[METRIC].mean)
            presets = [g for g in ranked if "preset" in specs.get(g.placement, {})]
            repeated = []
            for rank, g in enumerate(ranked, start=1):
                other = next((p for p in presets if p.placement != g.placement), None)
                is_base = base is not None and g.key == base.key
                key = (_trial_ids(g), _trial_ids(base) if base is not None else frozenset())
                repeats = measured.setdefault(key, label)
                if repeats != label:
                    repeated.append(f"{g.placement} ({repeats})")
                entries.append(Entry(
                    g.placement, index, specs.get(g.placement), g.key.size.label, g.trainable_params,
                    g.stats[METRIC].n, g.stats[METRIC].mean, rank, len(ranked),
                    next((float(v) for k, v in g.key.axes if k == "lr"), None),
                    None if base is None or is_base else paired(g.by_seed[METRIC], base.by_seed[METRIC]),
                    None if base is None or is_base else _pct(g, base),
                    other.placement if other is not None else None,
                    paired(g.by_seed[METRIC], other.by_seed[METRIC]) if other is not None else None,
                    is_base, None if repeats == label else repeats))
            if repeated:
                notes.append(f"{label} repeats trials measured in another column (same trial ids, e.g. taken over "
                             f"with run --reuse-from): {', '.join(repeated)}; shown, counted once in the summary")
            columns.append(Column(analysis.name, analysis.store, cell_label, label, task_of(analysis),
                                  analysis.model, _steps(analysis), analysis.baseline, specs.get(analysis.baseline),
                                  base is not None))
    if not any(e.delta is not None for e in entries):
        raise LoraplaceError(
            "nothing to compare: no study has a finished baseline and another placement with a test loss",
            "compare reads finished studies (loraplace status STORE); each needs its baseline and one more placement")
    notes += _mismatches(columns, entries)
    names = tuple(dict.fromkeys(e.placement for e in entries))
    summaries = [_summary(p, columns, [e for e in entries if e.placement == p]) for p in names]
    summaries.sort(key=lambda s: (s.pooled is None, s.pooled.estimate if s.pooled else 0.0, s.mean_rank))
    baselines = tuple(dict.fromkeys(e.placement for e in entries if e.is_baseline))
    placements = baselines + tuple(s.placement for s in summaries if s.placement not in baselines)
    if len({e.column for e in entries if e.repeats is None}) == 1:
        notes.append("one study only: the summary is that study's comparison, not a finding across studies")
    return CrossStudy(tuple(columns), tuple(entries), tuple(summaries), placements, tuple(notes))


def _spec_text(spec: dict[str, Any] | None) -> str:
    return "(not in the spec)" if spec is None else json.dumps(spec, sort_keys=True, separators=(", ", ": "))


def _flat(spec: dict[str, Any] | None, prefix: str = "") -> dict[str, str]:
    if spec is None:
        return {"": "(not in the spec)"}
    out: dict[str, str] = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


def _spec_differences(specs: list[tuple[str, dict[str, Any] | None]]) -> str:
    """The keys whose values differ between the labelled specs: ``auto.rank: 8 (A) / 16 (B)``."""
    flats = [(label, _flat(spec)) for label, spec in specs]
    keys = sorted({k for _, flat in flats for k in flat})
    parts = []
    for key in keys:
        values: dict[str, list[str]] = {}
        for label, flat in flats:
            values.setdefault(flat.get(key, "(unset)"), []).append(label)
        if len(values) > 1:
            parts.append(f"{key or 'spec'}: "
                         + " / ".join(f"{v} ({', '.join(labels)})" for v, labels in values.items()))
    return "; ".join(parts)


def _mismatches(columns: list[Column], entries: list[Entry]) -> list[str]:
    """Where a name means different things in different studies: its spec, its trainable parameters at one size,
    or the baseline everything is measured against. Sizes that differ between columns are said once: each
    column compares placements at its own size."""
    out: list[str] = []
    baselines = {(c.baseline, _spec_text(c.baseline_spec)) for c in columns}
    if len({c.baseline for c in columns}) > 1:
        out.append("the studies' baselines differ (" + "; ".join(f"{c.label}: {c.baseline}" for c in columns)
                   + "): each Δ is against its own study's baseline")
    elif len(baselines) > 1:
        out.append(f"baseline {columns[0].baseline!r} is not the same in every study: " + _spec_differences(
            [(c.label, c.baseline_spec) for c in columns]))
    sizes = list(dict.fromkeys(c.cell.split(" ")[0] for c in columns))
    if len(sizes) > 1:
        out.append(f"the columns compare at different sizes ({', '.join(sizes)}): each compares its placements at "
                   "its own size, so a pooled Δ mixes budgets")
    for placement in dict.fromkeys(e.placement for e in entries):
        mine = [e for e in entries if e.placement == placement]
        if len({_spec_text(e.spec) for e in mine}) > 1:
            out.append(f"placement {placement!r} is not the same in every study: " + _spec_differences(
                [(columns[e.column].label, e.spec) for e in mine]))
        for size in dict.fromkeys(e.size for e in mine):
            params = [e.trainable_params for e in mine if e.size == size]
            if max(params) > 1.1 * min(params):
                out.append(f"placement {placement!r} at {size} trains different parameter counts: " + ", ".join(
                    f"{columns[e.column].label}: {e.trainable_params:,}" for e in mine if e.size == size))
    return out


def _summary(placement: str, columns: list[Column], mine: list[Entry]) -> PlacementSummary:
    counted = [e for e in mine if e.repeats is None]
    vs_base, vs_preset = Tally(), Tally()
    for e in counted:
        vs_base = vs_base.add(e.delta)
        vs_preset = vs_preset.add(e.delta_vs_preset)
    with_ci: dict[str, list[Paired]] = {}
    for e in counted:
        if e.delta_pct is not None and e.delta_pct.ci is not None:
            with_ci.setdefault(columns[e.column].task, []).append(e.delta_pct)
    by_task: dict[str, list[str]] = {}
    for e in counted:
        if e.delta is not None:
            by_task.setdefault(columns[e.column].task, []).append(e.delta.verdict())
    return PlacementSummary(
        placement, len(counted), vs_base, vs_preset, pool(with_ci) if with_ci else None, len(by_task),
        sum(1 for v in by_task.values() if all(x == "better" for x in v)),
        sum(1 for v in by_task.values() if all(x == "worse" for x in v)),
        sum(e.rank for e in counted) / len(counted) if counted else math.nan)


def pool(effects_by_task: dict[str, list[Paired]], confidence: float = CONFIDENCE) -> Pooled:
    """Δ % pooled with the task as the unit of replication (see the module docstring): each task's estimate is the
    mean of its studies' Δ %; over k ≥ 2 tasks, their mean with a t interval on k − 1 degrees of freedom; on one
    task, the one study's own seed-paired interval, or with several studies the hull of their intervals (they
    share a test split: their agreement is no narrower evidence than the widest of them)."""
    tasks = {task: effects for task, effects in effects_by_task.items() if effects}
    if not tasks:
        raise ValueError("nothing to pool")
    studies = sum(len(effects) for effects in tasks.values())
    if len(tasks) == 1:
        (effects,) = tasks.values()
        mean = sum(e.mean_diff for e in effects) / len(effects)
        return Pooled(1, studies, mean, min(e.ci[0] for e in effects), max(e.ci[1] for e in effects), None,
                      "one study" if len(effects) == 1 else "hull")
    from scipy import stats as _scipy

    ys = [sum(e.mean_diff for e in effects) / len(effects) for effects in tasks.values()]
    k = len(ys)
    mean = sum(ys) / k
    sd = math.sqrt(sum((y - mean) ** 2 for y in ys) / (k - 1))
    half = float(_scipy.t.ppf(0.5 + confidence / 2, k - 1)) * sd / math.sqrt(k)
    return Pooled(k, studies, mean, mean - half, mean + half, sd, "tasks")


def compare_stores(stores: Sequence[str | Path], names: Sequence[str | None] | None = None) -> CrossStudy:
    """:func:`cross_study` of each store's study (``names``: one study name per store, None for the latest)."""
    if not stores:
        raise LoraplaceError("compare needs at least one study store", "loraplace compare A.db B.db …")
    names = list(names) if names is not None else [None] * len(stores)
    paths = [str(s) for s in stores]
    if len(set(paths)) < len(paths) and len({(p, n) for p, n in zip(paths, names, strict=True)}) < len(paths):
        raise LoraplaceError("a store is given twice", "give each study once")
    return cross_study([analyze_store(store, name) for store, name in zip(stores, names, strict=True)])
