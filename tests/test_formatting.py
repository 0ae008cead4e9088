"""Sizes and durations as users write them (loraplace.formatting)."""

import pytest

from loraplace.formatting import human_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [("5400", 5400), ("90m", 5400), ("1.5h", 5400), ("1h30m", 5400),
                                               ("2h 15m", 8100), ("45s", 45), ("10min", 600), ("1m30s", 90)])
def test_a_duration_is_seconds_or_hours_minutes_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "abc", "1d", "90 minutes", "m30"])
def test_what_is_not_a_duration_is_refused_with_examples(text):
    with pytest.raises(ValueError, match=r"--timeout .* is not a duration \(e\.g\. 5400, 90m"):
        parse_duration(text, "--timeout")


@pytest.mark.parametrize("text", ["0", "-5", "0m", "nan"])
def test_a_duration_must_be_positive(text):
    with pytest.raises(ValueError, match="must be positive"):
        parse_duration(text)


def test_a_duration_is_shown_in_its_two_largest_units():
    assert [human_duration(s) for s in (5400, 90, 12.3, 3600 * 26 + 61)] == ["1h30m", "1m30s", "12s", "26h01m"]
