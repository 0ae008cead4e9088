"""A real (tiny) study store shared by the analysis tests: 3 placements × 2 seeds."""

from pathlib import Path

import pytest

from helpers import run_study_once, tiny_study_yaml


@pytest.fixture(scope="session")
def study_store(tmp_path_factory) -> Path:
    return run_study_once(tmp_path_factory.mktemp("study"), tiny_study_yaml(
        "tiny-report", placements={"all": "{preset: all}", "attn": "{preset: attn}", "top": "{preset: top-half}"},
        size="ranks: [4]"), "tiny.db")
