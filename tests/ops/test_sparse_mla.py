"""ops/sparse_mla: the reference against brute-force loops (sparse, dense, traced), the flat multi-cache op,
and the Triton kernel against the reference (CPU interpreter always; real shapes on a GPU)."""

from __future__ import annotations

import pytest
import torch
from bounds import U_BF16, U_FP32, U_TF32X3, gamma, rel
from markers import gpu, interpreter

from indexcache.ops.sparse_mla import dense_mla_fused, mla_attention, sparse_mla


def _naive_attention(q, kv, scale, d_v, keys_per_query):
    B, S, H, _ = q.shape
    out = torch.zeros(B, S, H, d_v)
    for b in range(B):
        for s in range(S):
            keys = keys_per_query(b, s)
            sel = kv[b, keys]
            for h in range(H):
                p = torch.softmax(scale * sel @ q[b, s, h], dim=0)
                out[b, s, h] = p @ sel[:, :d_v]
    return out


@pytest.mark.parametrize("budget", [1 << 30, 500])
def test_reference_against_loops(budget):
    g = torch.Generator().manual_seed(3)
    B, S, H, Dk, dv, T = 2, 6, 3, 10, 6, 9
    q, kv = torch.randn(B, S, H, Dk, generator=g), torch.randn(B, T, Dk, generator=g)
    pos = torch.arange(T - S, T)
    idx = torch.stack([torch.stack([torch.randperm(int(p) + 1, generator=g)[:4] for p in pos]) for _ in range(B)])
    idx[0, 0, 3] = -1  # an empty slot
    out, lse, probs = mla_attention(q, kv, 0.4, dv, indices=idx, return_probs=True, budget_bytes=budget)
    ref = _naive_attention(q, kv, 0.4, dv, lambda b, s: [i for i in idx[b, s].tolist() if i >= 0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert probs[0, 0, 3] == 0 and torch.allclose(probs.sum(-1), torch.ones(B, S))
    dout, dlse, dprobs = mla_attention(q, kv, 0.4, dv, q_pos=pos, return_probs=True, budget_bytes=budget)
    dref = _naive_attention(q, kv, 0.4, dv, lambda b, s: list(range(int(pos[s]) + 1)))
    torch.testing.assert_close(dout, dref, rtol=1e-5, atol=1e-5)
    assert dprobs.shape == (B, S, T) and (dprobs[0, 0, int(pos[0]) + 1:] == 0).all()
    logits = 0.4 * torch.einsum("hd,td->ht", q[1, 2], kv[1, : int(pos[2]) + 1])
    torch.testing.assert_close(dlse[1, 2], torch.logsumexp(logits, -1))  # the softmax normaliser
    # the flat op: rows cache-major, indices into each row's own cache
    fout, flse = sparse_mla(q.reshape(B * S, H, Dk), kv, idx.reshape(B * S, -1), 0.4, dv, budget)
    torch.testing.assert_close(fout.view(B, S, H, dv), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flse.view(B, S, H), lse)


@pytest.mark.parametrize("S, q_pos", [(19, None), (7, None), (7, [3, 5, 8, 10, 12, 15, 18])])
def test_fused_dense_attention_matches_the_reference_with_gradients(S, q_pos):
    g = torch.Generator().manual_seed(S)
    B, T, H, Dk, dv = 2, 19, 4, 24, 16
    q = torch.randn(B, S, H, Dk, generator=g, requires_grad=True)
    kv = torch.randn(B, T, Dk, generator=g, requires_grad=True)
    pos = None if q_pos is None else torch.tensor(q_pos)
    got = dense_mla_fused(q, kv, 0.3, dv, pos)
    want, _, _ = mla_attention(q, kv, 0.3, dv, q_pos=pos)
    # both fp32 over at most T = 19 keys, summed in another order
    assert rel(got, want) <= 1e-5
    cot = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad((got * cot).sum(), (q, kv)), torch.autograd.grad((want * cot).sum(), (q, kv)),
                    strict=True):
        assert rel(a, b) <= 1e-5


def test_dense_training_forward_takes_the_fused_path_with_the_same_loss_and_gradients(monkeypatch):
    from indexcache.model.dsa import DSAForCausalLM
    from indexcache.presets import preset_config

    model = DSAForCausalLM(preset_config("tiny")).init_random(0, std=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids, dense=True)  # no gradient wanted: the reference path
    fused = model(ids, dense=True)
    assert rel(fused.detach(), plain) <= 1e-5
    fused.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr("indexcache.model.dsa.dense_mla_fused",
                        lambda q, kv, scale, d_v, pos: mla_attention(q, kv, scale, d_v, q_pos=pos)[0])
    model(ids, dense=True).float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert rel(grads[n], p.grad) <= 1e-4, n


def test_flat_op_empty_and_out_of_range_rows():
    g = torch.Generator().manual_seed(9)
    q, kv = torch.randn(4, 2, 12, generator=g), torch.randn(2, 8, 12, generator=g)
    idx = torch.randint(0, 8, (4, 3), generator=g)
    idx[1] = -1  # nothing selected: out 0, lse -inf
    idx[2, 0] = 8  # beyond the cache counts as none
    out, lse = sparse_mla(q, kv, idx, 0.3, 8)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    ref, _ = sparse_mla(q[2:3], kv[1:2], idx[2:3, 1:], 0.3, 8)
    torch.testing.assert_close(out[2:3], ref)


@interpreter
@pytest.mark.parametrize("H,n_split", [(20, 1), (4, 3), (64, 2)])
def test_kernel_cpu(H, n_split):
    from indexcache.ops.sparse_mla.kernel import sparse_mla as kernel

    g = torch.Generator().manual_seed(H + n_split)
    DV, DR, K = 64, 16, 48
    for G, qpb, T in ((1, 5, 200), (3, 1, 50), (2, 3, 60)):  # one cache; decode; a batch of prefills
        R = G * qpb
        for dt, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):  # the interpreter's bf16 dot is not trustworthy
            q = torch.randn(R, H, DV + DR, generator=g).to(dt)
            kv = torch.randn(G, T, DV + DR, generator=g).to(dt)
            idx = torch.randint(0, T, (R, K), generator=g)
            idx[0, 10:] = -1
            if R > 2:
                idx[2] = -1  # nothing selected: out 0, lse -inf
                idx[1, 5] = T + 3  # out of range counts as none
            out, lse = kernel(q, kv, idx, 0.1, DV, n_split=n_split, block_k=16)
            ref, ref_lse = sparse_mla(q, kv, idx, 0.1, DV)
            assert rel(out, ref) <= tol
            ok = torch.isfinite(ref_lse)
            assert (lse[ok] - ref_lse[ok]).abs().max() <= 1e-4 * ref_lse[ok].abs().max()
            assert torch.isneginf(lse[~ok]).all()


@gpu
@pytest.mark.parametrize("H", [20, 64, 128])
@pytest.mark.parametrize("operands", ["bf16", "fp32 ieee", "fp32 tf32x3"])
def test_kernel_gpu(H, operands):
    """bf16 operands, fp32 logits and softmax, probabilities cast to bf16 for P @ V (once each, u = 2^-9),
    fp32 accumulation over the K selected rows. A logit off by d (its fp32 dot over Dk and the log2(e)
    scaling: d <= gamma(Dk + 2, 2^-24) sum_j |q_j k_j|) moves each normalised probability by a factor
    within exp(+-2d), so |out - ref| <= (u_bf16 + 2 d + gamma(K, 2^-24) + 2^-22 (exp2)) times
    sum_t p_t |v_t| (the same sum on magnitudes). fp32 operands keep the probabilities in fp32; under
    tf32x3 every product of both dots is off by up to U_TF32X3 more (in d, and once more for P @ V)."""
    from indexcache.ops.sparse_mla.kernel import sparse_mla as kernel
    from indexcache.ops.triton_support import fp32_dot_mode

    g = torch.Generator(device="cuda").manual_seed(H + len(operands))
    K, DV, Dk = 2048, 512, 576
    fp32, mode = operands.startswith("fp32"), operands.split()[-1]
    u_p = 0.0 if fp32 else U_BF16  # the probabilities' rounding before P @ V
    u_product = U_TF32X3 if mode == "tf32x3" else 0.0
    for G, qpb, T in ((1, 64, 8192), (3, 1, 40000)):
        R = G * qpb
        q = torch.randn(R, H, Dk, device="cuda", generator=g)
        kv = torch.randn(G, T, Dk, device="cuda", generator=g)
        if not fp32:
            q, kv = q.bfloat16(), kv.bfloat16()
        idx = torch.stack([torch.randperm(T, device="cuda", generator=g)[:K] for _ in range(R)]).int()
        idx[R - 1, 7:] = -1
        with fp32_dot_mode(mode if fp32 else "ieee"):
            out, lse = kernel(q, kv, idx, Dk**-0.5, DV)
        ref, ref_lse = sparse_mla(q.float(), kv.float(), idx, Dk**-0.5, DV)  # the same values, fp32 throughout
        # the magnitude sum: the reference's probabilities on |v|
        cache = torch.arange(R, device="cuda").div(qpb, rounding_mode="floor")
        rows = kv.float()[cache[:, None], idx.clamp_min(0).long()]
        hidden = (idx < 0)[:, None]
        logits = torch.einsum("rhd,rkd->rhk", q.float(), rows) * Dk**-0.5
        p = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
        mag = torch.einsum("rhk,rkd->rhd", p, rows[..., :DV].abs())
        logit_mag = (torch.einsum("rhd,rkd->rhk", q.float().abs(), rows.abs()) * Dk**-0.5).masked_fill(hidden, 0)
        d_logit = (gamma(Dk + 2, U_FP32) + u_product) * logit_mag.amax(-1, keepdim=True)  # [R, H, 1]
        bound = (u_p + u_product + 2 * d_logit + gamma(K, U_FP32) + 2.0**-22) * mag + 1e-30
        assert ((out - ref).abs() <= bound).all(), ((out - ref).abs() / bound).max()
        # lse moves by at most the largest logit error (the dot over Dk) plus the sum's and exp2's rounding
        lse_bound = (d_logit[..., 0] + gamma(K, U_FP32) + 2.0**-22 * ref_lse.abs() + 1e-6)
        assert ((lse - ref_lse).abs() <= lse_bound).all()
