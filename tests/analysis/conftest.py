"""A real (tiny) study store shared by the analysis tests: 3 placements × 2 seeds, one seed-1 trial failed."""

from pathlib import Path

import pytest

STUDY = """\
name: tiny-report
model: tiny:llama
data: {train: "builtin:arithmetic?n=60", eval_count: 8, max_len: 160}
train: {steps: 3, batch: 4, lr: 1.0e-3, precision: fp32}
placements:
  all: {preset: all}
  attn: {preset: attn}
  top: {preset: top-half}
ranks: [4]
seeds: [0, 1]
baseline: all
"""


@pytest.fixture(scope="session")
def study_store(tmp_path_factory) -> Path:
    from loraplace.study import load_study, run_study

    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLACE_CACHE", str(root / "cache"))
    try:
        spec_path = root / "study.yaml"
        spec_path.write_text(STUDY)
        summary = run_study(load_study(spec_path), root / "tiny.db")
        assert summary.done == 6
    finally:
        mp.undo()
    return root / "tiny.db"
