"""The comparison, per-site and per-trial tables as rows of formatted cells, shared by every output format."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loraplace.analysis.core import Group, StudyAnalysis, axis_cell_label, compact_ranges, condition_label
from loraplace.analysis.stats import CONFIDENCE, Summary
from loraplace.formatting import one_line
from loraplace.store import TrialRecord


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: tuple[bool, ...]  # right-align (numbers)
    notes: tuple[str, ...] = ()  # how to read the table (what Δ, p and the verdict mean)
    findings: tuple[str, ...] = ()  # what it shows, a sentence per cell; the terminal prints these too

    @property
    def footnotes(self) -> tuple[str, ...]:
        """Everything printed beneath the table in a report: the notes, then the findings."""
        return self.notes + self.findings


def fmt_mean(s: Summary | None, spec: str = ".4f") -> str:
    if s is None:
        return "—"
    if s.ci_half is None:
        return f"{s.mean:{spec}} (n=1)"
    return f"{s.mean:{spec}} ± {s.ci_half:{spec}}"


def fmt_params(n: int) -> str:
    return f"{n:,}"


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _delta(g: Group) -> tuple[str, str, str, str]:
    c = g.comparison
    if c is None:
        return "—", "—", "—", "no baseline at this size"
    if g.is_baseline:
        return "0 (baseline)", "—", "—", "baseline"
    d = c.delta_loss
    if d is None:
        return "—", "—", "—", "no shared seeds"
    text = f"{d.mean_diff:+.4f}" + (f" ± {d.ci_half:.4f}" if d.ci_half is not None else "")
    pct = f"{c.delta_loss_pct:+.2f}%" if c.delta_loss_pct is not None else "—"
    return text, pct, fmt_p(d.p_value), d.verdict()


def comparison_table(analysis: StudyAnalysis, name_dominator: bool = True) -> Table:
    """One row per group. ``name_dominator=False`` writes "dominated" without the dominating group (terminal)."""
    columns = ("placement", "size", "seeds", "trainable params", "% of model", "eval loss", "perplexity",
               "accuracy", "Δ eval loss vs baseline", "Δ %", "p (paired t)", "verdict",
               "params saved (% of baseline)", "params saved (% of model)", "speedup", "tokens/s",
               "peak mem (MiB)", "Pareto")
    right = (False, False, True, True, True, True, True, True, True, True, True, False, True, True, True, True,
             True, False)
    with_val = any("val_loss" in g.stats for g in analysis.compared)
    if with_val:
        columns = columns[:6] + ("validation loss",) + columns[6:]
        right = right[:6] + (True,) + right[6:]
    rows = []
    for g in analysis.compared:
        delta, pct, p, verdict = _delta(g)
        c = g.comparison
        pct_model = 100.0 * g.trainable_params / g.total_params if g.total_params else 0.0
        acc = g.stats.get("accuracy")
        row = (
            g.placement, g.key.size_label, str(g.n), fmt_params(g.trainable_params),
            f"{pct_model:.3f}%", fmt_mean(g.stats.get("eval_loss")), fmt_mean(g.stats.get("perplexity"), ".3f"),
            fmt_mean(acc, ".3f") if acc is not None else "—", delta, pct, p, verdict,
            "—" if c is None or g.is_baseline else f"{c.params_saved_pct_of_baseline:+.1f}%",
            "—" if c is None or g.is_baseline else f"{c.params_saved_pct_of_model:+.3f}%",
            "—" if c is None or c.speedup is None or g.is_baseline else f"{c.speedup:.2f}×",
            fmt_mean(g.stats.get("tokens_per_s"), ",.0f"), fmt_mean(g.stats.get("peak_mem_mb"), ",.0f"),
            "frontier" if g.dominated_by is None else
            f"dominated by {g.dominated_by.label}" if name_dominator else "dominated",
        )
        if with_val:  # after the test-split loss: the split selection read
            row = row[:6] + (fmt_mean(g.stats.get("val_loss")),) + row[6:]
        rows.append(row)
    notes = ("eval loss, perplexity, accuracy, tokens/s and memory: mean ± half-width of the 95% t-interval over "
             "seeds (n=1: no interval).",
             "Δ eval loss: seed-paired mean difference to the baseline at the same size, ± 95% t-interval; "
             "'not distinguishable' when that interval covers 0.",
             "params saved: (baseline − placement) trainable params, as % of the baseline's adapter and, "
             "separately, as % of the full model's parameters. speedup: baseline train time / train time.")
    notes += ("verdict and Pareto here: on eval loss" + (
        "; task accuracy has its own paired test, verdict and frontier in 'Task accuracy compared'."
        if any("accuracy" in g.stats for g in analysis.compared) else "."),)
    if len(analysis.frontiers) > 1:
        notes += ("Pareto: each cost condition (" + ", ".join(condition_label(c) for c in analysis.frontiers)
                  + ") has its own frontier; a group is dominated only by one under the same base and compute.",)
    if with_val:
        notes += ("splits: eval loss, perplexity, accuracy and every Δ are on the test split, which selects "
                  "nothing; validation loss is on the validation split" + (", which selected each placement's LR "
                                                                           "(size column: its lr)."
                                                                           if analysis.tuned else "."),)
    return Table("Placements compared", columns, tuple(rows), right, notes)


def accuracy_table(analysis: StudyAnalysis) -> Table | None:
    """Task accuracy as a compared metric of its own: mean ± CI, the seed-paired Δ to the baseline with its test
    and verdict, and the Pareto frontier on accuracy (trainable params vs accuracy)."""
    groups = [g for g in analysis.compared if "accuracy" in g.stats]
    if not groups:
        return None
    rows = []
    for g in groups:
        c = g.comparison
        d = c.delta_accuracy if c is not None else None
        if c is None:
            delta, p, verdict = "—", "—", "no baseline at this size"
        elif g.is_baseline:
            delta, p, verdict = "0 (baseline)", "—", "baseline"
        elif d is None:
            delta, p, verdict = "—", "—", "no shared seeds"
        else:
            delta = f"{100 * d.mean_diff:+.1f}" + (f" ± {100 * d.ci_half:.1f}" if d.ci_half is not None else "")
            p, verdict = fmt_p(d.p_value), d.verdict(lower_is_better=False)
        n = g.trials[0].outcome.accuracy_detail.n if g.trials[0].outcome.accuracy_detail is not None else "?"
        front = "frontier" if g.dominated_on_accuracy is None else f"dominated by {g.dominated_on_accuracy.label}"
        rows.append((g.placement, g.key.size_label, str(g.n), str(n), fmt_params(g.trainable_params),
                     _pct(g.stats["accuracy"]), delta, p, verdict, front))
    return Table("Task accuracy compared (test split)",
                 ("placement", "size", "seeds", "examples", "trainable params", "accuracy (%)",
                  "Δ accuracy vs baseline (points)", "p (paired t)", "verdict", "Pareto (accuracy)"), tuple(rows),
                 (False, False, True, True, True, True, True, True, False, False),
                 ("accuracy: exact match of the generated final answer on the first N test examples (eval.generate), "
                  "mean ± 95% t-interval over seeds; Δ: seed-paired difference to the baseline in percentage points.",
                  "The verdict of 'Placements compared' is on eval loss; this table's verdict is on accuracy. Small "
                  "models on hard tasks sit near 0 % accuracy, where loss is the more sensitive measure."))


def _pct(s) -> str:
    return f"{100 * s.mean:.1f}" + (f" ± {100 * s.ci_half:.1f}" if s.ci_half is not None else "")


def quarter_means(losses: list[float]) -> tuple[float, float, float, float] | None:
    """Mean train loss over each quarter of a run's steps (per-step losses are noisy; quarters average them)."""
    n = len(losses)
    if n < 8:
        return None
    cuts = [round(n * k / 4) for k in range(5)]
    q = [sum(losses[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
    return q[0], q[1], q[2], q[3]


def progress_table(analysis: StudyAnalysis) -> Table | None:
    """How far training got: train loss per quarter of the steps and the share of the whole drop that came in the
    last quarter (near 0 %: flattened; large: still falling when the run stopped)."""
    rows = []
    for g in analysis.compared:
        quarters = [q for t in g.trials if (q := quarter_means([p.loss for p in t.curve])) is not None]
        if not quarters:
            continue
        mean = [sum(q[i] for q in quarters) / len(quarters) for i in range(4)]
        drop = mean[0] - mean[3]
        share = f"{100 * (mean[2] - mean[3]) / drop:.0f}%" if drop > 0 else "— (no drop)"
        rows.append((g.placement, g.key.size_label, str(len(g.trials[0].curve)),
                     *[f"{m:.4f}" for m in mean], share))
    if not rows:
        return None
    return Table("Training progress (train loss by quarter of the steps)",
                 ("placement", "size", "steps", "Q1", "Q2", "Q3", "Q4", "last quarter's share of the drop"),
                 tuple(rows), (False, False, True, True, True, True, True, True),
                 ("Q1–Q4: mean train loss over each quarter of the steps, averaged over seeds. The last column is "
                  "(Q3 − Q4) / (Q1 − Q4): how much of the whole decrease came in the last quarter. Near 0 % the "
                  "loss had flattened; a large share means the runs stopped while still improving, and a ranking "
                  "may change with longer training.",))


def lr_suffix(analysis: StudyAnalysis, key) -> str:
    """" (lr 0.003)" for a group of a tuned study (each placement at its own selected LR), else ""."""
    from loraplace.tuning import tuned_lr

    lr = tuned_lr(key) if analysis.tuned else None
    return "" if lr is None else f" (lr {lr:g})"


def axis_table(analysis: StudyAnalysis) -> Table | None:
    """Every swept axis's effect on each placement (``axes:``, e.g. quantize none → nf4): the seed-paired eval-loss
    difference to the same placement and cell at the axis's first value, and whether the placements' order by
    mean eval loss is the same at every value (the findings)."""
    effects = analysis.axis_effects
    if not effects:
        return None

    def at(key, axis: str) -> str:
        return f"{dict(key.axes)[axis]}" + lr_suffix(analysis, key)

    def cell_label(key, axis: str) -> str:
        return axis_cell_label(key, axis, analysis.tuned)

    loss = {g.key: g.stats["eval_loss"] for g in analysis.compared if "eval_loss" in g.stats}
    rows = []
    for e in effects:
        d = e.delta_loss
        rows.append((e.axis, e.group.placement, cell_label(e.group, e.axis), at(e.reference, e.axis),
                     at(e.group, e.axis), fmt_mean(loss[e.reference]), fmt_mean(loss[e.group]),
                     "—" if d is None else f"{d.mean_diff:+.4f}" + (f" ± {d.ci_half:.4f}" if d.ci_half else ""),
                     "—" if e.delta_loss_pct is None else f"{e.delta_loss_pct:+.2f}%",
                     "—" if d is None else fmt_p(d.p_value), "no shared seeds" if d is None else d.verdict()))
    notes = ["Δ: eval loss (test split) at the value minus at the axis's first value, same placement and cell, "
             "seed-paired (± 95% t-interval); " + ("each side at its own selected LR." if analysis.tuned else
                                                    "everything else held.")]
    findings = []
    for axis in dict.fromkeys(e.axis for e in effects):
        orders: dict[str, dict[str, list[str]]] = {}  # cell → value → placements, best first
        for g in sorted((g for g in analysis.compared if g.key in loss and axis in dict(g.key.axes)),
                        key=lambda g: loss[g.key].mean):
            orders.setdefault(cell_label(g.key, axis), {}).setdefault(str(dict(g.key.axes)[axis]), []).append(
                g.placement)
        for cell, by_value in orders.items():
            everywhere = set.intersection(*(set(order) for order in by_value.values()))
            same = len({tuple(p for p in order if p in everywhere) for order in by_value.values()}) == 1
            verdict = ("The same order" if same else "The order changes") + (
                "" if all(len(order) == len(everywhere) for order in by_value.values())
                else f" among the placements finished at every value: {', '.join(sorted(everywhere)) or 'none'}")
            findings.append(f"{cell}: placements by mean eval loss, best first — " + "; ".join(
                f"{axis}={value}: {' < '.join(order)}" for value, order in by_value.items()) + f". {verdict}.")
    return Table("Effect of each swept axis", ("axis", "placement", "cell", "from", "to", "eval loss (from)",
                                               "eval loss (to)", "Δ eval loss", "Δ %", "p (paired t)", "verdict"),
                 tuple(rows), (False, False, False, False, False, True, True, True, True, True, False), tuple(notes),
                 tuple(findings))


def pairwise_table(analysis: StudyAnalysis) -> Table | None:
    """Every pair of placements in a cell of three or more, seed-paired on eval loss, with Holm-adjusted p-values;
    the findings name each cell's best placement by mean and those that cannot be told from it."""
    from loraplace.tuning import tuned_cell

    if not analysis.pairwise:
        return None

    def arm(key) -> str:
        return key.placement + lr_suffix(analysis, key)

    def cell_of(key) -> str:
        return (tuned_cell(key) if analysis.tuned else key).size_label

    cells = list(dict.fromkeys(cell_of(d.better) for d in analysis.pairwise))
    rows = []
    for d in analysis.pairwise:
        delta = d.delta_loss
        interval = "—" if delta.ci is None else f"[{delta.ci[0]:+.4f}, {delta.ci[1]:+.4f}]"
        rows.append(((cell_of(d.better),) if len(cells) > 1 else ()) + (
            arm(d.better), arm(d.other), f"{delta.mean_diff:+.4f}", interval, fmt_p(delta.p_value),
            fmt_p(d.p_holm), delta.verdict()))
    notes = ["Δ: eval loss (test split) of the placement minus the one it is set against, over the seeds both ran "
             "(seed-paired, 95% t-interval); the placement is the one with the lower mean, so Δ ≤ 0"
             + (", each at its own selected LR." if analysis.tuned else "."),
             "verdict: from the unadjusted interval, as in 'Placements compared'. p (Holm): the p-values adjusted "
             "for the k(k−1)/2 pairs of the cell (Holm–Bonferroni) — the one to read when the question is which "
             "of many placements is best."]
    findings = []
    for cell in cells:
        pairs = [d for d in analysis.pairwise if cell_of(d.better) == cell]
        best = pairs[0].better  # pairs come best first
        against_best = [d for d in pairs if d.better == best]
        tied = [d.other.placement for d in against_best if d.delta_loss.verdict() == "not distinguishable"]
        beaten = [d.other.placement for d in against_best if d.delta_loss.verdict() == "better"]
        untested = [d.other.placement for d in against_best if d.delta_loss.p_value is None]
        tied_holm = [d.other.placement for d in against_best if d.delta_loss.verdict() == "better"
                     and d.p_holm is not None and d.p_holm >= 1 - CONFIDENCE]
        # A claim about the tested pairs only: with one shared seed nothing was tested, and nothing is claimed.
        claims = ([f"not distinguishable from it: {', '.join(tied)}"] if tied else
                  ["distinguishably better than every other placement tested (unadjusted)"] if beaten else [])
        claims += [f"after Holm's adjustment also {', '.join(tied_holm)} (p ≥ {1 - CONFIDENCE:.2f})"] if tied_holm \
            else []
        claims += [f"one shared seed, no test: {', '.join(untested)}"] if untested else []
        text = f"{cell}: best by mean {best.placement}; " + "; ".join(claims) + "."
        findings.append(text)
    return Table("Every pair of placements", (("cell",) if len(cells) > 1 else ()) + (
        "placement", "vs", "Δ eval loss", "95% interval", "p (paired t)", "p (Holm)", "verdict"), tuple(rows),
        ((False,) if len(cells) > 1 else ()) + (False, False, True, True, True, True, False), tuple(notes),
        tuple(findings))


def lr_table(analysis: StudyAnalysis) -> Table | None:
    """Tuned studies: every cell's validation loss at each LR tried, and the LR it selected."""
    if not analysis.tuned or analysis.search is not None:  # a search's LRs are in its rung table
        return None
    # tune.extend: a cell's LRs past an edge are columns too
    lrs = sorted(set(analysis.info.tune_lrs)
                 | {lr for sel in analysis.selections.values() for lr in sel.val_loss_by_lr})
    rows = []
    for cell, sel in analysis.selections.items():
        rows.append((cell.label, *["" if lr not in sel.val_loss_by_lr else  # not among this placement's LRs
                                   ("—" if v != v else f"{v:.4f}") + (" ◀" if lr == sel.lr else "")
                                   for lr, v in ((lr, sel.val_loss_by_lr.get(lr, float("nan"))) for lr in lrs)],
                     f"{sel.lr:g}" + (" (edge)" if sel.at_edge else "")))
    if not rows:
        return None
    return Table("Learning rate selected per placement (validation split)",
                 ("cell", *[f"lr={lr:g}" for lr in lrs], "selected"), tuple(rows),
                 (False, *[True] * len(lrs), True),
                 (f"mean validation loss over the selection seeds {list(analysis.info.tune_seeds)}; ◀ marks the "
                  "selected LR (lowest mean; an LR with a failed seed is out, —). The test split played no part."
                  + (" Each placement tried its own LRs (tune.lr per placement); blank: not among them."
                     if analysis.info.tune_lrs_by_placement else ""),))


def budget_table(analysis: StudyAnalysis) -> Table | None:
    """Each budget-matched arm: the budget, what its plan achieved, the deviation and the ranks that got there."""
    rows = []
    for g in analysis.compared:
        if g.key.size.kind != "budget" or not g.trainable_params:
            continue
        budget = g.key.size.value
        ranks = sorted(g.sites.ranks) if g.sites is not None else []
        rows.append((g.key.label, f"{budget:,}", f"{g.trainable_params:,}",
                     f"{100 * (g.trainable_params - budget) / budget:+.2f}%",
                     "—" if not ranks else f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"))
    if not rows:
        return None
    return Table("Budget fill", ("group", "budget", "trainable params", "deviation", "rank(s)"), tuple(rows),
                 (False, True, True, True, True),
                 ("deviation: (achieved − budget) / budget. fill: exact gives rank r+1 to an evenly spread subset of "
                  "a placement's sites, so an arm lands within one site's rank-1 cost of the budget; fill: uniform "
                  "keeps one rank (below the budget by up to one rank step of the whole placement); auto fills to "
                  "within one rank step of its cheapest unit.",))


def site_table(analysis: StudyAnalysis) -> Table | None:
    groups = [(g, g.sites) for g in analysis.compared if g.sites is not None and g.sites.sites]
    if not any(sites.layer_selective for _, sites in groups):
        return None
    rows = []
    for g, sites in groups:
        roles = sorted({s.role for s in sites.sites},
                       key=lambda r: (sites.roles.index(r) if r in sites.roles else len(sites.roles)))
        rows.append((g.key.label, compact_ranges(sites.layers) + (f" of 0–{sites.num_layers - 1}"
                                                                  if sites.num_layers else ""),
                     ", ".join(roles), ", ".join(map(str, sites.ranks)), fmt_params(g.trainable_params),
                     fmt_mean(g.stats.get("eval_loss"))))
    return Table("Eval loss by layer range and role", ("placement", "layers", "roles", "rank(s)",
                                                        "trainable params", "eval loss"),
                 tuple(rows), (False, False, False, True, True, True))


def trial_table(analysis: StudyAnalysis) -> Table:
    rows = []
    for t in analysis.trials:
        m = t.metrics

        def num(key, spec, m=m):
            return format(m[key], spec) if key in m else "—"

        params = fmt_params(t.outcome.trainable_params) if t.status == "done" and t.outcome is not None else "—"
        rows.append((t.id, t.key.label, str(t.seed), t.status, num("eval_loss", ".4f"), num("perplexity", ".3f"),
                     num("accuracy", ".3f"), params, num("tokens_per_s", ",.1f"),
                     num("train_s", ".1f"), num("peak_mem_mb", ",.0f"),
                     one_line(t.error, 200, hints=False) if t.error else ""))
    return Table("Every trial", ("trial", "group", "seed", "status", "eval loss", "perplexity", "accuracy",
                                 "trainable params", "tokens/s", "train s", "peak MiB", "error"),
                 tuple(rows), (False, False, True, False, True, True, True, True, True, True, True, False))


def export_rows(records: list[TrialRecord]) -> list[dict[str, Any]]:
    """One flat row per trial for CSV/JSON/Parquet: labels, lifecycle, measured metrics, sizes and counters."""
    rows = []
    for t in records:
        group = t.labels.group
        row: dict[str, Any] = {"trial_id": t.id, "status": t.status, "attempts": t.attempts, "error": t.error,
                               "placement": group.placement, group.size.kind: group.size.value, "seed": t.labels.seed}
        row |= dict(group.axes)
        if t.outcome is not None and t.outcome.status == "done":
            row |= t.outcome.summary(scalars_only=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- search


def search_table(analysis: StudyAnalysis) -> Table | None:
    """A search's rungs: every candidate at every rung it ran, its validation loss and what the rung decided."""
    search = analysis.search
    if search is None or not (search.rungs or search.pending):
        return None
    rows = []
    for rung in search.rungs:
        d = rung.decision
        for place, key in enumerate(d.ranked, 1):
            r = rung.results.get(key)
            loss = f"{r.val_loss:.4f}" if r is not None and r.val_loss is not None else "failed"
            verdict = ("kept (best preset)" if key == d.anchored else "finalist" if key in d.kept and
                       rung is search.rungs[-1] and search.finalists else "kept" if key in d.kept else "cut")
            rows.append((str(d.rung + 1), str(d.steps), search.names[key].label, loss, str(place), verdict))
    for index, results in sorted(search.pending.items()):
        for key, r in results.items():
            loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "failed"
            rows.append((str(index + 1), str(r.steps), search.names[key].label, loss, "—", "running"))
    counts = "; ".join(f"rung {r.decision.rung + 1} at {r.decision.steps} steps: {len(r.decision.ranked)} in, "
                       f"{len(r.decision.kept)} kept, {len(r.cut)} cut" for r in search.rungs)
    return Table("Search: rungs and decisions (validation split)",
                 ("rung", "steps", "candidate", "val loss", "rank", "decision"), tuple(rows),
                 (True, True, False, True, True, False),
                 (counts, "Each rung ranks its candidates by validation loss (failed last, ties in spec order) and "
                  "keeps the best 1/eta; the last rung keeps the best LR of each of the best placements (the "
                  "finalists). The preset ranked best at each rung is never cut there. The test split played no "
                  "part."))


def search_cost_table(analysis: StudyAnalysis) -> Table | None:
    """The search's compute ledger in training-step equivalents, against the full tuned grid of the same spec."""
    from loraplace.analysis.search import FORWARD_COST_HIGH

    search = analysis.search
    if search is None or not search.ledger:
        return None
    rows = [(item.what, f"{item.trained_examples:,}", f"{item.forward_examples:,}",
             f"{item.steps(search.batch):.1f}", f"{item.seconds:.0f}" if item.seconds else "—")
            for item in search.ledger]
    rows.append(("search, total", f"{sum(i.trained_examples for i in search.ledger):,}",
                 f"{sum(i.forward_examples for i in search.ledger):,}", f"{search.search_steps():.1f}",
                 f"{sum(i.seconds for i in search.ledger):.0f}"))
    rows.append((f"full tuned grid ({search.grid_trials} trials × {search.total_steps} steps, evals not counted)",
                 "", "", f"{search.grid_steps:,}", ""))
    return Table("Search: compute against the full grid", ("part", "trained examples", "forward-only examples",
                                                          "step-equivalents", "seconds"), tuple(rows),
                 (False, True, True, True, True),
                 (f"search / grid = {search.ratio():.3f} (a forward-only example counts 1/3 of a trained one; at "
                  f"1/2, the upper bound with a frozen base: {search.ratio(FORWARD_COST_HIGH):.3f}). A "
                  f"step-equivalent is {search.batch} trained examples.", *search.notes))


def rung_agreement_table(analysis: StudyAnalysis) -> Table | None:
    """Kendall's tau between the rankings of consecutive rungs (candidates in both)."""
    search = analysis.search
    if search is None or not search.kendall:
        return None
    rows = []
    for row in search.kendall:
        rows.append((f"rung {row.rung + 1}", row.against(search.total_steps, analysis.spec.get('seeds', [0])[0]),
                     str(row.candidates), "—" if row.tau is None else f"{row.tau:+.2f}"))
    return Table("Search: ranking agreement between rungs (Kendall τ)", ("rung", "against", "candidates", "τ"),
                 tuple(rows), (False, False, True, True),
                 ("τ = 1: the later rung ranks the candidates it shares with the earlier one in the same order.",))
