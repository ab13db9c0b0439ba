#!/usr/bin/env bash
# The check to run on a GPU, in under 10 minutes, from the repository root or anywhere:
#
#   bash benchmarks/gpu_check.sh            # the real thing: CUDA, full-size shapes, triton backend
#   bash benchmarks/gpu_check.sh --device cpu --scale 0.02 --tokens 1,16 --backend torch --skip-tests
#                                           # a dry run of every step on the CPU at a tiny scale
#
# 1. the GPU tests (pytest -m gpu), 2. the roofline (copy/read bandwidth, matmul peak per dtype), 3.
# the fused experts of Mixtral-8x7B, DeepSeek-V3, Qwen3-30B-A3B and OLMoE-1B-7B in bf16 against the
# torch._grouped_mm pipeline, transformers' experts (eager loop and grouped_mm) and a dense MLP of
# the same active FLOPs, 4. the grouped GEMM against torch._grouped_mm (T >= 1024) and permute /
# unpermute against the copy bandwidth (both as CUDA graph replays), 5. decode (T <= 16) again as CUDA graph
# replays, the way servers run it, against the peers that can be captured, 6. quantized experts
# (weight-only, bf16 activations): DeepSeek-V3 in fp8, gpt-oss-20b in mxfp4, Qwen3-30B-A3B in int4
# (groups of 128) and int8, decode and a T=4096 prefill, and DeepSeek-V3's fp8 at precision w8a8
# (activations quantized too), as CUDA graph replays, against the same values dequantized through
# torch._grouped_mm and the bound of the format's bytes, 7. a compact table checked against the
# targets, printed last.
#
# Works without installing the package (PYTHONPATH is the repository). Every step has a time cap;
# a step that reaches it is interrupted (SIGINT) and keeps the results it has, so the table at the
# end always comes. Results land in $OUT (or a temporary folder) as JSON.
set -u -o pipefail

DEVICE=cuda SCALE=1 TOKENS=1,16,128,1024,8192 BACKEND=triton SKIP_TESTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    *) echo "gpu_check.sh: unknown option $1 (options: --device, --scale, --tokens, --backend, --skip-tests)"; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 1
# $PYTHON, else the repository's .venv when there is one, else the python3 on PATH
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${OUT:-$(mktemp -d)}
mkdir -p "$RESULTS"
export MOE_DISPATCH_CACHE_DIR="$RESULTS/cache"   # roofline measured on this machine, in this run
export PYTHONUNBUFFERED=1
START=$SECONDS
# pick TOKENS CONDITION FALLBACK: the token counts that meet CONDITION, else FALLBACK(counts)
pick() {
  "$PY" -c "import sys; t=[int(x) for x in sys.argv[1].split(',')]
print(','.join(str(x) for x in t if $2) or str($3(t)))" "$1"
}
BIG_TOKENS=$(pick "$TOKENS" "x >= 1024" max)
DECODE_TOKENS=$(pick "$TOKENS" "x <= 16" min)

step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }
# capped SECONDS COMMAND...: SIGINT at the cap (the command keeps what it has), SIGKILL 10 s later.
# The caps add up to 575 s, so the whole check ends within 10 minutes.
capped() { local cap=$1; shift; timeout -k 10 -s INT "$cap" "$@"; local rc=$?; [ $rc -eq 0 ] || echo "(exit $rc)"; }
MOE="$PY -m moe_dispatch.cli"

step "environment"
"$PY" - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}")
for m in ("triton", "transformers", "numba"):
    try:
        print(f"{m} {__import__(m).__version__}")
    except ImportError:
        print(f"{m} not installed (its peers are skipped)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
PY

if [ "$SKIP_TESTS" = 0 ]; then
  # Most of the tests' time is Triton compiling kernels on the CPU: up to 8 pytest-xdist workers
  # (one CUDA context each) compile in parallel, where xdist is installed.
  CORES=$(nproc 2>/dev/null || echo 4)
  WORKERS=$("$PY" -c "import xdist" 2>/dev/null && echo "-n $((CORES < 8 ? CORES : 8))")
  step "GPU tests: pytest -m gpu -q tests $WORKERS"
  capped 120 "$PY" -m pytest -m gpu -q tests -p no:cacheprovider $WORKERS
fi

step "roofline"
capped 30 $MOE info --device "$DEVICE"

step "fused experts (moe_mlp), bf16, $BACKEND vs peers"
capped 140 $MOE bench --device "$DEVICE" --scale "$SCALE" --dtype bfloat16 --backend "$BACKEND" \
  --preset mixtral-8x7b deepseek-v3 qwen3-30b-a3b olmoe-1b-7b --tokens "$TOKENS" \
  --compare torch-grouped-mm,hf-eager,hf-grouped-mm,dense,bound --budget 0.1 --json "$RESULTS/moe_mlp.json"

# The grouped GEMM and the moves as CUDA graph replays on a GPU, both sides: their targets are
# the kernels' throughput, and an eager call from an idle GPU adds the host's launch (0.06-0.1 ms
# a launch on the H200 of docs/benchmarks.md), a copy's whole time at T=1024.
GRAPH=""
if [ "$DEVICE" = cuda ]; then GRAPH=--cuda-graph; fi
step "grouped GEMM (GEMM1 shape) vs torch._grouped_mm, T in $BIG_TOKENS ${GRAPH:+(CUDA graphs)}"
capped 60 $MOE bench --device "$DEVICE" --scale "$SCALE" --dtype bfloat16 --backend "$BACKEND" --op grouped_mm \
  --preset mixtral-8x7b deepseek-v3 qwen3-30b-a3b olmoe-1b-7b --tokens "$BIG_TOKENS" $GRAPH --budget 0.1 \
  --json "$RESULTS/grouped_mm.json"

for op in permute unpermute; do
  step "$op vs the copy bandwidth ${GRAPH:+(CUDA graphs)}"
  capped 20 $MOE bench --device "$DEVICE" --scale "$SCALE" --dtype bfloat16 --backend "$BACKEND" --op $op \
    --preset deepseek-v3 olmoe-1b-7b --tokens "$BIG_TOKENS" $GRAPH --budget 0.1 --json "$RESULTS/$op.json"
done

step "decode (T in $DECODE_TOKENS) as CUDA graph replays, $BACKEND vs the peers that can be captured"
if [ "$DEVICE" = cuda ]; then
  capped 45 $MOE bench --device "$DEVICE" --scale "$SCALE" --dtype bfloat16 --backend "$BACKEND" --cuda-graph \
    --preset mixtral-8x7b deepseek-v3 qwen3-30b-a3b olmoe-1b-7b --tokens "$DECODE_TOKENS" \
    --compare torch-grouped-mm,hf-grouped-mm,dense,bound --budget 0.1 --json "$RESULTS/decode_graph.json"
else
  echo "skipped: CUDA graphs need --device cuda"
fi

# The quantized runs: decode and, on a GPU, a prefill of 4096 tokens. Default tiles (no autotuning):
# tuning each format's new keys would not fit the caps. DeepSeek-V3's 256 experts take longest to make.
QUANT_TOKENS=$DECODE_TOKENS
if [ "$DEVICE" = cuda ]; then QUANT_TOKENS="$DECODE_TOKENS,4096"; fi
# A run's fourth field is the precision (default weight-only).
for run in deepseek-v3:fp8:35 deepseek-v3:fp8:30:w8a8 gpt-oss-20b:mxfp4:25 qwen3-30b-a3b:int4:25 \
           qwen3-30b-a3b:int8:25; do
  IFS=: read -r preset format cap precision <<< "$run"
  name=$format${precision:+_$precision} precision=${precision:-weight-only}
  step "quantized experts: $preset, $format weights $precision, bf16 activations, T in $QUANT_TOKENS ${GRAPH:+(CUDA graphs)}"
  capped "$cap" env MOE_DISPATCH_AUTOTUNE=0 $MOE bench --device "$DEVICE" --scale "$SCALE" --dtype bfloat16 \
    --backend "$BACKEND" --weights "$format" --precision "$precision" --preset "$preset" --tokens "$QUANT_TOKENS" \
    $GRAPH --compare torch-grouped-mm,bound --budget 0.1 --json "$RESULTS/quantized_$name.json"
done

step "autotuning winners (kernel kind: tile configs chosen, how many keys)"
"$PY" - "$MOE_DISPATCH_CACHE_DIR" <<'PY'
import collections, json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("triton-*.json")):
    winners = collections.Counter()
    for key, config in json.loads(path.read_text()).get("entries", {}).items():
        tile = "{block_m}x{block_n}x{block_k} w{num_warps} s{num_stages}".format(**config)
        tile += f" split-k {config['split_k']}" if config.get("split_k", 1) > 1 else ""
        tile += " TMA" if config.get("tma") else ""
        winners[f"{key.split('|')[0]}: {tile}"] += 1
    print(path.name)
    for winner, count in sorted(winners.items()):
        print(f"  {winner} ({count})")
PY

step "summary ($((SECONDS - START)) s in all; JSON in $RESULTS)"
"$PY" -m moe_dispatch.benchmarking.summary "$RESULTS"/moe_mlp.json "$RESULTS"/grouped_mm.json \
  "$RESULTS"/permute.json "$RESULTS"/unpermute.json "$RESULTS"/decode_graph.json "$RESULTS"/quantized_*.json
