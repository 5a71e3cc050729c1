"""Lightning-indexer scoring and causal top-k, chunked over queries.

    I[s, t] = sum_h w[s, h] * relu(scale * q[s, h] . k[t])        for t <= pos[s], else -inf

``w`` already carries the 1/sqrt(H) factor (and, in fp8 mode, nothing else: operands are passed in
dequantised). Queries are processed in chunks so that the [chunk, H, T] fp32 logits stay within a
memory budget; [B, H, S, T] never exists.
"""

from __future__ import annotations

import torch

DEFAULT_BUDGET_BYTES = 256 << 20


def _chunk_rows(per_row_bytes: int, budget: int) -> int:
    return max(1, budget // max(per_row_bytes, 1))


def _score_block(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B,s,H,D], w [B,s,H], k [B,t,D] -> [B,s,t] fp32 (no mask)."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2).unsqueeze(1)) * scale  # [B,s,H,t]
    logits = torch.relu(logits)
    return torch.matmul(w.float().unsqueeze(-2), logits).squeeze(-2)


def _causal(scores: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    t = torch.arange(scores.shape[-1], device=scores.device)
    visible = t.view(1, 1, -1) <= q_pos.view(1, -1, 1)
    return scores.masked_fill(~visible, float("-inf"))


def indexer_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> torch.Tensor:
    """Dense causal index scores [B, S, T] (fp32, -inf where not visible). O(S*T) memory: for analysis."""
    B, S, H, _ = q.shape
    T = k.shape[1]
    out = q.new_full((B, S, T), float("-inf"), dtype=torch.float32)
    step = _chunk_rows(B * H * T * 4, budget_bytes)
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        out[:, s0:s1] = _causal(_score_block(q[:, s0:s1], w[:, s0:s1], k, scale), q_pos[s0:s1])
    return out


def indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    scale: float,
    q_pos: torch.Tensor,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    return_scores: bool = False,
    ties: str = "topk",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal top-k key indices per query.

    Returns ``indices`` [B, S, min(topk, T)] int64, highest score first, ``-1`` where a query sees fewer
    than that many keys (so a row keeps exactly min(topk, visible) indices), and optionally the dense
    masked scores [B, S, T]. ``ties``: ``"topk"`` keeps whichever exactly tied keys ``torch.topk`` keeps
    (as transformers does); ``"lowest"`` keeps the lowest key indices among ties, as the Triton top-k does.
    """
    B, S, H, _ = q.shape
    T = k.shape[1]
    K = min(topk, T)
    indices = torch.full((B, S, K), -1, dtype=torch.long, device=q.device)
    scores_out = q.new_full((B, S, T), float("-inf"), dtype=torch.float32) if return_scores else None
    step = _chunk_rows(B * H * T * 4, budget_bytes)
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        pos = q_pos[s0:s1]
        t_end = min(T, int(pos.max()) + 1)  # no query in this chunk sees beyond t_end
        row = q.new_full((B, s1 - s0, T), float("-inf"), dtype=torch.float32)
        row[..., :t_end] = _causal(_score_block(q[:, s0:s1], w[:, s0:s1], k[:, :t_end], scale), pos)
        # top-k over the full-length row: torch.topk breaks exact ties (e.g. scores of exactly 0 when
        # every head's ReLU is off) depending on the row length, so chunking must not change it.
        if ties == "lowest":  # a stable descending sort puts equal scores in index order
            vals, idx = row.sort(dim=-1, descending=True, stable=True)
            vals, idx = vals[..., :K], idx[..., :K]
        else:
            vals, idx = row.topk(K, dim=-1)
        indices[:, s0:s1] = idx.masked_fill(vals == float("-inf"), -1)
        if scores_out is not None:
            scores_out[:, s0:s1] = row
    return indices, scores_out


def indexer_scores_at(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float, indices: torch.Tensor
) -> torch.Tensor:
    """Index scores at given key indices: [B, S, K] fp32, -inf at ``-1`` slots. Differentiable, for the
    indexer's distillation loss over its selected set (DSA's sparse stage)."""
    B = q.shape[0]
    batch = torch.arange(B, device=q.device).view(B, 1, 1)
    sel = k.float()[batch, indices.clamp_min(0)]  # [B, S, K, D]
    logits = torch.relu(torch.einsum("bshd,bskd->bshk", q.float(), sel) * scale)
    scores = torch.einsum("bsh,bshk->bsk", w.float(), logits)
    return scores.masked_fill(indices < 0, float("-inf"))
