"""The ``loraplace`` command line: thin recipes over the library (parse → run → print).

Every user-facing failure is a :class:`~loraplace.errors.LoraplaceError`, printed as one cause + hint with exit
code 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import time
import traceback
import typing
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape

try:  # typer ≥ 0.20 raises its own vendored copy of click's exceptions
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover - older typer uses click itself
    _typer_click = click.exceptions

from loraplace.data import DataSpec
from loraplace.errors import ConfigError, LoraplaceError
from loraplace.formatting import one_line
from loraplace.placement.spec import (
    DEFAULT_AUTO_METHOD,
    DEFAULT_FILL,
    DEFAULT_RANK,
    DEFAULT_WARMUP_LR,
    DEFAULT_WARMUP_STEPS,
    TOP_METHODS,
    Fill,
    measure_of,
)
from loraplace.train_config import DEFAULT_STEPS, TrainSpec

FLAG = ""  # a flag takes no value: --help shows no "<bool>" type for it


class _HelpIsAFlag:
    """Typer builds each command's --help option itself: shown like our flags, with no "<bool>" type."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = FLAG
        return option


class _HelpGroup(_HelpIsAFlag, typer.core.TyperGroup):
    pass


class _Command(_HelpIsAFlag, typer.core.TyperCommand):
    pass


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_HelpGroup,
                  help="Selective LoRA placement studies: where should the adapters go, and at what rank?")
# Piped output (make, CI logs) gets a readable width instead of rich's 80-column fallback.
out = Console() if sys.stdout.isatty() else Console(width=140)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=140)
DEFAULT_PROBE_DATA = "builtin:arithmetic?n=256"  # offline default data for the importance probe
EXIT_WORK_LEFT = 75  # run --timeout stopped with trials left (EX_TEMPFAIL: "try again later")
_STATE = {"debug": False}
_USAGE_ERRORS = tuple({click.ClickException, _typer_click.ClickException})
_EXITS = tuple({click.exceptions.Exit, typer.Exit})
_ABORTS = tuple({click.exceptions.Abort, typer.Abort})


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal lands so a run stops like on Ctrl-C (trial marked interrupted)."""


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", metavar=FLAG, help="Show tracebacks on errors.")) -> None:
    _STATE["debug"] = debug


def parse_kv(text: str | None) -> dict[str, Any]:
    """``k=v,k2=v2`` → dict, values parsed as YAML scalars (ints, floats, bools, null)."""
    import yaml

    if not text:
        return {}
    result: dict[str, Any] = {}
    problems = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            problems.append(f"{item!r} is not key=value")
            continue
        key, value = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(value.strip())
    if problems:
        raise ConfigError(problems, "invalid --model-config")
    return result


FILL_HELP = (f"with --budget: exact (rank r+1 on an evenly spread subset of the sites, within ~1 % of the budget) "
             f"or uniform (one rank); default {DEFAULT_FILL}")
ALLOW_UNASSIGNED_HELP = ("let all/mlp/attn/moe resolve although some weights in the blocks have no role (they "
                         "are not adapted; the plan, the store and the report warn)")


@app.command(cls=_Command)
def plan(
    model: str = typer.Argument(..., help="hub id, checkpoint dir, config.json, builtin:smollm2-135m or tiny:FAMILY"),
    placement: str = typer.Option("all", "--placement", "-p",
                                  help="preset name, role list (attn,mlp.up), inline YAML/JSON or a YAML file"),
    rank: int | None = typer.Option(None, "--rank", "-r", min=1,
                                    help=f"LoRA rank for every site (default {DEFAULT_RANK})"),
    budget: int | None = typer.Option(None, "--budget", min=1, help="trainable-parameter budget: solve the rank"),
    fill: str | None = typer.Option(None, "--fill", help=FILL_HELP),
    model_config: str | None = typer.Option(
        None, "--model-config", help="config overrides k=v,...; with model_type=NAME no hub is needed"),
    data: str | None = typer.Option(None, "--data", help=f"auto placements only: data the probe reads (default "
                                    f"{DEFAULT_PROBE_DATA})"),
    max_len: int = typer.Option(512, "--max-len", min=8, help="token limit per example (the activation estimate; the "
                                "probe data of an auto placement)"),
    batch: int = typer.Option(8, "--batch", min=1,
                              help="examples per micro-batch, for the activation-memory estimate"),
    device_memory: str | None = typer.Option(None, "--device-memory",
                                             help="e.g. 24GiB: say whether training fits, with and without "
                                                  "activation checkpointing"),
    quantize: str = typer.Option("none", "--quantize", help="none | nf4 | fp4 | int8: the base loaded by "
                                 "bitsandbytes (QLoRA: nf4): its memory below"),
    no_double_quant: bool = typer.Option(False, "--no-double-quant", metavar=FLAG,
                                         help="nf4/fp4 without double quantization of the constants"),
    force: bool = typer.Option(False, "--force", metavar=FLAG, help="allow adapters larger than the base model"),
    allow_unassigned: bool = typer.Option(False, "--allow-unassigned", metavar=FLAG, help=ALLOW_UNASSIGNED_HELP),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="print one JSON object"),
) -> None:
    """Dry-run: show every module a placement adapts and the exact trainable-parameter count. Loads no weights
    (an auto placement loads the model to run its importance probe first)."""
    from loraplace.formatting import human_bytes, parse_bytes
    from loraplace.memory import CPU_RESIDENT_FACTOR, base_weight_bytes, training_memory
    from loraplace.placement import meta_architecture
    from loraplace.report_terminal import print_plan

    _quantize(quantize)
    result, config = _resolve_plan(model, placement, rank, budget, fill, model_config, data, max_len,
                                   allow_unassigned, quiet=as_json)
    result.check_size(force)
    arch = meta_architecture(model, config=config)
    base_bytes = base_weight_bytes(arch, 2, quantize, not no_double_quant)
    bf16_bytes = base_weight_bytes(arch, 2)
    memory = training_memory(config, batch, max_len, 2, base_bytes, result.trainable_params)
    try:
        device_bytes = parse_bytes(device_memory, "--device-memory") if device_memory is not None else None
    except ValueError as exc:
        raise ConfigError([str(exc)], "invalid plan options") from None
    if as_json:
        out.print_json(json.dumps(result.to_dict() | {"training_memory": {
            "batch": batch, "max_len": max_len, "quantize": quantize, "base_weights_bytes": base_bytes,
            "base_weights_bf16_bytes": bf16_bytes, "activations_bytes": memory.activations_bytes,
            "checkpointed_activations_bytes": memory.checkpointed_bytes, "weights_and_optimizer_bytes":
            memory.fixed_bytes, "verdict": memory.verdict(device_bytes) if device_bytes else None}}))
        return
    print_plan(result, out)
    if quantize != "none":
        double = "" if no_double_quant or quantize == "int8" else " (double quantization)"
        out.print(f"base weights quantized {quantize}{double}: {human_bytes(base_bytes)}, "
                  f"{base_bytes / bf16_bytes:.2f}× their {human_bytes(bf16_bytes)} in bf16 (embeddings, norms and "
                  "the head stay bf16)", highlight=False)
    out.print(f"activations, micro-batch of {batch} × {max_len} tokens (bound: every position labelled, packed): "
              f"≈ {human_bytes(memory.activations_bytes)}; with activation checkpointing ≈ "
              f"{human_bytes(memory.checkpointed_bytes)}; plus {human_bytes(memory.fixed_bytes)} of "
              f"{'bf16' if quantize == 'none' else quantize + '-quantized'} weights, adapters and optimizer state",
              highlight=False)
    if device_bytes:
        out.print(f"in {human_bytes(device_bytes)}: {memory.verdict(device_bytes)}", highlight=False)
    out.print(f"(live tensor bytes; on a CPU the process's resident memory runs higher, ≈ {CPU_RESIDENT_FACTOR:g}× "
              "the activations without checkpointing: the allocator keeps freed pages)", highlight=False, style="dim")


def _resolve_plan(model: str, placement: str | dict, rank: int | None, budget: int | None, fill: str | None,
                  model_config: str | None, data: str | None, max_len: int, allow_unassigned: bool, quiet: bool):
    """(the exact plan, the model config) for plan and export-placement: an auto placement loads the model and
    runs its probe on ``data``; anything else is resolved on a meta model from the config alone. An option that
    could not take effect (``--data`` without an auto placement, ``--fill`` without a budget) is refused."""
    from loraplace.placement import model_config_of, parse_placement, plan_for_model

    overrides = parse_kv(model_config)
    model_type = overrides.pop("model_type", None)
    spec = parse_placement(placement)
    problems = []
    if data is not None and spec.auto is None:
        problems.append(f"--data {data}: only an auto placement's probe reads data; this placement has none")
    if fill is not None and budget is None and spec.budget is None and (
            spec.auto is None or spec.auto.method not in TOP_METHODS):
        problems.append(f"--fill {fill}: fill says how a budget is spent (--budget, or the placement's budget:); "
                        "there is none here" if spec.auto is None else f"--fill {fill}: auto method "
                        f"{spec.auto.method} allocates rank itself; fill applies to methods {', '.join(TOP_METHODS)}")
    if problems:
        raise ConfigError(problems, "options that would not take effect")
    fill = _fill(fill) if fill is not None else DEFAULT_FILL
    if allow_unassigned:
        spec = spec.model_copy(update={"allow_unassigned": True})
    if spec.auto is not None:
        data = data if data is not None else DEFAULT_PROBE_DATA
        session, tokenized = _probe_session(model, data, max_len, quiet)
        with _probe_progress(quiet, spec.auto.batches) as progress:
            result = session.plan(spec, budget=budget, fill=fill, data=tokenized, data_key=data, progress=progress)
        return result, session.model.config
    config = model_config_of(model, overrides or None, model_type)  # read once: the plan and the memory lines
    return plan_for_model(model, spec, rank=rank, budget=budget, fill=fill, config=config), config


def _probe_session(model: str, data: str, max_len: int, quiet: bool, quantize: str = "none"):
    """The loaded model and the tokenised probe data (the whole source: the probe only reads it)."""
    from loraplace.data import DataSpec, load_tokenized
    from loraplace.trial import Session

    if not quiet:
        err.print(f"loading {model} and tokenising {data} for the importance probe …", highlight=False)
    session = Session(model, quantize=quantize)
    tokenized, _ = load_tokenized(data, session.tokenizer, DataSpec(train=data, max_len=max_len))
    if len(tokenized) == 0:
        raise LoraplaceError(f"{data}: no usable example for the probe", "check --data and --max-len")
    return session, tokenized


@contextlib.contextmanager
def _probe_progress(quiet: bool, batches: int):
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    # Counts batches (a warmup probe: its training steps, then its scoring batches).
    with Progress(TextColumn("probe"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("probe", total=batches)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command(cls=_Command)
def probe(
    model: str = typer.Argument(..., help="hub id, checkpoint dir, builtin:smollm2-135m or tiny:FAMILY"),
    data: str = typer.Option(DEFAULT_PROBE_DATA, "--data", help="data source (JSONL/CSV/Parquet, hf:, builtin:)"),
    batches: int = typer.Option(8, "--batches", min=1, help="batches of data the sites are scored on"),
    batch: int = typer.Option(8, "--batch", min=1, help="examples per batch"),
    rank: int = typer.Option(8, "--rank", min=1, help="rank r: of the scored gradient update (‖G_r‖_F), or of the "
                             "warm-up's adapters; every measure prices a site at this rank"),
    quantize: str = typer.Option("none", "--quantize", help="none | nf4 | fp4 | int8: probe the base as "
                                 "bitsandbytes loads it"),
    measure: str = typer.Option(measure_of(DEFAULT_AUTO_METHOD), "--measure", help="nfn (PLoP's normalized "
                                "feature norm, forward only: auto method nfn, auto's default) | gradient (‖G_r‖_F: "
                                "auto methods probe and gradient) | warmup (relative update after a short all-linear "
                                "warm-up: auto method warmup)"),
    warmup_steps: int = typer.Option(DEFAULT_WARMUP_STEPS, "--warmup-steps", min=1, help="--measure warmup: "
                                     "training steps of the rank-r adapters on every linear"),
    warmup_lr: float = typer.Option(DEFAULT_WARMUP_LR, "--warmup-lr", min=0.0, help="--measure warmup: their "
                                    "constant learning rate"),
    max_len: int = typer.Option(512, "--max-len", min=8, help="token limit per example"),
    out_dir: str | None = typer.Option(None, "--out", "-o", help="write probe.json and the heatmap here"),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="print the scores as one JSON object"),
) -> None:
    """Importance probe: score every (layer, role) site on a few batches of your data — by PLoP's normalized
    feature norm (--measure nfn, the default: what auto reads unless told otherwise), by the top-r singular values
    of its loss gradient and its efficiency per trainable parameter (--measure gradient), or by how far rank-r
    adapters on every linear moved each module's output after a short warm-up (--measure warmup: the only one that
    trains, and keeps nothing)."""
    from pathlib import Path
    from typing import get_args

    from loraplace.records import ProbeMeasure
    from loraplace.report_terminal import print_probe

    measures = get_args(ProbeMeasure)
    problems = [] if measure in measures else [f"--measure: {measure!r} is not one of {', '.join(measures)}"]
    if warmup_lr <= 0:
        problems.append(f"--warmup-lr: {warmup_lr:g} is not positive")
    if problems:
        raise ConfigError(problems, "invalid probe options")
    _quantize(quantize)
    if out_dir is not None:
        _output_dir(out_dir, {"probe.json": "sites"})
    session, tokenized = _probe_session(model, data, max_len, as_json, quantize)
    with _probe_progress(as_json, batches) as progress:
        warmup = {"warmup_steps": warmup_steps, "warmup_lr": warmup_lr} if measure == "warmup" else {}
        result = session.probe(tokenized, batches=batches, batch=batch, rank=rank, key=data, progress=progress,
                               measure=measure, **warmup)
    if out_dir is not None:
        from loraplace.analysis.figures import probe_heatmap
        from loraplace.atomic import write_json_atomic

        target = Path(out_dir)
        write_json_atomic(target / "probe.json", result.to_dict())
        figure = probe_heatmap(result, target)
        if not as_json:
            err.print(f"wrote {target / 'probe.json'} and {figure.files['png']}", highlight=False)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        print_probe(result, out)


class TrainProgress:
    """Rich progress: an optional study bar over trials, and a bar over optimizer steps with loss, real tokens/s
    and ETA (one bar, reset per trial — per group of fused trials, with their mean loss and summed tokens). Silent
    when quiet. Called as ``progress(step, total, loss, tokens)``."""

    def __init__(self, quiet: bool, description: str = "train"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = None if quiet else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err, transient=False)
        self.task = None
        self.study = None
        self.description = description
        self.t0 = 0.0
        self.tokens0 = 0
        self.last_loss = "…"
        # Not a terminal (nohup, a log file, CI): rich draws no bars there, so a long trial would log nothing until
        # it ends. A plain line every tenth of its steps instead (and when it starts), with loss and tokens/s.
        self.plain = self.progress is not None and not self.progress.console.is_terminal
        self.next_line = 0

    def __enter__(self):
        if self.progress is not None and not self.plain:  # not a terminal: plain lines only, no bars' last frame
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def start_study(self, total: int) -> None:
        if self.progress is None:
            return
        if self.study is None:
            self.study = self.progress.add_task("study", total=total, info="")
        else:  # more trials joined the run (a tuned study's other seeds)
            # By id, not position: ``tasks`` is a list, and the rung and trial bars removed before it shift it.
            shown = next(t.total for t in self.progress.tasks if t.id == self.study)
            self.progress.update(self.study, total=max(total, shown or 0))

    def trial_done(self, done: int, failed: int) -> None:
        if self.progress is not None and self.study is not None:
            self.progress.update(self.study, completed=done + failed, info=f"{done} done, {failed} failed")

    def new_trial(self, description: str) -> None:
        self.description = description
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)
        self.task = None

    def __call__(self, step: int, total: int, loss: float | None, tokens: int) -> None:
        if self.progress is None:
            return
        if self.task is None:  # rate measured from the first step on: model load and tokenising excluded
            self.task = self.progress.add_task(self.description, total=total, info="loss …")
            self.t0, self.tokens0 = time.perf_counter(), tokens
            self.progress.update(self.task, completed=step)
            if self.plain:
                resumed = f", continuing its saved state from step {step - 1}" if step > 1 else ""
                self._line(f"{self.description}: training, {total} steps{resumed}")
                self.next_line = step + max(1, total // 10)
            return
        if loss is not None:
            self.last_loss = f"{loss:.4f}"
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        info = f"loss {self.last_loss}  {(tokens - self.tokens0) / elapsed:,.0f} tok/s"
        self.progress.update(self.task, completed=step, info=info)
        if self.plain and step >= self.next_line and step < total:
            self._line(f"{self.description}: step {step}/{total}  {info}")
            self.next_line = step + max(1, total // 10)

    def _line(self, text: str) -> None:
        assert self.progress is not None
        self.progress.console.print(f"{time.strftime('%H:%M:%S')} {escape(text)}", highlight=False)


def _default(model, name: str) -> str:
    """A spec field's default, for --help (the spec is the one home of every default)."""
    return f"default {model.model_fields[name].get_default(call_default_factory=True)}"


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
    split_seed: int | None = typer.Option(None, "--split-seed", help=_default(DataSpec, "split_seed")),
    limit: int | None = typer.Option(None, "--limit", help="use the first N training examples"),
    data_format: str | None = typer.Option(None, "--format", help="auto|alpaca|gsm8k|messages|prompt_completion|text"),
    placement: str = typer.Option("all", "--placement", "-p"),
    variant: str | None = typer.Option(None, "--variant", help="lora | rslora | dora | pissa | eva (default: the "
                                       "placement's, else lora)"),
    quantize: str | None = typer.Option(None, "--quantize", help="none | nf4 | fp4 | int8: the base loaded by "
                                        "bitsandbytes (QLoRA: nf4); " + _default(TrainSpec, "quantize")),
    rank: int | None = typer.Option(None, "--rank", "-r", help=f"default {DEFAULT_RANK}"),
    budget: int | None = typer.Option(None, "--budget", help="trainable-parameter budget: solve the rank"),
    fill: str | None = typer.Option(None, "--fill", help=FILL_HELP),
    steps: int | None = typer.Option(None, "--steps", help=f"default {DEFAULT_STEPS} (unless --epochs)"),
    epochs: float | None = typer.Option(None, "--epochs"),
    batch: int | None = typer.Option(None, "--batch", help=_default(TrainSpec, "batch")),
    micro_batch: int | None = typer.Option(None, "--micro-batch", help="default: --batch"),
    max_len: int | None = typer.Option(None, "--max-len", help=_default(DataSpec, "max_len")),
    lr: float | None = typer.Option(None, "--lr", help=_default(TrainSpec, "lr")),
    schedule: str | None = typer.Option(None, "--schedule", help="linear|cosine|constant; "
                                        + _default(TrainSpec, "schedule")),
    warmup: int | None = typer.Option(None, "--warmup", help=_default(TrainSpec, "warmup")),
    seed: int | None = typer.Option(None, "--seed", help=_default(TrainSpec, "seed")),
    precision: str | None = typer.Option(None, "--precision", help="auto|bf16|fp32; " + _default(TrainSpec,
                                                                                                  "precision")),
    device: str | None = typer.Option(None, "--device", help=_default(TrainSpec, "device")),
    no_packing: bool = typer.Option(False, "--no-packing", metavar=FLAG, help="pad instead of packing examples"),
    generate: int | None = typer.Option(None, "--generate", help="greedy-generate N eval examples for task accuracy"),
    out_dir: str | None = typer.Option(None, "--out", help="directory for adapter/ and metrics.json"),
    force: bool = typer.Option(False, "--force", metavar=FLAG, help="allow adapters larger than the base model"),
    allow_unassigned: bool = typer.Option(False, "--allow-unassigned", metavar=FLAG, help=ALLOW_UNASSIGNED_HELP),
    mlflow_uri: str | None = typer.Option(None, "--mlflow-uri", help="log the trial as an MLflow run (e.g. "
                                          "sqlite:///mlflow.db); needs loraplace\\[mlflow]"),
    mlflow_experiment: str = typer.Option("loraplace", "--mlflow-experiment"),
    tensorboard_dir: str | None = typer.Option(None, "--tensorboard-dir", help="write TensorBoard event files "
                                               "here; needs loraplace\\[tensorboard]"),
    wandb_project: str | None = typer.Option(None, "--wandb-project", help="log the trial as a W&B run in this "
                                             "project (WANDB_MODE=offline: written locally); needs "
                                             "loraplace\\[wandb]"),
    as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="print one JSON object (no progress bar)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG),
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
        "placement": _placement_dict(placement) | ({"allow_unassigned": True} if allow_unassigned else {})
        | given(variant=variant),
        "train": given(steps=steps, epochs=epochs, batch=batch, micro_batch=micro_batch, lr=lr, schedule=schedule,
                       warmup=warmup, seed=seed, precision=precision, device=device, quantize=quantize,
                       packing=False if no_packing else None),
        "eval": given(generate=generate),
    } | given(rank=rank, budget=budget, fill=fill)
    own_variant = _placement_dict(placement).get("variant")
    if variant is not None and own_variant is not None and own_variant != variant:
        raise ConfigError([f"--variant {variant}: the placement says variant {own_variant}; give it in one place"],
                          "invalid trial options")
    spec = validate(TrialSpec, raw, "invalid trial options")
    if out_dir is not None:  # before any work: a trial must not train and then fail to save
        _output_dir(out_dir, {"metrics.json": "status", "adapter": "adapter", "probe.json": "sites"})
    if spec.placement.auto is None:  # on the meta model, before any weight loads
        from loraplace.placement import plan_for_model

        plan_for_model(spec.model, spec.placement, rank=spec.rank, budget=spec.budget,
                       fill=spec.fill).check_size(force)
    tracking = None
    if mlflow_uri or tensorboard_dir or wandb_project:
        from loraplace.tracking import TrackingSpec, check_tracking

        tracking = TrackingSpec.model_validate(
            ({"mlflow": {"tracking_uri": mlflow_uri, "experiment": mlflow_experiment}} if mlflow_uri else {})
            | ({"tensorboard": {"dir": tensorboard_dir}} if tensorboard_dir else {})
            | ({"wandb": {"project": wandb_project}} if wandb_project else {}))
        check_tracking(tracking)
    with TrainProgress(quiet or as_json) as progress:
        outcome = run_trial(spec, out_dir=out_dir, progress=progress)
    if tracking is not None:
        _track_single_trial(tracking, spec, outcome)
    if outcome.failure is not None and outcome.failure.user_error:  # bad input, not a training failure: exit 2
        raise LoraplaceError(outcome.failure.message, outcome.failure.hint)
    if as_json:
        print(json.dumps(outcome.summary(), default=str))
    else:
        from loraplace.report_terminal import print_trial

        print_trial(outcome, out)
    return 0 if outcome.status == "done" else 1


@app.command(cls=_Command)
def run(
    spec_path: str = typer.Argument(..., metavar="SPEC", help="study YAML"),
    store: str | None = typer.Option(None, "--store", help="SQLite store (default runs/NAME.db)"),
    backend: str = typer.Option("local", "--backend", help="local | ray"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start one here)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", metavar=FLAG, help="re-run failed trials too"),
    extend: bool = typer.Option(False, "--extend", metavar=FLAG, help="add new cells (placements, sizes, seeds, "
                                "axis values) to "
                                "an existing study; settings of existing groups cannot change"),
    force: bool = typer.Option(False, "--force", metavar=FLAG, help="allow adapters larger than the base model"),
    allow_unassigned: bool = typer.Option(False, "--allow-unassigned", metavar=FLAG, help=ALLOW_UNASSIGNED_HELP
                                          + " (the same as allow_unassigned: true in the spec)"),
    allow_mixed_precision: bool = typer.Option(
        False, "--allow-mixed-precision", metavar=FLAG, help="resume a precision: auto study on a machine where "
        "auto means another dtype than the one its trials ran in (refused without this)"),
    reuse_from: list[str] | None = typer.Option(
        None, "--reuse-from", metavar="STORE", help="take finished trials over from another study's store instead "
        "of training them: a trial of the same id has the same resolved spec (repeatable)"),
    timeout: str | None = typer.Option(
        None, "--timeout", metavar="DURATION", help="start no trial (nor search rung run) after this long "
        "(5400, 90m, 1.5h, 1h30m): those in flight finish, the rest waits for the same command; exits "
        f"{EXIT_WORK_LEFT} when work is left. Under a hard time limit, give the limit less one trial's time"),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG),
) -> int:
    """Run a study: every unfinished trial of the grid, into a crash-safe store (resumable)."""
    import signal
    from pathlib import Path

    from loraplace.formatting import human_duration, parse_duration
    from loraplace.runner import RunHooks
    from loraplace.study import default_store, load_study, run_study

    try:
        timeout_s = parse_duration(timeout, "--timeout") if timeout is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    study = load_study(spec_path)  # invalid spec: error before anything is written
    if allow_unassigned:
        study = study.model_copy(update={"allow_unassigned": True})
    store_path = Path(store) if store else default_store(study)
    bar = TrainProgress(quiet)
    counts = {"started": 0, "done": 0, "failed": 0}
    in_flight: dict[str, int] = {}  # trial id → its index; several at once when trials are fused

    def start(trial, index: int, total: int) -> None:
        counts["started"] += 1
        in_flight[trial.id] = index
        bar.start_study(total)
        if len(in_flight) == 1:
            bar.new_trial(f"{index}/{total} {trial.labels.group.label} seed={trial.labels.seed}")
        else:  # a fused group: its bar shows the group's steps, mean loss and tokens/s
            bar.new_trial(f"{min(in_flight.values())}–{index}/{total} fused ×{len(in_flight)}")

    def end(trial, outcome) -> None:
        in_flight.pop(trial.id, None)
        counts["done" if outcome.status == "done" else "failed"] += 1
        bar.trial_done(counts["done"], counts["failed"])
        if not quiet:
            what = (f"eval_loss={outcome.metrics.eval_loss:.4f}" if outcome.metrics is not None
                    else one_line(outcome.failure.message, 300) if outcome.failure is not None else "")
            bar.progress.console.print(f"{trial.id} {escape(trial.labels.group.label)} seed={trial.labels.seed} → "
                                       f"{outcome.status} {escape(what)}", highlight=False)

    def note(line: str) -> None:
        if not quiet:
            bar.progress.console.print(escape(line), highlight=False)

    def rung_start(label: str) -> None:
        bar.new_trial(label)

    def terminate(_signum, _frame):  # SIGTERM stops the run like Ctrl-C: the trial in flight is marked interrupted
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with bar:
            hooks = RunHooks(on_start=start, on_end=end, progress=bar, on_note=note, on_rung_start=rung_start)
            summary = run_study(study, store_path, backend=backend, address=address, retry_failed=retry_failed,
                                extend=extend, force=force, allow_mixed_precision=allow_mixed_precision,
                                reuse_from=reuse_from or (), hooks=hooks, timeout_s=timeout_s)
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        in_flight = counts["started"] - counts["done"] - counts["failed"]
        if in_flight:
            err.print(f"[red]{what}:[/] the trial in flight is marked interrupted; run the same command to resume")
        else:
            err.print(f"[red]{what}[/] before any trial ran; run the same command to start", highlight=False)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    for warning in summary.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if not quiet:
        err.print(f"ran {summary.ran} trial(s): {summary.done} done, {summary.failed} failed; "
                  f"{summary.skipped} already done; " + (f"{summary.reused} reused from another store; "
                                                          if reuse_from else "")
                  + f"{len(summary.recovered)} recovered from a dead run; "
                  f"{summary.wall_s:.1f} s", highlight=False)
        if summary.execution:
            fused_note = "" if summary.fused or "fused in groups" not in summary.execution else (
                "; none of this run's trials was fused with another (one trial at a time, or groups that could "
                "not fuse: their warnings say why)")
            err.print(summary.execution + fused_note, highlight=False, style="dim")
    _print_status(store_path, study.name)
    if summary.done or summary.skipped:
        from loraplace.analysis import analyze_store
        from loraplace.report_terminal import print_comparison

        analysis = analyze_store(store_path, study.name)
        print_comparison(analysis, out)
        if analysis.search is not None and analysis.search.finished:
            search = analysis.search
            out.print(f"search: {search.search_steps():.0f} training-step equivalents against {search.grid_steps:,} "
                      f"steps for the full tuned grid ({search.ratio():.2f}×); answer: loraplace recommend "
                      f"{store_path}", highlight=False)
    out.print(f"store: {store_path}  (report: loraplace report {store_path})", highlight=False)
    if summary.failed_earlier:
        err.print(f"[red]{summary.failed_earlier} trial(s) failed in an earlier run and were not run again[/]; "
                  f"after fixing the cause: loraplace run {spec_path} --store {store_path} --retry-failed",
                  highlight=False)
    if summary.timed_out:
        err.print(f"[yellow]--timeout {human_duration(timeout_s or 0)} reached:[/] nothing was started after it; "
                  f"the rest waits — run the same command to continue", highlight=False)
    return 1 if summary.failed or summary.failed_earlier else EXIT_WORK_LEFT if summary.timed_out else 0


def _saved_steps(store_path, trials) -> dict[str, tuple[int, int]]:
    """Unfinished trial id → (steps, total) of the training state it saved (execution.save_state_every): where
    the next run continues it. torch is imported only when there is such a state."""
    from loraplace.store import STATE_DIR, artifacts_dir, trial_dir

    artifacts = artifacts_dir(pathlib.Path(store_path))
    files = {t.id: trial_dir(artifacts, t.id) / STATE_DIR for t in trials if t.status != "done"}
    files = {tid: path for tid, path in files.items() if path.is_dir()}
    if not files:
        return {}
    from loraplace.stepper import Continuation

    out = {}
    for tid, path in files.items():
        try:
            saved = Continuation(path).saved()
        except Exception:  # noqa: BLE001 - status reads; a state it cannot read is the run's to report
            continue
        if saved is not None:
            out[tid] = (saved.progress.steps, saved.progress.total)
    return out


def _print_status(store_path, name: str | None = None) -> None:
    from loraplace.report_terminal import print_search, print_status
    from loraplace.store import Store

    with Store.open_readonly(store_path) as store:
        study = store.study(name)
        trials = store.trials(study.id)
        print_status(study, trials, store.counts(study.id), out, _saved_steps(store_path, trials))
        if study.info.search:
            from loraplace.analysis.search import analyze_search

            search = analyze_search(study.spec, study.info, store.rung_results(study.id),
                                    store.rung_decisions(study.id), store.trials(study.id))
            print_search(search, out)


@app.command(cls=_Command)
def replay(store: str = typer.Argument(..., help="grid store (.db): a tuned study whose trials recorded the rung "
                                       "steps (eval.at_steps, eval.watch_examples)"),
           search: str = typer.Option(..., "--search", help="the policy: a search: block ('{eta: 4, rungs: [3, "
                                      "10], rung_examples: 24}') or a YAML file holding one (a study spec: its "
                                      "search:)"),
           rung_seed: list[int] | None = typer.Option(None, "--rung-seed", help="the seed the rungs run on "
                                                      "(repeatable; default: the grid's first seed)"),
           all_seeds: bool = typer.Option(False, "--all-seeds", metavar=FLAG, help="replay with the rungs on each "
                                          "of the grid's seeds"),
           task: str | None = typer.Option(None, "--task", help="the task's name in the result line (default: "
                                           "the grid study's name)"),
           name: str | None = typer.Option(None, "--study", help="study name (default: the latest)")) -> None:
    """Replay a search policy on a stored grid, with no training: each rung's decision, the compute ledger, the
    answer, and its regret against the grid's answer (test loss, seed-paired 95 % interval). Read-only."""
    from loraplace.analysis.replay import replay_store
    from loraplace.report_terminal import print_replay
    from loraplace.search import SearchSpec
    from loraplace.specs import validate
    from loraplace.store import Store

    policy = validate(SearchSpec, _search_block(search), "invalid --search")
    if all_seeds:
        with Store.open_readonly(store) as opened:
            seeds = list(opened.study(name).spec.get("seeds", [0]))
    else:
        seeds = rung_seed or [None]
    for seed in seeds:
        result = replay_store(store, policy, rung_seed=seed, name=name)
        print_replay(result, task or result.grid, out)


def _search_block(text: str) -> dict:
    """``--search``: a YAML file (its ``search:`` when it is a study spec) or a YAML mapping given inline."""
    from loraplace.specs import load_yaml, parse_yaml

    path = pathlib.Path(text)
    data = load_yaml(path) if path.suffix in (".yaml", ".yml", ".json") else parse_yaml(text, "--search")
    if isinstance(data, dict) and isinstance(data.get("search"), dict):
        data = data["search"]
    if not isinstance(data, dict):
        raise ConfigError([f"--search {text!r}: not a mapping (a search: block, e.g. '{{eta: 4}}')"],
                          "invalid --search")
    return data


@app.command(cls=_Command)
def status(store: str = typer.Argument(..., help="study store (.db)"),
           name: str | None = typer.Option(None, "--study", help="study name (default: the latest)")) -> None:
    """Table of a study's trials: status and key metrics. Safe while a study is running."""
    _print_status(store, name)


@app.command(cls=_Command)
def export(store: str = typer.Argument(..., help="study store (.db)"),
           fmt: str = typer.Option("csv", "--format", help="csv | json | parquet"),
           output: str | None = typer.Option(None, "--out", "-o", help="file (default: stdout for csv/json)"),
           name: str | None = typer.Option(None, "--study")) -> None:
    """Export one row per trial: labels, status, measured metrics and sizes."""
    from loraplace.analysis.tables import export_rows
    from loraplace.store import Store

    if fmt not in ("csv", "json", "parquet"):
        raise LoraplaceError(f"unknown export format {fmt!r}", "use csv, json or parquet")
    if output is not None:
        _output_file(output, fmt, (store,))  # a bad --out fails before the store is read
    with Store.open_readonly(store) as st:
        rows = export_rows(st.trials(st.study(name).id))
    if fmt == "json":
        text = json.dumps(rows, indent=2)
    elif fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, keys)
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    else:
        if output is None:
            raise LoraplaceError("parquet export needs --out FILE")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), _output_file(output, fmt, (store,)))
        return
    if output:
        from loraplace.atomic import write_text_atomic

        write_text_atomic(_output_file(output, fmt, (store,)), text)
    else:
        sys.stdout.write(text)


@app.command(cls=_Command)
def report(store: str = typer.Argument(..., help="study store (.db)"),
           out_dir: str | None = typer.Option(None, "--out", "-o", help="directory (default: STORE_report/ beside "
                                              "the store)"),
           formats: str = typer.Option("html,md,tex,csv", "--format", help="comma-separated: html,md,tex,csv"),
           name: str | None = typer.Option(None, "--study", help="study name (default: the latest)"),
           quiet: bool = typer.Option(False, "--quiet", "-q", metavar=FLAG,
                                      help="print only the report's path")) -> None:
    """Statistics across seeds, baseline comparison, Pareto frontier and figures: HTML, Markdown, LaTeX, CSV.
    Safe while a study is running (it reads finished trials)."""
    from pathlib import Path

    from loraplace.analysis import analyze_store
    from loraplace.analysis.report import parse_formats, write_report
    from loraplace.report_terminal import print_comparison

    chosen = parse_formats(formats)
    analysis = analyze_store(store, name)
    if not analysis.groups:
        raise LoraplaceError(f"study {analysis.name!r} has no finished trial yet",
                             f"run it first (loraplace run SPEC --store {store}) or check loraplace status {store}")
    target = Path(out_dir) if out_dir else Path(store).with_name(Path(store).stem + "_report")
    if target.exists() and not target.is_dir():
        raise LoraplaceError(f"--out {target} is a file; a report is a directory", "give a directory path")
    written = write_report(analysis, target, chosen)
    if not quiet:
        print_comparison(analysis, out)
        for fmt, path in written.items():
            err.print(f"{fmt}: {path}", highlight=False)
    main_file = written.get("html") or next(iter(written.values()))
    out.print(f"report: {main_file}", highlight=False)


AT_HELP = ("recommend at these values of the study's swept axes only, e.g. quantize=nf4 (the best placement on the "
           "4-bit base); default: compared across them")


def _at(text: str | None) -> dict[str, str]:
    """``--at quantize=nf4[,axis=value]`` → {axis: value} (values as text: the group keys are matched to them)."""
    pairs = [item.split("=", 1) for item in (text or "").split(",") if item.strip()]
    bad = [f"--at: {'='.join(p)!r} is not axis=value" for p in pairs if len(p) != 2 or not p[0].strip()]
    if bad:
        raise ConfigError(bad, "invalid --at")
    return {k.strip(): v.strip() for k, v in pairs}


@app.command(cls=_Command)
def recommend(store: str = typer.Argument(..., help="study store (.db)"),
              budget: int | None = typer.Option(None, "--budget", min=1, help="consider only placements with at "
                                                "most this many trainable parameters"),
              metric: str = typer.Option("eval_loss", "--metric", help="eval_loss (the test split) | accuracy"),
              name: str | None = typer.Option(None, "--study", help="study name (default: the latest)"),
              at: str | None = typer.Option(None, "--at", help=AT_HELP),
              as_json: bool = typer.Option(False, "--json", metavar=FLAG, help="print one JSON object")) -> None:
    """The placement to use: the best at or under the budget on the metric (each placement at its selected LR
    when the study tuned it), its interval, the runner-up, and whether the two are distinguishable. Safe while a
    study is running (it reads finished trials)."""
    from loraplace.analysis.recommend import recommend_from_store
    from loraplace.report_terminal import print_recommendation

    result = recommend_from_store(store, name, budget, metric, _at(at))
    if as_json:
        chosen = result.chosen
        out.print_json(json.dumps({
            "placement": chosen.placement, "size": chosen.size, "metric": result.metric,
            "value": chosen.value, "interval": chosen.interval, "seeds": chosen.seeds, "lr": chosen.lr,
            "trainable_params": chosen.trainable_params,
            "runner_up": None if result.runner_up is None else result.runner_up.model_dump(mode="json"),
            "distinguishable": result.distinguishable, "difference": result.difference,
            "difference_interval": result.difference_interval, "p_value": result.p_value,
            "reason": result.reason, "placement_spec": result.placement_spec, "model": result.model,
            "study": result.study, "budget": result.budget, "tuned": result.tuned, "adapter": result.adapter,
            "adapter_seed": result.adapter_seed, "at": result.at}))
        return
    print_recommendation(result, store, out)


@app.command("export-placement", cls=_Command)
def export_placement(
    model: str | None = typer.Argument(None, help="the model (as for plan); not with --from"),
    placement: str | None = typer.Option(None, "--placement", "-p", help="as for plan (default: all)"),
    source: str | None = typer.Option(None, "--from", help="a study store: export its recommendation (as "
                                      "loraplace recommend gives it, with --budget/--metric/--study)"),
    to: str = typer.Option(..., "--to", help="peft | trl | axolotl | llamafactory | torchtune"),
    output: str | None = typer.Option(None, "--out", "-o", help="file (default: stdout)"),
    lossy: bool = typer.Option(False, "--lossy", metavar=FLAG, help="where the format cannot express the placement, "
                               "write the "
                               "closest form it can (the parameter difference is printed) instead of failing"),
    rank: int | None = typer.Option(None, "--rank", "-r", min=1, help=f"LoRA rank (default {DEFAULT_RANK})"),
    budget: int | None = typer.Option(None, "--budget", min=1, help="trainable-parameter budget (with --from: only "
                                      "placements within it are recommended)"),
    fill: str | None = typer.Option(None, "--fill", help=FILL_HELP),
    metric: str | None = typer.Option(None, "--metric", help="with --from: eval_loss (default) | accuracy"),
    name: str | None = typer.Option(None, "--study", help="with --from: study name (default: the latest)"),
    at: str | None = typer.Option(None, "--at", help="with --from: " + AT_HELP),
    model_config: str | None = typer.Option(None, "--model-config", help="config overrides k=v,..."),
    data: str | None = typer.Option(None, "--data", help=f"auto placements only: data the probe reads (default "
                                    f"{DEFAULT_PROBE_DATA})"),
    max_len: int = typer.Option(512, "--max-len", min=8, help="auto placements only: token limit of the probe data"),
    allow_unassigned: bool = typer.Option(False, "--allow-unassigned", metavar=FLAG, help=ALLOW_UNASSIGNED_HELP),
    quantize: str | None = typer.Option(None, "--quantize", help="none | nf4 | fp4 | int8: train on a base "
                                        "quantized by bitsandbytes (QLoRA: nf4); with --from, the study's"),
    torchtune_component: str | None = typer.Option(None, "--torchtune-component",
                                                   help="torchtune's LoRA builder for a model loraplace cannot "
                                                        "map (e.g. torchtune.models.llama3_2.lora_llama3_2_1b)"),
) -> None:
    """Write a placement in the format of the framework you train with: an exact PEFT adapter_config.json, a TRL
    SFTTrainer script, or axolotl / LLaMA-Factory / torchtune config fields (one rank for all sites: a placement
    they cannot express fails, naming what would be lost, unless --lossy)."""
    from loraplace.exports import EXPORT_FORMATS, TrainingHints, export_plan

    if to not in EXPORT_FORMATS:
        raise LoraplaceError(f"--to {to!r}: one of {', '.join(EXPORT_FORMATS)}")
    inputs = tuple(x for x in (source,) if x is not None)
    if output is not None:
        _output_file(output, to, inputs)
    hints = TrainingHints()
    if source is not None:
        # --from exports what the store measured: options that shape a placement would be ignored
        ignored = [opt for opt, value in (("MODEL", model), ("--placement", placement), ("--rank", rank),
                                           ("--fill", fill), ("--model-config", model_config), ("--data", data),
                                           ("--quantize", quantize),
                                           ("--allow-unassigned", allow_unassigned or None)) if value is not None]
        if ignored:
            raise ConfigError([f"{opt}: --from exports the placement the study measured; {opt} cannot change it"
                               for opt in ignored], "options that would not take effect",
                              "drop them, or export a placement of your own: export-placement MODEL --placement …")
        from loraplace.analysis.recommend import recommend_from_store
        from loraplace.trial_spec import TrialSpec

        rec = recommend_from_store(source, name, budget, metric or "eval_loss", _at(at))
        model, spec_placement = rec.model, rec.placement_spec
        measured = TrialSpec.model_validate(rec.trial_spec)  # what the recommended trials ran with
        hints = TrainingHints(lr=measured.train.lr, batch=measured.train.batch, steps=measured.train.steps,
                              max_len=measured.data.max_len, warmup=measured.train.warmup or None,
                              schedule=measured.train.schedule, quantize=measured.train.quantize,
                              double_quant=measured.train.bnb_4bit_use_double_quant)
        err.print(f"recommended by {source}: {rec.chosen.placement} ({rec.chosen.size}), "
                  f"{rec.chosen.trainable_params:,} trainable parameters", highlight=False)
        result, config = _resolve_plan(model, spec_placement, None, None, fill, model_config, data, max_len,
                                       allow_unassigned, quiet=True)
        if result.trainable_params != rec.chosen.trainable_params:
            raise LoraplaceError(f"the recommended placement resolves to {result.trainable_params:,} trainable "
                                 f"parameters, not the {rec.chosen.trainable_params:,} its trials had",
                                 "the model's config changed since the study? plan it by hand")
    else:
        if model is None:
            raise LoraplaceError("export-placement needs a MODEL (with --placement) or --from STORE")
        if metric is not None or name is not None or at is not None:
            raise ConfigError([f"{opt}: reads a study store, with --from" for opt, v in (("--metric", metric),
                               ("--study", name), ("--at", at)) if v is not None], "options that would not take effect")
        hints = TrainingHints(quantize=_quantize(quantize or "none"))
        result, config = _resolve_plan(model, placement or "all", rank, budget, fill, model_config, data, max_len,
                                       allow_unassigned, quiet=False)
    from loraplace.models import meta_model

    module_paths = [name for name, _ in meta_model(config).named_modules()]  # bare names only where exact
    exported = export_plan(result, to, model, hints=hints, lossy=lossy, torchtune_component=torchtune_component,
                           config=config, module_paths=module_paths)
    if exported.lost:
        diff = exported.params - exported.plan_params
        err.print(f"[yellow]lossy:[/] {escape('; '.join(exported.lost))}; the {to} config trains "
                  f"{exported.params:,} parameters against the plan's {exported.plan_params:,} ({diff:+,}, "
                  f"{100.0 * diff / exported.plan_params:+.1f} %)", highlight=False)
    if output:
        from loraplace.atomic import write_text_atomic

        write_text_atomic(_output_file(output, to, inputs), exported.text)
        err.print(f"{to}: {output} ({exported.params:,} trainable parameters"
                  f"{', exact' if exported.exact else ''})", highlight=False)
    else:
        sys.stdout.write(exported.text)


def _track_single_trial(tracking, spec, outcome) -> None:
    """``train --mlflow-uri/--tensorboard-dir``: the trial as a run under a parent named "train"."""
    from loraplace.records import GroupKey, Size, TrialLabels
    from loraplace.study import trial_id
    from loraplace.tracking import Tracker

    size = Size(kind="budget", value=spec.budget) if spec.budget else Size(kind="rank", value=spec.rank or
                                                                           DEFAULT_RANK)
    label = spec.placement.preset or "+".join(spec.placement.roles or []) or "placement"
    labels = TrialLabels(group=GroupKey(placement=label, size=size), seed=spec.train.seed)
    tracker = Tracker(tracking, "train")
    tracker.log_trial(trial_id(spec), labels, spec.model_dump(mode="json"), outcome)
    tracker.close()
    for warning in tracker.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def _output_file(path: str, kind: str, inputs: tuple[str, ...] = ()):
    """An --out file path that can be written: its directory exists, it is not a directory, not one of the
    command's ``inputs`` (the store, …), and not an existing file other than an earlier output of this ``kind``
    (``export``'s csv/json/parquet, ``export-placement``'s formats) — a command never writes over what it did not
    write itself."""
    from pathlib import Path

    from loraplace.store import SQLITE_MAGIC

    target = Path(path)
    if target.is_dir():
        raise LoraplaceError(f"--out {target} is a directory", "give a file path, e.g. trials.csv")
    if not target.parent.is_dir():
        raise LoraplaceError(f"--out {target}: directory {target.parent} does not exist", "create it first")
    for given in inputs:
        if target.exists() and Path(given).exists() and target.samefile(given):
            raise LoraplaceError(f"--out {target} is this command's input", "give another file path")
    if target.exists():
        with open(target, "rb") as fh:
            head = fh.read(4096)
        what = "a loraplace store (or another SQLite database)" if head.startswith(SQLITE_MAGIC) else None
        if what is None and not _earlier_output(head, kind):
            what = "a file loraplace did not write"
        if what is not None:
            raise LoraplaceError(f"--out {target} exists and is {what}; it is not an earlier {kind} output of "
                                 "this command, so it is not overwritten", "give a new file name, or move that "
                                 "file away first")
    return target


def _output_dir(path: str, owned: dict[str, str]) -> None:
    """An --out directory a command can write into, checked before any work: not a file, and each entry the
    command writes there (``owned``: name → what it is) either absent or its own earlier output — a JSON record
    it wrote, a directory holding an adapter — never a file of someone else's."""
    from pathlib import Path

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LoraplaceError(f"--out {target} is a file; this command writes a directory there",
                             "give a directory path (it is created if missing)")
    for name, what in owned.items():
        entry = target / name
        if not entry.exists():
            continue
        if what == "adapter":
            ours = entry.is_dir() and (entry / "adapter_config.json").is_file()
        else:
            with open(entry, "rb") as fh:
                head = fh.read(4096).decode("utf-8", errors="replace").lstrip()
            ours = entry.is_file() and head.startswith("{") and f'"{what}"' in head
        if not ours:
            raise LoraplaceError(f"--out {target}: {entry} exists and is not an earlier output of this command, "
                                 "so it is not overwritten", "give a new directory, or move that file away first")


def _earlier_output(head: bytes, kind: str) -> bool:
    """Whether the first bytes of an existing file are what this command writes for ``kind``."""
    if kind == "parquet":
        return head.startswith(b"PAR1")
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    if kind == "csv":
        return text.startswith("trial_id,")
    if kind == "json":
        return text.startswith("[") and ('"trial_id"' in text or text.rstrip() == "[]")
    if kind == "peft":
        return text.startswith("{") and '"peft_type"' in text
    return "loraplace export-placement" in text  # every other format names its writer near its top


def _quantize(value: str) -> str:
    choices = typing.get_args(TrainSpec.model_fields["quantize"].annotation)  # the spec's own literal
    if value not in choices:
        raise ConfigError([f"--quantize {value!r}: one of {', '.join(choices)}"], "invalid --quantize")
    return value


def _fill(value: str):
    choices = typing.get_args(Fill)  # the spec's own literal: one list of fill modes
    if value not in choices:
        raise ConfigError([f"--fill {value!r}: one of {', '.join(choices)}"], "invalid --fill")
    return value


def _placement_dict(text: str) -> dict:
    from loraplace.placement import parse_placement

    return parse_placement(text).model_dump(exclude_none=True, exclude_defaults=True)


def main(argv: list[str] | None = None) -> None:
    import warnings

    # Library deprecation chatter is not the user's business on the command line (pytest still shows it).
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\..*")
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="loraplace")
    except LoraplaceError as exc:
        if _STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except PermissionError as exc:  # a folder or file the user may not write (or read): name it
        if _STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {escape(str(exc.filename or exc))}: permission denied\n  hint: this command "
                  "needs access to that path; run it where you may write, or point its --out/--store elsewhere",
                  highlight=False)
        sys.exit(2)
    except _USAGE_ERRORS as exc:  # a mistyped command, option or value: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except _EXITS as exc:
        sys.exit(exc.exit_code)
    except Terminated:
        err.print("[red]terminated[/]")
        sys.exit(143)
    except (*_ABORTS, KeyboardInterrupt):
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, traceback on --debug
        if _STATE["debug"]:
            traceback.print_exc()
        hint = ("the traceback is above: please report it" if _STATE["debug"] else
                "run with --debug for the traceback and report it")
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n  hint: {hint}", highlight=False)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
