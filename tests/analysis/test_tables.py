"""Table helpers that stand alone."""

import pytest

from loraplace.analysis.tables import quarter_means


def test_quarter_means_say_how_far_training_got():
    assert quarter_means([1.0] * 7) is None  # too short to split into quarters
    flat_end = [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]
    assert quarter_means(flat_end) == (4.0, 3.0, 2.0, 2.0)
    q1, _, q3, q4 = quarter_means([4.0 - 0.5 * i for i in range(8)])
    assert (q3 - q4) / (q1 - q4) == pytest.approx(1 / 3)  # a straight line: a third of the drop in the last quarter
