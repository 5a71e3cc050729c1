#!/usr/bin/env bash
# Do tf32x3 fp32 products (indexcache eval --fp32-dot tf32x3) give the answers of exact ones, and how much
# faster? One GPU call, from the repository root:
#   OUT=dir bash scripts/fp32_dot_check.sh [LENGTH]
# evaluates the bundled model all Full at LENGTH tokens (default 32768, read with YaRN as long_study.sh
# reads it) on niah_single and passkey with the study's prompts (book haystack, sample seed 0): SAMPLES
# (default 10) per family under tf32x3, then SAMPLES_IEEE (default 5) under ieee on the same GPU, and
# compares them sample by sample (scripts/compare_evals.py), each also against the committed ieee row of
# the study (results/study-long/eval-long-LENGTH-F...F.json, 50 per family, another run). Then the GPU
# tests of both modes (tests/ops, -k fp32) in what is left of UNTIL (default 300 s). Each step has its
# own time limit and writes its JSON as it ends. DRY_RUN=1 prints the eval commands and runs nothing.
set -uo pipefail
length=${1:-32768}
OUT=${OUT:?set OUT}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
all_full=FFFFFFFFFFFFFFFF
model=models/dsa-mini
if (( length > 16384 )); then
  factor=$(( length / 16384 ))
  model=runs/yarn$factor-dsa-mini
  if [ -z "${DRY_RUN:-}" ] && [ ! -d "$model" ]; then
    mkdir -p runs && python3 scripts/rope_extend.py models/dsa-mini "$model" --factor "$factor" --original 16384 > /dev/null
  fi
fi
ev=(eval "$model" --pattern $all_full --lengths "$length" --tasks niah_single,passkey --seed 0 --haystack .data/gutenberg
    --ppl-data wikitext=.data/wikitext-2-raw/test.txt --device cuda --quiet --overwrite)
tf=("${ev[@]}" --samples "${SAMPLES:-10}" --fp32-dot tf32x3 --out "$OUT/eval-$length-tf32x3.json")
ie=("${ev[@]}" --samples "${SAMPLES_IEEE:-5}" --fp32-dot ieee --out "$OUT/eval-$length-ieee.json")
if [ -n "${DRY_RUN:-}" ]; then echo "${tf[*]}"; echo "${ie[*]}"; exit 0; fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
timeout 120 python3 -m indexcache.cli "${tf[@]}" > "$OUT/tf32x3.log" 2>&1; echo "tf32x3 eval rc=$? at ${SECONDS} s"
timeout 100 python3 -m indexcache.cli "${ie[@]}" > "$OUT/ieee.log" 2>&1; echo "ieee eval rc=$? at ${SECONDS} s"
committed=results/study-long/eval-long-$length-$all_full.json
python3 scripts/compare_evals.py "$OUT/eval-$length-ieee.json" "$OUT/eval-$length-tf32x3.json" --out "$OUT/tf32x3-vs-ieee.json"
if [ -f "$committed" ]; then
  python3 scripts/compare_evals.py "$committed" "$OUT/eval-$length-tf32x3.json" --out "$OUT/tf32x3-vs-committed.json"
  python3 scripts/compare_evals.py "$committed" "$OUT/eval-$length-ieee.json" --out "$OUT/ieee-vs-committed.json"
fi
left=$(( ${UNTIL:-300} - SECONDS ))
if (( left > 20 )); then
  timeout $left python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_indexer.py tests/ops/test_moe.py \
    tests/ops/test_sparse_mla.py -k fp32 > "$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
fi
