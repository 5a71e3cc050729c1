#!/usr/bin/env bash
# Engine tests on the GPU, then the end-to-end benchmark (GLM-4.7-Flash-DSA shape, random weights).
# usage: OUT=dir bash scripts/e2e.sh   (writes OUT/engine_tests.log, OUT/e2e.json, OUT/e2e.png, OUT/e2e.log)
set -o pipefail
OUT=${OUT:-results/e2e}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/test_model_backend.py 2>&1 | tee "$OUT/engine_tests.log"
python3 -m indexcache.cli bench e2e --out "$OUT/e2e.json" ${CONTEXTS:+--contexts $CONTEXTS} 2>&1 | tee "$OUT/e2e.log"
