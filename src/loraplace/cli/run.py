"""Study commands: ``run`` (a study or a search into its store), ``status`` and ``replay`` (a search policy on a
stored grid)."""

from __future__ import annotations

import pathlib
import time

import typer
from rich.markup import escape

from loraplace.cli.common import ALLOW_UNASSIGNED_HELP, EXIT_WORK_LEFT, FLAG, Terminated, _Command, app, err, out
from loraplace.cli.progress import TrainProgress
from loraplace.errors import ConfigError
from loraplace.formatting import one_line


@app.command(cls=_Command)
def run(
    spec_path: str = typer.Argument(..., metavar="SPEC", help="study YAML"),
    store: str | None = typer.Option(None, "--store", help="SQLite store (default runs/NAME.db)"),
    backend: str = typer.Option("local", "--backend", help="local | ray"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start one here)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", metavar=FLAG, help="re-run failed trials too"),
    extend: bool = typer.Option(False, "--extend", metavar=FLAG, help="add new cells (placements, sizes, seeds, "
                                "axis values) to "
                                "an existing study; settings of existing groups cannot change"),
    force: bool = typer.Option(False, "--force", metavar=FLAG, help="allow adapters larger than the base model"),
    allow_unassigned: bool = typer.Option(False, "--allow-unassigned", metavar=FLAG, help=ALLOW_UNASSIGNED_HELP
                                          + " (the same as allow_unassigned: true in the spec)"),
    allow_mixed_precision: bool = typer.Option(
        False, "--allow-mixed-precision", metavar=FLAG, help="resume a precision: auto study on a machine where "
        "auto means another dtype than the one its trials ran in (refused without this)"),
    reuse_from: list[str] | None = typer.Option(
        None, "--reuse-from", metavar="STORE", help="take finished trials over from another study's store instead "
        "of training them: a trial of the same id has the same resolved spec (repeatable)"),
    timeout: str | None = typer.Option(
        None, "--timeout", metavar="DURATION", help="start no trial (nor search rung run) after this long "
        "(5400, 90m, 1.5h, 1h30m) — the first always starts, so every run makes progress: those in flight "
        "finish, the rest waits for the same command; exits "
        f"{EXIT_WORK_LEFT} when work is left. Under a hard time limit, give the limit less one trial's time"),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG,
                               help="no progress bars and no per-trial lines; the summary and errors only"),
) -> int:
    """Run a study: every unfinished trial of the grid, into a crash-safe store (resumable)."""
    import signal
    from pathlib import Path

    from loraplace.formatting import human_duration, parse_duration
    from loraplace.store import Store
    from loraplace.study import default_store, load_study

    try:
        timeout_s = parse_duration(timeout, "--timeout") if timeout is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    study = load_study(spec_path)  # invalid spec: error before anything is written
    if allow_unassigned:
        study = study.model_copy(update={"allow_unassigned": True})
    store_path = Path(store) if store else default_store(study)
    # Before torch, transformers and peft are imported (~5 s): a store this run could not write is refused at once.
    # run_study checks it again for callers of the API.
    Store.check_writable(store_path)
    from loraplace.runner import RunHooks
    from loraplace.study import run_study

    bar = TrainProgress(quiet)
    counts = {"started": 0, "done": 0, "failed": 0, "rung_runs": 0}
    in_flight: dict[str, int] = {}  # trial id → its index; several at once when trials are fused

    def start(trial, index: int, total: int) -> None:
        counts["started"] += 1
        in_flight[trial.id] = index
        bar.start_study(total)
        if len(in_flight) == 1:
            bar.new_trial(f"{index}/{total} {trial.labels.group.label} seed={trial.labels.seed}")
        else:  # a fused group: its bar shows the group's steps, mean loss and tokens/s
            bar.new_trial(f"{min(in_flight.values())}–{index}/{total} fused ×{len(in_flight)}")

    def end(trial, outcome) -> None:
        in_flight.pop(trial.id, None)
        counts["done" if outcome.status == "done" else "failed"] += 1
        bar.trial_done(counts["done"], counts["failed"])
        if not quiet:
            what = (f"eval_loss={outcome.metrics.eval_loss:.4f}" if outcome.metrics is not None
                    else one_line(outcome.failure.message, 300) if outcome.failure is not None else "")
            bar.progress.console.print(f"{trial.id} {escape(trial.labels.group.label)} seed={trial.labels.seed} → "
                                       f"{outcome.status} {escape(what)}", highlight=False)

    def note(line: str) -> None:
        if not quiet:
            bar.progress.console.print(escape(line), highlight=False)

    def rung_start(label: str) -> None:
        counts["rung_runs"] += 1
        bar.new_trial(label)

    def terminate(_signum, _frame):  # SIGTERM stops the run like Ctrl-C: the trial in flight is marked interrupted
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with bar:
            hooks = RunHooks(on_start=start, on_end=end, progress=bar, on_note=note, on_rung_start=rung_start)
            summary = run_study(study, store_path, backend=backend, address=address, retry_failed=retry_failed,
                                extend=extend, force=force, allow_mixed_precision=allow_mixed_precision,
                                reuse_from=reuse_from or (), hooks=hooks, timeout_s=timeout_s)
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        unfinished = counts["started"] - counts["done"] - counts["failed"]
        if unfinished:
            err.print(f"[red]{what}:[/] the trial in flight is marked interrupted; run the same command to resume")
        elif counts["rung_runs"]:  # a search between or inside its rungs: no trial yet, but work done
            err.print(f"[red]{what}[/] during the search's rungs: every rung result so far is kept (a candidate "
                      "in flight continues from its last rung); run the same command to resume", highlight=False)
        else:
            err.print(f"[red]{what}[/] before any trial ran; run the same command to start", highlight=False)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for warning in summary.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if not quiet:
        err.print(f"ran {summary.ran} trial(s): {summary.done} done, {summary.failed} failed; "
                  f"{summary.skipped} already done; " + (f"{summary.reused} reused from another store; "
                                                          if reuse_from else "")
                  + f"{len(summary.recovered)} recovered from a dead run; "
                  f"{summary.wall_s:.1f} s", highlight=False)
        if summary.execution:
            fused_note = "" if summary.fused or "fused in groups" not in summary.execution else (
                "; none of this run's trials was fused with another (one trial at a time, or groups that could "
                "not fuse: their warnings say why)")
            err.print(summary.execution + fused_note, highlight=False, style="dim")
    print_store_status(store_path, study.name)
    if summary.done or summary.skipped:
        from loraplace.analysis import analyze_store
        from loraplace.report_terminal import print_comparison

        analysis = analyze_store(store_path, study.name)
        print_comparison(analysis, out)
        if analysis.search is not None and analysis.search.finished:
            search = analysis.search
            out.print(f"search: {search.search_steps():.0f} training-step equivalents against {search.grid_steps:,} "
                      f"steps for the full tuned grid ({search.ratio():.2f}×); answer: loraplace recommend "
                      f"{store_path}", highlight=False)
    out.print(f"store: {store_path}  (report: loraplace report {store_path})", highlight=False)
    if summary.failed_earlier:
        err.print(f"[red]{summary.failed_earlier} trial(s) failed in an earlier run and were not run again[/]; "
                  f"after fixing the cause: loraplace run {spec_path} --store {store_path} --retry-failed",
                  highlight=False)
    if summary.timed_out:
        err.print(f"[yellow]--timeout {human_duration(timeout_s or 0)} reached:[/] nothing was started after it; "
                  f"the rest waits — run the same command to continue", highlight=False)
    return 1 if summary.failed or summary.failed_earlier else EXIT_WORK_LEFT if summary.timed_out else 0


def _saved_steps(store_path, trials) -> dict[str, tuple[int, int]]:
    """Unfinished trial id → (steps, total) of the training state it saved (execution.save_state_every): where
    the next run continues it. torch is imported only when there is such a state."""
    from loraplace.store import STATE_DIR, artifacts_dir, trial_dir

    artifacts = artifacts_dir(pathlib.Path(store_path))
    files = {t.id: trial_dir(artifacts, t.id) / STATE_DIR for t in trials if t.status != "done"}
    files = {tid: path for tid, path in files.items() if path.is_dir()}
    if not files:
        return {}
    from loraplace.stepper import Continuation

    out = {}
    for tid, path in files.items():
        try:
            saved = Continuation(path).saved()
        except Exception:  # noqa: BLE001 - status reads; a state it cannot read is the run's to report
            continue
        if saved is not None:
            out[tid] = (saved.progress.steps, saved.progress.total)
    return out


def _trials_to_add(study, trials) -> int:
    """A tuned study's other seeds' trials not in the store yet, its seeds read from the stored spec (0 where
    that spec no longer validates: a store written by an older loraplace)."""
    from pydantic import ValidationError

    from loraplace.study.spec import study_from_store
    from loraplace.study.time_left import trials_to_add

    try:
        seeds = study_from_store(study.spec).seeds
    except ValidationError:
        return 0
    return trials_to_add(study.info, seeds, trials)


def print_store_status(store_path, name: str | None = None) -> None:
    from loraplace.report_terminal import print_search, print_status
    from loraplace.store import Store
    from loraplace.study.time_left import time_left

    with Store.open_readonly(store_path) as store:
        study = store.study(name)
        trials = store.trials(study.id)
        now = time.time()
        estimate = None if study.info.search else time_left(trials, now, _trials_to_add(study, trials))
        print_status(study, trials, store.counts(study.id), out, _saved_steps(store_path, trials), now=now,
                     estimate=estimate)
        if study.info.search:
            from loraplace.analysis.search import analyze_search

            search = analyze_search(study.spec, study.info, store.rung_results(study.id),
                                    store.rung_decisions(study.id), store.trials(study.id))
            print_search(search, out)


@app.command(cls=_Command)
def status(store: str = typer.Argument(..., help="study store (.db)"),
           name: str | None = typer.Option(None, "--study", help="study name (default: the latest)")) -> None:
    """Table of a study's trials: status and key metrics. Safe while a study is running."""
    print_store_status(store, name)


@app.command(cls=_Command)
def replay(store: str = typer.Argument(..., help="grid store (.db): a tuned study whose trials recorded the rung "
                                       "steps (eval.at_steps, eval.watch_examples)"),
           search: str = typer.Option(..., "--search", help="the policy: a search: block ('{eta: 4, rungs: [3, "
                                      "10], rung_examples: 24}') or a YAML file holding one (a study spec: its "
                                      "search:)"),
           rung_seed: list[int] | None = typer.Option(None, "--rung-seed", help="the seed the rungs run on "
                                                      "(repeatable; default: the grid's first seed)"),
           all_seeds: bool = typer.Option(False, "--all-seeds", metavar=FLAG, help="replay with the rungs on each "
                                          "of the grid's seeds"),
           task: str | None = typer.Option(None, "--task", help="the task's name in the result line (default: "
                                           "the grid study's name)"),
           name: str | None = typer.Option(None, "--study", help="study name (default: the latest)")) -> None:
    """Replay a search policy on a stored grid, with no training: each rung's decision, the compute ledger, the
    answer, and its regret against the grid's answer (test loss, seed-paired 95 % interval). Read-only."""
    from loraplace.analysis.replay import replay_store
    from loraplace.report_terminal import print_replay
    from loraplace.search import SearchSpec
    from loraplace.specs import validate
    from loraplace.store import Store

    policy = validate(SearchSpec, _search_block(search), "invalid --search")
    if all_seeds:
        with Store.open_readonly(store) as opened:
            seeds = list(opened.study(name).spec.get("seeds", [0]))
    else:
        seeds = rung_seed or [None]
    for seed in seeds:
        result = replay_store(store, policy, rung_seed=seed, name=name)
        print_replay(result, task or result.grid, out)


def _search_block(text: str) -> dict:
    """``--search``: a YAML file (its ``search:`` when it is a study spec) or a YAML mapping given inline."""
    from loraplace.specs import load_yaml, parse_yaml

    path = pathlib.Path(text)
    if path.is_file() and path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError([f"--search {text}: a file, but not a .yaml, .yml or .json one"], "invalid --search",
                          "give a YAML file holding a search: block (or a study spec with one), or the block inline")
    data = load_yaml(path) if path.suffix in (".yaml", ".yml", ".json") else parse_yaml(text, "--search")
    if isinstance(data, dict) and isinstance(data.get("search"), dict):
        data = data["search"]
    elif isinstance(data, dict) and {"model", "placements"} <= data.keys():  # a study spec: its search: is missing
        raise ConfigError([f"--search {text}: a study spec with no search: block"], "invalid --search",
                          "add a search: block to it, or give the policy inline, e.g. --search '{eta: 4}'")
    if not isinstance(data, dict):
        raise ConfigError([f"--search {text!r}: not a mapping (a search: block, e.g. '{{eta: 4}}')"],
                          "invalid --search")
    return data
