"""FP8 linear layers with block scales: ``reference.py`` (plain PyTorch, dequantise and multiply) beside
``kernel.py`` (Triton), picked through :mod:`indexcache.ops.backends`.

:func:`fp8_linear` is what the model calls: the activations are quantised per token and per 128 channels
(the backend's ``act_quant``: :func:`indexcache.ops.fp8.act_quant`, or the one-pass kernel with the same
arithmetic), then the backend's ``fp8_gemm``
multiplies them by the e4m3 weight and its 128 x 128 block scales. The weight stays in FP8 in memory.
"""

from __future__ import annotations

import torch

from ..backends import Backend, get_backend
from .reference import BLOCK, fp8_gemm


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               backend: str | Backend = "torch", scale_fmt: str | None = None) -> torch.Tensor:
    """``x @ W.T`` for x [..., K] and a block-FP8 weight [N, K] (``weight_scale_inv`` [N/128, K/128]),
    in x's dtype. ``scale_fmt="ue8m0"`` rounds the activation scales up to powers of two (DeepSeek-V3.2's
    checkpoints ask for it)."""
    ops = get_backend(backend)
    K = x.shape[-1]
    if K % BLOCK:
        raise ValueError(f"an FP8 linear layer needs in-features divisible by {BLOCK}, got {K}")
    flat = x.reshape(-1, K)
    xq, xs = ops.act_quant(flat, BLOCK, scale_fmt)
    out = ops.fp8_gemm(xq, xs, weight, weight_scale_inv, x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


__all__ = ["BLOCK", "fp8_gemm", "fp8_linear"]
