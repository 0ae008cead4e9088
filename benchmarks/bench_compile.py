"""torch.compile over a study: does compiling pay once its cost is shared by every trial of a placement?

A study runs each placement at several LRs and seeds, one after another in one process (`loraplace run`). With
`train.compile` the first of them compiles; the next ones reuse the traced graph (train._prepare_compile), and a
later process — a resumed study, another runner — finds inductor's kernels in its on-disk cache. This bench runs
the same N trials (one placement, N LRs) in three fresh processes:

  eager      train.compile off (dynamic shapes, as by default)
  cold       compile on, an empty inductor cache (a study's first process on a new machine)
  warm       compile on, the cache the cold run left (a later process)

and prints per-trial times (first step — where compilation happens — and the steady step), the losses (compiled
fp32 must equal eager), and the study-level ratio eager/compiled for N trials and for a longer study
extrapolated from the steady steps. Last line machine-readable:
``steady_ratio=… cold_first_extra_s=… warm_first_extra_s=… study_ratio_n=… break_even_trials=… cpu=…``.

    python benchmarks/bench_compile.py                    # 3 trials × 6 steps, precision auto
    python benchmarks/bench_compile.py --trials 2 --steps 4 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LRS = (2e-4, 1e-3, 3e-3, 1e-2, 5e-4, 2e-3)


def one_process(args) -> None:
    """The child: N trials in one Session, as a study's runner trains them; one JSON line per trial."""
    from bench_train import build_data

    from loraplace.data import DataSpec
    from loraplace.placement import parse_placement
    from loraplace.train import TrainSpec, train
    from loraplace.trial import Session

    train_path, eval_path = build_data(args)
    session = Session(args.model, precision=args.precision)
    splits = session.data(DataSpec(train=train_path, eval=eval_path, max_len=args.max_len))
    plan = session.plan(parse_placement(args.placement), rank=16)
    for i in range(args.trials):
        spec = TrainSpec(steps=args.steps, batch=args.batch, lr=LRS[i % len(LRS)], seed=i, precision=args.precision,
                         checkpointing="off", compile=args.mode != "eager")
        with session.adapter(plan, i) as model:
            out = train(model, splits.train, spec, device=session.device, dtype=session.dtype, pad_id=session.pad_id)
        steady = (out.train_s - out.first_step_s) / max(1, args.steps - 1)
        print("TRIAL " + json.dumps({"first_s": out.first_step_s, "steady_s": steady, "train_s": out.train_s,
                                     "tokens_per_s": out.tokens_per_s, "loss": out.curve[-1].loss,
                                     "dtype": str(session.dtype)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from bench_train import add_trial_args, cpu_kind

    add_trial_args(parser, steps=6, train_examples=64, eval_examples=8)
    parser.add_argument("--placement", default="all")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--study-trials", type=int, default=12, help="trials per placement of the extrapolated study")
    parser.add_argument("--study-steps", type=int, default=40, help="steps per trial of the extrapolated study")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.mode:
        one_process(args)
        return

    print(f"cpu={cpu_kind()}, {os.cpu_count()} cpus, {args.trials} trials × {args.steps} steps of "
          f"{args.placement} r16, batch {args.batch}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    cache = tempfile.mkdtemp(prefix="bench_compile_inductor_")
    results: dict[str, list[dict]] = {}
    for mode in ("eager", "cold", "warm"):
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("TRIAL ")]
        print(f"  {mode:<6} ({time.perf_counter() - t0:.0f} s in all, {results[mode][0]['dtype']}):", flush=True)
        for i, r in enumerate(results[mode]):
            print(f"    trial {i}: first step {r['first_s']:6.1f} s, steady {r['steady_s']:5.2f} s/step, "
                  f"train {r['train_s']:6.1f} s, loss {r['loss']:.4f}", flush=True)

    def steady(mode: str) -> float:
        return statistics.median(r["steady_s"] for r in results[mode])

    # The first step's extra over a steady step, in the first trial of a process (eager's first step pays for
    # growing the heap too: that part is not compilation, so it is subtracted via eager's own extra).
    def first_extra(mode: str) -> float:
        return results[mode][0]["first_s"] - steady(mode)

    eager_extra = first_extra("eager")
    compiled_steady = statistics.median([steady("cold"), steady("warm")])
    ratio = steady("eager") / compiled_steady
    cold_extra, warm_extra = first_extra("cold") - eager_extra, first_extra("warm") - eager_extra
    n_ratio = sum(r["train_s"] for r in results["eager"]) / sum(r["train_s"] for r in results["cold"])
    n, s = args.study_trials, args.study_steps
    eager_study = n * s * steady("eager")
    compiled_study = n * s * compiled_steady + cold_extra
    saved_per_trial = s * (steady("eager") - compiled_steady)
    break_even = cold_extra / saved_per_trial if saved_per_trial > 0 else float("inf")
    losses = [(a["loss"], b["loss"]) for a, b in zip(results["eager"], results["cold"], strict=True)]
    print(f"\nsteady step: eager {steady('eager'):.2f} s, compiled {compiled_steady:.2f} s → {ratio:.2f}×")
    reuse = [r["first_s"] - r["steady_s"] for r in results["cold"][1:]]
    print(f"compilation (first step beyond eager's): cold cache +{cold_extra:.0f} s, warm cache +{warm_extra:.0f} s; "
          f"later trials of the same graph in the process: {statistics.mean(reuse) if reuse else 0:.1f} s")
    print(f"these {args.trials} trials: eager/compiled(cold) = {n_ratio:.2f}×; a placement of {n} trials × {s} steps "
          f"(extrapolated): {eager_study / compiled_study:.2f}×; compilation pays after {break_even:.1f} trials")
    print(f"losses eager vs compiled: {losses}")
    print(f"steady_ratio={ratio:.3f} cold_first_extra_s={cold_extra:.0f} warm_first_extra_s={warm_extra:.0f} "
          f"study_ratio_n={n_ratio:.3f} break_even_trials={break_even:.1f} cpu={cpu_kind()}")


if __name__ == "__main__":
    main()
