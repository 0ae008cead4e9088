"""Which LR schedule should a search's rungs use? A measurement on the offline default model.

A rung has to rank candidates by how they will end at the full horizon. Two ways to train a candidate to rung r:

* **prefix** (what ``loraplace.search`` does): the full-horizon schedule (warm-up, cosine to ``steps``), stopped
  at r; a promoted candidate continues its saved state, so nothing is trained twice and the rung-r model is the
  first r steps of the grid's own trial;
* **short run** (what a rung costs without continuation, and what a warmup-stable-decay branch approximates): a
  fresh run whose own schedule decays to 0 at r. A promoted candidate must then restart (or branch), paying the
  rung's steps again.

For every candidate (placements × LRs) this trains the full run (validation loss at r and at the end: the
prefix's ranking and the final ranking) and the short run to r (its ranking), and prints Kendall's τ of each
rung ranking against the final one, and whether each keeps the final best in its top 1/eta.

    python benchmarks/bench_search_schedule.py [--rung 4 --steps 12]

Last line (machine-readable): ``tau_prefix=… tau_short=… top_kept_prefix=… top_kept_short=… candidates=… cpu=…``.
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

PLACEMENTS = {"all": {"preset": "all"}, "attn": {"preset": "attn"}, "mlp.up": {"preset": "mlp.up"},
              "q+v": {"preset": "attn.q+attn.v"}}


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ("amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "avx2" if " avx2" in flags
            else platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rung", type=int, default=4)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--lrs", default="1e-3,4e-3")
    args = parser.parse_args()

    from scipy.stats import kendalltau

    from loraplace.data import DataSpec
    from loraplace.placement.spec import PlacementSpec
    from loraplace.train_config import TrainSpec
    from loraplace.trial import EvalSpec, Session, TrialSpec, run_rung

    data = DataSpec(train="builtin:arithmetic?n=400", test_count=16, validation_count=24, max_len=128)
    session = Session(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_schedule_"))
    rows = []
    t0 = time.perf_counter()
    for pname, placement in PLACEMENTS.items():
        for lr in (float(x) for x in args.lrs.split(",")):
            def spec(steps: int, pname=pname, placement=placement, lr=lr) -> TrialSpec:
                return TrialSpec(model=args.model, data=data, placement=PlacementSpec.model_validate(placement),
                                 budget=600_000, train=TrainSpec(steps=steps, batch=4, warmup=1, lr=lr),
                                 eval=EvalSpec())
            key = f"{pname} lr={lr:g}"
            full, short = spec(args.steps), spec(args.rung)
            at_rung = run_rung(full, session=session, state_dir=work / key / "full", steps=args.rung,
                               candidate=key, rung=0)
            at_end = run_rung(full, session=session, state_dir=work / key / "full", steps=args.steps,
                              candidate=key, rung=1, from_steps=args.rung)
            short_run = run_rung(short, session=session, state_dir=work / key / "short", steps=args.rung,
                                 candidate=key, rung=0)
            rows.append((key, at_rung.val_loss, short_run.val_loss, at_end.val_loss))
            print(f"{key:>16}: prefix@{args.rung} {at_rung.val_loss:.4f}  short@{args.rung} "
                  f"{short_run.val_loss:.4f}  final@{args.steps} {at_end.val_loss:.4f}", flush=True)
    final = [r[3] for r in rows]
    keep = max(1, math.ceil(len(rows) / args.eta))
    best = min(range(len(rows)), key=lambda i: final[i])

    def kept(values: list[float]) -> bool:
        return best in sorted(range(len(values)), key=lambda i: values[i])[:keep]

    tau_prefix = kendalltau([r[1] for r in rows], final).statistic
    tau_short = kendalltau([r[2] for r in rows], final).statistic
    print(f"{len(rows)} candidates in {time.perf_counter() - t0:.0f} s; final best: {rows[best][0]}")
    print(f"tau_prefix={tau_prefix:.3f} tau_short={tau_short:.3f} top_kept_prefix={kept([r[1] for r in rows])} "
          f"top_kept_short={kept([r[2] for r in rows])} candidates={len(rows)} rung={args.rung} "
          f"steps={args.steps} cpu={cpu_kind()}")


if __name__ == "__main__":
    main()
