"""Indexer distillation losses of DSA, and IndexCache's multi-layer version.

DSA (DeepSeek-V3.2): the indexer of layer l is trained with KL(p_t || q_t), where p_t is the main
attention of layer l summed over heads and L1-normalised (= the head average of the softmaxes) and
q_t = softmax(I_t). Dense warm-up: over every visible token. Sparse stage: over the selected set
S_t only, both distributions renormalised there. The indexer's inputs are detached, so this loss
trains the indexer alone, and the LM loss (which cannot reach the indexer through a discrete top-k)
trains everything else.

IndexCache, training-aware (paper Eq. 1): a Full layer l serving Shared layers l+1..l+m is trained with

    L_multi = sum_{j=0..m} 1/(m+1) * KL(p^(l+j) || q^(l))

computed the cheap way the paper describes: each served layer adds its own term against the Full
layer's q. ``cross_layer=False`` keeps only j = 0 (the "w/o cross-layer loss" ablation).
"""

from __future__ import annotations

import torch

from ..ops.indexer import dense_scores, indexer_scores_at
from ..pattern import Pattern


def kl_rows(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) = sum_s p (log p - log q). ``p`` is renormalised over its row
    (a restricted target sums to one over its support); zero-probability entries contribute nothing,
    wherever ``log_q`` is -inf."""
    p = p.float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    pos = p > 0
    plogp = torch.where(pos, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    plogq = torch.where(pos, p * log_q.float(), torch.zeros_like(p))
    return (plogp - plogq).sum(-1).mean()


def index_log_probs(attn, x: torch.Tensor, qr: torch.Tensor, ctx, indices: torch.Tensor | None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax of the layer's index scores, from detached inputs: over every visible token
    (``indices`` None, [B,S,T]) or over the selected slots ([B,S,K], -inf at -1 slots). With ``rows``
    (query slots), only those query rows: [B,len(rows),T] or, with ``indices`` given for those rows, [B,len(rows),K]."""
    ind = attn.indexer
    q, w, k = ind.project(x.detach(), qr.detach(), ctx)
    q_pos = ctx.slots
    if rows is not None:  # projected whole (RoPE by position), then cut to the rows
        q, w, q_pos = q[:, rows], w[:, rows], ctx.slots[rows]
    if indices is None:
        scores = dense_scores(q, w, k, ind.softmax_scale, q_pos, ctx.budget_bytes)
    else:
        scores = indexer_scores_at(q, w, k, ind.softmax_scale, indices)
    return torch.log_softmax(scores, dim=-1)


class IndexerDistillation:
    """Per-layer collector (``Context.collect``) that accumulates the indexer loss of one forward.

    Pass it to ``model(ids, collect=...)`` and call :meth:`finish` after the forward: it returns the
    summed multi-layer KL over Full layers (each term averaged over query rows: all of them, or the
    sample that ``model(..., kl_rows=)`` names); ``terms`` holds the
    value of each (Full layer, served layer) term.

    With ``backward_scale`` set, each sharing block's loss is back-propagated (times the scale) as soon
    as the block closes. This is exact, because a block's loss reaches only its own Full layer's indexer
    (inputs and targets are detached), and it keeps one block's dense [B, S, T] graph alive at a time
    instead of all of them. The returned loss is then detached.
    """

    def __init__(self, pattern: Pattern, cross_layer: bool = True, backward_scale: float | None = None):
        self.pattern = pattern
        self.cross_layer = cross_layer
        self.backward_scale = backward_scale
        self.block = {b.start: b.size for b in pattern.blocks}
        self.loss: torch.Tensor | None = None
        self.terms: dict[tuple[int, int], float] = {}
        self._block_loss: torch.Tensor | None = None
        self._log_q: torch.Tensor | None = None
        self._src = -1

    def _close_block(self) -> None:
        bl = self._block_loss
        if bl is None:
            return
        if self.backward_scale is not None:
            if bl.requires_grad:
                (self.backward_scale * bl).backward()
            bl = bl.detach()
        self.loss = bl if self.loss is None else self.loss + bl
        self._block_loss = None
        self._log_q = None

    def finish(self) -> torch.Tensor | None:
        self._close_block()
        return self.loss

    def __call__(self, *, layer, full, attn, x, qr, indices, probs, ctx, rows=None) -> None:
        if full:
            if attn.indexer is None:
                raise ValueError(f"layer {layer} is Full but has no indexer to train")
            self._close_block()
            self._log_q = index_log_probs(attn, x, qr, ctx, indices, rows)
            self._src = layer
        elif not self.cross_layer or self._log_q is None:
            return
        weight = 1.0 / self.block[self._src] if self.cross_layer else 1.0
        term = kl_rows(probs.detach(), self._log_q)
        self.terms[(self._src, layer)] = float(term.detach())
        self._block_loss = weight * term if self._block_loss is None else self._block_loss + weight * term
