from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the hub: a hub id must fail fast and clearly, not hang on a network timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import run_cli_in_process, tiny_study_yaml  # noqa: E402 - after the offline switches

if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs two workers on a 2-core machine: two intra-op threads each would oversubscribe the cores
    # (OpenMP threads spin while they wait), and the tests' tiny models gain nothing from a second thread.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Tokenised data goes to a per-test cache. Converted checkpoints (the builtin model, ~25 s to convert from its
    GGUF on a 2-core CPU) are shared with the user's cache through a link: converting them is atomic and
    deterministic, and a test that reads the builtin config must not pay the conversion again."""
    from loraplace.models import cache_dir

    shared_models = cache_dir() / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "models").symlink_to(shared_models, target_is_directory=True)
    monkeypatch.setenv("LORAPLACE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def write_study(tmp_path):
    """``write_study(**tiny_study_yaml kwargs)`` → path of the spec file in this test's tmp dir."""

    def write(filename: str = "study.yaml", **kwargs) -> Path:
        path = tmp_path / filename
        path.write_text(tiny_study_yaml(**kwargs))
        return path

    return write


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``loraplace ARGS`` in process: ``cli("plan", "tiny:llama")`` → CompletedProcess(returncode, stdout, …)."""
    monkeypatch.setenv("COLUMNS", "200")
    from loraplace.cli import common

    monkeypatch.setitem(common.STATE, "debug", False)  # --debug of an earlier call must not leak
    return lambda *args: run_cli_in_process(*args, capsys=capsys)
