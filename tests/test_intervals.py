"""The bootstrap intervals every report uses: what they contain, that a task average resamples each
family within itself, and that a paired difference resamples the same samples on both sides."""

import pytest
import torch

from indexcache.intervals import average_ci, mean_ci, paired_difference, resample_indices


def test_mean_interval_contains_the_mean_and_narrows_with_more_samples():
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(20, generator=g) < 0.5).double()
    large = (torch.rand(500, generator=g) < 0.5).double()
    lo_s, hi_s = mean_ci(small)
    lo_l, hi_l = mean_ci(large)
    assert lo_s <= float(small.mean()) <= hi_s and lo_l <= float(large.mean()) <= hi_l
    # a proportion near 1/2: the interval's half-width is about 1.96 * 0.5 / sqrt(n)
    assert 0.15 < (hi_s - lo_s) / 2 < 0.30 and 0.03 < (hi_l - lo_l) / 2 < 0.06
    assert mean_ci([3.0, 3.0, 3.0]) == [3.0, 3.0] and mean_ci([2.5]) == [2.5, 2.5]
    with pytest.raises(ValueError):
        mean_ci([])


def test_resampling_is_seeded():
    assert torch.equal(resample_indices(7, 50, seed=3), resample_indices(7, 50, seed=3))
    assert not torch.equal(resample_indices(7, 50, seed=3), resample_indices(7, 50, seed=4))


def test_task_average_keeps_every_family_whole():
    # a family that always scores 1 and one that always scores 0: resampled within each family the
    # average is 1/2 in every resample; pooled resampling would spread it
    assert average_ci({"a": [1.0] * 10, "b": [0.0] * 30}) == [0.5, 0.5]
    lo, hi = average_ci({"a": [1.0, 0.0] * 10, "b": [0.0] * 30})
    assert lo < 0.25 < hi


def test_paired_difference_resamples_the_same_samples():
    g = torch.Generator().manual_seed(1)
    a = {"x": torch.rand(40, generator=g).tolist(), "y": torch.rand(25, generator=g).tolist()}
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["within_noise"]
    shifted = {f: [v + 0.1 for v in vals] for f, vals in a.items()}
    d = paired_difference(shifted, a)
    # every sample moved by exactly 0.1: paired, the interval is that shift alone (unpaired it would be wide)
    assert d["difference"] == pytest.approx(0.1) and d["ci95"] == pytest.approx([0.1, 0.1]) and not d["within_noise"]
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(a, {"x": a["x"]})
