#!/usr/bin/env bash
# The replay grids of docs/replay.md and the live confirmation of the default they choose, one after the other,
# each resuming from its committed store:
#   1. the nl2bash and e2e grids (the replays choose the default from these two);
#   2. the choice: benchmarks/replay_policies.py applies the rule of docs/replay.md and writes
#      examples/replay/gsm8k-search.yaml (the GSM8K grid's study with the chosen policy as its search);
#   3. that search, live, into docs/replay/gsm8k/search.db;
#   4. the GSM8K grid it is compared with (docs/replay/gsm8k/grid.db).
#   bash scripts/run_replay_grids.sh [TIMEOUT]      e.g. 2h: no trial starts after it, counted from the start
# One two-thread runner: on a 2-core CPU two one-thread runners train no faster and leave two trials in flight at a
# stop (benchmarks/RESULTS.md). Exit 75: time ran out with work left; run it again. Exit 3: no default chosen.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
PY=.venv/bin/python
deadline=""
if [ $# -ge 1 ]; then
  seconds=$($PY -c "import sys; from loraplace.formatting import parse_duration; print(int(parse_duration(sys.argv[1])))" "$1") || exit 2
  deadline=$(( $(date +%s) + seconds ))
fi

run() {  # run SPEC STORE: one study, with what is left of the deadline
  local args=()
  if [ -n "$deadline" ]; then
    local left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 0 ] || { echo "=== deadline reached before $1"; exit 75; }
    args=(--timeout "$left")
  fi
  echo "=== $1 $(date -u +%FT%TZ)"
  .venv/bin/loraplace run "$1" --store "$2" "${args[@]}"
  local code=$?
  echo "=== $1 exit $code $(date -u +%FT%TZ)"
  [ "$code" -eq 0 ] || exit "$code"  # 75: the timeout stopped it; anything else: look at the log
}

for task in nl2bash e2e; do
  run "examples/replay/$task-grid.yaml" "docs/replay/$task/grid.db"
done
$PY benchmarks/replay_policies.py docs/replay/nl2bash/grid.db docs/replay/e2e/grid.db \
  --write-search examples/replay/gsm8k-search.yaml --base examples/replay/gsm8k-grid.yaml || exit $?
run examples/replay/gsm8k-search.yaml docs/replay/gsm8k/search.db
run examples/replay/gsm8k-grid.yaml docs/replay/gsm8k/grid.db
