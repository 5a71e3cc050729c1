"""The lightning indexer's selection: logits (``reference.py`` beside ``kernel.py``, picked through
:mod:`indexcache.ops.backends`) and the causal top-k built on them.

:func:`indexer_topk` is what the model, the engine and the transformers integration call: queries are
scored in chunks whose ``[chunk, T]`` logits fit a memory budget (the ``[R, T]`` matrix never exists at
once), keys after a chunk's last window are never scored, and each chunk keeps its top-k. The top-k of
the plain backend ranks rows at their full length ``T``, because ``torch.topk`` breaks exact ties (a score
of exactly 0 when every head's ReLU is off) differently for different row lengths: chunking then never
changes the choice, which is also transformers' choice.
"""

from __future__ import annotations

import torch

from ..backends import Backend, get_backend
from ..common import DEFAULT_BUDGET_BYTES, chunk_rows, row_chunks, rows_per_cache
from .reference import indexer_logits, indexer_scores_at


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    topk: int,
    scale: float = 1.0,
    backend: str | Backend = "torch",
    k_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    fp8: bool = False,
    ties: str | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    trim: bool = True,
    ke_host: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Top-``topk`` key indices per query row, ``[R, min(topk, T)]`` (``index_dtype``) into the row's own cache, ``-1``
    where its window holds fewer keys (layout: :mod:`indexcache.ops.common`).

    ``mask`` [G or 1, R/G, T] is an attention mask applied as transformers applies it (bool: True =
    visible; float: additive, its minimum = hidden). ``fp8``: q and k hold e4m3 values times power-of-two
    scales; a backend with an fp8 kernel re-quantises them exactly. ``ties``: the plain backend's tie
    break (``topk`` or ``lowest``; default the backend's own). ``trim=False`` scores every key in one
    piece with no host synchronisation, so that the call can be captured in a CUDA graph (decode). The
    chunks are cut where the windows end: ``ke_host``, a CPU copy of ``ke`` from a caller that knows it,
    saves reading ``ke`` back from the device."""
    ops = get_backend(backend)
    R = q.shape[0]
    G, T = k.shape[0], k.shape[1]
    qpb = rows_per_cache(R, G)
    K = min(topk, T)
    ties = ties or ops.ties
    if fp8 and ops.fp8_operands is not None:
        q, w, k, k_scale = ops.fp8_operands(q, w, k)
    if not trim:
        logits = ops.indexer_logits(q, k, w, ks, ke, scale, k_scale, budget_bytes, clean=False)
        if mask is not None:
            _apply_mask(logits, _mask_rows(mask, G, qpb, 0, G, 0, R))
        return ops.topk(logits, K, ks, ke, row_len=T, ties=ties).to(index_dtype)
    out = torch.full((R, K), -1, dtype=index_dtype, device=q.device)
    ends = (ke if ke_host is None else ke_host).cpu()  # one read of the windows, not one per chunk
    step = chunk_rows(T * 4 * 2, budget_bytes)  # the chunk's logits and the top-k's masked copy
    for g0, g1, r0, r1 in row_chunks(R, G, step):
        t_end = max(1, min(T, int(ends[r0:r1].max())))  # no row of this chunk sees a key beyond t_end
        sc = None if k_scale is None else k_scale[g0:g1, :t_end]
        logits = ops.indexer_logits(q[r0:r1], k[g0:g1, :t_end], w[r0:r1], ks[r0:r1], ke[r0:r1], scale, sc,
                                    budget_bytes, clean=False)
        if mask is not None:
            _apply_mask(logits, _mask_rows(mask, G, qpb, g0, g1, r0, r1)[:, :t_end])
        out[r0:r1] = ops.topk(logits, K, ks[r0:r1], ke[r0:r1], row_len=T, ties=ties)
    return out


def indexer_topk_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    topk: int,
    scale: float = 1.0,
    backend: str | Backend = "torch",
    k_scale: torch.Tensor | None = None,
    stride: int = 32,
    cap: int | None = None,
    index_dtype: torch.dtype = torch.long,
    stats: dict | None = None,
) -> torch.Tensor:
    """:func:`indexer_topk` without the ``[R, T]`` logits: the same top-``topk`` keys (up to exact ties) of
    each row, for long rows where writing and re-reading the logits costs more than scoring a sample.

    1. Every ``stride``-th key of each cache is scored (a ``1/stride`` share of the work): each row's
       threshold is the j-th largest of its sampled logits, with j chosen so that about 1.5 ``topk`` of the
       row's keys reach it. Rows whose window holds at most ``cap`` keys keep all of them.
    2. The scoring pass keeps only the logits at or above the threshold (``indexer_candidates``), at most
       ``cap`` (default: 2 ``topk`` rounded up to a power of two) per row.
    3. The top ``topk`` of a row's candidates are exact wherever at least ``topk`` (or the whole window)
       and at most ``cap`` keys reached the threshold; the other rows (the sample misled) are scored again
       whole and selected by the backend's top-k.

    ``stats``, a dict, receives ``rows``, ``fallback_rows`` and ``mean_candidates``."""
    ops = get_backend(backend)
    R = q.shape[0]
    G, T = k.shape[0], k.shape[1]
    qpb = rows_per_cache(R, G)
    K = min(topk, T)
    cap = cap or 1 << max(6, (2 * K - 1).bit_length())
    if cap < K:
        raise ValueError(f"cap {cap} is smaller than topk {K}")
    ks32, ke32 = ks.to(torch.int32).clamp(0, T), ke.to(torch.int32).clamp(0, T)
    n = (ke32 - ks32).clamp_min(0)
    # 1. the sample and each row's threshold
    ks_s, ke_s = (ks32 + stride - 1) // stride, (ke32 + stride - 1) // stride  # sampled keys j*stride in [ks, ke)
    sc_s = None if k_scale is None else k_scale[:, ::stride]
    sample = ops.indexer_logits(q, k[:, ::stride], w, ks_s, ke_s, scale, sc_s)
    n_s = (ke_s - ks_s).clamp_min(0)
    want = (3 * K * n_s.long() + 2 * n.long() - 1) // (2 * n.long().clamp_min(1))  # rounded up
    j = torch.minimum(want.clamp_min(1), n_s.long().clamp_min(1))
    jmax = min(int(j.max()) if R else 1, sample.shape[1])
    top = sample.topk(jmax, dim=-1).values if jmax else sample.new_full((R, 1), float("-inf"))
    tau = top.gather(1, (j.clamp_max(top.shape[1]) - 1).view(-1, 1)).squeeze(1)
    tau = torch.where((n <= cap) | (n_s == 0), torch.full_like(tau, float("-inf")), tau)
    # 2. the candidates, 3. the exact selection among them
    values, keys, count = ops.indexer_candidates(q, k, w, ks32, ke32, tau, cap, scale, k_scale)
    slot = torch.arange(cap, device=q.device).view(1, -1)
    values = values.masked_fill(slot >= count.view(-1, 1), float("-inf"))
    best = values.topk(min(K, cap), dim=-1)
    out = keys.gather(1, best.indices).to(index_dtype).masked_fill(best.values == float("-inf"), -1)
    bad = ((count < torch.minimum(n, torch.full_like(n, K))) | (count > cap)).nonzero().flatten()
    if stats is not None:
        stats.update(rows=R, fallback_rows=int(bad.numel()), mean_candidates=float(count.float().mean()) if R else 0.0)
    for c0 in range(0, bad.numel(), 64):  # the rows the sample misled: scored again whole, in chunks of 64
        rows = bad[c0 : c0 + 64]
        caches = torch.div(rows, qpb, rounding_mode="floor")
        sc = None if k_scale is None else k_scale[caches]
        logits = ops.indexer_logits(q[rows], k[caches], w[rows], ks32[rows], ke32[rows], scale, sc, clean=False)
        out[rows] = ops.topk(logits, K, ks32[rows], ke32[rows], row_len=T, ties=ops.ties).to(index_dtype)
    return out


def _mask_rows(mask: torch.Tensor, G: int, qpb: int, g0: int, g1: int, r0: int, r1: int) -> torch.Tensor:
    """The mask rows of query rows ``r0:r1`` (caches ``g0:g1``), [r1 - r0, T]."""
    if mask.dim() != 3 or mask.shape[1] != qpb or mask.shape[0] not in (1, G):
        raise ValueError(f"mask must be [{G} or 1, {qpb}, T], got {tuple(mask.shape)}")
    if g1 - g0 == 1:
        g = g0 if mask.shape[0] == G else 0
        return mask[g, r0 - g0 * qpb : r1 - g0 * qpb]
    part = mask[g0:g1] if mask.shape[0] == G else mask.expand(g1 - g0, -1, -1)
    return part.reshape(r1 - r0, mask.shape[-1])


def _apply_mask(logits: torch.Tensor, m: torch.Tensor) -> None:
    if m.dtype == torch.bool:
        logits.masked_fill_(~m, float("-inf"))
    else:
        hidden = m <= torch.finfo(m.dtype).min
        logits.add_(m.masked_fill(hidden, 0).float()).masked_fill_(hidden, float("-inf"))


def dense_scores(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float, q_pos: torch.Tensor,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> torch.Tensor:
    """Dense causal index scores of a batch, [B, S, T] fp32 (-inf where not visible; differentiable), from
    q [B,S,H,D], w [B,S,H], k [B,T,D] and query positions [S] (query s sees keys <= q_pos[s]).
    O(S*T) memory: for the warm-up loss and analysis."""
    B, S, H, D = q.shape
    ks, ke = causal_windows(q_pos, B)
    return indexer_logits(q.reshape(B * S, H, D), k, w.reshape(B * S, H), ks, ke, scale,
                          budget_bytes=budget_bytes).view(B, S, -1)


def causal_windows(q_pos: torch.Tensor, caches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows ``[0, q_pos + 1)`` for the queries of each of ``caches`` caches (rows cache-major)."""
    ke = (q_pos.to(torch.int32) + 1).repeat(caches)
    return torch.zeros_like(ke), ke


__all__ = ["causal_windows", "dense_scores", "indexer_logits", "indexer_scores_at", "indexer_topk",
           "indexer_topk_fused"]
