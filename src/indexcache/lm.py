"""Mean next-token loss of a model on fixed token windows (the objective search and eval share)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .pattern import Pattern


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) of a batch, and the number of predicted tokens."""
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum")
    return float(loss), ids[:, 1:].numel()


@torch.no_grad()
def lm_loss(
    model,
    windows: torch.Tensor,
    pattern: Pattern | str | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "loss",
) -> float:
    """Mean cross-entropy (nats/token) over every predicted position of every window."""
    total, count = 0.0, 0
    dev = model.device
    bar = tqdm(total=windows.shape[0], desc=desc, unit="seq", disable=not progress, leave=False)
    for b0 in range(0, windows.shape[0], batch_size):
        ids = windows[b0 : b0 + batch_size].to(dev)
        nll, n = next_token_nll(model(ids, pattern=pattern), ids)
        total += nll
        count += n
        bar.update(ids.shape[0])
    bar.close()
    return total / max(count, 1)
