"""Studies: a YAML grid (placements × ranks|budgets × seeds × other axes) run into a crash-safe store.

Each trial's id is a hash of its fully resolved spec, so re-running a spec finds its finished trials and runs only
the rest. :func:`run_study` checks the spec, registers the grid in the store and hands it to the runner core
(:mod:`loraplace.runner`) with the executor of the chosen backend.

Layout: :mod:`~loraplace.study.spec` (the spec), :mod:`~loraplace.study.grid` (its trials and a search's
candidates), :mod:`~loraplace.study.resume` (what the store holds; edited-spec checks),
:mod:`~loraplace.study.checks` (pre-run checks), :mod:`~loraplace.study.run` (``run_study``) and
:mod:`~loraplace.study.search_run` (a search's rungs and finalists). The spec, grid and resume modules import no
torch; ``run_study`` (and what it needs) is imported when first asked for.
"""

from __future__ import annotations

from typing import Any

from loraplace.study.grid import candidates_of, expand_grid, search_candidates
from loraplace.study.resume import StudyChanged, spec_differences
from loraplace.study.spec import (
    AXIS_FIELDS,
    BACKENDS,
    DEFAULT_SAVE_STATE_EVERY_S,
    MAX_NAME_LEN,
    Axes,
    ExecutionSpec,
    Resources,
    StudySpec,
    default_store,
    load_study,
)
from loraplace.trial_spec import trial_id

__all__ = ["AXIS_FIELDS", "BACKENDS", "DEFAULT_SAVE_STATE_EVERY_S", "MAX_NAME_LEN", "Axes", "ExecutionSpec",
           "Resources", "StudyChanged", "StudySpec", "candidates_of", "check_inputs", "check_placements",
           "default_store", "expand_grid", "load_study", "run_study", "search_candidates", "spec_differences",
           "trial_id"]

_TRAINING = {"run_study": "loraplace.study.run", "check_placements": "loraplace.study.checks",
             "check_inputs": "loraplace.study.checks"}


def __getattr__(name: str) -> Any:
    """``run_study`` and the checks that load models import torch: only when asked for (PEP 562)."""
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module(_TRAINING[name]), name)
    raise AttributeError(f"module 'loraplace.study' has no attribute {name!r}")
