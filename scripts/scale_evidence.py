"""Full-scale evidence on one GPU: configs of the real models, `indexcache plan` probes of them, and the
DeepSeek-V3.2 width in FP8 with its experts cut to fit: the full-depth all-Full pass and two greedy steps at
12 layers, each against the plan.

    python scripts/scale_evidence.py configs  WORK            # config.json dirs (+ byte tokenizer)
    python scripts/scale_evidence.py plans    WORK OUT.json   # plan --probe of each (needs the GPU)
    python scripts/scale_evidence.py v32      WORK OUT.json --data .data/books   # the measured model
    python scripts/scale_evidence.py v32-steps WORK OUT.json --device cpu --config-dir DIR   # steps alone

The models' widths are transformers' own defaults of DeepseekV32Config and GlmMoeDsaConfig (the released
DeepSeek-V3.2 and GLM-5 shapes), with DeepSeek's block-FP8 ``quantization_config``. The measured model is
built on the GPU with random FP8 weights (``presets.random_model_in_place``): the same layers and bytes a
loaded FP8 checkpoint of it holds, without writing ~60 GB to disk first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
V32_CUT_EXPERTS = 16  # of 256: the FP8 model then fits one H200 with room for 32K-token activations


def _config(cls_name: str, arch: str, **overrides) -> dict:
    import transformers

    d = getattr(transformers, cls_name)(**overrides).to_dict()
    for k in ("transformers_version", "dtype", "torch_dtype"):
        d.pop(k, None)
    d.update(architectures=[arch], quantization_config=FP8, num_nextn_predict_layers=0)
    return d


def _v4_flash() -> dict:
    """The DeepSeek-V4-Flash-shaped model of results/v4_flash (12 layers, 8 experts, bf16)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from v4_flash_step import build_config

    d = build_config(12, 8, tiny=False).to_dict()
    for k in ("transformers_version", "dtype", "torch_dtype"):
        d.pop(k, None)
    d["architectures"] = ["DeepseekV4ForCausalLM"]
    return d


CUT_LAYERS = 12  # the depth of the two measured greedy steps (at full depth they take about 14 min)


def configs(work: Path) -> dict[str, Path]:
    from indexcache.presets import byte_tokenizer_files

    out = {}
    for name, d in {
        "deepseek-v3.2": _config("DeepseekV32Config", "DeepseekV32ForCausalLM"),
        "glm-5": _config("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
        f"deepseek-v3.2-{V32_CUT_EXPERTS}-experts": _config("DeepseekV32Config", "DeepseekV32ForCausalLM",
                                                             n_routed_experts=V32_CUT_EXPERTS),
        f"deepseek-v3.2-{V32_CUT_EXPERTS}-experts-{CUT_LAYERS}-layers": _config(
            "DeepseekV32Config", "DeepseekV32ForCausalLM", n_routed_experts=V32_CUT_EXPERTS,
            num_hidden_layers=CUT_LAYERS),
        "deepseek-v4-flash-12-layers": _v4_flash(),
    }.items():
        p = work / name
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(d, indent=2))
        byte_tokenizer_files(p)
        out[name] = p
    return out


def plans(work: Path, out: Path, seq_len: int) -> None:
    from indexcache.plan import format_plan, make_plan

    dirs = configs(work)
    rows = []
    for name, gpus, flips in [(f"deepseek-v3.2-{V32_CUT_EXPERTS}-experts", 1, 2), ("deepseek-v3.2", 8, None),
                              ("glm-5", 8, None)]:
        t0 = time.time()
        plan = make_plan(dirs[name] / "config.json", seq_len, 1 if flips else 4, gpus=gpus, flips=flips,
                         do_probe=True, device="cuda")
        text = format_plan(plan)
        print(f"== {name}\n{text}\n", flush=True)
        rows.append({"name": name, "gpus": gpus, "flips": flips, "plan": plan.as_dict(), "text": text,
                     "probe_s": round(time.time() - t0, 1)})
        out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "plans": rows}, indent=1))
        torch.cuda.empty_cache()


def v32_steps(work: Path, out: Path, data: str, seq_len: int, device: str = "cuda",
              config_dir: Path | None = None) -> None:
    """Two greedy steps on a model built in place with random FP8 weights (by default the full-depth
    16-expert DeepSeek-V3.2 shape; ``config_dir``: another, e.g. the 12-layer cut or a tiny one on CPU).
    Resumable: the search state beside ``out`` is written after every candidate, and a later call (the same
    seed-built weights, the same calibration) continues from it, so the steps can span several calls."""
    from indexcache.config import DSAConfig
    from indexcache.data import load_calibration
    from indexcache.presets import random_model_in_place
    from indexcache.runner import NativeRunner, native_ops
    from indexcache.search import LossEvaluator, greedy_search

    d = config_dir or configs(work)[f"deepseek-v3.2-{V32_CUT_EXPERTS}-experts"]
    cfg = DSAConfig.from_file(d)
    cuda = device.startswith("cuda")
    # the plan of these two steps, probed by the same code on the same GPU before the model is built (the
    # probe's reduced model is freed first); a resumed call keeps the first call's plan
    plan_file = out.with_suffix(".plan.json")
    if not plan_file.exists():
        from indexcache.architectures import model_info
        from indexcache.plan import make_plan

        plan = make_plan(d, seq_len, 1, target_full=model_info(d).num_slots - 2, flips=2, do_probe=True,
                         device=device, data=data, gpu_gib=139.0 if cuda else None)
        plan_file.write_text(json.dumps(plan.as_dict(), indent=1))
        if cuda:
            torch.cuda.empty_cache()
    plan = json.loads(plan_file.read_text())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = random_model_in_place(cfg, device, torch.bfloat16 if cuda else torch.float32, fp8=True)
    if cuda:
        torch.cuda.synchronize()
    built_s = time.time() - t0
    footprint = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    params = sum(p.numel() for p in model.parameters())
    model.set_backend(native_ops(model, "auto"))
    runner = NativeRunner(model)
    cal = load_calibration(d, data, 1, seq_len, 0, None, cfg.vocab_size)
    free = torch.cuda.mem_get_info()[0] if cuda else 8 << 30
    # what is left but a layer's working memory: the 60 states of the all-Full path at 32K tokens (44 GiB,
    # the hidden states and the selections they carry) fit, with room for some candidates'. No host tier:
    # a step's candidate states (1.7 TB) cannot be kept for the next anyway, and copying them out costs more
    # than a layer-forward each
    cache = max(int(free - (28 << 30)), int(free * 0.4)) if cuda else free
    ev = LossEvaluator(runner, cal.batches(1), cache_bytes=cache, host_bytes=0)
    ev.check_budget()
    state = out.with_suffix(".state.json")
    resumed = state.exists()
    fingerprint = {"config": cfg.to_dict(), "calibration": cal.fingerprint, "seq_len": seq_len, "ops": model.backend}
    res = greedy_search(ev, target_full=cfg.num_hidden_layers - 2, state_path=state, resume=resumed,
                        fingerprint=fingerprint, progress=True)
    if cuda:
        torch.cuda.synchronize()
    search_s = res.seconds  # summed over the calls, the candidate a stopped call was running not counted
    report = {
        "model": {"config": str(d / "config.json"), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "routed_experts": cfg.n_routed_experts,
                  "experts_per_token": cfg.num_experts_per_tok, "index_topk": cfg.index_topk,
                  "parameters": params, "weights": "block-FP8 projections and experts (e4m3, 128 x 128 scales), "
                  "kv_b_proj, norms, router, embeddings and head bf16"},
        "gpu": torch.cuda.get_device_name() if cuda else "CPU", "built_in_place_s": round(built_s, 1),
        "footprint_gib": round(footprint / 2**30, 2), "ops": model.backend,
        "calibration": cal.fingerprint, "seq_len": seq_len,
        "num_samples": 1, "search_s": round(search_s, 1), "resumed": resumed, "counters": res.counters,
        "s_per_layer_forward": search_s / max(res.counters["layer_forwards"], 1),
        "trajectory": [s.as_dict() for s in res.trajectory],
        "all_full_loss": res.all_full_loss, "prefix_cache_gib": round(cache / 2**30, 1),
        "plan": plan, "finished": len(res.trajectory) >= 2,
        "plan_vs_measured": round(plan["search_s_one_gpu"] / search_s - 1, 3) if len(res.trajectory) >= 2 else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "trajectory"}, indent=1))


def v32(work: Path, out: Path, data: str, seq_len: int) -> None:
    """At full depth (61 layers): the FP8 footprint, and the all-Full loss (61 layer-forwards) against the
    plan's estimate of it. At 12 layers of the same width: two greedy steps against the plan's estimate."""
    from indexcache.architectures import model_info
    from indexcache.config import DSAConfig
    from indexcache.data import load_calibration
    from indexcache.pattern import Pattern
    from indexcache.plan import make_plan, model_size
    from indexcache.presets import random_model_in_place
    from indexcache.runner import NativeRunner, native_ops
    from indexcache.search import LossEvaluator

    dirs = configs(work)
    full_dir = dirs[f"deepseek-v3.2-{V32_CUT_EXPERTS}-experts"]
    cut_dir = dirs[f"deepseek-v3.2-{V32_CUT_EXPERTS}-experts-{CUT_LAYERS}-layers"]
    report: dict = {"gpu": torch.cuda.get_device_name(), "seq_len": seq_len}
    t0 = time.time()
    plan = make_plan(full_dir / "config.json", seq_len, 1, gpus=1, flips=2, do_probe=True, device="cuda")
    report["plan_full_depth"] = {"probe_s": round(time.time() - t0, 1), "plan": plan.as_dict()}
    t = plan.timing
    sizes = model_size(model_info(full_dir))
    est_all_full = sum(t.full_s[x.kind] for x in sizes.layers) + t.head_s
    torch.cuda.empty_cache()
    cfg = DSAConfig.from_file(full_dir)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = random_model_in_place(cfg, "cuda", torch.bfloat16, fp8=True)
    torch.cuda.synchronize()
    build_s = time.time() - t0
    report["full_depth"] = {"layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts,
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "built_in_place_s": round(build_s, 1),
                            "footprint_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                            "plan_weights_gib": plan.weights_gib}
    model.set_backend(native_ops(model, "auto"))
    cal = load_calibration(full_dir, data, 1, seq_len, 0, None, cfg.vocab_size)
    ev = LossEvaluator(NativeRunner(model), cal.batches(1), cache_bytes=8 << 30)
    ev.loss(Pattern.all_full(cfg.num_hidden_layers))  # warm-up: kernels compiled and tuned
    torch.cuda.synchronize()
    ev = LossEvaluator(NativeRunner(model), cal.batches(1), cache_bytes=8 << 30)
    t0 = time.time()
    loss = ev.loss(Pattern.all_full(cfg.num_hidden_layers))
    torch.cuda.synchronize()
    measured = time.time() - t0
    report["full_depth"].update(all_full_loss=loss, all_full_s=round(measured, 2),
                                plan_all_full_s=round(est_all_full, 2),
                                error=est_all_full / measured - 1, s_per_layer_forward=measured / cfg.num_hidden_layers,
                                peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                ops=model.backend)
    out.write_text(json.dumps(report, indent=1))
    del model, ev
    torch.cuda.empty_cache()
    cut = make_plan(cut_dir / "config.json", seq_len, 1, gpus=1, flips=2, do_probe=True, device="cuda")
    torch.cuda.empty_cache()
    report["cut_plan"] = cut.as_dict()
    out.write_text(json.dumps(report, indent=1))
    v32_steps(work, out.with_name(out.stem + "_cut_steps.json"), data, seq_len, "cuda", cut_dir)
    steps = json.loads(out.with_name(out.stem + "_cut_steps.json").read_text())
    report["cut_steps"] = steps
    report["cut_steps"]["plan_search_s"] = cut.search_s_one_gpu
    report["cut_steps"]["plan_layer_forwards"] = cut.work.layer_forwards + cut.work.first_evaluation
    report["cut_steps"]["error"] = cut.search_s_one_gpu / steps["search_s"] - 1
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("plan_full_depth", "cut_plan")}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["configs", "plans", "v32-steps", "v32"])
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--data", default=".data/books")
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config-dir", type=Path, help="another model's config (a check on a small one)")
    a = ap.parse_args()
    if a.what == "configs":
        print("\n".join(str(p) for p in configs(a.work).values()))
    elif a.what == "plans":
        plans(a.work, a.out, a.seq_len)
    elif a.what == "v32":
        v32(a.work, a.out, a.data, a.seq_len)
    else:
        v32_steps(a.work, a.out, a.data, a.seq_len, a.device, a.config_dir)


if __name__ == "__main__":
    main()
