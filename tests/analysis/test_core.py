"""Grouping, baseline comparison, Pareto and warnings: on hand-made records and on a real tiny study."""

import shutil

import pytest

from helpers import FIXTURES
from loraplace.analysis import analyze_records, analyze_store
from loraplace.records import (
    CurvePoint,
    Failure,
    GroupKey,
    Metrics,
    Site,
    SiteMap,
    Size,
    StudyInfo,
    TrialLabels,
    TrialOutcome,
)
from loraplace.store import StudyRecord, TrialRecord


def key(placement: str, rank: int = 8) -> GroupKey:
    return GroupKey(placement=placement, size=Size(kind="rank", value=rank))


def record(tid, placement, seed, status="done", rank=8, eval_loss=1.0, trainable_params=0, train_s=1.0,
           peak_mem_mb=100.0) -> TrialRecord:
    if status == "done":
        outcome = TrialOutcome(
            status="done", trainable_params=trainable_params, total_params=1_000_000,
            metrics=Metrics(eval_loss=eval_loss, perplexity=2.0, tokens_per_s=100.0, train_s=train_s,
                            peak_mem_mb=peak_mem_mb),
            curve=(CurvePoint(step=1, loss=2.0, tokens=10, lr=1e-3),),
            sites=SiteMap(num_layers=4, roles=("attn.q", "mlp.up"),
                          sites=tuple(Site(layer=layer, role="attn.q", rank=rank) for layer in range(4))))
    else:
        outcome = TrialOutcome.failed(Failure(kind="error", message="boom: CUDA out of memory"))
    return TrialRecord(tid, 1, 0, TrialLabels(group=key(placement, rank), seed=seed), {}, status, 1,
                       int(status == "done"), outcome.failure.message if outcome.failure else None, None, None, None,
                       None, None, None, outcome)


def study(placements=("all", "attn", "big"), baseline: str | None = "all") -> StudyRecord:
    info = StudyInfo(name="s", model="tiny:llama", placements=placements, baseline=baseline or placements[0],
                     baseline_given=baseline is not None)
    return StudyRecord(1, "s", {"name": "s"}, info, 0.0)


def records():
    return [
        record("a0", "all", 0, eval_loss=1.00, trainable_params=400, train_s=10.0, peak_mem_mb=100.0),
        record("a1", "all", 1, eval_loss=1.10, trainable_params=400, train_s=12.0, peak_mem_mb=100.0),
        record("b0", "attn", 0, eval_loss=1.20, trainable_params=100, train_s=5.0, peak_mem_mb=90.0),
        record("b1", "attn", 1, eval_loss=1.32, trainable_params=100, train_s=6.0, peak_mem_mb=90.0),
        record("c0", "big", 0, eval_loss=1.30, trainable_params=800, train_s=20.0, peak_mem_mb=120.0),
        record("c1", "big", 1, status="failed"),
    ]


def test_groups_comparisons_and_pareto():
    a = analyze_records(study(), "s.db", records(), {"done": 5, "failed": 1})
    by = {g.placement: g for g in a.groups}
    assert [by[p].n for p in ("all", "attn", "big")] == [2, 2, 1]
    assert by["all"].stats["eval_loss"].mean == pytest.approx(1.05)
    assert by["all"].is_baseline and not by["attn"].is_baseline
    c = by["attn"].comparison
    assert c.delta_loss.mean_diff == pytest.approx(((1.20 - 1.00) + (1.32 - 1.10)) / 2)
    assert c.delta_loss_pct == pytest.approx(100 * 0.21 / 1.05)
    assert c.params_saved_pct_of_baseline == pytest.approx(75.0)  # (400 − 100) / 400
    assert c.params_saved_pct_of_model == pytest.approx(0.03)  # 300 / 1,000,000
    assert c.speedup == pytest.approx(11.0 / 5.5)
    assert c.memory_ratio == pytest.approx(0.9)
    # big: more params and more loss than all → dominated; only seed 0 is paired
    assert by["big"].dominated_by == key("all")  # a typed key, not a string
    assert by["big"].comparison.delta_loss.n == 1
    assert by["big"].comparison.delta_loss.verdict() == "one seed: no test"
    assert [g.placement for g in a.frontier] == ["attn", "all"]


def test_warnings_name_the_problems():
    a = analyze_records(study(), "s.db", records(), {"done": 5, "failed": 1, "pending": 2})
    text = "\n".join(a.warnings)
    assert "one seed only for big r=8" in text
    assert "not budget-matched" in text and "100–800" in text
    assert "1 trial(s) failed" in text and "CUDA out of memory" in text
    assert "2 trial(s) not finished" in text


def test_no_baseline_in_spec_uses_first_placement_and_says_so():
    a = analyze_records(study(("attn", "all"), baseline=None), "s.db", records()[:4], {})
    assert a.baseline == "attn"
    assert [g.placement for g in a.groups if g.is_baseline] == ["attn"]
    assert any("no baseline set" in w for w in a.warnings)


def test_budget_matched_study_has_no_budget_warning():
    recs = [record(f"x{i}", p, s, eval_loss=1.0 + i / 10, trainable_params=1000 - i)
            for i, (p, s) in enumerate([("all", 0), ("all", 1), ("attn", 0), ("attn", 1)])]
    a = analyze_records(study(), "s.db", recs, {"done": 4})
    assert not any("budget-matched" in w for w in a.warnings)


def test_real_store(study_store):
    a = analyze_store(study_store)
    assert a.name == "tiny-report" and a.baseline == "all"
    assert sorted(g.placement for g in a.groups) == ["all", "attn", "top"]
    by = {g.placement: g for g in a.groups}
    assert all(g.n == 2 for g in a.groups)
    # Trainable params and site maps come from the real plans: top-half has half the layers of all.
    assert by["top"].trainable_params * 2 == by["all"].trainable_params
    assert by["top"].sites.layer_selective and not by["all"].sites.layer_selective
    assert by["top"].sites.layers == [1] and by["all"].sites.num_layers == 2
    assert by["attn"].comparison.delta_loss.n == 2
    assert all(g.stats["perplexity"].n == 2 for g in a.groups)


def test_a_v2_store_reports_identically_after_migration(tmp_path):
    """The committed v2 fixture (written by loraplace at schema v2) and the report that version wrote from it:
    read through the migration, the same data comes out byte for byte (the CSVs), and every line that version
    wrote in results.md is still there, in order (tables added since, e.g. "Budget fill", may come between)."""
    from loraplace.analysis.report import write_report

    path = tmp_path / "store_v2.db"
    shutil.copy(FIXTURES / "store_v2.db", path)
    expected = FIXTURES / "store_v2_report"
    written = write_report(analyze_store(path), tmp_path / "report", ["md", "csv"])  # read-only: in-memory migration
    now_text = written["md"].read_text().splitlines()
    lines = iter(now_text)
    # That version repeated a warning once per LR cell; a repeated warning line is now written once. And a warning
    # every placement shared, once per placement, is now one "every placement: …" line.
    shared = {line.removeprefix("- every placement: ") for line in now_text if line.startswith("- every placement: ")}
    seen: set[str] = set()
    old_lines = [line for line in (expected / "results.md").read_text().splitlines()
                 if not (line.startswith("- ") and (line in seen or seen.add(line)))
                 and not (line.startswith("- ") and line.partition(": ")[2] in shared)]
    assert shared, "the fixture's data warnings are shared by every placement"
    # A failed trial's reason is now whole (its hint line too): that version's line is the start of this one's.
    # The training-curves caption now says how the curves are smoothed and banded: the same figure, new words.
    missing = [line for line in old_lines if not any(
        line == now or (" trial(s) failed: " in line and now.startswith(line))
        or (line.startswith("*Training curves.* ") and now.startswith("*Training curves.* ")) for now in lines)]
    assert not missing, missing[:3]
    for name in ("summary.csv", "trials.csv"):
        assert (tmp_path / "report" / name).read_text() == (expected / name).read_text(), name


def test_accuracy_is_a_compared_metric(tmp_path):
    """Where generation ran, accuracy gets its own seed-paired test, verdict and frontier, and the report says
    which metric each verdict uses."""
    from loraplace.analysis.report import write_report
    from loraplace.analysis.tables import accuracy_table

    path = tmp_path / "store_v2.db"
    shutil.copy(FIXTURES / "store_v2.db", path)
    analysis = analyze_store(path)
    with_acc = [g for g in analysis.compared if "accuracy" in g.stats and not g.is_baseline and g.comparison]
    assert with_acc and all(g.comparison.delta_accuracy is not None for g in with_acc if g.n > 1)
    table = accuracy_table(analysis)
    assert table is not None and len(table.rows) == len([g for g in analysis.compared if "accuracy" in g.stats])
    md = write_report(analysis, tmp_path / "r", ["md"])["md"].read_text()
    assert "## Task accuracy compared (test split)" in md
    assert "verdict and Pareto here: on eval loss; task accuracy has its own paired test" in md


def test_a_warning_shared_by_cells_that_differ_only_in_another_axis_is_given_once():
    import dataclasses

    recs = []
    for lr in (1e-3, 3e-3):
        for i, (placement, params) in enumerate((("all", 100), ("attn", 800))):
            for seed in (0, 1):
                rec = record(f"{placement}{lr}{seed}", placement, seed, eval_loss=1.0 + i, trainable_params=params)
                group = GroupKey(placement=placement, size=Size(kind="rank", value=8), axes=(("lr", lr),))
                recs.append(dataclasses.replace(rec, labels=TrialLabels(group=group, seed=seed)))
    a = analyze_records(study(("all", "attn")), "s.db", recs, {"done": len(recs)})
    assert sum("not budget-matched" in w for w in a.warnings) == 1


def test_a_failed_trials_reason_is_kept_whole_in_the_warnings(tmp_path, monkeypatch, capsys):
    """`placement does not resolve:` then the reason on the next line: the summary, the table and the run's
    progress line keep the reason, not just the first line."""
    from helpers import run_cli_in_process, tiny_study_yaml
    from loraplace.analysis.tables import trial_table

    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(tiny_study_yaml("cut", steps=1, seeds=[0], size="budget: 1000"))
    done = run_cli_in_process("run", tmp_path / "s.yaml", "--store", tmp_path / "s.db", capsys=capsys)
    reason = "budget 1,000 is smaller than rank 1 allows"  # for all; attn fits and runs
    assert f"failed placement does not resolve: {reason}" in " ".join((done.stdout + done.stderr).split())
    analysis = analyze_store(tmp_path / "s.db")
    assert any(f"placement does not resolve: {reason}" in w for w in analysis.warnings)
    assert any(reason in row[-1] for row in trial_table(analysis).rows)


def test_a_swept_axis_is_compared_per_placement_against_its_first_value():
    """axes: {quantize: [none, nf4]}: each placement at nf4 against itself at none (the spec's — the grid's — first
    value, not the alphabetical one), seed-paired; the table says when the placements' order changes."""
    import dataclasses

    from loraplace.analysis.core import condition_label
    from loraplace.analysis.tables import axis_table, comparison_table

    loss = {("none", "all"): 1.00, ("none", "attn"): 1.10, ("nf4", "all"): 1.20, ("nf4", "attn"): 1.15}
    recs = []
    for quantize in ("none", "nf4"):  # grid order follows the spec's list
        for placement in ("all", "attn"):
            for seed in (0, 1, 2):
                rec = record(f"{quantize}{placement}{seed}", placement, seed, trainable_params=100,
                             eval_loss=loss[quantize, placement] + 0.01 * seed * (1 + (quantize == "nf4")))
                group = GroupKey(placement=placement, size=Size(kind="rank", value=8), axes=(("quantize", quantize),))
                recs.append(dataclasses.replace(rec, labels=TrialLabels(group=group, seed=seed)))
    a = analyze_records(study(("all", "attn")), "s.db", recs, {"done": len(recs)})
    effects = {e.group.placement: e for e in a.axis_effects}
    assert set(effects) == {"all", "attn"} and all(e.axis == "quantize" for e in effects.values())
    assert dict(effects["all"].reference.axes)["quantize"] == "none"
    assert effects["all"].delta_loss.mean_diff == pytest.approx(0.21)  # 0.20 + the seeds' extra 0.01·seed
    assert effects["attn"].delta_loss.seeds == (0, 1, 2) and effects["attn"].delta_loss.verdict() == "worse"
    table = axis_table(a)
    assert [row[:5] for row in table.rows] == [("quantize", "all", "r=8", "none", "nf4"),
                                               ("quantize", "attn", "r=8", "none", "nf4")]
    assert any("quantize=none: all < attn; quantize=nf4: attn < all. The order changes." in n for n in table.findings)
    # The frontier is per base: at equal size the fp32 `all` beats every nf4 arm, but a nf4 arm is dominated only
    # by a nf4 arm (one frontier across both would list `all quantize=none` alone).
    by = {g.key.label: g for g in a.groups}
    assert by["attn r=8 quantize=nf4"].dominated_by is None
    assert by["all r=8 quantize=nf4"].dominated_by == by["attn r=8 quantize=nf4"].key
    assert by["attn r=8 quantize=none"].dominated_by == by["all r=8 quantize=none"].key
    assert {condition_label(c): [g.placement for g in f] for c, f in a.frontiers.items()} == {
        "quantize=none": ["all"], "quantize=nf4": ["attn"]}
    assert any("each cost condition (quantize=none, quantize=nf4) has its own frontier" in n
               for n in comparison_table(a).notes)
    # Groups come in grid order (placements, then each axis in its first-shown order) whatever the store's row
    # order: stores written before 2026-12-03 listed a tuned study's later seeds among the first trials.
    mixed = analyze_records(study(("all", "attn")), "s.db", [recs[0], *reversed(recs[1:])], {"done": len(recs)})
    assert [g.key.label for g in mixed.groups] == ["all r=8 quantize=none", "all r=8 quantize=nf4",
                                                   "attn r=8 quantize=none", "attn r=8 quantize=nf4"]
    # Only axes that change the base or the compute split the frontier (an untuned lr sweep shares one: the v2
    # fixture's report, below); every such axis is a real sweepable field.
    from loraplace.analysis.core import COST_AXES
    from loraplace.study import AXIS_FIELDS

    assert set(AXIS_FIELDS) >= COST_AXES and "lr" not in COST_AXES
    # No swept axis: no effects, no table.
    assert analyze_records(study(), "s.db", records(), {"done": 5, "failed": 1}).axis_effects == ()


def test_every_pair_of_three_or_more_placements_is_compared_with_holm_adjusted_p_values():
    """The report's pair table: every pair in the cell, the lower mean first (Δ ≤ 0), seed-paired, p-values
    Holm-adjusted over the cell's pairs; the findings name the best placement and those not told from it."""
    from loraplace.analysis.stats import holm, paired
    from loraplace.analysis.tables import pairwise_table

    loss = {"all": [1.00, 1.10, 1.05], "attn": [1.20, 1.31, 1.24], "mlp": [1.01, 1.08, 1.07]}
    recs = [record(f"{p}{s}", p, s, eval_loss=v, trainable_params=100) for p, vs in loss.items()
            for s, v in enumerate(vs)]
    a = analyze_records(study(("all", "attn", "mlp")), "s.db", recs, {"done": 9})
    pairs = [(d.better.placement, d.other.placement) for d in a.pairwise]
    assert pairs == [("all", "mlp"), ("all", "attn"), ("mlp", "attn")]  # all: 1.050 < mlp: 1.053 < attn: 1.250
    by_seed = {p: dict(enumerate(vs)) for p, vs in loss.items()}
    raw = [paired(by_seed[b], by_seed[o]) for b, o in pairs]
    assert [d.delta_loss.mean_diff for d in a.pairwise] == pytest.approx([r.mean_diff for r in raw])
    assert all(d.delta_loss.mean_diff <= 0 for d in a.pairwise)
    assert [d.p_holm for d in a.pairwise] == pytest.approx(holm([r.p_value for r in raw]))
    table = pairwise_table(a)
    assert [row[:2] for row in table.rows] == pairs and table.columns[0] == "placement"
    assert [row[-1] for row in table.rows] == ["not distinguishable", "better", "better"]
    assert table.findings[-1].startswith("r=8: best by mean all; not distinguishable from it: mlp")
    # A placement with one seed in common is listed, but not as "not distinguishable": it has no test.
    lone = analyze_records(study(("all", "attn", "mlp", "big")), "s.db",
                           recs + [record("big0", "big", 0, eval_loss=1.30, trainable_params=100)], {"done": 10})
    assert pairwise_table(lone).findings[-1] == ("r=8: best by mean all; not distinguishable from it: mlp; "
                                                "one shared seed, no test: big.")
    # One seed everywhere: nothing was tested, so nothing is claimed (it used to say "distinguishably better").
    single = analyze_records(study(("all", "attn", "mlp")), "s.db", [r for r in recs if r.labels.seed == 0],
                             {"done": 3})
    assert pairwise_table(single).findings[-1] == "r=8: best by mean all; one shared seed, no test: mlp, attn."
    # Two placements: the baseline comparison is the pair — no table. Cells never mix: a second size has its own.
    assert analyze_records(study(("all", "attn")), "s.db", [r for r in recs if r.labels.group.placement != "mlp"],
                           {"done": 6}).pairwise == ()
    wide = recs + [record(f"{p}{s}w", p, s, rank=16, eval_loss=v - 0.1, trainable_params=200)
                   for p, vs in loss.items() for s, v in enumerate(vs)]
    a2 = analyze_records(study(("all", "attn", "mlp")), "s.db", wide, {"done": 18})
    assert len(a2.pairwise) == 6 and all(d.better.size == d.other.size for d in a2.pairwise)
    assert pairwise_table(a2).columns[0] == "cell"
