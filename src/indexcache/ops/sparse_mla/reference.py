"""MLA attention in the absorbed (MQA) form over the compressed latent, sparse or dense.

One latent row per key token, shared by every head: ``kv[t] = [c_t (d_v dims) | k_rope_t]``, and
queries already absorbed into that space: ``q[s, h] = [W_uk^T q_nope | q_rope]``. Then

    out[s, h] = sum_{t in I(s)} softmax_t(scale * q[s, h] . kv[t]) * kv[t, :d_v]

with I(s) the selected indices (``-1`` entries ignored) or, when ``indices`` is None, every t <= pos[s].
Computed in fp32 in query chunks; returns the output, the log-sum-exp, and optionally the
head-averaged probabilities (the distillation target p of the DSA papers).

:func:`mla_attention` is the batched form the model's dense and traced paths use; :func:`sparse_mla` is
the flat layout of :mod:`indexcache.ops.common`, the reference of :mod:`.kernel`. :func:`dense_mla_fused`
is the dense case through PyTorch's fused attention, for training: its memory grows with the sequence, not
with its square, so dense pretraining reaches long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import DEFAULT_BUDGET_BYTES, rows_per_cache


def mla_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float,
    d_v: int,
    indices: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    return_probs: bool = False,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q [B,S,H,Dk], kv [B,T,Dk], indices [B,S,K] (int, -1 = none) or None (dense causal on ``q_pos``).

    Returns ``out`` [B,S,H,d_v] (q's dtype), ``lse`` [B,S,H] fp32 and, if asked, head-mean probabilities:
    [B,S,K] aligned with ``indices`` (sparse) or [B,S,T] (dense).
    """
    B, S, H, Dk = q.shape
    T = kv.shape[1]
    out = q.new_empty(B, S, H, d_v)
    lse = q.new_empty(B, S, H, dtype=torch.float32)
    probs_out = None
    kvf = kv.float()
    if indices is None:
        if q_pos is None:
            q_pos = torch.arange(T - S, T, device=q.device)
        if return_probs:
            probs_out = q.new_zeros(B, S, T, dtype=torch.float32)
        step = max(1, budget_bytes // max(B * H * T * 4 * 2, 1))
        t_idx = torch.arange(T, device=q.device)
        for s0 in range(0, S, step):
            s1 = min(S, s0 + step)
            pos = q_pos[s0:s1]
            t_end = min(T, int(pos.max()) + 1)
            logits = torch.einsum("bshd,btd->bsht", q[:, s0:s1].float(), kvf[:, :t_end]) * scale
            visible = (t_idx[:t_end].view(1, 1, 1, -1) <= pos.view(1, -1, 1, 1))
            logits = logits.masked_fill(~visible, float("-inf"))
            chunk_lse = torch.logsumexp(logits, dim=-1)
            p = torch.exp(logits - chunk_lse.unsqueeze(-1))
            out[:, s0:s1] = torch.einsum("bsht,btc->bshc", p, kvf[:, :t_end, :d_v]).to(out.dtype)
            lse[:, s0:s1] = chunk_lse
            if probs_out is not None:
                probs_out[:, s0:s1, :t_end] = p.mean(dim=2)
        return out, lse, probs_out

    K = indices.shape[-1]
    if return_probs:
        probs_out = q.new_zeros(B, S, K, dtype=torch.float32)
    step = max(1, budget_bytes // max(B * K * (Dk * 4 + H * 8), 1))
    base = (torch.arange(B, device=q.device) * T).view(B, 1, 1)
    flat = kvf.reshape(B * T, Dk)
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        idx = indices[:, s0:s1].long()
        valid = idx >= 0
        # one latent row per selected token; index_select on the flattened rows is the fast gather
        sel = flat.index_select(0, (base + idx.clamp_min(0)).flatten()).view(B, s1 - s0, K, Dk)
        logits = torch.einsum("bshd,bskd->bshk", q[:, s0:s1].float(), sel) * scale
        logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
        chunk_lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - chunk_lse.unsqueeze(-1))
        out[:, s0:s1] = torch.einsum("bshk,bskc->bshc", p, sel[..., :d_v]).to(out.dtype)
        lse[:, s0:s1] = chunk_lse
        if probs_out is not None:
            probs_out[:, s0:s1] = p.mean(dim=2)
    return out, lse, probs_out


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA over latent caches: q [R,H,Dk], kv [G,T,Dk], indices [R,K] into each row's cache (``-1``
    or ``>= T`` = none). Returns out [R,H,d_v] fp32 and lse [R,H] fp32 (natural log); a row with no valid
    index gets out 0 and lse -inf."""
    R, H, Dk = q.shape
    G, T = kv.shape[0], kv.shape[1]
    qpb = rows_per_cache(R, G)
    idx = indices.long()
    idx = idx.masked_fill(idx >= T, -1)
    out, lse, _ = mla_attention(q.view(G, qpb, H, Dk), kv, scale, d_v, indices=idx.view(G, qpb, -1),
                                budget_bytes=budget_bytes)
    empty = (idx < 0).all(dim=-1)  # [R]
    out = out.float().view(R, H, d_v).masked_fill(empty.view(-1, 1, 1), 0.0)
    lse = lse.view(R, H).masked_fill(empty.view(-1, 1), float("-inf"))
    return out, lse


def dense_mla_fused(q: torch.Tensor, kv: torch.Tensor, scale: float, d_v: int,
                    q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Dense causal MLA, ``out`` [B,S,H,d_v] in q's dtype: the dense case of :func:`mla_attention` (query
    ``s`` sees every key ``t <= q_pos[s]``) through ``torch.nn.functional.scaled_dot_product_attention``,
    whose fused kernels keep no ``[S, T]`` matrix for the backward. The latent row is every head's key and,
    in its first ``d_v`` values, its value (MLA's absorbed form), so one key tensor serves all heads."""
    B, S, H, Dk = q.shape
    T = kv.shape[1]
    # the whole latent row serves as the value too and the output keeps its first d_v values: flash kernels
    # want one head dim for q, k and v, and the rope part of the product is discarded
    key = kv.to(q.dtype).unsqueeze(1).expand(B, H, T, Dk)
    query, value = q.transpose(1, 2), key  # [B, H, S, Dk]
    if q_pos is None:  # the last S positions of T
        q_pos = torch.arange(T - S, T, device=q.device)
    if S == T and torch.equal(q_pos, torch.arange(T, device=q_pos.device)):  # a whole sequence: plain causal
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    else:
        mask = torch.arange(T, device=q.device).view(1, -1) <= q_pos.view(-1, 1)  # [S, T]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out[..., :d_v].transpose(1, 2)
