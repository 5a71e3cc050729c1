"""Lightning-indexer logits in plain PyTorch: the reference of :mod:`.kernel`, in the flat layout of
:mod:`indexcache.ops.common`.

    logits[r, t] = sum_h w[r, h] * relu(scale * q[r, h] . k[g, t]) * k_scale[g, t]     for t in [ks[r], ke[r])

and ``-inf`` outside the window (``g = r // (R / G)``). fp32, chunked over queries so that the
``[chunk, H, T]`` products stay within a memory budget.
"""

from __future__ import annotations

import torch

from ..common import DEFAULT_BUDGET_BYTES, chunk_rows, rows_per_cache, window_mask


def score_block(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [G,s,H,D], w [G,s,H], k [G,t,D] -> [G,s,t] fp32 (no mask)."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2).unsqueeze(1)).mul_(scale).relu_()  # [G,s,H,t]
    return torch.matmul(w.float().unsqueeze(-2), logits).squeeze(-2)


def indexer_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    scale: float = 1.0,
    k_scale: torch.Tensor | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    clean: bool = True,
) -> torch.Tensor:
    """Indexer logits ``[R, T]`` fp32, ``-inf`` outside each window. q [R,H,D] and k [G,T,D] in any float
    dtype (fp8 too, with ``k_scale`` [G,T]), w [R,H] fp32 head gates (every other positive per-query factor
    folded in), ks/ke [R]. ``clean`` is the kernel's (this always writes every entry)."""
    R, H, D = q.shape
    G, T = k.shape[0], k.shape[1]
    qpb = rows_per_cache(R, G)
    kf = k.float() if k_scale is None else k.float() * k_scale.float().unsqueeze(-1)
    q4, w4 = q.view(G, qpb, H, D), w.view(G, qpb, H)
    out = torch.empty(G, qpb, T, dtype=torch.float32, device=q.device)
    step = chunk_rows(G * H * T * 4, budget_bytes)
    for s0 in range(0, qpb, step):
        s1 = min(qpb, s0 + step)
        out[:, s0:s1] = score_block(q4[:, s0:s1], w4[:, s0:s1], kf, scale)
    out = out.view(R, T)
    return out.masked_fill_(~window_mask(ks, ke, T), float("-inf"))


def indexer_candidates(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    tau: torch.Tensor,
    cap: int,
    scale: float = 1.0,
    k_scale: torch.Tensor | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of each row's window that reach its threshold ``tau[r]``: ``(values [R, cap] fp32, keys
    [R, cap] int32, count [R] int32)``, the first ``min(count, cap)`` slots in key order (the kernel's
    order is free). Through the full logits, chunked: what the kernel is tested against."""
    logits = indexer_logits(q, k, w, ks, ke, scale, k_scale, budget_bytes)
    keep = (logits >= tau.float().view(-1, 1)) & window_mask(ks, ke, logits.shape[1])
    count = keep.sum(-1).to(torch.int32)
    # the kept keys first, in key order (a stable sort of the inverted mask)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :cap]
    values = logits.gather(1, order)
    keys = order.to(torch.int32)
    if values.shape[1] < cap:  # rows shorter than cap: pad
        pad = cap - values.shape[1]
        values = torch.cat((values, values.new_full((values.shape[0], pad), float("-inf"))), dim=1)
        keys = torch.cat((keys, keys.new_full((keys.shape[0], pad), -1)), dim=1)
    return values, keys, count


def indexer_scores_at(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float, indices: torch.Tensor
) -> torch.Tensor:
    """Index scores at given key indices: [B, S, K] fp32, -inf at ``-1`` slots. Differentiable, for the
    indexer's distillation loss over its selected set (DSA's sparse stage). q [B,S,H,D], w [B,S,H], k [B,T,D]."""
    B = q.shape[0]
    batch = torch.arange(B, device=q.device).view(B, 1, 1)
    sel = k.float()[batch, indices.clamp_min(0)]  # [B, S, K, D]
    logits = torch.relu(torch.einsum("bshd,bskd->bshk", q.float(), sel) * scale)
    scores = torch.einsum("bsh,bshk->bsk", w.float(), logits)
    return scores.masked_fill(indices < 0, float("-inf"))


__all__ = ["indexer_candidates", "indexer_logits", "indexer_scores_at", "score_block"]
