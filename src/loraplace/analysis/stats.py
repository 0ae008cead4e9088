"""Statistics over seeds: t-based confidence intervals, paired tests, Holm's adjustment, the Pareto frontier.

Pure functions over plain numbers, so each is checked against scipy by hand in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean over n seeds with the sample std (ddof=1) and a two-sided t confidence interval; n=1 has neither."""

    n: int
    mean: float
    std: float | None
    ci_half: float | None  # half-width: the interval is mean ± ci_half

    @property
    def ci(self) -> tuple[float, float] | None:
        return None if self.ci_half is None else (self.mean - self.ci_half, self.mean + self.ci_half)


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary | None:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    from scipy import stats as _scipy  # 2 s to import: only once an interval is computed

    t = float(_scipy.t.ppf(0.5 + confidence / 2, n - 1))
    return Summary(n, mean, std, t * std / math.sqrt(n))


@dataclass(frozen=True)
class Paired:
    """candidate − baseline over the seeds both have (same seed = same data order and init draw)."""

    n: int
    mean_diff: float
    ci_half: float | None
    p_value: float | None
    seeds: tuple[int, ...]

    @property
    def ci(self) -> tuple[float, float] | None:
        return None if self.ci_half is None else (self.mean_diff - self.ci_half, self.mean_diff + self.ci_half)

    def verdict(self, lower_is_better: bool = True) -> str:
        """"better"/"worse" only when the CI excludes zero; otherwise "not distinguishable"."""
        if self.n < 2 or self.ci is None:
            return "one seed: no test"
        low, high = self.ci
        if low <= 0.0 <= high:
            return "not distinguishable"
        improved = high < 0 if lower_is_better else low > 0
        return "better" if improved else "worse"


def paired(candidate: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE) -> Paired | None:
    """Paired t-test on seed-matched values (scipy.stats.ttest_rel); None when no seed is shared."""
    seeds = tuple(sorted(set(candidate) & set(baseline)))
    if not seeds:
        return None
    diffs = [candidate[s] - baseline[s] for s in seeds]
    summary = summarize(diffs, confidence)
    if summary.n < 2:
        return Paired(1, summary.mean, None, None, seeds)
    if summary.std <= 1e-12 * max(abs(summary.mean), 1e-12):
        # Every seed moved by exactly the same amount: the t statistic is undefined (0/0) or infinite.
        p_value = 1.0 if summary.mean == 0.0 else 0.0
    else:
        from scipy import stats as _scipy

        p_value = float(_scipy.ttest_rel([candidate[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return Paired(summary.n, summary.mean, summary.ci_half, p_value, seeds)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order: with the m values sorted ascending,
    adjusted_(i) = max over j ≤ i of min(1, (m − j + 1) · p_(j)). Controls the family-wise error rate of the m
    tests without assuming they are independent (the pairs of one study share arms)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int | None]:
    """For (cost, loss) points, both to minimise: None for a point on the frontier, else the index of a point
    that dominates it (no more cost and no more loss, strictly less of one)."""
    out: list[int | None] = []
    for i, (cost_i, loss_i) in enumerate(points):
        dominator = None
        for j, (cost_j, loss_j) in enumerate(points):
            dominates = j != i and cost_j <= cost_i and loss_j <= loss_i and (cost_j < cost_i or loss_j < loss_i)
            if dominates and (dominator is None or loss_j < points[dominator][1]):
                dominator = j
        out.append(dominator)
    return out
