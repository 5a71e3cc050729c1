"""The objective search and evaluation share: summed next-token cross-entropy of a batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .ops.common import DEFAULT_BUDGET_BYTES


@torch.no_grad()
def head_nll_rows(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ids: torch.Tensor,
                  vocab: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[list[float], int]:
    """Each row's summed next-token cross-entropy of ``head(hidden)`` (final norm and LM head), and the
    tokens predicted per row. The head runs on chunks of positions, so that the [B, S, vocab] logits never
    exist at once (16 GiB in fp32 at 32K tokens with DeepSeek's 129K vocabulary)."""
    B, S = hidden.shape[0], hidden.shape[1]
    step = max(1, budget_bytes // max(B * vocab * 4, 1))
    rows = torch.zeros(B, dtype=torch.float64)
    for s0 in range(0, S - 1, step):
        s1 = min(S - 1, s0 + step)
        logits = head(hidden[:, s0:s1])
        target = ids[:, s0 + 1 : s1 + 1].to(logits.device)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
        rows += ce.view(B, -1).sum(1, dtype=torch.float64).cpu()
    return rows.tolist(), S - 1


def head_nll_chunked(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ids: torch.Tensor,
                     vocab: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[float, int]:
    """The batch's summed next-token cross-entropy (nats) and the number of predicted tokens
    (:func:`head_nll_rows`, summed over the rows)."""
    rows, per_row = head_nll_rows(head, hidden, ids, vocab, budget_bytes)
    return sum(rows), per_row * len(rows)
