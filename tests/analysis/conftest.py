"""A real (tiny) study store shared by the analysis tests: 3 placements × 2 seeds."""

from pathlib import Path

import pytest

from helpers import tiny_study_yaml


@pytest.fixture(scope="session")
def study_store(tmp_path_factory) -> Path:
    from loraplace.study import load_study, run_study

    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLACE_CACHE", str(root / "cache"))
    try:
        spec_path = root / "study.yaml"
        spec_path.write_text(tiny_study_yaml(
            "tiny-report", placements={"all": "{preset: all}", "attn": "{preset: attn}", "top": "{preset: top-half}"},
            size="ranks: [4]"))
        summary = run_study(load_study(spec_path), root / "tiny.db")
        assert summary.done == 6
    finally:
        mp.undo()
    return root / "tiny.db"
