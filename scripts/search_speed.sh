#!/usr/bin/env bash
# The greedy search of the bundled model on long calibration windows, on the Triton kernels and/or the
# plain ops: wall time, seconds per layer-forward, the selected pattern, peak GPU memory.
# usage: OUT=dir DATA=books/ [OPS="triton torch"] [SAMPLES=2] [SEQ=32768] bash scripts/search_speed.sh
#   writes OUT/search_<ops>.json (the report's numbers) and OUT/search_<ops>.log per ops backend
set -o pipefail
OUT=${OUT:?set OUT}; DATA=${DATA:?set DATA to a directory of books}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
runs=$(mktemp -d)
for ops in ${OPS:-triton torch}; do
  t0=$(date +%s.%N)
  python3 -m indexcache.cli search models/dsa-mini --data "$DATA" --num-samples "${SAMPLES:-2}" \
    --seq-len "${SEQ:-32768}" --dtype bfloat16 --device cuda --ops "$ops" --baselines none --out "$runs/$ops" \
    2>&1 | tr '\r' '\n' | grep -v -E "it/s|s/it|cand/s|flip/s" > "$OUT/search_$ops.log"
  t1=$(date +%s.%N)
  python3 - "$runs/$ops/report.json" "$OUT/search_$ops.json" "$t0" "$t1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
row = {"ops": r.get("ops"), "wall_s": round(float(sys.argv[4]) - float(sys.argv[3]), 1), "search_s": r["seconds"],
       "selected": r["selected"]["pattern"], "selected_loss": r["selected"]["loss"], "all_full_loss": r["all_full_loss"],
       "trajectory": r["trajectory"], "counters": r["counters"], "calibration": r["calibration"],
       "s_per_layer_forward": r["seconds"] / r["counters"]["layer_forwards"], "command": r.get("command"),
       "peak_gpu_memory_gib": r.get("peak_gpu_memory_gib")}
json.dump(row, open(sys.argv[2], "w"), indent=1)
print({k: row[k] for k in ("ops", "wall_s", "search_s", "selected", "s_per_layer_forward")})
PY
  tail -3 "$OUT/search_$ops.log"
done
