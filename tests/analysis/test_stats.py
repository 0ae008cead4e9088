"""Statistics checked against scipy and against numbers worked out by hand."""

import math

import pytest
from scipy import stats

from loraplace.analysis.stats import holm, paired, pareto_front, summarize


@pytest.mark.parametrize("values", [[1.0, 2.0], [0.41, 0.45, 0.43], [3.2, 3.1, 3.5, 2.9, 3.3]])
def test_summary_matches_scipy_t_interval(values):
    s = summarize(values)
    mean = sum(values) / len(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert s.n == len(values)
    assert s.mean == pytest.approx(mean)
    assert s.std == pytest.approx(stats.tstd(values))
    assert s.ci == pytest.approx((low, high))


def test_summary_by_hand():
    # [1, 2, 3]: mean 2, std 1, sem 1/√3, t(0.975, 2) = 4.302653 → half-width 2.484138
    s = summarize([1, 2, 3])
    assert (s.mean, s.std) == (2.0, 1.0)
    assert s.ci_half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_one_seed_has_no_interval_and_bad_values_are_dropped():
    s = summarize([0.5, float("nan"), None])
    assert (s.n, s.mean, s.std, s.ci_half, s.ci) == (1, 0.5, None, None, None)
    assert summarize([]) is None


def test_paired_matches_scipy_ttest_rel():
    cand = {0: 1.10, 1: 1.32, 2: 1.05, 3: 1.21}
    base = {0: 1.00, 1: 1.30, 2: 0.98, 3: 1.12, 9: 5.0}  # seed 9 has no partner: left out
    p = paired(cand, base)
    a, b = [cand[s] for s in range(4)], [base[s] for s in range(4)]
    ref = stats.ttest_rel(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    assert p.seeds == (0, 1, 2, 3)
    assert p.mean_diff == pytest.approx(sum(diffs) / 4)
    assert p.p_value == pytest.approx(ref.pvalue)
    assert p.ci == pytest.approx(stats.t.interval(0.95, 3, loc=sum(diffs) / 4, scale=stats.sem(diffs)))
    assert p.verdict() == "worse"  # all four seeds lose: CI above zero
    assert p.verdict(lower_is_better=False) == "better"


def test_paired_verdicts():
    assert paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.4}).verdict() == "not distinguishable"
    assert paired({0: 1.0, 1: 1.1, 2: 0.9}, {0: 1.2, 1: 1.3, 2: 1.1}).verdict() == "better"
    assert paired({0: 1.0}, {0: 2.0}).verdict() == "one seed: no test"
    assert paired({0: 1.0}, {1: 2.0}) is None
    same = paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})  # identical differences: t is infinite
    assert (same.p_value, same.ci_half) == (0.0, 0.0)
    assert paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p_value == 1.0


def test_pareto_front_by_hand():
    points = [(100, 0.50), (200, 0.40), (150, 0.55), (300, 0.40), (50, 0.90), (200, 0.40)]
    dom = pareto_front(points)
    assert dom[0] is None and dom[4] is None  # cheapest and the best loss for its cost
    assert dom[2] == 0  # more params and more loss than point 0
    assert dom[3] in (1, 5)  # same loss with fewer params
    assert dom[1] is None and dom[5] is None  # exact ties do not dominate each other


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 (m=4): 4·0.01=0.04, 3·0.02=0.06, 2·0.04=0.08, 1·0.30=0.30 — in input order
    assert holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    # monotone: a later, larger raw p never gets a smaller adjusted one; capped at 1
    assert holm([0.02, 0.021, 0.5]) == pytest.approx([0.06, 0.06, 0.5])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
