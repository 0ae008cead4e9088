"""Human-readable sizes, counts and durations, for every output (terminal, figures, reports)."""

from __future__ import annotations

import re


def human_bytes(n: float) -> str:
    """1536 → "1.5 KiB" (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_bytes(text: str, option: str = "size") -> int:
    """"24GiB", "24 GB", "512MiB", "2e9" → bytes (binary units for KiB/MiB/GiB/TiB, decimal for KB/MB/GB/TB).
    Anything that is not a positive size is refused (ValueError naming ``option``)."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12, "gb": 10**9, "mb": 10**6,
             "kb": 10**3, "b": 1}
    raw = text.strip().lower().replace(" ", "")
    scale = next((s for unit, s in units.items() if raw.endswith(unit)), 1)
    number = next((raw.removesuffix(unit) for unit in units if raw.endswith(unit)), raw)
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{option} {text!r} is not a size (e.g. 24GiB, 512MiB, 2e9)") from None
    if not value >= 1:  # also NaN
        raise ValueError(f"{option} {text!r}: a size must be positive")
    return int(value)


_DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?:in)?)?(?:(?P<s>\d+(?:\.\d+)?)s)?")


def parse_duration(text: str, option: str = "duration") -> float:
    """"5400", "90m", "1.5h", "1h30m", "45s", "2h 15m" → seconds. Anything that is not a positive duration is
    refused (ValueError naming ``option``)."""
    raw = text.strip().lower().replace(" ", "")
    try:
        seconds = float(raw)  # a bare number is seconds
    except ValueError:
        match = _DURATION.fullmatch(raw)
        if not raw or match is None:
            raise ValueError(f"{option} {text!r} is not a duration (e.g. 5400, 90m, 1.5h, 1h30m)") from None
        seconds = sum(float(match[unit] or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1)))
    if not seconds > 0:  # also NaN
        raise ValueError(f"{option} {text!r}: a duration must be positive")
    return seconds


def human_duration(seconds: float) -> str:
    """5400 → "1h30m", 90 → "1m30s", 12.3 → "12s"."""
    s = round(seconds)
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def human_count(n: float) -> str:
    """1_234_567 → "1.23M" (decimal units: parameters, tokens)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def one_line(text: str, limit: int = 240, hints: bool = True) -> str:
    """A multi-line message (``placement does not resolve:`` then ``  - reason`` lines) as one line that keeps
    the reasons: ``placement does not resolve: reason; reason``, cut at ``limit`` characters with an ellipsis.
    ``hints=False`` leaves out ``hint:`` lines (what to do, not what happened)."""
    lines = [line.strip().removeprefix("- ") for line in text.splitlines()
             if line.strip() and (hints or not line.strip().startswith("hint:"))]
    if not lines:
        return ""
    joined = lines[0] + "".join((" " if out.endswith(":") else "; ") + line
                                for out, line in zip(lines, lines[1:], strict=False))
    return joined if len(joined) <= limit else joined[:limit - 1] + "…"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 site``, ``2 sites`` (``many``: an irregular plural)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"

