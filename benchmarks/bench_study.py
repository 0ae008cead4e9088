"""Wall time of the quickstart study end to end, split into load / tokenise / train / eval / report, and the
model load time (first GGUF conversion vs cached).

    python benchmarks/bench_study.py                    # examples/quickstart.yaml, the conversion cache as is
    python benchmarks/bench_study.py --cold             # also time the first conversion (fresh cache dir)

The last line is machine-readable: ``quickstart_s=… load_s=… tokenize_s=… train_s=… eval_s=… report_s=… …``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_cached_load_subprocess(cache: str | None) -> tuple[float, float]:
    """(import seconds, import + cached model load seconds) in a fresh interpreter, as the CLI pays them."""
    code = ("import time; t0=time.perf_counter(); import loraplace.cli, loraplace.trial; t1=time.perf_counter(); "
            "from loraplace.trial import Session; Session('builtin:smollm2-135m'); "
            "print(t1-t0, time.perf_counter()-t0)")
    env = dict(os.environ) | ({"LORAPLACE_CACHE": cache} if cache else {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    imp, total = map(float, out.stdout.split())
    return imp, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--cold", action="store_true", help="time the first GGUF → safetensors conversion too")
    args = parser.parse_args()

    import torch

    from loraplace.analysis import analyze_store
    from loraplace.analysis.report import write_report
    from loraplace.models import ModelRef, builtin_checkpoint
    from loraplace.study import load_study, run_study

    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}")
    figures: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="bench_study_"))
    cache = None
    if args.cold:
        cache = str(work / "cache")
        os.environ["LORAPLACE_CACHE"] = cache
        t0 = time.perf_counter()
        builtin_checkpoint(ModelRef.parse("builtin:smollm2-135m"))
        figures["first_conversion_s"] = time.perf_counter() - t0
    figures["import_s"], figures["cached_load_total_s"] = time_cached_load_subprocess(cache)
    figures["cached_load_s"] = figures["cached_load_total_s"] - figures["import_s"]

    study = load_study(args.spec)
    store = work / "quickstart.db"
    t0 = time.perf_counter()
    summary = run_study(study, store)
    figures["study_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    write_report(analyze_store(store), work / "report")
    figures["report_s"] = time.perf_counter() - t1
    figures["quickstart_s"] = figures["study_s"] + figures["report_s"]

    analysis = analyze_store(store)
    trials = [t.outcome for t in analysis.trials if t.status == "done"]
    figures["load_s"] = trials[0].timings.load_s  # the session loads the model once for the whole study
    figures["tokenize_s"] = trials[0].timings.tokenize_s  # tokenised once, reused by every trial
    figures["train_s"] = sum(o.metrics.train_s for o in trials)
    figures["eval_s"] = sum(o.timings.eval_s for o in trials)
    figures["other_s"] = figures["study_s"] - figures["load_s"] - figures["tokenize_s"] - figures["train_s"] \
        - figures["eval_s"]
    print(f"\n{summary.done} trials done ({summary.failed} failed) in {figures['study_s']:.1f} s")
    print(f"{'trial':<28} {'train s':>8} {'eval s':>7} {'tok/s':>7}")
    for t in analysis.trials:
        if t.status == "done":
            print(f"{t.key.label + ' seed ' + str(t.seed):<28} {t.outcome.metrics.train_s:8.1f} "
                  f"{t.outcome.timings.eval_s:7.1f} {t.outcome.metrics.tokens_per_s:7.1f}")
    print("\nsplit of the quickstart wall time:")
    for key in ("load_s", "tokenize_s", "train_s", "eval_s", "other_s", "report_s"):
        print(f"  {key:<12} {figures[key]:7.1f} s  {100 * figures[key] / figures['quickstart_s']:5.1f} %")
    print(f"  {'total':<12} {figures['quickstart_s']:7.1f} s   (target ≤ 180 s)")
    print(f"model load: cached {figures['cached_load_s']:.2f} s (+ {figures['import_s']:.2f} s imports)"
          + (f"; first conversion {figures['first_conversion_s']:.1f} s" if "first_conversion_s" in figures else ""))
    print(" ".join(f"{k}={v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
