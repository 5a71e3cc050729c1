"""FP8 helpers: block-FP8 weight dequantisation, and the reference indexer's activation path.

DeepSeek's reference indexer rotates q and k with an orthonormal Walsh-Hadamard transform (it leaves
q.k unchanged but spreads outliers), then quantises each 128-element block to e4m3 with one fp32 scale
per block; with ``scale_fmt="ue8m0"`` the scale is rounded *up* to a power of two.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # the reference clamps each block's amax from below


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Walsh-Hadamard transform (Sylvester order) over the last dim, times ``scale`` (default 1/sqrt(n)).

    Iterative butterflies: O(n log n), fp32 internally, same dtype out.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two size, got {n}")
    scale = n**-0.5 if scale is None else scale
    shape, dtype = x.shape, x.dtype
    y = x.reshape(-1, n).float()
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) * scale).to(dtype)


def act_quant(
    x: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dim in blocks to float8_e4m3fn; returns (values, fp32 scales [..., n/block]).

    scale = amax / 448 with amax >= 1e-4; ``scale_fmt="ue8m0"`` rounds it up to a power of two.
    """
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the quantisation block {block}")
    xb = x.float().reshape(*x.shape[:-1], n // block, block)
    amax = xb.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    elif scale_fmt is not None:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r} (None or 'ue8m0')")
    y = (xb / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return y.reshape(x.shape), s


def fake_quant_fp8(x: torch.Tensor, block: int = 128, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """Quantise then dequantise (fp32 out): what an fp8 kernel's operands are worth."""
    y, s = act_quant(x, block, scale_fmt)
    n = x.shape[-1]
    return (y.float().reshape(*x.shape[:-1], n // block, block) * s.unsqueeze(-1)).reshape(x.shape)


def block_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Dequantise a block-FP8 weight: W[i, j] = w[i, j] * scale_inv[i // bm, j // bn] (fp32 out)."""
    if w.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"block dequant wants 2-D weight and scale, got {tuple(w.shape)} and {tuple(scale_inv.shape)}")
    bm, bn = block
    rows, cols = w.shape
    want = (math.ceil(rows / bm), math.ceil(cols / bn))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                         f"in {bm}x{bn} blocks (expected {want})")
    s = scale_inv.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return w.float() * s


def kept_wide(name: str) -> bool:
    """A weight that DeepSeek's FP8 checkpoints keep in bf16/fp32 although it is a matrix: norms, the
    router (``mlp.gate``) and the indexer's head weights (``weights_proj``)."""
    return "norm" in name or "weights_proj" in name or name.endswith("gate.weight")


def block_quant(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight [N, K] to e4m3 with one fp32 scale per block (amax / 448): the inverse of
    :func:`block_dequant`, and the layout of DeepSeek's FP8 checkpoints."""
    if w.dim() != 2:
        raise ValueError(f"block quant wants a 2-D weight, got {tuple(w.shape)}")
    bm, bn = block
    rows, cols = w.shape
    nr, nc = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = w.new_zeros(nr * bm, nc * bn, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(nr, bm, nc, bn)
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR) / FP8_MAX
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nr * bm, nc * bn)[:rows, :cols].contiguous(), s


def fp8_indexer_operands(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's fp8 indexer step, in the reference layout of the head dims: a Hadamard rotation, then e4m3
    with a power-of-two scale per 128 dims (one block per head for q, per token for k). The values come
    back dequantised (what an fp8 kernel's operands are worth): the model and the transformers integration
    both score with them."""
    block = min(128, q.shape[-1])
    return fake_quant_fp8(hadamard_transform(q), block), fake_quant_fp8(hadamard_transform(k), block)
