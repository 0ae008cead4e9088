"""The GPU check: everything a CUDA machine must show before CUDA defaults are set, in one call (≤ 8 minutes).

    python benchmarks/gpu_check.py             # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run   # anywhere: says what would run and why the CUDA parts skip

Parts, each with its own time limit, each printing its own last line:

1. **equality** — the fused-vs-alone and stopped-vs-continued tests (``tests/test_fused.py``,
   ``tests/test_stepper.py``) on the CUDA device (the tests' sessions pick CUDA when it is there), fp32 as the
   tests are written, then the bf16 fused-vs-alone comparison that ``bench_fused.py`` prints (max relative loss
   difference).
2. **bench_train** — ``benchmarks/bench_train.py --reps 1`` on CUDA: our loop against HF Trainer + PEFT (fp32 and
   bf16 ratios, MFU, memory).
3. **bench_fused** — ``benchmarks/bench_fused.py`` (6 mixed trials, batch 8, SmolLM2-135M-shaped random model):
   fused against one at a time; the issue's goal is ≥ 4×.

The last line is one summary: ``gpu_check cuda=… equality=… ratio_vs_hf_fp32=… ratio_vs_hf_bf16=… mfu=…
fused_speedup=… max_loss_rel_diff=… seconds=…``. Set ``loraplace.fused.CUDA_FUSE_VERIFIED`` (and record the line in
benchmarks/RESULTS.md) only from a run where equality passed and fused_speedup > 1.

Without CUDA (CI runs ``--dry-run``), every CUDA part is skipped with its reason, the scripts it would run are
checked to exist and to parse their arguments, and the summary says ``cuda=none``. On a machine with no internet,
install from carried wheels first: ``pip install --no-index --find-links WHEELS -e '.[dev]'`` (RESULTS.md says how
the wheels are made).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = {"equality": 180, "bench_train": 180, "bench_fused": 120}  # ≤ 8 minutes together


def cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, torch.cuda.get_device_name(0)


def run(name: str, args: list[str], timeout_s: int) -> tuple[bool, str]:
    """(passed, its output's last line), within ``timeout_s``."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"{name}: over its {timeout_s} s"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    print(f"[{name}] exit {done.returncode} in {time.perf_counter() - t0:.0f} s: {last}", flush=True)
    return done.returncode == 0, last


def field(line: str, key: str) -> str:
    match = re.search(rf"\b{key}=(\S+)", line)
    return match.group(1) if match else "—"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would run; run no CUDA part")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cuda, device = cuda_available()
    py = sys.executable
    parts = {
        "equality": [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_fused.py",
                     "tests/test_stepper.py"],
        "bench_train": [py, "benchmarks/bench_train.py", "--reps", "1", "--steps", "20"],
        "bench_fused": [py, "benchmarks/bench_fused.py", "--trials", "6", "--batch", "8", "--steps", "20",
                        "--precision", "bf16"],
    }
    for script in ("benchmarks/bench_train.py", "benchmarks/bench_fused.py", "tests/test_fused.py"):
        if not (ROOT / script).is_file():
            print(f"missing {script}", flush=True)
            return 2
    if args.dry_run or not cuda:
        why = "--dry-run" if args.dry_run else f"no CUDA ({device})"
        for name, command in parts.items():
            print(f"[{name}] skipped ({why}): would run {' '.join(command[1:])}", flush=True)
        for script in ("benchmarks/bench_train.py", "benchmarks/bench_fused.py"):  # their options still parse
            ok, _ = run(f"{script} --help", [py, script, "--help"], 60)
            if not ok:
                return 1
        print(f"gpu_check cuda=none equality=skipped ratio_vs_hf_fp32=— ratio_vs_hf_bf16=— mfu=— fused_speedup=— "
              f"max_loss_rel_diff=— seconds={time.perf_counter() - t0:.0f} ({why})", flush=True)
        return 0
    results = {name: run(name, command, BUDGET_S[name]) for name, command in parts.items()}
    equality = "passed" if results["equality"][0] else "FAILED"
    train_line, fused_line = results["bench_train"][1], results["bench_fused"][1]
    print(f"gpu_check cuda={device.replace(' ', '_')} equality={equality} "
          f"ratio_vs_hf_fp32={field(train_line, 'ratio_vs_hf_fp32')} "
          f"ratio_vs_hf_bf16={field(train_line, 'ratio_vs_hf_bf16')} mfu={field(train_line, 'mfu')} "
          f"fused_speedup={field(fused_line, 'fused_speedup')} "
          f"max_loss_rel_diff={field(fused_line, 'max_loss_rel_diff')} seconds={time.perf_counter() - t0:.0f}",
          flush=True)
    return 0 if all(ok for ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
