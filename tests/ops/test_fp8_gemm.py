"""ops/fp8_gemm: the block-scaled FP8 product and the activations' quantisation. The reference against
a float computation written out here; the Triton kernel against the reference on fresh random operands (CPU
interpreter on small shapes, real shapes on a GPU), within bounds from the accumulation length; the
quantisation kernel bit for bit against ops.fp8.act_quant; FP8 linear layers against dequantised weights
applied to the quantised activations."""

from __future__ import annotations

import math

import pytest
import torch
from bounds import U_BF16, U_FP8_ACCUMULATE, U_FP32, gamma
from markers import gpu, interpreter

from indexcache.ops.fp8 import act_quant, block_dequant, block_quant, fake_quant_fp8
from indexcache.ops.fp8_gemm import BLOCK, fp8_gemm, fp8_linear


def _operands(g: torch.Generator, M: int, N: int, K: int, device: str = "cpu"):
    a = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4  # rows of different scales
    w = torch.randn(N, K, generator=g) * 0.05
    aq, a_s = act_quant(a, BLOCK, None)
    wq, w_s = block_quant(w)
    return aq.to(device), a_s.to(device), wq.to(device), w_s.to(device)


def _magnitude(aq, a_s, wq, w_s) -> torch.Tensor:
    """The same product on absolute values: what rounding errors scale with."""
    K = aq.shape[1]
    a = (aq.float() * a_s.repeat_interleave(BLOCK, 1)[:, :K]).abs()
    return a @ block_dequant(wq, w_s).abs().T


def test_reference_is_the_dequantised_product():
    g = torch.Generator().manual_seed(0)
    aq, a_s, wq, w_s = _operands(g, 5, 200, 256)
    want = torch.zeros(5, 200, dtype=torch.float64)
    W = block_dequant(wq, w_s).double()
    for kb in range(2):  # per 128-block: e4m3 values times their scales
        sl = slice(kb * 128, (kb + 1) * 128)
        want += (aq[:, sl].double() * a_s[:, kb : kb + 1].double()) @ W[:, sl].T
    torch.testing.assert_close(fp8_gemm(aq, a_s, wq, w_s, torch.float32).double(), want, rtol=1e-6, atol=1e-6)


def test_block_quant_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=g) * torch.rand(300, 1, generator=g)  # partial last blocks
    q, s = block_quant(w)
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (3, 2)
    back = block_dequant(q, s)
    # e4m3 keeps 4 significant bits: half a step is 2^-4 of the value; below 2^-6 (subnormal) the step is
    # 2^-9 of the block's scale
    step = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((back - w).abs() <= 2**-4 * w.abs() + 2**-10 * step * 1.0001).all()


def test_fp8_linear_applies_dequantised_weights_to_quantised_activations():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 256, generator=g)
    wq, w_s = block_quant(torch.randn(192, 256, generator=g) * 0.05)
    for fmt in (None, "ue8m0"):
        want = fake_quant_fp8(x, 128, fmt) @ block_dequant(wq, w_s).T
        torch.testing.assert_close(fp8_linear(x, wq, w_s, "torch", fmt), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 128"):
        fp8_linear(torch.randn(2, 100), wq[:, :100], w_s)


def _check_kernel(aq, a_s, wq, w_s, out_dtype):
    from indexcache.ops.fp8_gemm.kernel import fp8_gemm as kernel

    got = kernel(aq, a_s, wq, w_s, out_dtype).float()
    ref = fp8_gemm(aq, a_s, wq, w_s, torch.float32)
    K = aq.shape[1]
    # within a 128-wide block the tensor cores accumulate e4m3 products at about 14 bits; the blocks'
    # scaled partial sums add in fp32; the output is rounded once to out_dtype
    u_out = U_BF16 if out_dtype == torch.bfloat16 else U_FP32
    bound = (gamma(BLOCK, U_FP8_ACCUMULATE) + gamma(math.ceil(K / BLOCK), U_FP32)) * _magnitude(aq, a_s, wq, w_s) \
        + u_out * ref.abs()
    assert ((got - ref).abs() <= bound + 1e-30).all(), (got - ref).abs().max().item()


@interpreter
@pytest.mark.parametrize("shape", [(37, 200, 256), (5, 128, 384), (64, 96, 128), (1, 33, 128)])
def test_kernel_against_reference_in_the_interpreter(shape):
    g = torch.Generator().manual_seed(sum(shape))
    _check_kernel(*_operands(g, *shape), torch.float32)


@gpu
@pytest.mark.parametrize("shape", [(4096, 7168, 2048), (8192, 2048, 7168), (1, 24576, 1536), (333, 576, 7168),
                                   (2048, 4096, 512)])
def test_kernel_against_reference_on_gpu(shape):
    g = torch.Generator().manual_seed(sum(shape))
    _check_kernel(*_operands(g, *shape, device="cuda"), torch.bfloat16)


def _activations(g: torch.Generator, M: int, K: int, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10
    x[0, :128] = 0  # an all-zero group: the amax floor
    x[-1, 3] = 1e-7  # e4m3 subnormals after scaling
    x[-1, 4] = 448.0 / 4 * 1.0625  # a value halfway between two e4m3 numbers once scaled (ties to even)
    x[-1, 5] = -1e-9  # a negative value that rounds to zero: -0 (0x80), as torch casts it
    x[-1, 6] = -0.0
    return x.to(device=device, dtype=dtype)


def _check_act_quant(x):
    from indexcache.ops.fp8_gemm.kernel import act_quant as kernel

    for fmt in (None, "ue8m0"):
        q, s = kernel(x, 128, fmt)
        q_ref, s_ref = act_quant(x, 128, fmt)
        # the same fp32 arithmetic and round-to-nearest-even: bit for bit
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@interpreter
@pytest.mark.parametrize("shape", [(37, 256), (1, 128), (50, 384)])
def test_act_quant_kernel_is_bit_identical_in_the_interpreter(shape):
    _check_act_quant(_activations(torch.Generator().manual_seed(shape[0]), *shape))


@gpu
@pytest.mark.parametrize("shape", [(32768, 7168), (4096, 1536), (1, 16384), (333, 2048)])
def test_act_quant_kernel_is_bit_identical_on_gpu(shape):
    g = torch.Generator().manual_seed(shape[0])
    _check_act_quant(_activations(g, *shape, device="cuda", dtype=torch.bfloat16))
