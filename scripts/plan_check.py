"""How far `indexcache plan` is from measured searches: the probe timings recorded on the GPU
(results/scale/plan_*.json, plans_fp8.json, v32_fp8.json) put through the current estimate, beside the
measured runs. Runs on CPU (the configs are built from transformers' own classes on the meta device).

    python scripts/plan_check.py            # prints the table, writes results/scale/plan_check.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from indexcache.architectures import model_info  # noqa: E402
from indexcache.plan import Timing, estimate_plan, format_plan, model_size  # noqa: E402

R = ROOT / "results"


def timing(d: dict) -> Timing:
    return Timing(d["source"], d["full_s"], d["shared_s"], d["head_s"], d.get("working_bytes", 0),
                  d.get("state_bytes", 0), d.get("notes", []))


def load(p: Path) -> dict:
    return json.loads(p.read_text())


def main() -> None:
    import tempfile

    from scale_evidence import configs

    work = Path(tempfile.mkdtemp(prefix="plan-check-"))
    dirs = configs(work)
    v32 = load(R / "scale/v32_fp8.json")
    # (name, model, recorded probe, samples, target Full, flips, measured seconds, where measured, its flips)
    cases = [
        ("bundled, 4 x 32K, whole search", ROOT / "models/dsa-mini", load(R / "scale/plan_trained_4x32768.json"),
         4, 4, None, load(R / "long_calibration/search_triton.json")["search_s"], "results/long_calibration"),
        ("bundled, 4 x 64K, whole search (--cache-gb 100)", ROOT / "models/dsa-mini",
         load(R / "scale/plan_trained_4x65536.json"), 4, 4, None,
         load(R / "scale/search_bundled_4x65536_cache100.json")["seconds"], "search_bundled_4x65536_cache100.json"),
        ("bundled, 1 x 128K, two steps", ROOT / "models/dsa-mini", load(R / "scale/plan_trained_1x131072.json"),
         1, 14, 2, load(R / "scale/search_bundled_1x131072.json")["seconds"], "search_bundled_1x131072.json"),
        ("bundled, 2 x 128K, whole search (--cache-gb 80)", ROOT / "models/dsa-mini",
         load(R / "scale/plan_trained_1x131072.json"), 2, 4, None,
         load(R / "scale/search_bundled_2x131072.json")["seconds"], "search_bundled_2x131072.json"),
        ("DeepSeek-V3.2 FP8, 16 experts, 12 layers, 1 x 32K, two steps",
         dirs["deepseek-v3.2-16-experts-12-layers"] / "config.json", v32["cut_plan"], 1, 10, 2,
         v32["cut_steps"]["search_s"], "v32_fp8.json (cut_steps)"),
        ("DeepSeek-V4-Flash-shaped, 12 layers, 2 x 8K, one step", dirs["deepseek-v4-flash-12-layers"] / "config.json",
         load(R / "scale/plan_v4_flash.json"), 2, 4, None,
         load(R / "v4_flash/v4_flash_step.json")["search"]["search_s"], "results/v4_flash"),
    ]
    flipped = {"search_bundled_4x65536_cache100.json": R / "scale/search_bundled_4x65536_cache100.json",
               "search_bundled_1x131072.json": R / "scale/search_bundled_1x131072.json",
               "search_bundled_2x131072.json": R / "scale/search_bundled_2x131072.json"}
    rows = []
    for name, model, recorded, samples, target, flips, measured, source in cases:
        info = model_info(model)
        args = (str(model), info, model_size(info), timing(recorded["timing"]), recorded["seq_len"], samples, target,
                flips)
        plan = estimate_plan(*args, gpu_gib=139.0)
        order = [e["flipped"] for e in load(flipped[source])["trajectory"]] if source in flipped else None
        actual = estimate_plan(*args, gpu_gib=139.0, flip_order=order).search_s_one_gpu if order else None
        rows.append({"case": name, "estimate_s": round(plan.search_s_one_gpu, 1), "measured_s": round(measured, 1),
                     "flip_order_range_s": [round(x, 1) for x in plan.search_s_range],
                     "estimate_with_its_flip_order_s": actual and round(actual, 1),
                     "error": round(plan.search_s_one_gpu / measured - 1, 3),
                     "estimated_layer_forwards": plan.work.layer_forwards + plan.work.first_evaluation,
                     "probe": recorded["timing"]["source"], "measured_in": source})
    fd = v32["full_depth"]
    rows.append({"case": "DeepSeek-V3.2 FP8, 16 experts, 61 layers, 1 x 32K, the all-Full loss (61 layer-forwards)",
                 "estimate_s": fd["plan_all_full_s"], "measured_s": fd["all_full_s"],
                 "error": round(fd["plan_all_full_s"] / fd["all_full_s"] - 1, 3), "estimated_layer_forwards": 61,
                 "probe": v32["plan_full_depth"]["plan"]["timing"]["source"], "measured_in": "v32_fp8.json"})
    rows.append({"case": "DeepSeek-V3.2 FP8, 16 experts, 61 layers: weights on the GPU (GiB)",
                 "estimate_s": fd["plan_weights_gib"], "measured_s": fd["footprint_gib"],
                 "error": round(fd["plan_weights_gib"] / fd["footprint_gib"] - 1, 3), "estimated_layer_forwards": None,
                 "probe": "parameter count of the meta-built class", "measured_in": "v32_fp8.json"})
    # estimated, not yet measured in one run: two greedy steps at full depth (results/scale/v32_full_steps.*)
    full_dir = dirs["deepseek-v3.2-16-experts"] / "config.json"
    info = model_info(full_dir)
    case = "DeepSeek-V3.2 FP8, 16 experts, 61 layers, 1 x 32K, two steps"
    run = R / "scale/v32_full_steps.json"
    done = load(run) if run.exists() else {}
    pending = []
    if done.get("finished") and done.get("plan"):  # measured in one regime, with the plan it probed first
        probed = timing(done["plan"]["timing"])
        steps = estimate_plan(str(full_dir), info, model_size(info), probed, 32768, 1, info.num_slots - 2, 2,
                              gpu_gib=139.0)
        order = [e["flipped"] for e in done["trajectory"]]
        own = estimate_plan(str(full_dir), info, model_size(info), probed, 32768, 1, info.num_slots - 2, 2,
                            gpu_gib=139.0, flip_order=order).search_s_one_gpu
        rows.append({"case": case, "estimate_s": round(steps.search_s_one_gpu, 1), "measured_s": done["search_s"],
                     "flip_order_range_s": [round(x, 1) for x in steps.search_s_range],
                     "estimate_with_its_flip_order_s": round(own, 1),
                     "error": round(steps.search_s_one_gpu / done["search_s"] - 1, 3),
                     "estimated_layer_forwards": steps.work.layer_forwards + steps.work.first_evaluation,
                     "probe": probed.source, "measured_in": "v32_full_steps.json"})
    else:  # estimated, not yet measured in one run
        steps = estimate_plan(str(full_dir), info, model_size(info), timing(v32["plan_full_depth"]["plan"]["timing"]),
                              32768, 1, info.num_slots - 2, 2, gpu_gib=139.0)
        pending = [{"case": case, "estimate_s": round(steps.search_s_one_gpu, 1),
                    "flip_order_range_s": [round(x, 1) for x in steps.search_s_range],
                    "estimated_layer_forwards": steps.work.layer_forwards + steps.work.first_evaluation,
                    "reuse_previous": steps.reuse_previous,
                    "measured_in": "not yet (scripts/scale_evidence.sh STAGE=v32full)"}]
    # what the same probes say of whole searches of the real models on 8 GPUs (not measured: no 8-GPU node)
    projections = []
    recorded = {r["name"]: r for r in load(R / "scale/plans_fp8.json")["plans"]}
    for name, samples in [("deepseek-v3.2", 4), ("glm-5", 4), ("deepseek-v3.2-16-experts", 1)]:
        rec = recorded[name]
        info = model_info(dirs[name])
        target = max(1, round(info.num_slots * 0.25))
        plan = estimate_plan(name, info, model_size(info), timing(rec["plan"]["timing"]), 32768, samples, target,
                             rec["flips"], gpus=rec["gpus"], gpu_gib=139.0)
        projections.append({"model": name, "gpus": rec["gpus"], "flips": plan.work.flips, "text": format_plan(plan),
                            "plan": plan.as_dict()})
    out = {"about": "current estimate of indexcache plan on the probe timings recorded on one H200, beside "
                    "measured runs (scripts/plan_check.py)", "checks": rows, "pending": pending,
           "projections": projections}
    (R / "scale/plan_check.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| case | plan | over flip orders | with its flip order | measured | plan vs measured |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        unit = "" if "GiB" in r["case"] else " s"
        span = "{} - {} s".format(*r["flip_order_range_s"]) if r.get("flip_order_range_s") else ""
        own = f"{r['estimate_with_its_flip_order_s']} s" if r.get("estimate_with_its_flip_order_s") else ""
        print(f"| {r['case']} | {r['estimate_s']}{unit} | {span} | {own} | {r['measured_s']}{unit} "
              f"| {100 * r['error']:+.0f}% |")
    for p in projections:
        print(f"\n== {p['model']} on {p['gpus']} GPU(s)\n{p['text']}")


if __name__ == "__main__":
    main()
