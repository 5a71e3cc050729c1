"""RMSNorm: the Triton kernel and the plain reference, each against the exact norm in float64 of the same
(rounded) inputs, within a bound from the dtypes and the row length."""

import pytest
import torch
from bounds import U_BF16, U_FP16, U_FP32, gamma
from markers import gpu, interpreter

from indexcache.ops.norm.reference import rms_norm as reference

UNIT = {torch.float32: U_FP32, torch.float16: U_FP16, torch.bfloat16: U_BF16}


def _exact_and_bound(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """The exact norm of x's values, and how far a result may be from it: the fp32 sum of D squares and the
    division, addition, square root and reciprocal around it move the row's scale by at most
    gamma(D + 3) / 2 + 3 u32 (relative); the normalised row is rounded once to x's dtype and the product
    with the weight once to the output's (4 extra fp32 units cover an approximate reciprocal square root)."""
    X = x.double()
    y = X / (X.square().mean(-1, keepdim=True) + eps).sqrt()
    exact = w.double() * y
    D = x.shape[-1]
    scale = gamma(D + 3, U_FP32) / 2 + 7 * U_FP32
    u_x, u_out = UNIT[x.dtype], UNIT[out_dtype]
    bound = exact.abs() * ((scale + u_x) * (1 + u_out) + u_out) + 1e-30
    return exact, bound


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float) -> None:
    exact, bound = _exact_and_bound(x, w, eps, got.dtype)
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), (err - bound).max().item()


def _inputs(g, rows: int, D: int, dtype, device="cpu", w_dtype=None):
    x = (torch.randn(rows, D, generator=g) * torch.rand(rows, 1, generator=g) * 4).to(device, dtype)
    w = (torch.randn(D, generator=g) * 0.5 + 1).to(device, w_dtype or dtype)
    return x, w


def test_reference_is_the_exact_norm_within_the_bound():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, w = _inputs(g, 33, 96, dtype)
        _check(reference(x, w, 1e-6), x, w, 1e-6)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_against_the_exact_norm(dtype):
    from indexcache.ops.norm.kernel import rms_norm

    g = torch.Generator().manual_seed(1)
    x, w = _inputs(g, 37, 100, dtype)  # a width that is not a power of two: the masked tail
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    _check(got, x, w, 1e-6)
    # leading dimensions and strided rows (the latent slice of wider rows), a zero row (eps alone)
    wide = torch.randn(2, 5, 130, generator=g).to(dtype)
    wide[1, 2] = 0
    part = wide[..., :100]
    got = rms_norm(part, w, 1e-3)
    _check(got, part, w, 1e-3)
    assert (got[1, 2] == 0).all()
    # an fp32 weight with fp16 rows: the product in fp32, as the reference promotes it
    x16, w32 = _inputs(g, 9, 64, torch.float16, w_dtype=torch.float32)
    got = rms_norm(x16, w32, 1e-6)
    assert got.dtype == torch.float32
    _check(got, x16, w32, 1e-6)
    assert rms_norm(x[:0], w, 1e-6).shape == (0, 100)
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(x, w[:50], 1e-6)


@interpreter
def test_the_models_norms_run_on_the_kernel_except_when_they_train():
    from indexcache.model.dsa import RMSNorm
    from indexcache.ops.triton_support import LAST_COMPILED

    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
    x = torch.randn(3, 4, 48, generator=g)
    want = reference(x, norm.weight, norm.eps)
    LAST_COMPILED.pop("rms_norm", None)
    with torch.no_grad():
        got = norm(x, "triton")
    assert "rms_norm" in LAST_COMPILED
    _check(got, x, norm.weight, norm.eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    LAST_COMPILED.pop("rms_norm", None)
    norm(x.requires_grad_(), "triton").sum().backward()  # gradients wanted: the reference
    assert "rms_norm" not in LAST_COMPILED and norm.weight.grad is not None


@gpu
@pytest.mark.parametrize("D", [7168, 6144, 2048, 1536, 512])
def test_kernel_against_the_exact_norm_on_gpu(D):
    from indexcache.ops.norm.kernel import rms_norm

    g = torch.Generator().manual_seed(D)
    x, w = _inputs(g, 4099, D, torch.bfloat16, "cuda")
    _check(rms_norm(x, w, 1e-6), x, w, 1e-6)
    _check(reference(x, w, 1e-6), x, w, 1e-6)  # torch's own, for the bound's sake
    graph = torch.cuda.CUDAGraph()
    one = x[:1].clone()
    rms_norm(one, w, 1e-6)
    with torch.cuda.graph(graph):
        out = rms_norm(one, w, 1e-6)
    one.copy_(x[7:8])
    graph.replay()
    torch.testing.assert_close(out, rms_norm(x[7:8], w, 1e-6), rtol=0, atol=0)
