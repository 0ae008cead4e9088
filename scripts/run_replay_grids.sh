#!/usr/bin/env bash
# The three replay grids of docs/replay.md, one after the other, each resuming from its committed store.
#   bash scripts/run_replay_grids.sh [TIMEOUT]      e.g. 2h: no trial starts after it (loraplace run --timeout)
# One two-thread runner: on a 2-core CPU two one-thread runners train no faster and leave two trials in flight at a
# stop (benchmarks/RESULTS.md). Exit 75: time ran out with work left; run it again.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
timeout_args=()
[ $# -ge 1 ] && timeout_args=(--timeout "$1")
for task in nl2bash e2e gsm8k; do
  echo "=== $task $(date -u +%FT%TZ)"
  .venv/bin/loraplace run "examples/replay/$task-grid.yaml" --store "docs/replay/$task/grid.db" "${timeout_args[@]}"
  code=$?
  echo "=== $task exit $code $(date -u +%FT%TZ)"
  [ "$code" -eq 0 ] || exit "$code"  # 75: the timeout stopped it; anything else: look at the log
done
