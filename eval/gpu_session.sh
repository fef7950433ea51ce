#!/bin/bash
# Every GPU measurement of the project in one command, each step bounded so the whole fits a lease:
#   OUT=eval/results/gpu BUDGET=560 bash eval/gpu_session.sh
#   ONLY=w8a8_gpu OUT=eval/results/gpu BUDGET=300 bash eval/gpu_session.sh   # only the steps whose command contains ONLY
# Steps: 2:4 sparse MLP (pruning issue), W8A8 GEMMs (integer-only issue), GPTQ of a 7B-shaped Llama
# (engine issue: time and peak GPU memory), W4A16 kernel table (with the FP8 row), the FP8 prefill table
# graph-timed, 7B generation latency and the 8 GiB demo.
set -u
OUT=${OUT:-eval/results/gpu}; mkdir -p "$OUT"
START=$(date +%s); BUDGET=${BUDGET:-560}
export PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # step MAX_SECONDS command...
  local t=$1; shift; local l; l=$(left)
  if [ -n "${ONLY:-}" ] && [[ "$*" != *"$ONLY"* ]]; then return; fi
  if [ "$l" -lt 25 ]; then echo "== skipped (no time left): $*"; return; fi
  [ "$t" -gt "$l" ] && t=$l
  echo "== $(date +%T) $* (timeout ${t}s)"; timeout "$t" "$@"; echo "== rc $? after $(( $(date +%s) - START ))s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
step 60 python3 eval/sparse_gpu.py --out "$OUT/sparse24_gpu.json"
step 240 python3 eval/w8a8_gpu.py --out "$OUT/w8a8_gpu.json"  # + Triton W8A8: compiles and times ~10 tile configs
step ${GPTQ_S:-330} python3 eval/gptq_7b.py --device cuda --out "$OUT/gptq_7b.json"
step 150 python3 eval/kernel_bench.py --m 1 4 16 64 256 2048 --out "$OUT/kernels.json"
# FP8 W8A8 (issue 24) against fp16 cuBLAS at prefill sizes, graph-timed: target >= 1.6x at M >= 512
step 150 python3 eval/kernel_bench.py --cudagraph --no-peers --m 512 1024 2048 --out "$OUT/kernels_fp8_cudagraph.json"
step 120 python3 eval/latency.py --device cuda --no-real --fits-only --out "$OUT/latency_fits.json"
step 600 python3 eval/latency.py --device cuda --no-real --batch 1 --new-tokens 128 --out "$OUT/latency_7b_b1.json"
