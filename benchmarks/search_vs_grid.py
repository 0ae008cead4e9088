"""A placement search against the full tuned grid of the same set-up: its answer's test loss against the grid's
best arm (seed-paired), its compute against the grid's, and every candidate it cut beside the grid's result.

    python benchmarks/search_vs_grid.py docs/search/search.db docs/validation/validation.db

Prints Markdown tables (for docs/search.md) and, last, the machine-readable line
``search_steps=N grid_steps=G ratio=R answer=NAME delta_vs_grid_best=D ci_low=L ci_high=H`` (Δ = the search's
answer − the grid's best arm, test eval loss, 95 % seed-paired interval over the seeds both ran). With
``--task NAME`` it prints, after it, the same figures as the replays' line (docs/replay.md, docs/search.md):
``task=NAME search_steps=N grid_steps=G ratio=R answer=NAME grid_answer=NAME delta=D ci_low=L ci_high=H``, where
the grid's answer is what ``recommend`` answers on the grid (as in the replays), Δ against it.
"""

from __future__ import annotations

import argparse
import sys

from loraplace.analysis import analyze_store
from loraplace.analysis.recommend import recommend_from_store
from loraplace.analysis.search import FORWARD_COST_HIGH, against_grid
from loraplace.analysis.stats import paired
from loraplace.store import Store


def unfinished_grid(counts: dict[str, int], compared: set[str], placements: tuple[str, ...]) -> str | None:
    """Why a grid's answer is not known yet (None: it is): a trial not done, or a placement not compared."""
    left = {status: n for status, n in counts.items() if status != "done" and n}
    if left:
        # not "of N": a tuned grid adds its other seeds' trials when its selection pass ends
        return f"unfinished: {counts.get('done', 0)} trials done, " + ", ".join(f"{n} {s}" for s, n in left.items())
    missing = [p for p in placements if p not in compared]
    return f"no placement compared for {', '.join(missing)}" if missing else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("search_store")
    parser.add_argument("grid_store")
    parser.add_argument("--task", help="also print the line in the replays' format, naming this task")
    args = parser.parse_args(argv)

    searched = analyze_store(args.search_store)
    search = searched.search
    if search is None or not search.finished:
        print(f"{args.search_store}: not a finished search", file=sys.stderr)
        return 2
    grid = analyze_store(args.grid_store)
    with Store.open_readonly(args.grid_store) as store:
        grid_records = store.trials(store.study().id)
    unfinished = unfinished_grid(grid.counts, {g.placement for g in grid.compared}, grid.info.placements)
    if unfinished:
        print(f"{args.grid_store}: {unfinished}: its answer is not known yet", file=sys.stderr)
        return 2

    answer = recommend_from_store(args.search_store)
    chosen = next(g for g in searched.compared if g.placement == answer.chosen.placement)
    grid_best = min((g for g in grid.compared if "eval_loss" in g.stats), key=lambda g: g.stats["eval_loss"].mean)
    test = paired(chosen.by_seed["eval_loss"], grid_best.by_seed["eval_loss"])
    assert test is not None and test.ci is not None

    print("## The answer against the grid's best arm (test split)\n")
    print("| | placement | LR | seeds | test eval loss |")
    print("|---|---|---:|---:|---:|")
    for what, g in (("search's answer", chosen), ("grid's best arm", grid_best)):
        s = g.stats["eval_loss"]
        lr = dict(g.key.axes).get("lr")
        print(f"| {what} | `{g.placement}` | {lr:g} | {s.n} | {s.mean:.4f} ± {s.ci_half or 0:.4f} |")
    print(f"\nΔ (answer − grid best), seed-paired over seeds {list(test.seeds)}: {test.mean_diff:+.4f} "
          f"[{test.ci[0]:+.4f}, {test.ci[1]:+.4f}], p = {test.p_value:.3g}\n")
    print(f"recommend: {answer.reason}\n")

    print("## Each finalist against the grid's trials of the same placement and LR\n")
    print("| finalist | LR | seeds | search: test loss | grid: test loss | Δ (search − grid), paired |")
    print("|---|---:|---:|---:|---:|---:|")
    by_key = {g.key: g for g in grid.groups}
    for g in searched.compared:
        twin = by_key.get(g.key)
        if twin is None:
            print(f"| `{g.placement}` | {dict(g.key.axes)['lr']:g} | {g.n} | {g.stats['eval_loss'].mean:.4f} | "
                  "not in the grid's seeds | — |")
            continue
        d = paired(g.by_seed["eval_loss"], twin.by_seed["eval_loss"])
        interval = f" [{d.ci[0]:+.4f}, {d.ci[1]:+.4f}]" if d is not None and d.ci is not None else ""
        print(f"| `{g.placement}` | {dict(g.key.axes)['lr']:g} | {len(d.seeds) if d else 0} | "
              f"{g.stats['eval_loss'].mean:.4f} | {twin.stats['eval_loss'].mean:.4f} | "
              f"{d.mean_diff:+.4f}{interval} |" if d is not None else "| — |")

    print("\n## Every candidate beside the grid's result for it\n")
    print(f"| candidate | search: cut at | its val loss there | grid: val loss at {search.total_steps} (first seed) "
          "| grid rank | grid: test loss (seeds) |")
    print("|---|---|---:|---:|---:|---:|")
    rows = against_grid(search, grid_records)
    for row in sorted(rows, key=lambda r: (r.grid_rank or 99)):
        cut = f"rung {row.cut_at + 1} ({search.rungs[row.cut_at].decision.steps} steps)" \
            if row.cut_at is not None else "finalist"
        print(f"| `{row.name.label}` | {cut} | {row.rung_loss:.4f} | "
              f"{row.grid_val_loss:.4f} | {row.grid_rank} | "
              f"{row.grid_test_mean:.4f} ({row.grid_seeds}) |")

    print("\n## Compute\n")
    for item in search.ledger:
        print(f"- {item.what}: {item.trained_examples:,} trained + {item.forward_examples:,} forward-only examples"
              f" = {item.steps(search.batch):.1f} step-equivalents ({item.seconds:.0f} s)")
    print(f"- total: {search.search_steps():.1f} step-equivalents; the grid: {search.grid_steps:,} steps "
          f"({search.grid_trials} trials); ratio {search.ratio():.3f} (forward at 1/2: "
          f"{search.ratio(FORWARD_COST_HIGH):.3f})")
    for row in search.kendall:
        later = "full horizon" if row.later_rung is None else f"rung {row.later_rung + 1}"
        print(f"- Kendall τ rung {row.rung + 1} vs {later}: "
              f"{'—' if row.tau is None else f'{row.tau:+.2f}'} over {row.candidates}")
    name = answer.chosen.placement
    print(f"\nsearch_steps={search.search_steps():.0f} grid_steps={search.grid_steps} ratio={search.ratio():.3f} "
          f"answer={name} delta_vs_grid_best={test.mean_diff:+.4f} ci_low={test.ci[0]:+.4f} "
          f"ci_high={test.ci[1]:+.4f}")
    if args.task:
        # The grid's answer as the replays read it (loraplace.analysis.replay): what `recommend` answers on the
        # grid — the best mean, or the smaller of two it cannot tell apart — not always the best mean.
        grid_answer = recommend_from_store(args.grid_store).chosen.placement
        answer_group = next(g for g in grid.compared if g.placement == grid_answer)
        vs = paired(chosen.by_seed["eval_loss"], answer_group.by_seed["eval_loss"])
        assert vs is not None
        low, high = vs.ci if vs.ci is not None else (vs.mean_diff, vs.mean_diff)
        print(f"task={args.task} search_steps={search.search_steps():.0f} grid_steps={search.grid_steps} "
              f"ratio={search.ratio():.3f} answer={name} grid_answer={grid_answer} "
              f"delta={vs.mean_diff:+.4f} ci_low={low:+.4f} ci_high={high:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
