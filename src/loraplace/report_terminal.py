"""Rich terminal rendering of plans and results (no logic beyond formatting)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraplace.placement.plan import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def print_plan(plan: Plan, console: Console) -> None:
    console.print(f"[bold]{plan.model}[/]  family={plan.family}  layers={plan.num_layers}  "
                  f"placement=[cyan]{plan.placement.get('label')}[/]", highlight=False)
    roles = plan.grid_roles()
    grid = Table(title="sites (rank per layer × role)", show_lines=False, pad_edge=False)
    grid.add_column("layer", justify="right")
    for role in roles:
        grid.add_column(role, justify="center")
    sites = plan.sites
    for layer in range(plan.num_layers):
        grid.add_row(str(layer), *[str(sites[(layer, r)]) if (layer, r) in sites else "[dim]·[/]" for r in roles])
    if (None, "head") in sites:
        grid.add_row("head", f"r={sites[(None, 'head')]}", *[""] * (len(roles) - 1))
    console.print(grid)

    mods = Table(title=f"{len(plan.modules)} adapted modules", pad_edge=False)
    for col, justify in (("path", "left"), ("role", "left"), ("in×out", "right"), ("rank", "right"),
                         ("alpha", "right"), ("params", "right")):
        mods.add_column(col, justify=justify)
    for m in plan.modules:
        mods.add_row(m.path, m.role, f"{m.in_features}×{m.out_features}", str(m.rank), f"{m.alpha:g}",
                     f"{m.params:,}")
    console.print(mods)

    mem = plan.memory_estimate()
    console.print(f"trainable params: [bold]{plan.trainable_params:,}[/] ({plan.trainable_percent:.4f}% of "
                  f"{plan.total_params:,} base params)", highlight=False)
    if plan.budget is not None:
        console.print(f"budget: {plan.budget:,}  achieved: {plan.trainable_params:,}  "
                      f"deviation: {100 * (plan.budget_deviation or 0):+.3f}%", highlight=False)
    console.print(f"adapter on disk ≈ {human_bytes(plan.adapter_size_bytes())}; training memory for adapters ≈ "
                  f"{human_bytes(mem['trainable_total_bytes'])} (weights + grads + AdamW state); base weights "
                  f"{human_bytes(mem['base_weights_bytes'])} in bf16", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_trial(result, console: Console) -> None:
    if result.status != "done":
        console.print(f"[bold red]trial failed[/] {result.error}", highlight=False)
        return
    table = Table(title="trial", show_header=False, pad_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("eval loss", f"{result.eval_loss:.4f}"),
        ("perplexity", f"{result.perplexity:.3f}"),
        ("accuracy", "—" if result.accuracy is None else f"{100 * result.accuracy:.1f}% "
                                                          f"(n={result.accuracy_detail['n']})"),
        ("trainable params", f"{result.trainable_params:,} ({result.trainable_percent:.3f}%)"),
        ("steps / train tokens", f"{result.steps} / {result.train_tokens:,}"),
        ("tokens/s (non-pad)", f"{result.tokens_per_s:,.0f}"),
        ("time load / tokenise / train / eval", f"{result.load_s:.1f} / {result.tokenize_s:.1f} / "
                                                f"{result.train_s:.1f} / {result.eval_s:.1f} s"),
        ("peak memory", f"{result.peak_mem_mb:,.0f} MiB"),
        ("device / dtype", f"{result.device} / {result.dtype}"),
        ("adapter", result.adapter_dir or "not saved (use --out)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_status(study, trials, counts, console: Console) -> None:
    from loraplace.analysis.core import size_label

    table = Table(title=f"study {study.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v),
                  pad_edge=False)
    for col, justify in (("trial", "left"), ("placement", "left"), ("size", "right"), ("seed", "right"),
                         ("status", "left"), ("eval loss", "right"), ("ppl", "right"), ("params", "right"),
                         ("tok/s", "right"), ("train s", "right")):
        table.add_column(col, justify=justify)
    style = {"done": "green", "failed": "red", "running": "yellow", "interrupted": "magenta", "pending": "dim"}
    for t in trials:
        labels, m = t.config.get("labels", {}), t.metrics
        size = size_label(labels) or "?"

        def num(key, fmt, m=m):
            return format(m[key], fmt) if key in m else "—"

        status = f"[{style.get(t.status, '')}]{t.status}[/]"
        if t.status == "failed" and t.error:
            status += f" [dim]({t.error.splitlines()[0][:40]})[/]"
        table.add_row(t.id[:8], str(labels.get("placement", "?")), size, str(labels.get("seed", "")), status,
                      num("eval_loss", ".4f"), num("perplexity", ".3f"), num("trainable_params", ",.0f"),
                      num("tokens_per_s", ",.0f"), num("train_s", ".1f"))
    console.print(table)


# The terminal keeps the columns that decide a placement; `loraplace report` writes the full table.
TERMINAL_COLUMNS = ("placement", "size", "seeds", "trainable params", "eval loss", "Δ eval loss vs baseline",
                    "p (paired t)", "verdict", "Pareto")


SHORT_HEADERS = {"trainable params": "params", "Δ eval loss vs baseline": "Δ loss vs base", "p (paired t)": "p",
                 "seeds": "n", "params saved (% of baseline)": "saved"}


def print_table(table, console: Console, columns: tuple[str, ...] | None = None) -> None:
    """A :class:`loraplace.analysis.tables.Table` as a rich table (optionally a subset of its columns)."""
    idx = [table.columns.index(c) for c in (columns or table.columns) if c in table.columns]
    out = Table(title=table.title, pad_edge=False)
    for i in idx:
        out.add_column(SHORT_HEADERS.get(table.columns[i], table.columns[i]),
                       justify="right" if table.right[i] else "left", no_wrap=True)
    verdict_style = {"better": "green", "worse": "red", "baseline": "dim"}
    for row in table.rows:
        cells = [escape(row[i]) for i in idx]
        if columns and "Pareto" in table.columns and table.columns.index("Pareto") in idx:
            pos = idx.index(table.columns.index("Pareto"))  # the dominating group is named in the report
            cells[pos] = cells[pos].split(" by ")[0]
        if "verdict" in table.columns and table.columns.index("verdict") in idx:
            pos = idx.index(table.columns.index("verdict"))
            style = verdict_style.get(cells[pos])
            if style:
                cells[pos] = f"[{style}]{cells[pos]}[/]"
        out.add_row(*cells)
    console.print(out)


def print_comparison(analysis, console: Console) -> None:
    from loraplace.analysis.tables import comparison_table

    print_table(comparison_table(analysis), console, TERMINAL_COLUMNS)
    for warning in analysis.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_probe(result, console: Console) -> None:
    """Layers × roles table of probe scores; the best site per role is bold, the top-10 by efficiency starred."""
    top = sorted(result.sites, key=lambda s: -s.efficiency)[:10]
    starred = {(s.layer, s.role) for s in top}
    table = Table(title=f"importance probe · {result.model} · ‖G_r‖_F at r={result.rank} over {result.batches} "
                        f"batches ({result.label_tokens:,} label tokens, {result.seconds:.1f} s)", pad_edge=False)
    table.add_column("layer", justify="right")
    for role in result.roles:
        table.add_column(role, justify="right")
    matrix = result.matrix("score")
    best = {j: max(range(result.num_layers), key=lambda i, j=j: matrix[i][j]) for j in range(len(result.roles))}
    for i, row in enumerate(matrix):
        cells = []
        for j, value in enumerate(row):
            text = "—" if value != value else f"{value:.3g}"
            if (i, result.roles[j]) in starred:
                text += "*"
            cells.append(f"[bold]{text}[/]" if best[j] == i else text)
        table.add_row(str(i), *cells)
    console.print(table)
    console.print("* = top 10 sites by efficiency (score per trainable parameter at this rank); bold = best layer "
                  "per role", highlight=False)
