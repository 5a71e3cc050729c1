"""What every op shares: the memory budget of chunked work and the per-row key windows.

The flat layout of every op: ``R`` query rows against ``G`` key caches of ``T`` slots each (``k [G, T, D]``);
row ``r`` reads cache ``r // (R // G)`` and, in it, the key window ``[ks[r], ke[r])``. A batched forward is
``G = B`` caches of ``R / G = S`` queries; a decode step is ``G = B`` caches of one query; a prefill of one
request is one cache. Indices are positions inside a row's own cache.
"""

from __future__ import annotations

import torch

DEFAULT_BUDGET_BYTES = 256 << 20


def chunk_rows(per_row_bytes: int, budget: int) -> int:
    """How many rows of ``per_row_bytes`` fit the budget (at least one)."""
    return max(1, budget // max(per_row_bytes, 1))


def window_mask(ks: torch.Tensor, ke: torch.Tensor, n: int) -> torch.Tensor:
    """[R, n] bool: key t is inside row r's window [ks[r], ke[r])."""
    t = torch.arange(n, device=ks.device)
    return (t.view(1, -1) >= ks.view(-1, 1).long()) & (t.view(1, -1) < ke.view(-1, 1).long())


def rows_per_cache(rows: int, caches: int) -> int:
    if caches < 1 or rows % caches:
        raise ValueError(f"{rows} query rows do not split evenly over {caches} key caches")
    return rows // caches


def row_chunks(rows: int, caches: int, step: int):
    """``(g0, g1, r0, r1)`` pieces covering the rows in order, each either whole caches or rows of one cache,
    with at most ``max(step, rows per cache)`` rows (whole caches) or ``step`` rows (inside one cache)."""
    qpb = rows_per_cache(rows, caches)
    if step >= qpb:
        per = step // qpb
        for g0 in range(0, caches, per):
            g1 = min(caches, g0 + per)
            yield g0, g1, g0 * qpb, g1 * qpb
        return
    for g in range(caches):
        for s0 in range(0, qpb, step):
            yield g, g + 1, g * qpb + s0, g * qpb + min(qpb, s0 + step)


__all__ = ["DEFAULT_BUDGET_BYTES", "chunk_rows", "row_chunks", "rows_per_cache", "window_mask"]
