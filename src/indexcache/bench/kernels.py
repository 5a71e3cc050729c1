"""``indexcache bench kernels``: the GPU's ceilings, then every Triton kernel at the anchors' shapes.

Times are medians of CUDA-event timings (``triton.testing.do_bench``, which flushes the L2 cache before
each run) on fresh random inputs. Rates: indexer ``2 * valid (q, k) pairs * H * D`` FLOPs; sparse MLA
``2 * S * topk * H * (d_qk + d_v)`` FLOPs; top-k and decode kernels as effective bandwidth over the bytes
they must read once (logits, gathered latent rows, cache) plus what they write. Each rate is also given as
a percentage of the ceiling measured in the same run (bf16 / fp8 dense GEMM through torch, device-to-device
copy counting read + write).
"""

# ruff: noqa: B023  (every timed lambda runs inside the loop iteration that made it)
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..ops.triton_support import resources
from ..outputs import write_report

TARGETS = {  # the engine-and-kernels issue's bars on one H200
    "indexer_fp8_tflops": 1000.0,
    "indexer_bf16_tflops": 550.0,
    "topk_8192x64K_ms": 2.0,
    "sparse_mla_prefill_h128_tflops": 450.0,
    "sparse_mla_prefill_h20_tflops": 300.0,  # counting the 20 real heads only
    "sparse_decode_tbps": 2.5,
}


def _bench(fn, warmup: int = 25, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _bench_graph(fn, warmup: int = 25, rep: int = 100) -> float:
    """Time ``fn`` replayed from a CUDA graph: the GPU time of a decode step without the host's launch
    overhead (how an engine runs it)."""
    import triton.testing

    fn()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median"))


def ceilings(dev: torch.device) -> dict:
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    out = {"bf16_gemm_tflops": 2 * n**3 / ms / 1e9, "bf16_gemm_shape": [n, n, n]}
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major second operand
        one = torch.ones((), device=dev)
        ms = _bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16))
        out["fp8_gemm_tflops"] = 2 * n**3 / ms / 1e9
    except Exception as e:  # pragma: no cover - depends on the torch build
        out["fp8_gemm_error"] = repr(e)
    x = torch.empty(1 << 28, device=dev, dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    x.uniform_()
    ms = _bench(lambda: y.copy_(x))
    out["copy_tbps"] = 2 * x.numel() * 4 / ms / 1e9
    return out


def _causal_windows(S: int, N: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """S new queries at the end of an N-token sequence (the prefill chunk shape of the anchors)."""
    ke = torch.arange(N - S + 1, N + 1, device=dev, dtype=torch.int32)
    return torch.zeros_like(ke), ke


def _one(scale):
    """Per-token k scales of one cache, as the flat layout takes them ([1, N])."""
    return None if scale is None else scale[None]


def bench_indexer(dev, ceil: dict, log) -> dict:
    from ..ops.indexer.kernel import indexer_logits, quantize_fp8_per_token

    H, D, S = 64, 128, 8192
    res: dict = {"prefill": [], "decode": [], "sweep": []}
    configs = [
        dict(key_major=True, block_n=128, num_warps=8, num_stages=3),
        dict(key_major=True, block_n=64, num_warps=4, num_stages=4),
        dict(key_major=True, block_n=256, num_warps=8, num_stages=3),
        dict(key_major=False, block_n=128, num_warps=8, num_stages=3),
        dict(key_major=False, block_n=64, num_warps=4, num_stages=3),
        dict(key_major=True, block_q=4, block_n=128, num_warps=8, num_stages=3),
        dict(key_major=True, block_q=4, block_n=64, num_warps=8, num_stages=4),
    ]

    def inputs(N, fp8):
        q = torch.randn(S, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
        w = torch.rand(S, H, device=dev) * D**-0.5 * H**-0.5
        if fp8:
            q8, qs = quantize_fp8_per_token(q)
            k8, ksc = quantize_fp8_per_token(k)
            return q8, k8, w * qs, ksc
        return q, k, w, None

    best = {}
    for fp8 in (False, True):
        N = 32768
        q, k, w, ksc = inputs(N, fp8)
        ks, ke = _causal_windows(S, N, dev)
        pairs = float((ke - ks).sum())
        for cfg in configs:
            try:
                ms = _bench(lambda cfg=cfg: indexer_logits(q, k[None], w, ks, ke, k_scale=_one(ksc), clean=False,
                                                           **cfg))
                tf = 2 * pairs * H * D / ms / 1e9
            except Exception as e:  # a config that does not compile is reported, not fatal
                ms, tf = None, None
                log(f"  indexer config {cfg} failed: {e!r}"[:300])
            res["sweep"].append({"dtype": "fp8" if fp8 else "bf16", "N": N, **cfg, "ms": ms, "tflops": tf})
            if tf is not None and tf > best.get(fp8, ({}, 0.0))[1]:
                best[fp8] = (cfg, tf)
    for fp8 in (False, True):
        cfg = best[fp8][0]
        for N in (8192, 32768, 65536, 131072):
            q, k, w, ksc = inputs(N, fp8)
            ks, ke = _causal_windows(S, N, dev)
            pairs = float((ke - ks).sum())
            ms = _bench(lambda: indexer_logits(q, k[None], w, ks, ke, k_scale=_one(ksc), clean=False, **cfg))
            tf = 2 * pairs * H * D / ms / 1e9
            ceil_key = "fp8_gemm_tflops" if fp8 else "bf16_gemm_tflops"
            row = {"dtype": "fp8" if fp8 else "bf16", "S": S, "N": N, "H": H, "D": D, "config": cfg, "ms": ms,
                   "tflops": tf, "pct_of_gemm_ceiling": 100 * tf / ceil[ceil_key] if ceil_key in ceil else None}
            res["prefill"].append(row)
            log(f"  indexer {row['dtype']} S={S} N={N}: {ms:.3f} ms  {tf:.0f} TFLOP/s")
    for fp8 in (False, True):
        for B, T in ((1, 65536), (64, 65536), (1, 131072), (32, 131072)):
            q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
            kc = torch.randn(B, T, D, device=dev, dtype=torch.bfloat16)
            w = torch.rand(B, H, device=dev)
            ksc = None
            if fp8:
                q, qs = quantize_fp8_per_token(q)
                kc, ksc = quantize_fp8_per_token(kc)
                w = w * qs
            lengths = torch.full((B,), T, device=dev, dtype=torch.int32)
            ms = _bench_graph(lambda: indexer_logits(q, kc, w, torch.zeros_like(lengths), lengths, k_scale=ksc,
                                                      clean=False))
            nbytes = B * T * (D * kc.element_size() + (4 if fp8 else 0) + 4)  # keys (+scales) read, logits written
            tbps = nbytes / ms / 1e9
            row = {"dtype": "fp8" if fp8 else "bf16", "B": B, "T": T, "ms": ms, "tbps": tbps,
                   "pct_of_copy": 100 * tbps / ceil["copy_tbps"]}
            res["decode"].append(row)
            log(f"  indexer decode {row['dtype']} B={B} T={T}: {ms * 1e3:.1f} us  {tbps:.2f} TB/s")
    res["best_config"] = {("fp8" if k else "bf16"): v[0] for k, v in best.items()}
    res["resources_last"] = resources("mqa_logits")
    return res


# the engine-logits top-k: the random GLM-4.7-Flash-DSA model (e2e's) prefills this many tokens
TOPK_ENGINE = {"context": 131072, "layers": 47, "experts": 16, "chunk": 8192}
TOPK_ENGINE_SCHEDULES = ("sample", "staged", "bucket", "torch")


def bench_topk_engine(dev, ceil: dict, log) -> dict:
    """Top-k on the logits the engine itself scores, not on random normals: the e2e benchmark's random
    GLM-4.7-Flash-DSA model prefills ``TOPK_ENGINE["context"]`` tokens all Full, and every top-k call of the
    last chunk (the longest windows, at every layer) is timed under each schedule, with the sample
    schedule's count of rows it read again and rows that fell back to plain radix. Rope and the mixing of
    the layers give these rows a structure random normals lack, which is what a sampled threshold meets."""
    import dataclasses

    from ..engine import Engine
    from ..ops.topk.kernel import topk
    from ..pattern import Pattern
    from .e2e import random_model

    cfg = TOPK_ENGINE
    ctx, layers = cfg["context"], cfg["layers"]
    model = random_model(cfg["experts"], layers, device=str(dev))
    eng = Engine(model, Pattern.parse("F" * layers), max_batch=1, max_len=ctx + 8, chunk=cfg["chunk"], backend="triton")
    base = eng.ops.topk
    res: dict = {**cfg, "k": model.config.index_topk, "calls": []}
    last_chunk = ctx - (ctx - 1) % cfg["chunk"] - 1  # the first position of the last prefill chunk

    def timed(logits, k, ks, ke, row_len=None, ties="lowest"):
        out = base(logits, k, ks, ke, row_len=row_len, ties=ties)
        if int(ke.min()) > last_chunk:  # a call of the last chunk: time every schedule on these logits
            row = {"call": len(res["calls"]), "rows": logits.shape[0], "max_keys": int(ke.max()),
                   "mean_keys": float((ke - ks).float().mean())}
            stats = torch.zeros(2, dtype=torch.int32, device=logits.device)
            topk(logits, k, ks, ke, schedule="sample", stats=stats)
            row["sample_reread_rows"], row["sample_fallback_rows"] = stats.tolist()
            for sched in TOPK_ENGINE_SCHEDULES:
                row[f"{sched}_ms"] = _bench(lambda sched=sched: topk(logits, k, ks, ke, schedule=sched), warmup=2,
                                            rep=10)
            row["auto_ms"] = _bench(lambda: topk(logits, k, ks, ke), warmup=2, rep=10)
            row["torch_topk_ms"] = _bench(lambda: torch.topk(logits, k, dim=-1), warmup=2, rep=10)
            res["calls"].append(row)
            log(f"  topk on engine logits, call {row['call']} ({row['rows']} rows, up to {row['max_keys']} keys): "
                + ", ".join(f"{s} {row[f'{s}_ms']:.3f}" for s in (*TOPK_ENGINE_SCHEDULES, "auto"))
                + f" ms (torch.topk {row['torch_topk_ms']:.3f}); sample re-read {row['sample_reread_rows']}, "
                f"fell back {row['sample_fallback_rows']} rows")
        return out

    eng.ops = dataclasses.replace(eng.ops, topk=timed)
    ids = torch.randint(0, model.config.vocab_size, (ctx,), device=dev, generator=torch.Generator(dev).manual_seed(0))
    eng.prefill(0, ids)
    for sched in (*TOPK_ENGINE_SCHEDULES, "auto", "torch_topk"):
        res[f"total_{sched}_ms"] = sum(r[f"{sched}_ms"] for r in res["calls"])
    return res


def bench_fused(dev, ceil: dict, log) -> dict:
    """The indexer's selection of a prefill chunk (S = 4096 queries at the end of N keys, 64 heads x 128,
    top-2048, fp8), fused (``indexer_topk_fused``: a 1/32 sample, then only the logits above each row's
    threshold leave the kernel) against unfused (all logits written, then the top-k), for the crossover."""
    from ..ops.indexer import indexer_topk, indexer_topk_fused
    from ..ops.indexer.kernel import quantize_fp8_per_token

    H, D, S, K = 64, 128, 4096, 2048
    res: dict = {"rows": []}
    for N in (8192, 16384, 32768, 65536, 131072, 262144):
        q, qs = quantize_fp8_per_token(torch.randn(S, H, D, device=dev, dtype=torch.bfloat16))
        k, ksc = quantize_fp8_per_token(torch.randn(N, D, device=dev, dtype=torch.bfloat16))
        w = torch.rand(S, H, device=dev) * D**-0.5 * qs
        ks, ke = _causal_windows(S, N, dev)
        stats: dict = {}
        indexer_topk_fused(q, k[None], w, ks, ke, K, backend="triton", k_scale=ksc[None], stats=stats)
        fused_ms = _bench(lambda: indexer_topk_fused(q, k[None], w, ks, ke, K, backend="triton", k_scale=ksc[None]))
        plain_ms = _bench(lambda: indexer_topk(q, k[None], w, ks, ke, K, backend="triton", k_scale=ksc[None]))
        row = {"S": S, "N": N, "k": K, "fused_ms": fused_ms, "unfused_ms": plain_ms, "speedup": plain_ms / fused_ms,
               **stats}
        res["rows"].append(row)
        log(f"  fused indexer+top-k S={S} N={N}: fused {fused_ms:.3f} ms, unfused {plain_ms:.3f} ms "
            f"({row['speedup']:.2f}x; {stats['fallback_rows']} rows fell back)")
    wins = [r["N"] for r in res["rows"] if r["speedup"] > 1]
    res["crossover_N"] = min(wins) if wins else None
    return res


# the top-k benchmark's shapes: k, prefill rows, the sweep's and the table's key counts, decode rows and keys
TOPK_K, TOPK_ROWS, TOPK_SWEEP_KEYS = 2048, 8192, 65536
TOPK_PREFILL_KEYS = (8192, 16384, 32768, 65536)
TOPK_DECODE = ((1, 8, 64), (65536, 131072, 200000))


def bench_topk(dev, ceil: dict, log) -> dict:
    from ..ops.topk.kernel import topk

    K, S, NS = TOPK_K, TOPK_ROWS, TOPK_SWEEP_KEYS
    res: dict = {"prefill": [], "decode": [], "sweep": []}
    x = torch.randn(S, NS, device=dev)
    ks, ke = _causal_windows(S, NS, dev)

    def sweep(schedule: str, configs: tuple[dict, ...]) -> dict:
        """Each configuration of ``schedule`` at S x NS into the results' sweep; returns the fastest."""
        best = ({}, float("inf"))
        for cfg in configs:
            ms = _bench(lambda cfg=cfg: topk(x, K, ks, ke, schedule=schedule, **cfg), warmup=5, rep=20)
            res["sweep"].append({"rows": S, "N": NS, "schedule": schedule, **cfg, "ms": ms})
            log(f"  topk {schedule} sweep {cfg}: {ms:.3f} ms")
            if ms < best[1]:
                best = (cfg, ms)
        return best[0]

    res["best_config"] = sweep("bucket", (
        dict(block=1024, num_warps=8), dict(block=2048, num_warps=8), dict(block=4096, num_warps=8),
        dict(block=1024, num_warps=4), dict(block=2048, num_warps=4), dict(block=4096, num_warps=16)))
    # sample's per-row work (the sample's selection, the candidates' digit passes) is not bucket's, so its
    # best block and warps may differ; staged: keys per collecting program, its tile, its warps
    res["best_sample_config"] = sweep("sample", (
        dict(block=1024, num_warps=8), dict(block=2048, num_warps=8), dict(block=4096, num_warps=8),
        dict(block=2048, num_warps=16), dict(block=1024, num_warps=4)))
    res["best_staged_config"] = sweep("staged", (
        dict(seg_keys=8192, block=1024, collect_warps=4), dict(seg_keys=4096, block=1024, collect_warps=4),
        dict(seg_keys=16384, block=2048, collect_warps=4), dict(seg_keys=8192, block=2048, collect_warps=8),
        dict(seg_keys=4096, block=512, collect_warps=2)))
    for N in TOPK_PREFILL_KEYS:
        x = torch.randn(S, N, device=dev)
        ks, ke = _causal_windows(S, N, dev)
        nbytes = float((ke - ks).sum()) * 4
        ms = _bench(lambda: topk(x, K, ks, ke, schedule="bucket", **res["best_config"]))
        sample_ms = _bench(lambda: topk(x, K, ks, ke, schedule="sample", **res["best_sample_config"]))
        staged_ms = _bench(lambda: topk(x, K, ks, ke, schedule="staged", **res["best_staged_config"]))
        auto_ms = _bench(lambda: topk(x, K, ks, ke))  # what the dispatch picks
        rows_ms = _bench(lambda: topk(x, K, ks, ke, schedule="rows"), warmup=5, rep=20)
        ref_ms = _bench(lambda: torch.topk(x, K, dim=-1), warmup=5, rep=20)
        row = {"rows": S, "N": N, "k": K, "schedule": "bucket", "ms": ms, "tbps_one_read": nbytes / ms / 1e9,
               "radix_rows_ms": rows_ms, "torch_topk_ms": ref_ms, "sample_ms": sample_ms, "auto_ms": auto_ms,
               "staged_ms": staged_ms,
               "sample_tbps_one_read": nbytes / sample_ms / 1e9}
        row["resources"] = resources("topk_bucket")
        row["resources_sample"] = resources("topk_sample")
        res["prefill"].append(row)
        row["resources_staged_collect"] = resources("topk_staged_collect")
        row["resources_staged_select"] = resources("topk_staged_select")
        log(f"  topk {S}x{N}: bucket {ms:.3f} ms, sample {sample_ms:.3f} ms, staged {staged_ms:.3f} ms, "
            f"auto {auto_ms:.3f} ms, "
            f"radix rows {rows_ms:.3f} ms "
            f"(torch.topk {ref_ms:.3f} ms)")
    for R in TOPK_DECODE[0]:
        for N in TOPK_DECODE[1]:
            x = torch.randn(R, N, device=dev)
            row = {"rows": R, "N": N, "k": K}
            for sched in ("rows", "split", "auto"):  # auto: what the dispatch picks, against torch.topk
                row[f"{sched}_us"] = 1e3 * _bench_graph(lambda sched=sched: topk(x, K, schedule=sched))
            row["torch_topk_us"] = 1e3 * _bench_graph(lambda: torch.topk(x, K, dim=-1))
            # the engine's call passes each row's window: the dispatch then pays for the mask too
            wks = torch.zeros(R, dtype=torch.int32, device=dev)
            wke = torch.full((R,), N, dtype=torch.int32, device=dev)
            row["auto_windows_us"] = 1e3 * _bench_graph(lambda: topk(x, K, wks, wke))
            res["decode"].append(row)
            res["resources_split_hist"] = resources("topk_split_hist")
            log(f"  topk decode {R}x{N}: rows {row['rows_us']:.1f} us, split {row['split_us']:.1f} us, "
                f"auto {row['auto_us']:.1f} us (windows given {row['auto_windows_us']:.1f} us), "
                f"torch {row['torch_topk_us']:.1f} us")
    return res


def bench_sparse_mla(dev, ceil: dict, log) -> dict:
    from ..ops.sparse_mla.kernel import sparse_mla

    DV, DR, K = 512, 64, 2048
    Dk = DV + DR
    res: dict = {"prefill": [], "decode": [], "sweep": []}
    S, N = 4096, 32768
    kv = torch.randn(N, Dk, device=dev, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(N, device=dev)[:K] for _ in range(S)]).int()
    configs = [
        dict(block_h=64, num_warps=8, num_stages=2, block_k=64),
        dict(block_h=64, num_warps=16, num_stages=2, block_k=64),
        dict(block_h=32, num_warps=4, num_stages=2, block_k=64),
        dict(block_h=64, num_warps=8, num_stages=3, block_k=32),
        dict(block_h=64, num_warps=4, num_stages=2, block_k=64),
    ]
    q = torch.randn(S, 128, Dk, device=dev, dtype=torch.bfloat16)
    best = (None, 0.0)
    for cfg in configs:
        try:
            ms = _bench(lambda cfg=cfg: sparse_mla(q, kv[None], idx, Dk**-0.5, DV, n_split=1, **cfg))
            tf = 2 * S * K * 128 * (Dk + DV) / ms / 1e9
        except Exception as e:
            ms, tf = None, None
            log(f"  sparse_mla config {cfg} failed: {e!r}"[:300])
        res["sweep"].append({"H": 128, **cfg, "ms": ms, "tflops": tf})
        if tf is not None and tf > best[1]:
            best = (cfg, tf)
    for H in (20, 64, 128):
        q = torch.randn(S, H, Dk, device=dev, dtype=torch.bfloat16)
        cfg = dict(best[0]) if H >= 64 else {}
        ms = _bench(lambda: sparse_mla(q, kv[None], idx, Dk**-0.5, DV, **dict({'n_split': 1}, **cfg)))
        tf = 2 * S * K * H * (Dk + DV) / ms / 1e9
        row = {"S": S, "H": H, "topk": K, "N": N, "config": cfg, "ms": ms, "tflops": tf,
               "pct_of_bf16_gemm": 100 * tf / ceil["bf16_gemm_tflops"]}
        row["resources"] = resources("sparse_mla")
        res["prefill"].append(row)
        log(f"  sparse MLA prefill H={H}: {ms:.3f} ms  {tf:.0f} TFLOP/s")
    res["best_config"] = best[0]
    T = 32768
    kc = torch.randn(64, T, Dk, device=dev, dtype=torch.bfloat16)
    didx = torch.stack([torch.randperm(T, device=dev)[:K] for _ in range(64)]).int()
    q = torch.randn(64, 20, Dk, device=dev, dtype=torch.bfloat16)
    for cfg in (dict(n_split=4), dict(n_split=8), dict(n_split=16), dict(n_split=8, num_stages=3),
                dict(n_split=8, block_k=32, num_warps=4), dict(n_split=16, block_k=32, num_warps=4, num_stages=3)):
        try:
            ms = _bench_graph(lambda cfg=cfg: sparse_mla(q, kc, didx, Dk**-0.5, DV, **cfg))
        except Exception as e:
            ms = None
            log(f"  sparse_mla decode config {cfg} failed: {e!r}"[:300])
        res["sweep"].append({"decode": True, "B": 64, "H": 20, **cfg, "us": None if ms is None else ms * 1e3})
        log(f"  decode sweep {cfg}: {ms and ms * 1e3} us")
    for B in (1, 16, 64):
        kc = torch.randn(B, T, Dk, device=dev, dtype=torch.bfloat16)
        didx = torch.stack([torch.randperm(T, device=dev)[:K] for _ in range(B)]).int()
        for H in (20, 64, 128):
            q = torch.randn(B, H, Dk, device=dev, dtype=torch.bfloat16)
            ms = _bench_graph(lambda: sparse_mla(q, kc, didx, Dk**-0.5, DV))
            nbytes = B * K * Dk * 2 + B * H * Dk * 2 + B * H * DV * 4 + B * K * 4
            tbps = nbytes / ms / 1e9
            tf = 2 * B * K * H * (Dk + DV) / ms / 1e9
            row = {"B": B, "H": H, "topk": K, "T": T, "us": ms * 1e3, "tbps": tbps, "tflops": tf,
                   "pct_of_copy": 100 * tbps / ceil["copy_tbps"]}
            res["decode"].append(row)
            log(f"  sparse MLA decode B={B} H={H}: {ms * 1e3:.1f} us  {tbps:.2f} TB/s  {tf:.0f} TFLOP/s")
    return res


# DeepSeek-V3.2's FP8 projections (out, in): q_a, q_b, kv_a, o_proj, an expert's gate/up and down, the
# dense MLP's gate/up and down
FP8_SHAPES = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "o_proj": (7168, 16384),
              "expert_gate_up": (2048, 7168), "expert_down": (7168, 2048), "dense_gate_up": (18432, 7168),
              "dense_down": (7168, 18432)}


def bench_fp8_gemm(dev, ceil: dict, log) -> dict:
    """The block-scaled FP8 linear layer (e4m3 weight with 128 x 128 scales, activations per token and
    128 channels): the product alone, and with the activations' quantisation, against the dequantised
    bf16 product through torch. Rates count 2 M N K."""
    from ..ops.fp8 import act_quant, block_quant
    from ..ops.fp8_gemm import fp8_linear
    from ..ops.fp8_gemm.kernel import fp8_gemm

    res: dict = {"prefill": []}
    for name, (N, K) in FP8_SHAPES.items():
        for M in (1, 4096, 32768):  # decode, a prefill chunk, a 32K-token calibration window
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            wq, ws = block_quant(torch.randn(N, K, device=dev) * 0.02)
            xq, xs = act_quant(x, 128, None)
            w_bf16 = (wq.float() * ws.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]).bfloat16()
            gemm_ms = _bench(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16))
            linear_ms = _bench(lambda: fp8_linear(x, wq, ws, "triton"))
            bf16_ms = _bench(lambda: x @ w_bf16.T)
            flops = 2 * M * N * K
            row = {"layer": name, "M": M, "N": N, "K": K, "gemm_ms": gemm_ms, "linear_ms": linear_ms,
                   "bf16_torch_ms": bf16_ms, "gemm_tflops": flops / gemm_ms / 1e9,
                   "linear_tflops": flops / linear_ms / 1e9, "bf16_torch_tflops": flops / bf16_ms / 1e9,
                   "pct_of_fp8_ceiling": 100 * flops / gemm_ms / 1e9 / ceil.get("fp8_gemm_tflops", float("nan"))}
            res["prefill"].append(row)
            log(f"  fp8 {name} M={M} N={N} K={K}: gemm {gemm_ms:.3f} ms {row['gemm_tflops']:.0f} TFLOP/s, with "
                f"activation quant {linear_ms:.3f} ms; bf16 torch {bf16_ms:.3f} ms")
    return res


# (hidden, expert inter, routed experts, experts per token): GLM-4.7-Flash's shape, and DeepSeek-V3.2's
MOE_SHAPES = {"glm47_flash": (2048, 1536, 64, 4), "deepseek_v32": (7168, 2048, 256, 8)}  # (D, I, E, k)
MOE_PREFILL_TOKENS = (4096, 16384)
MOE_DECODE_BATCHES = (1, 8, 64)


# tile configurations the MoE sweep tries: (block_m or None for the kernel's choice, block_n, block_k, warps,
# stages); the first of each list is the kernel's default
MOE_PREFILL_CONFIGS = [(None, 64, 64, 4, 3), (None, 128, 64, 4, 3), (None, 128, 64, 8, 3), (None, 128, 128, 8, 3),
                       (None, 64, 128, 4, 4), (128, 128, 64, 8, 3)]
MOE_DECODE_CONFIGS = [(None, 64, 64, 4, 3), (None, 32, 64, 4, 3), (None, 16, 64, 2, 4), (None, 32, 128, 4, 4),
                      (None, 16, 128, 4, 4)]


def _fp8_experts(wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stacked bf16 experts in DeepSeek's block-FP8 layout (e4m3, one fp32 scale per 128 x 128)."""
    from ..ops.fp8 import block_quant

    experts = {}
    for part, w in (("gate_proj", wg), ("up_proj", wu), ("down_proj", wd)):
        blocks = [block_quant(w[e]) for e in range(w.shape[0])]
        experts[part] = torch.stack([q for q, _ in blocks])
        experts[f"{part}_scale_inv"] = torch.stack([sc for _, sc in blocks])
    return experts


def bench_moe(dev, ceil: dict, log) -> dict:
    """The routed experts: the grouped-GEMM kernel in bf16 against the model's torch paths (one expert at a
    time in prefill; in decode the graph-safe form that gathers the chosen experts' weights), a sweep of its
    tile configurations, and the block-FP8 kernel on the same routings. Prefill rates count 2 x pairs x 3 D I
    FLOPs; decode rates the bytes of the distinct chosen experts' weights, read once."""
    from ..ops.moe.kernel import moe_experts, moe_experts_fp8
    from ..ops.moe.reference import moe_experts as reference

    res: dict = {"prefill": [], "decode": [], "sweep": [], "fp8": []}

    def tune(cfg: tuple) -> dict:
        bm, bn, bk, warps, stages = cfg
        return {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": warps, "num_stages": stages}

    for name, (D, inter, E, k) in MOE_SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        wg, wu = (torch.randn(E, inter, D, device=dev, generator=g, dtype=torch.bfloat16) * D**-0.5 for _ in range(2))
        wd = torch.randn(E, D, inter, device=dev, generator=g, dtype=torch.bfloat16) * inter**-0.5
        sg, su = (torch.randn(inter, D, device=dev, generator=g, dtype=torch.bfloat16) * D**-0.5 for _ in range(2))
        sd = torch.randn(D, inter, device=dev, generator=g, dtype=torch.bfloat16) * inter**-0.5

        def routing(n: int):
            idx = torch.rand(n, E, device=dev, generator=g).topk(k, dim=-1).indices
            return torch.randn(n, D, device=dev, generator=g, dtype=torch.bfloat16), idx, \
                torch.rand(n, k, device=dev, generator=g)

        for M in MOE_PREFILL_TOKENS:
            x, idx, w = routing(M)
            ms = _bench(lambda: moe_experts(x, wg, wu, wd, idx, w))
            ref_ms = _bench(lambda: reference(x, wg, wu, wd, idx, w), warmup=3, rep=10)
            flops = 2 * M * k * 3 * D * inter
            row = {"shape": name, "tokens": M, "D": D, "I": inter, "E": E, "k": k, "ms": ms, "tflops": flops / ms / 1e9,
                   "pct_of_bf16_gemm": 100 * flops / ms / 1e9 / ceil["bf16_gemm_tflops"],
                   "torch_loop_ms": ref_ms, "resources": resources("moe_gate_up")}
            res["prefill"].append(row)
            log(f"  moe {name} prefill {M} tokens: {ms:.3f} ms {row['tflops']:.0f} TFLOP/s; torch loop {ref_ms:.3f} ms")
        for cfg in MOE_PREFILL_CONFIGS:  # on the last (largest) prefill routing
            try:
                cms = _bench(lambda cfg=cfg: moe_experts(x, wg, wu, wd, idx, w, **tune(cfg)), warmup=5, rep=20)
            except Exception as err:  # e.g. a configuration beyond the shared memory
                log(f"  moe {name} prefill config {cfg} failed: {type(err).__name__}")
                continue
            res["sweep"].append({"shape": name, "tokens": M, **tune(cfg), "ms": cms, "tflops": flops / cms / 1e9})
            log(f"  moe {name} prefill {M} tokens, config {tune(cfg)}: {cms:.3f} ms {flops / cms / 1e9:.0f} TFLOP/s")
        experts = _fp8_experts(wg, wu, wd)
        fp8_ms = _bench(lambda: moe_experts_fp8(x, experts, idx, w))
        res["fp8"].append({"shape": name, "tokens": M, "ms": fp8_ms, "tflops": flops / fp8_ms / 1e9,
                           "pct_of_fp8_gemm": 100 * flops / fp8_ms / 1e9 / ceil.get("fp8_gemm_tflops", float("nan"))})
        log(f"  moe {name} fp8 prefill {M} tokens: {fp8_ms:.3f} ms {flops / fp8_ms / 1e9:.0f} TFLOP/s")
        for B in MOE_DECODE_BATCHES:
            x, idx, w = routing(B)
            ms = _bench_graph(lambda: moe_experts(x, wg, wu, wd, idx, w))
            sel = idx.flatten()
            try:  # what a gathering decode copies first: at V3.2 widths and batch 64, 3 x 15 GB
                gather_ms = _bench_graph(lambda: (wg[sel], wu[sel], wd[sel]))
            except torch.cuda.OutOfMemoryError:  # the comparison does not fit this GPU; the kernel's row stands
                gather_ms = None
                torch.cuda.empty_cache()
            n_experts = int(idx.unique().numel())
            nbytes = n_experts * 3 * D * inter * 2
            row = {"shape": name, "B": B, "distinct_experts": n_experts, "us": ms * 1e3, "tbps": nbytes / ms / 1e9,
                   "pct_of_copy": 100 * nbytes / ms / 1e9 / ceil["copy_tbps"],
                   "gather_weights_us": None if gather_ms is None else gather_ms * 1e3}
            res["decode"].append(row)
            log(f"  moe {name} decode B={B}: {row['us']:.1f} us {row['tbps']:.2f} TB/s over {n_experts} experts; "
                f"gathering their weights alone {_us(row['gather_weights_us'])}")
            # the whole MoE's experts with one shared MLP of the experts' width (as the model runs them): the
            # shared MLP on its own GEMMs after the routed kernels, against folded into them as one more slot
            sep_us = 1e3 * _bench_graph(lambda: moe_experts(x, wg, wu, wd, idx, w).sum(1) + F.linear(
                F.silu(F.linear(x, sg)) * F.linear(x, su), sd))
            fold_us = 1e3 * _bench_graph(lambda: moe_experts(x, wg, wu, wd, idx, w, shared=(sg, su, sd)).sum(1))
            row.update(with_shared_separate_us=sep_us, with_shared_folded_us=fold_us)
            log(f"  moe {name} decode B={B} with the shared MLP: {sep_us:.1f} us on its own GEMMs, "
                f"{fold_us:.1f} us folded into the routed kernels")
            if B < 64:  # where the default leaves SMs idle
                for cfg in MOE_DECODE_CONFIGS[1:]:
                    cus = 1e3 * _bench_graph(lambda cfg=cfg: moe_experts(x, wg, wu, wd, idx, w, **tune(cfg)))
                    res["sweep"].append({"shape": name, "B": B, **tune(cfg), "us": cus,
                                         "tbps": nbytes / cus / 1e6})
                    log(f"  moe {name} decode B={B}, config {tune(cfg)}: {cus:.1f} us {nbytes / cus / 1e6:.2f} TB/s")
            fp8_us = 1e3 * _bench_graph(lambda: moe_experts_fp8(x, experts, idx, w))
            fp8_bytes = nbytes / 2 * (1 + 4 / 128**2)  # one byte a weight, and an fp32 scale per 128 x 128
            res["fp8"].append({"shape": name, "B": B, "us": fp8_us, "tbps": fp8_bytes / fp8_us / 1e6})
            log(f"  moe {name} fp8 decode B={B}: {fp8_us:.1f} us {fp8_bytes / fp8_us / 1e6:.2f} TB/s")
    return res


def _us(v: float | None) -> str:
    return "did not fit the GPU" if v is None else f"{v:.1f} us"


def moe_table(result: dict) -> str:
    lines = ["| MoE (bf16 grouped GEMM) | shape | time | rate | % of ceiling | torch |", "|---|---|---|---|---|---|"]
    for r in result["moe"]["prefill"]:
        lines.append(f"| prefill | {r['shape']} {r['tokens']} tokens, E={r['E']} k={r['k']} | {r['ms']:.3f} ms | "
                     f"{r['tflops']:.0f} TFLOP/s | {r['pct_of_bf16_gemm']:.0f}% | loop {r['torch_loop_ms']:.2f} ms |")
    for r in result["moe"]["decode"]:
        lines.append(f"| decode | {r['shape']} B={r['B']} ({r['distinct_experts']} experts) | {r['us']:.1f} us | "
                     f"{r['tbps']:.2f} TB/s | {r['pct_of_copy']:.0f}% | gather alone {_us(r['gather_weights_us'])} |")
        if "with_shared_folded_us" in r:
            lines.append(f"| decode + shared MLP | {r['shape']} B={r['B']} | {r['with_shared_folded_us']:.1f} us "
                         f"folded | | | on its own GEMMs {r['with_shared_separate_us']:.1f} us |")
    for r in result["moe"].get("fp8", []):
        if "tokens" in r:
            lines.append(f"| fp8 prefill | {r['shape']} {r['tokens']} tokens | {r['ms']:.3f} ms | {r['tflops']:.0f} "
                         f"TFLOP/s | {r['pct_of_fp8_gemm']:.0f}% of fp8 | |")
        else:
            lines.append(f"| fp8 decode | {r['shape']} B={r['B']} | {r['us']:.1f} us | {r['tbps']:.2f} TB/s | | |")
    return "\n".join(lines)


def summary_table(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"ceilings: bf16 GEMM {c['bf16_gemm_tflops']:.0f} TFLOP/s, fp8 GEMM "
             f"{c.get('fp8_gemm_tflops', float('nan')):.0f} TFLOP/s, copy {c['copy_tbps']:.2f} TB/s", ""]
    lines.append("| kernel | shape | time | rate | % of ceiling | target |")
    lines.append("|---|---|---|---|---|---|")
    for r in result["indexer"]["prefill"]:
        tgt = TARGETS["indexer_fp8_tflops" if r["dtype"] == "fp8" else "indexer_bf16_tflops"]
        lines.append(f"| indexer {r['dtype']} | S={r['S']} N={r['N']} H=64 D=128 | {r['ms']:.3f} ms | "
                     f"{r['tflops']:.0f} TFLOP/s | {r['pct_of_gemm_ceiling']:.0f}% | >= {tgt:.0f} |")
    for r in result["indexer"]["decode"]:
        lines.append(f"| indexer decode {r['dtype']} | B={r['B']} T={r['T']} | {r['ms'] * 1e3:.1f} us | "
                     f"{r['tbps']:.2f} TB/s | {r['pct_of_copy']:.0f}% | |")
    for r in result["topk"]["prefill"]:
        tgt = f"<= {TARGETS['topk_8192x64K_ms']} ms" if r["N"] == 65536 else ""
        lines.append(f"| top-k 2048 | {r['rows']} rows x {r['N']} (causal) | {r['ms']:.3f} ms (sample "
                     f"{r.get('sample_ms', float('nan')):.2f}, staged {r.get('staged_ms', float('nan')):.2f}, auto "
                     f"{r.get('auto_ms', float('nan')):.2f}, radix "
                     f"{r['radix_rows_ms']:.2f}, torch "
                     f"{r['torch_topk_ms']:.2f}) | {r['tbps_one_read']:.2f} TB/s "
                     f"(1 read) | {100 * r['tbps_one_read'] / c['copy_tbps']:.0f}% | {tgt} |")
    for r in result["topk"]["decode"]:
        lines.append(f"| top-k 2048 decode | {r['rows']} x {r['N']} | rows {r['rows_us']:.1f} us, split "
                     f"{r['split_us']:.1f} us, auto {r.get('auto_us', float('nan')):.1f} us (windows given "
                     f"{r.get('auto_windows_us', float('nan')):.1f}) | torch {r['torch_topk_us']:.1f} us | | |")
    for r in result["sparse_mla"]["prefill"]:
        tgt = {128: f">= {TARGETS['sparse_mla_prefill_h128_tflops']:.0f}",
               20: f">= {TARGETS['sparse_mla_prefill_h20_tflops']:.0f}"}.get(r["H"], "")
        lines.append(f"| sparse MLA prefill | S={r['S']} H={r['H']} k=2048 | {r['ms']:.3f} ms | "
                     f"{r['tflops']:.0f} TFLOP/s | {r['pct_of_bf16_gemm']:.0f}% | {tgt} |")
    for r in result["sparse_mla"]["decode"]:
        lines.append(f"| sparse MLA decode | B={r['B']} H={r['H']} k=2048 | {r['us']:.1f} us | "
                     f"{r['tbps']:.2f} TB/s | {r['pct_of_copy']:.0f}% | >= {TARGETS['sparse_decode_tbps']} TB/s |")
    return "\n".join(lines)


def fp8_table(result: dict) -> str:
    lines = ["| FP8 layer | M x N x K | block-FP8 GEMM | with activation quant | bf16 torch | % of fp8 ceiling |",
             "|---|---|---|---|---|---|"]
    for r in result["fp8_gemm"]["prefill"]:
        lines.append(f"| {r['layer']} | {r['M']} x {r['N']} x {r['K']} | {r['gemm_ms']:.3f} ms, "
                     f"{r['gemm_tflops']:.0f} TFLOP/s | {r['linear_ms']:.3f} ms | {r['bf16_torch_ms']:.3f} ms | "
                     f"{r['pct_of_fp8_ceiling']:.0f}% |")
    return "\n".join(lines)


# every kernel group that ``bench kernels --parts`` can name, in the order a run times them: the CLI checks
# names against this table, so a group added here is reachable from the command line
BENCHES = {"indexer": bench_indexer, "topk": bench_topk, "sparse_mla": bench_sparse_mla, "fp8_gemm": bench_fp8_gemm,
           "moe": bench_moe, "fused": bench_fused, "topk_engine": bench_topk_engine}
PARTS = tuple(BENCHES)


def run(out: str | Path, parts: tuple[str, ...] = PARTS) -> dict:
    if not torch.cuda.is_available():
        raise OptionError("bench kernels needs a CUDA GPU: run it on a machine with one")
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import triton

    result: dict = {
        "command": " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(dev),
        "sms": torch.cuda.get_device_properties(dev).multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "timing": "median of CUDA-event timings, L2 flushed before each run (triton.testing.do_bench); decode "
              "kernels replayed from a CUDA graph",
        "targets": TARGETS,
    }
    log("ceilings ...")
    result["ceilings"] = ceilings(dev)
    log(str(result["ceilings"]))
    for part, fn in BENCHES.items():
        if part in parts:
            log(f"{part} ...")
            t0 = time.time()
            result[part] = fn(dev, result["ceilings"], log)
            log(f"{part} done in {time.time() - t0:.0f} s")
            torch.cuda.empty_cache()
            write_report(Path(out), result)  # a run cut short keeps the parts it finished
    write_report(Path(out), result)
    if all(p in result for p in ("indexer", "topk", "sparse_mla")):
        print(summary_table(result))
    if "fp8_gemm" in result:
        print(fp8_table(result))
    if "moe" in result:
        print(moe_table(result))
    return result
