"""The engine against the reference model: chunked and unchunked prefill logits, greedy decoding of a
batch of different lengths, IndexCache patterns, cache memory, sampling. CPU (plain ops) always; the
Triton + CUDA-graph path on a GPU."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from bounds import rel
from markers import gpu, interpreter

from indexcache.engine import Engine, sample
from indexcache.model.dsa import DSAForCausalLM
from indexcache.presets import preset_config

ROOT = Path(__file__).parent.parent


def tiny_model(seed: int = 0) -> DSAForCausalLM:
    # 16 indexer heads: exact-zero score ties (which torch.topk breaks by row length) become rare
    cfg = preset_config("tiny", kv_lora_rank=32, qk_rope_head_dim=16, index_topk=8, num_hidden_layers=4,
                        first_k_dense_replace=1, index_n_heads=16)
    return DSAForCausalLM(cfg).init_random(seed, std=0.1).eval()


def greedy_reference(model, ids: list[int], n: int, pattern: str) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device=model.device), pattern=pattern)[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("pattern", ["FFFF", "FSFS", "FSSS"])
def test_prefill_matches_model(pattern):
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (40,))
    with torch.no_grad():
        ref = model(ids[None], pattern=pattern)[0]
    for chunk in (64, 16, 7):  # unchunked, and chunks that do not divide the prompt
        eng = Engine(model, pattern, max_batch=1, max_len=64, chunk=chunk)
        out = eng.prefill(0, ids, all_logits=True)
        assert (out - ref).abs().max() <= 1e-4, chunk
        assert int(eng.lengths[0]) == 40


def recording_timer(seen: list):
    """An engine timer that records each region's (name, layer) in ``seen``."""

    @contextmanager
    def timer(name, layer):
        seen.append((name, layer))
        yield

    return timer


def test_prefill_timer_sees_every_layer_by_name_and_index():
    model = tiny_model()
    eng = Engine(model, "FSFS", max_batch=1, max_len=64, chunk=16)
    seen = []
    eng.timer = recording_timer(seen)
    ids = torch.randint(0, model.config.vocab_size, (40,))
    with torch.no_grad():
        timed = eng.prefill(0, ids)
    eng.timer = None
    # three chunks; the indexer of the Full layers 0 and 2 and every layer's attention, in layer order
    one_chunk = [("indexer", 0), ("attention", 0), ("attention", 1), ("indexer", 2), ("attention", 2),
                 ("attention", 3)]
    assert seen == one_chunk * 3
    assert torch.equal(timed, eng.prefill(0, ids))  # timing changes nothing


@pytest.mark.parametrize("pattern", ["FFFF", "FSSS"])
def test_decode_batch_matches_greedy_reference(pattern):
    model = tiny_model(1)
    ids = torch.randint(0, model.config.vocab_size, (40,))
    eng = Engine(model, pattern, max_batch=3, max_len=64, chunk=16)
    prompts = [ids[:30], ids[:11], ids[:23]]  # different lengths decode together
    out = eng.generate(prompts, max_new_tokens=6)
    for b, p in enumerate(prompts):
        assert out[b] == greedy_reference(model, p.tolist(), 6, pattern)
    assert eng.lengths[:3].tolist() == [35, 16, 28]  # prompt + 5 decode steps (the 6th token is sampled only)


@interpreter
@pytest.mark.parametrize("scoring", ["exact", "fp8"])
def test_engine_on_the_kernels_in_the_interpreter(scoring):
    # every op on its Triton kernel (indexer logits, top-k, sparse MLA, the MoE's grouped GEMM), fp32; with
    # fp8 scoring the engine keeps the fp8 indexer-K cache and the fp8 logits kernel reads it
    model = tiny_model(1)
    model.set_scoring(scoring)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    eng = Engine(model, "FSFS", max_batch=2, max_len=64, chunk=16, backend="triton")
    assert eng.fp8_index == (scoring == "fp8")
    prompts = [ids[:30], ids[:13]]
    out = eng.generate(prompts, max_new_tokens=4)
    for b, p in enumerate(prompts):
        assert out[b] == greedy_reference(model, p.tolist(), 4, "FSFS")


def test_fused_selection_in_prefill_gives_the_reference_tokens(monkeypatch):
    # every prefill chunk through the fused indexer + top-k (from 1 key): windows up to 100 keys against a
    # candidate cap of 64 and a 1/32 sample, so rows take both the candidate path and the rescored fallback
    import indexcache.engine.engine as engine_module

    fused_rows = []

    def counted(*args, **kwargs):
        stats: dict = {}
        out = engine_module.indexer_topk_fused.__wrapped__(*args, stats=stats, **kwargs)
        fused_rows.append(stats)
        return out

    counted.__wrapped__ = engine_module.indexer_topk_fused
    monkeypatch.setattr(engine_module, "indexer_topk_fused", counted)
    model = tiny_model(2)
    ids = torch.randint(0, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(3))
    eng = Engine(model, "FSFS", max_len=128, chunk=50, fused_topk_from=1)
    assert eng.generate([ids], max_new_tokens=4)[0] == greedy_reference(model, ids.tolist(), 4, "FSFS")
    assert len(fused_rows) == 2 * 2  # two chunks x two Full layers; decode stays unfused
    # the second chunk's windows hold 51-100 keys (75.5 on average): fewer candidates than keys left the
    # scoring, and some rows, misled by their four sampled keys, were rescored whole
    assert all(st["mean_candidates"] < 75 for st in fused_rows[2:])
    assert sum(st["fallback_rows"] for st in fused_rows) > 0
    assert Engine(model, "FSFS", max_len=128).fused_topk_from is None  # the default: never (none measured to win)


def test_decode_logits_match_model():
    model = tiny_model(2)
    ids = torch.randint(0, model.config.vocab_size, (33,))
    eng = Engine(model, "FSFS", max_batch=1, max_len=64, chunk=8)
    eng.prefill(0, ids[:30])
    for t in range(30, 33):
        logits = eng.decode(ids[t : t + 1])[0]
        with torch.no_grad():
            ref = model(ids[None, : t + 1], pattern="FSFS")[0, -1]
        assert (logits - ref).abs().max() <= 1e-4


def test_cache_memory_quarter_pattern():
    """Latent cache on every layer, indexer-K cache on Full layers only: with 1/4 of the layers Full the
    cache holds the latents plus a quarter of the all-Full indexer cache."""
    cfg = preset_config("small")  # 16 layers
    model = DSAForCausalLM(cfg).eval()
    full = Engine(model, "F" * 16, max_batch=2, max_len=128)
    quarter = Engine(model, "FSSS" * 4, max_batch=2, max_len=128)

    def allocated(eng):  # bytes actually held by the cache tensors, per token slot
        t = list(eng.latent) + list(eng.index_k.values())
        return sum(x.numel() * x.element_size() for x in t) / (2 * 128)

    el = torch.tensor([], dtype=model.dtype).element_size()
    latent = 16 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * el
    index_all = 16 * cfg.index_head_dim * el
    assert allocated(full) == full.cache_bytes_per_token == latent + index_all
    assert allocated(quarter) == quarter.cache_bytes_per_token == latent + index_all / 4
    assert len(quarter.index_k) == 4


@pytest.mark.parametrize("pattern,layers", [("FFFF", 2), ("FFSF", 3), ("FSFS", 2)])
def test_warm_up_runs_every_chunk_through_the_first_layers_and_leaves_nothing(pattern, layers):
    model = tiny_model()  # layer 0 dense, layers 1-3 MoE
    ids = torch.randint(0, model.config.vocab_size, (40,))
    fresh = Engine(model, pattern, max_batch=2, max_len=64, chunk=16)
    with torch.no_grad():
        expected = fresh.prefill(1, ids)
    eng = Engine(model, pattern, max_batch=2, max_len=64, chunk=16)
    seen = []
    eng.timer = recording_timer(seen)
    eng.selections = []
    assert eng.warm_up_layers() == layers  # through the first Full, Shared and MoE layer
    secs = eng.warm_up(50, slot=1)
    eng.timer = None
    assert eng.selections == []  # the warm-up records no selections
    eng.selections = None
    assert secs >= 0.0
    # four chunks of a 50-token prompt, each through the first `layers` layers only
    assert [layer for name, layer in seen if name == "attention"] == list(range(layers)) * 4
    assert int(eng.lengths[1]) == 0
    with torch.no_grad():  # the warmed engine answers as a fresh one
        assert torch.equal(eng.prefill(1, ids), expected)
    with pytest.raises(ValueError, match="max_len"):
        eng.warm_up(65)
    with pytest.raises(ValueError, match="slot"):
        eng.warm_up(8, slot=2)


def test_selection_budget_changes_pieces_not_choices():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (40,))
    with torch.no_grad():
        ref = Engine(model, "FSFS", max_batch=1, max_len=64, chunk=16).prefill(0, ids, all_logits=True)
        # 64 bytes: one query row a piece (each row's logits and the top-k's copy take 8 bytes a key)
        small = Engine(model, "FSFS", max_batch=1, max_len=64, chunk=16, select_budget_bytes=64)
        assert (small.prefill(0, ids, all_logits=True) - ref).abs().max() <= 1e-4  # the same selections
    with pytest.raises(ValueError, match="select_budget_bytes"):
        Engine(model, "FSFS", max_len=16, select_budget_bytes=0)


def test_engine_rejects_bad_input():
    model = tiny_model()
    eng = Engine(model, "FFFF", max_batch=1, max_len=16)
    with pytest.raises(ValueError, match="max_len"):
        eng.prefill(0, torch.zeros(17, dtype=torch.long))
    with pytest.raises(ValueError, match="slot"):
        eng.prefill(1, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_batch"):
        eng.generate([torch.zeros(3, dtype=torch.long)] * 2, max_new_tokens=2)
    with pytest.raises(Exception, match="Shared|Full"):
        Engine(model, "SFFF")


def test_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, 0.0, 0.0, 2.9]])
    assert sample(logits).tolist() == [1, 0]
    # top_k=1 and tiny top_p are greedy whatever the temperature
    assert sample(logits, temperature=5.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample(logits, temperature=5.0, top_p=1e-6, generator=g).tolist() == [1, 0]
    # top_k=2 never draws outside the two best
    draws = torch.stack([sample(logits, temperature=10.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) <= {1, 2} and set(draws[:, 1].tolist()) <= {0, 3}
    assert len(set(draws[:, 1].tolist())) == 2  # and does sample both


# ------------------------------------------------------------------------------------------ GPU
@gpu
def test_engine_gpu_bundled_model():
    """Triton kernels + CUDA graphs on the bundled model: in bf16, prefill logits chunked and unchunked
    no further from the fp32 forward than twice the bf16 plain-op forward is (plus 1e-3): a bound set by
    the dtype, the same on any GPU; in fp32 (where rounding cannot flip a close argmax),
    with the reference breaking exact index-score ties as the kernels do (lowest index), identical greedy
    tokens for a batch of two prompts, all-Full and 1/4."""
    from indexcache import load_model
    from indexcache.data.text import load_tokenizer

    path = ROOT / "models" / "dsa-mini"
    if not path.exists():
        pytest.skip("bundled model missing")
    tok = load_tokenizer(path)
    ids = torch.tensor(tok.encode((ROOT / "README.md").read_text()).ids[:1500], device="cuda")
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    model32 = load_model(path, dtype=torch.float32, device="cuda")
    for pattern in ("F" * 16, "FSSS" * 4):
        with torch.no_grad():
            ref = model(ids[None], pattern=pattern)[0].float()
            ref32 = model32(ids[None], pattern=pattern)[0]
        for chunk in (2048, 512):
            eng = Engine(model, pattern, max_batch=2, max_len=2048, chunk=chunk)
            out = eng.prefill(0, ids, all_logits=True).float()
            assert rel(out, ref32) <= 2 * rel(ref, ref32) + 1e-3, (chunk, rel(out, ref32), rel(ref, ref32))
    model32.set_tie_break("lowest")
    for pattern in ("F" * 16, "FSSS" * 4):
        eng = Engine(model32, pattern, max_batch=2, max_len=2048, chunk=512)
        prompts = [ids[:1200], ids[:700]]
        got = eng.generate(prompts, max_new_tokens=16)
        assert eng._graphs, "the decode step was not captured"
        for b, p in enumerate(prompts):
            assert got[b] == greedy_reference(model32, p.tolist(), 16, pattern), (pattern, b)


def test_fp8_indexer_cache_is_the_fp8_indexer_exactly():
    """The fp8 indexer-K cache (e4m3 keys, one power-of-two scale per token) selects what the model's own
    fp8 scoring selects from a full-width cache, bit for bit (the scales are powers of two, so folding them
    into the gates changes no rounding), through prefill and batched decode, in about a third of the
    indexer cache's bytes."""
    from indexcache import load_model
    from indexcache.bundled import default_model

    model = load_model(default_model(), verbose=False)
    model.set_scoring("fp8")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in (700, 520)]

    def run(fp8: bool):
        e = Engine(model, max_batch=2, max_len=800, chunk=256, backend="torch", fp8_index_cache=fp8)
        e.selections = chosen = []
        first = torch.stack([e.prefill(s, p) for s, p in enumerate(prompts)])
        steps = [e.decode(first.argmax(-1))]
        steps.append(e.decode(steps[-1].argmax(-1)))
        return e, chosen, torch.stack([first, *steps])

    wide, a, la = run(False)
    fp8, b, lb = run(True)
    assert fp8.index_k[0].dtype == torch.float8_e4m3fn and fp8.scoring == "fp8"
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    D = model.config.index_head_dim
    assert fp8.spec.index_bytes_per_token * 4 * D == wide.spec.index_bytes_per_token * (D + 4)
    with pytest.raises(ValueError, match="index_head_dim must be <= 128"):
        big = DSAForCausalLM(preset_config("tiny", "deepseek_v32", index_head_dim=256))
        Engine(big, fp8_index_cache=True, backend="torch")


def test_decode_families_run_without_disturbing_the_engine():
    """The benchmark's per-family decode work (each family captured in its own graph on a GPU) runs on
    inputs of the step's shapes and leaves the engine's caches as they were: a decode afterwards gives the
    same logits as without it."""
    from indexcache.bench.e2e import decode_families

    model = tiny_model(2)
    ids = torch.randint(0, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    a = Engine(model, "FSFS", max_batch=2, max_len=64, chunk=16)
    b = Engine(model, "FSFS", max_batch=2, max_len=64, chunk=16)
    for eng in (a, b):
        eng.prefill(0, ids)
        eng.prefill(1, ids[:17])
    families = decode_families(a, 2)
    assert set(families) == {"norms", "projections", "indexer", "attention", "output_projection", "mlp_moe",
                             "lm_head"}
    with torch.no_grad():
        for fn in families.values():
            fn()
    tok = torch.tensor([5, 9])
    torch.testing.assert_close(a.decode(tok), b.decode(tok), rtol=0, atol=0)
