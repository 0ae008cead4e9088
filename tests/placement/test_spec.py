"""PlacementSpec validation: every problem at once, cross-field ones included."""

import pytest


def test_cross_field_problems_are_reported_with_type_errors():
    from loraplace.errors import ConfigError
    from loraplace.placement import parse_placement

    with pytest.raises(ConfigError) as info:
        parse_placement({"roles": ["attn"], "preset": "all", "rank": "big", "ranks": {"attn": -1}})
    text = str(info.value)
    assert "exactly one of" in text and "rank" in text and "ranks must be positive" in text
    assert "3 problems" in text
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_placement({"rank": 4})
    with pytest.raises(ConfigError, match="layers applies to roles"):
        parse_placement({"preset": "all", "layers": "0-3"})
    with pytest.raises(ConfigError, match="rank and budget are exclusive"):
        parse_placement({"roles": ["attn"], "rank": 4, "budget": 1000})
