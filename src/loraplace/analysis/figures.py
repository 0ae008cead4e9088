"""Publication figures (matplotlib, Agg): each written as PNG (embedded in HTML), SVG and PDF (for LaTeX).

Sizes are a two-column paper's: 3.4 in single column, 7 in full width; 8–9 pt fonts, so a figure dropped into
a paper at 100 % needs no rescaling.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from loraplace.analysis.core import StudyAnalysis, axis_cell_label, condition, condition_label  # noqa: E402
from loraplace.analysis.stats import summarize  # noqa: E402
from loraplace.formatting import human_count  # noqa: E402
from loraplace.placement.roles import grid_roles, short_role  # noqa: E402
from loraplace.records import SiteMap  # noqa: E402

FORMATS = ("png", "svg", "pdf")
STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.25, "grid.linewidth": 0.5, "lines.linewidth": 1.2, "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03, "svg.fonttype": "none", "pdf.fonttype": 42, "figure.dpi": 100,
    "svg.hashsalt": "loraplace",  # fixed element ids: a report written twice from one store is the same files
}
# No creation date in SVG or PDF either, for the same reason (PNG's metadata carries none).
NO_DATE = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}
PNG_DPI = 200


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    caption: str
    files: dict[str, Path]  # format → path


def _colors(keys: Sequence[str]) -> dict[str, str]:
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    return {k: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, k in enumerate(keys)}


def _save(fig, out_dir: Path, name: str, title: str, caption: str) -> Figure:
    files = {}
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, dpi=PNG_DPI if fmt == "png" else None, metadata=NO_DATE.get(fmt))
        files[fmt] = path
    plt.close(fig)
    return Figure(name, title, caption, files)


def pareto_figure(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    groups = [g for g in analysis.compared if "eval_loss" in g.stats and g.trainable_params > 0]
    if not groups:
        return None
    placements = list(dict.fromkeys(g.placement for g in groups))
    colors = _colors(placements)
    # One frontier per cost condition (quantize=none, quantize=nf4, …): each its own marker and line style.
    conditions = list(dict.fromkeys(condition(g.key) for g in groups))
    markers = dict(zip(conditions, itertools.cycle("osD^v"), strict=False))
    styles = dict(zip(conditions, itertools.cycle(("--", ":", "-.", (0, (5, 1, 1, 1)))), strict=False))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        for g in groups:
            s = g.stats["eval_loss"]
            on_front = g.dominated_by is None
            ax.errorbar(g.trainable_params, s.mean, yerr=s.ci_half, fmt=markers[condition(g.key)], ms=4.5,
                        capsize=2, elinewidth=0.8, mfc=colors[g.placement] if on_front else "white",
                        mec=colors[g.placement], ecolor=colors[g.placement], zorder=3 if on_front else 2)
            if on_front:  # label the frontier only: dominated points are named in the legend and the table
                ax.annotate(g.placement, (g.trainable_params, s.mean), xytext=(4, -9), textcoords="offset points",
                            fontsize=6.5, color=colors[g.placement])
        for cond, front in analysis.frontiers.items():
            if len(front) > 1:
                xs = [g.trainable_params for g in front]
                ys = [g.stats["eval_loss"].mean for g in front]
                ax.step(xs, ys, where="post", color="0.35", lw=0.9, ls=styles[cond], zorder=1)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("eval loss (mean ± 95% CI)")
        handles = [matplotlib.lines.Line2D([], [], marker="o", ls="", ms=4.5, color=colors[p], label=p)
                   for p in placements]
        handles += [matplotlib.lines.Line2D([], [], marker="o", ls="", ms=4.5, mfc="white", mec="0.3",
                                            label="dominated")]
        handles += [matplotlib.lines.Line2D([], [], marker=markers[c] if len(conditions) > 1 else None, ms=4.5,
                                            color="0.35", lw=0.9, ls=styles[c],
                                            label="Pareto frontier" + (f" ({condition_label(c)})"
                                                                       if len(conditions) > 1 else ""))
                    for c in conditions]
        ax.legend(handles=handles, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        per_condition = (" Each cost condition (" + ", ".join(condition_label(c) for c in conditions)
                         + ") has its own marker and frontier: a point is dominated only by one under the same "
                           "base and compute." if len(conditions) > 1 else "")
        return _save(fig, out_dir, "pareto", "Quality per trainable parameter",
                     "Eval loss against trainable parameters (log scale), mean over seeds with 95% t-intervals. "
                     "Filled markers lie on the Pareto frontier (dashed); hollow markers are dominated."
                     + per_condition)


CURVE_SMOOTHING = 20  # a training curve is smoothed over 1/CURVE_SMOOTHING of its steps (a trailing mean)


@dataclass(frozen=True)
class SeedBand:
    """One placement's smoothed training curve over its seeds, step by step: the mean and a band around it."""

    mean: list[float]
    low: list[float]
    high: list[float]
    kind: str  # "t-interval" (3+ seeds), "range" (2 seeds: min–max), "none" (1 seed: low = high = mean)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """values[i] replaced by the mean of the last ``window`` values up to i (fewer at the start). One step's loss
    is one batch's (8 examples): it jumps by ±30 % step to step, which hides the trend the figure is for."""
    # a fresh sum per point, not a running total: a NaN step (a diverged batch) spoils its window, not the rest
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]


def seed_band(per_seed: Sequence[Sequence[float]], window: int) -> SeedBand:
    """Smooth each seed's curve (same steps in each, in order), then summarise across seeds at every step. The band
    is the 95 % t-interval from 3 seeds on; with 2 it is their range — a t-interval on one degree of freedom is
    12.7 × the half-range and would run far outside any loss either seed saw (below 0 for a loss near 1)."""
    smoothed = [trailing_mean(curve, window) for curve in per_seed]
    mean, low, high = [], [], []
    for values in zip(*smoothed, strict=True):
        finite = [v for v in values if math.isfinite(v)]  # a diverged seed leaves a gap, not a crash
        summary = summarize(finite)
        if summary is None:
            centre = lo = hi = math.nan
        elif summary.n >= 3:
            centre, lo, hi = summary.mean, summary.mean - summary.ci_half, summary.mean + summary.ci_half
        else:
            centre, lo, hi = summary.mean, min(finite), max(finite)
        mean.append(centre)
        low.append(lo)
        high.append(hi)
    kind = "t-interval" if len(per_seed) >= 3 else "range" if len(per_seed) == 2 else "none"
    return SeedBand(mean, low, high, kind)


def curves_figure(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    groups = [g for g in analysis.compared if any(t.curve for t in g.trials)]
    if not groups:
        return None
    colors = _colors([g.key.label for g in groups])
    kinds, windows = set(), set()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.4, 2.6))
        for g in groups:
            # Seeds share the step grid; tokens per step differ slightly with packing, so x is their mean.
            curves = [t.curve for t in g.trials if t.curve]
            steps = sorted(set.intersection(*[{p.step for p in curve} for curve in curves]))
            by_step = [{p.step: p for p in curve} for curve in curves]
            xs = [sum(points[step].tokens for points in by_step) / len(by_step) for step in steps]
            window = max(1, round(len(steps) / CURVE_SMOOTHING))
            band = seed_band([[points[step].loss for step in steps] for points in by_step], window)
            kinds.add(band.kind)
            windows.add(window)
            ax.plot(xs, band.mean, color=colors[g.key.label], label=f"{g.key.label} (n={len(curves)})")
            if band.kind != "none":
                ax.fill_between(xs, band.low, band.high, color=colors[g.key.label], alpha=0.18, lw=0)
        ax.set_xlabel("training tokens (non-pad)")
        ax.set_ylabel("train loss (smoothed)" if windows != {1} else "train loss")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: human_count(v)))
        ax.legend(frameon=False)
        smoothing = ("" if windows == {1} else
                     f" Each seed's curve is a trailing mean over {'/'.join(str(w) for w in sorted(windows))} steps "
                     "(one step's loss is one batch's).")
        bands = {"t-interval": "95% t-intervals over 3+ seeds", "range": "the range of 2 seeds"}
        band_text = " and ".join(bands[k] for k in ("t-interval", "range") if k in kinds)
        return _save(fig, out_dir, "curves", "Training curves",
                     "Train loss against non-pad training tokens, mean over seeds."
                     + smoothing + (f" Bands: {band_text}." if band_text else ""))


def efficiency_figure(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    groups = [g for g in analysis.groups if g.comparison is not None]
    if not groups:
        return None
    panels = (("trainable_params", "trainable params"), ("train_s", "train time"), ("peak_mem_mb", "peak memory"))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(7.0, 0.45 + 0.28 * len(groups)), sharey=True)
        labels = [g.key.label for g in groups]
        for ax, (metric, title) in zip(axes, panels, strict=True):
            ratios, errs = [], []
            for g in groups:
                base = analysis.group(g.comparison.baseline)
                if metric == "trainable_params":
                    ratios.append(g.trainable_params / base.trainable_params if base.trainable_params else math.nan)
                    errs.append(0.0)
                    continue
                s, b = g.stats.get(metric), base.stats.get(metric)
                if s is None or b is None or b.mean == 0:
                    ratios.append(math.nan)
                    errs.append(0.0)
                    continue
                ratios.append(s.mean / b.mean)
                errs.append((s.ci_half or 0.0) / b.mean)
            colors = ["0.55" if g.is_baseline else "#4c72b0" for g in groups]
            ax.barh(range(len(groups)), ratios, xerr=errs, color=colors, height=0.6, error_kw={"elinewidth": 0.7})
            ax.axvline(1.0, color="0.2", lw=0.7, ls=":")
            finite = [r + e for r, e in zip(ratios, errs, strict=True) if math.isfinite(r)]
            ax.set_xlim(0, max(finite + [1.0]) * 1.25)  # a wide interval must not drag the axis below zero
            ax.set_title(f"{title} (× baseline)")
            ax.grid(axis="y", visible=False)
            for i, (r, e) in enumerate(zip(ratios, errs, strict=True)):
                if math.isfinite(r):
                    ax.text(r + e, i - 0.32, f" {r:.2f}×", va="center", fontsize=6)
        axes[0].set_yticks(range(len(groups)), labels)
        axes[0].invert_yaxis()
        return _save(fig, out_dir, "efficiency", "Cost against the baseline",
                     "Trainable parameters, train time and peak memory of each placement as a multiple of the "
                     "baseline at the same size (grey); error bars are the 95% t-interval of the mean over seeds.")


def site_heatmap(matrices: dict[str, list[list[float]]], roles: Sequence[str], out_dir: Path, name: str,
                 title: str, caption: str, value_label: str, binary_cmap: bool = False,
                 per_panel_scale: bool = False) -> Figure:
    """Small multiples of layers (rows) × roles (columns) matrices; used for placements and probe scores."""
    panels = list(matrices.items())
    with plt.rc_context(STYLE):
        n_layers = max(len(m) for _, m in panels)
        width = min(7.0, 0.35 + len(panels) * (0.22 * len(roles) + 0.45))
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 0.6 + 0.075 * n_layers + 0.3), squeeze=False,
                                 sharey=True)
        vmax = max((v for _, m in panels for row in m for v in row if math.isfinite(v)), default=1.0) or 1.0
        # no site / no adapter (NaN): light grey, not the colour of a small value
        cmap = (ListedColormap(["#f2f2f2", "#c44e52"]) if binary_cmap else plt.get_cmap("viridis")).with_extremes(
            bad="#f2f2f2")
        image = None
        for ax, (label, matrix) in zip(axes[0], panels, strict=True):
            top = max((v for row in matrix for v in row if math.isfinite(v)), default=1.0) or 1.0
            image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0,
                              vmax=top if per_panel_scale else vmax)
            if per_panel_scale:
                fig.colorbar(image, ax=ax, shrink=0.8)
            ax.set_title(label, fontsize=7)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole: no 0.5 ticks on 2 layers
            ax.set_xticks(range(len(roles)), [short_role(r) for r in roles], rotation=90, fontsize=6)
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[0][0].set_ylabel("layer")
        if not binary_cmap and not per_panel_scale and image is not None:
            fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=value_label)
        return _save(fig, out_dir, name, title, caption)


def placement_heatmap(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    seen: dict[str, SiteMap] = {}
    for g in analysis.compared:  # one panel per placement (its first size)
        if g.sites is not None and g.sites.sites and g.placement not in seen:
            seen[g.placement] = g.sites
    if not seen:
        return None
    roles = list(grid_roles(next(iter(seen.values())).roles))
    uniform = len({rank for sites in seen.values() for rank in sites.ranks}) <= 1  # then: on/off colours
    matrices = {}
    for placement, sites in seen.items():
        matrix = [[0.0] * len(roles) for _ in range(sites.num_layers)]
        for site in sites.sites:
            if site.layer is not None and site.role in roles:
                matrix[site.layer][roles.index(site.role)] = float(site.rank)
        matrices[placement] = [[v if v > 0 or uniform else math.nan for v in row] for row in matrix]
    return site_heatmap(matrices, roles, out_dir, "sites", "Where each placement puts adapters",
                        "Layers × roles: coloured cells carry a LoRA adapter" +
                        ("." if uniform else "; colour is the rank.") +
                        (" exp.* columns are the routed experts (one LoRA pair of that rank per expert), sh.* the "
                         "shared experts." if any(r.startswith("moe.experts.") for r in roles) else ""),
                        "rank", binary_cmap=uniform)


def probe_heatmap(probe, out_dir: Path, name: str = "probe") -> Figure:
    """Probe scores and efficiencies, layers × roles (``probe``: :class:`loraplace.records.ProbeScores`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if probe.measure == "nfn":
        return site_heatmap({"NFN (actual / random)": probe.matrix("score"), "actual ‖Ŵẑ‖/√d_in":
                             probe.matrix("actual")}, probe.roles, out_dir, name, "Normalized feature norm",
                            f"Left: PLoP's normalized feature norm of each site over {probe.batches} batches — how "
                            "much better the module's real inputs align with its weight than Gaussian inputs do; "
                            "low: an adapter is likely to help (PLoP adapts the lowest roles). Right: the actual "
                            "term alone.", "NFN", per_panel_scale=True)
    if probe.measure == "warmup":
        return site_heatmap({"relative update ‖ΔW·x‖ / ‖W·x‖": probe.matrix("score"), "update ‖ΔW·x‖":
                             probe.matrix("update_norm")}, probe.roles, out_dir, name, "Warm-up probe",
                            f"Left: how far each site's rank-{probe.rank} adapter moved its module's output after "
                            f"{probe.warmup_steps} steps of training adapters on every linear at lr "
                            f"{probe.warmup_lr:g}, relative to the frozen module's output, over {probe.batches} "
                            "batches; high: training wanted to change this site (auto method warmup adapts the "
                            "highest roles). Right: the update's own norm.", "score", per_panel_scale=True)
    scale = max(s.efficiency for s in probe.sites) or 1.0
    matrices = {"score ‖G_r‖_F": probe.matrix("score"),
                "efficiency (relative)": [[v / scale for v in row] for row in probe.matrix("efficiency")]}
    return site_heatmap(matrices, probe.roles, out_dir, name, "Importance probe",
                        f"Left: ‖G_r‖_F, the norm of the best rank-{probe.rank} approximation of each site's loss "
                        f"gradient over {probe.batches} batches. Right: that score per trainable parameter "
                        "(r·(d_in+d_out)), relative to the best site.", "score", per_panel_scale=True)


def study_probe_figure(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    """The probe scores behind the study's auto placement(s), next to where the adapters went."""
    group = next((g for g in analysis.groups if g.probe), None)
    return None if group is None else probe_heatmap(group.probe, out_dir)


def lr_sensitivity_figure(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    """Tuned studies: validation loss against LR, one line per cell, the selected LR ringed."""
    from loraplace.tuning import tuned_cell, tuned_lr

    lines: dict = {}
    for g in analysis.groups:
        lr, s = tuned_lr(g.key), g.stats.get("val_loss")
        if lr is not None and s is not None:
            lines.setdefault(tuned_cell(g.key), []).append((lr, s, bool(g.selected)))
    if not analysis.tuned or not lines or analysis.search is not None:  # a search: see rung_figure
        return None
    colors = _colors([c.label for c in lines])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        for cell, points in lines.items():
            points.sort(key=lambda p: p[0])
            color = colors[cell.label]
            ax.errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=[p[1].ci_half or 0 for p in points],
                        fmt="-o", ms=3.5, capsize=2, lw=0.9, elinewidth=0.8, color=color, label=cell.label)
            for lr, s, selected in points:
                if selected:
                    ax.plot([lr], [s.mean], "o", ms=9, mfc="none", mec=color, mew=1.2, zorder=4)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log)")
        ax.set_ylabel("validation loss (mean ± 95% CI)")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6.5)
        return _save(fig, out_dir, "lr", "Learning-rate sensitivity",
                     "Validation loss against learning rate per placement and size, mean over the seeds run at that "
                     "LR with 95% t-intervals; the ringed point is the LR each selected (lowest mean validation "
                     "loss over the selection seeds). The comparison uses each placement at its ringed LR, on the "
                     "test split.")


def axis_figure(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    """A swept axis (``axes:``, e.g. quantize none → nf4): test loss of each placement at every value of the axis,
    one line per placement (and cell), so a change in the placements' order shows as crossing lines. The first
    swept axis with an effect in the analysis (the table has them all)."""
    effects = analysis.axis_effects
    if not effects:
        return None
    axis = effects[0].axis
    values = analysis.swept_axes[axis]  # the first (reference) value first
    loss = {g.key: g.stats["eval_loss"] for g in analysis.compared if "eval_loss" in g.stats}
    lines: dict[str, dict] = {}  # placement (and the rest of its cell) → axis value → summary
    for e in (e for e in effects if e.axis == axis):
        rest = f"{e.group.placement} {axis_cell_label(e.group, axis, analysis.tuned)}"
        lines.setdefault(rest, {})[dict(e.reference.axes)[axis]] = loss[e.reference]
        lines[rest][dict(e.group.axes)[axis]] = loss[e.group]
    colors = _colors(list(lines))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        for n, (label, by_value) in enumerate(lines.items()):
            xs = [i for i, v in enumerate(values) if v in by_value]
            dodge = 0.04 * (n - (len(lines) - 1) / 2)  # side by side, so the intervals do not hide each other
            ax.errorbar([x + dodge for x in xs], [by_value[values[i]].mean for i in xs],
                        yerr=[by_value[values[i]].ci_half or 0 for i in xs], fmt="-o", ms=3.5, capsize=2, lw=0.9,
                        elinewidth=0.8, color=colors[label], label=label)
        ax.set_xticks(range(len(values)), [f"{axis}={v}" for v in values])
        ax.set_xlim(-0.4, len(values) - 0.6)
        ax.set_ylabel("test loss (mean ± 95% CI)" if any("val_loss" in g.stats for g in analysis.groups)
                      else "eval loss (mean ± 95% CI)")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6.5)
        return _save(fig, out_dir, "axis", f"Effect of {axis}",
                     f"Eval loss of each placement at every value of {axis}, mean over seeds with 95% t-intervals"
                     + (", each at the learning rate selected for it at that value" if analysis.tuned else "")
                     + ". Crossing lines: the placements' order changes with the axis; the table 'Effect of each "
                     "swept axis' gives the seed-paired differences.")


def rung_figure(analysis: StudyAnalysis, out_dir: Path) -> Figure | None:
    """A search: validation loss against steps, one line per candidate, ending (×) where a rung cut it; the
    finalists' lines run on to their full-horizon trial (seed 0)."""
    search = analysis.search
    if search is None or not (search.rungs or search.pending):
        return None
    placements = list(dict.fromkeys(n.placement for n in search.names.values()))
    lrs = sorted({n.lr for n in search.names.values()})
    colors = _colors(placements)
    styles = ["-", "--", "-.", ":"]
    seed = analysis.spec.get("seeds", [0])[0]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        for key, name in search.names.items():
            points = search.curve(key)
            if key in search.finalists:
                full = next((r.outcome.metrics.val_loss for r in analysis.trials if r.id == key
                             and r.outcome is not None and r.outcome.metrics is not None), None)
                if full is not None:
                    points.append((search.total_steps, full))
            if not points:
                continue
            style = styles[lrs.index(name.lr) % len(styles)]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=2.5, lw=0.9,
                    color=colors[name.placement], label=name.label)
            if search.cut_at(key) is not None:
                ax.plot([points[-1][0]], [points[-1][1]], "x", ms=5, color=colors[name.placement])
        for rung in search.rungs:
            ax.axvline(rung.decision.steps, color="0.6", lw=0.5, ls=":")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("validation loss")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=5.5, ncol=1)
        return _save(fig, out_dir, "rungs", "Search: validation loss at each rung",
                     "Each candidate (placement: colour; learning rate: line style) at every rung it reached, on the "
                     "rung's validation examples; × marks where a rung cut it. The finalists continue to the full "
                     f"horizon ({search.total_steps} steps), where the point is their seed-{seed} trial on the whole "
                     "validation split. Dotted verticals: the rungs.")


def study_figures(analysis: StudyAnalysis, out_dir: Path) -> list[Figure]:
    out_dir.mkdir(parents=True, exist_ok=True)
    makers = (pareto_figure, axis_figure, rung_figure, lr_sensitivity_figure, curves_figure, efficiency_figure,
              placement_heatmap, study_probe_figure)
    with warnings.catch_warnings():
        # Names in scripts the bundled font lacks (CJK, …) are drawn as boxes; matplotlib would otherwise print a
        # warning with its source path per glyph and figure. The tables and the HTML show the names in full.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        return [f for make in makers if (f := make(analysis, out_dir)) is not None]
