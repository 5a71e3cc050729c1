"""Mean next-token loss of a model on fixed token windows (the objective search and eval share)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .pattern import Pattern


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
        logits = model(ids, pattern=pattern)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
        bar.update(ids.shape[0])
    bar.close()
    return total / max(count, 1)
