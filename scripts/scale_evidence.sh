#!/usr/bin/env bash
# Full-scale evidence on one H200 (results/scale/), in calls of under ten minutes, one STAGE each:
#   tests    gpu.txt, gpu_tests.log: the GPU tests of the block-FP8 product, its activation quantisation and
#            the FP8 model
#   fp8      fp8_gemm.json/.md (the block-FP8 GEMM against cuBLAS bf16), fp8_act_quant.json (the one-pass
#            activation quantisation against plain PyTorch)
#   v32      v32_fp8.json, v32_fp8_cut_steps.json: DeepSeek-V3.2 width in FP8 with 16 experts, footprint and
#            the all-Full pass at full depth, two greedy steps at 12 layers, each against the plan
#   bundled  search_bundled_*.json: the bundled model at 1 x 128K (two steps), 4 x 64K with --cache-gb 100,
#            and 4 x 64K with --cache-gb auto (stopped after 200 s: it spills)
#   gpu2     gpu_tests_rerun.log: the block-FP8 GPU tests again (the activation kernel with IEEE division) and
#            transformers' FP8 layers on this package's GEMM
#   v32full  v32_full_steps.json: two greedy steps of the full-depth FP8 DeepSeek-V3.2 shape at 1 x 32K, in
#            calls of LIMIT seconds (default 540) that resume from v32_full_steps.state.json in OUT
#   long     search_bundled_2x131072.json (whole search with the baselines, --cache-gb 80) and
#            overlap_bundled_{2x65536,1x131072}.json (bf16, Triton kernels)
#   plans    plans_fp8.json (DeepSeek-V3.2 and GLM-5 in FP8 on 8 GPUs, the 16-expert cut on one),
#            plan_trained_*.json (the bundled model's trained layers on the books), plan_v4_flash.json
# OUT (results directory), DATA (books directory), WORK (scratch) are read from the environment; the plan
# check against the measurements is then `python scripts/plan_check.py` on any machine.
set -uo pipefail
OUT=${OUT:?} DATA=${DATA:-.data/books} WORK=${WORK:-/tmp/scale} STAGE=${STAGE:?tests, fp8, v32, bundled, gpu2, v32full, long or plans}
mkdir -p "$OUT" "$WORK"
ic() { python -m indexcache.cli "$@"; }
search() {  # search NAME ARGS...: the bundled model, its report copied to OUT
  local name=$1; shift
  timeout "${LIMIT:-300}" python -m indexcache.cli search models/dsa-mini --data "$DATA" --num-full 4 --dtype bfloat16 \
    --device cuda --baselines none --overwrite --out "$WORK/$name" "$@" > "$OUT/$name.log" 2>&1
  cp "$WORK/$name/report.json" "$OUT/$name.json" 2>/dev/null
}
case "$STAGE" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
    timeout 120 python -m pytest -q -m gpu tests/ops/test_fp8_gemm.py tests/test_model_backend.py \
      > "$OUT/gpu_tests.log" 2>&1
    echo "rc=$?" >> "$OUT/gpu_tests.log" ;;
  fp8)
    timeout 150 ic bench kernels --parts fp8_gemm --out "$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.md" 2> "$OUT/fp8_gemm.log"
    timeout 90 python scripts/fp8_act_quant_bench.py "$OUT/fp8_act_quant.json" ;;
  v32)
    timeout 300 python scripts/scale_evidence.py v32 "$WORK" "$OUT/v32_fp8.json" --data "$DATA" > "$OUT/v32_fp8.log" 2>&1
    echo "rc=$?" >> "$OUT/v32_fp8.log" ;;
  bundled)
    search search_bundled_1x131072 --num-samples 1 --seq-len 131072 --num-full 14
    search search_bundled_4x65536_cache100 --num-samples 4 --seq-len 65536 --cache-gb 100
    LIMIT=200 search search_bundled_4x65536_auto_cache --num-samples 4 --seq-len 65536 ;;
  gpu2)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
    timeout 150 python -m pytest -q -m gpu tests/ops/test_fp8_gemm.py tests/test_hf_fp8.py -k "act_quant or hf_fp8" \
      > "$OUT/gpu_tests_rerun.log" 2>&1
    echo "rc=$?" >> "$OUT/gpu_tests_rerun.log" ;;
  v32full)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
      timeout "${LIMIT:-540}" python scripts/scale_evidence.py v32-steps "$WORK" "$OUT/v32_full_steps.json" --data "$DATA" \
      >> "$OUT/v32_full_steps.log" 2>&1
    echo "rc=$?" >> "$OUT/v32_full_steps.log" ;;
  long)
    search search_bundled_2x131072 --num-samples 2 --seq-len 131072 --cache-gb 80 --baselines uniform,similarity
    for spec in "2 65536" "1 131072"; do
      set -- $spec
      timeout 120 python -m indexcache.cli overlap models/dsa-mini --data "$DATA" --num-samples "$1" --seq-len "$2" --dtype bfloat16 \
        --device cuda --overwrite --out "$WORK/overlap_${1}x${2}" > "$OUT/overlap_bundled_${1}x${2}.log" 2>&1
      cp "$WORK/overlap_${1}x${2}/overlap.json" "$OUT/overlap_bundled_${1}x${2}.json" 2>/dev/null
    done ;;
  plans)
    timeout 240 python scripts/scale_evidence.py plans "$WORK" "$OUT/plans_fp8.json" > "$OUT/plans_fp8.txt" 2>&1
    for spec in "4 32768 4" "4 65536 4" "1 131072 14"; do
      set -- $spec
      timeout 60 ic plan models/dsa-mini --seq-len "$2" --num-samples "$1" --num-full "$3" --probe --data "$DATA" \
        --out "$OUT/plan_trained_${1}x${2}.json" > "$OUT/plan_trained_${1}x${2}.txt" 2>&1
    done
    timeout 120 ic plan "$WORK/deepseek-v4-flash-12-layers/config.json" --seq-len 8192 --num-samples 2 --num-full 4 \
      --probe --out "$OUT/plan_v4_flash.json" > "$OUT/plan_v4_flash.txt" 2>&1 ;;
  *) echo "STAGE must be tests, fp8, v32, bundled, gpu2, v32full, long or plans" >&2; exit 2 ;;
esac
