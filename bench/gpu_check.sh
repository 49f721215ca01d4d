#!/usr/bin/env bash
# Prepared calls for a lent GPU machine (15 minutes of device time per session,
# 10 minutes per command): two calls, each well under 600 s.
#   bash bench/gpu_check.sh tests   environment, gpu-marked tests, compute-sanitizer
#                                   over the CUDA extension's tests          (~7 min)
#   bash bench/gpu_check.sh bench   the quick benchmark report               (~7 min)
# Everything lands in $OUT (at most 8 files come back): log.txt, and for bench
# the JSON/markdown/PNGs. Copy them to bench/results/ and commit them.
set -u
what="${1:-tests}"
OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
# The extension is compiled on first use by its test, not at install.
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FUSEDLORA_EXT_DIR="${FUSEDLORA_EXT_DIR:-/tmp/fusedlora-ext}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
step() { echo "== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

step "environment"
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; git log -1 --oneline
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1
FUSEDLORA_BUILD_EXT=0 pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"

if [ "$what" = tests ]; then
  step "gpu tests"
  timeout 330 python -m pytest -m gpu -q -x -p no:cacheprovider >> "$LOG" 2>&1
  echo "gpu tests rc=$?" | tee -a "$LOG"
  grep -E "passed|failed|error" "$LOG" | tail -3
  step "compute-sanitizer memcheck (CUDA extension)"
  PATH="$CUDA_HOME/bin:$PATH" timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_ext.py >> "$LOG" 2>&1
  echo "memcheck rc=$?" | tee -a "$LOG"
  tail -5 "$LOG"
else
  step "quick benchmark report"
  timeout 480 python -m fusedlora bench --quick --report --out "$OUT" 2>> "$LOG" | tee -a "$LOG" | tail -60
fi
step "done"
