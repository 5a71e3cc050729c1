"""Top-k per row inside a key window, in plain PyTorch: the reference of :mod:`.kernel`."""

from __future__ import annotations

import torch

from ..common import window_mask


def topk(
    logits: torch.Tensor,
    k: int,
    ks: torch.Tensor,
    ke: torch.Tensor,
    row_len: int | None = None,
    ties: str = "topk",
) -> torch.Tensor:
    """Indices of the ``k`` largest logits of each row inside ``[ks, ke)``: int32 ``[R, k]``, best first,
    ``-1`` where the window holds fewer than ``k`` keys.

    ``ties``: ``"topk"`` keeps the exactly tied keys that ``torch.topk`` keeps on rows of ``row_len``
    (default: the logits' width; torch.topk breaks exact ties differently for different row lengths, so a
    caller that scores a prefix of the keys passes the full length to get the same choice);
    ``"lowest"`` keeps the lowest indices among ties, as the kernel does."""
    R, n = logits.shape
    row_len = n if row_len is None else max(row_len, n)
    masked = logits.float().masked_fill(~window_mask(ks, ke, n), float("-inf"))
    if row_len > n:
        masked = torch.cat((masked, masked.new_full((R, row_len - n), float("-inf"))), dim=1)
    kk = min(k, row_len)
    if ties == "lowest":  # a stable descending sort puts equal scores in index order
        vals, idx = masked.sort(dim=-1, descending=True, stable=True)
        vals, idx = vals[:, :kk], idx[:, :kk]
    elif ties == "topk":
        vals, idx = masked.topk(kk, dim=-1)
    else:
        raise ValueError(f"unknown tie break {ties!r} (topk or lowest)")
    idx = idx.masked_fill(vals == float("-inf"), -1).int()
    if kk < k:
        idx = torch.cat((idx, idx.new_full((R, k - kk), -1)), dim=1)
    return idx


__all__ = ["topk"]
