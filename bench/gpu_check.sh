#!/usr/bin/env bash
# Prepared calls for a lent GPU machine: 15 minutes of device time per session, starts
# (~50 s each) included, 10 minutes per command, the machine given back after 30 s idle.
# What the first lease (bench/results/2026-11-27_h200) taught: pytest killed by `timeout`
# prints nothing (use SIGINT), seven autotune configs make a C3A test take 30-67 s
# (FUSEDLORA_AUTOTUNE=0 for the test pass), and the CUDA extension segfaulted at its first
# call, killing whatever process loaded it (probe it in a subprocess first).
#
#   END=555 bash bench/gpu_check.sh lease   (timeout_s 590)  one call: the extension's
#       bisection (bench/ext_diag) in the background while the gpu tests run; then the
#       extension's tests if its probe passed; the host time of eager decode calls
#       (bench/host_overhead.py; HOST=0 skips it); then the quick benchmark (goal rows first) until END
#       seconds into the call
#   END=200 bash bench/gpu_check.sh ext     a second call on the warm machine: the decode
#       rows (CUDA vs Triton) and compute-sanitizer over the extension's tests; if the
#       extension still crashes, the sweep of the Triton decode plan (bench/decode_plans.py)
# At most 8 files come back from $OUT: log.txt, junit XML, the bench JSON/markdown/PNGs,
# and the bisection as one ext_bisect.tgz. Copy them to bench/results/<date>_<device>/,
# run `python bench/report.py --readme bench/results/.../<run>.json` and commit.
set -u
what="${1:-lease}"
OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FUSEDLORA_EXT_DIR="${FUSEDLORA_EXT_DIR:-/tmp/fusedlora-ext}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
step() { echo "== $1 ($(date -u +%H:%M:%S), ${SECONDS}s)" | tee -a "$LOG"; }
summary() { grep -E "^(FAILED|ERROR)|passed|failed" "$LOG" | tail -"${1:-12}"; }
# pytest-xdist and pytest-timeout are in the GPU image.
PAR=""
python -c "import xdist" 2>/dev/null && PAR="-n 8"
python -c "import pytest_timeout" 2>/dev/null && PAR="$PAR --timeout 120"
PYTEST="python -m pytest -q -p no:cacheprovider -p no:benchmark --tb=short"

# The extension, loaded in a subprocess: does a call that must raise ValueError raise it?
ext_works() {
  timeout 240 python -c "
import torch
from fusedlora import cuda_ext
m = cuda_ext.load(); assert m is not None, cuda_ext.status()
try:
    m.lora_decode(torch.randn(8), torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)
except ValueError:
    print('extension call ok')" >> "$LOG" 2>&1
}

step "environment"
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; git log -1 --oneline
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1
FUSEDLORA_BUILD_EXT=0 pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"

if [ "$what" = lease ]; then
  step "extension: probe and bisection (background); gpu tests without it (FUSEDLORA_AUTOTUNE=0)"
  ext_works & probe=$!
  # bounded so that it ends before the tests do: its waiting costs the bench nothing
  ( timeout 200 python bench/ext_diag/device_bisect.py csrc /tmp/ext_bisect > /tmp/ext_bisect.txt 2>&1
    find /tmp/ext_bisect -name '*.so' ! -name 'orig_O2_g.so' -delete  # 16 MB a file comes back
    tar czf "$OUT/ext_bisect.tgz" -C /tmp ext_bisect ext_bisect.txt ) & bisect=$!
  FUSEDLORA_AUTOTUNE=0 timeout -s INT "${TEST_S:-240}" $PYTEST -m gpu $PAR --durations=15 \
    --ignore tests/test_cuda_ext.py --junitxml="$OUT/gpu_tests.xml" >> "$LOG" 2>&1
  echo "gpu tests rc=$?" | tee -a "$LOG"; summary 25
  wait $probe; grep -E "extension call ok|Error" "$LOG" | tail -3
  if grep -q "extension call ok" "$LOG"; then
    step "extension tests"
    timeout -s INT 90 $PYTEST $PAR tests/test_cuda_ext.py --junitxml="$OUT/ext_tests.xml" >> "$LOG" 2>&1
    echo "extension tests rc=$?" | tee -a "$LOG"; summary 8
  else
    echo "the extension's probe failed: benchmark without it" | tee -a "$LOG"
    export FUSEDLORA_BUILD_EXT=0 FUSEDLORA_EXT_DIR=/tmp/no-ext
  fi
  if [ "${HOST:-1}" = 1 ]; then
    step "host time of eager decode calls"
    timeout 90 python bench/host_overhead.py 1 >> "$LOG" 2>&1
  fi
  wait $bisect; tail -3 /tmp/ext_bisect.txt 2>/dev/null
  left=$(( ${END:-555} - SECONDS ))
  step "quick benchmark (${left}s)"
  [ "$left" -gt 90 ] && timeout "$left" python -m fusedlora bench --quick --report --budget $((left - 45)) --out "$OUT" \
    --first "^(c3a|sparse) fwd.*M=4096" --first "^switch" --first "^multi fwd r16" --first "^lora fwd M=4096" \
    --first "^(c3a|sparse) fwd\+bwd M=4096" --first "^decode (lora|multi) r16" \
    --paths "${PATHS:-c3a,sparse,switch,multi,lora,decode}" 2>> "$LOG" | tee -a "$LOG" | tail -30
elif [ "$what" = ext ]; then
  if ext_works; then
    left=$(( ${END:-200} - SECONDS - 60 ))
    step "decode rows: CUDA vs Triton (${left}s)"
    timeout "$left" python -m fusedlora bench --quick --budget $((left - 20)) --out "$OUT" --paths decode \
      --first "lora r16" --first "multi r16 M=64" 2>> "$LOG" | tee -a "$LOG" | tail -30
    step "compute-sanitizer memcheck (extension tests)"
    PATH="$CUDA_HOME/bin:$PATH" timeout -s INT 50 compute-sanitizer --tool memcheck --error-exitcode 3 \
      $PYTEST -x tests/test_cuda_ext.py -k "decode or bgmv or c3a_and_sparse" >> "$LOG" 2>&1
    echo "memcheck rc=$?" | tee -a "$LOG"; tail -4 "$LOG"
  else
    echo "the extension's probe failed: sweep the Triton decode plan instead" | tee -a "$LOG"
    step "decode plan sweep"
    timeout $(( ${END:-200} - SECONDS - 5 )) python bench/decode_plans.py --out "$OUT/decode_plans.json" \
      2>> "$LOG" | tee -a "$LOG" | tail -8
  fi
else
  echo "usage: bash bench/gpu_check.sh lease|ext" >&2
  exit 2
fi
step "done"
