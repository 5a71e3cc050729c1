"""Plain-PyTorch references for the kernel APIs (flat, varlen layout, as serving engines use them).

The kernels in :mod:`indexcache.ops.kernels` take one flat sequence of queries and keys and a per-query
key window ``[ks, ke)`` instead of a batch dimension: several requests are packed by giving each query the
window of its own request. These references compute the same functions with the model's own ops
(:mod:`indexcache.ops.indexer`, :mod:`indexcache.ops.sparse_mla`), in fp32, chunked over queries.
"""

from __future__ import annotations

import torch

from .indexer import DEFAULT_BUDGET_BYTES, _chunk_rows, _score_block
from .sparse_mla import mla_attention


def window_mask(ks: torch.Tensor, ke: torch.Tensor, n: int) -> torch.Tensor:
    """[R, n] bool: key t is inside row r's window [ks[r], ke[r])."""
    t = torch.arange(n, device=ks.device)
    return (t.view(1, -1) >= ks.view(-1, 1).long()) & (t.view(1, -1) < ke.view(-1, 1).long())


def mqa_logits_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> torch.Tensor:
    """Indexer logits ``[S, N]`` fp32: ``sum_h w[s,h] * relu(q[s,h] . k[n]) * k_scale[n]`` inside the
    window, ``-inf`` outside. q [S,H,D], k [N,D] (any float dtype, fp8 included), w [S,H] fp32 with every
    positive per-query factor (softmax scale, 1/sqrt(H), the fp8 q scale) already folded in."""
    S, H, _ = q.shape
    N = k.shape[0]
    out = torch.empty(S, N, dtype=torch.float32, device=q.device)
    kf = k.float() if k_scale is None else k.float() * k_scale.float().view(-1, 1)
    step = _chunk_rows(H * N * 4, budget_bytes)
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        block = _score_block(q[None, s0:s1].float(), w[None, s0:s1].float(), kf[None], 1.0)[0]
        out[s0:s1] = block.masked_fill(~window_mask(ks[s0:s1], ke[s0:s1], N), float("-inf"))
    return out


def topk_ref(logits: torch.Tensor, k: int, ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """Top-``k`` key indices per row inside the row's window, int32 ``[R, k]``, ``-1`` where the window
    holds fewer than ``k`` keys. Order within a row is not part of the contract (the kernels return
    indices unsorted); compare sets."""
    R, N = logits.shape
    masked = logits.float().masked_fill(~window_mask(ks, ke, N), float("-inf"))
    kk = min(k, N)
    vals, idx = masked.topk(kk, dim=-1)
    idx = idx.masked_fill(vals == float("-inf"), -1).int()
    if kk < k:
        idx = torch.cat((idx, idx.new_full((R, k - kk), -1)), dim=1)
    return idx


def sparse_mla_ref(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA over the latent cache: q [S,H,Dk], kv [N,Dk], indices [S,K] (``-1`` or ``>= N`` =
    none). Returns out [S,H,d_v] fp32 and lse [S,H] fp32 (natural log); a row with no valid index gets
    out 0 and lse -inf."""
    idx = indices.long()
    idx = idx.masked_fill(idx >= kv.shape[0], -1)
    out, lse, _ = mla_attention(q[None].float(), kv[None].float(), scale, d_v, indices=idx[None])
    empty = (idx < 0).all(dim=-1)  # [S]
    out = out[0].masked_fill(empty.view(-1, 1, 1), 0.0)
    lse = lse[0].masked_fill(empty.view(-1, 1), float("-inf"))
    return out, lse
