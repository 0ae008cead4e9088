"""``loraplace train``: one trial from the command line."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape

from loraplace.cli.common import (
    ALLOW_UNASSIGNED_HELP,
    FILL_HELP,
    FLAG,
    _Command,
    app,
    default_of,
    err,
    out,
    placement_dict,
)
from loraplace.cli.outputs import output_dir
from loraplace.cli.progress import TrainProgress
from loraplace.data import DataSpec
from loraplace.errors import ConfigError, LoraplaceError
from loraplace.placement.spec import (
    DEFAULT_RANK,
)
from loraplace.train_config import DEFAULT_STEPS, TrainSpec


@app.command(cls=_Command)
def train(
    model: str = typer.Option("builtin:smollm2-135m", "--model", "-m", help="model reference"),
    data: str = typer.Option("builtin:arithmetic", "--data", "-d", help="training data source"),
    eval_data: str | None = typer.Option(None, "--eval-data", help="separate eval source (default: 10% split)"),
    eval_fraction: float | None = typer.Option(None, "--eval-fraction", help="test split carved from --data, a "
                                               "fraction"),
    test_count: int | None = typer.Option(None, "--test-count", min=1, help="test split carved from --data, a "
                                          "count (a study's data.test_count)"),
    validation_count: int | None = typer.Option(None, "--validation-count", min=1, help="validation split carved "
                                                "from --data, a count: the trial reports its validation loss too"),
    validation_fraction: float | None = typer.Option(None, "--validation-fraction", help="validation split "
                                                     "carved from --data, a fraction"),
    split_seed: int | None = typer.Option(None, "--split-seed", help=default_of(DataSpec, "split_seed")),
    limit: int | None = typer.Option(None, "--limit", help="use the first N training examples"),
    data_format: str | None = typer.Option(None, "--format", help="auto|alpaca|gsm8k|messages|prompt_completion|text"),
    placement: str = typer.Option("all", "--placement", "-p", help="preset name, role list (attn,mlp.up), inline "
                                  "YAML/JSON or a YAML file"),
    variant: str | None = typer.Option(None, "--variant", help="lora | rslora | dora | pissa | eva (default: the "
                                       "placement's, else lora)"),
    quantize: str | None = typer.Option(None, "--quantize", help="none | nf4 | fp4 | int8: the base loaded by "
                                        "bitsandbytes (QLoRA: nf4); " + default_of(TrainSpec, "quantize")),
    rank: int | None = typer.Option(None, "--rank", "-r", help=f"default {DEFAULT_RANK}"),
    budget: int | None = typer.Option(None, "--budget", help="trainable-parameter budget: solve the rank"),
    fill: str | None = typer.Option(None, "--fill", help=FILL_HELP),
    steps: int | None = typer.Option(None, "--steps", help=f"default {DEFAULT_STEPS} (unless --epochs)"),
    epochs: float | None = typer.Option(None, "--epochs", help="passes over the training data instead of --steps"),
    batch: int | None = typer.Option(None, "--batch", help=default_of(TrainSpec, "batch")),
    micro_batch: int | None = typer.Option(None, "--micro-batch", help="default: --batch"),
    max_len: int | None = typer.Option(None, "--max-len", help=default_of(DataSpec, "max_len")),
    lr: float | None = typer.Option(None, "--lr", help=default_of(TrainSpec, "lr")),
    schedule: str | None = typer.Option(None, "--schedule", help="linear|cosine|constant; "
                                        + default_of(TrainSpec, "schedule")),
    warmup: int | None = typer.Option(None, "--warmup", help=default_of(TrainSpec, "warmup")),
    seed: int | None = typer.Option(None, "--seed", help=default_of(TrainSpec, "seed")),
    precision: str | None = typer.Option(None, "--precision", help="auto|bf16|fp32; " + default_of(TrainSpec,
                                                                                                  "precision")),
    device: str | None = typer.Option(None, "--device", help=default_of(TrainSpec, "device")),
    no_packing: bool = typer.Option(False, "--no-packing", metavar=FLAG, help="pad instead of packing examples"),
    generate: int | None = typer.Option(None, "--generate", help="greedy-generate N eval examples for task accuracy"),
    out_dir: str | None = typer.Option(None, "--out", help="directory for adapter/ and metrics.json"),
    force: bool = typer.Option(False, "--force", metavar=FLAG, help="allow adapters larger than the base model"),
    allow_unassigned: bool = typer.Option(False, "--allow-unassigned", metavar=FLAG, help=ALLOW_UNASSIGNED_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", help="log the trial as an MLflow run (e.g. "
                                          "sqlite:///mlflow.db); needs loraplace\\[mlflow]"),
    mlflow_experiment: str = typer.Option("loraplace", "--mlflow-experiment",
                                          help="MLflow experiment name (with --mlflow-uri)"),
    tensorboard_dir: str | None = typer.Option(None, "--tensorboard-dir", help="write TensorBoard event files "
                                               "here; needs loraplace\\[tensorboard]"),
    wandb_project: str | None = typer.Option(None, "--wandb-project", help="log the trial as a W&B run in this "
                                             "project (WANDB_MODE=offline: written locally); needs "
                                             "loraplace\\[wandb]"),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="print one JSON object (no progress bar)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG, help="no progress bar"),
) -> int:
    """Run one trial: data → train → evaluate → PEFT adapter."""
    from loraplace.specs import validate
    from loraplace.trial import TrialSpec, run_trial

    def given(**values: Any) -> dict[str, Any]:  # options left out take the spec's defaults
        return {k: v for k, v in values.items() if v is not None}

    raw = {
        "model": model,
        "data": given(train=data, eval=eval_data, eval_fraction=eval_fraction, test_count=test_count,
                      validation_count=validation_count, validation_fraction=validation_fraction,
                      split_seed=split_seed, limit=limit, format=data_format, max_len=max_len),
        "placement": placement_dict(placement) | ({"allow_unassigned": True} if allow_unassigned else {})
        | given(variant=variant),
        "train": given(steps=steps, epochs=epochs, batch=batch, micro_batch=micro_batch, lr=lr, schedule=schedule,
                       warmup=warmup, seed=seed, precision=precision, device=device, quantize=quantize,
                       packing=False if no_packing else None),
        "eval": given(generate=generate),
    } | given(rank=rank, budget=budget, fill=fill)
    own_variant = placement_dict(placement).get("variant")
    if variant is not None and own_variant is not None and own_variant != variant:
        raise ConfigError([f"--variant {variant}: the placement says variant {own_variant}; give it in one place"],
                          "invalid trial options")
    spec = validate(TrialSpec, raw, "invalid trial options")
    if out_dir is not None:  # before any work: a trial must not train and then fail to save
        output_dir(out_dir, {"metrics.json": "status", "adapter": "adapter", "probe.json": "sites"})
    from loraplace.models import check_max_len, load_config

    check_max_len(load_config(spec.model), spec.data.max_len, spec.model)  # before any weight loads
    if spec.placement.auto is None:  # on the meta model, before any weight loads
        from loraplace.placement import plan_for_model

        plan_for_model(spec.model, spec.placement, rank=spec.rank, budget=spec.budget,
                       fill=spec.fill).check_size(force)
    tracker = None
    if mlflow_uri or tensorboard_dir or wandb_project:
        from loraplace.tracking import Tracker, TrackingSpec, check_tracking

        tracking = TrackingSpec.model_validate(
            ({"mlflow": {"tracking_uri": mlflow_uri, "experiment": mlflow_experiment}} if mlflow_uri else {})
            | ({"tensorboard": {"dir": tensorboard_dir}} if tensorboard_dir else {})
            | ({"wandb": {"project": wandb_project}} if wandb_project else {}))
        check_tracking(tracking)
        tracker = Tracker(tracking, "train")  # opened before training: a target that cannot work is refused now
    with TrainProgress(quiet or as_json) as progress:
        outcome = run_trial(spec, out_dir=out_dir, progress=progress)
    if tracker is not None:
        _track_single_trial(tracker, spec, outcome)
    if outcome.failure is not None and outcome.failure.user_error:  # bad input, not a training failure: exit 2
        raise LoraplaceError(outcome.failure.message, outcome.failure.hint)
    if as_json:
        print(json.dumps(outcome.summary(), default=str))
    else:
        from loraplace.report_terminal import print_trial

        print_trial(outcome, out)
    return 0 if outcome.status == "done" else 1


def _track_single_trial(tracker, spec, outcome) -> None:
    """``train --mlflow-uri/--tensorboard-dir/--wandb-project``: the trial as a run under a parent named "train"."""
    from loraplace.records import GroupKey, Size, TrialLabels
    from loraplace.trial_spec import trial_id

    size = Size(kind="budget", value=spec.budget) if spec.budget else Size(kind="rank", value=spec.rank or
                                                                           DEFAULT_RANK)
    label = spec.placement.preset or "+".join(spec.placement.roles or []) or "placement"
    labels = TrialLabels(group=GroupKey(placement=label, size=size), seed=spec.train.seed)
    tracker.log_trial(trial_id(spec), labels, spec.model_dump(mode="json"), outcome)
    tracker.close()
    for warning in tracker.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
