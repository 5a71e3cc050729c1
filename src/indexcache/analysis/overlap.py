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
                   budget_bytes: int = DEFAULT_BUDGET_BYTES, first_query: int | None = None) -> torch.Tensor:
    """[N, N] over the pattern positions: sum |T_i ∩ T_j| / sum |T_i| over the queries whose selection is
    restrictive (they see more than a selection holds), from one all-Full pass per batch through the layer
    runner. ``first_query``: the first such query position (default ``index_topk``, right for token
    selections; :meth:`indexcache.architectures.ModelInfo.first_restrictive_query` gives it for the others)."""
    inter, size = overlap_by_head(runner, batches, progress, budget_bytes, first_query)
    return inter.sum(0) / size.sum(0).view(-1, 1)


@torch.no_grad()
def overlap_by_head(runner: LayerRunner, batches: Sequence[torch.Tensor], progress: bool = True,
                    budget_bytes: int = DEFAULT_BUDGET_BYTES, first_query: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums behind :func:`overlap_matrix`, per indexer head (one head where a selection serves every
    head): intersections [H, N, N] and selection sizes [H, N]. Head h's own matrix is
    ``inter[h] / size[h].view(-1, 1)``."""
    runner = as_runner(runner)
    n, slots = len(runner.slots), runner.slots
    if len(runner.indexer_layers) != n:
        raise DataError("overlap needs an indexer on every indexer layer (load the model all-Full)")
    first = runner.config.index_topk if first_query is None else first_query
    inter_sum: torch.Tensor | None = None
    size_sum: torch.Tensor | None = None
    full = Pattern.all_full(n)
    for ids in tqdm(batches, desc="overlap", unit="batch", disable=not progress, leave=False):
        S = ids.shape[1]
        if S <= first:
            raise DataError(f"sequences of {S} tokens are too short: a query keeps everything it sees before "
                            f"position {first}, so all selections are equal")
        _, chosen = runner.run(runner.start(ids), full, 0, runner.num_layers, selections=True)
        sel = [chosen[layer] for layer in slots]
        heads = 1 if sel[0].dim() == 3 else sel[0].shape[1]
        if heads == 1 and sel[0].dim() == 4:
            sel = [t[:, 0] for t in sel]
        # [N, H, B, S-first, K]: per-head selections of the restrictive queries
        idx = torch.stack([t.unsqueeze(1) if t.dim() == 3 else t.transpose(0, 1) for t in sel])[..., first:, :]
        idx = idx.transpose(1, 2) if heads == 1 else idx
        width = int(idx.max()) + 2  # the last column takes the -1 slots
        if inter_sum is None:
            inter_sum = torch.zeros(heads, n, n, dtype=torch.float64)
            size_sum = torch.zeros(heads, n, dtype=torch.float64)
        for h in range(heads):
            part_all = idx[:, h] if heads > 1 else idx[:, 0]  # [N, B, Sq, K]
            B, Sq = part_all.shape[1], part_all.shape[2]
            step = max(1, budget_bytes // max(n * B * width * 5, 1))  # bool masks and their float copy
            for q0 in range(0, Sq, step):
                part = part_all[:, :, q0 : q0 + step].long()
                part = torch.where(part < 0, width - 1, part)
                masks = torch.zeros(n, *part.shape[1:3], width, dtype=torch.bool, device=part.device)
                masks.scatter_(-1, part, True)
                flat = masks[..., : width - 1].flatten(1, 2).float()  # [N, B*q, width-1]
                inter_sum[h] += torch.einsum("iqs,jqs->ij", flat, flat).double().cpu()
                size_sum[h] += flat.sum((1, 2)).double().cpu()
    return inter_sum, size_sum


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
