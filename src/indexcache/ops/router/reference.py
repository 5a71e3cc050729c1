"""The MoE router in plain PyTorch: the reference of :mod:`.kernel` and the math of the model's ``Gate``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing weights [N, k] fp32, experts [N, k] int64) of tokens x [N, D] over ``weight`` [E, D] experts.

    Scores are ``sigmoid(x . w_e)`` in fp32. The experts are the top k of ``score + bias``, where with
    ``n_group`` > 1 only the ``topk_group`` groups of E / n_group experts whose two best biased scores sum
    highest take part. The bias steers the selection only: the weights are the chosen experts' scores,
    normalised to sum to one with ``norm_topk_prob``, times ``scale``."""
    scores = F.linear(x.float(), weight.float()).sigmoid()  # [N, E]
    choice = scores + bias.float()
    E = weight.shape[0]
    if n_group > 1:
        groups = choice.view(-1, n_group, E // n_group)
        group_score = groups.topk(2, dim=-1).values.sum(-1)  # [N, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, idx


__all__ = ["route"]
