#!/usr/bin/env bash
# The evaluation study of docs/results.md, on the GPU machine (repository root), in two calls:
#   OUT=dir bash scripts/study.sh aware DENSE_MODEL
#       trains the training-aware variants from the bundled model's dense checkpoint, three at once
#       (uniform 1/2 and 1/4 with the multi-layer loss, uniform 1/2 without it), with the bundled model's
#       own warm-up and sparse schedule, then runs the task suite (1K tokens) and perplexity on each
#   OUT=dir bash scripts/study.sh bundled "PATTERN ..."
#       the task suite and perplexity on models/dsa-mini, one process per pattern, at once (LENGTH=2048
#       for another length than 1024; UNTIL=s stops what is still running that many seconds in)
#   OUT=dir bash scripts/study.sh pack
#       packs every JSON and log under OUT, and the variants' training logs, into OUT/study.tgz
# VARIANTS="aware-q2" limits the aware step to some variants. The steps may run at the same time (the GPU
# has room for all of them). Every JSON holds its own command line. Models come back in <=15 MB parts
# (cat NAME.tgz.part-* | tar xzf - -C runs).
set -euo pipefail
step=${1:?usage: OUT=dir bash scripts/study.sh aware DENSE_MODEL | bundled "PATTERN ..." | pack}
arg=${2:-}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
G=.data/gutenberg
ppl="heldout=$G/1260-jane-eyre.txt.xz,$G/408-the-souls-of-black-folk.txt.xz,$G/4300-ulysses.txt.xz wikitext=.data/wikitext-2-raw/test.txt"
evalargs="--haystack $G --samples 20 --device cuda --quiet --ppl-data $ppl"
[ "$step" = pack ] || nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
case $step in
aware)
  common="--synthetic-mix 0.5 --batch-size 8 --micro-batch 4 --seq-len 2048 --save-every 100000"
  variant() {  # NAME PATTERN EXTRA: warm-up and sparse stage, then the suite with the variant's own pattern
    local name=$1 pattern=$2 extra=$3 tmp
    tmp=$(mktemp -d)
    bash scripts/train_stage.sh "$tmp" \
      "$name-warm" "--stage warmup --init $arg --pattern $pattern $extra $common --steps 30 --lr 1e-3 --warmup-steps 3 --eval-every 30" \
      "$name:$name-warm" "--stage sparse --init runs/$name-warm/model $extra $common --steps 100 --lr 3e-4 --indexer-lr 1e-3 --warmup-steps 5 --eval-every 50" \
      > "$OUT/train-$name.log" 2>&1
    mv "$tmp/$name".tgz.part-* "$OUT"/
    # shellcheck disable=SC2086
    timeout $((570 - SECONDS)) python3 -m indexcache.cli eval "runs/$name/model" --lengths 1024 $evalargs \
      --out "$OUT/eval-$name.json" > "$OUT/eval-$name.log" 2>&1 || echo "eval of $name stopped" >&2
  }
  for v in ${VARIANTS:-aware-h2 aware-q2 ablate-h2}; do
    case $v in
    aware-h2) variant aware-h2 uniform:2:paper "" & ;;
    aware-q2) variant aware-q2 uniform:4:paper "" & ;;
    ablate-h2) variant ablate-h2 uniform:2:paper "--no-cross-layer" & ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
  done
  wait ;;
bundled)
  for p in $arg; do
    # shellcheck disable=SC2086
    timeout $((${UNTIL:-590} - SECONDS)) python3 -m indexcache.cli eval models/dsa-mini --pattern "$p" \
      --lengths "${LENGTH:-1024}" $evalargs --out "$OUT/eval-bundled-${LENGTH:-1024}-$p.json" \
      > "$OUT/eval-bundled-${LENGTH:-1024}-$p.log" 2>&1 &
  done
  wait ;;
pack)
  mkdir -p runs
  runs=$(cd runs && ls -d aware-* ablate-* 2>/dev/null || true)
  # shellcheck disable=SC2046
  tar czf "$OUT/study.tgz" --exclude model --exclude state.pt --exclude tokens.npz \
    -C "$OUT" $(cd "$OUT" && ls ./*.json ./*.log gpu.txt 2>/dev/null) ${runs:+-C "$PWD/runs" $runs}
  (cd "$OUT" && rm -f ./*.json ./*.log)
  exit 0 ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
tail -n 6 "$OUT"/eval-*.log
