"""Each speed lever of the trial engine switched off alone, measured against the defaults in the same run, with
the speedup predicted from FLOP/token counts next to the measured one. Plus a torch-profiler breakdown of where
a default training step spends its time.

    python benchmarks/bench_levers.py                 # builtin:smollm2-135m, GSM8K slice (or builtin data)
    python benchmarks/bench_levers.py --steps 6 --no-profile

Levers:
  packing        several examples per row with block-diagonal attention, instead of padding to the longest
  label logits   LM-head logits only at label positions, instead of at every position (HF's default)
"""

from __future__ import annotations

import argparse
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


def full_logits_loss_sum(model, batch, decoder=None):
    """The lever switched off: logits for every position, as HF's CausalLM forward computes them."""
    causal_lm = models.causal_lm(model)
    decoder = decoder if decoder is not None else causal_lm.base_model
    hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    logits = causal_lm.get_output_embeddings()(hidden).float()  # [B, T, V]
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
    return F.cross_entropy(flat, batch.targets, reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--data", default="auto", help="auto | builtin | a GSM8K-format JSONL")
    parser.add_argument("--train-examples", type=int, default=160)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()

    from bench_train import build_data

    from loraplace.data import DataSpec
    from loraplace.placement import parse_placement
    from loraplace.train import TrainSpec, train
    from loraplace.trial import Session

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
          f", {time.strftime('%Y-%m-%d %H:%M')}")
    train_path, eval_path = build_data(args)
    session = Session(args.model, precision="fp32")
    splits = session.data(DataSpec(train=train_path, eval=eval_path, max_len=args.max_len))
    plan = session.plan(parse_placement("all"), rank=16)
    lengths = [len(x) for x in splits.train.ids]
    vocab = session.model.config.vocab_size
    d_model = session.model.config.hidden_size

    def run(label: str, **overrides) -> float:
        spec = TrainSpec(steps=args.steps, batch=args.batch, lr=2e-4, seed=0, precision="fp32", **overrides)
        with session.adapter(plan, 0) as model:
            out = train(model, splits.train, spec, device=session.device, dtype=session.dtype,
                        pad_id=session.pad_id)
        print(f"  {label:<22} {out.tokens_per_s:7.1f} tok/s  ({out.train_s:.1f} s)", flush=True)
        return out.tokens_per_s

    configs = {"defaults": ({}, None), "no packing (pad)": ({"packing": False}, None),
               "logits at every position": ({}, full_logits_loss_sum)}
    measured: dict[str, list[float]] = {k: [] for k in configs}
    original = train_module.loss_sum
    for _ in range(args.reps):
        for label, (overrides, loss_fn) in configs.items():
            train_module.loss_sum = loss_fn or original
            try:
                measured[label].append(run(label, **overrides))
            finally:
                train_module.loss_sum = original
    med = {k: statistics.median(v) for k, v in measured.items()}

    # Predictions from FLOP counts. Packing vs padding: positions each mode computes for the same batches
    # (packing's own rows are as wide as the longest example, so its fill is not 100 % either).
    from loraplace.data.batching import make_batch
    from loraplace.train import batch_order

    order = batch_order(len(splits.train), args.batch, args.steps, 0)
    positions = {mode: sum(make_batch(splits.train, idx, mode, session.pad_id).input_ids.numel() for idx in order)
                 for mode in ("pack", "pad")}
    pad_factor = positions["pad"] / positions["pack"]
    # Head FLOPs per position: 4·V·d with full logits, only at label positions with the lever on.
    head = vocab * d_model
    body = session.arch.total_params - head  # tied embeddings: the head is the embedding matrix
    label_frac = splits.train.label_tokens / sum(lengths)  # labels per real token
    logits_factor = (body + head) / (body + head * label_frac)
    print("\nlever                   measured speedup   predicted")
    print(f"  packing                {med['defaults'] / med['no packing (pad)']:6.2f}×          "
          f"{pad_factor:6.2f}×  (positions padded / packed: {positions['pad']:,} / {positions['pack']:,})")
    print(f"  label-only logits      {med['defaults'] / med['logits at every position']:6.2f}×          "
          f"{logits_factor:6.2f}×  (head FLOPs at {label_frac:.0%} of positions)")

    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        spec = TrainSpec(steps=3, batch=args.batch, lr=2e-4, seed=0, precision="fp32")
        with session.adapter(plan, 0) as model, profile(activities=[ProfilerActivity.CPU]) as prof:
            train(model, splits.train, spec, device=session.device, dtype=session.dtype, pad_id=session.pad_id)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        groups = {"matmul (mm/addmm/bmm/linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
                  "attention (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
                  "softmax / cross-entropy": ("aten::_log_softmax", "aten::nll_loss", "aten::_softmax"),
                  "optimizer (AdamW)": ("aten::_fused_adamw", "aten::_foreach", "Optimizer"),
                  "elementwise / norms / copies": ("aten::mul", "aten::add", "aten::silu", "aten::pow",
                                                   "aten::copy_", "aten::rsqrt", "aten::mean", "aten::cat",
                                                   "aten::index", "aten::fill_", "aten::zero_", "aten::neg",
                                                   "aten::clone", "aten::sum", "aten::div", "aten::embedding")}
        shares = {g: 0.0 for g in groups} | {"other": 0.0}
        for e in events:
            g = next((g for g, keys in groups.items() if e.key.startswith(keys)), "other")
            shares[g] += e.self_cpu_time_total
        print("\nwhere a default training step spends its time (torch profiler, self CPU time, 3 steps):")
        for g, t in sorted(shares.items(), key=lambda kv: -kv[1]):
            print(f"  {g:<32} {100 * t / total:5.1f} %")
        print("\ntop 12 ops by self CPU time:")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
    print(" ".join(f"{k.replace(' ', '_')}={v:.1f}" for k, v in med.items()))


if __name__ == "__main__":
    main()
