import pytest

from loraplace.placement.selectors import SelectorError, select_layers


@pytest.mark.parametrize(
    ("selector", "n", "expected"),
    [
        ("all", 4, [0, 1, 2, 3]),
        ("0-2", 6, [0, 1, 2]),
        ("0,3,5", 6, [0, 3, 5]),
        (3, 6, [3]),
        ([1, 4], 6, [1, 4]),
        ("top:2", 6, [4, 5]),
        ("bottom:2", 6, [0, 1]),
        ("top:50%", 30, list(range(15, 30))),
        ("bottom:50%", 30, list(range(15))),
        ("top:10%", 4, [3]),  # rounds to at least one layer
        ("even", 5, [0, 2, 4]),
        ("odd", 5, [1, 3]),
        ("every:3", 10, [0, 3, 6, 9]),
        ("bottom:2,top:1", 6, [0, 1, 5]),
        ("0-1, 1-2", 6, [0, 1, 2]),
    ],
)
def test_selectors(selector, n, expected):
    assert select_layers(selector, n) == expected


@pytest.mark.parametrize(
    ("selector", "n", "message"),
    [
        ("top:9", 8, "only 8 layers"),
        ("7", 4, "does not exist"),
        ("3-1", 4, "below its start"),
        ("middle", 4, "cannot parse"),
        ("every:0", 4, "K >= 1"),
        ("top:0", 4, "selects no layer"),
        ("top:150%", 4, "percentage"),
        ("", 4, "selects no layer"),
        ("-1", 4, "negative"),
        ([], 4, "selects no layer"),
    ],
)
def test_selector_errors(selector, n, message):
    with pytest.raises(SelectorError, match=message):
        select_layers(selector, n)
