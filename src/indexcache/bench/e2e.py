"""``indexcache bench e2e``: prefill and decode speed of the engine with IndexCache, GLM-4.7-Flash-DSA shape.

Random weights in the shape of GLM-4.7-Flash with DSA (47 layers, hidden 2048, 20 heads, MLA with q_lora
768 / kv_lora 512 / nope 192 / rope 64 / v 256, first layer dense (10240), then MoE top-4 of E routed
experts (1536) + 1 shared, indexer 32 heads x 128, top-k 2048). ``--experts`` lowers E (64 in the real
model) so that weights and a 200K cache fit one 80 GB GPU; the compute per token is unchanged, since every
token still runs 4 routed + 1 shared expert.

For each pattern (all-Full, uniform 1/2, uniform 1/4) and context length:

* **TTFT**: one prefill of a batch-1 prompt of that length, chunked, wall time between synchronisations;
  CUDA events around every indexer call (projection, scoring, top-k) give the indexer's share of it, and
  per Full layer its time with the rows its top-k read again or sent to plain radix (the data-dependent
  work), beside the caching allocator's retries (a prefill short of memory frees and re-allocates).
* **Decode**: batch 1 after that prefill, and a larger batch whose caches are filled with random values at
  the same length (decode time does not depend on the values; re-running B prefills would take minutes).
  Steps are replayed from a CUDA graph; the indexer's share is the indexer work of all Full layers
  captured in its own graph, over the step's time.
* Cache bytes per token, peak GPU memory, speedups over all-Full, and the Amdahl limit
  ``1 / (1 - r f)`` of removing a fraction r of the indexers when the indexer takes f of all-Full time.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import DSAConfig
from ..errors import OptionError
from ..ops.common import DEFAULT_BUDGET_BYTES
from ..ops.triton_support import compiled_variants, variants_added
from ..outputs import write_report
from ..pattern import Pattern

GLM47_FLASH_DSA = dict(
    vocab_size=151552, hidden_size=2048, intermediate_size=10240, moe_intermediate_size=1536,
    num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512,
    qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64, num_experts_per_tok=4,
    n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, index_n_heads=32, index_head_dim=128,
    index_topk=2048, max_position_embeddings=202752, rope_theta=1000000.0, norm_topk_prob=True,
    routed_scaling_factor=1.8, architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa",
    indexer_rope_interleave=True, eos_token_id=0, pad_token_id=1, bos_token_id=None,
)

TARGETS = {"prefill_200k_all_full_s": 19.5, "prefill_200k_quarter_s": 10.7, "decode_200k_b1_all_full_tok_s": 58.0,
           "decode_200k_b1_quarter_tok_s": 86.0, "quarter_prefill_speedup_within_amdahl": 0.10}


def random_model(experts: int, layers: int = 47, seed: int = 0, device: str = "cuda"):
    """The model built on the meta device, cast, then materialised and filled on ``device`` (no CPU copy)."""
    from ..model.dsa import DSAForCausalLM

    cfg = DSAConfig.from_dict(dict(GLM47_FLASH_DSA, n_routed_experts=experts, num_hidden_layers=layers))
    with torch.device("meta"):
        model = DSAForCausalLM(cfg)
    model.to_dtype(torch.bfloat16)
    model.to_empty(device=device)
    model.tie_weights()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for b in model.buffers():
            b.zero_()
    return model.eval()


class EventTimer:
    """CUDA events around named regions, per layer; totals in ms after a synchronisation. With a top-k
    ``tally`` (:func:`indexcache.ops.topk.kernel.tally`) each region also copies the tally's device counts at
    its two ends (on the stream: no synchronisation), so that each layer's top-k re-reads and fallbacks are
    its own."""

    def __init__(self, tally=None):
        self.events: dict[str, list] = {}
        self.tally = tally

    @contextmanager
    def __call__(self, name: str, layer: int | None = None):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        before = None if self.tally is None else self.tally.counts.clone()
        yield
        after = None if self.tally is None else self.tally.counts.clone()
        b.record()
        self.events.setdefault(name, []).append((layer, a, b, before, after))

    def totals(self) -> dict[str, float]:
        torch.cuda.synchronize()
        return {k: sum(a.elapsed_time(b) for _, a, b, _, _ in v) for k, v in self.events.items()}

    def per_layer(self, name: str) -> dict[int, dict]:
        """layer -> its regions' total ``ms``, their ``calls`` and, with a tally, the top-k rows it read again
        (``sample_reread_rows``) and that fell back to plain radix (``radix_fallback_rows``)."""
        torch.cuda.synchronize()
        out: dict[int, dict] = {}
        for layer, a, b, before, after in self.events.get(name, []):
            row = out.setdefault(layer, {"ms": 0.0, "calls": 0})
            row["ms"] += a.elapsed_time(b)
            row["calls"] += 1
            if before is not None:
                reread, fallback = (after - before).tolist()
                row["sample_reread_rows"] = row.get("sample_reread_rows", 0) + reread
                row["radix_fallback_rows"] = row.get("radix_fallback_rows", 0) + fallback
        return out


def indexer_layers_summary(per_layer: dict[int, dict]) -> dict:
    """The spread of the indexer's time over the Full layers of one prefill (median, fastest and slowest
    layer), so that a pattern whose per-layer indexer time differs from another's at the same work shows
    where; the top-k's counts over all layers are the tally's own summary."""
    if not per_layer:
        return {}
    secs = sorted((r["ms"] / 1e3, layer) for layer, r in per_layer.items())
    return {"layers": len(secs), "median_s": secs[len(secs) // 2][0], "min_s": secs[0][0], "min_layer": secs[0][1],
            "max_s": secs[-1][0], "max_layer": secs[-1][1]}


def kernel_table(events, top: int = 25) -> dict:
    """The GPU kernels of a profile (``torch.profiler``'s ``key_averages()``: name ``key``, ``count`` and the
    device time it spent itself, in us), longest first: ``device_s`` over all of them and the ``top`` with
    their calls, seconds and share."""
    timed = []
    for ev in events:
        us = getattr(ev, "self_device_time_total", None)
        if us is None:  # the older name
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0:
            timed.append((float(us), str(ev.key), int(ev.count)))
    timed.sort(key=lambda t: -t[0])
    total = sum(t[0] for t in timed)
    return {"device_s": total / 1e6, "kernels": [{"name": name[:160], "calls": count, "s": us / 1e6,
                                                  "share": us / total} for us, name, count in timed[:top]]}


def profile_prefill(eng, ids: torch.Tensor, top: int = 25) -> dict:
    """One more prefill of ``ids`` under ``torch.profiler``: the GPU kernels' own time (:func:`kernel_table`)
    and the wall time. The profiler's own cost inflates the wall time (58 s against an unprofiled 2.05 s for
    two layers at 200K on an H100), so the kernels' sum is to be read against the row's unprofiled
    ``ttft_s``: the part of it that no kernel covers is where the GPU waited on the host."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.prefill(0, ids)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, **kernel_table(prof.key_averages(), top)}


def _fill_random(eng, B: int, length: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for c in list(eng.latent) + list(eng.index_k.values()):
        c[:B, :length].normal_(0.0, 1.0, generator=g)
    eng.lengths[:B] = length


def _decode_rate(eng, B: int, steps: int) -> float:
    tok = torch.zeros(B, dtype=torch.long, device="cuda")
    start = eng.lengths[:B].clone()
    eng.decode(tok)  # capture (and warm-up)
    eng.lengths[:B] = start
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.decode(tok)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    eng.lengths[:B] = start
    return dt


def decode_families(eng, B: int) -> dict[str, Callable[[], None]]:
    """The work of one decode step at batch ``B``, cut by kernel family: each a closure that runs that
    family's kernels for every layer on inputs of the step's shapes (random, on the step's device), so that
    each can be captured in its own CUDA graph and timed. What no family covers (embedding, RoPE gathers,
    latent cache writes, residual adds) is the step's remainder."""
    model, cfg = eng.model, eng.cfg
    dev = eng.device
    g = torch.Generator(device=dev).manual_seed(2)
    layers = model.model.layers
    x = torch.randn(1, B, cfg.hidden_size, device=dev, dtype=eng.dtype, generator=g)
    qr = torch.randn(1, B, cfg.q_lora_rank, device=dev, dtype=eng.dtype, generator=g) if cfg.q_lora_rank else None
    pos = eng.lengths[:B].long()
    lengths = eng.lengths[:B] + 1
    rows = torch.arange(B, device=dev)
    ctx = eng.context(pos)
    heads, d_qk, d_v = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q_attn = torch.randn(B, heads, d_qk, device=dev, dtype=eng.dtype, generator=g)
    out_attn = torch.randn(1, B, heads, d_v, device=dev, dtype=eng.dtype, generator=g)
    # each row's selection: top-k distinct visible positions (the step's shape; which ones does not matter)
    span = lengths.view(-1, 1).float()
    topk = torch.rand(B, cfg.index_topk, device=dev, generator=g).mul(span).long().clamp_max(span.long() - 1)

    def norms() -> None:
        for layer in layers:
            layer.input_layernorm(x, eng.ops.name)
            layer.post_attention_layernorm(x, eng.ops.name)

    def projections() -> None:  # q (with its low-rank path), the latent kv and RoPE
        for layer in layers:
            layer.self_attn.latents(x, ctx)

    def indexer() -> None:  # projection, indexer-K cache write, scoring against the cache, top-k
        for i in eng.pattern.full_layers:
            ind = layers[i].self_attn.indexer
            iq, iw, ik = ind.project(x, qr, ctx)
            if eng.fp8_index:
                from ..ops.fp8 import act_quant

                k8, k_scale = act_quant(ik[0], ik.shape[-1], "ue8m0")
                eng.index_k[i][rows, pos] = k8  # beyond every length: the caches stay valid
                eng.index_scale[i][rows, pos] = k_scale[..., 0]
            else:
                eng.index_k[i][rows, pos] = ik[0]
            eng.select_indices(iq[0], iw[0] * ind.softmax_scale, eng.index_k[i][:B], lengths, trim=False,
                               k_scale=eng._scales(i, slice(0, B)))

    def attention() -> None:  # sparse MLA over the latent cache
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            eng.ops.sparse_mla(q_attn, eng.latent[i][:B], topk, attn.softmax_scale, attn.kv_lora)

    def output() -> None:  # W_uv and o_proj
        for layer in layers:
            layer.self_attn.project_out(out_attn)

    def mlp() -> None:  # dense MLPs and MoE (router, routed experts, shared experts)
        for layer in layers:
            layer.mlp(x, graph_safe=True, backend=eng.ops.name)

    def head() -> None:
        model.head(x[0], eng.ops.name)

    return {"norms": norms, "projections": projections, "indexer": indexer, "attention": attention,
            "output_projection": output, "mlp_moe": mlp, "lm_head": head}


def _decode_share(eng, B: int, step_ms: float) -> dict:
    """The decode step's time by kernel family: each family of :func:`decode_families` captured in its own
    CUDA graph and timed the same way as the graph-replayed step; the indexer's share, and what no family
    covers."""
    import triton.testing

    families = {}
    with torch.no_grad():
        for name, fn in decode_families(eng, B).items():
            fn()  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            families[name] = float(triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median"))
    covered = sum(families.values())
    return {"indexer_ms": families["indexer"], "step_ms": step_ms, "indexer_share": families["indexer"] / step_ms,
            "families_ms": families, "remainder_ms": step_ms - covered,
            "method": "each kernel family of all layers in its own CUDA graph, on inputs of the step's shapes / the "
                      "graph-replayed step; the remainder is the step minus their sum"}


def run(out: str | Path, contexts: list[int], experts: int = 16, layers: int = 47, chunk: int = 8192,
        decode_steps: int = 32, large_batch: int = 8, patterns: list[str] | None = None,
        model_dir: str | None = None, pattern_specs: list[str] | None = None,
        fused_from: int | None = None, dtype: str = "bfloat16", repeats: int | None = None,
        profile: bool = False, select_budget_mb: int | list[int] | None = None) -> dict:
    """The engine's prefill and decode speed per pattern and context. By default on a random
    GLM-4.7-Flash-DSA-shaped model (``experts``, ``layers``) under all Full and uniform 1/2 and 1/4
    (``patterns`` picks among those names); with ``model_dir``, on that checkpoint (bf16) under all Full and
    ``pattern_specs`` (any pattern form), so that a study's patterns get their speed beside their quality.
    ``fused_from``: prefill chunks whose windows reach this many keys select through the fused indexer +
    top-k (default: the engine's own, ``FUSED_TOPK_FROM_KEYS``). ``dtype`` (``bfloat16`` or ``float32``) is
    the checkpoint's dtype with ``model_dir``. ``repeats``: prefills timed per row, the median reported (default
    3 on a checkpoint, 1 on the random shape, whose 200K prefills take a minute each). ``profile``: each row
    adds one more prefill under ``torch.profiler`` and keeps its longest kernels (``prefill_profile``; with
    few ``layers`` it costs little at 200K). ``select_budget_mb``: the memory of each piece of a prefill
    chunk's indexer logits (the engine's ``select_budget_bytes``; default the engine's); a list times every
    pattern under each budget in turn, in this one process, so that they compare on the same compiled kernels
    (each row names its ``select_budget_bytes``)."""
    from ..engine import Engine

    if not torch.cuda.is_available():
        raise OptionError("bench e2e needs a CUDA GPU: run it on a machine with one")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    t_init = time.time()
    if model_dir is not None:
        from ..checkpoint import load_model
        from ..pattern import parse_spec

        dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
        if dtype not in dtypes:
            raise OptionError(f"dtype {dtype!r}: choose bfloat16 or float32")
        model = load_model(model_dir, device="cuda", dtype=dtypes[dtype], verbose=False)
        layers = model.config.num_hidden_layers
        named = {"all-Full": Pattern.parse("F" * layers)}
        named.update({str(p): p for p in (parse_spec(spec, layers) for spec in pattern_specs or [])})
        described = {"shape": f"the checkpoint {model_dir}", "num_hidden_layers": layers, "dtype": dtype}
    else:
        model = random_model(experts, layers)
        named = {"all-Full": Pattern.parse("F" * layers), "uniform 1/2": Pattern.uniform(layers, 2),
                 "uniform 1/4": Pattern.uniform(layers, 4)}
        if patterns:
            named = {k: v for k, v in named.items() if k in patterns}
        described = {"shape": "GLM-4.7-Flash with DSA", **{k: v for k, v in GLM47_FLASH_DSA.items()
                                                          if isinstance(v, int | float)},
                     "n_routed_experts": experts, "num_hidden_layers": layers,
                     "note": f"routed experts lowered from 64 to {experts} to fit one GPU; every token still runs "
                             "4 routed + 1 shared expert, so the compute per token is unchanged"}
    log(f"model: {layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, "
        f"ready in {time.time() - t_init:.0f} s")
    max_ctx = max(contexts)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (max_ctx,), device="cuda")
    result: dict = {
        "command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": {**described, "params": sum(p.numel() for p in model.parameters())},
        "chunk": chunk, "decode_steps": decode_steps, "targets": TARGETS, "runs": [],
    }
    fused0 = {} if fused_from is None else {"fused_topk_from": fused_from}
    if isinstance(select_budget_mb, int):
        select_budget_mb = [select_budget_mb]
    budgets = [mb << 20 for mb in select_budget_mb] if select_budget_mb else [DEFAULT_BUDGET_BYTES]
    result["fused_topk_from"] = fused_from
    result["select_budget_bytes"] = budgets[0] if len(budgets) == 1 else budgets
    repeats = repeats or (3 if model_dir is not None else 1)
    result["prefill_repeats"] = repeats
    # warm-up: compile every kernel variant this pattern's prefill and decode use, outside the timings. Kernels
    # specialise on the key count (the top-k picks its variant by row length), so the warm-up runs every chunk
    # of the longest context through the first layers (Engine.warm_up): on two chunks only, the random shape's
    # first 200K prefill once compiled in its timing, 72 s of its 132 in the first Full layer
    from ..ops.topk.kernel import tally

    for budget, (name, pat) in itertools.product(budgets, named.items()):
        fused = {**fused0, "select_budget_bytes": budget}
        warm = Engine(model, pat, max_batch=1, max_len=max_ctx + 64, chunk=chunk, **fused)
        compiled0 = compiled_variants()
        with tally():  # the timed prefills count their top-k's fallbacks: the same kernel variants here
            warm_s = warm.warm_up(max_ctx)
        warm_compiled = variants_added(compiled0, compiled_variants())
        warm.decode(torch.zeros(1, dtype=torch.long, device="cuda"))
        log(f"{name:12s} warm-up: {max_ctx} tokens through {warm.warm_up_layers()} layers in {warm_s:.1f} s, "
            f"compiled {warm_compiled or 'nothing new'}")
        del warm
        for ctx in contexts:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            per_req = None
            eng = Engine(model, pat, max_batch=1, max_len=ctx + decode_steps + 8, chunk=chunk, **fused)
            per_req = eng.cache_bytes_per_token
            ttfts, shares, layers_ms, topks, retries, compiled = [], [], [], [], [], []
            for _ in range(repeats):  # each prefill rewrites slot 0 from position 0
                retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0)
                compiled0 = compiled_variants()
                with tally() as counted:
                    eng.timer = timer = EventTimer(counted)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    eng.prefill(0, ids[:ctx])
                    torch.cuda.synchronize()
                ttfts.append(time.perf_counter() - t0)
                shares.append(timer.totals())
                layers_ms.append(timer.per_layer("indexer"))
                topks.append(counted.summary())
                retries.append(torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0)
                compiled.append(variants_added(compiled0, compiled_variants()))
            eng.timer = None
            ttft = sorted(ttfts)[len(ttfts) // 2]
            at = ttfts.index(ttft)
            tot = shares[at]
            row = {"pattern": name, "pattern_str": str(pat), "num_full": len(pat.full_layers), "context": ctx,
                   "select_budget_bytes": budget,
                   "warm_up_s": warm_s, "warm_up_tokens": max_ctx, "warm_up_compiled": warm_compiled,
                   # kernel variants compiled inside the timed prefill (none, if the warm-up covered it)
                   "prefill_compiled": compiled[at],
                   "ttft_s": ttft, "ttft_all_s": ttfts, "prefill_indexer_s": tot.get("indexer", 0.0) / 1e3,
                   "prefill_attention_s": tot.get("attention", 0.0) / 1e3,
                   "prefill_indexer_share": tot.get("indexer", 0.0) / 1e3 / ttft,
                   # where the indexer's time went, layer by layer, and what the top-k did there
                   "prefill_indexer_layers": indexer_layers_summary(layers_ms[at]),
                   "prefill_indexer_per_layer": {str(k): {"s": v["ms"] / 1e3, **{c: n for c, n in v.items()
                                                                                  if c != "ms"}}
                                                 for k, v in sorted(layers_ms[at].items())},
                   "prefill_topk": topks[at],
                   "prefill_alloc_retries": retries[at],
                   "cache_bytes_per_token": per_req,
                   "cache_latent_bytes_per_token": eng.spec.latent_bytes_per_token,
                   "cache_indexer_bytes_per_token": eng.spec.index_bytes_per_token}
            if profile:
                row["prefill_profile"] = prof = profile_prefill(eng, ids[:ctx])
                log(f"{name:12s} ctx={ctx:>6d}: profiled prefill: kernels {prof['device_s']:.2f} s against the "
                    f"unprofiled TTFT {ttft:.2f} s: " + "; ".join(f"{k['name'][:60]} {k['s']:.3f} s x{k['calls']}"
                                                           for k in prof["kernels"][:8]))
            lay, tk = row["prefill_indexer_layers"], row["prefill_topk"]
            if lay:
                log(f"{name:12s} ctx={ctx:>6d}: prefill indexer per Full layer median {lay['median_s']:.3f} s "
                    f"(layer {lay['min_layer']} {lay['min_s']:.3f} to layer {lay['max_layer']} {lay['max_s']:.3f}), "
                    f"top-k {tk['schedules']}, re-read rows {tk['sample_reread_rows']}, "
                    f"radix fallback rows {tk['radix_fallback_rows']}, allocator retries {retries[at]}, compiled "
                    f"in the timing {compiled[at] or 'nothing'}")
            dt = _decode_rate(eng, 1, decode_steps)
            row["decode_b1_ms"] = dt * 1e3
            row["decode_b1_tok_s"] = 1.0 / dt
            row["decode_b1"] = _decode_share(eng, 1, dt * 1e3)
            fam = row["decode_b1"]["families_ms"]
            log(f"{name:12s} ctx={ctx:>6d}: decode b1 {dt * 1e3:.2f} ms = "
                + ", ".join(f"{k} {v:.2f}" for k, v in fam.items())
                + f", remainder {row['decode_b1']['remainder_ms']:.2f} (ms)")
            row["peak_memory_gib_b1"] = torch.cuda.max_memory_allocated() / 2**30
            del eng
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info()
            B = max(2, min(large_batch, int(0.8 * free // ((ctx + decode_steps + 8) * per_req))))
            engb = Engine(model, pat, max_batch=B, max_len=ctx + decode_steps + 8, chunk=chunk, **fused)
            _fill_random(engb, B, ctx)
            dtb = _decode_rate(engb, B, decode_steps)
            row.update({"large_batch": B, "decode_large_ms": dtb * 1e3, "decode_large_tok_s": B / dtb,
                        "decode_large": _decode_share(engb, B, dtb * 1e3),
                        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
            del engb
            result["runs"].append(row)
            write_report(Path(out), {**result, "complete": False})  # a run cut short keeps its finished rows
            log(f"{name:12s} ctx={ctx:>6d}: TTFT {ttft:7.2f} s (indexer {100 * row['prefill_indexer_share']:.0f}%), "
                f"decode b1 {row['decode_b1_tok_s']:6.1f} tok/s (indexer {100 * row['decode_b1']['indexer_share']:.0f}%"
                f"), b{B} {row['decode_large_tok_s']:7.1f} tok/s, cache {per_req} B/token, "
                f"peak {row['peak_memory_gib']:.1f} GiB")
    _speedups(result)
    result["complete"] = True
    write_report(Path(out), result)
    try:
        plot(result, Path(out).with_suffix(".png"))
    except Exception as e:  # the JSON is what matters; a plotting failure is reported, not fatal
        log(f"plot failed: {e!r}")
    print(table(result))
    return result


def _speedups(result: dict) -> None:
    def key(r: dict) -> tuple:  # each row against all Full at its context and selection budget
        return r["context"], r.get("select_budget_bytes")

    base = {key(r): r for r in result["runs"] if r["pattern"] == "all-Full"}
    for r in result["runs"]:
        b = base.get(key(r))
        if b is None:
            continue
        removed = 1.0 - r["num_full"] / b["num_full"]
        f = b["prefill_indexer_share"]
        r["prefill_speedup"] = b["ttft_s"] / r["ttft_s"]
        r["decode_b1_speedup"] = r["decode_b1_tok_s"] / b["decode_b1_tok_s"]
        r["decode_large_speedup"] = r["decode_large_tok_s"] / b["decode_large_tok_s"]
        r["prefill_amdahl_limit"] = 1.0 / (1.0 - removed * f)
        r["prefill_speedup_vs_amdahl"] = r["prefill_speedup"] / r["prefill_amdahl_limit"]


def table(result: dict) -> str:
    lines = ["| pattern | select MB | context | TTFT s | indexer % prefill | prefill speedup | Amdahl limit "
             "| decode b1 tok/s | indexer % decode | decode speedup | batch | decode tok/s | cache B/token "
             "| peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        budget = r.get("select_budget_bytes", result.get("select_budget_bytes", DEFAULT_BUDGET_BYTES))
        lines.append(
            f"| {r['pattern']} | {budget >> 20} | {r['context']} | {r['ttft_s']:.2f} | "
            f"{100 * r['prefill_indexer_share']:.0f} | "
            f"{r.get('prefill_speedup', 1):.2f}x | {r.get('prefill_amdahl_limit', 1):.2f}x | "
            f"{r['decode_b1_tok_s']:.1f} | {100 * r['decode_b1']['indexer_share']:.0f} | "
            f"{r.get('decode_b1_speedup', 1):.2f}x | {r['large_batch']} | {r['decode_large_tok_s']:.0f} | "
            f"{r['cache_bytes_per_token']} | {r['peak_memory_gib']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    several = len({r.get("select_budget_bytes") for r in result["runs"]}) > 1
    for pattern, budget in dict.fromkeys((r["pattern"], r.get("select_budget_bytes")) for r in result["runs"]):
        rs = [r for r in result["runs"] if (r["pattern"], r.get("select_budget_bytes")) == (pattern, budget)]
        name = f"{pattern}, {budget >> 20} MB pieces" if several else pattern
        ctx = [r["context"] / 1000 for r in rs]
        axes[0].plot(ctx, [r["ttft_s"] for r in rs], marker="o", label=name)
        axes[1].plot(ctx, [r["decode_b1_tok_s"] for r in rs], marker="o", label=name)
    axes[0].set(xlabel="context (K tokens)", ylabel="prefill time, TTFT (s)", title="Prefill")
    axes[1].set(xlabel="context (K tokens)", ylabel="decode throughput, batch 1 (tok/s)", title="Decode")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    m = result["model"]
    shape = m["shape"] if "n_routed_experts" not in m else f"GLM-4.7-Flash-DSA shape ({m['n_routed_experts']} experts)"
    fig.suptitle(f"{shape}, {result['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
