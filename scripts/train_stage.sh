#!/usr/bin/env bash
# Run training stages on a GPU machine and pack each run directory (model, losses, summary; not the
# optimiser state or token cache) into <=15 MB pieces under OUT, so they can travel back. A run that an
# earlier call on the same machine stopped (its state.pt is still there) is continued with --resume.
# Usage: bash scripts/train_stage.sh OUT NAME[:TOKENS_FROM] "TRAIN ARGS" [NAME "ARGS" ...]
#   e.g. bash scripts/train_stage.sh $OUT mini-dense "--stage dense --steps 640 ..."
# Unpack here with: cat OUT/NAME.tgz.part-* | tar xzf - -C runs
# DRY_RUN=1 prints each stage's indexcache command (one line, its arguments) and runs nothing.
set -euo pipefail
out=${1:?usage}; shift
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -n "${DRY_RUN:-}" ] || nvidia-smi --query-gpu=name --format=csv,noheader > "$out/gpu.txt"
while [ $# -ge 2 ]; do
  spec=$1; args=$2; shift 2
  name=${spec%%:*}; from=""
  [[ $spec == *:* ]] && from=${spec#*:}
  cache=()
  if [ -n "$from" ] && [ -f "runs/$from/tokens.npz" ]; then
    cache=(--token-cache "runs/$from/tokens.npz")  # same books and tokenizer: reuse the token cache
  fi
  resume=()
  [ -f "runs/$name/state.pt" ] && resume=(--resume)  # a run an earlier call on this machine stopped: continue it
  if [ -n "${DRY_RUN:-}" ]; then
    echo "train runs/$name $args ${cache[*]} ${resume[*]} --data .data/gutenberg --device cuda --shard-mb 15"
    continue
  fi
  echo "== indexcache train runs/$name $args ${resume[*]}"
  # shellcheck disable=SC2086
  python3 -m indexcache.cli train "runs/$name" $args "${cache[@]}" "${resume[@]}" --data .data/gutenberg --device cuda --shard-mb 15 2>&1 \
    | tr '\r' '\n' | grep -v -E "it/s\]|s/it\]" | tail -6
  tar czf - -C runs --exclude state.pt --exclude tokens.npz "$name" | split -b 15M - "$out/$name.tgz.part-"
done
[ -n "${DRY_RUN:-}" ] || ls -la "$out"
