#!/usr/bin/env bash
# The retrieval curriculum of the bundled model, stage by stage, on the GPU machine (repository root):
#   OUT=dir bash scripts/retrieval_curriculum.sh STEP INIT_MODEL
# Every step continues from INIT_MODEL and brings back, in <=15 MB parts, the models named below plus every
# run's logs (losses.json, losses.png, summary.json). The steps that made models/dsa-mini, in order:
#   mixed    runs/mini-dense (the book-only dense model) -> mini-dense2 -> ... -> mini-dense7: facts,
#            repeats, listings mixed into the books at 256 to 4096 tokens; no copying was learnt
#   echo     mini-dense7 -> mini-echo: 3/4 of each batch the bare copy task; copying appears near step 450
#   finish   mini-echo -> mini-dense8 (all kinds at 2048 tokens) -> indexer warm-up -> sparse stage
#            (mini-sparse3), then the task suite at 1K tokens
#   targeted mini-dense8 -> mini-dense9 (all eleven kinds, the five added ones aimed at the task shapes
#            mini-sparse3 failed) -> warm-up -> sparse stage (mini-sparse4), task suite at 1K
#   focus    mini-sparse4 -> mini-dense10 (fact, repeat and the five added kinds, some with a solved example
#            first) -> short warm-up -> longer sparse stage (mini-sparse5 = models/dsa-mini), task suite at 1K
set -euo pipefail
step=${1:?usage: OUT=dir bash scripts/retrieval_curriculum.sh mixed|echo|finish|targeted|focus INIT_MODEL}
init=${2:?usage}
tmp=$(mktemp -d)
common="--save-every 100000"
dsa() {  # TAG "DENSE ARGS" "WARM-UP ARGS" "SPARSE ARGS": mini-denseTAG -> mini-warmTAG -> mini-sparseTAG,
  # 8 x 2048-token batches after the dense stage; the second TAG names the warm-up and sparse runs
  local d=$1 s=$2
  bash scripts/train_stage.sh "$tmp" \
    "mini-dense$d" "--stage dense --init $init $3 --batch-size 16 --seq-len 2048 --lr 1e-3 --warmup-steps 10 $common" \
    "mini-warm$s:mini-dense$d" "--stage warmup --init runs/mini-dense$d/model $4 --batch-size 8 --micro-batch 4 --seq-len 2048 --lr 1e-3 --eval-every 30 $common" \
    "mini-sparse$s:mini-dense$d" "--stage sparse --init runs/mini-warm$s/model $5 --batch-size 8 --micro-batch 4 --seq-len 2048 --lr 3e-4 --indexer-lr 1e-3 --warmup-steps 5 $common"
  keep=("mini-dense$d" "mini-sparse$s")
}
first="--synthetic-kinds fact,repeat,listing,chain,tally,echo"  # the kinds that existed then
case $step in
mixed)
  bash scripts/train_stage.sh "$tmp" \
    mini-dense2 "--stage dense --init $init --synthetic-mix 0.5 $first --steps 560 --batch-size 8 --seq-len 4096 --lr 1.5e-3 --warmup-steps 20 --eval-every 140 $common"
  echo "then, each from the previous model and with $first: mini-dense3 (--synthetic-mix 0.75 --steps 1000 --batch-size 32 --seq-len 1024 --lr 2e-3), mini-dense4 (0.75, 800 x 128 x 256, 2e-3), mini-dense5 (0.5, 250 x 16 x 2048, 1e-3), mini-dense6 (0.75, 400 x 64 x 512, 1e-3), mini-dense7 (0.5, 300 x 16 x 2048, 1e-3)"
  keep=(mini-dense2) ;;
echo)
  bash scripts/train_stage.sh "$tmp" \
    mini-echo "--stage dense --init $init --synthetic-mix 0.75 --synthetic-kinds echo --synthetic-density 0.95 --steps 2400 --batch-size 64 --seq-len 256 --lr 1e-3 --warmup-steps 10 --eval-every 300 $common"
  keep=(mini-echo) ;;
finish)
  dsa 8 3 "--synthetic-mix 0.5 $first --steps 400 --eval-every 125" \
    "--synthetic-mix 0.5 $first --steps 60 --warmup-steps 6" \
    "--synthetic-mix 0.5 $first --steps 60 --eval-every 30" ;;
targeted)
  dsa 9 4 "--synthetic-mix 0.6 --steps 500 --eval-every 250" \
    "--synthetic-mix 0.5 --steps 60 --warmup-steps 6" \
    "--synthetic-mix 0.5 --steps 60 --eval-every 30" ;;
focus)
  dsa 10 5 "--synthetic-mix 0.6 --synthetic-kinds fact,repeat,secret,group,roster,track,rank --steps 500 --eval-every 250" \
    "--synthetic-mix 0.5 --steps 30 --warmup-steps 3" \
    "--synthetic-mix 0.5 --steps 100 --eval-every 50" ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
for k in "${keep[@]}"; do mv "$tmp/$k".tgz.part-* "$OUT"/; done
mv "$tmp/gpu.txt" "$OUT"/
tar czf "$OUT/logs-$step.tgz" -C runs --exclude model --exclude state.pt --exclude tokens.npz \
  $(cd runs && ls -d mini-* 2>/dev/null)
if [ "$step" != mixed ] && [ "$step" != echo ]; then
  final=${keep[-1]}
  PYTHONPATH=src timeout 200 python3 -m indexcache.cli eval "runs/$final/model" --haystack .data/gutenberg \
    --lengths 1024 --samples 20 --device cuda --quiet --out "$OUT/eval-1k.json" | tail -30 || true
fi
