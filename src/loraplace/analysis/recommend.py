"""``loraplace recommend``: the placement to use, from a study's analysis.

The candidates are the compared groups (in a tuned study: each placement at its own selected LR) with the metric
measured and, with a budget, at most that many trainable parameters. The best mean wins; the runner-up is the next
best. When the seed-paired 95 % interval of their difference includes 0 the two are not distinguishable, and the
one with fewer trainable parameters is recommended instead (it costs less for an answer the data cannot tell
apart). A placement search (``search:``) answers with a preset instead: when its best placement is not a bare
preset and is not distinguishable from the best preset among its finalists, the preset is the answer (simpler,
supported by every framework). The chosen placement is returned as an exact placement spec rebuilt from its
trials' sites, so plan and export-placement reproduce exactly what was measured.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from loraplace.analysis.core import METRICS, Group, StudyAnalysis, analyze_records
from loraplace.analysis.stats import paired
from loraplace.errors import LoraplaceError
from loraplace.placement.spec import PlacementSpec
from loraplace.records import Candidate, Recommendation, SiteMap
from loraplace.train_config import TrainSpec

RECOMMEND_METRICS = ("eval_loss", "accuracy")


def recommend_from_store(store_path: str, name: str | None = None, budget: int | None = None,
                         metric: str = "eval_loss", at: dict[str, str] | None = None) -> Recommendation:
    """Read the study (read-only) and recommend; see :func:`recommend`."""
    from loraplace.store import Store

    with Store.open_readonly(store_path) as store:
        study = store.study(name)
        records = store.trials(study.id)
        counts = store.counts(study.id)
    analysis = analyze_records(study, str(store_path), records, counts)
    specs = {rec.id: rec.spec for rec in records}
    return recommend(analysis, specs, budget, metric, at)


def _presets(analysis: StudyAnalysis) -> set[str]:
    """The study's placements written as a bare preset (a search never answers worse than the best of them)."""
    from loraplace.search import is_preset

    placements = analysis.spec.get("placements", {})
    return {name for name, p in placements.items() if is_preset(PlacementSpec.model_validate(p))}


def _metric_label(analysis: StudyAnalysis, metric: str) -> str:
    label = METRICS[metric][0]
    has_validation = any("val_loss" in g.stats for g in analysis.groups)
    return f"test {label.removeprefix('eval ')}" if has_validation or metric == "accuracy" else label


def _candidate(group: Group, metric: str, specs: dict[str, dict[str, Any]]) -> Candidate:
    summary = group.stats[metric]
    lr = TrainSpec.model_validate(specs[group.trials[0].id]["train"]).lr
    return Candidate(placement=group.placement, size=group.key.size_label, lr=lr,
                     trainable_params=group.trainable_params, value=summary.mean, interval=summary.ci,
                     seeds=summary.n)


def exact_placement_spec(sites: SiteMap, trial_placement: PlacementSpec) -> dict[str, Any]:
    """A placement spec that resolves to exactly these sites and ranks: one group per (role, rank) with its
    layers; alpha, dropout and variant as the trial had them. An EVA trial's sites are the ranks EVA ended with
    (what was measured), not its starting size: they are exported with ``eva_rho: 1``, under which PEFT's EVA
    initialises each site at its given rank and moves no rank between sites."""
    own = trial_placement.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    layers: dict[tuple[str, int], list[int]] = defaultdict(list)
    for site in sites.sites:
        if site.layer is None:
            raise LoraplaceError(f"site {site.role!r} outside the blocks cannot be written as a layer group")
        layers[(site.role, site.rank)].append(site.layer)

    def order(item: tuple[tuple[str, int], list[int]]) -> tuple[int, int]:
        (role, rank), _ = item
        return (sites.roles.index(role) if role in sites.roles else len(sites.roles), rank)

    groups = [{"roles": [role], "layers": sorted(ls), "rank": rank} for (role, rank), ls in sorted(layers.items(),
                                                                                                  key=order)]
    keep = ("alpha", "alpha_ratio", "dropout", "variant", "allow_unassigned")
    exact = {"groups": groups} | {key: own[key] for key in keep if key in own}
    return exact | ({"eva_rho": 1.0} if trial_placement.variant == "eva" else {})


def _at_value(value: Any, wanted: str) -> bool:
    """An axis value as a group key holds it against the text of ``--at`` (1e-3 and 0.001 are the same LR)."""
    if str(value) == wanted:
        return True
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return False


def recommend(analysis: StudyAnalysis, specs: dict[str, dict[str, Any]], budget: int | None = None,
              metric: str = "eval_loss", at: dict[str, str] | None = None) -> Recommendation:
    """``at``: recommend among the groups at these values of swept axes only (e.g. {"quantize": "nf4"}: the best
    placement on the 4-bit base). Without it, a study that sweeps an axis is compared across its values, and the
    reason says so."""
    if metric not in RECOMMEND_METRICS:
        raise LoraplaceError(f"--metric {metric!r}: one of {', '.join(RECOMMEND_METRICS)}")
    lower = METRICS[metric][1]
    at = at or {}
    swept = {name: [str(v) for v in values] for name, values in analysis.swept_axes.items()}
    problems = [f"--at {k}={v}: the study does not sweep {k!r}" + (
        f" (it sweeps {', '.join(swept)})" if swept else " (it sweeps no axis)") for k, v in at.items()
        if k not in swept]
    problems += [f"--at {k}={v}: {k} takes {', '.join(swept[k])} in this study" for k, v in at.items()
                 if k in swept and not any(_at_value(x, v) for x in swept[k])]
    if problems:
        raise LoraplaceError("; ".join(problems))
    measured = [g for g in analysis.compared if metric in g.stats
                and all(_at_value(dict(g.key.axes)[k], v) for k, v in at.items())]
    if not measured and analysis.tuned and any(metric in g.stats for g in analysis.groups):
        raise LoraplaceError(f"study {analysis.name!r} has finished trials, but no learning rate is selected yet: "
                             "a tuned study compares each placement at the LR its selection pass chose, and a "
                             "placement's LR is chosen when it has run every tune LR on the selection seed(s)",
                             f"finish the selection pass: loraplace run SPEC --store {analysis.store} (it resumes); "
                             f"loraplace status {analysis.store} shows what is left")
    if not measured:
        hint = ("accuracy needs generation: eval: {generate: N} in the study (train --generate N)"
                if metric == "accuracy" else f"run it first, or check loraplace status {analysis.store}")
        raise LoraplaceError(f"study {analysis.name!r} has no finished trial with {METRICS[metric][0]}", hint)
    pool = [g for g in measured if budget is None or g.trainable_params <= budget]
    if not pool:
        smallest = min(measured, key=lambda g: g.trainable_params)
        raise LoraplaceError(f"no placement of study {analysis.name!r} fits a budget of {budget:,} trainable "
                             f"parameters", f"the smallest is {smallest.key.label} with "
                             f"{smallest.trainable_params:,}; raise --budget")

    def rank_key(g: Group) -> tuple[float, int]:
        mean = g.stats[metric].mean
        return (mean if lower else -mean, g.trainable_params)

    ranked = sorted(pool, key=rank_key)
    best = ranked[0]
    label = _metric_label(analysis, metric)
    presets = _presets(analysis) if analysis.info.search else None
    if presets is not None and best.placement not in presets:  # a search: the best preset is the one to beat
        runner = next((g for g in ranked if g.placement in presets), ranked[1] if len(ranked) > 1 else None)
    else:
        runner = ranked[1] if len(ranked) > 1 else None
    chosen, other = best, runner
    distinguishable = difference = interval = p_value = None
    if runner is None:
        reason = f"{best.key.label} is the only placement with {label}" + (
            f" within {budget:,} trainable parameters." if budget is not None else ".")
    else:
        test = paired(best.by_seed[metric], runner.by_seed[metric])
        verdict = test.verdict(lower) if test is not None else "no shared seeds"
        distinguishable = verdict in ("better", "worse")
        if presets is not None:  # a search: a preset wins every tie (simpler; every framework takes it)
            to_preset = best.placement not in presets and runner.placement in presets
            smaller = runner.trainable_params < best.trainable_params and (runner.placement in presets
                                                                           or best.placement not in presets)
            if not distinguishable and (to_preset or smaller):
                chosen, other = runner, best
        elif not distinguishable and runner.trainable_params < best.trainable_params:
            chosen, other = runner, best
        if test is not None:
            sign = 1.0 if chosen is best else -1.0
            difference = sign * test.mean_diff
            interval = None if test.ci is None else tuple(sorted((sign * test.ci[0], sign * test.ci[1])))
            p_value = test.p_value
        reason = _reason(best, runner, chosen, label, metric, verdict, test, budget)
        if presets is not None and chosen is best and best.placement in presets and not distinguishable \
                and runner.placement not in presets:
            reason = (reason.split(" The interval includes 0")[0] + f" The interval includes 0: they are not "
                      f"distinguishable; {best.key.label} is a preset, and a search keeps the preset when the two "
                      "cannot be told apart (simpler, and supported by every framework).")
        if presets is not None and chosen.placement in presets and best.placement not in presets:
            reason = (reason.split(" The interval includes 0")[0] + f" The interval includes 0: {best.key.label} is "
                      f"not distinguishable from the best preset, so the search answers with the preset "
                      f"{runner.key.label} (simpler, and supported by every framework).")
    across = {k: vs for k, vs in swept.items() if k not in at and len({dict(g.key.axes).get(k) for g in pool}) > 1}
    if across:
        reason += (" The study sweeps " + ", ".join(f"{k} ({', '.join(vs)})" for k, vs in across.items())
                   + ": this compares placements across those values; --at " + ",".join(
                       f"{k}={vs[-1]}" for k, vs in across.items()) + " recommends for one setting.")
    first_spec = specs[chosen.trials[0].id]
    placement = PlacementSpec.model_validate(first_spec["placement"])
    train = TrainSpec.model_validate(first_spec["train"])
    placement_spec = (exact_placement_spec(chosen.sites, placement) if chosen.sites is not None else
                      placement.model_dump(mode="json", exclude_none=True, exclude_defaults=True))
    # The chosen group's best seed whose adapter is on disk: what a user loads or merges right away.
    kept = [t for t in chosen.trials if t.outcome is not None and t.outcome.adapter is not None
            and metric in t.metrics]
    best_trial = (min if lower else max)(kept, key=lambda t: t.metrics[metric]) if kept else None
    return Recommendation(
        adapter=None if best_trial is None else best_trial.outcome.adapter.path,
        adapter_seed=None if best_trial is None else best_trial.seed,
        study=analysis.name, model=analysis.model, metric=metric, metric_label=label, lower_is_better=lower,
        budget=budget, chosen=_candidate(chosen, metric, specs),
        runner_up=None if other is None else _candidate(other, metric, specs),
        distinguishable=distinguishable, difference=difference, difference_interval=interval, p_value=p_value,
        reason=reason, placement_spec=placement_spec, tuned=analysis.tuned, trial_spec=first_spec, at=at,
        quantize=train.quantize, bnb_4bit_use_double_quant=train.bnb_4bit_use_double_quant,
        incomplete=_incomplete(analysis, chosen, metric))


def _incomplete(analysis: StudyAnalysis, chosen: Group, metric: str) -> str | None:
    """What is left of the study, in words, or None: an answer from an unfinished study says so."""
    open_ = {status: n for status, n in analysis.counts.items() if status in ("pending", "running", "interrupted")
             and n}
    parts = []
    if open_:
        total = sum(analysis.counts.values())
        parts.append(f"{sum(open_.values())} of {total} trials not finished ("
                     + ", ".join(f"{n} {status}" for status, n in open_.items()) + ")")
    if analysis.counts.get("failed"):
        parts.append(f"{analysis.counts['failed']} failed")
    planned = len(analysis.spec.get("seeds", []))
    if chosen.stats[metric].n < planned:
        parts.append(f"the chosen placement has {chosen.stats[metric].n} of its {planned} seeds")
    if not parts:
        return None
    # A failed trial is finished: it changes the answer only when it is run again, and that takes a flag.
    failed = analysis.counts.get("failed", 0)
    if open_ and failed:
        until = "once the study finishes and its failed trials are run again (--retry-failed)"
    elif failed:
        until = "only if the failed trials are run again (loraplace run SPEC --retry-failed)"
    else:
        until = "once the study finishes"
    return "; ".join(parts) + f": the answer may change {until}"


def _fmt(group: Group, metric: str) -> str:
    s = group.stats[metric]
    ci = f" ± {s.ci_half:.4f}" if s.ci_half is not None else ""
    return f"{s.mean:.4f}{ci} ({s.n} seed{'s' if s.n != 1 else ''})"


def _reason(best: Group, runner: Group, chosen: Group, label: str, metric: str, verdict: str, test,
            budget: int | None) -> str:
    within = f" among placements within {budget:,} trainable parameters" if budget is not None else ""
    head = (f"{best.key.label} has the best mean {label}{within}, {_fmt(best, metric)}; the runner-up is "
            f"{runner.key.label}, {_fmt(runner, metric)}.")
    if test is None or test.ci is None:
        evidence = (" They share no seeds, so no paired test." if test is None else
                    " With one shared seed there is no interval.")
        same = " Without an interval they count as not distinguishable"
    else:
        low, high = test.ci
        evidence = (f" Seed-paired difference {test.mean_diff:+.4f}, 95 % CI [{low:+.4f}, {high:+.4f}], "
                    f"p = {test.p_value:.3g} over {test.n} seeds.")
        same = " The interval includes 0: they are not distinguishable"
    if verdict in ("better", "worse"):
        return head + evidence + f" The interval excludes 0: recommending {best.key.label}."
    if chosen is best:
        return (head + evidence + same + f"; {best.key.label} is recommended, as it also trains no more "
                f"parameters ({best.trainable_params:,} vs {runner.trainable_params:,}).")
    saved = 100.0 * (best.trainable_params - runner.trainable_params) / best.trainable_params
    return (head + evidence + same + f", so {runner.key.label} is recommended: the same {label} as far as these "
            f"seeds can tell, with {saved:.0f} % fewer trainable parameters ({runner.trainable_params:,} vs "
            f"{best.trainable_params:,}).")
