"""The same study on the local backend and on a 2-worker local Ray cluster (warm workers): wall time of each, and
how many times each loaded the base model.

    python benchmarks/bench_ray.py [--model builtin:smollm2-135m] [--steps 4] [--workers 2]

Local: one process with every thread. Ray: ``--workers`` warm workers of one CPU each (OMP_NUM_THREADS=1 in each),
each loading the base once. Prints one line per mode and the ratio. The spec: four placements at one budget, one
seed, builtin arithmetic data, fp32 (so any CPU gives the same losses in both modes; they are checked equal).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def spec_text(model: str, steps: int) -> str:
    return (f"name: bench-ray\nmodel: {model}\n"
            'data: {train: "builtin:arithmetic?n=200", eval_count: 16, max_len: 192}\n'
            f"train: {{steps: {steps}, batch: 4, lr: 1.0e-3, precision: fp32}}\n"
            "placements: {all: {preset: all}, attn: {preset: attn}, mlp: {preset: mlp}, ff-up: {preset: mlp.up}}\n"
            "budget: 600_000\nseeds: [0]\nexecution: {save_state_every: off}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from loraplace.store import Store
    from loraplace.study import load_study, run_study

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ.setdefault("LORAPLACE_CACHE", str(work / "cache"))
    (work / "s.yaml").write_text(spec_text(args.model, args.steps))
    run_study(load_study(work / "s.yaml"), work / "warm.db")  # converts the builtin model and tokenises the data once
    losses, seconds = {}, {}
    for mode in ("local", "ray"):
        db = work / f"{mode}.db"
        t0 = time.perf_counter()
        if mode == "ray":
            import ray

            env = {"OMP_NUM_THREADS": "1", "LORAPLACE_CACHE": os.environ["LORAPLACE_CACHE"]}
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
            summary = run_study(load_study(work / "s.yaml"), db, backend="ray")
            ray.shutdown()
        else:
            summary = run_study(load_study(work / "s.yaml"), db)
        seconds[mode] = time.perf_counter() - t0
        with Store.open_readonly(db) as store:
            losses[mode] = {t.id: t.metrics.eval_loss for t in store.trials(store.study().id)}
        loads = "1 (one process)" if mode == "local" else (summary.execution or "?")
        print(f"{mode}: {seconds[mode]:.1f} s wall, {summary.done} trials done; loads: {loads}", flush=True)
    same = all(abs(losses["ray"][k] - v) <= 1e-6 * abs(v) for k, v in losses["local"].items())
    print(f"bench_ray local_s={seconds['local']:.1f} ray_s={seconds['ray']:.1f} "
          f"ray_speedup={seconds['local'] / seconds['ray']:.2f} workers={args.workers} losses_equal={same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
