"""The files beside a store: ``STORE_artifacts/<trial id>/`` holds a trial's adapter and metrics.json and, while
it is unfinished, its saved training state; the store points at them."""

from __future__ import annotations

from pathlib import Path

# A trial's saved training state while it is unfinished (execution.save_state_every), in its trial directory.
STATE_DIR = "state"


def artifacts_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.stem + "_artifacts")


def trial_dir(artifacts: Path, trial_id: str) -> Path:
    """Where a trial's adapter and metrics.json go (and, while it is unfinished, its saved state)."""
    return artifacts / trial_id
