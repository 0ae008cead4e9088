#!/usr/bin/env bash
# The CPU speed measurements issue 30 asks for, in one run, for a session on a new CPU kind (AMX-BF16 or
# AVX512-BF16): the training step against HF (ratio, MFU, memory), the profile and every lever alone, the attention
# path in the step vs alone, torch.compile over a study, and which oneDNN kernels the bf16 matmuls run. Pause any
# running study first (kill -STOP its PIDs): these time the CPU. ~40 minutes on 2 cores.
#   bash benchmarks/cpu_session.sh            # logs under benchmarks/logs/<date>-<cpu kind>/, a summary at the end
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
kind=$(grep -o 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' '+' | sed 's/+$//')
kind=${kind:-avx2}
out=benchmarks/logs/$(date +%Y-%m-%d)-$kind
mkdir -p "$out"
echo "cpu=$kind ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(nproc) cores; logs in $out"
for pid in $(pgrep -f "loraplace run" || true); do  # a study beside the benchmarks would halve their figures
  grep -q '^State:[[:space:]]*T' "/proc/$pid/status" 2>/dev/null \
    || echo "warning: 'loraplace run' (pid $pid) is running; pause it: kill -STOP $pid" >&2
done
run() {  # name, then the command; its last line is the bench's summary
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || echo "   $name failed (rc $?): see $out/$name.log"
  tail -n 1 "$out/$name.log"
}
run bench_train "$PY" benchmarks/bench_train.py --reps 1
run bench_levers "$PY" benchmarks/bench_levers.py
run bench_attention "$PY" benchmarks/bench_attention.py
run bench_compile "$PY" benchmarks/bench_compile.py
# oneDNN's own account of one bf16 step: the kernel each matmul ran (avx512_core_amx on AMX) and any weight reorder
# per call. Two steps; the log's "exec" lines are counted by kernel.
ONEDNN_VERBOSE=1 run onednn_verbose "$PY" benchmarks/bench_train.py --reps 1 --steps 2 --train-examples 16 \
  --eval-examples 8 --skip-hf
echo "== oneDNN primitives executed (count, primitive, implementation); reorders of weights show up as 'reorder'"
grep ',exec,cpu,' "$out/onednn_verbose.log" | sed -E 's/.*,exec,cpu,([^,]*),([^,]*),.*/\1 \2/' | sort | uniq -c \
  | sort -rn | head -12
echo "== summaries"
for f in "$out"/bench_*.log; do echo "$(basename "$f" .log): $(tail -n 1 "$f")"; done
