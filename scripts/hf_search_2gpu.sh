#!/usr/bin/env bash
# The greedy search with the transformers backend on a model split over two GPUs (explicit device_map:
# the first half of the decoder layers on cuda:0, the second half on cuda:1), against the native backend
# on one GPU. Writes to OUT: versions, the device map, where every layer's weights really were, the
# peak memory of each GPU, both reports, and comparison.json.
#
# Usage (from the repository root, on a machine with 2 GPUs):
#   bash scripts/hf_search_2gpu.sh OUT_DIR [WHEELS_DIR] [MODEL_DIR]     (OUT_DIR defaults to $OUT)
# WHEELS_DIR (default: wheels/, or $WHEELS_DIR): every *.whl in it is installed first with
#   pip install --no-deps --no-index, for machines without network access. The transformers backend needs
#   transformers and, to place a model on several devices, accelerate (plus their own dependencies:
#   huggingface_hub, safetensors, tokenizers, regex, pyyaml, packaging, ... if the machine lacks them).
# MODEL_DIR (default: the bundled models/dsa-mini; a random 16-layer model if that is absent).
# Settings can be changed through the environment: NUM_SAMPLES (4), SEQ_LEN (2048), KEEP (0.25).
set -euo pipefail
out=${1:-${OUT:?usage: hf_search_2gpu.sh OUT_DIR [WHEELS_DIR] [MODEL_DIR] (or set OUT)}}
wheels=${2:-${WHEELS_DIR:-wheels}}
model=${3:-models/dsa-mini}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
py=${PYTHON:-python3}

# 1. offline wheels, if any
if compgen -G "$wheels/*.whl" > /dev/null; then
  echo "installing wheels from $wheels (--no-deps --no-index):"
  ls -1 "$wheels"/*.whl
  "$py" -m pip install --no-deps --no-index "$wheels"/*.whl 2>&1 | tail -n 3
else
  echo "no wheels under $wheels: using what is installed"
fi

# 2. what this machine has
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$out/gpus.txt"
missing=$("$py" - <<'PY' 2>&1 | tee "$out/versions.txt" | grep '^MISSING' || true
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface_hub"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:  # a missing dependency of the package shows up here too
        print(f"MISSING {name}: {type(e).__name__}: {e}")
try:
    import torch
    print("cuda devices", torch.cuda.device_count())
except Exception as e:
    print(f"MISSING torch (CUDA): {type(e).__name__}: {e}")
PY
)
if [ -n "$missing" ]; then
  echo "$missing" >&2
  echo "error: the transformers backend cannot run here. Put wheels of the missing packages (and of their" \
       "missing dependencies) in $wheels and run again." >&2
  exit 3
fi
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -lt 2 ]; then
  echo "error: $ngpu CUDA device(s); this benchmark needs 2" >&2
  exit 3
fi

# 3. the model
if [ ! -f "$model/config.json" ]; then
  model=/tmp/hf_search_2gpu_model
  "$py" -m indexcache.cli random-model "$model" --preset small --seed 0
fi
echo "model: $model"

# 4. an explicit, balanced device map: layers 0..n/2-1 (with the embedding) on GPU 0, the rest on GPU 1
"$py" - "$model" "$out/device_map.json" <<'PY'
import json, sys
cfg = json.load(open(f"{sys.argv[1]}/config.json"))
n = cfg["num_hidden_layers"]
dm = {"model.embed_tokens": 0, "model.rotary_emb": 0}
dm.update({f"model.layers.{i}": 0 if i < n // 2 else 1 for i in range(n)})
dm.update({"model.norm": 1, "lm_head": 1})
json.dump(dm, open(sys.argv[2], "w"), indent=1)
print(f"device map: layers 0-{n // 2 - 1} on cuda:0, {n // 2}-{n - 1} on cuda:1")
PY

args=(--num-samples "${NUM_SAMPLES:-4}" --seq-len "${SEQ_LEN:-2048}" --keep "${KEEP:-0.25}" --to-end
      --baselines uniform)
runs=/tmp/hf_search_2gpu_runs
rm -rf "$runs"

# 5. the transformers backend, split over the two GPUs; peak memory per GPU measured in the same process
start=$(date +%s)
"$py" - "$model" "$runs/hf" "$out/device_map.json" "$out/gpu_memory_hf.json" "${args[@]}" <<'PY' 2>&1 \
  | grep -v -E "it/s|cand/s|flip/s" | tee "$out/hf.log"
import json, sys, torch
from indexcache.cli import main
model, run_dir, dm, mem_out, *rest = sys.argv[1:]
rc = main(["search", model, "--backend", "hf", "--device-map", dm, "--out", run_dir, *rest])
mem = {f"cuda:{i}": {"max_allocated_mib": round(torch.cuda.max_memory_allocated(i) / 2**20, 1)}
       for i in range(torch.cuda.device_count())}
json.dump(mem, open(mem_out, "w"), indent=2)
print("peak memory per GPU:", json.dumps(mem))
sys.exit(rc)
PY
mid=$(date +%s)

# 6. the native backend on one GPU, same calibration and settings
"$py" -m indexcache.cli search "$model" --device cuda:0 --out "$runs/native" "${args[@]}" 2>&1 \
  | grep -v -E "it/s|cand/s|flip/s" | tee "$out/native.log"
end=$(date +%s)

cp "$runs/hf/report.json" "$out/hf_report.json"
cp "$runs/native/report.json" "$out/native_report.json"
"$py" - "$out" $((mid - start)) $((end - mid)) <<'PY'
import json, sys
out, t_hf, t_native = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a = json.load(open(f"{out}/hf_report.json"))
b = json.load(open(f"{out}/native_report.json"))
mem = json.load(open(f"{out}/gpu_memory_hf.json"))
placement = a["backend"]["placement"]
json.dump(placement, open(f"{out}/placement.json", "w"), indent=2)
devices = sorted(set(placement["modules"].values()))
same = [e["pattern"] for e in a["trajectory"]] == [e["pattern"] for e in b["trajectory"]]
diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a["trajectory"], b["trajectory"])]
summary = {
    "split_over": devices,
    "layers_per_device": {d: sum(1 for k, v in placement["modules"].items() if k.startswith("layers.") and v == d)
                          for d in devices},
    "peak_memory_hf": mem,
    "identical_trajectory": same,
    "max_loss_difference": max(diffs) if diffs else 0.0,
    "all_full_loss": [a["all_full_loss"], b["all_full_loss"]],
    "selected": [a["selected"]["pattern"], b["selected"]["pattern"]],
    "evaluations": [a["counters"]["evaluations"], b["counters"]["evaluations"]],
    "wall_seconds": {"hf_two_gpus": t_hf, "native_one_gpu": t_native},
}
json.dump(summary, open(f"{out}/comparison.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
if len(devices) < 2:
    print("MISMATCH: the model was not split over two devices", file=sys.stderr)
    sys.exit(1)
if not same:
    print("note: the trajectories differ; the two backends agree to fp32 rounding, so a near-tie between two "
          "candidates can go either way (see max_loss_difference)", file=sys.stderr)
PY
