"""The training-curve figure's arithmetic: smoothing and the band drawn around the seeds' mean."""

import math

import pytest

from loraplace.analysis import analyze_store
from loraplace.analysis.figures import curves_figure, seed_band, trailing_mean
from loraplace.analysis.stats import summarize


def test_trailing_mean_averages_the_last_window_values():
    assert trailing_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert trailing_mean([1.0, 2.0, 6.0], 3) == [1.0, 1.5, 3.0]
    assert trailing_mean([3.0, 1.0, 2.0], 1) == [3.0, 1.0, 2.0]


def test_two_seeds_are_banded_by_their_range_not_a_one_degree_of_freedom_interval():
    """Two noisy seeds near 1: the t-interval (t = 12.7) would reach below 0; the band is what the seeds saw."""
    a, b = [1.0, 0.6, 1.2, 0.7], [0.8, 1.1, 0.5, 0.9]
    band = seed_band([a, b], window=1)
    assert band.kind == "range"
    pairs = list(zip(a, b, strict=True))
    assert band.low == [min(p) for p in pairs] and band.high == [max(p) for p in pairs]
    assert band.mean == pytest.approx([sum(p) / 2 for p in pairs])
    assert summarize([a[1], b[1]]).mean - summarize([a[1], b[1]]).ci_half < 0  # what the old band drew


def test_three_seeds_get_the_t_interval_of_the_smoothed_curves():
    curves = [[1.0, 0.8, 0.9], [1.2, 0.7, 0.8], [0.9, 0.9, 0.6]]
    band = seed_band(curves, window=2)
    smoothed = [trailing_mean(c, 2) for c in curves]
    for i in range(3):
        summary = summarize([c[i] for c in smoothed])
        assert (band.mean[i], band.low[i], band.high[i]) == pytest.approx(
            (summary.mean, summary.mean - summary.ci_half, summary.mean + summary.ci_half))
    assert band.kind == "t-interval"


def test_one_seed_has_no_band_and_a_diverged_step_is_a_gap():
    band = seed_band([[1.0, math.nan, 0.5]], window=1)
    assert band.kind == "none" and band.low[0] == band.high[0] == band.mean[0] == 1.0
    assert math.isnan(band.mean[1]) and band.mean[2] == 0.5
    smoothed = trailing_mean([1.0, math.nan, 3.0, 5.0], 2)  # the NaN spoils its window, not the rest of the curve
    assert smoothed[0] == 1.0 and math.isnan(smoothed[1]) and math.isnan(smoothed[2]) and smoothed[3] == 4.0


def test_the_figure_s_caption_says_how_it_was_smoothed_and_banded(study_store, tmp_path):
    figure = curves_figure(analyze_store(study_store), tmp_path)
    assert "Bands: the range of 2 seeds." in figure.caption
    assert figure.files["png"].stat().st_size > 1000
