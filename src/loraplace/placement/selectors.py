"""Layer selectors: which transformer blocks a role group is placed on.

Grammar (terms joined by ``,`` are a union; layer 0 is the block nearest the embeddings, "bottom")::

    all | even | odd | every:K | top:N | top:P% | bottom:N | bottom:P% | I | I-J

``top:8`` is the 8 blocks nearest the LM head; percentages round to the nearest block count (at least 1).
A YAML list of integers or of terms is accepted too.
"""

from __future__ import annotations

import re

LayerSelector = str | int | list[int | str]

_TERM_RE = re.compile(r"^(?:(?P<kw>all|even|odd)|every:(?P<every>\d+)|(?P<side>top|bottom):(?P<n>\d+)(?P<pct>%)?"
                      r"|(?P<lo>\d+)(?:-(?P<hi>\d+))?)$")


class SelectorError(ValueError):
    pass


def _count(n: str, pct: str | None, num_layers: int) -> int:
    value = int(n)
    if pct:
        if not 0 < value <= 100:
            raise SelectorError(f"percentage must be in 1..100, got {value}%")
        return max(1, round(num_layers * value / 100))
    return value


def _term(term: str, num_layers: int) -> list[int]:
    m = _TERM_RE.match(term)
    if not m:
        raise SelectorError(
            f"cannot parse layer selector term {term!r} "
            "(use all, even, odd, every:K, top:N, top:P%, bottom:N, bottom:P%, I or I-J)")
    if m["kw"] == "all":
        return list(range(num_layers))
    if m["kw"] == "even":
        return list(range(0, num_layers, 2))
    if m["kw"] == "odd":
        return list(range(1, num_layers, 2))
    if m["every"] is not None:
        step = int(m["every"])
        if step < 1:
            raise SelectorError("every:K needs K >= 1")
        return list(range(0, num_layers, step))
    if m["side"] is not None:
        count = _count(m["n"], m["pct"], num_layers)
        if count > num_layers:
            raise SelectorError(f"{term}: the model has only {num_layers} layers")
        if count < 1:
            raise SelectorError(f"{term} selects no layer")
        return list(range(num_layers - count, num_layers)) if m["side"] == "top" else list(range(count))
    lo = int(m["lo"])
    hi = int(m["hi"]) if m["hi"] is not None else lo
    if hi < lo:
        raise SelectorError(f"{term}: range end {hi} is below its start {lo}")
    if hi >= num_layers:
        raise SelectorError(f"{term}: layer {hi} does not exist (the model has layers 0-{num_layers - 1})")
    return list(range(lo, hi + 1))


def select_layers(selector: LayerSelector, num_layers: int) -> list[int]:
    """Resolve a selector to a sorted, duplicate-free list of layer indices; never empty."""
    if isinstance(selector, bool):
        raise SelectorError(f"layer selector must be a string, an int or a list, got {selector!r}")
    if isinstance(selector, int):
        terms: list[str] = [str(selector)]
    elif isinstance(selector, str):
        terms = [t.strip() for t in selector.split(",") if t.strip()]
    elif isinstance(selector, list):
        terms = [str(t).strip() for t in selector]
    else:
        raise SelectorError(f"layer selector must be a string, an int or a list, got {type(selector).__name__}")
    if any(t.startswith("-") for t in terms):
        raise SelectorError(f"negative layer index in {selector!r} (use top:N for the last N layers)")
    layers: set[int] = set()
    for term in terms:
        layers.update(_term(term, num_layers))
    if not layers:
        raise SelectorError(f"layer selector {selector!r} selects no layer")
    return sorted(layers)
