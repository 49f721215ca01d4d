#!/usr/bin/env bash
# One call on a lent GPU machine (see docs/benchmarks.md): environment, install,
# the gpu-marked tests, compute-sanitizer over the CUDA extension's tests, and
# the quick benchmark report. Everything lands in $OUT (at most 8 files come
# back): log.txt plus the bench JSON/markdown/PNGs. Copy them to bench/results/.
#   run: bash bench/gpu_check.sh            (device tool: command "bash bench/gpu_check.sh")
set -u
OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FUSEDLORA_EXT_DIR="${FUSEDLORA_EXT_DIR:-/tmp/fusedlora-ext}"
step() { echo "== $1 ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

step environment
{ date -u; nvidia-smi; git log -1 --oneline
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >> "$LOG" 2>&1
step install
pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"
step "gpu tests"
timeout "${TEST_TIMEOUT:-300}" python -m pytest -m gpu -q -p no:cacheprovider >> "$LOG" 2>&1
echo "gpu tests rc=$?" | tee -a "$LOG"
grep -E "passed|failed" "$LOG" | tail -2
step "compute-sanitizer memcheck (CUDA extension)"
if command -v compute-sanitizer >/dev/null || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
  PATH="$CUDA_HOME/bin:$PATH" timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_ext.py >> "$LOG" 2>&1
  echo "memcheck rc=$?" | tee -a "$LOG"
else
  echo "compute-sanitizer not found" | tee -a "$LOG"
fi
step "quick benchmark report"
timeout "${BENCH_TIMEOUT:-360}" python -m fusedlora bench --quick --report --out "$OUT" 2>> "$LOG" | tee -a "$LOG" | tail -60
step done
