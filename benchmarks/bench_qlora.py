"""QLoRA on this machine: the same LoRA trial on the full-precision base and on the base loaded 4-bit (nf4, double
quantization) by bitsandbytes — training speed, peak memory, base weight bytes and eval loss.

    python benchmarks/bench_qlora.py                     # builtin:smollm2-135m, GSM8K slice, 6 steps × batch 8
    python benchmarks/bench_qlora.py --steps 10 --quantize nf4 fp4 int8

Each base runs in a fresh process (peak resident memory is per process). ``none`` trains in the dtype
``precision: auto`` gives here (bf16 where the CPU has native bf16, else fp32); a 4-bit base dequantizes each
linear's weight to that dtype for its matmul. Last line (machine-readable):
``speed_nf4_vs_none=… peak_mem_nf4_vs_none=… loaded_mem_nf4_vs_none=…
base_bytes_nf4_vs_none=… eval_loss_nf4=… eval_loss_none=… cpu=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import add_trial_args, build_data, cpu_kind  # noqa: E402 - the benchmarks' shared data and machine kind


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next((int(line.split()[1]) for line in fh if line.startswith(field + ":")), 0)


def run_one(args) -> dict:
    """One base in this (fresh) process: the child side of main()."""
    from loraplace.data import DataSpec
    from loraplace.memory import base_weight_bytes
    from loraplace.placement import parse_placement
    from loraplace.train import TrainSpec
    from loraplace.trial import Session, TrialSpec, run_trial

    session = Session(args.model, quantize=args.only)
    rss_loaded_mb = _vm_kb("VmRSS") / 1024  # the process with the base loaded, before any training
    # of which anonymous (the tensors; the rest is file-backed: a checkpoint the loader mapped, reclaimable)
    anon_loaded_mb = _vm_kb("RssAnon") / 1024
    spec = TrialSpec(model=args.model, data=DataSpec(train=args.train_file, eval=args.eval_file, max_len=args.max_len),
                     placement=parse_placement(args.placement), budget=args.budget,
                     train=TrainSpec(steps=args.steps, batch=args.batch, lr=args.lr, quantize=args.only))
    outcome = run_trial(spec, session=session)
    assert outcome.metrics is not None, outcome.failure
    dtype_bytes = torch.finfo(session.dtype).bits // 8
    return {"tokens_per_s": outcome.metrics.tokens_per_s, "train_s": outcome.metrics.train_s,
            "first_step_s": outcome.timings.first_step_s, "eval_loss": outcome.metrics.eval_loss,
            "peak_mem_mb": outcome.metrics.peak_mem_mb, "rss_loaded_mb": rss_loaded_mb,
            "anon_loaded_mb": anon_loaded_mb,
            "dtype": str(session.dtype).removeprefix("torch."),
            "trainable_params": outcome.trainable_params,
            "base_bytes": base_weight_bytes(session.arch, dtype_bytes, args.only)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trial_args(ap, steps=6, train_examples=64, eval_examples=32, precision=False)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--placement", default="all")
    ap.add_argument("--budget", type=int, default=1_000_000)
    ap.add_argument("--quantize", nargs="+", default=["nf4"], help="the 4-/8-bit bases to compare with none")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--train-file", help=argparse.SUPPRESS)
    ap.add_argument("--eval-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one(args)))
        return
    args.train_file, args.eval_file = build_data(args)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, cpu={cpu_kind()}, "
          f"torch {torch.__version__}; {args.model}, {args.placement} at a {args.budget:,} budget, "
          f"{args.steps} steps × batch {args.batch}, max_len {args.max_len}")
    results = {}
    for base in ["none", *args.quantize]:
        cmd = [sys.executable, __file__, "--only", base, "--train-file", args.train_file, "--eval-file",
               args.eval_file] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                  ("model", "steps", "batch", "max_len", "lr", "placement", "budget")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{base}: {done.stderr[-2000:]}")
        results[base] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[base]
        print(f"  {base:5s} compute {r['dtype']:8s} {r['tokens_per_s']:7.1f} tok/s  first step "
              f"{r['first_step_s']:5.1f} s  resident after load {r['rss_loaded_mb']:6.0f} MiB "
              f"({r['anon_loaded_mb']:.0f} anonymous), peak "
              f"{r['peak_mem_mb']:6.0f} MiB  base weights {r['base_bytes'] / 2**20:6.1f} MiB  eval loss "
              f"{r['eval_loss']:.4f}  ({r['trainable_params']:,} trainable)")
    none = results["none"]
    for base in args.quantize:
        r = results[base]
        print(f"speed_{base}_vs_none={r['tokens_per_s'] / none['tokens_per_s']:.2f} "
              f"peak_mem_{base}_vs_none={r['peak_mem_mb'] / none['peak_mem_mb']:.2f} "
              f"loaded_mem_{base}_vs_none={r['rss_loaded_mb'] / none['rss_loaded_mb']:.2f} "
              f"base_bytes_{base}_vs_none={r['base_bytes'] / none['base_bytes']:.2f} "
              f"eval_loss_{base}={r['eval_loss']:.4f} eval_loss_none={none['eval_loss']:.4f} cpu={cpu_kind()}")


if __name__ == "__main__":
    main()
