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


__all__ = ["causal_windows", "dense_scores", "indexer_logits", "indexer_scores_at", "indexer_topk"]
