"""Rich terminal rendering of plans and results (no logic beyond formatting)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraplace.formatting import human_bytes, human_duration
from loraplace.placement.plan import Plan
from loraplace.placement.roles import short_role
from loraplace.records import TrialOutcome
from loraplace.store import StudyRecord, TrialRecord
from loraplace.study.time_left import TimeLeft


def print_plan(plan: Plan, console: Console) -> None:
    console.print(f"[bold]{plan.model}[/]  family={plan.family}  layers={plan.num_layers}  "
                  f"placement=[cyan]{plan.placement.get('label')}[/]", highlight=False)
    roles = plan.grid_roles()
    grid = Table(title="sites (rank per layer × role)", show_lines=False, pad_edge=False)
    grid.add_column("layer", justify="right")
    for role in roles:  # short labels (q, down, exp.down, sh.up, router): the full names are in the module table
        grid.add_column(short_role(role), justify="center")
    sites = plan.sites
    for layer in range(plan.num_layers):
        grid.add_row(str(layer), *[str(sites[(layer, r)]) if (layer, r) in sites else "[dim]·[/]" for r in roles])
    if (None, "head") in sites:
        grid.add_row("head", f"r={sites[(None, 'head')]}", *[""] * (len(roles) - 1))
    console.print(grid)

    mods = Table(title=f"{len(plan.modules)} adapted modules", pad_edge=False)
    moe = any(m.experts > 1 for m in plan.modules)
    columns = (("path", "left"), ("role", "left"), ("in×out", "right")) + ((("experts", "right"),) if moe else ()) \
        + (("rank", "right"), ("alpha", "right"), ("params", "right"))
    for col, justify in columns:
        mods.add_column(col, justify=justify)
    for m in plan.modules:
        # A parameter target (PEFT target_parameters) is marked: its adapter wraps the tensor, not a module.
        path = m.path + (" [dim](parameter)[/]" if m.parameter else "")
        experts = (f"{m.experts}",) if moe else ()
        mods.add_row(path, m.role, f"{m.in_features}×{m.out_features}", *experts, str(m.rank), f"{m.alpha:g}",
                     f"{m.params:,}")
    console.print(mods)
    if plan.unassigned:
        console.print(f"[yellow]{len(plan.unassigned)} weight(s) in the blocks have no role[/] (never adapted by a "
                      "group): " + ", ".join(plan.unassigned[:8]) + (" …" if len(plan.unassigned) > 8 else ""),
                      highlight=False)

    mem = plan.memory_estimate()
    console.print(f"trainable params: [bold]{plan.trainable_params:,}[/] ({plan.trainable_percent:.4f}% of "
                  f"{plan.total_params:,} base params)", highlight=False)
    if plan.budget is not None:
        console.print(f"budget: {plan.budget:,}  achieved: {plan.trainable_params:,}  "
                      f"deviation: {100 * (plan.budget_deviation or 0):+.3f}%", highlight=False)
    console.print(f"adapter on disk ≈ {human_bytes(plan.adapter_size_bytes())}; training memory for adapters ≈ "
                  f"{human_bytes(mem['trainable_total_bytes'])} (weights + grads + AdamW state); base weights "
                  f"{human_bytes(mem['base_weights_bytes'])} in bf16", highlight=False)
    if plan.active_params is not None:
        console.print(f"mixture of experts: {plan.active_params:,} of {plan.total_params:,} base params active per "
                      f"token ({100 * plan.active_params / plan.total_params:.1f}%); memory holds all "
                      f"{plan.total_params:,}, compute per token follows the active ones", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_trial(outcome: TrialOutcome, console: Console) -> None:
    if outcome.failure is not None:
        failure = outcome.failure
        console.print(f"[bold red]trial failed[/] {escape(failure.message)}"
                      + (f"\n  hint: {escape(failure.hint)}" if failure.hint else ""), highlight=False)
        return
    assert outcome.metrics is not None
    m, t, env = outcome.metrics, outcome.timings, outcome.environment
    detail = outcome.accuracy_detail
    table = Table(title="trial", show_header=False, pad_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("eval loss", f"{m.eval_loss:.4f}"),
        ("perplexity", f"{m.perplexity:.3f}"),
        ("accuracy", "—" if m.accuracy is None or detail is None else f"{100 * m.accuracy:.1f}% (n={detail.n})"),
        ("trainable params", f"{outcome.trainable_params:,} ({outcome.trainable_percent:.3f}%)"),
        ("steps / train tokens", f"{outcome.steps} / {outcome.train_tokens:,}"),
        ("tokens/s (non-pad)", f"{m.tokens_per_s:,.0f}"),
        ("time load / tokenise / train / eval", f"{t.load_s:.1f} / {t.tokenize_s:.1f} / {m.train_s:.1f} / "
                                                f"{t.eval_s:.1f} s"),
        ("peak memory", f"{m.peak_mem_mb:,.0f} MiB"),
        ("device / dtype", f"{env.device} / {env.dtype}"),
        ("adapter", outcome.adapter.path if outcome.adapter is not None else "not saved (use --out)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for warning in outcome.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_status(study: StudyRecord, trials: list[TrialRecord], counts: dict[str, int], console: Console,
                 saved_steps: dict[str, tuple[int, int]] | None = None, *, now: float | None = None,
                 estimate: TimeLeft | None = None) -> None:
    """The trials table (a running trial with how long it has run, given ``now``), then the whole reason of
    every failed or interrupted trial (wrapped, never cut), where an unfinished trial with a saved training state
    (``saved_steps``: id → (steps, total)) continues, and the ``estimate`` of the time left."""
    table = Table(title=f"study {study.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v),
                  pad_edge=False)
    # With a validation split the validation loss comes first: it is what a tuned study selects on, and the test
    # split's ("eval loss", as in the comparison and the report) is for the report.
    with_val = any(t.metrics is not None and t.metrics.val_loss is not None for t in trials)
    for col, justify in (("trial", "left"), ("placement", "left"), ("size", "right"), ("seed", "right"),
                         ("status", "left")) + ((("val loss", "right"),) if with_val else ()) + (
                            ("eval loss", "right"), ("ppl", "right"),
                            ("params", "right"), ("tok/s", "right"), ("train s", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    style = {"done": "green", "failed": "red", "running": "yellow", "interrupted": "magenta", "pending": "dim"}

    def num(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for t in trials:
        group, m = t.labels.group, t.metrics
        params = t.outcome.trainable_params if t.outcome is not None and t.outcome.trainable_params else None
        val = (num(m.val_loss if m else None, ".4f"),) if with_val else ()
        table.add_row(t.id[:8], escape(group.placement), group.size_label, str(t.labels.seed),
                      f"[{style.get(t.status, '')}]{t.status}[/]{_running_for(t, now)}", *val,
                      num(m.eval_loss if m else None, ".4f"), num(m.perplexity if m else None, ".3f"),
                      num(params, ",d"), num(m.tokens_per_s if m else None, ",.0f"),
                      num(m.train_s if m else None, ".1f"))
    console.print(table)
    saved_steps = saved_steps or {}
    for t in trials:
        reason = f": {escape(t.error)}" if t.status in ("failed", "interrupted") and t.error else ""
        resumes = ""
        if t.id in saved_steps:
            steps, total = saved_steps[t.id]
            resumes = f"; its state is saved at step {steps} of {total}: " + (
                "a run killed now would continue it from there" if t.status == "running"
                else "the next run continues it from there")
        if reason or resumes:
            console.print(f"[{style.get(t.status, '')}]{t.status}[/] {t.id[:8]} {escape(t.labels.group.label)} "
                          f"seed {t.labels.seed}{reason}{resumes}", highlight=False)
    if estimate is not None:
        console.print(_time_left_line(estimate), highlight=False)


def _running_for(trial: TrialRecord, now: float | None) -> str:
    if trial.status != "running" or now is None or trial.started_at is None:
        return ""
    return f" {human_duration(max(0.0, now - trial.started_at))}"


def _time_left_line(e: TimeLeft) -> str:
    """"time left: ≈ 5h12m at one trial at a time (18 trials left, and the other seeds' 10 trials once the
    selection pass ends; a trial takes 16m20s of wall time, the median of 2 done)"."""
    at_once = "one trial at a time" if e.parallel == 1 else f"{e.parallel} trials at a time, as now"
    what = f"{e.left} trial{'s' if e.left != 1 else ''} left"
    if e.to_add:
        what += (f", and the other seeds' {e.to_add} trial{'s' if e.to_add != 1 else ''} once the selection pass "
                 "ends")
    return (f"time left: ≈ {human_duration(e.seconds)} at {at_once} ({what}; a trial takes "
            f"{human_duration(e.trial_s)} of wall time, the median of {e.done} done)")


# The terminal keeps the columns that decide a placement; `loraplace report` writes the full table.
TERMINAL_COLUMNS = ("placement", "size", "seeds", "trainable params", "eval loss", "Δ eval loss vs baseline",
                    "p (paired t)", "verdict", "Pareto")


SHORT_HEADERS = {"trainable params": "params", "Δ eval loss vs baseline": "Δ loss vs base", "p (paired t)": "p",
                 "seeds": "n", "params saved (% of baseline)": "saved",
                 # compare's summary
                 "vs best other preset W/T/L": "vs preset W/T/L", "pooled Δ % [95% CI]": "pooled Δ %",
                 "tasks better/worse/all": "tasks +/−/n", "SD across tasks": "SD", "mean rank": "rank"}


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
        if "verdict" in table.columns and table.columns.index("verdict") in idx:
            pos = idx.index(table.columns.index("verdict"))
            style = verdict_style.get(cells[pos])
            if style:
                cells[pos] = f"[{style}]{cells[pos]}[/]"
        out.add_row(*cells)
    console.print(out)


def print_comparison(analysis, console: Console) -> None:
    from loraplace.analysis.tables import axis_table, comparison_table, pairwise_table

    # The terminal says "dominated"; the report names the dominating group.
    print_table(comparison_table(analysis, name_dominator=False), console, TERMINAL_COLUMNS)
    pairs = pairwise_table(analysis)  # three or more placements: the best and those not told from it, per cell
    if pairs is not None:
        for note in pairs.findings:
            console.print(escape(note) + " (every pair: the report's 'Every pair of placements')", highlight=False)
    axes = axis_table(analysis)  # a swept axis (e.g. quantize): each placement against itself at the first value
    if axes is not None:
        print_table(axes, console, ("axis", "placement", "cell", "from", "to", "Δ eval loss", "p (paired t)",
                                    "verdict"))
        for note in axes.findings:  # the placements' order at each value
            console.print(escape(note), highlight=False)
    for warning in analysis.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_probe(result, console: Console) -> None:
    """Layers × roles table of probe scores. Gradient: the best site per role is bold, the top-10 by efficiency
    starred. NFN: the lowest site per role is bold, the 10 lowest starred (PLoP adapts the lowest). Warmup: the
    highest relative update per role is bold, the 10 highest starred. For NFN and warmup the roles' means (what
    ``auto: {method: nfn | warmup}`` ranks) follow."""
    measure = result.measure
    low_first = measure == "nfn"
    finite = [s for s in result.sites if s.score == s.score]
    top = sorted(finite, key=lambda s: {"nfn": s.score, "warmup": -s.score}.get(measure, -s.efficiency))[:10]
    starred = {(s.layer, s.role) for s in top}
    if measure == "warmup":
        what = (f"relative update ‖ΔW·x‖/‖W·x‖ after {result.warmup_steps} warm-up steps at lr "
                f"{result.warmup_lr:g}, r={result.rank}")
    else:
        what = "normalized feature norm (NFN)" if low_first else f"‖G_r‖_F at r={result.rank}"
    table = Table(title=f"importance probe · {result.model} · {what} over {result.batches} batches "
                        f"({result.label_tokens:,} label tokens, {result.seconds:.1f} s)", pad_edge=False)
    table.add_column("layer", justify="right")
    for role in result.roles:
        table.add_column(short_role(role), justify="right")
    matrix = result.matrix("score")

    def key(v: float) -> float:  # NaN (no such site, or unscored) never wins
        return -math.inf if v != v else (-v if low_first else v)

    best = {j: max(range(result.num_layers), key=lambda i, j=j: key(matrix[i][j])) for j in range(len(result.roles))}
    for i, row in enumerate(matrix):
        cells = []
        for j, value in enumerate(row):
            text = "—" if value != value else f"{value:.3g}"
            if (i, result.roles[j]) in starred:
                text += "*"
            cells.append(f"[bold]{text}[/]" if best[j] == i else text)
        table.add_row(str(i), *cells)
    console.print(table)
    if measure == "gradient":
        console.print("* = top 10 sites by efficiency (score per trainable parameter at this rank); bold = best "
                      "layer per role", highlight=False)
        return
    if low_first:
        console.print("* = the 10 lowest sites; bold = lowest layer per role. Low NFN: the inputs are no better "
                      "aligned with the weight than noise — PLoP adapts the lowest roles", highlight=False)
    else:
        console.print("* = the 10 highest sites; bold = highest layer per role. High: the warmed-up adapter moved "
                      "the module's output furthest — auto method warmup adapts the highest roles", highlight=False)
    from loraplace.probe import ranked_units  # (torch is loaded: the probe just ran)

    ranked = ranked_units(result, "role", measure)
    if ranked:
        order = "lowest" if low_first else "highest"
        console.print(f"roles by mean {'NFN' if low_first else 'relative update'}, {order} first: " + ", ".join(
            f"{u.key} {v:.3g}" for u, v in ranked), highlight=False)


def print_recommendation(result, store: str, console: Console) -> None:
    """``loraplace recommend``: the choice, its evidence, and how to carry it on."""
    chosen = result.chosen
    interval = "" if chosen.interval is None else f", 95 % CI [{chosen.interval[0]:.4f}, {chosen.interval[1]:.4f}]"
    lr = "" if chosen.lr is None or "lr=" in chosen.size else f" at lr {chosen.lr:g}"  # a tuned size says it
    console.print(f"[bold]recommended:[/] {escape(chosen.placement)} ({escape(chosen.size)}){lr}: "
                  f"{result.metric_label} {chosen.value:.4f}{interval}, {chosen.trainable_params:,} trainable "
                  f"parameters, {chosen.seeds} seed{'s' if chosen.seeds != 1 else ''}", highlight=False)
    if result.runner_up is not None:
        ru = result.runner_up
        ru_int = "" if ru.interval is None else f", CI [{ru.interval[0]:.4f}, {ru.interval[1]:.4f}]"
        verdict = {True: "distinguishable", False: "not distinguishable", None: "—"}[result.distinguishable]
        console.print(f"runner-up: {escape(ru.placement)} ({escape(ru.size)}): {ru.value:.4f}{ru_int}, "
                      f"{ru.trainable_params:,} parameters — {verdict}", highlight=False)
    console.print(escape(result.reason), highlight=False)
    if result.incomplete is not None:
        console.print(f"[yellow]warning:[/] {escape(result.incomplete)}", highlight=False)
    if not result.tuned:
        console.print("[dim]the study did not tune the learning rate per placement (tune:); the comparison is at "
                      "the LRs it ran[/]", highlight=False)
    if result.adapter is not None:
        path = escape(repr(result.adapter))
        if result.quantize == "none":
            how = (f"  load it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), {path}); "
                   "merge it into the base: .merge_and_unload()")
        else:  # trained on a quantized base: load it onto the same one; QLoRA deploys by merging into 16-bit
            from loraplace.exports import bnb_config_source

            bnb = escape(bnb_config_source(result.quantize, result.bnb_4bit_use_double_quant))
            how = (f"  trained on a {result.quantize} base; load it onto the same: PeftModel.from_pretrained("
                   f"AutoModelForCausalLM.from_pretrained(BASE, quantization_config={bnb}), {path}); to deploy "
                   "merged, load BASE in 16-bit (no quantization_config), then .merge_and_unload() — the adapter "
                   "learned against the 4-bit weights, so check the merged model's loss")
        console.print(f"trained adapter (seed {result.adapter_seed}): {escape(result.adapter)}\n{how}",
                      highlight=False)
    at = f" --at {','.join(f'{k}={v}' for k, v in result.at.items())}" if result.at else ""
    console.print(f"use it: loraplace export-placement --from {escape(store)}{escape(at)} --to peft --out "
                  "adapter_config.json", highlight=False)


def print_search(search, console: Console) -> None:
    """A search's progress: each decided rung (kept, cut) and the results of the rung in progress."""
    for rung in search.rungs:
        d = rung.decision

        def named(keys, rung=rung) -> str:
            return ", ".join(f"{search.names[k].label} ({rung.results[k].val_loss:.4f})"
                             if k in rung.results and rung.results[k].val_loss is not None
                             else f"{search.names[k].label} (failed)" for k in keys)

        console.print(f"rung {d.rung + 1} at {d.steps} steps: {len(d.ranked)} in; "
                      f"{'finalists' if d.last else 'kept'} {named(d.kept)}"
                      + (f" [{search.names[d.anchored].label}: best preset at this rung, kept]" if d.anchored
                         else ""), highlight=False)
        console.print(f"  cut: {named(rung.cut)}", highlight=False, style="dim")
    for index, results in sorted(search.pending.items()):
        console.print(f"rung {index + 1} in progress: {len(results)} candidate(s) measured", highlight=False)
    console.print(f"search compute so far: {search.search_steps():.0f} step-equivalents; the full tuned grid: "
                  f"{search.grid_steps:,} steps ({search.ratio():.2f}×)", highlight=False)


def print_replay(result, task: str, console: Console) -> None:
    """A policy replayed on a grid (:class:`loraplace.analysis.replay.ReplayResult`): rungs, ledger, answer,
    regret, and the one machine-readable line."""
    search = result.search
    console.print(f"[bold]replay on {escape(result.grid)}[/] — rungs on seed {result.rung_seed} at "
                  f"{', '.join(map(str, result.rungs))} steps", highlight=False)
    print_search(search, console)
    ledger = Table(title="compute (step-equivalents: a forward-only example counts 1/3)", pad_edge=False)
    for column in ("part", "step-equivalents"):
        ledger.add_column(column, justify="right" if column != "part" else "left")
    for item in search.ledger:
        ledger.add_row(escape(item.what), f"{item.steps(search.batch):.1f}")
    ledger.add_row("search, total", f"{search.search_steps():.1f}")
    ledger.add_row(f"the tuned grid ({search.grid_trials} trials × {search.total_steps} steps)",
                   f"{search.grid_steps:,}")
    console.print(ledger)
    a, g = result.answer.chosen, result.grid_answer.chosen
    console.print(f"answer: {a.placement} lr={a.lr:g} (test {a.value:.4f}); the grid's: {g.placement} lr={g.lr:g} "
                  f"(test {g.value:.4f}); Δ {result.delta:+.4f} [{result.ci[0]:+.4f}, {result.ci[1]:+.4f}]"
                  + (f", p = {result.p_value:.3f}" if result.p_value is not None else "")
                  + f" over seeds {', '.join(map(str, result.seeds))}", highlight=False)
    console.print(f"the grid's best on validation (seed {result.rung_seed}), {result.grid_best}: "
                  f"{'kept' if result.best_survived_first_rung else 'cut'} at rung 1", highlight=False)
    console.print(result.line(task), highlight=False, soft_wrap=True)


def print_compare(cs, console: Console) -> None:
    """``loraplace compare``: Δ % vs each study's baseline (* where its interval excludes 0) and the rank, one
    column per study (numbered; the legend below names them), then the per-placement summary; intervals are in the
    report files."""
    from loraplace.analysis.compare_report import column_notes, summary_table

    grid = Table(title="Δ test loss vs each study's baseline (%), * interval excludes 0 · rank", pad_edge=False)
    grid.add_column("placement", no_wrap=True)
    for i in range(len(cs.columns)):
        grid.add_column(f"[{i + 1}]", justify="right", no_wrap=True)
    for placement in cs.placements:
        cells = []
        for i in range(len(cs.columns)):
            e = cs.entry(placement, i)
            if e is None:
                cells.append("—")
            elif e.is_baseline or e.delta_pct is None:
                cells.append(f"[dim]{'base' if e.is_baseline else 'n/a'}[/] {e.rank}/{e.of}")
            else:
                verdict = e.delta_pct.verdict()
                style = {"better": "green", "worse": "red"}.get(verdict)
                text = f"{e.delta_pct.mean_diff:+.2f}{'*' if style else ''}"
                cells.append((f"[{style}]{text}[/]" if style else text) + f" {e.rank}/{e.of}")
        grid.add_row(escape(placement), *cells)
    console.print(grid)
    for i, note in enumerate(column_notes(cs)):
        console.print(f"[{i + 1}] {escape(note)}", highlight=False, style="dim")
    print_table(summary_table(cs), console)
    for note in cs.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
