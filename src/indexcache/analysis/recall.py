"""Indexer recall: the fraction of a layer's head-averaged (dense) attention mass that falls inside
its indexer's top-k, over queries that see more than k tokens, against the mass k random visible
tokens would hold (k / visible)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DataError
from ..model.dsa import DSAForCausalLM, Trace


@torch.no_grad()
def indexer_recall(model: DSAForCausalLM, batches: Sequence[torch.Tensor]) -> dict:
    cfg = model.config
    k = cfg.index_topk
    layers = model.indexer_layers
    mass = torch.zeros(len(layers), dtype=torch.float64)
    rand = 0.0
    n = 0
    for ids in batches:
        ids = ids.to(model.device)
        S = ids.shape[1]
        if S <= k:
            raise DataError(f"sequences of {S} tokens are not longer than index_topk={k}")
        tr = Trace(indices=True, attn=True, layers=set(layers))
        model(ids, dense=True, trace=tr)
        far = torch.arange(k, S, device=ids.device)
        for li, layer in enumerate(layers):
            p = tr.records[layer].attn[:, k:]  # [B, S-k, T] dense attention of far queries
            idx = tr.records[layer].indices[:, k:]
            mass[li] += p.gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, 0).sum(-1).double().sum().cpu()
        rand += float((k / (far + 1).double()).sum()) * ids.shape[0]
        n += (S - k) * ids.shape[0]
    per_layer = (mass / n).tolist()
    return {"layers": layers, "recall": per_layer, "mean_recall": sum(per_layer) / len(per_layer),
            "random_baseline": rand / n, "index_topk": k}
