"""Peak training memory with activation checkpointing off and on, against loraplace.memory's estimate.

    python benchmarks/bench_memory.py                      # builtin:smollm2-135m, GSM8K slice, batch 8 × 256
    python benchmarks/bench_memory.py --batch 16 --steps 2 --loss-chunk 256

Each setting runs in a fresh process. Two measurements per setting:

* live: the peak of the bytes held by live tensors above the weights during one forward + backward of the
  largest micro-batch, from the torch memory profiler — the quantity the estimate models (on CUDA it is
  ``max_memory_allocated``). The estimate is checked against this one (target: within 25 %).
* resident: the process's peak resident memory during ``steps`` training steps (VmHWM, reset just before) minus
  its resident memory just before (model, data and adapters in place). On a CPU this includes what glibc keeps of
  freed heap pages; it is compared with the estimate × ``CPU_RESIDENT_FACTOR`` plus the adapters' gradients and
  AdamW moments.
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


def live_peak_bytes(model, batch, session, loss_chunk: int | None) -> int:
    """Peak live tensor bytes above those alive at the start, over one forward + backward of ``batch``."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from loraplace.train import autocast, loss_sum

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        with autocast(session.device, session.dtype):
            loss = loss_sum(model, batch, None, loss_chunk)
        (loss / batch.label_tokens).backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(str(session.device))
    totals = [sum(x) for x in sizes]
    model.zero_grad(set_to_none=True)
    return max(totals) - totals[0]


def measure(args) -> dict:
    from bench_train import build_data

    from loraplace.data import DataSpec
    from loraplace.data.batching import batching_mode, make_batch
    from loraplace.memory import CPU_RESIDENT_FACTOR, estimate_activations, hidden_bytes_per_token
    from loraplace.models import causal_lm
    from loraplace.placement import parse_placement
    from loraplace.stepper import batch_order
    from loraplace.train import TrainSpec, set_activation_checkpointing, train
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
        est = estimate_activations(config, biggest.input_ids.numel(), biggest.label_tokens, dtype_bytes,
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
        lm = causal_lm(model)
        set_activation_checkpointing(lm, args.only == "on")
        model.train()
        live = live_peak_bytes(model, biggest.to(session.device), session, args.loss_chunk)
        set_activation_checkpointing(lm, False)
    resident = (peak - before) * 1024
    resident_estimate = activations * CPU_RESIDENT_FACTOR + trainable_state
    return {"checkpointing": args.only, "live_mib": live / 2**20, "estimated_mib": activations / 2**20,
            "estimate_over_live": activations / live, "resident_mib": resident / 2**20,
            "resident_estimate_mib": resident_estimate / 2**20, "resident_over_live": resident / live,
            "tokens": biggest.input_ids.numel(), "labels": biggest.label_tokens, "train_s": seconds,
            "final_loss": out.curve[-1].loss, "dtype": str(session.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from bench_train import add_trial_args

    add_trial_args(parser, steps=3, train_examples=64, eval_examples=8)
    parser.add_argument("--loss-chunk", type=int, default=None, help="train.loss_chunk for both settings")
    parser.add_argument("--only", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args)))
        return
    from bench_train import cpu_kind

    kind = cpu_kind()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, cpu={kind}, "
          f"torch {torch.__version__}, loss_chunk={args.loss_chunk}, {time.strftime('%Y-%m-%d %H:%M')}")
    results = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--only", setting] + [a for a in sys.argv[1:]]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[setting] = r = json.loads(line)
        print(f"checkpointing {setting:>3}: live {r['live_mib']:8.1f} MiB, estimated {r['estimated_mib']:8.1f} MiB "
              f"(estimate/live {r['estimate_over_live']:.2f}); resident {r['resident_mib']:8.1f} MiB "
              f"(resident/live {r['resident_over_live']:.2f}, estimated resident {r['resident_estimate_mib']:.1f}); "
              f"{r['tokens']} tokens / {r['labels']} labels in the largest micro-batch, {r['train_s']:.1f} s, "
              f"final loss {r['final_loss']:.4f}, {r['dtype']}", flush=True)
    off, on = results["off"], results["on"]
    print(f"ratio: live_on_over_off={on['live_mib'] / off['live_mib']:.2f} "
          f"resident_on_over_off={on['resident_mib'] / off['resident_mib']:.2f} "
          f"time_on_over_off={on['train_s'] / off['train_s']:.2f} "
          f"estimate_error_off={abs(off['estimate_over_live'] - 1):.0%} "
          f"estimate_error_on={abs(on['estimate_over_live'] - 1):.0%} cpu={kind}")


if __name__ == "__main__":
    main()
