#!/usr/bin/env bash
# Greedy search on one GPU and on two GPUs (torchrun, NCCL): the trajectories must be identical.
# Usage (on a machine with 2 GPUs): bash scripts/search_nccl.sh OUT_DIR
set -euo pipefail
out=${1:?usage: search_nccl.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda devices', torch.cuda.device_count())" | tee -a "$out/gpus.txt"
model=/tmp/search_nccl_model
python3 -m indexcache.cli random-model "$model" --preset small --seed 0
args=(search "$model" --device cuda --num-samples 8 --seq-len 1024 --keep 0.25 --to-end --baselines none)
start=$(date +%s)
runs=/tmp/search_nccl_runs
python3 -m indexcache.cli "${args[@]}" --out "$runs/one_gpu" 2>&1 | grep -v -E "it/s|cand/s|flip/s" | tee "$out/one_gpu.log"
mid=$(date +%s)
python3 -m torch.distributed.run --nproc_per_node 2 -m indexcache.cli "${args[@]}" --out "$runs/two_gpus" 2>&1 \
  | grep -v -E "it/s|cand/s|flip/s" | tee "$out/two_gpus.log"
end=$(date +%s)
cp "$runs/one_gpu/report.json" "$out/one_gpu_report.json"
cp "$runs/two_gpus/report.json" "$out/two_gpus_report.json"
python3 - "$out" $((mid - start)) $((end - mid)) <<'PY'
import json, sys
out, t1, t2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a = json.load(open(f"{out}/one_gpu_report.json"))
b = json.load(open(f"{out}/two_gpus_report.json"))
same = a["trajectory"] == b["trajectory"] and a["all_full_loss"] == b["all_full_loss"]
summary = {"identical_trajectory": same, "steps": len(a["trajectory"]), "selected": a["selected"]["pattern"],
           "wall_seconds_one_gpu": t1, "wall_seconds_two_gpus": t2,
           "evaluations": [a["counters"]["evaluations"], b["counters"]["evaluations"]]}
json.dump(summary, open(f"{out}/comparison.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
sys.exit(0 if same else 1)
PY
