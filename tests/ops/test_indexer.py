"""ops/indexer: the reference logits against brute-force loops, the chunked causal top-k built on them, and
the Triton kernel against the reference (CPU interpreter always; real shapes on a GPU). Fresh random
inputs everywhere."""

from __future__ import annotations

import pytest
import torch
from bounds import U_FP8_ACCUMULATE, U_FP32, U_TF32X3, gamma
from markers import gpu, interpreter

from indexcache.ops.common import window_mask
from indexcache.ops.indexer import causal_windows, dense_scores, indexer_logits, indexer_topk


def _naive_logits(q, k, w, ks, ke, scale, k_scale=None):
    """logits[r, t] = sum_h w[r,h] relu(scale q[r,h].k[g,t]) k_scale[g,t] by loops, rows cache-major."""
    R, H, _ = q.shape
    G, T = k.shape[:2]
    out = torch.full((R, T), float("-inf"))
    for r in range(R):
        g = r // (R // G)
        for t in range(int(ks[r]), int(ke[r])):
            s = sum(w[r, h] * torch.relu(scale * q[r, h] @ k[g, t]) for h in range(H))
            out[r, t] = s * (1.0 if k_scale is None else k_scale[g, t])
    return out


def _windows(R: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ke = torch.randint(1, T + 1, (R,), generator=g)
    ks = (ke - torch.randint(0, T, (R,), generator=g)).clamp_min(0)
    ks[0], ke[0] = 0, T  # a full row
    ke[1] = ks[1]  # an empty window
    return ks.int(), ke.int()


# ------------------------------------------------------------------------------------------ reference
def test_reference_logits_against_loops():
    g = torch.Generator().manual_seed(0)
    G, qpb, H, D, T = 2, 5, 3, 8, 12
    q, k = torch.randn(G * qpb, H, D, generator=g), torch.randn(G, T, D, generator=g)
    w = torch.randn(G * qpb, H, generator=g)
    ks, ke = _windows(G * qpb, T, g)
    sc = torch.rand(G, T, generator=g) + 0.5
    for k_scale in (None, sc):
        ref = _naive_logits(q, k, w, ks, ke, 0.3, k_scale)
        for budget in (1 << 30, 300):  # one chunk, and one query row at a time
            got = indexer_logits(q, k, w, ks, ke, 0.3, k_scale, budget_bytes=budget)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dense_scores_are_causal_and_differentiable():
    g = torch.Generator().manual_seed(4)
    B, S, H, D, T = 2, 7, 3, 8, 12
    q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    w, k = torch.randn(B, S, H, generator=g), torch.randn(B, T, D, generator=g)
    pos = torch.arange(T - S, T)  # the last S tokens of a T-token sequence (a later prefill chunk)
    scores = dense_scores(q, w, k, 0.3, pos)
    ks, ke = causal_windows(pos, B)
    ref = _naive_logits(q.detach().reshape(B * S, H, D), k, w.reshape(B * S, H), ks, ke, 0.3).view(B, S, T)
    torch.testing.assert_close(scores.detach(), ref, rtol=1e-5, atol=1e-5)
    scores.masked_fill(scores.isinf(), 0).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_topk_against_loops_and_windows_shorter_than_k():
    g = torch.Generator().manual_seed(1)
    G, S, H, D = 2, 10, 2, 8
    q, w = torch.randn(G * S, H, D, generator=g), torch.rand(G * S, H, generator=g)
    k = torch.randn(G, S, D, generator=g)
    ks, ke = causal_windows(torch.arange(S), G)
    ref = _naive_logits(q, k, w, ks, ke, 1.0)
    idx = indexer_topk(q, k, w, ks, ke, 6)
    assert idx.shape == (G * S, 6) and idx.dtype == torch.long
    for r in range(G * S):
        row = idx[r].tolist()
        valid = [i for i in row if i >= 0]
        s = r % S
        assert len(valid) == min(6, s + 1) and row[len(valid):] == [-1] * (6 - len(valid))
        assert set(valid) == set(ref[r].topk(min(6, s + 1)).indices.tolist())
    assert indexer_topk(q, k, w, ks, ke, 50).shape == (G * S, S)  # k larger than the cache: K = T columns


@pytest.mark.parametrize("budget", [1 << 30, 600, 100])
def test_topk_independent_of_chunking(budget):
    g = torch.Generator().manual_seed(2)
    G, S, H, D = 2, 33, 4, 16
    q, w = torch.randn(G * S, H, D, generator=g), torch.randn(G * S, H, generator=g)
    k = torch.randn(G, S, D, generator=g)
    ks, ke = causal_windows(torch.arange(S), G)
    ref = indexer_topk(q, k, w, ks, ke, 5, 0.25)
    assert torch.equal(indexer_topk(q, k, w, ks, ke, 5, 0.25, budget_bytes=budget), ref)
    assert torch.equal(indexer_topk(q, k, w, ks, ke, 5, 0.25, trim=False), ref)


def test_topk_with_an_attention_mask():
    """A bool mask hides keys; an additive mask shifts scores and hides its minimum, as transformers does."""
    g = torch.Generator().manual_seed(6)
    G, S, H, D = 2, 9, 2, 8
    q, w = torch.randn(G * S, H, D, generator=g), torch.rand(G * S, H, generator=g)
    k = torch.randn(G, S, D, generator=g)
    ks, ke = causal_windows(torch.arange(S), G)
    vis = torch.rand(G, S, S, generator=g) > 0.3
    vis[:, :, 0] = True
    idx = indexer_topk(q, k, w, ks, ke, 3, mask=vis, budget_bytes=200)
    logits = _naive_logits(q, k, w, ks, ke, 1.0).view(G, S, S).masked_fill(~vis, float("-inf")).view(G * S, S)
    for r in range(G * S):
        n = int(torch.isfinite(logits[r]).sum())
        assert set(i for i in idx[r].tolist() if i >= 0) == set(logits[r].topk(min(3, n)).indices.tolist())
    add = torch.randn(1, S, S, generator=g)
    add[0, :, 1] = torch.finfo(torch.float32).min
    idx = indexer_topk(q, k, w, ks, ke, 3, mask=add)
    assert not (idx == 1).any()


@interpreter
# -------------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("H,D", [(16, 32), (4, 16), (32, 16)])
@pytest.mark.parametrize("key_major", [True, False])
def test_kernel_logits_cpu(H, D, key_major):
    """The kernel in the interpreter, one cache and several (rows of one cache per program)."""
    from indexcache.ops.indexer.kernel import indexer_logits as kernel

    g = torch.Generator().manual_seed(H * 7 + D + key_major)
    for G, qpb, T in ((1, 19, 150), (3, 6, 70), (4, 1, 90)):
        R = G * qpb
        for dt, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):  # the interpreter's bf16 dot is not trustworthy
            q, k = torch.randn(R, H, D, generator=g).to(dt), torch.randn(G, T, D, generator=g).to(dt)
            w = torch.rand(R, H, generator=g)
            ks, ke = _windows(R, T, g)
            for k_scale in (None, torch.rand(G, T, generator=g) + 0.5):
                out = kernel(q, k, w, ks, ke, 0.7, k_scale, block_n=32, key_major=key_major)
                ref = indexer_logits(q, k, w, ks, ke, 0.7, k_scale)
                m = window_mask(ks, ke, T)
                assert torch.isfinite(out[m]).all() and torch.isneginf(out[~m]).all()
                assert ((out[m] - ref[m]).norm() / ref[m].norm()).item() <= tol


def test_fp32_tiles_hold_at_most_64_query_heads():
    """fp32 (IEEE dots, the accumulator in registers) takes 16 queries a tile at 4 heads x 64 dims, the
    fastest measured on the H200; 16-bit operands keep 256 query-heads; a tile still divides the queries of
    one cache, and a given block_q is kept."""
    from indexcache.ops.indexer.kernel import _block_q

    assert _block_q(2048, 4, 4, 64, None) == 16 and _block_q(2048, 4, 2, 64, None) == 64
    assert _block_q(2048, 64, 4, 128, None) == 1 and _block_q(4096, 64, 2, 128, None) == 4
    assert _block_q(24, 4, 4, 64, None) == 8 and _block_q(2048, 4, 4, 64, 64) == 64


@interpreter
def test_kernel_rejects_bad_input():
    from indexcache.ops.indexer.kernel import indexer_logits as kernel

    q = torch.randn(4, 16, 32)
    z, o = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="head dims"):
        kernel(q, torch.randn(1, 10, 16), torch.rand(4, 16), z, o)
    with pytest.raises(ValueError, match="power-of-two"):
        kernel(torch.randn(4, 12, 32), torch.randn(1, 10, 32), torch.rand(4, 12), z, o)
    with pytest.raises(ValueError, match="fp32"):
        kernel(q, torch.randn(1, 10, 32), torch.rand(4, 16).half(), z, o)
    with pytest.raises(ValueError, match="split evenly"):
        kernel(q, torch.randn(3, 10, 32), torch.rand(4, 16), z, o)


@interpreter
def test_triton_backend_topk_matches_torch_cpu():
    """The composite on the kernels selects the reference's sets, exact ties aside (none here: 16 heads)."""
    g = torch.Generator().manual_seed(8)
    G, S, H, D = 2, 40, 16, 16
    q, w = torch.randn(G * S, H, D, generator=g), torch.rand(G * S, H, generator=g)
    k = torch.randn(G, S, D, generator=g)
    ks, ke = causal_windows(torch.arange(S), G)
    a = indexer_topk(q, k, w, ks, ke, 8, backend="torch").sort(-1).values
    b = indexer_topk(q, k, w, ks, ke, 8, backend="triton", budget_bytes=4000).sort(-1).values
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------ GPU, real shapes
def _magnitude(q, k, w, ks, ke, scale, k_scale=None):
    """The same sums on absolute values: what the accumulation error is proportional to."""
    return indexer_logits(q.float().abs(), k.float().abs(), w.abs(), ks, ke, abs(scale),
                          None if k_scale is None else k_scale.abs())


@gpu
@pytest.mark.parametrize("H,D", [(64, 128), (32, 128), (16, 64)])
def test_kernel_logits_gpu(H, D):
    """bf16 and fp32 operands accumulate in fp32: |kernel - reference| <= gamma(D + H + 2, 2^-24) times the
    sums of magnitudes (dot over D, head sum over H, two scalings). fp8 accumulates with ~14 bits:
    gamma(D, 2^-14) for the dot, then fp32."""
    from indexcache.ops.indexer.kernel import indexer_logits as kernel
    from indexcache.ops.indexer.kernel import quantize_fp8_per_token

    g = torch.Generator(device="cuda").manual_seed(H + D)
    for G, qpb, T in ((1, 1024, 6000), (4, 256, 3000), (4, 1, 70000)):
        R = G * qpb
        q = torch.randn(R, H, D, device="cuda", generator=g).bfloat16()
        k = torch.randn(G, T, D, device="cuda", generator=g).bfloat16()
        w = torch.rand(R, H, device="cuda", generator=g)
        ke = torch.randint(1, T + 1, (R,), device="cuda", generator=g, dtype=torch.int32)
        ks = (ke - 4000).clamp_min(0)
        m = window_mask(ks, ke, T)
        scale = D**-0.5
        for qq, kk in ((q, k), (q.float(), k.float())):
            out = kernel(qq, kk, w, ks, ke, scale)
            ref = indexer_logits(qq, kk, w, ks, ke, scale)
            bound = gamma(D + H + 2, U_FP32) * _magnitude(qq, kk, w, ks, ke, scale) + 1e-30
            assert ((out - ref).abs()[m] <= bound[m]).all() and torch.isneginf(out[~m]).all()
        q8, qs = quantize_fp8_per_token(q.float())
        k8, ksc = quantize_fp8_per_token(k.float())
        out8 = kernel(q8, k8, w * qs, ks, ke, scale, ksc)
        ref8 = indexer_logits(q8, k8, w * qs, ks, ke, scale, ksc)
        mag8 = _magnitude(q8, k8, w * qs, ks, ke, scale, ksc)
        bound8 = (gamma(D, U_FP8_ACCUMULATE) + gamma(H + 3, U_FP32)) * mag8 + 1e-30
        assert ((out8 - ref8).abs()[m] <= bound8[m]).all()


@gpu
@pytest.mark.parametrize("H,D", [(4, 64), (64, 128)])
@pytest.mark.parametrize("mode", ["ieee", "tf32x3"])
def test_kernel_fp32_logits_gpu_in_each_fp32_dot(H, D, mode):
    """fp32 operands that are not bf16 values (tf32x3 would multiply those exactly): each product is off by
    at most U_TF32X3 of its magnitude under tf32x3 and exact under ieee, then the fp32 sums of
    test_kernel_logits_gpu. 4 heads x 64 dims is the bundled model's indexer."""
    from indexcache.ops.indexer.kernel import indexer_logits as kernel
    from indexcache.ops.triton_support import fp32_dot_mode

    g = torch.Generator(device="cuda").manual_seed(H + D + len(mode))
    u_product = U_TF32X3 if mode == "tf32x3" else 0.0
    for G, qpb, T in ((1, 2048, 32768), (4, 1, 70000)):
        R = G * qpb
        q = torch.randn(R, H, D, device="cuda", generator=g)
        k = torch.randn(G, T, D, device="cuda", generator=g)
        w = torch.rand(R, H, device="cuda", generator=g)
        ke = torch.randint(1, T + 1, (R,), device="cuda", generator=g, dtype=torch.int32)
        ks = (ke - 20000).clamp_min(0)
        m = window_mask(ks, ke, T)
        scale = D**-0.5
        with fp32_dot_mode(mode):
            out = kernel(q, k, w, ks, ke, scale)
        ref = indexer_logits(q, k, w, ks, ke, scale)
        bound = (u_product + gamma(D + H + 2, U_FP32)) * _magnitude(q, k, w, ks, ke, scale) + 1e-30
        assert ((out - ref).abs()[m] <= bound[m]).all() and torch.isneginf(out[~m]).all()


@gpu
def test_triton_backend_topk_gpu():
    """The chunked top-k on the kernels, a GPU prefill shape: the same sets as the reference up to
    near-ties (within the accumulation bound of the logits)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    G, S, H, D = 2, 4096, 64, 128
    q = torch.randn(G * S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(G, S, D, device="cuda", generator=g).bfloat16()
    w = torch.rand(G * S, H, device="cuda", generator=g)
    ks, ke = causal_windows(torch.arange(S, device="cuda"), G)
    a = indexer_topk(q, k, w, ks, ke, 2048, D**-0.5, backend="torch")
    b = indexer_topk(q, k, w, ks, ke, 2048, D**-0.5, backend="triton")
    logits = indexer_logits(q, k, w, ks, ke, D**-0.5)
    tol = gamma(D + H + 2, U_FP32) * _magnitude(q, k, w, ks, ke, D**-0.5)
    for r in range(0, G * S, 97):
        x, y = set(a[r].tolist()) - {-1}, set(b[r].tolist()) - {-1}
        assert len(x) == len(y)
        kth = logits[r, list(x)].min()
        for i in x ^ y:
            assert (logits[r, i] - kth).abs() <= 2 * tol[r, i], (r, i)


def _fused_case(seed: int, G: int = 2, qpb: int = 24, T: int = 2000, H: int = 4, D: int = 32):
    g = torch.Generator().manual_seed(seed)
    R = G * qpb
    q, k, w = torch.randn(R, H, D, generator=g), torch.randn(G, T, D, generator=g), torch.rand(R, H, generator=g)
    ke = torch.randint(1, T + 1, (R,), generator=g, dtype=torch.int32)
    ke[:3] = torch.tensor([20, 100, 130], dtype=torch.int32)  # shorter than k; within cap; just above
    ks = (ke - torch.randint(0, T, (R,), generator=g, dtype=torch.int32)).clamp_min(0)
    return q, k, w, ks, ke


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> int:
    return sum(set(x.tolist()) != set(y.tolist()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mislead", ["none", "sampled keys high", "unsampled keys high"])
def test_fused_topk_selects_what_the_logits_select(mislead):
    from indexcache.ops.indexer import indexer_topk_fused

    q, k, w, ks, ke = _fused_case(7)
    stride, K = 4, 48  # a sample of a quarter: its thresholds land between k and cap for most rows
    sampled = torch.zeros(k.shape[1], dtype=torch.bool)
    sampled[::stride] = True
    if mislead == "sampled keys high":  # the sample's threshold is too high: fewer than k keys reach it
        k[:, sampled] *= 4
    elif mislead == "unsampled keys high":  # too low: more than cap keys reach it
        k[:, ~sampled] *= 4
    stats: dict = {}
    got = indexer_topk_fused(q, k, w, ks, ke, K, 0.5, stride=stride, stats=stats)
    want = indexer_topk(q, k, w, ks, ke, K, 0.5)
    assert _same_sets(got, want) == 0  # continuous random scores: no exact ties
    if mislead == "none":
        assert stats["fallback_rows"] <= 0.1 * stats["rows"]
    else:
        assert stats["fallback_rows"] > 0


@interpreter
def test_fused_topk_on_the_kernels_in_the_interpreter():
    from indexcache.ops.indexer import indexer_topk_fused
    from indexcache.ops.indexer.kernel import indexer_candidates
    from indexcache.ops.indexer.reference import indexer_candidates as reference_candidates

    q, k, w, ks, ke = _fused_case(8, T=900)
    logits = indexer_logits(q, k, w, ks, ke, 0.5)
    srt = logits.sort(-1, descending=True).values
    tau = (srt[:, 30] + srt[:, 31]) / 2  # between two logits: no rounding decides membership
    for cand in (indexer_candidates, reference_candidates):
        values, keys, count = cand(q, k, w, ks, ke, tau, 64, 0.5)
        for r in range(q.shape[0]):
            # a window of at most 31 keys has tau = -inf: all of its keys, none outside it
            want = set(((logits[r] >= tau[r]) & logits[r].isfinite()).nonzero().flatten().tolist())
            c = int(count[r])
            assert c == len(want) and set(keys[r, : min(c, 64)].tolist()) <= want
            if c <= 64:
                assert set(keys[r, :c].tolist()) == want
                torch.testing.assert_close(values[r, :c], logits[r, keys[r, :c].long()], rtol=1e-5, atol=1e-6)
    stats: dict = {}
    got = indexer_topk_fused(q, k, w, ks, ke, 40, 0.5, backend="triton", stride=16, stats=stats)
    assert _same_sets(got, indexer_topk(q, k, w, ks, ke, 40, 0.5)) == 0 and stats["rows"] == q.shape[0]


@gpu
def test_fused_topk_on_gpu_selects_what_the_kernels_select():
    """A prefill chunk at the real shapes (64 heads x 128, top-2048 of 64K keys, fp8 and bf16): the fused
    path's values come from the same kernel arithmetic as the logits, so the sets agree except among keys
    whose logits tie exactly."""
    from indexcache.ops.indexer import indexer_topk_fused
    from indexcache.ops.indexer.kernel import quantize_fp8_per_token

    g = torch.Generator(device="cuda").manual_seed(4)
    S, N, H, D, K = 1024, 65536, 64, 128, 2048
    q = torch.randn(S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, N, D, device="cuda", generator=g).bfloat16()
    w = torch.rand(S, H, device="cuda", generator=g) * D**-0.5
    ke = torch.arange(N - S + 1, N + 1, device="cuda", dtype=torch.int32)
    ks = torch.zeros_like(ke)
    for fp8 in (False, True):
        qq, kk, ww, sc = q, k, w, None
        if fp8:
            qq, qs = quantize_fp8_per_token(q)
            kk, sc = quantize_fp8_per_token(k[0])
            kk, sc, ww = kk[None], sc[None], w * qs
        stats: dict = {}
        got = indexer_topk_fused(qq, kk, ww, ks, ke, K, backend="triton", k_scale=sc, stats=stats)
        want = indexer_topk(qq, kk, ww, ks, ke, K, backend="triton", k_scale=sc)
        logits = indexer_logits(qq, kk, ww, ks, ke, 1.0, sc)
        for r in range(0, S, 61):
            x, y = set(got[r].tolist()), set(want[r].tolist())
            kth = logits[r, list(y)].min()
            assert all(logits[r, i] == kth for i in x ^ y), r
        assert stats["fallback_rows"] <= 0.01 * S
