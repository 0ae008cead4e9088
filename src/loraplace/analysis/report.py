"""Report writers: one self-contained HTML file, Markdown and LaTeX a paper can use as-is, and CSV.

Everything comes from one :class:`StudyAnalysis` and the shared :mod:`tables`, so the formats never disagree.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import os
import re
from pathlib import Path

import yaml

from loraplace.analysis.core import StudyAnalysis, condition_label
from loraplace.analysis.figures import Figure, study_figures
from loraplace.analysis.tables import (
    Table,
    accuracy_table,
    axis_table,
    budget_table,
    comparison_table,
    lr_table,
    pairwise_table,
    progress_table,
    rung_agreement_table,
    search_cost_table,
    search_table,
    site_table,
    trial_table,
)
from loraplace.atomic import write_text_atomic
from loraplace.errors import LoraplaceError
from loraplace.study.spec import spec_as_written

FORMATS = ("html", "md", "tex", "csv")
WIDE_FIGURES = ("efficiency", "sites", "probe")  # full text width; the others are single-column figures


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise LoraplaceError(f"unknown report format(s): {', '.join(unknown) or '(none given)'}",
                             f"use a comma-separated subset of {','.join(FORMATS)}")
    return formats


def write_report(analysis: StudyAnalysis, out_dir: str | Path,
                 formats: tuple[str, ...] | list[str] = FORMATS) -> dict[str, Path]:
    """Write the requested formats (and the figures they need) under ``out_dir``; returns format → main file."""
    generated = _generated_at()  # first: a bad SOURCE_DATE_EPOCH is one clear error, before any file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = study_figures(analysis, out / "figures") if {"html", "md", "tex"} & set(formats) else []
    tables = [t for t in (comparison_table(analysis), pairwise_table(analysis), accuracy_table(analysis),
                          axis_table(analysis),
                          search_table(analysis), search_cost_table(analysis), rung_agreement_table(analysis),
                          lr_table(analysis),
                          budget_table(analysis), site_table(analysis), progress_table(analysis)) if t is not None]
    trials = trial_table(analysis)
    written: dict[str, Path] = {}
    if "html" in formats:
        written["html"] = _write(out / "report.html", render_html(analysis, tables, trials, figures, generated))
    if "md" in formats:
        written["md"] = _write(out / "results.md", render_markdown(analysis, tables, figures, out))
    if "tex" in formats:
        written["tex"] = _write(out / "results.tex", render_latex(analysis, figures, out))
    if "csv" in formats:
        written["csv"] = _write_csv(out / "summary.csv", tables[0])
        _write_csv(out / "trials.csv", trials)
    return written


def _write(path: Path, text: str) -> Path:
    return write_text_atomic(path, text)  # a reader (a browser reloading) never sees half a report


def _write_csv(path: Path, table: Table) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return write_text_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d1d1f;
 max-width:1180px;margin:2em auto;padding:0 1.2em;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555}.warn{background:#fff7e0;border-left:4px solid #f0b400;padding:.5em 1em;margin:1em 0}
.warn li{margin:.2em 0}.scroll{overflow-x:auto;margin:.6em 0}table{border-collapse:collapse;font-size:12.5px}
th,td{padding:.3em .5em;border-bottom:1px solid #e6e6e6;text-align:left}
th{white-space:normal;overflow-wrap:normal;word-break:normal;hyphens:manual;vertical-align:bottom}
td{overflow-wrap:break-word}td.num{white-space:nowrap}
th{background:#f6f6f8;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.baseline td{background:#f3f6fb}tr.muted td{color:#777}.note{color:#666;font-size:12px;margin:.2em 0}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:0 1.5em}
.figs figure.wide{grid-column:1/-1}figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:12.5px;margin-top:.3em}pre{background:#f6f6f8;padding:.8em;overflow-x:auto;
font-size:12px}.ok{color:#2a7d2a}.bad{color:#b02a2a}
"""


def _html_table(table: Table, row_classes: list[str] | None = None, table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = []
    for i, row in enumerate(table.rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{html.escape(v)}</td>' if right else f"<td>{html.escape(v)}</td>"
                        for v, right in zip(row, table.right, strict=True))
        body.append(f"<tr{cls}>{cells}</tr>")
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in table.footnotes)
    ident = f' id="{table_id}"' if table_id else ""
    # headers wrap between words only; a table wider than the page scrolls inside its own box, never the page
    return (f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f"</table></div>{notes}")


def _img(figure: Figure) -> str:
    data = base64.b64encode(figure.files["png"].read_bytes()).decode()
    wide = ' class="wide"' if figure.name in WIDE_FIGURES else ""
    return (f'<figure id="fig-{figure.name}"{wide}><img alt="{html.escape(figure.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{html.escape(figure.title)}.</b> '
            f"{html.escape(figure.caption)}</figcaption></figure>")


def _generated_at() -> _dt.datetime:
    """When the report was written: now, or — the reproducible-builds convention — ``SOURCE_DATE_EPOCH`` (seconds,
    UTC) when set, so a committed report regenerated from an unchanged store is byte for byte the same."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            return _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        except (ValueError, OverflowError, OSError) as e:
            raise LoraplaceError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in seconds") from e
    return _dt.datetime.now().astimezone()


def render_html(analysis: StudyAnalysis, tables: list[Table], trials: Table, figures: list[Figure],
                generated: _dt.datetime) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in analysis.counts.items() if v)
    classes = ["baseline" if g.is_baseline else ("muted" if g.dominated_by else "") for g in analysis.compared]
    parts = [f"<h1>Study {html.escape(analysis.name)}</h1>",
             f'<p class="meta">model <b>{html.escape(analysis.model)}</b>'
             + ("" if analysis.environment.quantize == ("none",) else
                f" (base quantized: <b>{html.escape(', '.join(analysis.environment.quantize))}</b>)")
             + " · baseline "
             f"<b>{html.escape(str(analysis.baseline))}</b> · trials: {html.escape(counts)} · store "
             f"<code>{html.escape(analysis.store)}</code> · generated "
             f"{generated.strftime('%Y-%m-%d %H:%M %Z')}</p>"]
    if analysis.warnings:
        parts.append('<div class="warn"><b>Read with care</b><ul>'
                     + "".join(f"<li>{html.escape(w)}</li>" for w in analysis.warnings) + "</ul></div>")
    parts.append(f"<h2>{html.escape(tables[0].title)}</h2>" + _html_table(tables[0], classes, "comparison"))
    fronts = analysis.frontiers  # one per cost condition (swept quantize/steps/batch values)
    for cond, front in fronts.items():
        parts.append("<p><b>Pareto frontier</b>"
                     + (f" at {html.escape(condition_label(cond))}" if len(fronts) > 1 else "")
                     + " (fewest params for the loss): "
                     + " → ".join(html.escape(g.key.label) for g in front) + "</p>")
    parts.append('<div class="figs">' + "".join(_img(f) for f in figures) + "</div>")
    for table in tables[1:]:
        parts.append(f"<h2>{html.escape(table.title)}</h2>" + _html_table(table))
    parts.append(f"<h2>{html.escape(trials.title)}</h2>"
                 + _html_table(trials, ["" if r[3] == "done" else "muted" for r in trials.rows], "trials"))
    spec = spec_as_written(analysis.spec)
    parts.append("<h2>Study spec</h2><pre>" + html.escape(yaml.safe_dump(spec, sort_keys=False)) + "</pre>")
    environment = json.dumps(analysis.environment.to_dict(), indent=2)
    parts.append("<h2>Environment</h2><pre>" + html.escape(environment) + "</pre>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>loraplace · {html.escape(analysis.name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


# --------------------------------------------------------------------------------------------- Markdown

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(table: Table) -> str:
    lines = ["| " + " | ".join(map(_md_cell, table.columns)) + " |",
             "|" + "|".join("---:" if r else ":---" for r in table.right) + "|"]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
    return "\n".join(lines) + "\n" + "".join(f"\n_{n}_\n" for n in table.footnotes)


def render_markdown(analysis: StudyAnalysis, tables: list[Table], figures: list[Figure], out: Path) -> str:
    parts = [f"# Study `{analysis.name}`\n", f"Model `{analysis.model}`; baseline `{analysis.baseline}`.\n"]
    if analysis.warnings:
        parts.append("**Read with care:**\n\n" + "\n".join(f"- {w}" for w in analysis.warnings) + "\n")
    for table in tables:
        parts.append(f"## {table.title}\n\n{_md_table(table)}")
    for figure in figures:
        rel = figure.files["png"].relative_to(out).as_posix()
        parts.append(f"![{figure.title}]({rel})\n\n*{figure.title}.* {figure.caption}\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- LaTeX

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX_ESCAPES))


def tex_escape(text: str) -> str:
    text = _TEX_RE.sub(lambda m: _TEX_ESCAPES[m.group()], text)
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("×", r"$\times$").replace("—", "--") \
        .replace("–", "--").replace("→", r"$\to$")


# The paper table keeps the columns a results section needs; the HTML and CSV carry the rest.
_TEX_COLUMNS = ("placement", "size", "seeds", "trainable params", "eval loss", "Δ eval loss vs baseline",
                "p (paired t)", "params saved (% of baseline)", "Pareto")
_TEX_AXIS_COLUMNS = ("axis", "placement", "cell", "from", "to", "eval loss (from)", "eval loss (to)", "Δ eval loss",
                     "p (paired t)", "verdict")


def _tex_table(table: Table, columns: tuple[str, ...], caption: str, label: str) -> list[str]:
    idx = [table.columns.index(c) for c in columns]
    align = "".join("r" if table.right[i] else "l" for i in idx)
    lines = ["\\begin{table}[t]", "\\centering", "\\small", "\\setlength{\\tabcolsep}{4pt}",
             f"\\caption{{{tex_escape(caption)}}}", f"\\label{{tab:{label}}}",
             "\\resizebox{\\linewidth}{!}{%", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
             " & ".join(tex_escape(table.columns[i]) for i in idx) + " \\\\", "\\midrule"]
    for row in table.rows:
        cells = [tex_escape(row[i]) for i in idx]
        if cells[-1] == "frontier":
            cells[-1] = "\\textbf{frontier}"
        lines.append(" & ".join(cells) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}}", "\\end{table}", ""]


def render_latex(analysis: StudyAnalysis, figures: list[Figure], out: Path) -> str:
    table = comparison_table(analysis, name_dominator=False)  # the paper table says "dominated"; HTML says by whom
    label = re.sub(r'[^A-Za-z0-9]+', '-', analysis.name)
    lines = ["% Generated by loraplace from the study store; needs \\usepackage{booktabs,graphicx}."]
    lines += _tex_table(table, _TEX_COLUMNS, f"Placements compared on {analysis.model} (study {analysis.name}). "
                        f"{table.notes[0]}", label)
    axes = axis_table(analysis)
    if axes is not None:  # e.g. each placement on the 4-bit base against itself on the full-precision one
        caption = f"{axes.title} (study {analysis.name}). " + " ".join(axes.footnotes)
        lines += _tex_table(axes, _TEX_AXIS_COLUMNS, caption, f"{label}-axes")
    for figure in figures:
        rel = figure.files["pdf"].relative_to(out).as_posix()
        lines += ["\\begin{figure}[t]", "\\centering",
                  f"\\includegraphics[width=\\linewidth]{{{rel}}}",
                  f"\\caption{{{tex_escape(figure.title)}. {tex_escape(figure.caption)}}}",
                  f"\\label{{fig:{figure.name}}}", "\\end{figure}", ""]
    return "\n".join(lines)
