"""RMSNorm in Triton: one program per row reads it once, sums its squares in fp32 and writes
``weight * normalised``, the same roundings as :func:`.reference.rms_norm` (the normalised row rounded to
x's dtype, then the product rounded to the output's). In PyTorch the same norm is seven kernels (the cast,
square, mean, add, rsqrt, product, weight); a decode step runs four norms per layer, so in a CUDA graph
those launches are much of the step's fixed work."""

from __future__ import annotations

import torch

from ..triton_support import HAVE_TRITON, LAST_COMPILED, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(X, W, Y, D, d_float, sx, sy, eps, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < D
        x = tl.load(X + r * sx + c, mask=m, other=0.0)
        xf = x.to(tl.float32)
        # IEEE-rounded division and square root (Triton's fp32 `/` is an approximate division on the GPU)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(xf * xf, axis=0), d_float) + eps))
        y = (xf * rstd).to(x.dtype)
        w = tl.load(W + c, mask=m, other=0.0)
        tl.store(Y + r * sy + c, (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The signature twin of :func:`.reference.rms_norm` (any leading shape; rows may be strided)."""
    require_triton()
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dimension {D}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.reshape(-1, D)  # a view where the leading dimensions merge (a slice of wider rows included)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    flat = out.view(-1, D)
    if rows.shape[0]:
        block = triton.next_power_of_2(D)
        LAST_COMPILED["rms_norm"] = _rms_norm_kernel[(rows.shape[0],)](
            rows, weight.contiguous(), flat, D, float(D), rows.stride(0), flat.stride(0), eps, BLOCK=block,
            num_warps=8 if block >= 4096 else 4)
    return out


__all__ = ["rms_norm"]
