"""The routed experts in plain PyTorch: what the grouped-GEMM kernel is tested against, and the model's
MoE on the ``torch`` backend.

``moe_experts(x [N, D], w_gate [E, I, D], w_up [E, I, D], w_down [E, D, I], idx [N, k], weights [N, k])``
returns ``[N, k, D]`` in x's dtype: for every (token n, slot s), ``weights[n, s]`` times expert
``idx[n, s]``'s SwiGLU MLP of ``x[n]``, ``W_down (silu(W_gate x) * (W_up x))``. The slots are returned
apart, so the caller sums them in a fixed order (deterministic on every device, no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_moe_operands(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                       idx: torch.Tensor, weights: torch.Tensor) -> None:
    """One-line errors for operands whose shapes do not fit together."""
    if x.dim() != 2 or w_gate.dim() != 3 or idx.dim() != 2:
        raise ValueError(f"moe_experts wants x [N, D], weights [E, I, D] and idx [N, k], got "
                         f"{tuple(x.shape)}, {tuple(w_gate.shape)} and {tuple(idx.shape)}")
    E, inter, D = w_gate.shape
    if x.shape[1] != D or tuple(w_up.shape) != (E, inter, D) or tuple(w_down.shape) != (E, D, inter):
        raise ValueError(f"expert weights {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)} do "
                         f"not fit x {tuple(x.shape)} (gate/up [E, I, D], down [E, D, I])")
    if idx.shape[0] != x.shape[0] or tuple(weights.shape) != tuple(idx.shape):
        raise ValueError(f"idx {tuple(idx.shape)} and weights {tuple(weights.shape)} must both be "
                         f"[{x.shape[0]}, k]")


def moe_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each chosen expert once on the tokens that chose it (F.linear in x's dtype), times the routing
    weight; ``[N, k, D]`` in x's dtype."""
    check_moe_operands(x, w_gate, w_up, w_down, idx, weights)
    routed = x.new_zeros(*idx.shape, x.shape[-1])
    for e in idx.unique().tolist():
        tok, slot = torch.where(idx == e)
        xs = x[tok]
        h = F.silu(F.linear(xs, w_gate[e])) * F.linear(xs, w_up[e])
        routed[tok, slot] = (F.linear(h, w_down[e]) * weights[tok, slot, None]).to(x.dtype)
    return routed
