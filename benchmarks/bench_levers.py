"""Each speed lever of the trial engine switched on or off alone, measured against the defaults in the same run,
with the speedup predicted from FLOP/position counts next to the measured one; plus a torch-profiler breakdown of
where a default training step spends its time (in the run's precision: bf16 where the CPU has it natively).

    python benchmarks/bench_levers.py                 # builtin:smollm2-135m, GSM8K slice (or builtin data)
    python benchmarks/bench_levers.py --steps 6 --no-profile --precision fp32

Levers (the defaults are TrainSpec's: packing on, logits at labels, dynamic shapes, no compile, loss chunks on CPU):
  packing         several examples per row with block-diagonal attention, instead of padding to the longest
  label logits    LM-head logits only at label positions, instead of at every position (HF's default)
  static shapes   every forward one [rows, width] block (more padding positions, one shape)
  compile         torch.compile of the decoder on static shapes; its first step (the compilation) is counted
  loss chunks     LM head + loss over 256 labels at a time, recomputed in backward (on by default on a CPU)
  checkpointing   per-layer activation checkpointing (memory lever: one more forward of the body)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loraplace import models
from loraplace import train as train_module

ROOT = Path(__file__).resolve().parents[1]


def full_logits_loss_sum(model, batch, decoder=None, chunk=None):
    """The lever switched off: logits for every position, as HF's CausalLM forward computes them."""
    causal_lm = models.causal_lm(model)
    decoder = decoder if decoder is not None else causal_lm.base_model
    hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    logits = causal_lm.get_output_embeddings()(hidden).float()  # [B, T, V]
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
    return F.cross_entropy(flat, batch.targets, reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from bench_train import add_trial_args

    add_trial_args(parser, steps=8, train_examples=160, eval_examples=16)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated lever labels to run (defaults always run)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()

    from bench_train import build_data, cpu_kind, flops_per_step

    from loraplace.data import DataSpec
    from loraplace.data.batching import make_batch, static_batches, static_shape
    from loraplace.placement import parse_placement
    from loraplace.stepper import batch_order
    from loraplace.train import TrainSpec, train
    from loraplace.trial import Session

    train_path, eval_path = build_data(args)
    session = Session(args.model, precision=args.precision)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, cpu={cpu_kind()}, "
          f"torch {torch.__version__}, dtype {session.dtype}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    splits = session.data(DataSpec(train=train_path, eval=eval_path, max_len=args.max_len))
    plan = session.plan(parse_placement("all"), rank=16)
    order = batch_order(len(splits.train), args.batch, args.steps, 0)
    base = dict(steps=args.steps, batch=args.batch, lr=2e-4, seed=0, precision=args.precision, checkpointing="off")

    def run(label: str, **overrides) -> tuple[float, float]:
        spec = TrainSpec(**(base | overrides))
        with session.adapter(plan, 0) as model:
            out = train(model, splits.train, spec, device=session.device, dtype=session.dtype,
                        pad_id=session.pad_id)
        print(f"  {label:<26} {out.tokens_per_s:7.1f} tok/s  ({out.train_s:.1f} s, first step {out.first_step_s:.1f} s,"
              f" final loss {out.curve[-1].loss:.4f})", flush=True)
        return out.tokens_per_s, out.curve[-1].loss

    shares: dict[str, float] = {}
    if not args.no_profile:
        shares = profile(session, plan, splits, base, args)

    configs = {"defaults": ({}, None), "no packing (pad)": ({"packing": False}, None),
               "logits at every position": ({}, full_logits_loss_sum), "static shapes": ({"static_shapes": True}, None),
               "compile (static shapes)": ({"compile": True}, None),
               "whole loss (no chunks)": ({"loss_chunk": 0}, None), "checkpointing on": ({"checkpointing": "on"}, None)}
    if args.only:
        keep = {"defaults", *(x.strip() for x in args.only.split(","))}
        configs = {k: v for k, v in configs.items() if k in keep}
    measured: dict[str, list[float]] = {k: [] for k in configs}
    losses: dict[str, float] = {}
    original = train_module.loss_sum
    # A first run pays for growing the heap and building oneDNN's kernels; whichever lever ran first would look
    # slow. So one untimed warm-up run, and with --reps 2 the second pass runs in reverse order.
    print("  (warm-up run, not counted)")
    run("warm-up", **{"steps": 2})
    for rep in range(args.reps):
        for label, (overrides, loss_fn) in (configs.items() if rep % 2 == 0 else reversed(configs.items())):
            train_module.loss_sum = loss_fn or original
            try:
                tps, losses[label] = run(label, **overrides)
                measured[label].append(tps)
            finally:
                train_module.loss_sum = original
    med = {k: statistics.median(v) for k, v in measured.items()}

    # Predictions from FLOP and position counts of exactly these steps.
    lengths = [len(x) for x in splits.train.ids]
    real = sum(lengths[int(i)] for idx in order for i in idx)
    labels = sum(make_batch(splits.train, idx, "pack", session.pad_id).label_tokens for idx in order)
    vocab, d_model = session.model.config.vocab_size, session.model.config.hidden_size
    head = vocab * d_model
    block_linear = sum(s.in_features * s.out_features for s in session.arch.sites.values())
    seq_sq = sum(lengths[int(i)] ** 2 / 2 for idx in order for i in idx)
    total = flops_per_step(plan, session.arch.num_layers, d_model, real, labels, seq_sq, head, block_linear)
    positions = {mode: sum(make_batch(splits.train, idx, mode, session.pad_id).input_ids.numel() for idx in order)
                 for mode in ("pack", "pad")}
    shape = static_shape(splits.train, order, "pack", 1)
    positions["static"] = sum(len(static_batches(splits.train, idx, "pack", session.pad_id, shape, 1))
                              for idx in order) * shape[0] * shape[1]
    label_frac = labels / real
    attention_fwd = 4 * d_model * session.arch.num_layers * seq_sq
    forward_body = (2 * block_linear + 2 * plan.trainable_params) * real + attention_fwd
    predicted = {
        "no packing (pad)": (positions["pad"] / positions["pack"],
                             f"positions padded / packed: {positions['pad']:,} / {positions['pack']:,}"),
        "logits at every position": ((total + 4 * head * (real - labels)) / total,
                                     f"head FLOPs at {label_frac:.0%} of positions"),
        "static shapes": (positions["pack"] / positions["static"],
                          f"positions packed / static {shape[0]}×{shape[1]} blocks: {positions['pack']:,} / "
                          f"{positions['static']:,}"),
        "compile (static shapes)": (None, "at most 1 / (1 − elementwise share) = "
                                    f"{1 / max(1e-9, 1 - shares.get('elementwise / norms / copies', 0) / 100):.2f}"
                                    "× on top of static shapes, if every elementwise op were fused away"
                                    if shares else "no profile run"),
        "whole loss (no chunks)": (total / (total + 2 * head * labels), "chunks: one more LM-head forward per label"),
        "checkpointing on": (total / (total + forward_body), "one more forward of the body"),
    }
    print("\nlever (alone vs defaults)   measured  predicted   final loss (defaults "
          f"{losses['defaults']:.4f})")
    for label in configs:
        if label == "defaults":
            continue
        # For a lever that is *on* by default the speedup is defaults/off; for one that is off, on/defaults.
        on_by_default = label in ("no packing (pad)", "logits at every position", "whole loss (no chunks)")
        speed = med["defaults"] / med[label] if on_by_default else med[label] / med["defaults"]
        pred, why = predicted[label]
        pred_s = f"{pred:6.2f}×" if pred else "     —"
        print(f"  {label:<26} {speed:6.2f}×   {pred_s}   {losses[label]:.4f}   ({why})")
    print(" ".join(f"{k.replace(' ', '_')}={v:.1f}" for k, v in med.items()) + f" cpu={cpu_kind()}")


def matmul_shapes(prof, top: int = 16) -> None:
    """The matmuls of the profiled steps by operand shapes, with the rate each achieved: which ones run far below
    the peak the bench measures at its start (on the AVX2 EPYC, fp32: the base projections at ~87 % of the
    2-thread peak, the LM head's forward at ~half; RESULTS.md 2026-12-03)."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm", "aten::bmm") or not e.self_cpu_time_total:
            continue
        a, b = e.input_shapes[1:3] if e.key == "aten::addmm" else e.input_shapes[:2]
        flops = 2 * a[-2] * a[-1] * b[-1] * (a[0] if e.key == "aten::bmm" else 1)
        seconds = e.self_cpu_time_total / 1e6
        rows.append((seconds, e.count, f"{e.key[6:]} {a} x {b}", flops * e.count / seconds / 1e12))
    total = sum(r[0] for r in rows)
    print(f"\nmatmuls by operand shapes ({total:.2f} s self CPU time; top {top}):")
    for seconds, count, shapes, tflops in sorted(rows, reverse=True)[:top]:
        print(f"  {seconds:6.2f} s {100 * seconds / total:5.1f} %  {count:5d} calls  {shapes:<38} {tflops:.3f} TFLOP/s")


def profile(session, plan, splits, base, args) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from loraplace.train import TrainSpec, train

    # One untimed step first (heap growth, oneDNN's kernel builds), then one profiled step: the steady state. (Three
    # profiled steps with shapes recorded took 12.7 GB of RSS, against 5.5 GB for one.)
    for steps, profiled in ((1, False), (1, True)):
        spec = TrainSpec(**(base | {"steps": steps}))
        recorder = (torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) if profiled
                    else contextlib.nullcontext())
        with session.adapter(plan, 0) as model, recorder as prof:
            train(model, splits.train, spec, device=session.device, dtype=session.dtype, pad_id=session.pad_id)
    matmul_shapes(prof)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"matmul (mm/addmm/bmm/linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
              "attention (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention"),
              "softmax / cross-entropy": ("aten::_log_softmax", "aten::nll_loss", "aten::_softmax"),
              "optimizer (AdamW)": ("aten::_fused_adamw", "aten::_foreach", "Optimizer"),
              "dtype casts (to / copy)": ("aten::to", "aten::_to_copy", "aten::copy_"),
              "elementwise / norms / copies": ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt",
                                               "aten::mean", "aten::cat", "aten::index", "aten::fill_",
                                               "aten::zero_", "aten::neg", "aten::clone", "aten::sum", "aten::div",
                                               "aten::embedding", "aten::sigmoid", "aten::where", "aten::masked")}
    shares = {g: 0.0 for g in groups} | {"other": 0.0}
    for e in events:
        g = next((g for g, keys in groups.items() if e.key.startswith(keys)), "other")
        shares[g] += e.self_cpu_time_total
    print(f"\nwhere a default training step spends its time ({session.dtype}; torch profiler, self CPU time, "
          "one step after an unprofiled one):")
    for g, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<32} {100 * t / total:5.1f} %")
    print("\ntop 15 ops by self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40), flush=True)
    return {g: 100 * t / total for g, t in shares.items()}


if __name__ == "__main__":
    main()
