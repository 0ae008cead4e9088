"""Placement search (loraplace.search): the rung rule, the spec, and tiny searches end to end."""

from __future__ import annotations

import math
import types

import pytest

from helpers import tiny_study_yaml
from loraplace.analysis import analyze_store
from loraplace.analysis.recommend import recommend_from_store
from loraplace.errors import ConfigError
from loraplace.records import GroupKey, RungDecision, RungResult, Size
from loraplace.search import Candidate, Rung, SearchSpec, SearchState, decide, is_preset, run_rungs, rung_steps
from loraplace.store import Store, StoreError
from loraplace.study import load_study, run_study, search_candidates

SIZE = Size(kind="rank", value=2)


def candidate(key: str, placement: str, lr: float = 1e-3, preset: bool = False) -> Candidate:
    return Candidate(key, placement, lr, preset, GroupKey(placement=placement, size=SIZE, axes=(("lr", lr),)))


def done(key: str, loss: float, rung: int = 0, steps: int = 1) -> RungResult:
    return RungResult(candidate=key, rung=rung, steps=steps, status="done", val_loss=loss, trained_steps=steps)


# --------------------------------------------------------------------------------------------- the rule


# The computed ladder (rungs: null) with the other defaults search: {} had until 2026-12-07.
LADDER = SearchSpec(rungs=None, eta=3, finalists=2, screen_lrs=0, confirm=None, rung_examples=None)
# Plain successive halving to one finalist on every seed: no LR screening, no confirmation.
HALVING = SearchSpec(eta=2, finalists=1, screen_lrs=0, confirm=None)


def test_the_default_rungs_are_fractions_of_the_horizon():
    """search: {} is docs/replay.md's chosen policy (SearchSpec() == that policy is checked against the committed
    grids in tests/analysis/test_committed_studies.py); its rungs, fractions of the horizon, land on the replayed
    steps at the grids' 40 and scale to a longer run."""
    assert rung_steps(SearchSpec(), 20, 40, warmup=4) == [2, 8]
    assert rung_steps(SearchSpec(), 20, 160, warmup=16) == [8, 32]


def test_a_first_rung_floor_asks_for_the_computed_ladder():
    """min_steps / min_fraction place the computed ladder's first rung: without rungs they select it; beside given
    rungs (where they used to be ignored without a word) they are refused."""
    assert SearchSpec(min_fraction=0.2).rungs is None and SearchSpec(min_steps=4).rungs is None
    assert rung_steps(SearchSpec(min_steps=4), 20, 40, warmup=0)[0] == 4
    for given in ({"rungs": [2, 8], "min_steps": 4}, {"min_fraction": 0.2, "rungs": [0.1, 0.5]}):
        with pytest.raises(ValueError, match="computed ladder's first rung"):
            SearchSpec(**given)


def test_the_computed_ladder_halves_down_to_the_finalists_and_respects_the_floor():
    # 24 candidates, eta 3, 2 finalists: 24 → 8 → 3 → 2 needs 3 cuts at 40/27, 40/9, 40/3; the floor (warmup 4)
    # is above the first: the three rungs spread geometrically from 4 to 13 instead of merging.
    assert rung_steps(LADDER, 24, 40, warmup=4) == [4, 7, 13]
    assert rung_steps(LADDER, 24, 40, warmup=0) == [1, 4, 13]
    assert rung_steps(LADDER.model_copy(update={"eta": 4}), 24, 40, warmup=0) == [2, 10]
    assert rung_steps(SearchSpec(rungs=[3, 10]), 24, 40, warmup=4) == [3, 10]
    assert rung_steps(LADDER, 2, 10, warmup=0) == [3]  # already at the finalists: one rung picks them
    assert all(s < 40 for s in rung_steps(SearchSpec(min_steps=39, eta=3, finalists=2), 24, 40, warmup=0))


def test_rungs_given_as_fractions_of_the_horizon_scale_with_it():
    """One policy for any horizon: fractions round to the nearest step (half up), stay in [1, steps − 1] and merge
    when they round to the same step; the replayed policies' step counts on 40 steps are their fractions."""
    pasha = SearchSpec(rungs=[0.05, 0.1, 0.2, 0.325, 0.5])
    assert rung_steps(pasha, 20, 40, warmup=4) == [2, 4, 8, 13, 20]
    assert rung_steps(pasha, 20, 160, warmup=4) == [8, 16, 32, 52, 80]
    assert rung_steps(pasha, 20, 10, warmup=4) == [1, 2, 3, 5]  # 0.5 and 1.0 both give step 1: one rung
    assert rung_steps(SearchSpec(rungs=[0.9, 0.99]), 20, 4, warmup=0) == [3]  # below the horizon, merged
    assert rung_steps(SearchSpec(rungs=[4.0, 13.0]), 20, 40, warmup=4) == [4, 13]  # whole floats are step counts
    for bad, why in (([2, 0.5], "not both"), ([0.5, 0.2], "strictly increasing"), ([0.5, 1.5], "1.5 is neither"),
                     ([0.0, 0.5], "not both"), ([0], "greater than 0")):
        with pytest.raises(ValueError, match=why):
            SearchSpec(rungs=bad)


def test_many_candidates_are_cut_at_about_eta_at_every_rung():
    """100 candidates, 40 steps, warm-up 4: the rungs used to merge into [4, 13], so 100 → 34 → 2 (17× in one
    rung). Now four rungs from the floor cut by 3 each; rungs given as two still share the cut evenly."""
    from loraplace.search import keep_rate, rungs_of

    assert rung_steps(LADDER, 100, 40, warmup=4) == [4, 6, 9, 13]
    assert keep_rate(LADDER, 100, 4) == 3
    assert keep_rate(LADDER, 100, 2) == pytest.approx(50 ** 0.5)
    assert rung_steps(SearchSpec(min_fraction=0.25), 20, 40, warmup=4)[0] == 10
    cands = [candidate(f"c{i}", f"p{i // 2}", lr=(1e-3, 1e-2)[i % 2]) for i in range(100)]
    for spec in (LADDER, SearchSpec(rungs=[4, 13], eta=3, finalists=2, screen_lrs=0)):
        rungs = rungs_of(rung_steps(spec, len(cands), 40, warmup=4))

        def run(alive, rung):
            for c in alive:
                yield done(c.key, float(int(c.key[1:])), rung.index, rung.steps)

        decisions: list[RungDecision] = []
        run_rungs(cands, rungs, spec, SearchState.of([], []), run, lambda r: None, decisions.append)
        sizes = [len(cands)] + [len(d.kept) for d in decisions]
        rates = [a / b for a, b in zip(sizes[:-2], sizes[1:-1], strict=True)]  # the last rung picks finalists
        assert sizes[-1] == 2 and all(rate <= 7.1 for rate in rates), sizes
    assert sizes == [100, 15, 2]


def test_screening_lrs_keeps_every_placement_at_its_best_lr():
    cands = [candidate(f"{p}{i}", p, lr) for p in "ab" for i, lr in enumerate((1e-3, 1e-2, 3e-2))]
    losses = {"a0": 1.0, "a1": 0.9, "a2": 0.8, "b0": 2.0, "b1": 1.9, "b2": 2.5}
    results = {k: done(k, v) for k, v in losses.items()}
    plain = decide(Rung(0, 1, last=False), cands, results, eta=3, finalists=1)
    assert plain.kept == ("a2", "a1")  # both of a: b is gone
    screened = decide(Rung(0, 1, last=False), cands, results, eta=3, finalists=1, screen=True)
    assert screened.kept == ("a2", "b1")  # each placement's best LR


def test_a_rung_keeps_the_best_third_and_failed_candidates_rank_last():
    cands = [candidate(f"c{i}", f"p{i}") for i in range(6)]
    results = {"c0": done("c0", 3.0), "c1": done("c1", 1.0), "c2": done("c2", 2.0), "c3": done("c3", 0.5),
               "c4": RungResult(candidate="c4", rung=0, steps=1, status="failed", trained_steps=0,
                                failure={"kind": "non_finite", "message": "nan", "step": 1}),
               "c5": done("c5", math.nan)}
    d = decide(Rung(0, 1, last=False), cands, results, eta=3, finalists=2)
    assert d.ranked[:4] == ("c3", "c1", "c2", "c0") and set(d.ranked[4:]) == {"c4", "c5"}
    assert d.kept == ("c3", "c1") and d.anchored is None


def test_the_best_preset_is_never_cut():
    cands = [candidate("a", "auto"), candidate("b", "other"), candidate("c", "third"),
             candidate("p", "all", preset=True), candidate("q", "attn", preset=True)]
    results = {"a": done("a", 1.0), "b": done("b", 1.1), "c": done("c", 1.2), "p": done("p", 1.4),
               "q": done("q", 1.3)}
    d = decide(Rung(0, 1, last=False), cands, results, eta=3, finalists=2)
    assert d.kept == ("a", "q") and d.anchored == "q"  # q (best preset) takes b's place
    last = decide(Rung(1, 3, last=True), cands, results, eta=3, finalists=1)
    assert last.kept == ("a", "q") and last.anchored == "q"  # one finalist: the preset joins it


def test_the_last_rung_keeps_each_finalist_placement_at_its_best_lr():
    cands = [candidate("a1", "a", 1e-3), candidate("a2", "a", 1e-2), candidate("b1", "b", 1e-3),
             candidate("b2", "b", 1e-2, ), candidate("c1", "c", 1e-3)]
    results = {"a1": done("a1", 1.0), "a2": done("a2", 0.9), "b1": done("b1", 0.95), "b2": done("b2", 1.5),
               "c1": done("c1", 1.2)}
    d = decide(Rung(1, 3, last=True), cands, results, eta=3, finalists=2)
    assert d.kept == ("a2", "b1")


def test_ties_are_broken_by_spec_order_so_decisions_repeat():
    cands = [candidate(k, k) for k in "dcba"]
    results = {k: done(k, 1.0) for k in "abcd"}
    first = decide(Rung(0, 1, last=False), cands, results, eta=2, finalists=1)
    again = decide(Rung(0, 1, last=False), cands, dict(reversed(results.items())), eta=2, finalists=1)
    assert first == again and first.kept == ("d", "c")


def test_run_rungs_resumes_from_recorded_results_and_runs_only_the_rest():
    cands = [candidate(k, k) for k in "abcd"]
    rungs = [Rung(0, 1, False), Rung(1, 3, True)]
    losses = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    ran: list[tuple[str, int]] = []

    def run(alive, rung):
        for c in alive:
            ran.append((c.key, rung.index))
            yield done(c.key, losses[c.key] / (rung.index + 1), rung.index, rung.steps)

    recorded: list = []
    state = SearchState.of([done("a", 4.0), done("b", 3.0)], [])  # a kill after two results of rung 0
    finalists = run_rungs(cands, rungs, HALVING, state, run, recorded.append,
                          recorded.append)
    assert ran == [("c", 0), ("d", 0), ("d", 1), ("c", 1)] or ran == [("c", 0), ("d", 0), ("c", 1), ("d", 1)]
    assert [c.key for c in finalists] == ["d"]


def _failed(key: str, rung: int = 0, steps: int = 1) -> RungResult:
    return RungResult(candidate=key, rung=rung, steps=steps, status="failed", trained_steps=steps,
                      failure={"kind": "error", "message": "OutOfMemoryError: CUDA out of memory"})


@pytest.fixture
def search_store(tmp_path):
    from loraplace.records import StudyInfo

    store = Store(tmp_path / "s.db").__enter__()
    study = store.write_study(StudyInfo(name="x", model="m", placements=("a",), baseline="a", baseline_given=False),
                             {"name": "x"})
    yield store, study.id
    store.__exit__(None, None, None)


@pytest.mark.parametrize("retry_failed", [False, True])
def test_a_decided_rung_with_a_failed_candidate_is_not_run_again(search_store, retry_failed):
    """The bug: a candidate that failed (out of memory) at a decided rung was retrained on resume; when it then
    succeeded, the rung's recomputed decision differed from the recorded one and the store refused it, so the
    search could not go on. Now a decided rung runs nothing, with or without --retry-failed."""
    store, sid = search_store
    cands = [candidate(k, k) for k in "abcd"]
    rungs = [Rung(0, 1, False), Rung(1, 3, True)]
    spec = HALVING
    first = {"a": done("a", 3.0), "b": done("b", 2.0), "c": _failed("c"), "d": done("d", 1.0)}
    for r in first.values():
        store.record_rung(sid, r)
    store.record_decision(sid, decide(rungs[0], cands, first, eta=2, finalists=1))  # kept d, b; then killed
    ran, notes = [], []

    def run(alive, rung):  # c would now succeed and rank first
        for c in alive:
            ran.append((c.key, rung.index))
            yield done(c.key, 0.1 if c.key == "c" else 1.0 + rung.index, rung.index, rung.steps)

    state = SearchState.of(store.rung_results(sid), store.rung_decisions(sid))
    finalists = run_rungs(cands, rungs, spec, state, run, lambda r: store.record_rung(sid, r),
                          lambda d: store.record_decision(sid, d), retry_failed=retry_failed, note=notes.append)
    assert sorted(ran) == [("b", 1), ("d", 1)]  # rung 0 (decided) ran nothing, c stays cut
    assert [c.key for c in finalists] == ["b"] or [c.key for c in finalists] == ["d"]
    assert [d.kept for d in store.rung_decisions(sid)][0] == ("d", "b")
    assert bool(notes) == retry_failed and (not notes or "not retried" in notes[0])


def test_a_failed_candidate_of_an_undecided_rung_is_retried_only_when_asked(search_store):
    store, sid = search_store
    cands = [candidate(k, k) for k in "abcd"]
    rungs = [Rung(0, 1, False), Rung(1, 3, True)]
    spec = HALVING
    for r in (done("a", 3.0), done("b", 2.0), _failed("c")):  # killed before d ran and before the decision
        store.record_rung(sid, r)
    ran = []

    def run(alive, rung):
        for c in alive:
            ran.append((c.key, rung.index))
            yield done(c.key, 0.1 if c.key == "c" else 1.0 + rung.index, rung.index, rung.steps)

    state = SearchState.of(store.rung_results(sid), store.rung_decisions(sid))
    # Without --retry-failed: only d runs at rung 0; c, failed, ranks last and is cut (not retrained each resume).
    run_rungs(cands, rungs, spec, state, run, lambda r: store.record_rung(sid, r), lambda d: None)
    assert [k for k, rung in ran if rung == 0] == ["d"]
    # With it (a fresh look at the same store, nothing decided): c runs again, succeeds, replaces its failure.
    ran.clear()
    state = SearchState.of(store.rung_results(sid), [])
    finalists = run_rungs(cands, rungs, spec, state, run, lambda r: store.record_rung(sid, r),
                          lambda d: store.record_decision(sid, d), retry_failed=True)
    assert [k for k, rung in ran if rung == 0] == ["c"]
    assert {r.candidate: r.status for r in store.rung_results(sid) if r.rung == 0}["c"] == "done"
    assert store.rung_decisions(sid)[0].kept[0] == "c" and finalists[0].key == "c"


def test_a_decision_stored_before_last_existed_reads_as_the_same_decision():
    old = RungDecision.model_validate_json('{"rung": 1, "steps": 3, "ranked": ["a", "b"], "kept": ["a"]}')
    new = RungDecision(rung=1, steps=3, ranked=("a", "b"), kept=("a",), last=True)
    assert old.same_as(new) and new.same_as(old) and not old.last
    assert not new.same_as(new.model_copy(update={"last": False}))


def test_is_preset_means_a_bare_preset():
    from loraplace.placement.spec import PlacementSpec

    assert is_preset(PlacementSpec(preset="all")) and is_preset(PlacementSpec(preset="mlp.up"))
    assert not is_preset(PlacementSpec(roles=["all"]))
    assert not is_preset(PlacementSpec(preset="all", rank=4))
    assert not is_preset(PlacementSpec(preset="all", variant="dora"))


# --------------------------------------------------------------------------------------------- the spec


def search_yaml(name: str = "srch", *, placements: dict[str, str] | None = None, search: str = "{}",
                lrs: str = "[1.0e-4, 1.0e-2]", seeds=(0, 1), steps: int = 6, extra: str = "") -> str:
    text = tiny_study_yaml(name, placements=placements or {"all": "{preset: all}", "attn": "{preset: attn}",
                                                           "q": "{roles: [attn.q]}"},
                           steps=steps, seeds=list(seeds), n=80, baseline=None,
                           extra=f"tune: {{lr: {lrs}}}\nsearch: {search}\n" + extra)
    return text.replace("eval_count: 8,", "eval_count: 8, validation_count: 8,")


def test_search_spec_problems_are_reported_together(tmp_path):
    text = search_yaml(search="{eta: 1, rungs: [4, 2]}").replace("validation_count: 8, ", "")
    text = text.replace("ranks: [2]", "ranks: [2, 4]") + "axes: {batch: [2, 4]}\n"
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_study(tmp_path / "s.yaml")
    message = str(exc.value) + " ".join(exc.value.problems)
    for part in ("eta", "strictly increasing"):
        assert part in message
    (tmp_path / "t.yaml").write_text(search_yaml(search="{rungs: [2, 6]}").replace("validation_count: 8, ", ""))
    with pytest.raises(ConfigError) as exc:
        load_study(tmp_path / "t.yaml")
    problems = " ".join(exc.value.problems)
    assert "validation split" in problems and "below train.steps" in problems


def test_candidates_are_the_tuned_grids_own_first_seed_trials(tmp_path):
    from loraplace.study import expand_grid

    (tmp_path / "s.yaml").write_text(search_yaml())
    study = load_study(tmp_path / "s.yaml")
    grid = {p.id for p in expand_grid(study.model_copy(update={"search": None}))}
    candidates = search_candidates(study)
    assert len(candidates) == 6 and {p.id for p in candidates} <= grid
    assert {p.labels.seed for p in candidates} == {0}


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A search where one non-preset candidate is clearly best: every linear at the high LR, against two presets
    that adapt one projection each; the low LR barely moves anything in 8 steps."""
    root = tmp_path_factory.mktemp("planted")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLACE_CACHE", str(root / "cache"))
    try:
        (root / "s.yaml").write_text(search_yaml(
            "planted", placements={"q": "{preset: attn.q+attn.v}", "up": "{preset: mlp.up}",
                                   "wide": "{roles: [all]}"},
            lrs="[1.0e-5, 3.0e-2]", seeds=(0, 1, 2), steps=8,
            search="{eta: 3, finalists: 2, rungs: null, screen_lrs: 0, confirm: null}"))
        study = load_study(root / "s.yaml")
        summary = run_study(study, root / "s.db")
    finally:
        mp.undo()
    return root, study, summary


def test_a_planted_clearly_best_candidate_is_found_and_recommended(planted):
    root, study, summary = planted
    assert summary.failed == 0 and summary.rung_runs > 0
    analysis = analyze_store(root / "s.db")
    search = analysis.search
    assert search is not None and search.finished
    winner = [search.names[k] for k in search.finalists]
    assert ("wide", 3e-2) in [(n.placement, n.lr) for n in winner]
    assert any(n.preset for n in winner)  # the best preset is a finalist, always
    rec = recommend_from_store(str(root / "s.db"))
    assert rec.chosen.placement == "wide" and rec.distinguishable
    # Every cut candidate was cut at a rung before the full horizon; the finalists' seeds all ran.
    assert {t.seed for t in analysis.trials} == {0, 1, 2}
    assert len(analysis.trials) == 3 * len(search.finalists)


def test_a_rerun_of_a_finished_search_trains_nothing_and_decides_the_same(planted):
    root, study, _ = planted
    with Store.open_readonly(root / "s.db") as store:
        before = store.rung_decisions(store.study().id)
    summary = run_study(study, root / "s.db")
    assert summary.rung_runs == 0 and summary.ran == 0
    with Store.open_readonly(root / "s.db") as store:
        assert store.rung_decisions(store.study().id) == before


def test_a_search_stopped_by_its_timeout_between_rung_runs_continues_to_the_same_decisions(planted, tmp_path,
                                                                                            monkeypatch):
    """A timeout that passes after the first rung run (a clock that moves 100 s per result, timeout 50 s): no
    other rung run starts, the search is left unfinished, and the next run ends it with the decisions of the
    uninterrupted search."""
    import loraplace.study.run
    from loraplace.runner import RunHooks

    root, study, _ = planted
    clock = [0.0]
    monkeypatch.setattr(loraplace.study.run, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))

    def note(line: str) -> None:
        if " @ " in line:  # a rung run's result
            clock[0] += 100

    cut = run_study(study, tmp_path / "s.db", timeout_s=50, hooks=RunHooks(on_note=note))
    assert cut.timed_out and cut.rung_runs == 1 and cut.ran == 0
    assert not analyze_store(tmp_path / "s.db").search.finished
    rest = run_study(study, tmp_path / "s.db")
    assert not rest.timed_out and rest.rung_runs == planted[2].rung_runs - 1
    with Store.open_readonly(root / "s.db") as one, Store.open_readonly(tmp_path / "s.db") as two:
        assert two.rung_decisions(two.study().id) == one.rung_decisions(one.study().id)


def test_the_finalists_first_seed_continues_its_search_state_exactly(planted, tmp_path, monkeypatch):
    """The seed-0 finalist trained in pieces (rung by rung, then to the end) equals the same trial run straight
    through in a plain study: the search's rungs are prefixes of the grid's own trials."""
    root, study, _ = planted
    analysis = analyze_store(root / "s.db")
    key = next(k for k in analysis.search.finalists if analysis.search.names[k].placement == "wide")
    searched = next(t for t in analysis.trials if t.id == key)
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    plain = study.model_copy(update={"search": None, "tune": None, "seeds": [0],
                                     "placements": {"wide": study.placements["wide"]},
                                     "train": study.train.model_copy(update={"lr": 3e-2})})
    run_study(plain, tmp_path / "plain.db")
    with Store.open_readonly(tmp_path / "plain.db") as store:
        (straight,) = store.trials(store.study().id)
    assert straight.outcome.metrics.eval_loss == pytest.approx(searched.outcome.metrics.eval_loss, abs=1e-5)
    assert [p.loss for p in straight.outcome.curve] == pytest.approx([p.loss for p in searched.outcome.curve],
                                                                     abs=1e-5)


def test_the_report_and_ledger_of_a_search(planted, tmp_path):
    from loraplace.analysis.report import write_report

    root, study, _ = planted
    analysis = analyze_store(root / "s.db")
    search = analysis.search
    # The ledger counts every rung's training and eval, the finalists' remaining steps and their evals.
    trained = sum(i.trained_examples for i in search.ledger)
    with Store.open_readonly(root / "s.db") as store:
        results = store.rung_results(store.study().id)
    rung_trained = sum(r.trained_steps for r in results) * study.train.batch
    final_trained = sum((t.outcome.steps - max((r.steps for r in results if r.candidate == t.id), default=0))
                        for t in analysis.trials) * study.train.batch
    assert trained == rung_trained + final_trained
    assert search.grid_trials == 3 * 2 + 3 * 2 and search.grid_steps == 12 * 8
    assert 0 < search.ratio() < 1
    written = write_report(analysis, tmp_path / "rep", ["md", "html"])
    text = written["md"].read_text()
    for part in ("Search: rungs and decisions", "Search: compute against the full grid", "Kendall", "rungs.png"):
        assert part in text


def test_all_candidates_tied_answers_with_the_preset(tmp_path, monkeypatch):
    """Two placements that resolve to the same sites (one written as roles, listed first, one as a bare preset)
    train identically: a tie everywhere. The search must answer with the preset."""
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(search_yaml("tie", placements={"same": "{roles: [all]}", "all": "{preset: all}"},
                                                 lrs="[1.0e-3, 1.0e-2]", steps=4,
                                                 search="{eta: 2, rungs: null, screen_lrs: 0, confirm: null}"))
    run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db")
    analysis = analyze_store(tmp_path / "s.db")
    assert {analysis.search.names[k].placement for k in analysis.search.finalists} == {"same", "all"}
    rec = recommend_from_store(str(tmp_path / "s.db"))
    assert rec.chosen.placement == "all" and not rec.distinguishable
    assert "preset" in rec.reason


def test_a_different_decision_for_a_recorded_rung_is_refused(tmp_path):
    from loraplace.records import StudyInfo

    with Store(tmp_path / "s.db") as store:
        study = store.write_study(StudyInfo(name="x", model="m", placements=("a",), baseline="a",
                                           baseline_given=False), {"name": "x"})
        decision = RungDecision(rung=0, steps=1, ranked=("a", "b"), kept=("a",))
        store.record_decision(study.id, decision)
        store.record_decision(study.id, decision)  # the same again: a no-op
        with pytest.raises(StoreError, match="decided differently"):
            store.record_decision(study.id, decision.model_copy(update={"kept": ("b",)}))
        store.record_rung(study.id, done("a", 1.0))
        with pytest.raises(StoreError, match="already recorded"):
            store.record_rung(study.id, done("a", 2.0))
        assert [r.val_loss for r in store.rung_results(study.id)] == [1.0]


def test_fused_rungs_match_rungs_run_alone(tmp_path, monkeypatch):
    """execution.fuse: a rung's candidates trained in one pass over the base model decide like alone."""
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    losses = {}
    for fuse in ("off", "3"):
        (tmp_path / f"{fuse}.yaml").write_text(search_yaml(f"f{fuse}", steps=4, seeds=(0,),
                                                           extra=f"execution: {{fuse: {fuse}}}\n"))
        run_study(load_study(tmp_path / f"{fuse}.yaml"), tmp_path / f"{fuse}.db")
        with Store.open_readonly(tmp_path / f"{fuse}.db") as store:
            sid = store.study().id
            results = store.rung_results(sid)
            losses[fuse] = {(r.candidate, r.rung): r.val_loss for r in results}
            assert all(r.fused_with == (2 if fuse == "3" else 0) and not r.notes for r in results if r.rung == 0)
            decisions = [d.kept for d in store.rung_decisions(sid)]
        losses[fuse + "kept"] = decisions
    assert losses["offkept"] == losses["3kept"]
    assert losses["off"].keys() == losses["3"].keys()
    for key, value in losses["off"].items():
        assert losses["3"][key] == pytest.approx(value, abs=2e-4)


def test_a_search_refuses_extend(tmp_path, monkeypatch):
    """--extend adds seeds to a grid; a search decides its own trials, so it is refused before any store exists.
    (The search on Ray is allowed and tested against the local search in tests/test_ray_backend.py.)"""
    from loraplace.errors import LoraplaceError

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(search_yaml())
    study = load_study(tmp_path / "s.yaml")
    with pytest.raises(LoraplaceError, match="--extend"):
        run_study(study, tmp_path / "s.db", extend=True)
    assert not (tmp_path / "s.db").exists()


def test_each_candidate_beside_the_full_grid_and_the_finalists_are_the_grids_trials(planted, tmp_path, monkeypatch):
    """The full tuned grid of the same spec (LR selected on the first seed, as the search does): the search's
    finalists are its very trials (same ids, same losses), and every cut candidate is listed beside the grid's
    result for it, at the rung that cut it."""
    from loraplace.analysis.search import against_grid

    root, study, _ = planted
    monkeypatch.setenv("LORAPLACE_CACHE", str(root / "cache"))
    grid_spec = study.model_copy(update={"search": None, "tune": study.tune.model_copy(update={"seeds": [0]})})
    run_study(grid_spec, tmp_path / "grid.db")
    with Store.open_readonly(tmp_path / "grid.db") as store:
        grid = store.trials(store.study().id)
    analysis = analyze_store(root / "s.db")
    by_id = {t.id: t for t in grid}
    for trial in analysis.trials:
        if trial.id in by_id and by_id[trial.id].outcome is not None:
            assert trial.outcome.metrics.eval_loss == pytest.approx(by_id[trial.id].outcome.metrics.eval_loss,
                                                                    abs=1e-5)
    rows = against_grid(analysis.search, grid)
    assert len(rows) == 6 and all(r.grid_val_loss is not None for r in rows)
    assert sorted(r.grid_rank for r in rows) == list(range(1, 7))
    finalists = {analysis.search.names[k].label for k in analysis.search.finalists}
    assert {r.name.label for r in rows if r.cut_at is None} == finalists
    assert all(r.cut_at == 0 for r in rows if r.cut_at is not None)  # one rung here
    best = min(rows, key=lambda r: r.grid_val_loss)
    assert best.cut_at is None  # the grid's best first-seed candidate was not cut


def test_status_recommend_and_export_read_a_search_store(planted, cli, tmp_path):
    root, _, _ = planted
    status = cli("status", root / "s.db")
    assert status.returncode == 0, status.stderr
    assert "rung 1 at 3 steps: 6 in; finalists" in status.stdout and "cut:" in status.stdout
    assert "search compute so far" in status.stdout
    rec = cli("recommend", root / "s.db")
    assert rec.returncode == 0 and "recommended: wide" in rec.stdout
    out = tmp_path / "adapter_config.json"
    exported = cli("export-placement", "--from", root / "s.db", "--to", "peft", "--out", out)
    assert exported.returncode == 0, exported.stderr
    assert out.is_file()


def test_loraplace_run_of_a_search_shows_rungs_then_the_finalists_seeds(tmp_path, capsys, monkeypatch):
    """The command line's progress over a search: rung bars come and go before the study bar exists, and the
    study bar grows as the finalists' seeds join — it must look its own bar up by id, not by list position
    (``make demo`` stopped with an IndexError there)."""
    from helpers import run_cli_in_process

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(search_yaml(
        "cli", lrs="[1.0e-3, 3.0e-2]", seeds=(0, 1), steps=4,
        search="{eta: 3, finalists: 2, rungs: [1], screen_lrs: 0, confirm: null}").replace(
        "steps: 4,", "steps: 4, warmup: 2,"))
    done = run_cli_in_process("run", tmp_path / "s.yaml", "--store", tmp_path / "s.db", capsys=capsys)
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert "rung 1/" in shown and "finalists:" in shown
    # a rung before the warm-up ends is said to rank candidates that have not reached their LR
    assert "rung(s) at 1 steps are inside the warm-up (2 steps)" in shown
    with Store.open_readonly(tmp_path / "s.db") as store:
        trials = store.trials(store.study().id)
    assert sum(t.status == "done" for t in trials) == 4  # 2 finalists × 2 seeds


def test_a_finalist_at_an_edge_of_its_candidates_lrs_is_warned_about_as_in_a_grid(planted):
    """The search's answer was never said to sit at the top of its LRs (make demo's two finalists both did). A
    finalist's edge is its placement's candidate LRs, not the one LR it ran at the full horizon."""
    from loraplace.records import GroupKey
    from loraplace.tuning import Selection

    root, _, _ = planted
    analysis = analyze_store(root / "s.db")
    edge = [w for w in analysis.warnings if "at the edge of the LRs tried" in w]
    assert edge and all(f"{search.names[k].placement} " in edge[0] for search in [analysis.search]
                        for k in search.finalists)  # two LRs each: every finalist sits at an edge
    cell = GroupKey(placement="a", size=SIZE, axes=())
    assert not Selection(cell, 1e-2, {1e-2: 0.5}, (0,), grid=(1e-3, 1e-2, 3e-2)).at_edge
    assert Selection(cell, 3e-2, {3e-2: 0.5}, (0,), grid=(1e-3, 1e-2, 3e-2)).at_edge
    assert not Selection(cell, 3e-2, {3e-2: 0.5}, (0,)).at_edge  # one LR and no grid: nothing to be at the edge of


def test_pasha_stops_raising_the_rungs_once_the_finalists_stop_moving():
    """stop_when_stable: rung k ends the search when the previous rung would have picked the same finalists."""
    from loraplace.search import rungs_of

    cands = [candidate(f"{p}{i}", p, lr) for p in "abcd" for i, lr in enumerate((1e-3, 1e-2))]
    rungs = rungs_of([1, 2, 4, 8])
    spec = SearchSpec(eta=2, finalists=1, stop_when_stable=True)

    def runner(losses_at):
        ran = []

        def run(alive, rung):
            for c in alive:
                ran.append(rung.index)
                yield done(c.key, losses_at(c.key, rung.index), rung.index, rung.steps)
        return run, ran

    # a1 leads from the first rung on: rung 2 picks what rung 1 would have picked → it is the last
    stable, ran = runner(lambda key, r: (0.5 if key == "a1" else 1.0 + int(key[1]) + ord(key[0]) / 100))
    decisions: list[RungDecision] = []
    finalists = run_rungs(cands, rungs, spec, SearchState.of([], []), stable, lambda r: None, decisions.append)
    assert [c.key for c in finalists] == ["a1"]
    assert [d.last for d in decisions] == [False, True] and max(ran) == 1
    # the lead changes at every rung: the rungs go on to the last one
    moving, ran = runner(lambda key, r: (0.5 if key == "abcd"[r % 4] + "0" else 1.0 + ord(key[0]) / 100))
    decisions = []
    run_rungs(cands, rungs, SearchSpec(eta=2, finalists=1, stop_when_stable=True, screen_lrs=0),
              SearchState.of([], []), moving, lambda r: None, decisions.append)
    assert decisions[-1].last and len(decisions) > 2
    # a resumed search stops where the recorded last decision says, running nothing
    again: list[RungDecision] = []
    state = SearchState.of([], decisions)
    run_rungs(cands, rungs, spec, state, lambda alive, rung: iter(()), lambda r: None, again.append)
    assert again == []


def test_a_rung_whose_every_candidate_failed_is_an_error_and_stays_undecided(search_store):
    """It used to print an empty 'kept', run no trial and exit 0; then `recommend` said "run it first"."""
    from loraplace.search import SearchFailed

    store, sid = search_store
    cands = [candidate(k, k) for k in "ab"]
    rungs = [Rung(0, 1, False), Rung(1, 3, True)]

    def failing(alive, rung):
        for c in alive:
            yield _failed(c.key, rung.index, rung.steps)

    with pytest.raises(SearchFailed, match=r"every candidate failed at rung 1 \(1 steps\): OutOfMemoryError") as exc:
        run_rungs(cands, rungs, HALVING, SearchState.of([], []), failing,
                  lambda r: store.record_rung(sid, r), lambda d: store.record_decision(sid, d))
    assert "--retry-failed" in exc.value.hint
    assert store.rung_decisions(sid) == []  # undecided: a retry runs them again
    ran = []

    def fine(alive, rung):
        for c in alive:
            ran.append((c.key, rung.index))
            yield done(c.key, 1.0 if c.key == "a" else 2.0, rung.index, rung.steps)

    state = SearchState.of(store.rung_results(sid), store.rung_decisions(sid))
    finalists = run_rungs(cands, rungs, HALVING, state, fine,
                          lambda r: store.record_rung(sid, r), lambda d: store.record_decision(sid, d),
                          retry_failed=True)
    assert ("a", 0) in ran and ("b", 0) in ran and [c.key for c in finalists] == ["a"]


def test_a_rung_examples_above_the_validation_split_is_announced_as_what_the_rungs_read():
    from loraplace.search import describe, rungs_of

    cands = [candidate("a", "a"), candidate("b", "b")]
    assert "validation: all 12 examples (rung_examples 24 is more than the split holds)" in describe(
        cands, rungs_of([1]), SearchSpec(rung_examples=24), validation_size=12)
    assert "validation: the first 8 examples" in describe(cands, rungs_of([1]), SearchSpec(rung_examples=8), 12)
    assert "validation: all 12 examples" in describe(cands, rungs_of([1]), SearchSpec(), 12)


def test_the_announced_shape_counts_each_placement_s_own_lrs():
    """tune.lr per placement: 2 placements with 3 LRs each of 4 distinct LRs is not "2 placements × 4 LRs"."""
    from loraplace.search import describe, rungs_of

    same = [candidate(f"{p}{lr}", p, lr) for p in "ab" for lr in (1e-3, 1e-2)]
    assert "4 candidates (2 placements × 2 LRs)" in describe(same, rungs_of([1]), SearchSpec())
    own = [candidate(f"a{lr}", "a", lr) for lr in (1e-3, 3e-3, 1e-2)] + \
        [candidate(f"b{lr}", "b", lr) for lr in (3e-3, 1e-2, 3e-2)]
    assert "6 candidates (2 placements × their own 3 LRs)" in describe(own, rungs_of([1]), SearchSpec())
    uneven = own[:2] + own[3:]
    assert "5 candidates (2 placements × their own 2–3 LRs)" in describe(uneven, rungs_of([1]), SearchSpec())


def test_a_search_resumes_with_state_saving_or_tracking_added(planted, tmp_path, monkeypatch):
    """execution and tracking change no number: a killed search may gain state saving (it was refused as an
    edited spec). Any other change is still refused."""
    import shutil

    from loraplace.study import StudyChanged

    root, study, _ = planted
    shutil.copy(root / "s.db", tmp_path / "s.db")
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    saving = study.model_copy(update={"execution": study.execution.model_copy(update={"save_state_every": 0.0})})
    assert run_study(saving, tmp_path / "s.db").ran == 0
    other = study.model_copy(update={"train": study.train.model_copy(update={"warmup": 1})})
    with pytest.raises(StudyChanged, match="train.warmup"):
        run_study(other, tmp_path / "s.db")


def test_a_search_stored_under_the_old_defaults_says_how_to_resume_it(planted, tmp_path, monkeypatch):
    """search: {} changed meaning on 2026-12-07: a search stored with the defaults before then, run again with
    search: {}, is refused (its rungs were decided under the old policy) with the old values to write."""
    import json
    import shutil
    import sqlite3

    import yaml

    from loraplace.store.migrations import SEARCH_DEFAULTS_V4
    from loraplace.study import StudyChanged

    root, study, _ = planted
    shutil.copy(root / "s.db", tmp_path / "s.db")
    db = sqlite3.connect(tmp_path / "s.db")
    spec = json.loads(db.execute("SELECT spec_json FROM studies").fetchone()[0])
    db.execute("UPDATE studies SET spec_json = ?", (json.dumps(spec | {"search": SEARCH_DEFAULTS_V4}),))
    db.commit()
    db.close()
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(StudyChanged) as exc:
        run_study(study.model_copy(update={"search": SearchSpec()}), tmp_path / "s.db")
    assert "search.eta: 3 → 4" in str(exc.value)
    written = exc.value.hint.split("write search: ", 1)[1].split(" to resume it", 1)[0]
    assert SearchSpec.model_validate(yaml.safe_load(written)) == SearchSpec.model_validate(SEARCH_DEFAULTS_V4)
    shutil.copy(root / "s.db", tmp_path / "own.db")  # a search stored with values of its own: no word on defaults
    with pytest.raises(StudyChanged) as exc:
        run_study(study.model_copy(update={"search": SearchSpec()}), tmp_path / "own.db")
    assert "search.eta: 3 → 4" in str(exc.value) and "2026-12-07" not in exc.value.hint


def test_ctrl_c_during_a_search_s_rungs_says_the_rung_results_are_kept(tmp_path, capsys, monkeypatch):
    """It said "interrupted before any trial ran" after twelve rung results."""
    from helpers import run_cli_in_process
    from loraplace.runner import LocalExecutor

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    real = LocalExecutor.run_rung
    calls = []

    def interrupted_second(self, tasks):
        calls.append(len(tasks))
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from real(self, tasks)

    monkeypatch.setattr(LocalExecutor, "run_rung", interrupted_second)
    (tmp_path / "s.yaml").write_text(search_yaml("ctrlc", seeds=(0,), steps=4, search="{eta: 3}"))
    done = run_cli_in_process("run", tmp_path / "s.yaml", "--store", tmp_path / "s.db", capsys=capsys)
    assert done.returncode == 130
    assert "during the search's rungs: every rung result so far is kept" in done.stderr
    assert "before any trial ran" not in done.stderr


def test_a_second_runner_of_one_search_is_refused_before_it_trains(tmp_path, monkeypatch):
    """Two `loraplace run` processes on one search store both trained the same rung candidate; the second then
    exited with "already recorded". The lock is an advisory file lock: another process holds it here."""
    import subprocess
    import sys

    from loraplace.errors import LoraplaceError
    from loraplace.store import artifacts_dir

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(search_yaml("locked", seeds=(0,), steps=4))
    lock = artifacts_dir(tmp_path / "s.db") / "search" / "runner.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on elsewhere'); f.flush()\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LoraplaceError, match=r"another loraplace run is running this search \(pid 4242"):
            run_study(load_study(tmp_path / "s.yaml"), tmp_path / "s.db")
        with Store.open_readonly(tmp_path / "s.db") as store:
            assert store.rung_results(store.study().id) == []  # refused before any rung ran
    finally:
        holder.kill()
        holder.wait()
