"""Cross-layer top-k overlap (the paper's Figure 4): mean |T_i ∩ T_j| / k over queries that see more
than k tokens, for the per-layer top-k sets of the all-Full model."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..ops.common import DEFAULT_BUDGET_BYTES
from ..pattern import Pattern
from ..runner import LayerRunner, as_runner


@torch.no_grad()
def overlap_matrix(runner: LayerRunner, batches: Sequence[torch.Tensor], progress: bool = True,
                   budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """Mean |T_i ∩ T_j| / k over the queries that see more than k tokens, from one all-Full pass per batch
    through the layer runner."""
    runner = as_runner(runner)
    n, k = runner.num_layers, runner.config.index_topk
    if len(runner.indexer_layers) != n:
        raise DataError("overlap needs an indexer on every layer (load the model all-Full)")
    total = torch.zeros(n, n, dtype=torch.float64)
    queries = 0
    full = Pattern.all_full(n)
    for ids in tqdm(batches, desc="overlap", unit="batch", disable=not progress, leave=False):
        S = ids.shape[1]
        if S <= k:
            raise DataError(f"sequences of {S} tokens are not longer than index_topk={k}: all sets are equal")
        _, chosen = runner.run(runner.start(ids), full, 0, n, selections=True)
        idx = torch.stack([chosen[i][:, k:] for i in range(n)])  # [N, B, S-k, k], all valid
        B, Sq = idx.shape[1], idx.shape[2]
        step = max(1, budget_bytes // max(n * B * S * 5, 1))  # bool masks and their float copy
        for q0 in range(0, Sq, step):
            part = idx[:, :, q0 : q0 + step]
            masks = torch.zeros(n, *part.shape[1:3], S, dtype=torch.bool, device=part.device)
            masks.scatter_(-1, part, True)
            flat = masks.flatten(1, 2).float()  # [N, B*q, S]
            inter = torch.einsum("iqs,jqs->ij", flat, flat)  # summed intersection sizes
            total += inter.double().cpu()
        queries += B * Sq
    return total / (queries * k)


def write_csv(matrix: torch.Tensor, path: Path) -> None:
    n = matrix.shape[0]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer"] + [str(j) for j in range(n)])
        for i in range(n):
            w.writerow([str(i)] + [f"{matrix[i, j]:.4f}" for j in range(n)])


def plot_heatmap(matrix: torch.Tensor, path: Path, pattern: Pattern | None = None, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=120)
    im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=1, origin="upper")
    fig.colorbar(im, ax=ax, label="top-k overlap |T_i ∩ T_j| / k")
    if pattern is not None:
        for b in pattern.blocks:
            ax.add_patch(Rectangle((b.start - 0.5, b.start - 0.5), b.size, b.size, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    ax.set_title(title or f"cross-layer top-k overlap ({n} layers)")
    fig.tight_layout()
    fig.savefig(path, format="png")  # path may be a temporary name without .png
    plt.close(fig)
