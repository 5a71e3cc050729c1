"""The tensor-parallel search against one process: the same greedy search with `--backend hf`, once in one
process and once under torchrun with `--tp N` (and, with --replicas R, R x N processes: the candidates
split over R tensor-parallel replicas). Writes a JSON with both trajectories, whether they are identical,
the losses' largest relative difference and the seconds per layer-forward of each.

    python scripts/tp_check.py --model models/dsa-mini --out tp.json --tp 2 --device cuda --seq-len 8192
    python scripts/tp_check.py --model <tiny> --out tp.json --tp 2 --device cpu --seq-len 96   # gloo check
    python scripts/tp_check.py --glm5-layers 8 --work /tmp/tp --out tp.json --tp 2 --device cuda

``--glm5-layers L`` first writes a GLM-5-shaped checkpoint (transformers' GlmMoeDsaConfig defaults: the
released width) cut to L layers and 16 routed experts, random bf16 weights, into --work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def glm5_checkpoint(work: Path, layers: int, device: str) -> Path:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "src"))
    from indexcache.presets import byte_tokenizer_files

    out = work / f"glm5-{layers}-layers"
    if (out / "config.json").exists():
        return out
    cfg = transformers.GlmMoeDsaConfig(num_hidden_layers=layers, n_routed_experts=16, num_nextn_predict_layers=0)
    with torch.device(device):
        model = transformers.GlmMoeDsaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out))
    byte_tokenizer_files(out)
    return out


def search(model: Path, out: Path, a, nproc: int = 1) -> dict:
    args = ["search", str(model), "--data", a.data, "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len),
            "--num-full", str(a.num_full), "--baselines", "none", "--backend", "hf", "--dtype", a.dtype,
            "--device", a.device, "--out", str(out), "--overwrite"]
    launch = [sys.executable, "-m", "indexcache.cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                  "-m", "indexcache.cli"]
        args += ["--tp", str(a.tp)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    t0 = time.time()
    done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"search failed ({nproc} processes):\n{done.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    rep["wall_s"] = round(time.time() - t0, 1)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--glm5-layers", type=int)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tp-check"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--data", default=str(ROOT / ".data/books"))
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--num-full", type=int, default=4)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.model or glm5_checkpoint(a.work, a.glm5_layers, "cuda" if a.device.startswith("cuda") else "cpu")
    one = search(model, a.work / "one", a)
    tp = search(model, a.work / "tp", a, nproc=a.tp * a.replicas)
    pats = [[s["pattern"] for s in r["trajectory"]] for r in (one, tp)]
    steps = zip(one["trajectory"], tp["trajectory"], strict=False)  # unequal lengths: not identical, reported
    rel = max((abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in steps), default=0.0)
    res = {"model": str(model), "tp": a.tp, "replicas": a.replicas, "device": a.device,
           "calibration": f"{a.num_samples} x {a.seq_len}", "identical_trajectory": pats[0] == pats[1],
           "max_relative_loss_difference": rel, "one_process": {}, "tensor_parallel": {}}
    for key, rep in (("one_process", one), ("tensor_parallel", tp)):
        c = rep["counters"]
        res[key] = {"trajectory": pats[0 if key == "one_process" else 1], "search_s": rep["seconds"],
                    "wall_s": rep["wall_s"], "layer_forwards": c["layer_forwards"],
                    "s_per_layer_forward": rep["seconds"] / max(c["layer_forwards"], 1),
                    "processes": rep["backend"].get("processes"), "peak_gpu_memory_gib": rep.get("peak_gpu_memory_gib")}
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
