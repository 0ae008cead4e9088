"""A study's results, read from its store and grouped across seeds: the numbers every report format shows.

A *group* is one (placement, size, other axes) cell of the grid; its trials differ only by seed. Each group is
compared with the baseline group of the same size and axes: differences are seed-paired (same seed = same data
order and adapter init draw), so the test is the paired t-test and the interval is on the per-seed differences.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplace.analysis.stats import Paired, Summary, paired, pareto_front, summarize

# metric key → (label, lower is better)
METRICS: dict[str, tuple[str, bool]] = {
    "eval_loss": ("eval loss", True),
    "perplexity": ("perplexity", True),
    "accuracy": ("accuracy", False),
    "tokens_per_s": ("tokens/s", False),
    "train_s": ("train time (s)", True),
    "peak_mem_mb": ("peak memory (MiB)", True),
}
BUDGET_MATCH_TOLERANCE = 0.10  # placements whose params differ by more than this are "not budget-matched"


def size_label(labels: dict[str, Any]) -> str:
    if "rank" in labels:
        return f"r={labels['rank']}"
    if "budget" in labels:
        return f"B={labels['budget']:,}"
    return ""


@dataclass(frozen=True)
class TrialRow:
    id: str
    group: str
    placement: str
    seed: int
    status: str
    metrics: dict[str, float]
    error: str | None
    curve: tuple[tuple[int, int, float], ...]  # (step, tokens so far, train loss)


@dataclass(frozen=True)
class Comparison:
    """A group against the baseline group of the same size and axes."""

    baseline: str  # the baseline group's key
    delta_loss: Paired | None  # eval loss, candidate − baseline, seed-paired
    delta_loss_pct: float | None  # mean difference in % of the baseline's mean eval loss
    params_saved_pct_of_baseline: float  # (P_base − P) / P_base × 100
    params_saved_pct_of_model: float  # (P_base − P) / total model params × 100
    speedup: float | None  # baseline train time / this train time (means)
    memory_ratio: float | None  # this peak memory / baseline peak memory (means)


@dataclass(frozen=True)
class Group:
    key: str  # e.g. "attn r=8" or "all B=1,000,000 lr=0.001"
    placement: str
    size: str
    axes: tuple[tuple[str, Any], ...]
    trials: tuple[TrialRow, ...]  # done trials only
    trainable_params: int
    total_params: int
    stats: dict[str, Summary]  # metric → summary over seeds
    by_seed: dict[str, dict[int, float]]  # metric → seed → value
    sites: tuple[tuple[int | None, str, int], ...]  # (layer, role, rank) of the plan
    num_layers: int
    roles: tuple[str, ...]
    probe: dict[str, Any] | None = None  # importance-probe scores of an auto placement (first seed)
    comparison: Comparison | None = None
    dominated_by: str | None = None  # the key of a group with ≤ params and ≤ mean eval loss

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def is_baseline(self) -> bool:
        return self.comparison is not None and self.comparison.baseline == self.key

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _, _ in self.sites if layer is not None})

    @property
    def layer_selective(self) -> bool:
        return bool(self.sites) and len(self.layers) < self.num_layers


@dataclass(frozen=True)
class StudyAnalysis:
    name: str
    store: str
    spec: dict[str, Any]
    model: str
    baseline: str | None  # baseline placement name
    groups: tuple[Group, ...]
    trials: tuple[TrialRow, ...]  # every trial, any status
    counts: dict[str, int]
    warnings: tuple[str, ...]
    environment: dict[str, Any] = field(default_factory=dict)

    def group(self, key: str) -> Group:
        return next(g for g in self.groups if g.key == key)

    @property
    def frontier(self) -> list[Group]:
        return sorted((g for g in self.groups if g.dominated_by is None and "eval_loss" in g.stats),
                      key=lambda g: g.trainable_params)


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


def _sites_of(result: dict[str, Any], trial_config: dict[str, Any]) -> tuple[tuple, int, tuple[str, ...]]:
    info = result.get("sites") or _replan(trial_config)
    sites = tuple((s[0], s[1], int(s[2])) for s in info.get("sites", []))
    return sites, int(info.get("num_layers", 0)), tuple(info.get("roles", ()))


def _replan(trial: dict[str, Any]) -> dict[str, Any]:
    """Site map for trials stored before results kept one: re-resolve the placement on the meta-device model.
    Best effort: a model that cannot be reached (hub, offline) just means no placement heatmap."""
    try:
        from loraplace.placement import plan_for_model

        plan = plan_for_model(trial["model"], trial["placement"], rank=trial.get("rank"), budget=trial.get("budget"))
    except Exception:  # noqa: BLE001 - optional: the report goes on without this figure
        return {}
    return {"num_layers": plan.num_layers, "roles": list(plan.roles_present),
            "sites": [[m.layer, m.role, m.rank] for m in plan.modules]}


def analyze_store(store_path: str | Path, name: str | None = None) -> StudyAnalysis:
    """Read a study from its store (read-only, safe while it runs) and compute every summary."""
    from loraplace.store import Store

    with Store(store_path, readonly=True) as store:
        study = store.study(name)
        records = store.trials(study.id)
        counts = store.counts(study.id)
    return analyze_records(study.name, str(store_path), study.spec, records, counts)


def analyze_records(name: str, store: str, spec: dict[str, Any], records, counts: dict[str, int]) -> StudyAnalysis:
    warnings: list[str] = []
    rows: list[TrialRow] = []
    members: dict[str, list[tuple[TrialRow, dict]]] = defaultdict(list)
    group_meta: dict[str, tuple[str, str, tuple]] = {}
    trial_warnings: dict[str, list[str]] = defaultdict(list)  # placement → unique warnings (plan, data)
    configs = {rec.id: rec.config.get("trial", {}) for rec in records}
    for rec in records:
        labels = dict(rec.config.get("labels", {}))
        placement = str(labels.pop("placement", "?"))
        seed = int(labels.pop("seed", 0))
        size = size_label(labels)
        axes = tuple(sorted((k, v) for k, v in labels.items() if k not in ("rank", "budget")))
        key = " ".join([placement, size] + [f"{k}={v}" for k, v in axes]).strip()
        result = rec.result or {}
        curve = tuple((int(p["step"]), int(p.get("tokens") or 0), float(p["loss"]))
                      for p in result.get("curve", []) if p.get("loss") is not None)
        row = TrialRow(rec.id, key, placement, seed, rec.status, dict(rec.metrics), rec.error, curve)
        rows.append(row)
        group_meta[key] = (placement, size, axes)
        if rec.status == "done":
            members[key].append((row, result))
        for w in result.get("warnings", []):
            if w not in trial_warnings[placement]:
                trial_warnings[placement].append(w)

    groups: dict[str, Group] = {}
    for key, (placement, size, axes) in group_meta.items():
        done = members.get(key, [])
        if not done:
            continue
        by_seed = {m: {r.seed: r.metrics[m] for r, _ in done if m in r.metrics and r.metrics[m] is not None}
                   for m in METRICS}
        stats = {m: s for m, values in by_seed.items() if (s := summarize(list(values.values()))) is not None}
        sites, num_layers, roles = _sites_of(done[0][1], configs[done[0][0].id])
        groups[key] = Group(key, placement, size, axes, tuple(r for r, _ in done),
                            int(done[0][0].metrics.get("trainable_params", 0)),
                            int(done[0][0].metrics.get("total_params", 0)), stats, by_seed, sites, num_layers, roles,
                            done[0][1].get("probe"))

    baseline = spec.get("baseline")
    placements = list(spec.get("placements", {}))
    if baseline is None and placements:
        baseline = placements[0]
        warnings.append(f"no baseline set in the spec: comparing against the first placement, {baseline!r}")
    groups = _compare(groups, baseline, warnings)
    groups = _pareto(groups)
    warnings += _warnings(groups, rows, counts, trial_warnings)
    env = _environment(records, spec)
    return StudyAnalysis(name, store, spec, str(spec.get("model", "")), baseline, tuple(groups.values()),
                         tuple(rows), counts, tuple(warnings), env)


def _ratio(a: Summary | None, b: Summary | None) -> float | None:
    if a is None or b is None or b.mean == 0:
        return None
    return a.mean / b.mean


def _compare(groups: dict[str, Group], baseline: str | None, warnings: list[str]) -> dict[str, Group]:
    from dataclasses import replace

    if baseline is None:
        return groups
    base_by_cell = {(g.size, g.axes): g for g in groups.values() if g.placement == baseline}
    out = {}
    for key, g in groups.items():
        base = base_by_cell.get((g.size, g.axes))
        if base is None:
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
            _ratio(g.stats.get("peak_mem_mb"), base.stats.get("peak_mem_mb")))
        out[key] = replace(g, comparison=comparison)
    missing = sorted({f"{g.size}" for g in groups.values() if (g.size, g.axes) not in base_by_cell})
    if missing:
        warnings.append(f"baseline {baseline!r} has no finished trial at {', '.join(missing)}: no comparison there")
    return out


def _pareto(groups: dict[str, Group]) -> dict[str, Group]:
    from dataclasses import replace

    scored = [g for g in groups.values() if "eval_loss" in g.stats]
    dominators = pareto_front([(g.trainable_params, g.stats["eval_loss"].mean) for g in scored])
    out = dict(groups)
    for g, d in zip(scored, dominators, strict=True):
        if d is not None:
            out[g.key] = replace(g, dominated_by=scored[d].key)
    return out


def _warnings(groups: dict[str, Group], rows: list[TrialRow], counts: dict[str, int],
              trial_warnings: dict[str, list[str]]) -> list[str]:
    out = []
    single = sorted(g.key for g in groups.values() if g.n == 1)
    if single:
        out.append(f"one seed only for {', '.join(single)}: no confidence interval and no test; "
                   "add seeds to the spec")
    by_cell: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups.values():
        by_cell[(g.size, g.axes)].append(g)
    for (size, _), cell in by_cell.items():
        params = [g.trainable_params for g in cell if g.trainable_params]
        if len(params) > 1 and max(params) > (1 + BUDGET_MATCH_TOLERANCE) * min(params):
            out.append(f"placements at {size or 'this size'} are not budget-matched (trainable params "
                       f"{min(params):,}–{max(params):,}): lower loss may only mean more parameters; "
                       "read the Pareto plot, or run with budget:/budgets:")
    out += [f"{placement}: {w}" for placement, ws in trial_warnings.items() for w in ws]
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        out.append(f"{len(failed)} trial(s) failed: " + "; ".join(
            f"{r.group} seed {r.seed}: {(r.error or '').splitlines()[0][:120] if r.error else 'no message'}"
            for r in failed[:5]) + (" …" if len(failed) > 5 else ""))
    unfinished = counts.get("pending", 0) + counts.get("running", 0) + counts.get("interrupted", 0)
    if unfinished:
        out.append(f"{unfinished} trial(s) not finished yet (pending, running or interrupted): "
                   "the figures cover finished trials only")
    return out


def _environment(records, spec: dict[str, Any]) -> dict[str, Any]:
    done = [r.result for r in records if r.status == "done" and r.result]
    env: dict[str, Any] = {}
    if done:
        env["device"] = sorted({d.get("device", "") for d in done})
        env["dtype"] = sorted({d.get("dtype", "") for d in done})
        env["versions"] = done[0].get("versions", {})
    elif spec.get("versions"):
        env["versions"] = spec["versions"]
    return env
