"""Result commands over stores (read-only): ``export``, ``report``, ``recommend``, ``compare``."""

from __future__ import annotations

import json
import sys

import typer

from loraplace.cli.common import AT_HELP, FLAG, _Command, app, at_values, err, out
from loraplace.cli.outputs import output_dir, output_file
from loraplace.errors import LoraplaceError


@app.command(cls=_Command)
def export(store: str = typer.Argument(..., help="study store (.db)"),
           fmt: str = typer.Option("csv", "--format", help="csv | json | parquet"),
           output: str | None = typer.Option(None, "--out", "-o", help="file (default: stdout for csv/json)"),
           name: str | None = typer.Option(None, "--study", help="study name (default: the latest)")) -> None:
    """Export one row per trial: labels, status, measured metrics and sizes."""
    from loraplace.analysis.tables import export_rows
    from loraplace.store import Store

    if fmt not in ("csv", "json", "parquet"):
        raise LoraplaceError(f"unknown export format {fmt!r}", "use csv, json or parquet")
    if output is not None:
        output_file(output, fmt, (store,))  # a bad --out fails before the store is read
    with Store.open_readonly(store) as st:
        rows = export_rows(st.trials(st.study(name).id))
    if fmt == "json":
        text = json.dumps(rows, indent=2)
    elif fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, keys)
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        if output is None:
            raise LoraplaceError("parquet export needs --out FILE")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), output_file(output, fmt, (store,)))
        return
    if output:
        from loraplace.atomic import write_text_atomic

        write_text_atomic(output_file(output, fmt, (store,)), text)
    else:
        sys.stdout.write(text)


@app.command(cls=_Command)
def report(store: str = typer.Argument(..., help="study store (.db)"),
           out_dir: str | None = typer.Option(None, "--out", "-o", help="directory (default: STORE_report/ beside "
                                              "the store)"),
           formats: str = typer.Option("html,md,tex,csv", "--format", help="comma-separated: html,md,tex,csv"),
           name: str | None = typer.Option(None, "--study", help="study name (default: the latest)"),
           quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG,
                                      help="print only the report's path")) -> None:
    """Statistics across seeds, baseline comparison, Pareto frontier and figures: HTML, Markdown, LaTeX, CSV.
    Safe while a study is running (it reads finished trials)."""
    from pathlib import Path

    from loraplace.analysis import analyze_store
    from loraplace.analysis.report import parse_formats, write_report
    from loraplace.report_terminal import print_comparison

    chosen = parse_formats(formats)
    analysis = analyze_store(store, name)
    if not analysis.groups:
        raise LoraplaceError(f"study {analysis.name!r} has no finished trial yet",
                             f"run it first (loraplace run SPEC --store {store}) or check loraplace status {store}")
    target = Path(out_dir) if out_dir else Path(store).with_name(Path(store).stem + "_report")
    # before any figure is drawn: a file there or in the way (notes.txt/report), a read-only folder
    output_dir(str(target), {}, what="a report is a directory", option="--out" if out_dir else "report folder")
    written = write_report(analysis, target, chosen)
    if not quiet:
        print_comparison(analysis, out)
        for fmt, path in written.items():
            err.print(f"{fmt}: {path}", highlight=False)
    main_file = written.get("html") or next(iter(written.values()))
    out.print(f"report: {main_file}", highlight=False)


@app.command(cls=_Command)
def recommend(store: str = typer.Argument(..., help="study store (.db)"),
              budget: int | None = typer.Option(None, "--budget", min=1, help="consider only placements with at "
                                                "most this many trainable parameters"),
              metric: str = typer.Option("eval_loss", "--metric", help="eval_loss (the test split) | accuracy"),
              name: str | None = typer.Option(None, "--study", help="study name (default: the latest)"),
              at: str | None = typer.Option(None, "--at", help=AT_HELP),
              as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="print one JSON object")) -> None:
    """The placement to use: the best at or under the budget on the metric (each placement at its selected LR
    when the study tuned it), its interval, the runner-up, and whether the two are distinguishable. Safe while a
    study is running (it reads finished trials)."""
    from loraplace.analysis.recommend import recommend_from_store
    from loraplace.report_terminal import print_recommendation

    result = recommend_from_store(store, name, budget, metric, at_values(at))
    if as_json:
        chosen = result.chosen
        out.print_json(json.dumps({
            "placement": chosen.placement, "size": chosen.size, "metric": result.metric,
            "value": chosen.value, "interval": chosen.interval, "seeds": chosen.seeds, "lr": chosen.lr,
            "trainable_params": chosen.trainable_params,
            "runner_up": None if result.runner_up is None else result.runner_up.model_dump(mode="json"),
            "distinguishable": result.distinguishable, "difference": result.difference,
            "difference_interval": result.difference_interval, "p_value": result.p_value,
            "reason": result.reason, "placement_spec": result.placement_spec, "model": result.model,
            "study": result.study, "budget": result.budget, "tuned": result.tuned, "adapter": result.adapter,
            "adapter_seed": result.adapter_seed, "at": result.at, "incomplete": result.incomplete}))
        return
    print_recommendation(result, store, out)


@app.command(cls=_Command)
def compare(stores: list[str] = typer.Argument(..., help="study stores (.db), one study each (the latest)"),
            out_dir: str = typer.Option("compare_report", "--out", "-o", help="directory for the report"),
            formats: str = typer.Option("html,md,tex,csv", "--format", help="comma-separated: html,md,tex,csv"),
            quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG, help="print only the report's path")
            ) -> None:
    """The same placements across studies (tasks, horizons, bases), each at its own selected LRs: Δ test loss
    against each study's baseline with its seed-paired interval and rank, wins/ties/losses, a pooled
    random-effects estimate, a heatmap; HTML, Markdown, LaTeX, CSV. Says where a "same" placement or baseline
    differs between studies."""
    from pathlib import Path

    from loraplace.analysis.compare import compare_stores
    from loraplace.analysis.compare_report import write_compare_report
    from loraplace.analysis.report import parse_formats
    from loraplace.report_terminal import print_compare

    chosen = parse_formats(formats)
    target = Path(out_dir)
    output_dir(str(target), {}, what="a report is a directory")  # before any figure is drawn
    cross = compare_stores(stores)
    written = write_compare_report(cross, target, chosen)
    if not quiet:
        print_compare(cross, out)
        for fmt, path in written.items():
            err.print(f"{fmt}: {path}", highlight=False)
    main_file = written.get("html") or next(iter(written.values()))
    out.print(f"report: {main_file}", highlight=False)
