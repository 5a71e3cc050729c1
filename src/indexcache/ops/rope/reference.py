"""RoPE in plain PyTorch: the reference of :mod:`.kernel` and the math of the model's :class:`Rope`."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
               seq_dim: int = 1, rope_dims: int | None = None) -> torch.Tensor:
    """Rotate the last dimension of x [..., S (at ``seq_dim``), ..., d] by the tables cos, sin [S, d/2]:
    pairs (x0, x1), (x2, x3), ... when ``interleaved`` (GPT-J / complex layout), else (x_i, x_{i+d/2})
    (NeoX). ``rope_dims``: rotate only the first that many (the tables [S, rope_dims/2]) and keep the rest,
    as the indexer's rows hold them. Each product, difference and sum is rounded to the result dtype, as
    PyTorch's elementwise ops round them. Returns a new contiguous tensor."""
    if rope_dims is not None and rope_dims < x.shape[-1]:
        pe = apply_rope(x[..., :rope_dims], cos, sin, interleaved, seq_dim)
        return torch.cat((pe, x[..., rope_dims:].to(pe.dtype)), dim=-1)
    shape = [1] * x.dim()
    shape[seq_dim] = cos.shape[0]
    shape[-1] = cos.shape[1]
    cos, sin = cos.view(shape), sin.view(shape)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


__all__ = ["apply_rope"]
