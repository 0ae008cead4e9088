"""Wall time of the commands that only read a store (status, recommend, export), each in a fresh process.

    python benchmarks/bench_read_commands.py [--src DIR] [--repeat 5] STORE...

``--src``: time another checkout's package instead (its ``src`` directory first on PYTHONPATH), e.g. the commit
before a change, to print the ratio against it in the same run. Prints the median of ``--repeat`` runs per command
and store. The target (issue "One file, one job"): ``loraplace status`` under 1.5 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], src: Path, repeat: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(src))
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "loraplace", *args], env=env, capture_output=True, text=True)
        runs.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed under {src}: {done.stderr[-500:]}")
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--src", type=Path, help="another checkout's src/ to compare with")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp())
    sources = [("this tree", ROOT / "src")] + ([("--src", args.src)] if args.src else [])
    print(f"| command | store | {' | '.join(name for name, _ in sources)} |" + (" ratio |" if args.src else ""))
    print("|---|---|" + "---:|" * len(sources) + ("---:|" if args.src else ""))
    for store in args.stores:
        for command in (["status", store], ["recommend", store], ["export", store, "--format", "csv", "--out",
                                                                   str(out / "t.csv")]):
            seconds = [timed(command, src, args.repeat) for _, src in sources]
            ratio = f" {seconds[1] / seconds[0]:.1f}× |" if args.src else ""
            print(f"| {command[0]} | {Path(store).name} | " + " | ".join(f"{s:.2f} s" for s in seconds) + " |"
                  + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
