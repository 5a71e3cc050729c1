"""RMSNorm in plain PyTorch: the reference of :mod:`.kernel` and the math of the model's ``RMSNorm``."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension, the statistics in fp32, the
    normalised x rounded to x's dtype before the weight multiplies it (as transformers' DeepSeek and GLM
    norms do); the result in the promotion of weight's and x's dtypes."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


__all__ = ["rms_norm"]
