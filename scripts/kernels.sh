#!/usr/bin/env bash
# Kernel correctness at real shapes (GPU tests) and the kernel benchmark, in one GPU session.
# usage: OUT=dir bash scripts/kernels.sh    (writes OUT/kernels_tests.log, OUT/kernels.json, OUT/kernels.log)
set -o pipefail
OUT=${OUT:-results/kernels}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops tests/test_model_backend.py 2>&1 | tee "$OUT/kernels_tests.log"
python3 -m indexcache.cli bench kernels --out "$OUT/kernels.json" ${PARTS:+--parts $PARTS} 2>&1 | tee "$OUT/kernels.log"
