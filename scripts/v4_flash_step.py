"""One greedy IndexCache step on a DeepSeek-V4-Flash-shaped model with random weights, through
transformers' own DeepseekV4ForCausalLM: seconds per layer-forward (per layer type, Full and Shared),
the search's own wall time and counters, and peak GPU memory.

The model has V4-Flash's widths (hidden 4096, 64 heads of 512, q/o LoRA 1024, 8 output groups, a
64-head indexer of dim 128 keeping 512 compressed entries of 4 tokens, hc_mult 4, window 128, 6 of
the routed experts per token, 3 hash-routed MoE layers) and its layer schedule (two sliding-window layers,
then CSA and HCA alternating); depth and the routed-expert count are cut so that it fits one GPU.

usage: python scripts/v4_flash_step.py --out DIR --data books/ [--layers 12] [--experts 8]
         [--seq-len 16384] [--num-samples 1] [--device cuda] [--tiny]
  writes DIR/v4_flash_step.json and DIR/search/ (the search's own outputs)
  --tiny: the same run on a small model on CPU (a check of the script, not a measurement)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def flash_schedule(n: int) -> list[str]:
    """V4-Flash's layer types, cut to ``n`` layers: two sliding-window layers, then CSA/HCA alternating."""
    return [SWA, SWA] + [CSA if i % 2 == 0 else HCA for i in range(n - 2)]


def build_config(layers: int, experts: int, tiny: bool):
    import transformers

    kw = dict(num_hidden_layers=layers, layer_types=flash_schedule(layers), n_routed_experts=experts,
              num_nextn_predict_layers=0, max_position_embeddings=1 << 20)
    if tiny:  # small widths, same schedule and unit; index_topk below the calibration's entry count
        kw.update(vocab_size=512, hidden_size=128, moe_intermediate_size=64, num_attention_heads=4, head_dim=64,
                  q_lora_rank=64, o_lora_rank=32, o_groups=2, index_n_heads=4, index_head_dim=32, index_topk=16,
                  num_experts_per_tok=2, sliding_window=16)
    return transformers.DeepseekV4Config(**kw)


def build_checkpoint(cfg, path: Path, device: str, dtype: torch.dtype) -> dict:
    """Random weights (transformers' own init) built on ``device``, saved as a transformers checkpoint
    with a byte-level tokenizer."""
    import transformers

    from indexcache.presets import byte_tokenizer_files

    torch.manual_seed(0)
    t0 = time.time()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(path))
    byte_tokenizer_files(path)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"parameters": n_params, "build_and_save_s": round(time.time() - t0, 1)}


def run_search(path: Path, out: Path, args) -> dict:
    """The real command, one greedy step: --num-full one below the number of CSA layers."""
    n_csa = flash_schedule(args.layers).count(CSA)
    cmd = [sys.executable, "-m", "indexcache.cli", "search", str(path), "--data", args.data, "--num-samples",
           str(args.num_samples), "--seq-len", str(args.seq_len), "--dtype", args.dtype, "--device", args.device,
           "--num-full", str(n_csa - 1), "--baselines", "none", "--out", str(out)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    log = "\n".join(line for line in proc.stderr.replace("\r", "\n").splitlines() if "it/s" not in line)
    (out.parent / "search.log").write_text(log + "\n" + proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"search failed ({proc.returncode}):\n{log[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    cmd[cmd.index(str(path))] = "<v4-flash-shaped checkpoint>"
    cmd[cmd.index(str(out))] = "<out>/search"
    return {"command": " ".join(["indexcache"] + cmd[3:]), "wall_s": round(wall, 1), "search_s": rep["seconds"],
            "counters": rep["counters"], "s_per_layer_forward": rep["seconds"] / rep["counters"]["layer_forwards"],
            "trajectory": rep["trajectory"], "all_full_loss": rep["all_full_loss"],
            "indexer_layers": rep["indexer_layers"], "calibration": rep["calibration"],
            "peak_gpu_memory_gib": rep.get("peak_gpu_memory_gib")}


def time_layers(path: Path, args, dtype: torch.dtype) -> list[dict]:
    """Each decoder layer's forward on one calibration window, under all-Full; every CSA layer after the
    first also as Shared (it reuses the previous CSA layer's selection and skips its indexer)."""
    from indexcache import Pattern
    from indexcache.data.calibration import load_calibration
    from indexcache.integrations.transformers import TransformersRunner, load_pretrained

    hf = load_pretrained(path, dtype=dtype, device=args.device)
    runner = TransformersRunner(hf)
    cal = load_calibration(path, args.data, num_samples=1, seq_len=args.seq_len)
    ids = next(iter(cal.batches(1)))
    cuda = args.device.startswith("cuda")

    def timed(state, pattern, i):
        best, peak = float("inf"), 0.0
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out, _ = runner.run(state, pattern, i, i + 1)
            if cuda:
                torch.cuda.synchronize()
                peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
            best = min(best, time.perf_counter() - t0)
        return out, best, peak

    full = Pattern.all_full(len(runner.slots))
    rows, state = [], runner.start(ids)
    types = build_config(args.layers, args.experts, args.tiny).layer_types
    for i in range(runner.num_layers):
        nxt, s, peak = timed(state, full, i)
        rows.append({"layer": i, "type": types[i], "as": "Full" if i in runner.slots else "-", "s": round(s, 4),
                     "peak_gpu_memory_gib": round(peak, 2) if cuda else None})
        if i in runner.slots and runner.slots.index(i) > 0:  # the same layer with its indexer shared
            pos = runner.slots.index(i)
            shared = Pattern("".join("S" if p == pos else "F" for p in range(len(runner.slots))))
            _, s, peak = timed(state, shared, i)
            rows.append({"layer": i, "type": types[i], "as": "Shared", "s": round(s, 4),
                         "peak_gpu_memory_gib": round(peak, 2) if cuda else None})
        state = nxt
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--workdir", help="where the random checkpoint is written (default: a temporary directory)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    cfg = build_config(args.layers, args.experts, args.tiny)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="v4flash-"))
    ckpt = work / "model"
    result = {"model": {k: getattr(cfg, k) for k in (
        "hidden_size", "num_attention_heads", "head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "index_n_heads",
        "index_head_dim", "index_topk", "compress_rates", "hc_mult", "sliding_window", "n_routed_experts",
        "num_experts_per_tok", "moe_intermediate_size", "vocab_size", "num_hidden_layers", "layer_types",
        "mlp_layer_types")}, "dtype": args.dtype, "tiny": args.tiny,
        "script": "python scripts/v4_flash_step.py " + " ".join(sys.argv[1:])}
    result["model"].update(build_checkpoint(cfg, ckpt, args.device, dtype))
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    print(f"checkpoint: {result['model']['parameters'] / 1e9:.2f} B parameters", flush=True)
    result["search"] = run_search(ckpt, out / "search", args)
    print(f"search: {result['search']['search_s']:.1f} s, {result['search']['counters']['layer_forwards']} layer-"
          f"forwards, {result['search']['s_per_layer_forward']:.3f} s each, peak "
          f"{result['search']['peak_gpu_memory_gib']} GiB", flush=True)
    result["layers"] = time_layers(ckpt, args, dtype)
    for r in result["layers"]:
        print(f"  layer {r['layer']:2d} {r['type']:30s} {r['as']:6s} {r['s']:.4f} s  peak {r['peak_gpu_memory_gib']}")
    (out / "v4_flash_step.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
