#!/usr/bin/env bash
# Every GPU check of the measured-performance issue, in one run on one GPU (record what ran in docs/gpu_runs.md):
#   1. the GPU backends against the float64 reference (bf16 error within 2x of plain bf16): test_gpu_backends.py
#   2. scripts/gpu_perf.py --quick: every step of the measurement on tiny shapes (stops here if the GPU path fails)
#   3. scripts/gpu_perf.py: kernel calibration grid, then every rank of real plans replayed (fcp, ring, hybrid,
#      magi; CP 8-64; 4 mixes; causal and full), stopping new work after --budget-s seconds
# Needs python3 with torch (CUDA), numpy, PyYAML, matplotlib, pytest (no megatron-core). Writes to $OUT.
#   OUT=gpu_out bash scripts/gpu_perf_checks.sh            # then copy $OUT/*_perf.* and *_kernels.json to docs/gpu/
#   then, on any machine: python scripts/fit_measured.py $OUT/<prefix>_kernels.json   (measured kernel laws)
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

status=()
run() { # name, timeout, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  status+=("$name rc=$rc")
  echo "=== $name rc=$rc"
  return "$rc"
}

run gpu_tests 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/unit/test_gpu_backends.py
run perf_quick 90 python3 scripts/gpu_perf.py --quick --out-dir "$OUT/quick" \
  && run perf 540 python3 scripts/gpu_perf.py --budget-s "${PERF_BUDGET_S:-360}" --out-dir "$OUT"
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
