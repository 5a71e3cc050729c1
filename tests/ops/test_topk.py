"""ops/topk: the reference against a plain sort, and the Triton kernel's schedules against the reference
(CPU interpreter always; real shapes on a GPU). The selected sets must be equal except among exactly tied
values; nothing is rounded, so no tolerance is involved."""

from __future__ import annotations

import pytest
import torch
from markers import gpu, interpreter

from indexcache.ops.common import window_mask
from indexcache.ops.topk import topk as topk_ref


def same_sets_modulo_ties(idx: torch.Tensor, ref_idx: torch.Tensor, logits: torch.Tensor) -> None:
    """Row by row: the same number of valid indices, no repeats, and where the sets differ, every differing
    element ties the row's k-th selected value exactly."""
    for r in range(idx.shape[0]):
        a = set(idx[r].tolist()) - {-1}
        b = set(ref_idx[r].tolist()) - {-1}
        assert len(a) == len(b) == int((idx[r] >= 0).sum()), f"row {r}: {len(a)} vs {len(b)} indices (or repeats)"
        if a != b:
            kth = logits[r, list(b)].min().item()
            assert all(logits[r, i].item() == kth for i in a ^ b), f"row {r}: a differing index is no tie"


def _rows(g: torch.Generator, N: int = 400):
    x = torch.randn(7, N, generator=g)
    x[2] = torch.randint(0, 4, (N,), generator=g).float()  # massive exact ties
    x[3, 100:200] = float("-inf")
    x[4] = -x[4].abs()  # all negative
    ks = torch.tensor([0, 0, 3, 50, 0, 10, N - 1]).int()
    ke = torch.tensor([N, 20, N, N - 10, N, 34, N]).int()  # row 1: fewer than k; row 5: exactly k
    return x, ks, ke


def test_reference_against_a_sort():
    g = torch.Generator().manual_seed(5)
    x, ks, ke = _rows(g)
    k = 24
    out = topk_ref(x, k, ks, ke)
    inside = window_mask(ks, ke, x.shape[1])
    for r in range(x.shape[0]):
        vals = x[r].masked_fill(~inside[r], float("-inf"))
        n = int(torch.isfinite(vals).sum())
        want = vals.sort(descending=True).values[: min(k, n)]
        assert torch.equal(x[r, out[r, : len(want)].long()], want)
        assert (out[r, len(want):] == -1).all()
    low = topk_ref(x, k, ks, ke, ties="lowest")  # ties toward the lowest index
    thr = x[2, low[2].long()].min()
    chosen = sorted(i for i in low[2].tolist() if x[2, i] == thr)
    assert chosen == ((x[2, 3:] == thr).nonzero().flatten() + 3)[: len(chosen)].tolist()
    # ranking a prefix at the full row length: the same choice as scoring the whole row
    assert torch.equal(topk_ref(x[:, :300], k, ks.clamp_max(300), ke.clamp_max(300), row_len=400),
                       topk_ref(x.masked_fill(torch.arange(400) >= 300, float("-inf")), k,
                                ks.clamp_max(300), ke.clamp_max(300)))


@interpreter
@pytest.mark.parametrize("schedule", ["sample", "staged", "bucket", "rows", "split", "torch"])
def test_kernel_cpu(schedule):
    from indexcache.ops.topk.kernel import topk

    g = torch.Generator().manual_seed(11)
    x, ks, ke = _rows(g)
    N, k = x.shape[1], 24
    out = topk(x, k, ks, ke, schedule=schedule, block=64, segments=3, cap=64, seg_keys=96)
    same_sets_modulo_ties(out, topk_ref(x, k, ks, ke), x)
    if schedule == "torch":  # best first, as torch.topk orders them
        assert sorted(out[1].tolist()) == [-1] * 4 + list(range(20))
    else:  # a window of at most k keys comes back in index order
        assert out[1].tolist() == list(range(20)) + [-1] * 4
    assert sorted(out[5].tolist()) == list(range(10, 34))
    assert out[6].tolist() == [N - 1] + [-1] * (k - 1)
    inside = window_mask(ks, ke, N)
    for r in range(x.shape[0]):
        assert inside[r, out[r][out[r] >= 0].long()].all()
    if schedule not in ("split", "torch"):  # ties to the lowest indices, deterministically: the reference's "lowest"
        assert torch.equal(out.sort(-1).values, topk_ref(x, k, ks, ke, ties="lowest").sort(-1).values)


@interpreter
def test_torch_schedule_masks_only_given_windows_and_auto_picks_sample_then_bucket(monkeypatch):
    from indexcache.ops.topk.kernel import _mask_windows_kernel, topk
    from indexcache.ops.triton_support import LAST_COMPILED

    g = torch.Generator().manual_seed(13)
    wide = torch.randn(5, 300, generator=g)
    x = wide[:, 20:280]  # a row stride wider than the row
    ks = torch.tensor([0, 5, 0, 100, 259]).int()
    ke = torch.tensor([260, 200, 10, 101, 260]).int()
    masked = torch.empty_like(x.contiguous())
    _mask_windows_kernel[(5, 3)](x, ks, ke, masked, 260, x.stride(0), masked.stride(0), BLOCK=128)
    inside = window_mask(ks, ke, 260)
    assert torch.equal(masked[inside], x[inside]) and (masked[~inside] == float("-inf")).all()
    # no windows given: torch.topk itself, in its order
    assert torch.equal(topk(x, 24, schedule="torch"), x.topk(24, dim=-1).indices.int())
    same_sets_modulo_ties(topk(x, 24, ks, ke, schedule="torch"), topk_ref(x, 24, ks, ke), x)
    # many rows (here: more than the one "SM" the interpreter counts): sample while 2k fits the candidates
    LAST_COMPILED.clear()
    same_sets_modulo_ties(topk(x, 24, ks, ke, block=64, cap=64), topk_ref(x, 24, ks, ke), x)
    assert "topk_sample" in LAST_COMPILED and "topk_bucket" not in LAST_COMPILED
    LAST_COMPILED.clear()
    same_sets_modulo_ties(topk(x, 40, ks, ke, block=64, cap=64), topk_ref(x, 40, ks, ke), x)
    assert "topk_bucket" in LAST_COMPILED and "topk_sample" not in LAST_COMPILED
    # rows longer than sample was measured to win on go to bucket
    import indexcache.ops.topk.kernel as kernel

    LAST_COMPILED.clear()
    monkeypatch.setattr(kernel, "AUTO_SAMPLE_MAX_KEYS", 259)
    same_sets_modulo_ties(topk(x, 24, ks, ke, block=64, cap=64), topk_ref(x, 24, ks, ke), x)
    assert "topk_bucket" in LAST_COMPILED and "topk_sample" not in LAST_COMPILED
    # past the sample-size switch but inside auto's sample range: sample, with its larger (cap-key) sample
    LAST_COMPILED.clear()
    monkeypatch.setattr(kernel, "AUTO_SAMPLE_MAX_KEYS", 1 << 17)
    monkeypatch.setattr(kernel, "SAMPLE_MAX_KEYS", 259)
    same_sets_modulo_ties(topk(x, 24, ks, ke, block=64, cap=64), topk_ref(x, 24, ks, ke), x)
    assert "topk_sample" in LAST_COMPILED and "topk_bucket" not in LAST_COMPILED


@interpreter
@pytest.mark.parametrize("schedule", ["sample", "staged"])
def test_sample_schedules_fall_back_where_their_sample_misleads(schedule):
    from indexcache.ops.topk.kernel import topk

    g = torch.Generator().manual_seed(12)
    N, k, cap = 400, 24, 64
    x = torch.randn(6, N, generator=g)
    # the sample (cap 64: 32 keys) reads 16 runs of 2 keys, 26 apart; which keys those are:
    sampled = torch.zeros(N, dtype=torch.bool)
    for c in range(16):
        sampled[26 * c : 26 * c + 2] = True
    x[0, ~sampled] += 10.0  # every large key is outside the sample: far more than cap reach its threshold
    x[1, sampled] += 10.0  # every large key is inside it: fewer than k reach the threshold
    x[1, :2] += 20.0
    x[2] = torch.arange(N).float()  # sorted rows, both ways
    x[3] = -torch.arange(N).float()
    x[4, ::7] = float("-inf")
    ks = torch.zeros(6, dtype=torch.int32)
    ke = torch.full((6,), N, dtype=torch.int32)
    ke[5] = 60  # a window that fits the candidate registers whole
    # staged: 100 keys per collecting program, so each row's candidates arrive from four programs
    out = topk(x, k, ks, ke, schedule=schedule, block=64, cap=cap, seg_keys=100, sample_chunk=2)
    want = topk_ref(x, k, ks, ke, ties="lowest").sort(-1).values
    assert torch.equal(out.sort(-1).values, want)
    with pytest.raises(ValueError, match="cap a power of two"):
        topk(x, k, schedule=schedule, cap=32)
    with pytest.raises(ValueError, match="sample_keys must be"):
        topk(x, k, schedule=schedule, cap=cap, sample_keys=128)
    if schedule == "sample":
        # row 1 is recovered by one more read at the rank its count predicts; row 0 cannot be (its sample
        # holds no large key at any rank) and falls back to plain radix after one retry
        for retries, expect in ((2, [2, 1]), (0, [0, 2])):
            stats = torch.zeros(2, dtype=torch.int32)
            out = topk(x[:2], k, ks[:2], ke[:2], schedule="sample", block=64, cap=cap, sample_chunk=2,
                       retries=retries, stats=stats)
            assert torch.equal(out.sort(-1).values, want[:2]) and stats.tolist() == expect, (retries, stats)


@interpreter
def test_tally_counts_schedules_and_the_fallbacks_of_sample_and_bucket():
    from indexcache.ops.topk.kernel import tally, topk

    g = torch.Generator().manual_seed(15)
    N, k, cap = 400, 24, 64
    x = torch.randn(3, N, generator=g)
    x[1] = torch.randint(0, 3, (N,), generator=g).float()  # three values: far more than cap share each bucket
    sampled = torch.zeros(N, dtype=torch.bool)
    for c in range(16):
        sampled[26 * c : 26 * c + 2] = True
    x[2, ~sampled] += 10.0  # no large key in the sample: it can only fall back (see the test above)
    ks = torch.zeros(3, dtype=torch.int32)
    ke = torch.full((3,), N, dtype=torch.int32)
    want = topk_ref(x, k, ks, ke, ties="lowest").sort(-1).values
    with tally("cpu") as t:
        a = topk(x[1:], k, ks[1:], ke[1:], schedule="sample", block=64, cap=cap, sample_chunk=2, retries=0)
        b = topk(x, k, ks, ke, schedule="bucket", block=64, cap=cap)
        own = torch.zeros(2, dtype=torch.int32)  # a call given its own stats keeps them
        topk(x[2:], k, ks[2:], ke[2:], schedule="sample", block=64, cap=cap, sample_chunk=2, retries=0, stats=own)
    assert torch.equal(a.sort(-1).values, want[1:]) and torch.equal(b.sort(-1).values, want)
    summary = t.summary()
    assert summary["schedules"] == {"bucket": {"calls": 1, "rows": 3}, "sample": {"calls": 2, "rows": 3}}
    # sample without retries: the tied row and the misled row fall back; bucket: only the tied row's bucket
    # overflows (the misled row's large keys spread over the buckets above the rest), the random row's none
    assert summary["sample_reread_rows"] == 0 and summary["radix_fallback_rows"] == 2 + 1, summary
    assert own.tolist() == [0, 1]
    topk(x, k, ks, ke, schedule="bucket", block=64, cap=cap)  # outside the block: nothing counted
    assert t.counts.tolist() == [0, 3]


@interpreter
def test_staged_selection_keeps_the_lowest_tied_indices_whatever_order_the_candidates_arrived_in():
    from indexcache.ops.topk.kernel import _staged_select_kernel

    g = torch.Generator().manual_seed(14)
    N, k, cap = 400, 24, 64
    x = torch.randn(2, N, generator=g)
    above = torch.randperm(N, generator=g)[:10]
    x[:, above] = 5.0 + torch.rand(10, generator=g)  # ten keys above the threshold
    rest = torch.tensor([i for i in range(N) if i not in set(above.tolist())])
    tied = rest[torch.randperm(rest.numel(), generator=g)[:30]]
    x[:, tied] = 4.0  # thirty keys tied at it, of which the top 24 take 14
    x[1, tied[:3]] = 4.5  # row 1: three of them above, eleven ties to take
    ks = torch.zeros(2, dtype=torch.int32)
    ke = torch.full((2,), N, dtype=torch.int32)
    cand = torch.zeros(2, cap, dtype=torch.int32)
    cnt = torch.zeros(2, dtype=torch.int32)
    for r in range(2):  # the candidates (keys >= 4.0) in a scrambled arrival order
        c = (x[r] >= 4.0).nonzero().flatten()
        cand[r, : c.numel()] = c[torch.randperm(c.numel(), generator=g)].int()
        cnt[r] = c.numel()
    out = torch.full((2, k), -7, dtype=torch.int32)
    _staged_select_kernel[(2,)](x, ks, ke, cnt, cand, out, N, x.stride(0), out.stride(0), k, KP=32, BLOCK=64,
                                CAP=cap)
    want = topk_ref(x, k, ks, ke, ties="lowest")
    assert torch.equal(out.sort(-1).values, want.sort(-1).values)


@interpreter
def test_kernel_rejects_bad_input():
    from indexcache.ops.topk.kernel import topk

    with pytest.raises(ValueError, match="fp32"):
        topk(torch.randn(2, 10).half(), 4)
    with pytest.raises(ValueError, match="4096"):
        topk(torch.randn(2, 10), 5000)


@gpu
def test_kernel_gpu():
    from indexcache.ops.topk.kernel import topk

    g = torch.Generator(device="cuda").manual_seed(0)
    R, N, k = 256, 70000, 2048
    x = torch.randn(R, N, device="cuda", generator=g)
    ke = torch.randint(1, N + 1, (R,), device="cuda", generator=g, dtype=torch.int32)
    ks = (ke - torch.randint(0, 20000, (R,), device="cuda", generator=g, dtype=torch.int32)).clamp_min(0)
    ke[0], ks[0] = 1000, 0  # shorter than k
    for schedule in ("sample", "staged", "bucket", "rows", "split", "torch"):
        out = topk(x, k, ks, ke, schedule=schedule)
        same_sets_modulo_ties(out.cpu(), topk_ref(x, k, ks, ke).cpu(), x.cpu())
    long = torch.randn(2, 262144, device="cuda", generator=g)
    zero, full = torch.zeros(2, device="cuda"), torch.full((2,), 262144, device="cuda")
    for schedule in ("sample", "staged", "bucket", "rows", "split", "torch"):
        out = topk(long, k, schedule=schedule)
        same_sets_modulo_ties(out.cpu(), topk_ref(long, k, zero, full).cpu(), long.cpu())
