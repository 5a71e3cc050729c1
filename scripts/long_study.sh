#!/usr/bin/env bash
# The long-context study (docs/results.md) on the bundled model, on one GPU machine, from the repository root:
#   OUT=dir bash scripts/long_study.sh LENGTH "PATTERN ..."
# runs one `indexcache eval` per pattern, all at once (the model is small: one process leaves the GPU mostly
# idle), each on niah_single and passkey with a book haystack, SAMPLES per task (default 50), sample seed
# SEED (default 0), and the perplexity of WikiText-2's test split (text no stage of training or calibration
# has read; the held-out books are the retrieval calibration's):
#   indexcache eval MODEL --pattern P --lengths LENGTH --tasks niah_single,passkey --samples 50 --seed 0 \
#     --haystack .data/gutenberg --ppl-data wikitext=.data/wikitext-2-raw/test.txt --device cuda --quiet \
#     --resume --out OUT/eval-long-LENGTH-P.json
# MODEL is models/dsa-mini (MODEL=dir for another); past its 16384-token training length it is read with
# YaRN over 16384 by LENGTH / 16384 (scripts/rope_extend.py), as its card reports it. UNTIL=s stops what is
# still running s seconds in (default 560, inside a 10-minute call); a stopped eval leaves its progress in
# OUT/eval-long-LENGTH-P.json.partial (the samples it scored), and running the same line again continues it
# (--resume); a pattern whose JSON is already there is refused at once, not run again. TASKS=a,b replaces
# the task list. FP32_DOT=tf32x3 multiplies fp32 on the tensor cores (indexcache eval --fp32-dot: about
# 2^-21 relative error a product instead of exact fp32). DRY_RUN=1 prints each eval's command and runs
# nothing (the tests parse them).
set -euo pipefail
length=${1:?usage: OUT=dir bash scripts/long_study.sh LENGTH "PATTERN ..."}
patterns=${2:?usage: give the patterns, space-separated}
OUT=${OUT:?set OUT}
model=${MODEL:-models/dsa-mini}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[[ $length =~ ^[0-9]+$ ]] || { echo "LENGTH must be a token count, got $length" >&2; exit 2; }
if (( length > 16384 )); then
  (( length % 16384 == 0 )) || { echo "past 16384 tokens LENGTH must be a multiple of 16384 (YaRN factor)" >&2; exit 2; }
  factor=$(( length / 16384 ))
  name=$(basename "$model")  # a training run's model/ or partial_model/ is named by its run: one read per model
  [[ $name == model || $name == partial_model ]] && name=$(basename "$(dirname "$model")")-$name
  ext=runs/yarn$factor-$name
  if [ -z "${DRY_RUN:-}" ] && [ ! -d "$ext" ]; then
    mkdir -p runs && python3 scripts/rope_extend.py "$model" "$ext" --factor "$factor" --original 16384
  fi
  model=$ext
fi
[ -n "${DRY_RUN:-}" ] || { mkdir -p "$OUT"; nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"; }
for p in $patterns; do
  cmd=(eval "$model" --pattern "$p" --lengths "$length" --tasks "${TASKS:-niah_single,passkey}"
       --samples "${SAMPLES:-50}" --seed "${SEED:-0}" --haystack .data/gutenberg
       --ppl-data wikitext=.data/wikitext-2-raw/test.txt --device cuda --quiet --resume
       ${FP32_DOT:+--fp32-dot "$FP32_DOT"} --out "$OUT/eval-long-$length-$p.json")
  if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; continue; fi
  timeout $(( ${UNTIL:-560} - SECONDS )) python3 -m indexcache.cli "${cmd[@]}" > "$OUT/eval-long-$length-$p.log" 2>&1 &
done
[ -n "${DRY_RUN:-}" ] && exit 0
wait || true
tail -n 4 "$OUT"/eval-long-"$length"-*.log
