"""Replay every search policy of docs/replay.md on the stored grids and apply the rule that chooses the default.

    python benchmarks/replay_policies.py docs/replay/nl2bash/grid.db docs/replay/e2e/grid.db
    python benchmarks/replay_policies.py … --write-search examples/replay/gsm8k-search.yaml \
        --base examples/replay/gsm8k-grid.yaml

Prints the replay table (every policy × task × rung seed: ratio, answer, Δ with its 95 % interval, whether the
grid's validation-best candidate survived the first rung), the summary per policy, and the policy the rule picks.
No training: each replay reads the grids' recorded rung points (loraplace.analysis.replay). A grid that has not
finished what a replay needs is reported as such, not guessed. ``--write-search OUT --base SPEC``: once the rule
has chosen, write OUT, the study SPEC with the chosen policy as its ``search:`` (the live confirmation of
docs/replay.md; an OUT already there must hold the same policy). Exit 3 when asked to write and nothing is chosen.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# The policies, as fixed in docs/replay.md before any replay ("Rule that chooses the default"). Every one reads
# the grids' 24-example rung points. A field a policy leaves out takes its value from the SearchSpec defaults of
# the day the policies were fixed (store.migrations.SEARCH_DEFAULTS_V4), so that the replays do not move when
# `search: {}` does.
POLICIES: dict[str, dict] = {
    "today": {"rungs": [4, 13]},
    "floor": {"rungs": [8, 20], "eta": 5, "finalists": 1},
    "diverse": {"rungs": [2, 8], "screen_lrs": 1, "eta": 4, "finalists": 2, "confirm": 1},
    "hedge": {"rungs": [2, 8], "eta": 4, "finalists": 1, "hedge": 1, "confirm": 1},
    "pasha": {"rungs": [2, 4, 8, 13, 20], "eta": 2, "finalists": 1, "stop_when_stable": True},
}
RUNG_EXAMPLES = 24
RATIO_TARGET = 0.25
TIE = 0.002  # mean Δ within this: the smaller largest ratio wins
TASKS_FOR_CHOICE = 2  # nl2bash and e2e (GSM8K confirms the choice live, it takes no part in it)


@dataclass(frozen=True)
class Row:
    policy: str
    task: str
    seed: int
    result: object | None  # ReplayResult, or None when the grid cannot answer yet
    why: str = ""


def rung_seeds(spec: dict) -> list[int]:
    """The seeds a replay can put the rungs on: those every (placement, LR) ran on — every seed of the two replay
    grids, the tuned GSM8K grid's first seed only (its other seeds ran at each placement's selected LR)."""
    from loraplace.study import StudySpec

    study = StudySpec.model_validate({k: v for k, v in spec.items() if k != "versions"})
    return list(study.tune.seeds) if study.tune is not None and study.tune.seeds is not None else list(study.seeds)


def replay_all(stores: list[Path]) -> list[Row]:
    from loraplace.analysis.replay import replay_store
    from loraplace.errors import LoraplaceError
    from loraplace.store import Store

    rows = []
    for store in stores:
        with Store.open_readonly(store) as opened:
            study = opened.study()
        task = study.name.removesuffix("-grid")
        for name in POLICIES:
            policy = policy_spec(name)
            for seed in rung_seeds(study.spec):
                try:
                    rows.append(Row(name, task, seed, replay_store(store, policy, rung_seed=seed)))
                except LoraplaceError as exc:
                    rows.append(Row(name, task, seed, None, str(exc).split(":")[0]))
    return rows


def choose(rows: list[Row]) -> tuple[str | None, dict[str, dict]]:
    """The rule of docs/replay.md: over all replays, (a) ratio ≤ 0.25 and ci_low ≤ 0 in every one; among those
    (b) the smallest mean Δ, ties within 0.002 to the smaller largest ratio. None of (a): the smallest mean Δ
    among those with ratio ≤ 0.25 everywhere (the miss is said)."""
    summary: dict[str, dict] = {}
    for name in POLICIES:
        mine = [r.result for r in rows if r.policy == name]
        if not mine or any(r is None for r in mine):
            summary[name] = {"complete": False}
            continue
        summary[name] = {"complete": True, "mean_delta": sum(r.delta for r in mine) / len(mine),
                         "max_ratio": max(r.ratio for r in mine),
                         "ratio_ok": all(r.ratio <= RATIO_TARGET for r in mine),
                         "ci_ok": all(r.ci[0] <= 0 for r in mine),
                         "survived": sum(r.best_survived_first_rung for r in mine), "replays": len(mine)}
    complete = {k: v for k, v in summary.items() if v["complete"]}
    if len(complete) < len(POLICIES) or len({r.task for r in rows}) < TASKS_FOR_CHOICE:
        return None, summary  # the rule reads both replay grids: one task's replays choose nothing
    eligible = {k: v for k, v in complete.items() if v["ratio_ok"] and v["ci_ok"]} or \
        {k: v for k, v in complete.items() if v["ratio_ok"]}
    if not eligible:
        return None, summary
    best = min(v["mean_delta"] for v in eligible.values())
    near = {k: v for k, v in eligible.items() if v["mean_delta"] <= best + TIE}
    return min(near, key=lambda k: (near[k]["max_ratio"], list(POLICIES).index(k))), summary


def policy_spec(name: str):
    """The policy ``name`` as the SearchSpec it was replayed as."""
    from loraplace.search import SearchSpec
    from loraplace.store.migrations import SEARCH_DEFAULTS_V4

    return SearchSpec.model_validate(SEARCH_DEFAULTS_V4 | POLICIES[name] | {"rung_examples": RUNG_EXAMPLES})


def search_block(name: str) -> str:
    """The chosen policy as the one-line ``search:`` of a study spec (flow YAML, the form docs/replay.md gives): its
    own settings, plus any fixed default that today's ``search: {}`` no longer has (the same SearchSpec either way)."""
    import yaml

    from loraplace.search import SearchSpec
    from loraplace.store.migrations import SEARCH_DEFAULTS_V4

    today = SearchSpec().model_dump()
    settings = POLICIES[name] | {k: v for k, v in SEARCH_DEFAULTS_V4.items()
                                 if k not in POLICIES[name] and today[k] != v} | {"rung_examples": RUNG_EXAMPLES}
    return "search: " + yaml.safe_dump(settings, default_flow_style=True, sort_keys=False, width=1000).strip()


def write_search_spec(name: str, base: Path, out: Path) -> None:
    """``out``: the study ``base`` (the task's grid) with the chosen policy as its search, named ``*-search``, without
    the grid's recorded rung points (``eval.at_steps``: a replay's, not a search's). The
    data paths stay valid because ``out`` lives beside ``base``; an existing ``out`` is kept if it holds the same
    policy (a rerun), refused otherwise (the choice is made once)."""
    import yaml

    if out.resolve().parent != base.resolve().parent:
        raise SystemExit(f"--write-search {out}: write it beside --base {base} (its data paths are relative)")
    from loraplace.search import SearchSpec

    block = search_block(name)
    if out.exists():  # the same policy whichever fields spell it out (search_block's follow today's defaults)
        spec = yaml.safe_load(out.read_text())
        held, chosen = spec.get("search"), yaml.safe_load(block)["search"]
        if held is None or SearchSpec.model_validate(held) != SearchSpec.model_validate(chosen):
            raise SystemExit(f"{out} already holds another search: {held}; the choice is {block}")
        print(f"kept {out}: it holds the choice, {block}")
        return
    # The grid's `eval:` records the rung points for replays; a user's search has no use for them, and they would
    # cost its finalists evals a search does not make (the rungs read search.rung_examples on their own).
    body = [line for line in base.read_text().splitlines() if not line.startswith(("#", "eval:"))]
    grid_name = yaml.safe_load(base.read_text())["name"]
    body = [f"name: {grid_name.removesuffix('-grid')}-search" if line == f"name: {grid_name}" else line
            for line in body]
    header = [
        "# yaml-language-server: $schema=../../docs/study.schema.json",
        f"# The live confirmation of docs/replay.md: {base.name} searched with the default chosen by replay",
        f"# ({name}: written by benchmarks/replay_policies.py --write-search from the rule of docs/replay.md).",
        f"# Compared with its grid: python benchmarks/search_vs_grid.py SEARCH.db GRID.db --task "
        f"{grid_name.removesuffix('-grid')}",
    ]
    out.write_text("\n".join(header + body + [block]) + "\n")
    print(f"wrote {out}: {block}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--write-search", type=Path, metavar="OUT",
                        help="once a default is chosen, write OUT: --base with the chosen policy as its search")
    parser.add_argument("--base", type=Path, metavar="SPEC", help="the study --write-search starts from")
    args = parser.parse_args(argv)
    if (args.write_search is None) != (args.base is None):
        parser.error("--write-search and --base go together")
    rows = replay_all(args.stores)
    print("| policy | task | rung seed | ratio | answer | grid's answer | Δ test loss [95 % CI] | grid's val-best "
          "kept at rung 1 |")
    print("|---|---|---:|---:|---|---|---|---|")
    for row in rows:
        r = row.result
        if r is None:
            print(f"| {row.policy} | {row.task} | {row.seed} | — | not replayable yet: {row.why} | | | |")
            continue
        a, g = r.answer.chosen, r.grid_answer.chosen
        print(f"| {row.policy} | {row.task} | {row.seed} | {r.ratio:.3f} | {a.placement} {a.lr:g} | "
              f"{g.placement} {g.lr:g} | {r.delta:+.4f} [{r.ci[0]:+.4f}, {r.ci[1]:+.4f}] | "
              f"{'yes' if r.best_survived_first_rung else 'no'} ({r.grid_best}) |")
    chosen, summary = choose(rows)
    print("\n| policy | replays | mean Δ | largest ratio | ratio ≤ 0.25 in all | ci_low ≤ 0 in all | val-best kept |")
    print("|---|---:|---:|---:|---|---|---:|")
    for name, s in summary.items():
        if not s["complete"]:
            print(f"| {name} | incomplete | | | | | |")
            continue
        print(f"| {name} | {s['replays']} | {s['mean_delta']:+.4f} | {s['max_ratio']:.3f} | "
              f"{'yes' if s['ratio_ok'] else 'no'} | {'yes' if s['ci_ok'] else 'no'} | "
              f"{s['survived']}/{s['replays']} |")
    none = "none yet (replays incomplete, fewer than both replay grids, or none eligible)"
    met = chosen is not None and summary[chosen]["ratio_ok"] and summary[chosen]["ci_ok"]
    how = "" if chosen is None or met else (" — no policy met (a) (ratio ≤ 0.25 and ci_low ≤ 0 in every replay): "
                                            "the smallest mean Δ among those with ratio ≤ 0.25 in every replay")
    print(f"\nchosen default: {chosen if chosen is not None else none}{how}")
    for row in rows:
        if row.result is not None and row.seed == 0:
            print(row.result.line(row.task) + f" policy={row.policy}")
    if args.write_search is not None:
        if chosen is None:
            print(f"--write-search: nothing written to {args.write_search}: no default is chosen yet", file=sys.stderr)
            return 3
        write_search_spec(chosen, args.base, args.write_search)
    return 0 if not any(math.isnan(r.result.delta) for r in rows if r.result is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
