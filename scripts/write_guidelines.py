"""docs/guidelines.md and its figure, from the committed study stores: `python scripts/write_guidelines.py`.

tests/analysis/test_committed_studies.py regenerates the text and compares it with the committed file, so a
guideline whose numbers no longer match the stores fails the suite. Add a store to STORES when its study is
finished (the replay grids of docs/replay.md as they land).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python scripts/write_guidelines.py"
# The studies built to compare placements at equal budget. docs/probe-validation (a synthetic arithmetic task,
# 10 steps, built to validate the probe at two other budgets) is left out: docs/probe.md reports it.
STORES = ["docs/validation/validation.db", "docs/validation-fp32/validation-fp32.db", "docs/horizon/horizon.db",
          "docs/qlora/qlora.db", "docs/replay/nl2bash/grid.db", "docs/replay/e2e/grid.db"]
DOC = ROOT / "docs" / "guidelines.md"
FIGURES = ROOT / "docs" / "guidelines"


def guidelines_text() -> str:
    from loraplace.analysis.compare import compare_stores
    from loraplace.analysis.guidelines import render_guidelines, write_guidelines

    os.chdir(ROOT)  # the stores by their paths in the repository, wherever it is checked out
    cross = compare_stores(STORES)
    return render_guidelines(cross, write_guidelines(cross), COMMAND, STORES)


def main() -> int:
    from loraplace.analysis.compare import compare_stores
    from loraplace.analysis.compare_report import write_compare_report

    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")  # the committed HTML carries no write time
    DOC.write_text(guidelines_text())
    write_compare_report(compare_stores(STORES), FIGURES, ["md", "html"])
    print(f"wrote {DOC.relative_to(ROOT)} and {FIGURES.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
