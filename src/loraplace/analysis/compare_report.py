"""``loraplace compare``'s outputs: the placement × study table, the per-placement summary, a heatmap, and the
same as Markdown, LaTeX (tables and a figure with captions) and HTML — every format renders the same two
:class:`~loraplace.analysis.tables.Table`s, as a study report does."""

from __future__ import annotations

import html
import math
from pathlib import Path

from loraplace.analysis.compare import CrossStudy, Entry
from loraplace.analysis.figures import Figure
from loraplace.analysis.report import _CSS, _generated_at, _html_table, _md_table, _write, _write_csv, tex_escape
from loraplace.analysis.stats import CONFIDENCE
from loraplace.analysis.tables import Table
from loraplace.formatting import plural

FORMATS = ("html", "md", "tex", "csv")
PCT = f"{CONFIDENCE:.0%}"
POOLED_HOW = {"tasks": "t over tasks", "one study": "one study", "hull": "one task: hull"}


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def cell_text(entry: Entry | None) -> str:
    """``−0.15 % [−0.50, +0.19] · 1/5``: Δ % vs the baseline with its interval, then the rank in the column."""
    if entry is None:
        return "—"
    rank = f"{entry.rank}/{entry.of}"
    if entry.is_baseline:
        return f"baseline · {rank}"
    d = entry.delta_pct
    if d is None:
        return f"no baseline · {rank}"
    star = "*" if d.verdict() in ("better", "worse") else ""
    interval = f" [{_signed(d.ci[0])}, {_signed(d.ci[1])}]" if d.ci is not None else " (n=1)"
    return f"{_signed(d.mean_diff)} %{interval}{star} · {rank}"


def column_notes(cs: CrossStudy) -> tuple[str, ...]:
    out = []
    for c in cs.columns:
        seeds = sorted({e.n for e in cs.entries if e.column == cs.columns.index(c)})
        out.append(f"{c.label}: task {c.task}, {c.model}, {c.steps if c.steps is not None else '?'} steps, "
                   f"{c.cell}, baseline {c.baseline}, {'/'.join(map(str, seeds))} seed(s) per placement; store "
                   f"{c.store}")
    return tuple(out)


def placement_table(cs: CrossStudy) -> Table:
    rows = tuple((p, *(cell_text(cs.entry(p, i)) for i in range(len(cs.columns)))) for p in cs.placements)
    notes = (f"Each cell: Δ test loss against the study's baseline, in % of the baseline's mean test loss "
             f"(placement − baseline, seed-paired, mean over seeds, {PCT} t-interval over the per-seed "
             "differences; * where the interval excludes 0), then the placement's rank by mean test loss among the "
             "study's placements (1 = lowest). Each study compares its placements at its own selected LRs "
             "(selected on its validation split).",) + column_notes(cs)
    return Table("Placements across studies", ("placement", *(c.label for c in cs.columns)), rows,
                 (False,) + (True,) * len(cs.columns), notes)


def summary_table(cs: CrossStudy) -> Table:
    rows = []
    for s in cs.summaries:
        pooled = "—" if s.pooled is None else (f"{_signed(s.pooled.estimate)} % [{_signed(s.pooled.ci_low)}, "
                                              f"{_signed(s.pooled.ci_high)}] ({POOLED_HOW[s.pooled.interval]})")
        spread = "—" if s.pooled is None or s.pooled.spread is None else f"{s.pooled.spread:.2f}"
        tasks = "—" if not s.tasks else f"{s.tasks_better}/{s.tasks_worse}/{s.tasks}"
        rows.append((s.placement, str(s.columns), s.vs_baseline.text if s.tasks else "baseline",
                     s.vs_preset.text, pooled, spread, tasks,
                     "—" if math.isnan(s.mean_rank) else f"{s.mean_rank:.1f}"))
    notes = (
        "wins/ties/losses: studies (columns) where the placement's seed-paired interval on Δ test loss lies wholly "
        "below 0 / holds 0 / lies wholly above 0; against the baseline, and against the best other preset of the "
        "same column (the preset with the lowest mean test loss, this placement aside).",
        f"pooled Δ %: the task is the unit (studies of one task share its test split): each task's Δ % is the "
        f"mean of its studies'; over several tasks, their mean with a {PCT} t-interval (k − 1 degrees of freedom, "
        "each task once); on one task, the one study's seed-paired interval or the hull of its studies' intervals. "
        "SD: the spread of the tasks' Δ %. tasks: on how many of the tasks measured every study's interval lay "
        "below 0 (better) or above 0 (worse).",
        "Studies that repeat trials measured in another study are counted once.")
    return Table("Summary per placement", ("placement", "studies", "vs baseline W/T/L", "vs best other preset W/T/L",
                                           f"pooled Δ % [{PCT} CI]", "SD across tasks", "tasks better/worse/all",
                                           "mean rank"),
                 tuple(rows), (False, True, True, True, True, True, False, True), notes)


def heatmap(cs: CrossStudy, out_dir: Path) -> Figure:
    """Placement × column: colour = Δ % against the column's baseline, text = Δ % and rank, bold where the
    interval excludes 0; grey: not in that study."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize, SymLogNorm

    from loraplace.analysis.figures import STYLE, _save

    out_dir.mkdir(parents=True, exist_ok=True)
    values = np.full((len(cs.placements), len(cs.columns)), np.nan)
    for e in cs.entries:
        row = cs.placements.index(e.placement)
        values[row, e.column] = 0.0 if e.is_baseline else (e.delta_pct.mean_diff if e.delta_pct else np.nan)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(min(7.0, 1.6 + 1.05 * len(cs.columns)), 0.9 + 0.32 * len(cs.placements)))
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")  # grey: not in that study
        # past ±5 %, a symmetric log scale (linear within ±1 %): a 2 % gap on one task stays visible beside 30 %
        # on another; below, linear
        log = limit > 5.0
        norm = SymLogNorm(linthresh=1.0, vmin=-limit, vmax=limit, base=10) if log else \
            Normalize(vmin=-max(limit, 0.5), vmax=max(limit, 0.5))
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
        for e in cs.entries:
            row = cs.placements.index(e.placement)
            if e.is_baseline:
                text, bold = f"base\n#{e.rank}", False
            elif e.delta_pct is None:
                text, bold = f"#{e.rank}", False
            else:
                text = f"{e.delta_pct.mean_diff:+.1f}\n#{e.rank}"
                bold = e.delta_pct.verdict() in ("better", "worse")
            shade = abs(float(norm(values[row, e.column])) - 0.5) if np.isfinite(values[row, e.column]) else 0.0
            ax.text(e.column, row, text, ha="center", va="center", fontsize=6,
                    color="white" if shade > 0.35 else "black", fontweight="bold" if bold else "normal")
        ax.set_xticks(range(len(cs.columns)), [c.label for c in cs.columns], rotation=30, ha="right")
        ax.set_yticks(range(len(cs.placements)), list(cs.placements))
        ax.grid(False)
        fig.colorbar(image, ax=ax, label="Δ test loss vs baseline (%" + (", symmetric log scale)" if log else ")"),
                     fraction=0.05, pad=0.02)
        seeds = sorted({e.n for e in cs.entries})
        caption = ("Each placement's test loss against its study's baseline, in % of the baseline's mean "
                   "(blue: lower than the baseline" + ("; colour on a symmetric log scale, linear within ±1 %"
                                                       if log else "") + "), at each "
                   f"study's selected LRs; {'/'.join(map(str, seeds))} "
                   f"seeds per placement, seed-paired; bold where the {PCT} t-interval excludes 0; #: rank by mean "
                   "test loss within the study; grey: not in that study. "
                   f"{plural(len(cs.columns), 'column')} on "
                   f"{plural(len(cs.tasks), 'task')} ({', '.join(cs.tasks)}).")
        figure = _save(fig, out_dir, "compare", "Placements across studies", caption)
        plt.close(fig)
    return figure


def render_markdown(cs: CrossStudy, tables: list[Table], figure: Figure | None, out: Path) -> str:
    parts = ["# Placements across studies\n",
             f"{plural(len(cs.columns), 'column')} from "
             f"{plural(len({c.store for c in cs.columns}), 'store')} on {plural(len(cs.tasks), 'task')}: "
             f"{', '.join(cs.tasks)}.\n"]
    if cs.notes:
        parts.append("**Read with care:**\n\n" + "\n".join(f"- {n}" for n in cs.notes) + "\n")
    for table in tables:
        parts.append(f"## {table.title}\n\n{_md_table(table)}")
    if figure is not None:
        rel = figure.files["png"].relative_to(out).as_posix()
        parts.append(f"![{figure.title}]({rel})\n\n*{figure.title}.* {figure.caption}\n")
    return "\n".join(parts)


def render_html(cs: CrossStudy, tables: list[Table], figure: Figure | None, generated) -> str:
    import base64

    parts = ["<h1>Placements across studies</h1>",
             f'<p class="meta">{plural(len(cs.columns), "column")} on tasks '
             f"{html.escape(', '.join(cs.tasks))} · generated {generated.strftime('%Y-%m-%d %H:%M %Z')}</p>"]
    if cs.notes:
        parts.append('<div class="warn"><b>Read with care</b><ul>'
                     + "".join(f"<li>{html.escape(n)}</li>" for n in cs.notes) + "</ul></div>")
    for table in tables:
        parts.append(f"<h2>{html.escape(table.title)}</h2>" + _html_table(table))
    if figure is not None:
        data = base64.b64encode(figure.files["png"].read_bytes()).decode()
        parts.append(f'<figure><img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption><b>{html.escape(figure.title)}.</b> {html.escape(figure.caption)}</figcaption>"
                     "</figure>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>loraplace · compare</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def _tex_tabular(table: Table, caption: str, label: str) -> list[str]:
    align = "".join("r" if r else "l" for r in table.right)
    lines = ["\\begin{table}[t]", "\\centering", "\\small", "\\setlength{\\tabcolsep}{4pt}",
             f"\\caption{{{tex_escape(caption)}}}", f"\\label{{tab:{label}}}", "\\resizebox{\\linewidth}{!}{%",
             f"\\begin{{tabular}}{{{align}}}", "\\toprule", " & ".join(tex_escape(c) for c in table.columns)
             + " \\\\", "\\midrule"]
    lines += [" & ".join(tex_escape(cell) for cell in row) + " \\\\" for row in table.rows]
    return lines + ["\\bottomrule", "\\end{tabular}}", "\\end{table}", ""]


def render_latex(cs: CrossStudy, tables: list[Table], figure: Figure | None, out: Path) -> str:
    lines = ["% Generated by loraplace compare from the study stores; needs \\usepackage{booktabs,graphicx}."]
    main, summary = tables
    lines += _tex_tabular(main, f"{main.title}. " + " ".join(main.notes), "compare")
    lines += _tex_tabular(summary, f"{summary.title}. " + " ".join(summary.notes), "compare-summary")
    if figure is not None:
        rel = figure.files["pdf"].relative_to(out).as_posix()
        lines += ["\\begin{figure}[t]", "\\centering", f"\\includegraphics[width=\\linewidth]{{{rel}}}",
                  f"\\caption{{{tex_escape(figure.title)}. {tex_escape(figure.caption)}}}",
                  "\\label{fig:compare}", "\\end{figure}", ""]
    return "\n".join(lines)


def write_compare_report(cs: CrossStudy, out_dir: str | Path, formats: list[str] | tuple[str, ...] = FORMATS
                         ) -> dict[str, Path]:
    """The requested formats under ``out_dir`` (compare.html, compare.md, compare.tex, compare.csv and the figure
    in figures/); returns format → file."""
    generated = _generated_at()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = [placement_table(cs), summary_table(cs)]
    figure = heatmap(cs, out / "figures") if {"html", "md", "tex"} & set(formats) else None
    written: dict[str, Path] = {}
    if "html" in formats:
        written["html"] = _write(out / "compare.html", render_html(cs, tables, figure, generated))
    if "md" in formats:
        written["md"] = _write(out / "compare.md", render_markdown(cs, tables, figure, out))
    if "tex" in formats:
        written["tex"] = _write(out / "compare.tex", render_latex(cs, tables, figure, out))
    if "csv" in formats:
        written["csv"] = _write_csv(out / "compare.csv", tables[0])
        _write_csv(out / "compare_summary.csv", tables[1])
    return written
