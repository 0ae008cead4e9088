"""Replaying a search policy on a stored grid (loraplace.analysis.replay): the same decisions as a live search."""

from __future__ import annotations

import pytest

from helpers import load_script, tiny_study_yaml
from loraplace.analysis.replay import replay, replay_store
from loraplace.errors import LoraplaceError
from loraplace.search import SearchSpec
from loraplace.store import Store
from loraplace.study import load_study, run_study

PLACEMENTS = {"all": "{preset: all}", "attn": "{preset: attn}", "q": "{roles: [attn.q]}"}
LRS = "[1.0e-3, 3.0e-2]"
POLICY = "{eta: 2, rungs: [2, 4], rung_examples: 5, finalists: 2}"
STAGED = "{eta: 2, rungs: [2], rung_examples: 5, finalists: 1, hedge: 2, confirm: 1}"


def grid_yaml(name: str, *, search: str | None = None) -> str:
    """A tiny tuned grid: 3 placements × 2 LRs, every (placement, LR) at every seed, recording the validation
    loss on the first 5 validation examples at steps 2 and 4 of 8; or, with ``search``, the same set-up searched."""
    extra = f"tune: {{lr: {LRS}{'' if search else ', seeds: [0, 1, 2]'}}}\n"
    extra += f"search: {search}\n" if search else ""
    text = tiny_study_yaml(name, placements=PLACEMENTS, steps=8, seeds=[0, 1, 2], n=80, baseline=None,
                           extra=extra)
    text = text.replace("eval_count: 8,", "eval_count: 8, validation_count: 10,")
    return text.replace("lr: 0.001, precision: fp32}", "lr: 0.001, precision: fp32}\n"
                        "eval: {at_steps: [2, 4], watch_examples: 5}")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLACE_CACHE", str(root / "cache"))
    try:
        (root / "grid.yaml").write_text(grid_yaml("grid"))
        run_study(load_study(root / "grid.yaml"), root / "grid.db")
        (root / "search.yaml").write_text(grid_yaml("live", search=POLICY))
        run_study(load_study(root / "search.yaml"), root / "search.db")
        (root / "staged.yaml").write_text(grid_yaml("staged", search=STAGED))
        run_study(load_study(root / "staged.yaml"), root / "staged.db")
    finally:
        mp.undo()
    return root


def test_the_replayed_decisions_are_the_live_search_s_exactly(stores):
    from loraplace.analysis import analyze_store
    from loraplace.analysis.recommend import recommend_from_store

    policy = SearchSpec.model_validate({"eta": 2, "rungs": [2, 4], "rung_examples": 5, "finalists": 2})
    replayed = replay_store(stores / "grid.db", policy)
    with Store.open_readonly(stores / "search.db") as store:
        live = store.rung_decisions(store.study().id)
        live_results = {(r.rung, r.candidate): r.val_loss for r in store.rung_results(store.study().id)}
    assert len(live) == 2
    assert [(d.rung, d.steps, d.ranked, d.kept, d.anchored, d.last) for d in replayed.decisions] == \
        [(d.rung, d.steps, d.ranked, d.kept, d.anchored, d.last) for d in live]
    # The values behind them: the live rung's model is the grid trial's model at that step.
    for summary in replayed.search.rungs:
        for key, result in summary.results.items():
            assert result.val_loss == pytest.approx(live_results[(summary.decision.rung, key)], abs=1e-5)
    # The answer, the ledger and the grid's steps are what the live search's analysis says.
    live_analysis = analyze_store(stores / "search.db")
    assert replayed.answer.chosen.placement == recommend_from_store(str(stores / "search.db")).chosen.placement
    assert replayed.search.finalists == live_analysis.search.finalists
    assert replayed.search.grid_steps == live_analysis.search.grid_steps == (3 * 2 + 3 * 2) * 8
    assert replayed.search.search_steps() == pytest.approx(live_analysis.search.search_steps(), rel=1e-9)
    assert replayed.ratio < 1


def test_a_hedge_bracket_and_confirmed_finalists_replay_as_they_run_live(stores):
    """The staged end: the finalist and two hedge candidates at the full horizon on the first seed, then the other
    seeds for the best one by validation. The replay runs the same trials and answers the same."""
    from loraplace.analysis import analyze_store
    from loraplace.analysis.recommend import recommend_from_store

    policy = SearchSpec.model_validate({"eta": 2, "rungs": [2], "rung_examples": 5, "finalists": 1, "hedge": 2,
                                        "confirm": 1})
    replayed = replay_store(stores / "grid.db", policy)
    with Store.open_readonly(stores / "staged.db") as store:
        live_trials = store.trials(store.study().id)
        live = store.rung_decisions(store.study().id)
    assert [(d.ranked, d.kept) for d in replayed.decisions] == [(d.ranked, d.kept) for d in live]
    assert replayed.trials == tuple(sorted(t.id for t in live_trials))
    seeds_of = {}
    for t in live_trials:
        seeds_of.setdefault(t.labels.group, set()).add(t.labels.seed)
    assert sorted(len(s) for s in seeds_of.values()) in ([1, 1, 3], [1, 3])  # one confirmed at every seed
    live_answer = recommend_from_store(str(stores / "staged.db"))
    assert (replayed.answer.chosen.placement, replayed.answer.chosen.lr) == (live_answer.chosen.placement,
                                                                            live_answer.chosen.lr)
    assert live_answer.chosen.seeds == 3  # the unconfirmed entrants are not compared
    staged = analyze_store(stores / "staged.db")
    assert replayed.search.search_steps() == pytest.approx(staged.search.search_steps())
    # ... and the report says why: not confirmed, by name, rather than "no LR selected yet" (a selection pass
    # that is unfinished or failed)
    confirmed = {t.labels.group.placement for t in live_trials if len(seeds_of[t.labels.group]) == 3}
    unconfirmed = sorted({t.labels.group.placement for t in live_trials} - confirmed)
    assert unconfirmed
    said = [w for w in staged.warnings if "not confirmed" in w]
    assert len(said) == 1 and all(f"finalist {p} " in said[0] or f", {p} " in said[0] for p in unconfirmed), said
    assert not any("no LR selected" in w for w in staged.warnings), staged.warnings


def test_the_regret_is_the_seed_paired_test_difference_of_the_two_answers(stores):
    from loraplace.analysis.stats import paired

    policy = SearchSpec.model_validate({"eta": 2, "rungs": [2, 4], "rung_examples": 5, "finalists": 3})
    replayed = replay_store(stores / "grid.db", policy)
    with Store.open_readonly(stores / "grid.db") as store:
        trials = store.trials(store.study().id)

    def test_losses(placement: str, lr: float) -> dict[int, float]:
        return {t.labels.seed: t.metrics.eval_loss for t in trials if t.labels.group.placement == placement
                and dict(t.labels.group.axes)["lr"] == pytest.approx(lr)}

    ours = test_losses(replayed.answer.chosen.placement, replayed.answer.chosen.lr)
    grid = test_losses(replayed.grid_answer.chosen.placement, replayed.grid_answer.chosen.lr)
    assert len(ours) == len(grid) == 3
    expected = paired(ours, grid)
    assert replayed.delta == pytest.approx(expected.mean_diff, abs=1e-12)
    if ours == grid:  # the same trials: no difference and no interval to speak of
        assert replayed.ci == (0.0, 0.0)
    else:
        assert replayed.ci == pytest.approx((expected.mean_diff - expected.ci_half,
                                             expected.mean_diff + expected.ci_half))
    line = replayed.line("tiny")
    assert line.startswith("task=tiny search_steps=") and f"grid_steps={(3 * 2 + 3 * 2) * 8}" in line


def test_each_seed_can_carry_the_rungs(stores):
    policy = SearchSpec.model_validate({"eta": 2, "rungs": [2, 4], "rung_examples": 5, "finalists": 2})
    by_seed = {seed: replay_store(stores / "grid.db", policy, rung_seed=seed) for seed in (0, 1, 2)}
    assert {r.seeds for r in by_seed.values()} == {(0, 1, 2)}
    # Other seeds, other trials: the candidates' keys differ from seed to seed.
    assert len({frozenset(r.decisions[0].ranked) for r in by_seed.values()}) == 3


def test_a_policy_the_grid_cannot_replay_is_refused_with_the_reason(stores):
    with pytest.raises(LoraplaceError, match="rung_examples"):
        replay_store(stores / "grid.db", SearchSpec.model_validate({"rungs": [2, 4], "rung_examples": 6}))
    with pytest.raises(LoraplaceError, match="not recorded") as exc:
        replay_store(stores / "grid.db", SearchSpec.model_validate({"rungs": [3], "rung_examples": 5}))
    assert "at recorded steps" in exc.value.hint
    with pytest.raises(LoraplaceError, match="rung seed 7"):
        replay_store(stores / "grid.db", SearchSpec.model_validate({"rungs": [2], "rung_examples": 5}), rung_seed=7)
    # a tuned grid's other seeds ran at the selected LR only: not "trials the grid has not finished"
    import dataclasses

    with Store.open_readonly(stores / "grid.db") as store:
        study, records = store.study(), store.trials(store.study().id)
    tuned = dataclasses.replace(study, spec=study.spec | {"tune": study.spec["tune"] | {"seeds": [0]}})
    with pytest.raises(LoraplaceError, match=r"rung seed 1 ran only at each placement's selected LR.*tune.seeds \(0\)"):
        replay(tuned, records, SearchSpec.model_validate({"rungs": [2], "rung_examples": 5}), rung_seed=1)
    assert _replay_policies().rung_seeds(tuned.spec) == [0]
    assert _replay_policies().rung_seeds(study.spec) == [0, 1, 2]
    # every problem at once, each saying what to give (it said "the policy's rungs all the (search.rung_examples)")
    with pytest.raises(LoraplaceError) as exc:
        replay_store(stores / "grid.db", SearchSpec.model_validate({"rungs": [2], "rung_examples": None}), rung_seed=7)
    assert ("its rung points read 5 validation examples but the policy's rungs read all of them (rung_examples: "
            "null): give the policy rung_examples: 5; rung seed 7 is not one of the grid's seeds") in str(exc.value)


def test_replay_search_option_names_a_spec_without_a_search_block(stores, tmp_path, capsys):
    """--search spec.yaml on a study spec with no search: listed its keys as unknown search settings; a text file
    was read as an inline block."""
    from helpers import run_cli_in_process, tiny_study_yaml

    (tmp_path / "spec.yaml").write_text(tiny_study_yaml("nosearch"))
    (tmp_path / "notes.txt").write_text("eta: 4\n")
    for given, said in ((tmp_path / "spec.yaml", "a study spec with no search: block"),
                        (tmp_path / "notes.txt", "a file, but not a .yaml, .yml or .json one")):
        done = run_cli_in_process("replay", stores / "grid.db", "--search", given, capsys=capsys)
        output = " ".join(done.stderr.split())
        assert done.returncode == 2 and f"--search {given}: {said}" in output, output


def test_loraplace_replay_prints_the_decisions_ledger_and_one_line_per_rung_seed(stores, capsys):
    from helpers import run_cli_in_process

    done = run_cli_in_process("replay", stores / "grid.db", "--search", POLICY, "--all-seeds", "--task", "tiny",
                              capsys=capsys)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("task=tiny ")]
    assert len(lines) == 3 and all("grid_steps=96" in line for line in lines)
    assert "rung 1 at 2 steps" in done.stdout and "search, total" in done.stdout
    (stores / "policy.yaml").write_text(f"search: {POLICY}\n")
    from_file = run_cli_in_process("replay", stores / "grid.db", "--search", stores / "policy.yaml", capsys=capsys)
    assert from_file.returncode == 0 and from_file.stdout.count("task=grid ") == 1
    bad = run_cli_in_process("replay", stores / "grid.db", "--search", "{eta: 1}", capsys=capsys)
    assert bad.returncode == 2 and "eta" in bad.stderr


def _replay_policies():
    return load_script("benchmarks/replay_policies.py")


def test_the_policies_replayed_are_the_ones_docs_replay_md_fixed():
    import re
    from pathlib import Path

    import yaml

    bench = _replay_policies()
    doc = (Path(__file__).resolve().parents[2] / "docs" / "replay.md").read_text()
    table = dict(re.findall(r"^\| \*\*(\w+)\*\* \| `(\{.*?\})`", doc, flags=re.M))
    assert set(table) == set(bench.POLICIES)
    for name, text in table.items():
        assert yaml.safe_load(text) == bench.POLICIES[name], name
        assert bench.policy_spec(name).rung_examples == bench.RUNG_EXAMPLES


def test_the_rule_that_chooses_the_default():
    from types import SimpleNamespace

    bench = _replay_policies()

    def rows(name, deltas, ratios, ci_lows):
        return [bench.Row(name, ("t1", "t2")[i % 2], i, SimpleNamespace(delta=d, ratio=r, ci=(lo, d + 0.01),
                                                        best_survived_first_rung=True))
                for i, (d, r, lo) in enumerate(zip(deltas, ratios, ci_lows, strict=True))]

    base = {name: rows(name, [0.01] * 2, [0.2] * 2, [-0.01] * 2) for name in bench.POLICIES}
    base["today"] = rows("today", [0.0, 0.0], [0.39, 0.39], [-0.01, -0.01])  # best Δ, over the ratio target
    base["diverse"] = rows("diverse", [0.003, 0.003], [0.24, 0.24], [-0.01, -0.01])
    base["hedge"] = rows("hedge", [0.002, 0.002], [0.25, 0.25], [-0.01, -0.01])  # a tie within 0.002 …
    base["pasha"] = rows("pasha", [-0.001, 0.0], [0.2, 0.2], [0.001, -0.01])  # best eligible Δ, but ci_low > 0 once
    chosen, summary = bench.choose([r for rs in base.values() for r in rs])
    assert chosen == "diverse"  # … goes to the smaller largest ratio
    assert not summary["today"]["ratio_ok"] and not summary["pasha"]["ci_ok"]
    # nobody meets (a): the smallest mean Δ among those under the ratio target
    for name in base:
        base[name] = [bench.Row(r.policy, r.task, r.seed, SimpleNamespace(**{**vars(r.result), "ci": (0.001, 0.1)}))
                      for r in base[name]]
    assert bench.choose([r for rs in base.values() for r in rs])[0] == "pasha"
    # replays of one task choose nothing: the rule reads both replay grids
    one_task = [bench.Row(r.policy, "t1", r.seed, r.result) for rs in base.values() for r in rs]
    assert bench.choose(one_task)[0] is None
    # a replay that could not run leaves the choice open
    assert bench.choose([bench.Row("today", "t", 0, None, "unfinished")])[0] is None


@pytest.mark.parametrize("name", ["today", "diverse", "pasha"])
def test_the_chosen_policy_is_written_as_the_search_of_the_task_s_grid(tmp_path, name):
    """--write-search: the live confirmation's spec is the grid's spec with the chosen policy as its search: the
    same study in every other field but the grid's recorded rung points, the policy exactly as replayed
    (rung_examples included)."""
    import shutil

    import yaml

    bench = _replay_policies()
    base = tmp_path / "gsm8k-grid.yaml"
    shutil.copy("examples/replay/gsm8k-grid.yaml", base)
    out = tmp_path / "gsm8k-search.yaml"
    bench.write_search_spec(name, base, out)
    grid, searched = yaml.safe_load(base.read_text()), yaml.safe_load(out.read_text())
    assert searched.pop("name") == "gsm8k-search" and grid.pop("name") == "gsm8k-grid"
    policy = searched.pop("search")
    assert grid.pop("eval") == {"at_steps": [2, 3, 4, 5, 8, 10, 13, 20, 27], "watch_examples": 24}
    assert searched == grid
    assert SearchSpec.model_validate(policy) == bench.policy_spec(name)  # under today's defaults, as replayed
    bench.write_search_spec(name, base, out)  # a rerun with the same choice keeps the file
    # ... spelled with fields today's default no longer needs (written when the defaults differed): the same policy
    written = out.read_text()
    out.write_text(written.replace("search: {", "search: {stop_when_stable: false, "))
    bench.write_search_spec(name, base, out)
    assert "stop_when_stable: false" in out.read_text()  # kept, not rewritten
    other = "floor" if name != "floor" else "today"
    with pytest.raises(SystemExit, match="already holds another search"):
        bench.write_search_spec(other, base, out)
    with pytest.raises(SystemExit, match="beside --base"):
        bench.write_search_spec(name, base, tmp_path / "elsewhere" / "s.yaml")
