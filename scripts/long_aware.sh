#!/usr/bin/env bash
# Training-aware IndexCache at 16K tokens (the paper's Table 3) on the bundled long-context model, on one GPU
# machine, from the repository root:
#   OUT=dir bash scripts/long_aware.sh VARIANT SEED [MINUTES]
# continues models/dsa-mini with the sparse stage of its own curriculum (16384 tokens, 8 sequences a step,
# half synthetic retrieval windows of the recipe's kinds; scripts/long_context_curriculum.sh sparse16k)
# for the variant's pattern, with training seed SEED, then scores it on niah_single and passkey at 4096 and
# 16384 tokens with scripts/long_study.sh (50 samples, sample seed 0: the same prompts as the training-free
# rows of results/study-long, so the differences are paired), into OUT/VARIANT-sSEED/. Variants:
#   full         all Full, the same extra training: what the training itself changes (the control)
#   aware-h2     uniform 1/2 (FSFS...), multi-layer distillation
#   aware-q2     uniform 1/4 (FSSS...), multi-layer distillation
#   searched-h2  the 16K book search's 1/2 pick FFFFSFSSSFSSSFFS (the paper's "1/2 w/ searched pattern")
#   ablate-h2    uniform 1/2 without the cross-layer loss (each indexer distilled on its own layer)
# STEPS=N (default 20, 8.4 s a step on an H200) and MINUTES (default 6: the step stops there with its weights
# in runs/NAME/partial_model, and the same call on the same machine continues it with --resume) bound the
# training; UNTIL=s (default 570) stops the evaluations that many seconds after the script started, and
# LENGTHS="4096 16384 32768" adds 32K (read with YaRN x2, as long_study.sh reads past 16K). The run
# directory (model, losses, summary) is packed into <=15 MB parts under PACK (default runs/packs: weights are
# not results). DRY_RUN=1 prints the training and evaluation commands and runs nothing (the tests parse them).
set -euo pipefail
variant=${1:?usage: OUT=dir bash scripts/long_aware.sh full|aware-h2|aware-q2|searched-h2|ablate-h2 SEED [MINUTES]}
seed=${2:?usage: give the training seed}
minutes=${3:-6}
OUT=${OUT:?set OUT}
[[ $seed =~ ^[0-9]+$ ]] || { echo "SEED must be a non-negative integer, got $seed" >&2; exit 2; }
extra=""
case $variant in
full) spec="" pattern=FFFFFFFFFFFFFFFF ;;
aware-h2) spec=uniform:2:paper pattern=FSFSFSFSFSFSFSFS ;;
aware-q2) spec=uniform:4:paper pattern=FSSSFSSSFSSSFSSS ;;
searched-h2) spec=FFFFSFSSSFSSSFFS pattern=FFFFSFSSSFSSSFFS ;;
ablate-h2) spec=uniform:2:paper pattern=FSFSFSFSFSFSFSFS extra=--no-cross-layer ;;
*) echo "unknown variant $variant (full, aware-h2, aware-q2, searched-h2, ablate-h2)" >&2; exit 2 ;;
esac
name=long-$variant-s$seed
kinds=secret:0.6,fact,repeat,listing,chain,tally,echo,group,roster,track,rank  # the bundled model's recipe
args="--stage sparse --init models/dsa-mini ${spec:+--pattern $spec} $extra --seed $seed --save-every 100000 \
  --eval-every 100 --time-limit-min $minutes --synthetic-mix 0.5 --synthetic-kinds $kinds --steps ${STEPS:-20} \
  --batch-size 8 --micro-batch 1 --seq-len 16384 --lr 3e-4 --indexer-lr 1e-3 --warmup-steps 5"
pack=${PACK:-runs/packs}
[ -n "${DRY_RUN:-}" ] || mkdir -p "$pack" "$OUT/$variant-s$seed"
tokens=""  # the books tokenized once: reuse any earlier run's token cache (same books, same tokenizer)
for r in runs/long-*/tokens.npz; do [ -f "$r" ] && { tokens=${r#runs/}; tokens=:${tokens%/tokens.npz}; break; }; done
bash scripts/train_stage.sh "$pack" "$name$tokens" "$args"
model=runs/$name/model
[ -n "${DRY_RUN:-}" ] || [ -d "$model" ] || model=runs/$name/partial_model
[ -n "${DRY_RUN:-}" ] || cp "runs/$name/summary.json" "$OUT/$variant-s$seed/train-summary.json" 2>/dev/null || true
for length in ${LENGTHS:-4096 16384}; do  # the evaluations share what is left of UNTIL (default 570 s) after training
  left=$(( ${UNTIL:-570} - SECONDS ))
  (( left > 0 )) || { echo "no time left to evaluate $name at $length tokens" >&2; continue; }
  MODEL=$model OUT=$OUT/$variant-s$seed UNTIL=$left bash scripts/long_study.sh "$length" "$pattern"
done
