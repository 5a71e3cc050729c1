"""The kernel benchmark's MoE part runs end to end in Triton's interpreter on tiny shapes (its timers replaced
by one call each), so that a GPU run does not fail on the code around the kernels."""

import pytest
import torch
from markers import interpreter


@interpreter
def test_moe_bench_runs_its_sweep_and_fp8_rows_and_prints_them(monkeypatch):
    from indexcache.bench import kernels as bench

    calls = []

    def once(fn, warmup: int = 0, rep: int = 0) -> float:
        out = fn()
        if isinstance(out, tuple) and out[0].shape[0] == 64 * 2:  # the gather of batch 64's experts: too big
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        calls.append(out)
        return 1.0

    monkeypatch.setattr(bench, "_bench", once)
    monkeypatch.setattr(bench, "_bench_graph", once)
    monkeypatch.setattr(bench, "MOE_SHAPES", {"tiny": (128, 128, 4, 2)})
    monkeypatch.setattr(bench, "MOE_PREFILL_TOKENS", (8,))
    monkeypatch.setattr(bench, "MOE_DECODE_BATCHES", (1, 64))
    # the interpreter has no shared-memory limit to trip: every configuration runs
    monkeypatch.setattr(bench, "MOE_PREFILL_CONFIGS", bench.MOE_PREFILL_CONFIGS[:2])
    monkeypatch.setattr(bench, "MOE_DECODE_CONFIGS", bench.MOE_DECODE_CONFIGS[:2])
    ceil = {"bf16_gemm_tflops": 1.0, "fp8_gemm_tflops": 1.0, "copy_tbps": 1.0}
    res = bench.bench_moe("cpu", ceil, lambda msg: None)
    assert [r["tokens"] for r in res["prefill"]] == [8]
    assert [r["B"] for r in res["decode"]] == [1, 64]
    # two prefill configurations, one extra decode configuration at B=1 (none at 64)
    assert len(res["sweep"]) == 3 and res["sweep"][0]["block_n"] == bench.MOE_PREFILL_CONFIGS[0][1]
    assert [("tokens" in r, r.get("B")) for r in res["fp8"]] == [(True, None), (False, 1), (False, 64)]
    # the fp8 decode rate counts one byte a weight (half the bf16 bytes) and the block scales
    bf16 = res["decode"][0]["distinct_experts"] * 3 * 128 * 128 * 2
    assert res["fp8"][1]["tbps"] == pytest.approx(bf16 / 2 * (1 + 4 / 128**2) / 1e3 / 1e6)  # 1 ms = 1e3 us
    # every timed call produced the kernel's output, with finite values
    outs = [c for c in calls if isinstance(c, torch.Tensor) and c.dim() == 3]
    assert outs and all(torch.isfinite(c.float()).all() for c in outs)
    # the decode MoE with its shared MLP, on its own GEMMs and folded in: one [B, D] sum each (their values
    # agree in tests/ops/test_moe.py; the interpreter's bf16 dot products are not to be compared)
    whole = [c for c in calls if isinstance(c, torch.Tensor) and c.dim() == 2]
    assert [tuple(c.shape) for c in whole] == [(1, 128), (1, 128), (64, 128), (64, 128)]
    assert all("with_shared_folded_us" in r for r in res["decode"])
    table = bench.moe_table({"moe": res})
    assert table.count("| fp8 prefill |") == 1 and table.count("| fp8 decode |") == 2
    assert table.count("| decode + shared MLP |") == 2
    # a comparison that does not fit the GPU is recorded as such; the kernel's own row and the rest stand
    assert res["decode"][0]["gather_weights_us"] == 1e3 and res["decode"][1]["gather_weights_us"] is None
    assert table.count("gather alone did not fit the GPU") == 1


@interpreter
def test_topk_bench_runs_its_sweeps_and_tables(monkeypatch):
    from indexcache.bench import kernels as bench

    outs = []

    def once(fn, warmup: int = 0, rep: int = 0) -> float:
        outs.append(fn())
        return 1.0

    monkeypatch.setattr(bench, "_bench", once)
    monkeypatch.setattr(bench, "_bench_graph", once)
    monkeypatch.setattr(bench, "TOPK_K", 8)
    monkeypatch.setattr(bench, "TOPK_ROWS", 6)
    monkeypatch.setattr(bench, "TOPK_SWEEP_KEYS", 300)
    monkeypatch.setattr(bench, "TOPK_PREFILL_KEYS", (64, 300))
    monkeypatch.setattr(bench, "TOPK_DECODE", ((1, 3), (300,)))
    res = bench.bench_topk("cpu", {"copy_tbps": 1.0}, lambda msg: None)
    assert {r["schedule"] for r in res["sweep"]} == {"bucket", "sample", "staged"}
    assert res["best_config"] and res["best_sample_config"] and res["best_staged_config"]
    assert [r["N"] for r in res["prefill"]] == [64, 300]
    assert all(k in res["prefill"][0] for k in ("sample_ms", "staged_ms", "auto_ms", "torch_topk_ms"))
    assert [(r["rows"], r["N"]) for r in res["decode"]] == [(1, 300), (3, 300)]
    assert all("auto_windows_us" in r for r in res["decode"])
    # every timed selection returned k indices per row
    assert all(o.shape[-1] == 8 for o in outs if isinstance(o, torch.Tensor))
    table = bench.summary_table({"ceilings": {"bf16_gemm_tflops": 1.0, "copy_tbps": 1.0},
                                 "indexer": {"prefill": [], "decode": []}, "topk": res,
                                 "sparse_mla": {"prefill": [], "decode": []}})
    assert table.count("| top-k 2048") == 4


@interpreter
def test_topk_on_engine_logits_times_every_call_of_the_last_chunk(monkeypatch):
    from indexcache.bench import e2e
    from indexcache.bench import kernels as bench

    monkeypatch.setattr(bench, "_bench", lambda fn, warmup=0, rep=0: (fn(), 1.0)[1])
    tiny = dict(e2e.GLM47_FLASH_DSA, vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=16, v_head_dim=16, num_experts_per_tok=2, index_n_heads=2, index_head_dim=32,
                index_topk=8)
    monkeypatch.setattr(e2e, "GLM47_FLASH_DSA", tiny)
    monkeypatch.setattr(bench, "TOPK_ENGINE", {"context": 40, "layers": 3, "experts": 4, "chunk": 16})
    logged = []
    res = bench.bench_topk_engine("cpu", {}, logged.append)
    # the last chunk holds positions 32-39: one call per (Full) layer, each timed under every schedule
    assert [c["call"] for c in res["calls"]] == [0, 1, 2] and len(logged) == 3
    assert all(c["rows"] == 8 and c["max_keys"] == 40 for c in res["calls"])
    assert all(c["sample_fallback_rows"] == 0 for c in res["calls"])  # windows of 33-40 keys fit the candidates
    assert res["total_auto_ms"] == 3.0 and set(bench.TOPK_ENGINE_SCHEDULES) <= {k[:-3] for k in res["calls"][0]}


def test_indexer_layers_summary_names_the_fastest_and_slowest_full_layer():
    from indexcache.bench.e2e import indexer_layers_summary

    per_layer = {0: {"ms": 100.0, "calls": 3}, 4: {"ms": 300.0, "calls": 3}, 8: {"ms": 200.0, "calls": 3}}
    assert indexer_layers_summary(per_layer) == {"layers": 3, "median_s": 0.2, "min_s": 0.1, "min_layer": 0,
                                                 "max_s": 0.3, "max_layer": 4}
    assert indexer_layers_summary({}) == {}


def test_kernel_table_ranks_kernels_by_their_own_device_time():
    from types import SimpleNamespace

    from indexcache.bench.e2e import kernel_table

    events = [SimpleNamespace(key="_topk_sample_kernel", count=50, self_device_time_total=3e5),
              SimpleNamespace(key="aten::mm", count=10, self_device_time_total=0.0),  # a host op: no time of its own
              SimpleNamespace(key="_mqa_logits_kernel", count=50, self_device_time_total=9e5),
              SimpleNamespace(key="old_profiler_kernel", count=2, self_cuda_time_total=1e5)]  # the older field
    table = kernel_table(events, top=2)
    assert table["device_s"] == pytest.approx(1.3)
    assert [k["name"] for k in table["kernels"]] == ["_mqa_logits_kernel", "_topk_sample_kernel"]
    assert table["kernels"][0] == {"name": "_mqa_logits_kernel", "calls": 50, "s": pytest.approx(0.9),
                                   "share": pytest.approx(0.9 / 1.3)}


def test_e2e_rows_pair_with_all_full_at_their_own_selection_budget():
    from indexcache.bench.e2e import _speedups, table

    def row(pattern: str, full: int, budget: int, ttft: float) -> dict:
        return {"pattern": pattern, "num_full": full, "context": 200_000, "select_budget_bytes": budget << 20,
                "ttft_s": ttft, "prefill_indexer_share": 0.5, "decode_b1_tok_s": 50.0,
                "decode_b1": {"indexer_share": 0.2}, "decode_large_tok_s": 300.0, "large_batch": 2,
                "cache_bytes_per_token": 1000, "peak_memory_gib": 10.0}

    result = {"runs": [row("all-Full", 4, 256, 8.0), row("uniform 1/4", 1, 256, 4.0),
                       row("all-Full", 4, 2048, 6.0), row("uniform 1/4", 1, 2048, 4.0)]}
    _speedups(result)
    assert [r["prefill_speedup"] for r in result["runs"]] == pytest.approx([1.0, 2.0, 1.0, 1.5])
    lines = table(result).splitlines()
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["256", "256", "2048", "2048"]
