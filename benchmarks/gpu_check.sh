#!/usr/bin/env bash
# The GPU check of the CUDA backend, for a session that is lent a GPU machine (< 5 minutes):
#   1. the CUDA tests on the real GPU (NUMBA_ENABLE_CUDASIM=0: no simulator),
#   2. VGG-16 224x224 at batch 1, 8 and 32: graphc vs PyTorch (cuDNN), medians, ratios, TFLOPS.
# Usage: bash benchmarks/gpu_check.sh   (from anywhere; prints everything to stdout)
set -uo pipefail
cd "$(dirname "$0")/.."
export NUMBA_ENABLE_CUDASIM=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python - <<'PY' || { echo "numba.cuda cannot reach the GPU: install numba-cuda"; exit 2; }
from numba import cuda
import numba
print("numba", numba.__version__, "| numba.cuda from", cuda.__file__)
assert cuda.is_available(), "numba.cuda.is_available() is False"
print("device:", cuda.get_current_device().name)
PY

echo "== CUDA tests on the GPU"
timeout 150 python -m pytest -q -m cuda tests/cuda -p no:cacheprovider
tests=$?

echo "== VGG-16: graphc (target cuda) vs PyTorch cuDNN"
timeout 140 python benchmarks/gpu_vgg16.py --batches 1,8,32 --rounds 7
bench=$?

echo "== exit codes: tests $tests, benchmark $bench"
exit $(( tests != 0 || bench != 0 ))
