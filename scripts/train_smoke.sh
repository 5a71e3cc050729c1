#!/usr/bin/env bash
# Throughput and sanity of the three training stages on one GPU (short runs).
# Reuses the token cache of runs/mini-dense (made on a CPU machine by the dense stage's data step) and needs
# the books under .data/gutenberg. Usage: bash scripts/train_smoke.sh OUT_DIR
set -euo pipefail
out=${1:?usage: train_smoke.sh OUT_DIR}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
run() { python3 -m indexcache.cli train "$@" --data .data/gutenberg --device cuda --eval-every 1000000; }
s=runs/smoke
rm -rf $s && mkdir -p $s
run $s/dense --token-cache runs/mini-dense/tokens.npz --stage dense --steps 40 --batch-size 8 --micro-batch 4 --seq-len 4096 --warmup-steps 5 2>&1 | tail -3
run $s/warm --stage warmup --init $s/dense/model --steps 20 --batch-size 8 --micro-batch 4 --seq-len 4096 --lr 1e-3 2>&1 | tail -3
run $s/sparse --stage sparse --init $s/warm/model --steps 20 --batch-size 8 --micro-batch 4 --seq-len 4096 --lr 3e-4 2>&1 | tail -3
run $s/aware --stage warmup --init $s/dense/model --steps 20 --batch-size 8 --micro-batch 4 --seq-len 4096 --lr 1e-3 \
  --pattern uniform:4 2>&1 | tail -3
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for st in ("dense", "warm", "sparse", "aware"):
    log = json.load(open(f"runs/smoke/{st}/losses.json"))["train"]
    a, b = log[1], log[-1]
    rows[st] = {"sec_per_step": (b["seconds"] - a["seconds"]) / (b["step"] - a["step"]), "first": log[0], "last": b}
    rows[st]["tokens_per_s"] = 8 * 4096 / rows[st]["sec_per_step"]
json.dump(rows, open(f"{out}/smoke.json", "w"), indent=1)
for k, v in rows.items():
    print(f"{k:7s} {v['sec_per_step']:.3f} s/step  {v['tokens_per_s']:,.0f} tok/s  "
          f"lm {v['first']['lm_loss']:.3f}->{v['last']['lm_loss']:.3f}  kl {v['last'].get('indexer_kl', float('nan')):.3f}")
PY
