"""Placement commands: ``plan`` (dry run), ``probe`` (importance scores) and ``export-placement`` (a plan written for
PEFT / TRL / axolotl / LLaMA-Factory / torchtune)."""

from __future__ import annotations

import json
import sys

import typer
from rich.markup import escape

from loraplace.cli.common import (
    ALLOW_UNASSIGNED_HELP,
    AT_HELP,
    DEFAULT_PROBE_DATA,
    FILL_HELP,
    FLAG,
    _Command,
    app,
    at_values,
    err,
    fill_option,
    out,
    parse_kv,
    quantize_option,
)
from loraplace.cli.outputs import output_dir, output_file
from loraplace.cli.progress import probe_progress
from loraplace.data import DataSpec
from loraplace.errors import ConfigError, LoraplaceError
from loraplace.placement.spec import (
    DEFAULT_AUTO_METHOD,
    DEFAULT_FILL,
    DEFAULT_RANK,
    DEFAULT_WARMUP_LR,
    DEFAULT_WARMUP_STEPS,
    TOP_METHODS,
    measure_of,
)


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

    quantize_option(quantize)
    result, config = resolve_plan(model, placement, rank, budget, fill, model_config, data, max_len,
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
        described = result.to_dict()
        # One figure for the base as it is loaded (quantized or not): the plan alone knows only 16-bit weights.
        described["memory_estimate"] |= {"base_weights_bytes": base_bytes, "base_weights_bf16_bytes": bf16_bytes,
                                         "quantize": quantize}
        out.print_json(json.dumps(described | {"training_memory": {
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


def resolve_plan(model: str, placement: str | dict, rank: int | None, budget: int | None, fill: str | None,
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
    fill = fill_option(fill) if fill is not None else DEFAULT_FILL
    if allow_unassigned:
        spec = spec.model_copy(update={"allow_unassigned": True})
    if spec.auto is not None:
        data = data if data is not None else DEFAULT_PROBE_DATA
        session, tokenized = probe_session(model, data, max_len, quiet)
        with probe_progress(quiet, spec.auto.batches) as progress:
            result = session.plan(spec, budget=budget, fill=fill, data=tokenized, data_key=data, progress=progress)
        return result, session.model.config
    config = model_config_of(model, overrides or None, model_type)  # read once: the plan and the memory lines
    return plan_for_model(model, spec, rank=rank, budget=budget, fill=fill, config=config), config


def probe_session(model: str, data: str, max_len: int, quiet: bool, quantize: str = "none"):
    """The loaded model and the tokenised probe data (the whole source: the probe only reads it)."""
    from loraplace.data import load_tokenized
    from loraplace.models import check_max_len, load_config
    from loraplace.trial import Session

    check_max_len(load_config(model), max_len, model)  # before the weights load
    if not quiet:
        err.print(f"loading {model} and tokenising {data} for the importance probe …", highlight=False)
    session = Session(model, quantize=quantize)
    tokenized, _ = load_tokenized(data, session.tokenizer, DataSpec(train=data, max_len=max_len))
    if len(tokenized) == 0:
        raise LoraplaceError(f"{data}: no usable example for the probe", "check --data and --max-len")
    return session, tokenized


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
    quantize_option(quantize)
    if out_dir is not None:
        output_dir(out_dir, {"probe.json": "sites"})
    session, tokenized = probe_session(model, data, max_len, as_json, quantize)
    with probe_progress(as_json, batches) as progress:
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
        output_file(output, to, inputs)
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

        rec = recommend_from_store(source, name, budget, metric or "eval_loss", at_values(at))
        model, spec_placement = rec.model, rec.placement_spec
        measured = TrialSpec.model_validate(rec.trial_spec)  # what the recommended trials ran with
        hints = TrainingHints(lr=measured.train.lr, batch=measured.train.batch, steps=measured.train.steps,
                              max_len=measured.data.max_len, warmup=measured.train.warmup or None,
                              schedule=measured.train.schedule, quantize=measured.train.quantize,
                              double_quant=measured.train.bnb_4bit_use_double_quant)
        err.print(f"recommended by {source}: {rec.chosen.placement} ({rec.chosen.size}), "
                  f"{rec.chosen.trainable_params:,} trainable parameters", highlight=False)
        if rec.incomplete is not None:
            err.print(f"[yellow]warning:[/] {escape(rec.incomplete)}", highlight=False)
        result, config = resolve_plan(model, spec_placement, None, None, fill, model_config, data, max_len,
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
        hints = TrainingHints(quantize=quantize_option(quantize or "none"))
        result, config = resolve_plan(model, placement or "all", rank, budget, fill, model_config, data, max_len,
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

        write_text_atomic(output_file(output, to, inputs), exported.text)
        err.print(f"{to}: {output} ({exported.params:,} trainable parameters"
                  f"{', exact' if exported.exact else ''})", highlight=False)
    else:
        sys.stdout.write(exported.text)
