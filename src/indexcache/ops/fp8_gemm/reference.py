"""Block-scaled FP8 matrix product, in plain PyTorch: what the Triton kernel is tested against.

DeepSeek's FP8 layout: a weight ``w`` [N, K] in e4m3 with one fp32 scale per 128 x 128 block
(``weight_scale_inv`` [ceil(N/128), ceil(K/128)]), and activations quantised per token and per 128
channels (one fp32 scale per [1, 128] group). The product dequantises both and sums in fp32.
"""

from __future__ import annotations

import torch

from ..fp8 import block_dequant

BLOCK = 128


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``a`` [M, K] e4m3 with ``a_scale`` [M, ceil(K/128)] fp32; ``b`` [N, K] e4m3 with ``b_scale``
    [ceil(N/128), ceil(K/128)] fp32. Returns ``(a * a_scale) @ (b * b_scale).T`` [M, N] in ``out_dtype``."""
    M, K = a.shape
    a_deq = a.float() * a_scale.float().repeat_interleave(BLOCK, 1)[:, :K]
    return (a_deq @ block_dequant(b, b_scale, (BLOCK, BLOCK)).T).to(out_dtype)
