"""Wall time of the quickstart study end to end, split into load / tokenise / train / eval / report, and the
model load time (first GGUF conversion vs cached).

    python benchmarks/bench_study.py                    # examples/quickstart.yaml, the conversion cache as is
    python benchmarks/bench_study.py --cold             # also time the first conversion (fresh cache dir)
    python benchmarks/bench_study.py --fuse 4           # the same study one trial at a time vs fused by 4

With ``--fuse K`` each mode runs in a fresh process (its own store): wall time, tokens/s, peak resident memory,
and the peak K separate one-trial processes would need (the Ray way: K × the one-at-a-time process's peak).
Its last line: ``fuse_speedup=… tokens_per_s_seq=… tokens_per_s_fused=… peak_mem_seq_mb=… peak_mem_fused_mb=…
peak_mem_k_processes_mb=… max_eval_loss_rel_diff=…``.

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


def fused_child(spec_path: str, fuse: int | None) -> dict:
    """One mode of --fuse in this (fresh) process: run the study into a temporary store."""
    from loraplace.analysis import analyze_store
    from loraplace.study import ExecutionSpec, load_study, run_study

    study = load_study(spec_path)
    study = study.model_copy(update={"execution": ExecutionSpec(fuse=fuse if fuse else "off")})
    store = Path(tempfile.mkdtemp(prefix="bench_fuse_")) / "s.db"
    t0 = time.perf_counter()
    summary = run_study(study, store)
    wall = time.perf_counter() - t0
    trials = [t for t in analyze_store(store).trials if t.status == "done"]
    tokens = sum(t.outcome.train_tokens for t in trials)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    return {"done": summary.done, "failed": summary.failed, "study_s": wall, "train_tokens": tokens,
            "tokens_per_s": tokens / wall, "peak_rss_mb": peak,
            "fused": sum(1 for t in trials if t.outcome.fused_with),
            "eval_loss": {t.id: t.outcome.metrics.eval_loss for t in trials}}


def bench_fuse(spec: str, fuse: int) -> None:
    import json

    results = {}
    for mode, k in (("seq", None), ("fused", fuse)):
        cmd = [sys.executable, __file__, "--spec", spec, "--only-fuse", str(k or 0)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[mode] = r = json.loads(out)
        print(f"{mode:>5}: {r['done']} done ({r['failed']} failed, {r['fused']} trained fused) in "
              f"{r['study_s']:.1f} s, {r['tokens_per_s']:.1f} train tok/s of study wall time, "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
    seq, fz = results["seq"], results["fused"]
    diff = max(abs(fz["eval_loss"][k] - v) / v for k, v in seq["eval_loss"].items())
    print(f"fuse_speedup={seq['study_s'] / fz['study_s']:.2f} tokens_per_s_seq={seq['tokens_per_s']:.1f} "
          f"tokens_per_s_fused={fz['tokens_per_s']:.1f} peak_mem_seq_mb={seq['peak_rss_mb']:.0f} "
          f"peak_mem_fused_mb={fz['peak_rss_mb']:.0f} peak_mem_k_processes_mb={fuse * seq['peak_rss_mb']:.0f} "
          f"max_eval_loss_rel_diff={diff:.2e} fuse={fuse}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--cold", action="store_true", help="time the first GGUF → safetensors conversion too")
    parser.add_argument("--fuse", type=int, default=None, help="K: one at a time vs fused by K (see above)")
    parser.add_argument("--only-fuse", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_fuse is not None:
        import json

        print(json.dumps(fused_child(args.spec, args.only_fuse or None)))
        return
    if args.fuse:
        bench_fuse(args.spec, args.fuse)
        return

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
