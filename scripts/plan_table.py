"""Build the committed table ``indexcache plan`` falls back on without a probe: for each measured search
(its report under results/), the seconds per layer-forward it achieved and the FLOPs of its average
layer-forward, counted by the plan's own functions. Rerun after adding a measured search.

    python scripts/plan_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from indexcache.architectures import model_info  # noqa: E402
from indexcache.plan import TABLE, Timing, layer_flops, mean_forward_seconds, model_size, search_work  # noqa: E402


def v4_flash_config() -> dict:
    from v4_flash_step import build_config

    d = build_config(12, 8, tiny=False).to_dict()
    d["architectures"] = ["DeepseekV4ForCausalLM"]
    return d


def v32_cut_config() -> dict:
    import tempfile

    from scale_evidence import configs

    return json.loads((configs(Path(tempfile.mkdtemp()))["deepseek-v3.2-16-experts-12-layers"] / "config.json")
                      .read_text())


def bundled_config() -> dict:
    return json.loads((ROOT / "models/dsa-mini/config.json").read_text())


# name, config, measured report, the part of it that is the search, backend
MEASURED = [
    ("bundled dsa-mini, 4 x 32K, native + Triton, bf16", bundled_config, "results/long_calibration/search_triton.json",
     None, "native"),
    ("bundled dsa-mini, 4 x 64K, native + Triton, bf16", bundled_config,
     "results/scale/search_bundled_4x65536_cache100.json", None, "native"),
    ("bundled dsa-mini, 1 x 128K (two steps), native + Triton, bf16", bundled_config,
     "results/scale/search_bundled_1x131072.json", None, "native"),
    ("DeepSeek-V3.2-shaped FP8, 16 experts, 12 layers, 1 x 32K (two steps), native + Triton", v32_cut_config,
     "results/scale/v32_fp8_cut_steps.json", None, "native"),
    ("DeepSeek-V4-Flash-shaped 12 layers, 2 x 8K, transformers, bf16", v4_flash_config,
     "results/v4_flash/v4_flash_step.json", "search", "hf"),
]


def entry(name: str, config: dict, report: dict, backend: str) -> dict:
    info = model_info(config)
    size = model_size(info)
    cal = report.get("calibration")
    tokens = int(report.get("seq_len") or cal["seq_len"])
    samples = int(report.get("num_samples") or cal["num_samples"])
    traj = report["trajectory"]
    target = traj[-1]["num_full"]
    work = search_work(info, samples, target, flips=len(traj))
    # the FLOPs of a layer-forward averaged as the search spends its time (the same weights as for seconds)
    flops = Timing("flops", {}, {}, 0.0)
    for i, layer in enumerate(size.layers):
        flops.full_s.setdefault(layer.kind, layer_flops(info, size, i, tokens, True))
        flops.shared_s.setdefault(layer.kind, layer_flops(info, size, i, tokens, False))
    per_fwd = mean_forward_seconds(info, size, flops, work)
    seconds = report.get("search_s") or report.get("seconds")
    return {"name": name, "backend": backend, "device": report.get("gpu", "NVIDIA H200"), "tokens": tokens,
            "num_samples": samples, "layer_forwards": report["counters"]["layer_forwards"],
            "s_per_layer_forward": round(seconds / report["counters"]["layer_forwards"], 5),
            "flops_per_layer_forward": per_fwd, "architecture": info.architecture}


def main() -> None:
    rows = []
    for name, config, path, key, backend in MEASURED:
        rep = json.loads((ROOT / path).read_text())
        rows.append({**entry(name, config(), rep[key] if key else rep, backend), "source": path})
        print(f"{name}: {rows[-1]['s_per_layer_forward']} s, {rows[-1]['flops_per_layer_forward'] / 1e12:.3f} TFLOP "
              f"per layer-forward")
    TABLE.write_text(json.dumps({"about": "measured searches; written by scripts/plan_table.py", "entries": rows},
                                indent=1) + "\n")
    print(f"wrote {TABLE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
