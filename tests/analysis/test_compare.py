"""loraplace compare: placements lined up across studies, on hand-made studies (every number checked by hand) and
through the command on a real tiny store."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from loraplace.analysis import analyze_records
from loraplace.analysis.compare import cross_study, pool
from loraplace.analysis.stats import paired
from loraplace.errors import LoraplaceError
from loraplace.records import CurvePoint, GroupKey, Metrics, Size, StudyInfo, TrialLabels, TrialOutcome
from loraplace.store import StudyRecord, TrialRecord

SPECS = {"all": {"preset": "all"}, "attn": {"preset": "attn"}, "mlp": {"preset": "mlp"},
         "nfn": {"auto": {"method": "nfn", "rank": 8}}}


def _trial(tid: str, placement: str, seed: int, loss: float, params: int = 1000) -> TrialRecord:
    outcome = TrialOutcome(status="done", trainable_params=params, total_params=100_000,
                           metrics=Metrics(eval_loss=loss, perplexity=math.exp(loss), train_s=1.0),
                           curve=(CurvePoint(step=1, loss=2.0, tokens=10, lr=1e-3),))
    labels = TrialLabels(group=GroupKey(placement=placement, size=Size(kind="budget", value=1000)), seed=seed)
    return TrialRecord(tid, 1, 0, labels, {}, "done", 1, 1, None, None, None, None, None, None, None, outcome)


def study(name: str, task: str, losses: dict[str, list[float]], *, baseline: str = "all", specs=None,
          params: dict[str, int] | None = None, ids: str | None = None):
    """A finished study: ``losses`` placement → test loss per seed (seeds 0, 1, …), on data/TASK/train.jsonl."""
    specs = specs or SPECS
    placements = tuple(losses)
    info = StudyInfo(name=name, model="tiny:llama", placements=placements, baseline=baseline, baseline_given=True)
    spec = {"name": name, "data": {"train": f"data/{task}/train.jsonl"}, "train": {"steps": 40},
            "placements": {p: specs[p] for p in placements}}
    records = [_trial(f"{ids or name}-{p}-{seed}", p, seed, loss, (params or {}).get(p, 1000))
               for p, values in losses.items() for seed, loss in enumerate(values)]
    return analyze_records(StudyRecord(1, name, spec, info, 0.0), f"{name}.db", records, {"done": len(records)})


def pct(candidate: list[float], baseline: list[float]):
    scale = 100.0 / (sum(baseline) / len(baseline))
    return paired({s: v * scale for s, v in enumerate(candidate)}, {s: v * scale for s, v in enumerate(baseline)})


A = {"all": [1.00, 1.10, 1.05], "attn": [1.04, 1.15, 1.08], "mlp": [0.98, 1.09, 1.04]}
B = {"all": [2.00, 2.20, 2.10], "attn": [2.10, 2.26, 2.19], "mlp": [1.97, 2.19, 2.05], "nfn": [2.0, 2.21, 2.1]}
C = {"all": [0.50, 0.52, 0.55], "attn": [0.51, 0.54, 0.56], "mlp": [0.49, 0.50, 0.55]}


def test_placements_match_by_name_with_their_own_baseline_delta_rank_and_tallies():
    cs = cross_study([study("a", "gsm8k", A), study("b", "nl2bash", B), study("c", "e2e", C)])
    assert [c.label for c in cs.columns] == ["a", "b", "c"] and cs.tasks == ("gsm8k", "nl2bash", "e2e")
    assert cs.placements[0] == "all" and set(cs.placements) == {"all", "attn", "mlp", "nfn"}  # baseline first
    attn_b = cs.entry("attn", 1)
    expected = pct(B["attn"], B["all"])
    assert attn_b.delta_pct.mean_diff == pytest.approx(expected.mean_diff)
    assert attn_b.delta_pct.ci == pytest.approx(expected.ci)
    assert attn_b.delta.mean_diff == pytest.approx(sum(B["attn"]) / 3 - sum(B["all"]) / 3)
    assert (attn_b.rank, attn_b.of) == (4, 4) and cs.entry("mlp", 1).rank == 1
    assert cs.entry("all", 0).is_baseline and cs.entry("all", 0).delta is None
    assert cs.entry("nfn", 0) is None  # not in study a
    # attn is worse than all in every study with an interval above 0: a loss on each of its three tasks
    summary = {s.placement: s for s in cs.summaries}
    attn = summary["attn"]
    verdicts = [cs.entry("attn", i).delta.verdict() for i in range(3)]
    assert attn.vs_baseline.losses == verdicts.count("worse") and attn.vs_baseline.ties == verdicts.count(
        "not distinguishable")
    assert attn.tasks == 3 and attn.tasks_worse == verdicts.count("worse")
    # pooled over three tasks: the mean of the tasks' Δ % with a t(2) interval over them
    ys = [pct(X["attn"], X["all"]).mean_diff for X in (A, B, C)]
    mean, sd = sum(ys) / 3, stats.tstd(ys)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert attn.pooled.interval == "tasks" and attn.pooled.k == 3 and attn.pooled.studies == 3
    assert (attn.pooled.estimate, attn.pooled.ci_low, attn.pooled.ci_high) == pytest.approx(
        (mean, mean - half, mean + half))
    # against the best other preset: attn's is mlp (lowest mean) in every column
    assert {cs.entry("attn", i).vs_preset for i in range(3)} == {"mlp"}
    assert cs.entry("mlp", 0).vs_preset == "all"  # mlp is itself the best preset: compared with the next one
    assert summary["all"].pooled is None and summary["all"].vs_baseline.text == "0/0/0"
    assert cs.summaries[0].placement == "mlp"  # best pooled estimate first
    assert not cs.notes


def test_studies_of_one_task_are_pooled_as_one_unit_the_hull_of_their_intervals():
    """Two studies on one task share its test split: no t interval across them, the hull of theirs."""
    cs = cross_study([study("a", "gsm8k", A), study("a-long", "gsm8k", C)])
    pooled = next(s for s in cs.summaries if s.placement == "attn").pooled
    one, two = pct(A["attn"], A["all"]), pct(C["attn"], C["all"])
    assert pooled.interval == "hull" and pooled.k == 1 and pooled.studies == 2
    assert pooled.estimate == pytest.approx((one.mean_diff + two.mean_diff) / 2)
    assert (pooled.ci_low, pooled.ci_high) == pytest.approx((min(one.ci[0], two.ci[0]), max(one.ci[1], two.ci[1])))


def test_one_study_only_is_that_study_s_comparison_and_says_so():
    cs = cross_study([study("a", "gsm8k", A)])
    attn = next(s for s in cs.summaries if s.placement == "attn")
    own = pct(A["attn"], A["all"])
    assert attn.pooled.interval == "one study" and (attn.pooled.ci_low, attn.pooled.ci_high) == pytest.approx(own.ci)
    assert any("one study only" in n for n in cs.notes)


def test_a_placement_that_differs_between_studies_and_a_changed_baseline_are_named():
    other = dict(SPECS, attn={"preset": "attn", "rank": 4}, all={"preset": "all", "layers": "0-3"})
    cs = cross_study([study("a", "gsm8k", A), study("b", "nl2bash", B, specs=other, params={"mlp": 1500})])
    notes = "\n".join(cs.notes)
    assert "placement 'attn' is not the same in every study: rank: (unset) (a) / 4 (b)" in notes
    assert "baseline 'all' is not the same in every study: layers: (unset) (a) / \"0-3\" (b)" in notes
    assert "placement 'mlp' at B=1,000 trains different parameter counts: a: 1,000, b: 1,500" in notes
    renamed = cross_study([study("a", "gsm8k", A), study("b", "nl2bash", B, baseline="mlp")])
    assert any("the studies' baselines differ (a: all; b: mlp)" in n for n in renamed.notes)


def test_a_study_without_its_baseline_gives_ranks_only():
    no_base = {k: v for k, v in B.items() if k != "all"}
    cs = cross_study([study("a", "gsm8k", A), study("b", "nl2bash", no_base)])
    assert any(n.startswith("b: its baseline 'all' has no finished trial here") for n in cs.notes)
    assert not cs.columns[1].has_baseline
    attn_b = cs.entry("attn", 1)
    assert attn_b.delta is None and attn_b.delta_pct is None and (attn_b.rank, attn_b.of) == (3, 3)
    attn = next(s for s in cs.summaries if s.placement == "attn")
    assert attn.tasks == 1 and attn.pooled.interval == "one study"  # b adds a rank, not a Δ


def test_nothing_comparable_is_refused():
    with pytest.raises(LoraplaceError, match="nothing to compare"):
        cross_study([study("a", "gsm8k", {"all": A["all"]}), study("b", "nl2bash", {"attn": B["attn"]})])
    with pytest.raises(LoraplaceError, match="nothing to compare"):
        cross_study([])


def test_trials_repeated_in_another_study_are_counted_once():
    """A study that took another's trials over (run --reuse-from: same trial ids) adds no second finding."""
    cs = cross_study([study("a", "gsm8k", A), study("a-again", "nl2bash", A, ids="a")])
    attn = next(s for s in cs.summaries if s.placement == "attn")
    assert attn.columns == 1 and attn.tasks == 1 and cs.entry("attn", 1).repeats == "a"
    assert any("a-again repeats trials measured in another column" in n for n in cs.notes)


def test_pool_refuses_nothing_and_gives_one_study_its_own_interval():
    with pytest.raises(ValueError):
        pool({})
    one = pct(A["attn"], A["all"])
    assert pool({"x": [one]}).ci_low == pytest.approx(one.ci[0])


def test_the_report_and_the_command(study_store, tmp_path, cli):
    """compare on a real store: the terminal table, and the report in every format (figure with its caption)."""
    done = cli("compare", str(study_store), "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    assert "Summary per placement" in done.stdout and "one study only" in done.stdout
    for name in ("compare.html", "compare.md", "compare.tex", "compare.csv", "compare_summary.csv",
                 "figures/compare.png", "figures/compare.pdf"):
        assert (tmp_path / "cmp" / name).is_file(), name
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| placement | tiny-report |" in md and "baseline ·" in md and "95% t-interval" in md
    tex = (tmp_path / "cmp" / "compare.tex").read_text()
    assert "\\caption{Placements across studies" in tex and "\\includegraphics" in tex
    again = cli("compare", str(study_store), str(study_store))
    assert again.returncode == 2 and "given twice" in again.stderr
    (tmp_path / "file").write_text("x")
    assert cli("compare", str(study_store), "--out", str(tmp_path / "file")).returncode == 2
