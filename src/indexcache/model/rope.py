"""Rotary embeddings: frequencies (default / linear / YaRN as transformers computes them) and the two
layouts DSA models use: interleaved pairs (MLA everywhere, GLM's indexer) and half-split (NeoX;
DeepSeek-V3.2's indexer since the 2025-11 fix)."""

from __future__ import annotations

import math

import torch

from ..config import DSAConfig, RopeConfig, yarn_get_mscale


def inv_freq_and_scaling(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32) and the factor that multiplies cos/sin."""
    base = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = rope.theta**base
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope.rope_type == "linear":
        return 1.0 / pos_freqs / rope.factor, 1.0
    # YaRN
    factor = rope.factor
    attn = rope.attention_factor
    if attn is None:
        if rope.mscale and rope.mscale_all_dim:
            attn = yarn_get_mscale(factor, rope.mscale) / yarn_get_mscale(factor, rope.mscale_all_dim)
        else:
            attn = yarn_get_mscale(factor)
    orig = rope.original_max_position_embeddings

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn)


class Rope:
    """cos/sin tables for a set of absolute positions: shape [S, dim/2] each, already scaled."""

    def __init__(self, cfg: DSAConfig, positions: torch.Tensor, dtype: torch.dtype):
        inv, scaling = inv_freq_and_scaling(cfg.rope, cfg.qk_rope_head_dim)
        freqs = positions.float().unsqueeze(-1) * inv.to(positions.device)
        self.cos = (freqs.cos() * scaling).to(dtype)
        self.sin = (freqs.sin() * scaling).to(dtype)
        self.positions = positions

    def at(self, positions: torch.Tensor) -> Rope:
        """The rows of this table (built over positions 0..n-1) at ``positions``, without recomputing them
        (a gather, so a captured CUDA graph can move positions without host work); same values."""
        out = Rope.__new__(Rope)
        out.cos, out.sin = self.cos[positions], self.sin[positions]
        out.positions = positions
        return out

    def interleaved(self, x: torch.Tensor, seq_dim: int = 1, backend: str = "torch",
                    rope_dims: int | None = None) -> torch.Tensor:
        """Rotate pairs (x0, x1), (x2, x3), ... in place in the layout (GPT-J / complex style), x [..., S (at
        ``seq_dim``), ..., d], on the ops ``backend`` (its kernel takes the positions on dim 1); with
        ``rope_dims``, only the first that many, the rest kept."""
        return self._apply(x, True, seq_dim, backend, rope_dims)

    def half_split(self, x: torch.Tensor, seq_dim: int = 1, backend: str = "torch",
                   rope_dims: int | None = None) -> torch.Tensor:
        """Rotate (x_i, x_{i+d/2}) pairs (NeoX style)."""
        return self._apply(x, False, seq_dim, backend, rope_dims)

    def _apply(self, x: torch.Tensor, interleaved: bool, seq_dim: int, backend: str,
               rope_dims: int | None = None) -> torch.Tensor:
        from ..ops.backends import get_backend

        # a rotation that trains, or another layout than the kernel's, stays on the reference
        trains = torch.is_grad_enabled() and x.requires_grad
        if trains or seq_dim != 1 or x.dim() not in (3, 4):
            backend = "torch"
        return get_backend(backend).rope(x, self.cos, self.sin, interleaved, seq_dim, rope_dims)
