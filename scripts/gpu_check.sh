#!/usr/bin/env bash
# The GPU checks, one command for a CUDA machine with a stock PyTorch image (xxhash needed; no
# network): the device-state tests on CPU and GPU, then `python -m bench.gpu`.
#   bash scripts/gpu_check.sh [BUDGET_S]       results: $OUT (if set) or bench/results
# The benchmark's own deadline is BUDGET_S (default 330 s) so everything ends within 8 minutes.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RES=${OUT:-bench/results}
BUDGET=${1:-330}
mkdir -p "$RES"
WORK=/var/tmp/async_ckpt_gpu
mkdir -p "$WORK"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PY" -c "import xxhash; print('xxhash', xxhash.VERSION)"
  nproc; free -g | head -2; df -h "$WORK" /tmp | cat; echo "ulimit -l: $(ulimit -l)"
} 2>&1 | tee "$RES/gpu_env.txt"

status=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider --noconftest -o addopts="" tests/test_device_state.py \
  2>&1 | tee "$RES/gpu_tests.log" || status=1
timeout 480 "$PY" -m bench.gpu --budget-s "$BUDGET" --dir "$WORK" --out "$RES/gpu.json" \
  2>&1 | tee "$RES/gpu_bench.log" || status=$((status | 2))
rm -rf "$WORK"
echo "gpu_check: exit $status (1: device-state tests failed, 2: benchmark failed)"
exit $status
