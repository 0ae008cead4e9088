"""What a trial is, without torch: its spec (:class:`TrialSpec`, :class:`EvalSpec`), its id (the hash of the
resolved spec: a study resumes by it), a study grid's planned trial, and the library versions a result was
computed with. Read commands (status, recommend, export, report) import this, never the training code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, PositiveInt, ValidationInfo, field_validator

from loraplace.data import DataSpec
from loraplace.placement.spec import DEFAULT_FILL, Fill, PlacementSpec
from loraplace.records import TrialLabels
from loraplace.specs import StrictModel
from loraplace.train_config import TrainSpec


class EvalSpec(StrictModel):
    """How a trial is evaluated: at the end on the validation and test splits; during training (``every``,
    ``at_steps``) on the watched split — validation when there is one, else test — or its first ``watch_examples``."""

    batch: int = Field(default=16, gt=0, description="examples per evaluation forward")
    generate: int = Field(default=0, ge=0, description="greedy-generate N eval examples for task accuracy")
    max_new_tokens: int = Field(default=256, gt=0, description="token limit of each greedy generation "
                                "(generate)")
    every: int | None = Field(default=None, gt=0, description="also evaluate every N steps")
    at_steps: list[PositiveInt] | None = Field(
        default=None, min_length=1, description="also evaluate at these steps (increasing, below the last): "
        "a grid that records the rung steps of a search can replay it without training (loraplace replay)")
    watch_examples: PositiveInt | None = Field(
        default=None, description="evaluate only the watched split's first N examples during training (every, "
        "at_steps): what a search's rung evaluates with search.rung_examples: N. The final evals read the whole "
        "splits")

    added_fields = frozenset({"at_steps", "watch_examples"})

    @field_validator("at_steps")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("eval.at_steps must be strictly increasing")
        return value


class TrialSpec(StrictModel):
    model: str
    data: DataSpec
    placement: PlacementSpec
    rank: int | None = Field(default=None, gt=0)
    budget: int | None = Field(default=None, gt=0)
    fill: Fill = Field(default=DEFAULT_FILL, description="how a budget is filled: exact (rank r+1 on an evenly "
                       "spread subset of sites) or uniform (one rank)")
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()

    @field_validator("train")
    @classmethod
    def _base_fits_variant(cls, value: TrainSpec, info: ValidationInfo) -> TrainSpec:
        placement = info.data.get("placement")
        problem = placement and variant_base_problem(placement.variant, value.quantize)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("eval")
    @classmethod
    def _eval_steps_in_run(cls, value: EvalSpec, info: ValidationInfo) -> EvalSpec:
        train = info.data.get("train")
        problem = train is not None and eval_steps_problem(value, train.steps)
        if problem:
            raise ValueError(problem)
        return value

    def id_neutral(self) -> set[str]:
        # ``fill`` only means something with a budget; "uniform" is how budgets were filled before it existed, so
        # a study stored then resumes with fill: uniform under its old trial ids.
        return super().id_neutral() | ({"fill"} if self.budget is None or self.fill == "uniform" else set())


def variant_base_problem(variant: str, quantize: str) -> str | None:
    """PiSSA initialises from an SVD of the base weights and rewrites them: PEFT refuses it on a quantized base
    (only when the trial starts, after the model has loaded); said up front instead."""
    if variant == "pissa" and quantize != "none":
        return (f"variant pissa rewrites the base weights from their SVD: not on a base quantized {quantize} (PEFT "
                "initialises PiSSA in full precision only); use lora, rslora or dora on a quantized base, or "
                "quantize: none")
    return None


def eval_steps_problem(spec: EvalSpec, steps: int | None) -> str | None:
    if spec.at_steps and steps is not None and spec.at_steps[-1] >= steps:
        return (f"eval.at_steps must stay below train.steps ({steps}): the last step is evaluated anyway, on the "
                "whole splits")
    return None


def trial_id(spec: TrialSpec) -> str:
    """The hash of the resolved trial spec: a study resumes by it."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of a study grid: its id (hash of the resolved spec), labels and resolved spec. ``state``: a saved
    training state to continue (a search finalist's first seed continues where its last rung stopped)."""

    id: str
    labels: TrialLabels
    spec: TrialSpec
    state: Path | None = None


LIBRARIES = ("torch", "transformers", "peft")


def library_versions() -> dict[str, str]:
    """The versions a result is computed with, from the installed packages' metadata (importing none of them)."""
    from loraplace import __version__

    return {"loraplace": __version__, **{name: importlib.metadata.version(name) for name in LIBRARIES},
            "python": platform.python_version()}
