#!/usr/bin/env bash
# Full-scale evidence on one H200, in calls of under ten minutes (STAGE=1, 2, 3).
#   STAGE=1: the GPU suite; the block-FP8 GEMM against torch; indexcache plan --probe of the bundled model at
#            32K/64K/128K and measured searches at 64K and 128K; plan probes of DeepSeek-V3.2 (16 experts and
#            the full 256) and GLM-5 in FP8.
#   STAGE=2: the block-FP8 GEMM; the DeepSeek-V3.2-shaped FP8 model (16 experts): footprint and all-Full loss
#            at full depth (61 layers), two greedy steps at 12 layers, each against the plan; the bundled model
#            at 1 x 128K.
#   STAGE=3: the plan's probe on the bundled model's trained layers, against measured searches; the
#            DeepSeek-V4-Flash-shaped model's plan (transformers backend) against results/v4_flash.
# OUT (results directory), DATA (books directory), WORK (scratch) are read from the environment.
set -uo pipefail
OUT=${OUT:?} DATA=${DATA:-.data/books} WORK=${WORK:-/tmp/scale}
mkdir -p "$OUT" "$WORK"
ic() { python -m indexcache.cli "$@"; }
STAGE=${STAGE:-1}
if [ "$STAGE" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
  python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    > "$OUT/versions.txt"
  # the kernels new since the committed GPU suite (results/gpu_suite/): the block-FP8 product and the FP8 model
  timeout 120 python -m pytest -q -m gpu tests/ops/test_fp8_gemm.py tests/test_model_backend.py > "$OUT/gpu_tests.log" 2>&1
  echo "rc=$?" >> "$OUT/gpu_tests.log"
  timeout 150 python -m indexcache.cli bench kernels --parts fp8_gemm --out "$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.md" 2> "$OUT/fp8_gemm.log"
  timeout 150 python scripts/scale_evidence.py plans "$WORK" "$OUT/plans_fp8.json" > "$OUT/plans_fp8.txt" 2>&1
  for spec in ${BUNDLED:-"4 32768" "4 65536"}; do
    set -- $spec; n=$1; L=$2
    timeout 60 python -m indexcache.cli plan models/dsa-mini --seq-len "$L" --num-samples "$n" --num-full 4 --probe \
      --out "$OUT/plan_bundled_${n}x${L}.json" > "$OUT/plan_bundled_${n}x${L}.txt" 2>&1
    if [ "$L" != 32768 ]; then  # 4 x 32K was measured before (results/long_calibration)
      timeout 200 python -m indexcache.cli search models/dsa-mini \
        --data "$DATA" --num-samples "$n" --seq-len "$L" --num-full 4 --dtype bfloat16 --device cuda --baselines none \
        --out "$WORK/search_${n}x${L}" > "$OUT/search_bundled_${n}x${L}.log" 2>&1
      cp "$WORK/search_${n}x${L}/report.json" "$OUT/search_bundled_${n}x${L}.json" 2>/dev/null
    fi
  done
elif [ "$STAGE" = 2 ]; then
  timeout 150 python -m indexcache.cli bench kernels --parts fp8_gemm --out "$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.md" \
    2> "$OUT/fp8_gemm.log"
  timeout 300 python scripts/scale_evidence.py v32 "$WORK" "$OUT/v32_fp8.json" --data "$DATA" > "$OUT/v32_fp8.log" 2>&1
  echo "rc=$?" >> "$OUT/v32_fp8.log"
  # 128K tokens: one sequence, two greedy steps, against the plan's probe
  timeout 30 python -m indexcache.cli plan models/dsa-mini --seq-len 131072 --num-samples 1 --flips 2 --probe \
    --out "$OUT/plan_bundled_1x131072.json" > "$OUT/plan_bundled_1x131072.txt" 2>&1
  timeout 150 python -m indexcache.cli search models/dsa-mini --data "$DATA" --num-samples 1 --seq-len 131072 \
    --num-full 14 --dtype bfloat16 --device cuda --baselines none --out "$WORK/search_1x131072" \
    > "$OUT/search_bundled_1x131072.log" 2>&1
  cp "$WORK/search_1x131072/report.json" "$OUT/search_bundled_1x131072.json" 2>/dev/null
elif [ "$STAGE" = plans ]; then
  # the plans with the current estimate: the real DeepSeek-V3.2 and GLM-5 in FP8 on 8 GPUs, the 16-expert
  # V3.2 cut, and the bundled model's trained layers at the three lengths
  timeout 240 python scripts/scale_evidence.py plans "$WORK" "$OUT/plans_fp8.json" > "$OUT/plans_fp8.txt" 2>&1
  for spec in "4 32768 4" "4 65536 4" "1 131072 14"; do
    set -- $spec
    timeout 60 python -m indexcache.cli plan models/dsa-mini --seq-len "$2" --num-samples "$1" --num-full "$3" --probe \
      --data "$DATA" --out "$OUT/plan_trained_${1}x${2}.json" > "$OUT/plan_trained_${1}x${2}.txt" 2>&1
  done
elif [ "$STAGE" = 3 ]; then
  # the plan's probe on the bundled model's trained layers and calibration tokens, against measured searches
  # (4 x 32K: results/long_calibration; 1 x 128K: STAGE=2), and on the DeepSeek-V4-Flash-shaped model against
  # results/v4_flash (transformers backend)
  for spec in "4 32768 4" "4 65536 4" "1 131072 14"; do
    set -- $spec
    timeout 60 python -m indexcache.cli plan models/dsa-mini --seq-len "$2" --num-samples "$1" --num-full "$3" --probe \
      --data "$DATA" --out "$OUT/plan_trained_${1}x${2}.json" > "$OUT/plan_trained_${1}x${2}.txt" 2>&1
  done
  timeout 200 python -m indexcache.cli search models/dsa-mini --data "$DATA" --num-samples 4 --seq-len 65536 \
    --num-full 4 --dtype bfloat16 --device cuda --baselines none --out "$WORK/search_4x65536" \
    > "$OUT/search_bundled_4x65536.log" 2>&1
  cp "$WORK/search_4x65536/report.json" "$OUT/search_bundled_4x65536.json" 2>/dev/null
  python scripts/scale_evidence.py configs "$WORK" > /dev/null
  timeout 120 python -m indexcache.cli plan "$WORK/deepseek-v4-flash-12-layers/config.json" --seq-len 8192 \
    --num-samples 2 --num-full 4 --probe --out "$OUT/plan_v4_flash.json" > "$OUT/plan_v4_flash.txt" 2>&1
fi
