#!/usr/bin/env bash
# The GPU test suite (every test marked gpu: kernels at real shapes, the model and the engine on the kernels).
# usage: OUT=dir bash scripts/gpu_suite.sh   (writes OUT/gpu.txt and OUT/gpu_tests.log)
set -o pipefail
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -m gpu -v -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
