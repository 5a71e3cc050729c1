#!/usr/bin/env bash
# The bundled model's long-context curriculum (retrieval at 16K-32K tokens with index_topk 256), each step
# continuing from the model the previous step brought back:
#   OUT=dir bash scripts/long_context_curriculum.sh STEP INIT_MODEL [MINUTES]
# INIT_MODEL is a model directory, or run:NAME for the model an earlier step left in runs/NAME (its model/,
# or its partial_model/ if it was stopped), so that steps chain inside one call:
#   OUT=$OUT bash scripts/long_context_curriculum.sh dense16k models/dsa-mini 6
#   OUT=$OUT bash scripts/long_context_curriculum.sh warm8k run:long-dense16k 3
# Steps, in order (measured on one H200: results/train/long-context/README.md):
#   dense8k    dense continuation at 8192 tokens: 8 sequences per batch, half of them synthetic retrieval
#              windows (the fused dense attention keeps the memory linear in the sequence); 0.45 s a step
#   dense16k   the same at 16384 tokens; 0.87 s a step
#   warm8k     the indexer warm-up at 8192 (KL to the dense attention; the backbone frozen)
#   warm16k    the same at 16384; 14.7 s a step with every query row's dense target, 4.1 s with 2048 rows
#              (results/train/long-context/recipe-b). Both warm-ups score
#              KL_ROWS random query rows per sequence (default 2048, --kl-rows; 0 = all rows): an unbiased
#              sample of the loss whose dense targets cost KL_ROWS * T instead of S * T
#   sparse16k  the sparse stage at 16384 (top-256 of 16K: the selection covers 1.6% of the context); 8.5 s
#              a step with the selection on the plain ops (10.9 s with --selection-kernels, the Triton kernels)
#   eval       niah_single and passkey at 4K, 16K and 32K, all Full, 50 samples each, book haystack
#              (LENGTHS="4096 16384 32768" and SAMPLES=50 change them; YARN=2 evaluates the model read with YaRN
#              RoPE scaling by 2 over its 16K training length, scripts/rope_extend.py, for 32K without training)
# A training step runs for at most MINUTES per call (default 8, inside a 10-minute call) and then stops with
# its weights so far in runs/NAME/partial_model. Calling the same step again on the same machine continues
# it with --resume (optimiser and schedule included); on a fresh machine, pass that partial_model as
# INIT_MODEL and the step starts over from those weights. Each call brings back its run (model or
# partial_model, losses, summary) in <=15 MB parts (scripts/train_stage.sh); unpack with
#   cat OUT/NAME.tgz.part-* | tar xzf - -C runs
# MIX=F and KINDS=k1,k2 set the synthetic share of each batch (default 0.5) and its episode kinds (default
# all; e.g. KINDS=secret,fact,roster,repeat for the look-ups passkey needs; KINDS=secret:0.6,fact,... also sets a
# kind's relative weight, default weights in train/retrieval.py). STEPS=N replaces a training
# step's step count (e.g. what is left of a stopped run, started afresh from its partial_model on a new
# machine). DRY_RUN=1 prints the step's indexcache command instead of running it (the tests parse it).
set -euo pipefail
step=${1:?usage: OUT=dir bash scripts/long_context_curriculum.sh dense8k|dense16k|warm8k|warm16k|sparse16k|eval INIT_MODEL [MINUTES]}
init=${2:?usage: give the model directory to continue from}
if [[ $init == run:* ]]; then  # the model an earlier step left: finished, else stopped
  init=runs/${init#run:}/model
  [ -d "$init" ] || init=${init%/model}/partial_model
  [ -d "$init" ] || { echo "no model in runs/${2#run:} (model/ or partial_model/)" >&2; exit 2; }
fi
minutes=${3:-8}
OUT=${OUT:?set OUT}
[ -n "${DRY_RUN:-}" ] || mkdir -p "$OUT" runs
common="--init $init --save-every 100000 --eval-every 100 --time-limit-min $minutes"
synth="--synthetic-mix ${MIX:-0.5}${KINDS:+ --synthetic-kinds $KINDS}"
rows="--kl-rows ${KL_ROWS:-2048}"
# the books tokenized once: a later step reuses an earlier step's token cache (same books, same tokenizer)
tokens=""
for r in runs/long-*/tokens.npz; do [ -f "$r" ] && { tokens=${r#runs/}; tokens=:${tokens%/tokens.npz}; break; }; done
case $step in
dense8k)
  bash scripts/train_stage.sh "$OUT" long-dense8k$tokens \
    "--stage dense $common $synth --steps ${STEPS:-400} --batch-size 8 --micro-batch 4 --seq-len 8192 --lr 5e-4 --warmup-steps 10" ;;
dense16k)
  bash scripts/train_stage.sh "$OUT" long-dense16k$tokens \
    "--stage dense $common $synth --steps ${STEPS:-400} --batch-size 8 --micro-batch 2 --seq-len 16384 --lr 4e-4 --warmup-steps 10" ;;
warm8k)
  bash scripts/train_stage.sh "$OUT" long-warm8k$tokens \
    "--stage warmup $common $synth $rows --steps ${STEPS:-60} --batch-size 8 --micro-batch 2 --seq-len 8192 --lr 1e-3 --warmup-steps 6" ;;
warm16k)
  bash scripts/train_stage.sh "$OUT" long-warm16k$tokens \
    "--stage warmup $common $synth $rows --steps ${STEPS:-60} --batch-size 8 --micro-batch 2 --seq-len 16384 --lr 1e-3 --warmup-steps 6" ;;
sparse16k)
  bash scripts/train_stage.sh "$OUT" long-sparse16k$tokens \
    "--stage sparse $common $synth --steps ${STEPS:-120} --batch-size 8 --micro-batch 1 --seq-len 16384 --lr 3e-4 --indexer-lr 1e-3 --warmup-steps 5" ;;
eval)
  name=eval-long
  if [ -n "${YARN:-}" ]; then  # the same weights, read with YaRN over the 16K training length
    ext=runs/yarn${YARN}-$(basename "$(dirname "$init")")-$(basename "$init")
    [ -n "${DRY_RUN:-}" ] || [ -d "$ext" ] || python3 scripts/rope_extend.py "$init" "$ext" --factor "$YARN" --original 16384
    init=$ext name=eval-long-yarn$YARN
  fi
  # shellcheck disable=SC2086
  cmd=(eval "$init" --haystack .data/gutenberg --tasks niah_single,passkey --lengths ${LENGTHS:-4096 16384 32768}
       --samples "${SAMPLES:-50}" --device cuda --quiet --out "$OUT/$name.json")
  if [ -n "${DRY_RUN:-}" ]; then echo "${cmd[*]}"; exit 0; fi
  PYTHONPATH=src python3 -m indexcache.cli "${cmd[@]}" | tail -20 ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
