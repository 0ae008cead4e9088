"""Grouping, baseline comparison, Pareto and warnings: on hand-made records and on a real tiny study."""

import pytest

from loraplace.analysis import analyze_records, analyze_store
from loraplace.store import TrialRecord


def record(tid, placement, seed, status="done", rank=8, **metrics):
    metrics = {"total_params": 1_000_000} | metrics
    return TrialRecord(tid, 1, 0, {"labels": {"placement": placement, "rank": rank, "seed": seed}, "trial": {}},
                       status, 1, int(status == "done"), "boom: CUDA out of memory" if status == "failed" else None,
                       None, None, None, None, None, None, metrics if status == "done" else {},
                       {"curve": [{"step": 1, "loss": 2.0, "tokens": 10}], "warnings": [],
                        "sites": {"num_layers": 4, "roles": ["attn.q", "mlp.up"],
                                  "sites": [[layer, "attn.q", rank] for layer in range(4)]}})


SPEC = {"model": "tiny:llama", "baseline": "all", "placements": {"all": {}, "attn": {}, "big": {}}}


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
    a = analyze_records("s", "s.db", SPEC, records(), {"done": 5, "failed": 1})
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
    assert by["big"].dominated_by == "all r=8"
    assert by["big"].comparison.delta_loss.n == 1
    assert by["big"].comparison.delta_loss.verdict() == "one seed: no test"
    assert [g.placement for g in a.frontier] == ["attn", "all"]


def test_warnings_name_the_problems():
    a = analyze_records("s", "s.db", SPEC, records(), {"done": 5, "failed": 1, "pending": 2})
    text = "\n".join(a.warnings)
    assert "one seed only for big r=8" in text
    assert "not budget-matched" in text and "100–800" in text
    assert "1 trial(s) failed" in text and "CUDA out of memory" in text
    assert "2 trial(s) not finished" in text


def test_no_baseline_in_spec_uses_first_placement_and_says_so():
    a = analyze_records("s", "s.db", {"model": "m", "placements": {"attn": {}, "all": {}}}, records()[:4], {})
    assert a.baseline == "attn"
    assert any("no baseline set" in w for w in a.warnings)


def test_budget_matched_study_has_no_budget_warning():
    recs = [record(f"x{i}", p, s, eval_loss=1.0 + i / 10, trainable_params=1000 - i)
            for i, (p, s) in enumerate([("all", 0), ("all", 1), ("attn", 0), ("attn", 1)])]
    a = analyze_records("s", "s.db", SPEC, recs, {"done": 4})
    assert not any("budget-matched" in w for w in a.warnings)


def test_real_store(study_store):
    a = analyze_store(study_store)
    assert a.name == "tiny-report" and a.baseline == "all"
    assert sorted(g.placement for g in a.groups) == ["all", "attn", "top"]
    by = {g.placement: g for g in a.groups}
    assert all(g.n == 2 for g in a.groups)
    # Trainable params and site maps come from the real plans: top-half has half the layers of all.
    assert by["top"].trainable_params * 2 == by["all"].trainable_params
    assert by["top"].layer_selective and not by["all"].layer_selective
    assert len(by["top"].layers) * 2 == by["all"].num_layers
    assert by["attn"].comparison.delta_loss.n == 2
    assert all(g.stats["perplexity"].n == 2 for g in a.groups)
