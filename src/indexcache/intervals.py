"""95% bootstrap intervals: the one implementation behind every interval the toolkit reports (task scores,
perplexity, paired differences between patterns, a search step's margin).

Percentile bootstrap: resample the units (samples, windows) with replacement, recompute the statistic,
take the 2.5% and 97.5% quantiles. A task average is stratified: each family's samples are resampled
within the family, so every resample keeps every family's sample count, as the suite does. A paired
difference resamples the same units for both sides (every pattern is scored on the same samples), which
is what makes small differences measurable at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

RESAMPLES = 2000
LEVELS = (0.025, 0.975)


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """``[resamples, n]`` indices drawn with replacement from ``range(n)`` (seeded: reports reproduce)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=g)


def quantiles(values: torch.Tensor) -> list[float]:
    """The 2.5% and 97.5% quantiles of a statistic's resampled values (1-D)."""
    return torch.quantile(values.double().flatten(), torch.tensor(LEVELS, dtype=torch.float64)).tolist()


def mean_ci(values: Sequence[float] | torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """The mean's 95% interval over the units in ``values``; a single unit gives ``[v, v]``."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("no values to take an interval of")
    if x.numel() == 1:
        return [float(x[0]), float(x[0])]
    return quantiles(x[resample_indices(x.numel(), resamples, seed)].mean(-1))


def _family_means(groups: Mapping[str, Sequence[float]], resamples: int, seed: int) -> torch.Tensor:
    """``[families, resamples]``: each family's mean under its own resampling of its samples."""
    rows = []
    for j, (_, v) in enumerate(sorted(groups.items())):
        x = torch.as_tensor(v, dtype=torch.float64)
        rows.append(x[resample_indices(x.numel(), resamples, seed + j)].mean(-1))
    return torch.stack(rows)


def average_ci(groups: Mapping[str, Sequence[float]], resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """The 95% interval of the average of the families' mean scores, each family resampled on its own."""
    groups = {k: v for k, v in groups.items() if len(v)}
    if not groups:
        raise ValueError("no scores to take an interval of")
    return quantiles(_family_means(groups, resamples, seed).mean(0))


def paired_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``a``'s average minus ``b``'s, where both scored the same samples (same families, same order): the
    difference, its 95% interval (the same resampled samples for both), and ``within_noise`` when the
    interval contains zero."""
    fams = sorted(k for k in a if len(a[k]))
    if fams != sorted(k for k in b if len(b[k])) or any(len(a[f]) != len(b[f]) for f in fams):
        raise ValueError("a paired difference needs both sides scored on the same samples")
    diff = {f: [x - y for x, y in zip(a[f], b[f], strict=True)] for f in fams}
    point = sum(sum(v) / len(v) for v in diff.values()) / len(diff)
    lo, hi = average_ci(diff, resamples, seed)
    return {"difference": point, "ci95": [lo, hi], "within_noise": lo <= 0.0 <= hi}


__all__ = ["LEVELS", "RESAMPLES", "average_ci", "mean_ci", "paired_difference", "quantiles", "resample_indices"]
