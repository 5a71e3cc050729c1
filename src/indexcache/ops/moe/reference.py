"""The routed experts in plain PyTorch: what the grouped-GEMM kernel is tested against, and the model's
MoE on the ``torch`` backend.

``moe_experts(x [N, D], w_gate [E, I, D], w_up [E, I, D], w_down [E, D, I], idx [N, k], weights [N, k])``
returns ``[N, k, D]`` in x's dtype: for every (token n, slot s), ``weights[n, s]`` times expert
``idx[n, s]``'s SwiGLU MLP of ``x[n]``, ``W_down (silu(W_gate x) * (W_up x))``. The slots are returned
apart, so the caller sums them in a fixed order (deterministic on every device, no atomics).

``shared=(w_gate [S, D], w_up [S, D], w_down [D, S])`` folds the layer's shared experts in, with S a
multiple of I: their MLP, cut into ``S / I`` blocks of I intermediate channels (block j: gate and up rows
``[jI, (j+1)I)``, down columns the same), adds one slot per block after the routed ones, weight 1, so the
slots' sum is the routed experts plus the shared MLP. A decode step then runs its shared MLP inside the
routed kernels, not as five more launches.

``moe_experts_fp8`` is the same over block-FP8 experts (DeepSeek's checkpoints): every expert's
``gate_proj``, ``up_proj`` and ``down_proj`` in e4m3 with one fp32 scale per 128 x 128 block
(``{part}_scale_inv``), each applied as an FP8 linear layer (activations quantised per token and 128
channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp8_gemm import fp8_linear

FP8_PARTS = ("gate_proj", "gate_proj_scale_inv", "up_proj", "up_proj_scale_inv", "down_proj", "down_proj_scale_inv")


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


def shared_blocks(w_gate: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> int:
    """How many slots ``shared`` adds (its intermediate width over the routed experts' I; 0 for None),
    after one-line checks of its shapes and dtype."""
    if shared is None:
        return 0
    E, inter, D = w_gate.shape
    if len(shared) != 3:
        raise ValueError("shared experts are (w_gate [S, D], w_up [S, D], w_down [D, S])")
    sg, su, sd = shared
    S = sg.shape[0] if sg.dim() == 2 else -1
    if S <= 0 or S % inter or sg.shape[1] != D or tuple(su.shape) != (S, D) or tuple(sd.shape) != (D, S):
        raise ValueError(f"shared experts {tuple(sg.shape)}, {tuple(su.shape)}, {tuple(sd.shape)} do not fit the "
                         f"routed experts' hidden {D} and width {inter} (gate/up [S, D], down [D, S], S a multiple "
                         f"of {inter})")
    if {sg.dtype, su.dtype, sd.dtype} != {w_gate.dtype}:
        raise ValueError(f"shared experts in {sg.dtype}, routed experts in {w_gate.dtype}: give both one dtype")
    return S // inter


def moe_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                idx: torch.Tensor, weights: torch.Tensor,
                shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Each chosen expert once on the tokens that chose it (F.linear in x's dtype), times the routing
    weight; ``[N, k, D]`` in x's dtype, or ``[N, k + S / I, D]`` with the shared experts' blocks after."""
    check_moe_operands(x, w_gate, w_up, w_down, idx, weights)
    blocks = shared_blocks(w_gate, shared)
    k, inter = idx.shape[1], w_gate.shape[1]
    routed = x.new_zeros(idx.shape[0], k + blocks, x.shape[-1])
    for e in idx.unique().tolist():
        tok, slot = torch.where(idx == e)
        xs = x[tok]
        h = F.silu(F.linear(xs, w_gate[e])) * F.linear(xs, w_up[e])
        routed[tok, slot] = (F.linear(h, w_down[e]) * weights[tok, slot, None]).to(x.dtype)
    for j in range(blocks):
        cols = slice(j * inter, (j + 1) * inter)
        sg, su, sd = shared[0][cols], shared[1][cols], shared[2][:, cols]
        routed[:, k + j] = F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)
    return routed


def check_fp8_experts(x: torch.Tensor, experts: dict[str, torch.Tensor], idx: torch.Tensor,
                      weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The six tensors of block-FP8 experts in :data:`FP8_PARTS` order, after one-line shape checks."""
    missing = [p for p in FP8_PARTS if p not in experts]
    if missing:
        raise ValueError(f"block-FP8 experts need {', '.join(FP8_PARTS)}; missing {', '.join(missing)}")
    wg, wgs, wu, wus, wd, wds = (experts[p] for p in FP8_PARTS)
    check_moe_operands(x, wg, wu, wd, idx, weights)
    E, inter, D = wg.shape
    if D % 128 or inter % 128:
        raise ValueError(f"block-FP8 experts need hidden and expert widths divisible by 128, got {D} and {inter}")
    for w, s in ((wg, wgs), (wu, wus), (wd, wds)):
        want = (E, w.shape[1] // 128, w.shape[2] // 128)
        if tuple(s.shape) != want:
            raise ValueError(f"expert scales {tuple(s.shape)} do not match weights {tuple(w.shape)} in 128 x 128 "
                             f"blocks (expected {want})")
    return wg, wgs.float(), wu, wus.float(), wd, wds.float()


def moe_experts_fp8(x: torch.Tensor, experts: dict[str, torch.Tensor], idx: torch.Tensor, weights: torch.Tensor,
                    scale_fmt: str | None = None) -> torch.Tensor:
    """:func:`moe_experts` over block-FP8 experts (``experts``: the :data:`FP8_PARTS` by name): each chosen
    expert's three FP8 linear layers on the reference ops; ``[N, k, D]`` in x's dtype."""
    wg, wgs, wu, wus, wd, wds = check_fp8_experts(x, experts, idx, weights)
    routed = x.new_zeros(*idx.shape, x.shape[-1])
    for e in idx.unique().tolist():
        tok, slot = torch.where(idx == e)
        xs = x[tok]
        gate = fp8_linear(xs, wg[e], wgs[e], "torch", scale_fmt)
        h = F.silu(gate) * fp8_linear(xs, wu[e], wus[e], "torch", scale_fmt)
        y = fp8_linear(h, wd[e], wds[e], "torch", scale_fmt)
        routed[tok, slot] = (y * weights[tok, slot, None]).to(x.dtype)
    return routed
