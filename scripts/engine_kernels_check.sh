#!/usr/bin/env bash
# One GPU call for the engine-and-kernels work: the GPU tests of the ops the engine now runs (RMSNorm, RoPE,
# the router, top-k, MoE) and of the engine, the kernel parts (default: the top-k / MoE / fused sweeps; PARTS
# picks others, e.g. topk_engine for the top-k on the engine's own logits), then the engine end to end at 200K
# tokens (all Full and uniform 1/4, with the decode step's per-family breakdown). Each part has its own time
# limit, so that one slow part cannot take the others' results with it; every JSON keeps what finished.
# usage: OUT=dir bash scripts/engine_kernels_check.sh
#   [TESTS_S=150 KERNELS_S=170 E2E_S=230 PARTS=topk,moe,fused CONTEXTS=200000 PATTERNS=full,1/4]
set -o pipefail
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-150}" python3 -m pytest -v -m gpu -p no:cacheprovider tests/ops/test_norm.py tests/ops/test_rope.py \
  tests/ops/test_router.py tests/ops/test_topk.py tests/ops/test_moe.py tests/test_engine.py > "$OUT/gpu_tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/gpu_tests.log"
timeout "${KERNELS_S:-170}" python3 -m indexcache.cli bench kernels --out "$OUT/kernels.json" --parts "${PARTS:-topk,moe,fused}" \
  > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?" | tee -a "$OUT/kernels.log"
timeout "${E2E_S:-230}" python3 -m indexcache.cli bench e2e --out "$OUT/e2e.json" --contexts "${CONTEXTS:-200000}" \
  --patterns "${PATTERNS:-full,1/4}" > "$OUT/e2e.log" 2>&1
echo "e2e rc=$?" | tee -a "$OUT/e2e.log"
grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -8
grep -E "topk|moe|fused|engine logits" "$OUT/kernels.log" | tail -60
tail -8 "$OUT/e2e.log"
