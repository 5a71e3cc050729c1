"""The MoE router kernel against its reference (the model's Gate math), in the interpreter."""

import pytest
import torch
from markers import gpu, interpreter

from indexcache.ops.router.reference import route as reference


def _inputs(g, N, D, E, dtype=torch.float32, device="cpu"):
    x = torch.randn(N, D, generator=g).to(device, dtype)
    w = (torch.randn(E, D, generator=g) * D**-0.5).to(device, dtype)
    bias = (torch.randn(E, generator=g) * 0.1).to(device)
    return x, w, bias


def _check(got, want, tol):
    (gw, gi), (rw, ri) = got, want
    # the same experts in the same order (the scores differ by rounding only, so no near-tie flips here)
    assert torch.equal(gi, ri), (gi, ri)
    assert torch.allclose(gw, rw, atol=tol, rtol=tol)


@interpreter
@pytest.mark.parametrize("N,D,E,k,G,TG,norm", [
    (5, 96, 16, 4, 1, 1, True),     # GLM-4.7-Flash-like: one group, k=4
    (3, 64, 32, 8, 8, 4, True),     # DeepSeek-V3-like: 8 groups of 4, the best 4 groups kept
    (4, 40, 8, 3, 1, 1, False),     # k not a power of two; no normalisation; D not a multiple of the block
    (2, 48, 16, 2, 4, 1, True),     # one group kept: both experts from it
])
def test_kernel_routes_like_the_reference(N, D, E, k, G, TG, norm):
    from indexcache.ops.router.kernel import route

    g = torch.Generator().manual_seed(N * 100 + E)
    x, w, bias = _inputs(g, N, D, E)
    # fp32 products over D terms in another order: scores agree to a few units of fp32 roundoff
    _check(route(x, w, bias, k, G, TG, norm, 2.5), reference(x, w, bias, k, G, TG, norm, 2.5), 1e-5)
    if G > 1:  # only kept groups were chosen
        _, idx = route(x, w, bias, k, G, TG, norm, 2.5)
        assert all(len(set((idx[n] // (E // G)).tolist())) <= TG for n in range(N))


@interpreter
def test_kernel_takes_strided_rows_and_falls_back_for_many_tokens(monkeypatch):
    import indexcache.ops.router.kernel as kernel
    from indexcache.ops.triton_support import LAST_COMPILED

    g = torch.Generator().manual_seed(7)
    wide = torch.randn(6, 80, generator=g)
    x = wide[:, 8:72]  # rows of 64 inside rows of 80
    _, w, bias = _inputs(g, 6, 64, 16)
    _check(kernel.route(x, w, bias, 4), reference(x, w, bias, 4), 1e-5)
    LAST_COMPILED.clear()
    monkeypatch.setattr(kernel, "KERNEL_MAX_TOKENS", 4)
    _check(kernel.route(x, w, bias, 4), reference(x, w, bias, 4), 1e-5)  # the reference's matrix product
    assert "route" not in LAST_COMPILED
    monkeypatch.setattr(kernel, "KERNEL_MAX_TOKENS", 256)
    _check(kernel.route(x, w[:12], bias[:12], 4), reference(x, w[:12], bias[:12], 4), 1e-5)  # 12 experts
    assert "route" not in LAST_COMPILED
    with pytest.raises(ValueError, match="is not a routing"):
        kernel.route(x, w, bias, 17)


def _decisive(x, w, bias, k, G, TG, margin):
    """Tokens whose routing no rounding below ``margin`` can change: the k-th and (k+1)-th biased scores
    among the kept groups, and (with groups) the kept and the first dropped group scores, lie further apart."""
    choice = torch.sigmoid(x.float() @ w.float().T) + bias.float()
    E = w.shape[0]
    ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if G > 1:
        gs = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1).sort(-1, descending=True).values
        ok &= (gs[:, TG - 1] - gs[:, TG]) > margin
        keep = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1).topk(TG, dim=-1).indices
        mask = torch.zeros(x.shape[0], G, dtype=torch.bool, device=x.device).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // G, dim=1), float("-inf"))
    top = choice.topk(k + 1, dim=-1).values
    return ok & ((top[:, k - 1] - top[:, k]) > margin)


@gpu
@pytest.mark.parametrize("E,k,G,TG,D", [(64, 4, 1, 1, 2048), (256, 8, 8, 4, 7168)])
def test_kernel_routes_like_the_reference_on_gpu(E, k, G, TG, D):
    """GLM-4.7-Flash's and DeepSeek-V3.2's routers on bf16 tokens at decode batch sizes. The products of bf16
    values are exact in fp32; the D-term sums differ in order only, by about sqrt(D) * 2^-24 of the sum of
    magnitudes, under 1e-5 here; so the weights agree to 1e-4, and the experts wherever no two of the deciding
    scores lie within 1e-4 (the tokens where they do are left out, and must be few)."""
    from indexcache.ops.router.kernel import route

    g = torch.Generator().manual_seed(E)
    for N in (1, 8, 64, 256):
        x, w, bias = _inputs(g, N, D, E, torch.bfloat16, "cuda")
        (gw, gi), (rw, ri) = route(x, w, bias, k, G, TG, True, 2.5), reference(x, w, bias, k, G, TG, True, 2.5)
        sure = _decisive(x, w, bias, k, G, TG, 1e-4)
        assert sure.float().mean() > 0.9
        assert torch.equal(gi[sure], ri[sure])
        assert torch.allclose(gw[sure], rw[sure], atol=1e-4, rtol=1e-4)
