"""The model on the Triton kernels against the model on the plain ops (``model.set_backend``): the same
top-k sets up to near-ties and the same logits, in the CPU interpreter and on the bundled model on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bounds import rel
from markers import gpu, interpreter

from indexcache.model.dsa import DSAForCausalLM, Trace
from indexcache.presets import preset_config


def same_sets_modulo_ties(idx: torch.Tensor, ref_idx: torch.Tensor, scores: torch.Tensor, tol: float) -> None:
    """Row by row: the same number of valid indices, and where the sets differ, every differing element lies
    within ``tol`` (relative) of the row's k-th selected score."""
    for r in range(idx.shape[0]):
        a = set(idx[r].tolist()) - {-1}
        b = set(ref_idx[r].tolist()) - {-1}
        assert len(a) == len(b) == int((idx[r] >= 0).sum()), f"row {r}: {len(a)} vs {len(b)} indices (or repeats)"
        if a != b:
            kth = scores[r, list(b)].min().item()
            for i in a ^ b:
                assert abs(scores[r, i].item() - kth) <= tol * max(1.0, abs(kth)), f"row {r}: index {i} is no tie"


def _kernel_model(seed: int = 0) -> DSAForCausalLM:
    # 16 indexer heads: a score of exactly 0 (every head's ReLU off, a tie that torch.topk and the kernel
    # may break differently, after which the two forwards legitimately diverge) becomes rare
    cfg = preset_config("tiny", kv_lora_rank=32, qk_rope_head_dim=16, index_topk=8, num_hidden_layers=4,
                        first_k_dense_replace=1, index_n_heads=16)
    return DSAForCausalLM(cfg).init_random(seed, std=0.1).eval()


@interpreter
def test_model_backend_cpu():
    model = _kernel_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    for pattern in ("FFFF", "FSFS"):
        tr_ref = Trace(indices=True, index_scores=True)
        tr_tri = Trace(indices=True)
        with torch.no_grad():
            model.set_backend("torch")
            ref = model(ids, pattern=pattern, trace=tr_ref)
            model.set_backend("triton")
            out = model(ids, pattern=pattern, trace=tr_tri)
        model.set_backend("torch")
        for layer in range(4):
            a, b = tr_tri.records[layer].indices, tr_ref.records[layer].indices
            for bi in range(2):
                same_sets_modulo_ties(a[bi], b[bi], tr_ref.records[tr_ref.records[layer].source].index_scores[bi],
                                      tol=1e-5)
        assert rel(out, ref) <= 1e-4


@interpreter
def test_model_backend_cpu_exact_ties():
    """4 indexer heads: scores of exactly 0 tie often at the top-k boundary. With the plain path breaking
    ties toward the lowest index, as the kernel does, the two backends select identical sets."""
    cfg = preset_config("tiny", kv_lora_rank=32, qk_rope_head_dim=16, index_topk=8, num_hidden_layers=4,
                        first_k_dense_replace=1)
    model = DSAForCausalLM(cfg).init_random(3, std=0.1).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    tr_ref, tr_tri = Trace(indices=True, index_scores=True), Trace(indices=True)
    with torch.no_grad():
        model.set_tie_break("lowest")
        ref = model(ids, trace=tr_ref)
        model.set_backend("triton")
        out = model(ids, trace=tr_tri)
    zeros = sum(int((tr_ref.records[i].index_scores == 0).sum()) for i in range(4))
    assert zeros > 50  # the case this test is about
    for i in range(4):
        a = tr_tri.records[i].indices[0].sort(-1).values
        b = tr_ref.records[i].indices[0].sort(-1).values
        assert torch.equal(a, b)
    assert rel(out, ref) <= 1e-5


def test_backend_switch_errors():
    model = _kernel_model()
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("cuda")
    with pytest.raises(ValueError, match="tie break"):
        model.set_tie_break("random")


@gpu
def test_model_backend_gpu_bundled():
    """The bundled model in bf16 on the kernels against the plain ops in bf16, both against fp32: the kernels
    may not add more error than bf16 itself brings (twice the plain path's distance from fp32, plus 1e-3:
    a bound that moves with the dtype, not with the GPU). The selected sets agree up to near-ties at every
    Full layer's own input: 1e-4 of the k-th score for exact scoring (summation order), 1e-2 for fp8 (its
    tensor cores accumulate with ~14 bits)."""
    from indexcache import load_model
    from indexcache.ops.indexer import causal_windows, indexer_logits, indexer_topk

    path = Path(__file__).parent.parent / "models" / "dsa-mini"
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    model32 = load_model(path, dtype=torch.float32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda", generator=g)
    for scoring in ("exact", "fp8"):
        model.set_scoring(scoring)
        model32.set_scoring(scoring)
        inputs: dict[int, tuple] = {}
        hooks = [layer.self_attn.register_forward_pre_hook(lambda mod, args, i=i, d=inputs: d.__setitem__(i, args))
                 for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model.set_backend("torch")
            ref = model(ids).float()
            for h in hooks:
                h.remove()
            for i, (x, ctx, *_rest) in inputs.items():
                attn = model.model.layers[i].self_attn
                qr, _, _ = attn.latents(x, ctx)
                q, w, k = attn.indexer.project(x, qr, ctx)
                B, S, H, D = q.shape
                ks, ke = causal_windows(ctx.slots, B)
                args = (q.reshape(B * S, H, D), k, w.reshape(B * S, H), ks, ke)
                scale, topk_ = attn.indexer.softmax_scale, attn.indexer.topk
                ref_idx = indexer_topk(*args, topk_, scale, backend="torch")
                idx = indexer_topk(*args, topk_, scale, backend="triton", fp8=scoring == "fp8")
                scores = indexer_logits(*args, scale)
                same_sets_modulo_ties(idx.cpu(), ref_idx.cpu(), scores.cpu(), tol=1e-4 if scoring == "exact" else 1e-2)
            model.set_backend("triton")
            out = model(ids).float()
            full = model32(ids).float()
        model.set_backend("torch")
        assert rel(out, full) <= 2 * rel(ref, full) + 1e-3, (scoring, rel(out, full), rel(ref, full))
