"""Peak training memory with activation checkpointing off and on, against loraplace.memory's estimate.

    python benchmarks/bench_memory.py                      # builtin:smollm2-135m, GSM8K slice, batch 8 × 256
    python benchmarks/bench_memory.py --batch 16 --steps 2

Each setting runs in a fresh process (a freed CPU allocation is not always returned to the OS, so a second
measurement in one process would read the first one's pages). Measured = the process's peak resident memory
during training (VmHWM, reset just before) minus its resident memory just before (model, data and adapters already
in place). Estimated = activations of the largest micro-batch (with its real label count) + the adapters'
gradients and AdamW moments, which appear during the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(args) -> dict:
    from bench_train import build_data

    from loraplace.data import DataSpec
    from loraplace.data.batching import batching_mode, make_batch
    from loraplace.memory import estimate_activations, hidden_bytes_per_token
    from loraplace.placement import parse_placement
    from loraplace.train import TrainSpec, batch_order, train
    from loraplace.trial import Session

    train_path, eval_path = build_data(args)
    session = Session(args.model, precision=args.precision)
    splits = session.data(DataSpec(train=train_path, eval=eval_path, max_len=args.max_len))
    plan = session.plan(parse_placement("all"), rank=16)
    spec = TrainSpec(steps=args.steps, batch=args.batch, lr=2e-4, precision=args.precision,
                     checkpointing=args.only, loss_chunk=args.loss_chunk)
    with session.adapter(plan, 0) as model:
        mode = batching_mode(model, spec.packing)
        batches = [make_batch(splits.train, idx, mode, session.pad_id)
                   for idx in batch_order(len(splits.train), args.batch, args.steps, 0)]
        biggest = max(batches, key=lambda b: b.input_ids.numel())
        dtype_bytes = torch.finfo(session.dtype).bits // 8
        config = session.model.config
        packed = tuple(biggest.input_ids.shape) if mode == "pack" else None
        est = estimate_activations(config, biggest.input_ids.numel(), biggest.label_tokens, dtype_bytes, packed,
                                   args.loss_chunk)
        activations = (est.checkpointed_bytes(hidden_bytes_per_token(config, dtype_bytes)) if args.only == "on"
                       else est.full_bytes)
        trainable_state = 12 * plan.trainable_params  # fp32 gradient + two AdamW moments (weights already held)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        before = rss_kb("VmRSS")
        t0 = time.perf_counter()
        out = train(model, splits.train, spec, device=session.device, dtype=session.dtype, pad_id=session.pad_id)
        seconds = time.perf_counter() - t0
        peak = rss_kb("VmHWM")
    measured = (peak - before) * 1024
    estimated = activations + trainable_state
    return {"checkpointing": args.only, "measured_mib": measured / 2**20, "estimated_mib": estimated / 2**20,
            "estimate_over_measured": estimated / measured if measured else None, "tokens": biggest.input_ids.numel(),
            "train_s": seconds, "final_loss": out.curve[-1].loss, "dtype": str(session.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--data", default="auto", help="auto | builtin | a GSM8K-format JSONL")
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--eval-examples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--loss-chunk", type=int, default=None, help="train.loss_chunk for both settings")
    parser.add_argument("--only", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args)))
        return
    with open("/proc/cpuinfo") as fh:
        cpu = fh.read()
    kind = "amx" if "amx_bf16" in cpu else "avx512_bf16" if "avx512_bf16" in cpu else "avx2"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, cpu={kind}, "
          f"torch {torch.__version__}, loss_chunk={args.loss_chunk}, {time.strftime('%Y-%m-%d %H:%M')}")
    results = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--only", setting] + [a for a in sys.argv[1:]]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[setting] = json.loads(line)
        r = results[setting]
        print(f"checkpointing {setting:>3}: measured {r['measured_mib']:8.1f} MiB, estimated {r['estimated_mib']:8.1f} "
              f"MiB (estimate/measured {r['estimate_over_measured']:.2f}), {r['tokens']} tokens in the largest "
              f"micro-batch, {r['train_s']:.1f} s, final loss {r['final_loss']:.4f}, {r['dtype']}")
    off, on = results["off"], results["on"]
    print(f"ratio: peak_mem_on_over_off={on['measured_mib'] / off['measured_mib']:.2f} "
          f"time_on_over_off={on['train_s'] / off['train_s']:.2f} "
          f"estimate_error_off={abs(off['estimate_over_measured'] - 1):.0%} "
          f"estimate_error_on={abs(on['estimate_over_measured'] - 1):.0%} cpu={kind}")


if __name__ == "__main__":
    main()
