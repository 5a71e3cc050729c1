"""The model's indexer and sparse attention on the Triton kernels (``model.set_backend("triton")``).

Same inputs and outputs as :func:`indexcache.ops.indexer.indexer_topk` and
:func:`indexcache.ops.sparse_mla.mla_attention` (batched ``[B, S, ...]``): each batch row becomes one flat
sequence for the kernels. Queries are processed in chunks so that the ``[chunk, T]`` fp32 logits stay
within the memory budget. In the model's ``fp8`` scoring mode the operands are already e4m3 values times
power-of-two block scales, so re-quantising them is exact and the fp8 kernel computes the same products as
the plain path (up to fp32 summation order).
"""

from __future__ import annotations

import torch

from ..fp8 import act_quant
from ..indexer import DEFAULT_BUDGET_BYTES, _chunk_rows
from .indexer import mqa_logits
from .sparse_mla import sparse_mla
from .topk import topk as topk_select


def indexer_topk_triton(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    scale: float,
    q_pos: torch.Tensor,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    fp8: bool = False,
) -> torch.Tensor:
    """q [B,S,H,D], w [B,S,H] fp32, k [B,T,D], q_pos [S] (query s sees keys <= q_pos[s]) ->
    indices [B, S, min(topk, T)] int64, unsorted, ``-1`` padding."""
    B, S, H, D = q.shape
    T = k.shape[1]
    K = min(topk, T)
    out = torch.full((B, S, K), -1, dtype=torch.long, device=q.device)
    w = w.float() * scale
    if fp8:
        if D > 128:
            raise ValueError("the fp8 indexer kernel takes one scale per head, so head_dim <= 128")
        q8, qs = act_quant(q, D)  # exact: q already holds e4m3 values times power-of-two scales
        k8, kscale = act_quant(k, D)
        w = w * qs[..., 0]
        kscale = kscale[..., 0]
    else:
        dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        q8, k8, kscale = q.to(dt), k.to(dt), None
    ke_all = (q_pos.to(torch.int32) + 1).clamp_max(T)
    step = _chunk_rows(T * 4 * 2, budget_bytes)
    for b in range(B):
        for s0 in range(0, S, step):
            s1 = min(S, s0 + step)
            ke = ke_all[s0:s1]
            ks = torch.zeros_like(ke)
            t_end = int(ke.max())
            logits = mqa_logits(q8[b, s0:s1], k8[b, :t_end], w[b, s0:s1], ks, ke,
                                k_scale=None if kscale is None else kscale[b, :t_end])
            out[b, s0:s1] = topk_select(logits, K, ks, ke).long()
    return out


def mla_attention_triton(
    q: torch.Tensor, kv: torch.Tensor, scale: float, d_v: int, indices: torch.Tensor
) -> torch.Tensor:
    """Sparse MLA, batched: q [B,S,H,Dk], kv [B,T,Dk], indices [B,S,K] -> out [B,S,H,d_v] in q's dtype."""
    B = q.shape[0]
    dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    outs = []
    for b in range(B):
        o, _ = sparse_mla(q[b].to(dt), kv[b].to(dt), indices[b], scale, d_v)
        outs.append(o.to(q.dtype))
    return torch.stack(outs)
