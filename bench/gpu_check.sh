#!/usr/bin/env bash
# The prepared call for a lent GPU machine: 15 minutes of device time per session, starts
# (~50-120 s each) included, 10 minutes per command, the machine given back after 30 s idle:
# one call of at most ~560 s leaves room for the start and nothing else.
# What the leases so far taught: pytest killed by `timeout` prints nothing (use SIGINT);
# seven autotune configs make a C3A test take 30-67 s to compile (FUSEDLORA_AUTOTUNE=0
# keeps one); build and probe the CUDA extension in a subprocess before anything loads it
# (it segfaulted in every process that called it until the libstdc++ fix, docs/cuda.md).
#
#   END=560 OUT=$OUT bash bench/gpu_check.sh      (timeout_s END + 30)
#     1. the extension's build and probe (background) while `pytest -m gpu` runs: first the
#        tests no GPU has run yet (NEW_S), then the rest (TEST_S)
#     2. if the probe passed: the extension's tests, then compute-sanitizer memcheck over the
#        decode tests (every kernel changed since the H200 passed it)
#     3. host against device time of a training step (bench/profile_step.py; PROFILE=0 skips)
#     4. the quick benchmark of PATHS, --first rows first, until END seconds into the call
# At most 8 files come back from $OUT: log.txt, the junit XMLs, the bench JSON/markdown/PNGs.
# Copy them to bench/results/<date>_<device>/, run
# `python bench/report.py --readme bench/results/.../<run>.json` and commit.
set -u
OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FUSEDLORA_EXT_DIR="${FUSEDLORA_EXT_DIR:-/tmp/fusedlora-ext}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
step() { echo "== $1 ($(date -u +%H:%M:%S), ${SECONDS}s)" | tee -a "$LOG"; }
summary() { grep -E "^(FAILED|ERROR)|passed|failed" "$LOG" | tail -"${1:-12}"; }
PAR=""  # pytest-xdist and pytest-timeout are in the GPU image
python -c "import xdist" 2>/dev/null && PAR="-n 8"
python -c "import pytest_timeout" 2>/dev/null && PAR="$PAR --timeout 120"
PYTEST="python -m pytest -q -p no:cacheprovider -p no:benchmark --tb=short"

step "environment"
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; git log -1 --oneline
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1
FUSEDLORA_BUILD_EXT=0 pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"

step "extension build and probe (background); gpu tests (FUSEDLORA_AUTOTUNE=0)"
# A call that must raise ValueError with the whole message, in its own process.
timeout 240 python -c "
import torch
from fusedlora import cuda_ext
m = cuda_ext.load(); assert m is not None, cuda_ext.status()
try:
    m.lora_decode(torch.randn(8), torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)
except ValueError as e:
    print('extension call ok:', e)" > /tmp/ext_probe.txt 2>&1 & probe=$!
# what no GPU has run yet goes first, then the rest (one junit file each would pass the 8-file limit)
NEW="above_16_rows or cublas or warm_up_then_capture or spectral or cuda_graphs or decode_pair or shrink or two_kernels or autocast or delta or values_through or weight_delta_rows"
# the eager compositions' cuBLAS operand alignment (not gpu-marked: it runs on CPU too)
FUSEDLORA_AUTOTUNE=0 timeout -s INT 40 $PYTEST $PAR tests/test_cublas_layouts.py >> "$LOG" 2>&1
echo "cublas layout tests rc=$?" | tee -a "$LOG"
FUSEDLORA_AUTOTUNE=0 timeout -s INT "${NEW_S:-120}" $PYTEST -m gpu $PAR -k "$NEW" \
  --ignore tests/test_cuda_ext.py >> "$LOG" 2>&1
echo "new gpu tests rc=$?" | tee -a "$LOG"; summary 10
FUSEDLORA_AUTOTUNE=0 timeout -s INT "${TEST_S:-120}" $PYTEST -m gpu $PAR --durations=10 -k "not ($NEW)" \
  --ignore tests/test_cuda_ext.py --junitxml="$OUT/gpu_tests.xml" >> "$LOG" 2>&1
echo "gpu tests rc=$?" | tee -a "$LOG"; summary 25
wait $probe; echo "probe rc=$?" >> "$LOG"; tail -c 3000 /tmp/ext_probe.txt | tee -a "$LOG" | tail -3
if grep -q "extension call ok" /tmp/ext_probe.txt; then
  step "extension tests"
  timeout -s INT "${EXT_S:-90}" $PYTEST $PAR tests/test_cuda_ext.py --junitxml="$OUT/ext_tests.xml" >> "$LOG" 2>&1
  echo "extension tests rc=$?" | tee -a "$LOG"; summary 8
  # every kernel changed since the H200's memcheck (two-launch form, tensor-core GEMV): the
  # tests of uninitialised outputs first (u, splits), then the reference matches, both GEMVs
  step "compute-sanitizer memcheck (extension kernels)"
  PATH="$CUDA_HOME/bin:$PATH" timeout -s INT "${MEMCHECK_S:-45}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    $PYTEST -x tests/test_cuda_ext.py -k "unchecked or shrink or zeroes or matches_reference" >> "$LOG" 2>&1
  echo "memcheck rc=$?" | tee -a "$LOG"; tail -4 "$LOG"
else
  echo "the extension's probe failed: benchmark without it" | tee -a "$LOG"
  export FUSEDLORA_BUILD_EXT=0 FUSEDLORA_EXT_DIR=/tmp/no-ext
fi
if [ "${PROFILE:-1}" = 1 ]; then
  step "host and device time of a training step"
  timeout "${PROFILE_S:-60}" python -m bench.profile_step 4096 >> "$LOG" 2>&1; tail -42 "$LOG"
fi
left=$(( ${END:-560} - SECONDS ))
step "quick benchmark (${left}s)"
[ "$left" -gt 60 ] && timeout "$left" python -m fusedlora bench --quick --report --budget $((left - 30)) --out "$OUT" \
  --first "^lora fwd.*M=4096" --first "^multi fwd r(16|8|64|8\+64).*T=4096" --first "^switch" \
  --first "^decode (lora|multi) r16" --first "^multi fwd r16.*T=64" --first "^(c3a|sparse) fwd.*M=4096" \
  --first "^decode (c3a|sparse)" --first "^kinds" \
  --paths "${PATHS:-decode,c3a,sparse,multi,kinds,switch,lora}" 2>> "$LOG" | tee -a "$LOG" | tail -30
step "done"
