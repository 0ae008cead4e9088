"""The documents speak of the project — dates, machines, commits — never of how the work on it was organised,
and the README stays a short entry point."""

from __future__ import annotations

import re

from helpers import ROOT

ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
            "fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|\\d+(st|nd|rd|th)")
# "session" in lower case is a period of work; the `Session` class (capitalised, or in backticks) is code.
NARRATION = [re.compile(r"(?<![`\w])sessions?\b"),
             re.compile(rf"(?i)\b({ORDINALS})[ -](session|round|sitting|work period)"),
             re.compile(r"(?i)\b(this|next|last|previous|earlier) (session|round|sitting)\b")]


def _documents():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))
    yield from sorted((ROOT / "benchmarks").rglob("*.md"))


def test_no_document_narrates_by_periods_of_work():
    found = []
    for path in _documents():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for pattern in NARRATION:
                match = pattern.search(line)
                if match:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not found, "say the date and machine instead:\n" + "\n".join(found)


def test_the_narration_check_can_fail():
    lines = ["Measured in the fourteenth session on an AVX2 CPU.", "The next session should rerun it.",
             "It ran over three sessions."]
    assert all(any(p.search(line) for p in NARRATION) for line in lines)
    assert not any(p.search("The `Session` holds the model; Session.plan resolves it.") for p in NARRATION)


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines()[0].startswith("make demo") and first_block.splitlines()[1].startswith("make test")
