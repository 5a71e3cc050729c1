"""The objective search and evaluation share: summed next-token cross-entropy of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) of a batch, and the number of predicted tokens."""
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum")
    return float(loss), ids[:, 1:].numel()
