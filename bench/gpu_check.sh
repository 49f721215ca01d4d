#!/usr/bin/env bash
# Prepared calls for a lent GPU machine (15 minutes of device time per session,
# starts included; 10 minutes per command): two calls, each under 600 s.
#   bash bench/gpu_check.sh tests   environment, the CUDA extension built once, the
#                                   gpu-marked tests, compute-sanitizer memcheck over
#                                   the extension's tests, then the whole suite on the
#                                   GPU with what time is left                (~8 min)
#   bash bench/gpu_check.sh bench   the quick benchmark report, decode (CUDA vs Triton)
#                                   first; stops starting cases at 400 s and writes
#                                   what it measured                          (~8 min)
# Everything lands in $OUT (at most 8 files come back): log.txt, junit XML for the
# tests, and for bench the JSON/markdown/PNGs. Copy them to bench/results/, run
# `python bench/report.py --readme bench/results/<run>.json` (the README's results
# block) and commit.
set -u
what="${1:-tests}"
OUT="${OUT:-bench/results/tmp}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FUSEDLORA_EXT_DIR="${FUSEDLORA_EXT_DIR:-/tmp/fusedlora-ext}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
step() { echo "== $1 ($(date -u +%H:%M:%S), ${SECONDS}s)" | tee -a "$LOG"; }
# pytest-xdist and pytest-timeout are in the GPU image: compile Triton kernels on 8
# processes, and let no single test eat the call.
PAR=""
python -c "import xdist" 2>/dev/null && PAR="-n 8"
python -c "import pytest_timeout" 2>/dev/null && PAR="$PAR --timeout 240"

step "environment"
{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; git log -1 --oneline
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1
FUSEDLORA_BUILD_EXT=0 pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || echo "install failed" | tee -a "$LOG"

if [ "$what" = tests ]; then
  step "CUDA extension build"
  timeout 150 python -c "from fusedlora import cuda_ext; m = cuda_ext.load(); print('extension:', m is not None, cuda_ext.status())" >> "$LOG" 2>&1
  step "gpu tests"
  timeout 240 python -m pytest -m gpu -q -p no:cacheprovider $PAR --junitxml="$OUT/gpu_tests.xml" >> "$LOG" 2>&1
  echo "gpu tests rc=$?" | tee -a "$LOG"
  grep -E "passed|failed|error" "$LOG" | tail -3
  step "compute-sanitizer memcheck (CUDA extension)"
  PATH="$CUDA_HOME/bin:$PATH" timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_ext.py >> "$LOG" 2>&1
  echo "memcheck rc=$?" | tee -a "$LOG"
  tail -4 "$LOG"
  left=$((540 - SECONDS))
  if [ "$left" -gt 60 ]; then
    step "whole suite on the GPU (${left}s left)"
    timeout "$left" python -m pytest -q -p no:cacheprovider $PAR --junitxml="$OUT/all_tests.xml" >> "$LOG" 2>&1
    echo "whole suite rc=$?" | tee -a "$LOG"
    grep -E "passed|failed|error" "$LOG" | tail -2
  fi
elif [ "$what" = all ]; then
  # One call for a 15-minute lease: the extension builds (and is probed in
  # subprocesses, so a crash costs nothing else) on its own cores while the Triton
  # gpu tests run; then the extension's tests if it works; then the benchmark until
  # ${END:-560} s into the call, the issues' goal rows first.
  step "extension build + probe (background); gpu tests without the extension"
  if [ -f probe/ext_probe.py ]; then PROBE="probe/ext_probe.py"; else PROBE=""; fi
  ( timeout 230 python -c "from fusedlora import cuda_ext; m = cuda_ext.load(); print('extension:', m is not None, cuda_ext.status())"
    [ -n "$PROBE" ] && timeout 200 python "$PROBE" ) > "$OUT/probe.txt" 2>&1 &
  timeout 170 python -m pytest -m gpu -q -p no:cacheprovider -n 8 --timeout 120 --ignore tests/test_cuda_ext.py \
    --junitxml="$OUT/gpu_tests.xml" >> "$LOG" 2>&1
  echo "gpu tests rc=$?" | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)|passed|failed" "$LOG" | tail -25
  wait; cat "$OUT/probe.txt" >> "$LOG"
  if grep -q "valid call ok" "$OUT/probe.txt" || { [ -z "$PROBE" ] && grep -q "extension: True" "$OUT/probe.txt"; }; then
    step "extension tests"
    timeout 90 python -m pytest -q -p no:cacheprovider -n 4 --timeout 60 tests/test_cuda_ext.py \
      --junitxml="$OUT/ext_tests.xml" >> "$LOG" 2>&1
    echo "extension tests rc=$?" | tee -a "$LOG"
    grep -E "^(FAILED|ERROR)|passed|failed" "$LOG" | tail -8
  else
    echo "the extension does not work here: benchmark without it (FUSEDLORA_BUILD_EXT=0)" | tee -a "$LOG"
    export FUSEDLORA_BUILD_EXT=0 FUSEDLORA_EXT_DIR=/tmp/no-ext
  fi
  left=$(( ${END:-560} - SECONDS ))
  step "benchmark (${left}s)"
  timeout "$left" python -m fusedlora bench --quick --report --budget $((left - 50)) --out "$OUT" \
    --first "^(c3a|sparse) fwd.*M=4096" --first "^switch" --first "^multi fwd r16" --first "^c3a fwd\+bwd M=4096" \
    --first "^decode (lora|multi) r16" \
    --paths "${PATHS:-c3a,sparse,switch,multi,decode,lora}" 2>> "$LOG" | tee -a "$LOG" | tail -40
elif [ "$what" = final ]; then
  # The lease's last minutes: builds of the extension probed in subprocesses (probe/,
  # untracked) while the Triton gpu tests run (SIGINT: pytest still reports); then the
  # extension's tests and the decode rows with the build that works.
  step "extension variants (background); gpu tests without the extension"
  ( timeout 200 python probe/probe2.py ) > "$OUT/probe.txt" 2>&1 &
  timeout -s INT "${TEST_S:-135}" python -m pytest -m gpu -q -p no:cacheprovider -n 8 --timeout 100 --tb=short \
    --durations=20 --ignore tests/test_cuda_ext.py --junitxml="$OUT/gpu_tests.xml" >> "$LOG" 2>&1
  echo "gpu tests rc=$?" | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)|passed|failed" "$LOG" | tail -25
  wait; cat "$OUT/probe.txt" >> "$LOG"; grep -E "^====" "$OUT/probe.txt"
  ok=""
  if [ -f /tmp/pv/works_new ]; then ok=jit
  elif [ -f /tmp/pv/works_aot ]; then cp /tmp/pv/aot/fusedlora/_C*.so fusedlora/ && ok=aot; fi
  if [ -n "$ok" ]; then
    step "extension tests ($ok build)"
    timeout -s INT 45 python -m pytest -q -p no:cacheprovider -n 8 --timeout 40 --tb=short tests/test_cuda_ext.py \
      --junitxml="$OUT/ext_tests.xml" >> "$LOG" 2>&1
    echo "extension tests rc=$?" | tee -a "$LOG"
    grep -E "^(FAILED|ERROR)|passed|failed" "$LOG" | tail -8
    left=$(( ${END:-255} - SECONDS ))
    step "decode benchmark (${left}s)"
    [ "$left" -gt 30 ] && timeout "$left" python -m fusedlora bench --quick --budget $((left - 20)) --out "$OUT" \
      --first "lora r16 M=(1|16) " --first "multi r16 M=64" --paths decode 2>> "$LOG" | tee -a "$LOG" | tail -30
  fi
elif [ "$what" = rest ]; then
  # A second call on the still-warm machine: memcheck, then the paths the first left.
  step "compute-sanitizer memcheck (CUDA extension)"
  PATH="$CUDA_HOME/bin:$PATH" timeout 70 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python -m pytest -q -x -p no:cacheprovider tests/test_cuda_ext.py -k "decode or bgmv or c3a_and_sparse" >> "$LOG" 2>&1
  echo "memcheck rc=$?" | tee -a "$LOG"
  tail -4 "$LOG"
  left=$(( ${END:-200} - SECONDS ))
  [ "$left" -gt 40 ] && timeout "$left" python -m fusedlora bench --quick --report --budget $((left - 30)) --out "$OUT" \
    --paths "${PATHS:-lora}" 2>> "$LOG" | tee -a "$LOG" | tail -30
else
  step "quick benchmark report"
  timeout 520 python -m fusedlora bench --quick --report --budget 400 --out "$OUT" \
    --paths decode,multi,c3a,sparse,lora,switch 2>> "$LOG" | tee -a "$LOG" | tail -60
fi
step "done"
