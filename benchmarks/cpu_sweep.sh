#!/usr/bin/env bash
# The CPU sweep: every preset, batch sizes from decode to a prefill chunk, both float dtypes and
# two scales, against the peers that compute the same experts; the last table marks each point
# where we are not at least 1.1x faster than the fastest of them (docs/benchmarks.md, "CPU sweep").
#
#   bash benchmarks/cpu_sweep.sh                    # about 20 minutes on 2 cores
#   SCALES=0.25 DTYPES=bfloat16 bash benchmarks/cpu_sweep.sh
#
# Settings (environment): SCALES, DTYPES, TOKENS, THREADS (default: torch's), BUDGET (timed
# seconds per point), RESULTS (the folder for the JSON records), PYTHON, KEEP_FREED_MEMORY=1
# (bench's --keep-freed-memory).
set -euo pipefail

SCALES=${SCALES:-0.25 0.5}
DTYPES=${DTYPES:-bfloat16 float32}
TOKENS=${TOKENS:-1,16,64,256,1024}
BUDGET=${BUDGET:-0.5}
RESULTS=${RESULTS:-sweep-results}
PY=${PYTHON:-python}
THREADS=${THREADS:-}
KEEP_FREED_MEMORY=${KEEP_FREED_MEMORY:-}

mkdir -p "$RESULTS"
for scale in $SCALES; do
  for dtype in $DTYPES; do
    echo "== --scale $scale --dtype $dtype"
    "$PY" -m moe_dispatch.cli bench --preset all --device cpu --scale "$scale" --tokens "$TOKENS" \
      --dtype "$dtype" ${THREADS:+--threads "$THREADS"} ${KEEP_FREED_MEMORY:+--keep-freed-memory} --budget "$BUDGET" --compare hf-eager,hf-grouped-mm,torch-grouped-mm \
      --json "$RESULTS/moe_mlp-$dtype-$scale.json" >/dev/null
  done
done
"$PY" -m moe_dispatch.benchmarking.summary "$RESULTS"/moe_mlp-*.json
