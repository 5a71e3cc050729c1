"""Exact top-k per row in Triton (k up to 4096, rows of any length), by radix selection.

fp32 logits map to order-preserving int32 keys (the bits of a float, with the magnitude bits of
negatives flipped, compare as signed integers the way the floats compare). Four histogram passes find
the k-th largest key digit by digit (8 bits each): each pass counts, among the keys that share the digits
fixed so far, how many fall in each bin, and fixes the bin where the running count from the top reaches
k. After them the threshold key ``T`` is exact and so is
the number of ties to keep; a last pass writes every key ``> T`` and the first ties ``== T`` in index
order (so ties go to the lowest indices, deterministically). Only the row's window ``[ks, ke)`` is read;
a window of at most k keys returns its indices directly, ``-1`` filling the rest.

Five schedules, and ``torch`` (torch.topk on the windows, which ``auto`` picks for tens of long decode
rows, where it was measured faster):

* ``sample`` (prefill, the default for many rows of up to 64K keys: measured faster than ``bucket`` and
  torch.topk there on random logits, and slower than ``bucket`` in the engine's 200K prefill): one
  program per row and one streaming read. A sample of the row (``cap / 2`` keys, ``cap`` beyond 64K, in 16
  evenly spread runs by default) gives a threshold, its j-th largest key with j chosen so that about
  1.5 k of the row's keys reach it; one pass writes those keys' indices to a candidate list (at most
  ``cap``, at least 2 k), and four digit passes in registers pick the exact top k among them. At least j
  keys always reach the threshold; where fewer than k or more than ``cap`` do (the sample misled), the
  row is read again at the rank its count predicts (up to ``retries`` times), then falls back to
  ``rows``. Exact either way.

* ``staged`` (prefill; to be measured against ``sample``): the sample schedule in three kernels. One
  program per row finds the threshold from the sample; programs of ``seg_keys`` keys each read the row and
  reserve candidate slots per tile with an atomic counter; one program per row selects among the
  candidates, breaking the threshold's ties by index so the set equals ``sample``'s. The read then runs in
  many light programs instead of one register-heavy program per row.
* ``bucket`` (prefill, for k above ``cap / 2``): one program per row. Three streaming reads instead of
  five: the range [lo, hi] of the row's finite values; a histogram of 256 equal-width buckets of it, which
  fixes the bucket holding the k-th value; then every key above that bucket goes straight to the output
  and the bucket's own keys (a few hundred on real logits) to a candidate list, on which the four digit
  passes run in registers. The bucket map is monotone, so this is exact. A bucket with more than ``cap``
  keys (heavy ties, clustered values) falls back to ``rows`` inside the kernel.
* ``rows``: one program per row, the histogram in registers, five streaming reads of the row.
* ``split`` (decode: few long rows): each row is cut into ``P`` segments handled by ``P`` programs
  that add their histograms into a global one with atomics; a tiny program per row turns the histogram
  into the next digit. The compaction reserves output slots with atomic counters, so the order inside
  the output (but not the set) varies between runs, and ties are kept in arrival order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..triton_support import HAVE_TRITON, LAST_COMPILED, require_triton

NB = 256  # four passes of 8-bit digits
SAMPLE_MAX_KEYS = 65536  # beyond this many keys the sample schedule samples cap keys instead of cap / 2
AUTO_SAMPLE_MAX_KEYS = 131072  # auto's longest rows for the sample schedule (measured on engine logits; see topk)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    # module constants a kernel may read must be constexpr objects
    C_NB = tl.constexpr(NB)

    @triton.jit
    def _keys(x):
        b = x.to(tl.int32, bitcast=True)
        return b ^ ((b >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _window(KS, KE, r, N):
        """Row r's key window [ks, ke), clipped to the row."""
        return tl.maximum(tl.load(KS + r), 0), tl.minimum(tl.load(KE + r), N)

    @triton.jit
    def _row(X, OUT, KS, KE, r, N, sx_r, so_r):
        """Row r's logits and output pointers and its key window."""
        ks, ke = _window(KS, KE, r, N)
        return X + r.to(tl.int64) * sx_r, OUT + r.to(tl.int64) * so_r, ks, ke

    @triton.jit
    def _write_whole_window(Or, ks, length, K, KP: tl.constexpr):
        """A window of at most K keys keeps all of them, then -1."""
        kk = tl.arange(0, KP)
        tl.store(Or + kk, tl.where(kk < length, ks + kk, -1), mask=kk < K)

    @triton.jit
    def _against_threshold(Xr, t, m, thr):
        """The keys of tile ``t`` against the threshold key: (above, tied) masks and their int32 flags."""
        key = _keys(tl.load(Xr + t, mask=m, other=0.0))
        gt = m & (key > thr)
        eq = m & (key == thr)
        return gt, eq, gt.to(tl.int32), eq.to(tl.int32)

    @triton.jit
    def _write_selected(Or, t, gt, eq, gi, ei, base_gt, base_eq, first_tie, need):
        """Every key above the threshold from slot ``base_gt`` on, and the first ties (``need`` of them in
        all) from ``first_tie + base_eq`` on, each in tile order."""
        tl.store(Or + base_gt + tl.cumsum(gi, axis=0) - 1, t, mask=gt)
        rank = base_eq + tl.cumsum(ei, axis=0) - 1
        tl.store(Or + first_tie + rank, t, mask=eq & (rank < need))

    @triton.jit
    def _digit_pick(hist, need, NB: tl.constexpr):
        """Largest bin b with count(bins >= b) >= need; returns (b, need - count(bins > b))."""
        bins = tl.arange(0, NB)
        suffix = tl.cumsum(hist, axis=0, reverse=True)
        b = tl.max(tl.where(suffix >= need, bins, -1), axis=0)
        above = tl.sum(tl.where(bins > b, hist, 0), axis=0)
        return b, need - above

    @triton.jit
    def _row_hist(X, ks, ke, prefix, PASS: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
        """Histogram of digit PASS (1 = the top 8 bits, signed, offset to >= 0) over the keys of
        ``X[ks:ke]`` whose higher digits equal ``prefix``."""
        hist = tl.zeros([NB], dtype=tl.int32)
        for t0 in range(ks, ke, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            m = t < ke
            key = _keys(tl.load(X + t, mask=m, other=0.0))
            if PASS == 1:
                dig = (key >> 24) + NB // 2
            else:
                m = m & ((key >> (32 - 8 * (PASS - 1))) == prefix)
                dig = (key >> (32 - 8 * PASS)) & (NB - 1)
            hist += tl.histogram(dig, NB, mask=m)
        return hist

    @triton.jit
    def _next_prefix(prefix, b, PASS: tl.constexpr, NB: tl.constexpr):
        if PASS == 1:
            return b - NB // 2
        else:
            return (prefix << 8) | b

    @triton.jit
    def _radix_select_row(Xr, Or, ks, ke, K, BLOCK: tl.constexpr):
        """Exact top-K of ``Xr[ks:ke]`` (more than K keys) into ``Or[:K]``: four digit passes, one write."""
        need = K
        prefix = 0
        for p in tl.static_range(1, 5):
            h = _row_hist(Xr, ks, ke, prefix, p, C_NB, BLOCK)
            b, need = _digit_pick(h, need, C_NB)
            prefix = _next_prefix(prefix, b, p, C_NB)
        thr = prefix
        n_gt = 0
        n_eq = 0
        first_tie = K - need
        for t0 in range(ks, ke, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            m = t < ke
            gt, eq, gi, ei = _against_threshold(Xr, t, m, thr)
            _write_selected(Or, t, gt, eq, gi, ei, n_gt, n_eq, first_tie, need)
            n_gt += tl.sum(gi, axis=0)
            n_eq += tl.sum(ei, axis=0)

    @triton.jit
    def _topk_rows_kernel(X, KS, KE, OUT, N, sx_r, so_r, K, KP: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        Xr, Or, ks, ke = _row(X, OUT, KS, KE, r, N, sx_r, so_r)
        if ke - ks <= K:
            _write_whole_window(Or, ks, ke - ks, K, KP)
        else:
            _radix_select_row(Xr, Or, ks, ke, K, BLOCK)

    @triton.jit
    def _kth_key(key, m, need):
        """The exact ``need``-th largest of the keys where ``m`` (held in registers): four 8-bit digit passes.
        Returns (that key, how many of the keys equal to it the top ``need`` take)."""
        prefix = 0
        for p in tl.static_range(1, 5):
            if p == 1:
                dig = (key >> 24) + C_NB // 2
                mm = m
            else:
                mm = m & ((key >> (32 - 8 * (p - 1))) == prefix)
                dig = (key >> (32 - 8 * p)) & (C_NB - 1)
            b, need = _digit_pick(tl.histogram(dig, C_NB, mask=mm), need, C_NB)
            prefix = _next_prefix(prefix, b, p, C_NB)
        return prefix, need

    @triton.jit
    def _select_candidates(Xr, Or, cidx, cm, K, IN_ORDER: tl.constexpr = True):
        """The top K of the candidate keys ``Xr[cidx]`` (where ``cm``) into ``Or[:K]``: those above the K-th
        largest, then the lowest-index of its ties. Digit passes in registers (:func:`_kth_key`). Candidates
        listed in index order take the first ties; otherwise (``IN_ORDER`` false) a digit selection on the
        negated indices of the tied candidates finds the lowest ones."""
        key = _keys(tl.load(Xr + cidx, mask=cm, other=0.0))
        thr, ties = _kth_key(key, cm, K)
        gt = (cm & (key > thr)).to(tl.int32)
        tied = cm & (key == thr)
        if not IN_ORDER:
            if tl.sum(tied.to(tl.int32), axis=0) > ties:
                last, _ = _kth_key(-cidx, tied, ties)
                tied = tied & (-cidx >= last)
        eq = tied.to(tl.int32)
        tl.store(Or + tl.cumsum(gt, axis=0) - 1, cidx, mask=gt != 0)
        rank = tl.cumsum(eq, axis=0) - 1
        tl.store(Or + (K - ties) + rank, cidx, mask=(eq != 0) & (rank < ties))

    @triton.jit
    def _bucket(x, lo, inv, NB: tl.constexpr):
        # monotone in x (so every key of a higher bucket is larger); -inf and NaN land in bucket 0
        b = tl.where(x >= lo, (x - lo) * inv, 0.0).to(tl.int32)
        return tl.minimum(b, NB - 1)

    @triton.jit
    def _topk_bucket_kernel(X, KS, KE, OUT, CAND, STATS, N, sx_r, so_r, K, KP: tl.constexpr, BLOCK: tl.constexpr,
                            CAP: tl.constexpr, HAS_STATS: tl.constexpr = False):
        r = tl.program_id(0)
        Xr, Or, ks, ke = _row(X, OUT, KS, KE, r, N, sx_r, so_r)
        Cr = CAND + r.to(tl.int64) * CAP
        if ke - ks <= K:
            _write_whole_window(Or, ks, ke - ks, K, KP)
        else:
            # pass 1: the range of the finite values
            vmax = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
            vmin = tl.full([BLOCK], float("inf"), dtype=tl.float32)
            for t0 in range(ks, ke, BLOCK):
                t = t0 + tl.arange(0, BLOCK)
                x = tl.load(Xr + t, mask=t < ke, other=float("-inf"))
                vmax = tl.maximum(vmax, x)
                vmin = tl.minimum(vmin, tl.where(x == float("-inf"), float("inf"), x))
            hi = tl.max(vmax, axis=0)
            lo = tl.min(vmin, axis=0)
            width = hi - lo
            inv = tl.where(width > 0.0, C_NB / width, 0.0)
            # pass 2: histogram of NB equal-width buckets over [lo, hi]
            hist = tl.zeros([C_NB], dtype=tl.int32)
            for t0 in range(ks, ke, BLOCK):
                t = t0 + tl.arange(0, BLOCK)
                m = t < ke
                x = tl.load(Xr + t, mask=m, other=float("-inf"))
                hist += tl.histogram(_bucket(x, lo, inv, C_NB), C_NB, mask=m)
            bstar, need = _digit_pick(hist, K, C_NB)
            cnt = tl.sum(tl.where(tl.arange(0, C_NB) == bstar, hist, 0), axis=0)
            if cnt <= CAP:
                # pass 3: keys above the threshold bucket go out; the bucket's keys become candidates
                n_gt = 0
                n_c = 0
                for t0 in range(ks, ke, BLOCK):
                    t = t0 + tl.arange(0, BLOCK)
                    m = t < ke
                    b = _bucket(tl.load(Xr + t, mask=m, other=float("-inf")), lo, inv, C_NB)
                    gt = (m & (b > bstar)).to(tl.int32)
                    eq = (m & (b == bstar)).to(tl.int32)
                    tl.store(Or + n_gt + tl.cumsum(gt, axis=0) - 1, t, mask=gt != 0)
                    tl.store(Cr + n_c + tl.cumsum(eq, axis=0) - 1, t, mask=eq != 0)
                    n_gt += tl.sum(gt, axis=0)
                    n_c += tl.sum(eq, axis=0)
                tl.debug_barrier()  # candidates written by other threads of this program
                # exact selection of `need` among the candidates, held in registers, after the n_gt above
                c = tl.arange(0, CAP)
                cm = c < n_c
                _select_candidates(Xr, Or + n_gt, tl.load(Cr + c, mask=cm, other=0), cm, need)
            else:  # too many keys share the threshold bucket (clustered values, ties): plain radix
                if HAS_STATS:
                    tl.atomic_add(STATS + 1, 1, sem="relaxed")
                _radix_select_row(Xr, Or, ks, ke, K, BLOCK)

    @triton.jit
    def _sample_rank(n, K, NS: tl.constexpr):
        """The sample rank j whose key about 1.5 K of a window's ``n`` keys reach (rounded up, in [1, NS])."""
        return tl.minimum(tl.maximum((3 * K * NS + 2 * n - 1) // (2 * n), 1), NS)

    @triton.jit
    def _sample_key(Xr, ks, n, j, NS: tl.constexpr, CH: tl.constexpr):
        """The j-th largest of a sample of NS keys of a window of ``n`` > NS keys, in chunks of CH contiguous
        ones spread evenly over the window (at least j of the window's keys reach it: the sample is part of
        the window)."""
        i = tl.arange(0, NS)
        stride = (n - CH) // (NS // CH - 1)
        skey = _keys(tl.load(Xr + ks + (i // CH) * stride + (i % CH)))
        tau, _ = _kth_key(skey, i < NS, j)
        return tau

    @triton.jit
    def _sample_tau(Xr, ks, n, K, NS: tl.constexpr, CH: tl.constexpr):
        """The candidates' threshold key of a window of ``n`` > NS keys (:func:`_sample_rank`)."""
        return _sample_key(Xr, ks, n, _sample_rank(n, K, NS), NS, CH)

    @triton.jit
    def _collect(Xr, Cr, ks, ke, tau, BLOCK: tl.constexpr, CAP: tl.constexpr):
        """One read of the window: the keys at or above ``tau`` into the candidate list, in index order (the
        first CAP of them); returns how many reached it."""
        n_c = 0
        for t0 in range(ks, ke, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            m = t < ke
            cand = (m & (_keys(tl.load(Xr + t, mask=m, other=0.0)) >= tau)).to(tl.int32)
            slot = n_c + tl.cumsum(cand, axis=0) - 1
            tl.store(Cr + slot, t, mask=(cand != 0) & (slot < CAP))
            n_c += tl.sum(cand, axis=0)
        return n_c

    @triton.jit
    def _topk_sample_kernel(X, KS, KE, OUT, CAND, STATS, N, sx_r, so_r, K, KP: tl.constexpr, BLOCK: tl.constexpr,
                            CAP: tl.constexpr, NS: tl.constexpr, CH: tl.constexpr, RETRIES: tl.constexpr,
                            HAS_STATS: tl.constexpr):
        r = tl.program_id(0)
        Xr, Or, ks, ke = _row(X, OUT, KS, KE, r, N, sx_r, so_r)
        Cr = CAND + r.to(tl.int64) * CAP
        n = ke - ks
        if n <= K:
            _write_whole_window(Or, ks, n, K, KP)
        elif n <= CAP:  # the whole window fits the candidate registers
            c = tl.arange(0, CAP)
            _select_candidates(Xr, Or, ks + c, c < n, K)
        else:
            j = _sample_rank(n, K, NS)
            n_c = _collect(Xr, Cr, ks, ke, _sample_key(Xr, ks, n, j, NS, CH), BLOCK, CAP)
            # a sample that misled (fewer than K or more than CAP keys reached its threshold) is asked again at
            # the rank that the count it gave predicts: one more read instead of the five of plain radix
            for _ in tl.static_range(RETRIES):
                low = n_c < K
                high = n_c > CAP
                want = (j * 3 * K + 2 * n_c - 1) // (2 * tl.maximum(n_c, 1))
                j_new = tl.where(low, tl.minimum(NS, tl.maximum(j + 1, want)),
                                 tl.where(high, tl.maximum(1, tl.minimum(j - 1, want)), j))
                if (low | high) & (j_new != j):
                    if HAS_STATS:
                        tl.atomic_add(STATS, 1, sem="relaxed")
                    j = j_new
                    tl.debug_barrier()  # the previous pass's candidate stores, before this pass overwrites them
                    n_c = _collect(Xr, Cr, ks, ke, _sample_key(Xr, ks, n, j, NS, CH), BLOCK, CAP)
            if (n_c >= K) & (n_c <= CAP):
                tl.debug_barrier()  # candidates written by other threads of this program
                c = tl.arange(0, CAP)
                cm = c < n_c
                _select_candidates(Xr, Or, tl.load(Cr + c, mask=cm, other=0), cm, K)
            else:  # still missed (ties at the threshold, say): plain radix, still exact
                if HAS_STATS:
                    tl.atomic_add(STATS + 1, 1, sem="relaxed")
                _radix_select_row(Xr, Or, ks, ke, K, BLOCK)

    # ------------------------------------------------------------------ staged schedule (prefill rows)
    # The sample schedule's work in three kernels, so that the row's one read runs in many light programs
    # instead of one register-heavy program per row: (1) each row's threshold from its sample, (2) the
    # candidates, collected by (row, segment) programs that reserve slots per tile with an atomic counter
    # (so they arrive in no fixed order), (3) the exact selection among them, one program per row, which
    # breaks the threshold's ties by index so that the result equals the sample schedule's.
    @triton.jit
    def _staged_tau_kernel(X, KS, KE, TAU, N, sx_r, K, CAP: tl.constexpr, NS: tl.constexpr, CH: tl.constexpr):
        r = tl.program_id(0)
        ks, ke = _window(KS, KE, r, N)
        if ke - ks > CAP:  # shorter windows are selected whole, in registers, by the select kernel
            tl.store(TAU + r, _sample_tau(X + r.to(tl.int64) * sx_r, ks, ke - ks, K, NS, CH))

    @triton.jit
    def _staged_collect_kernel(X, KS, KE, TAU, CNT, CAND, N, sx_r, SEG, CAP: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        ks, ke = _window(KS, KE, r, N)
        s0 = ks + tl.program_id(1) * SEG
        if (ke - ks > CAP) & (s0 < ke):
            s1 = tl.minimum(s0 + SEG, ke)
            tau = tl.load(TAU + r)
            Xr = X + r.to(tl.int64) * sx_r
            Cr = CAND + r.to(tl.int64) * CAP
            for t0 in range(s0, s1, BLOCK):
                t = t0 + tl.arange(0, BLOCK)
                m = t < s1
                cand = (m & (_keys(tl.load(Xr + t, mask=m, other=0.0)) >= tau)).to(tl.int32)
                base = tl.atomic_add(CNT + r, tl.sum(cand, axis=0), sem="relaxed")
                slot = base + tl.cumsum(cand, axis=0) - 1
                tl.store(Cr + slot, t, mask=(cand != 0) & (slot < CAP))

    @triton.jit
    def _staged_select_kernel(X, KS, KE, CNT, CAND, OUT, N, sx_r, so_r, K, KP: tl.constexpr, BLOCK: tl.constexpr,
                              CAP: tl.constexpr):
        r = tl.program_id(0)
        Xr, Or, ks, ke = _row(X, OUT, KS, KE, r, N, sx_r, so_r)
        n = ke - ks
        if n <= K:
            _write_whole_window(Or, ks, n, K, KP)
        elif n <= CAP:
            c = tl.arange(0, CAP)
            _select_candidates(Xr, Or, ks + c, c < n, K)
        else:
            n_c = tl.load(CNT + r)
            if (n_c >= K) & (n_c <= CAP):
                c = tl.arange(0, CAP)
                cm = c < n_c
                cidx = tl.load(CAND + r.to(tl.int64) * CAP + c, mask=cm, other=0)
                _select_candidates(Xr, Or, cidx, cm, K, False)  # they arrived in no fixed order
            else:  # the sample missed (fewer than K or more than CAP keys reach it): plain radix, still exact
                _radix_select_row(Xr, Or, ks, ke, K, BLOCK)

    # ------------------------------------------------------------------ split schedule (decode rows)
    @triton.jit
    def _split_hist_kernel(X, KS, KE, STATE, HIST, N, sx_r, SEG, PASS: tl.constexpr, NB: tl.constexpr,
                           BLOCK: tl.constexpr):
        r = tl.program_id(0)
        p = tl.program_id(1)
        ks, ke = _window(KS, KE, r, N)
        if ke - ks > tl.load(STATE + r * 4 + 3):  # rows with <= k keys need no selection
            s0 = ks + p * SEG
            s1 = tl.minimum(s0 + SEG, ke)
            prefix = tl.load(STATE + r * 4)
            h = _row_hist(X + r.to(tl.int64) * sx_r, s0, s1, prefix, PASS, NB, BLOCK)
            tl.atomic_add(HIST + r * NB + tl.arange(0, NB), h, sem="relaxed")

    @triton.jit
    def _split_pick_kernel(STATE, HIST, PASS: tl.constexpr, NB: tl.constexpr):
        # STATE[r] = (prefix, need, unused, k)
        r = tl.program_id(0)
        bins = tl.arange(0, NB)
        h = tl.load(HIST + r * NB + bins)
        tl.store(HIST + r * NB + bins, tl.zeros([NB], dtype=tl.int32))
        b, need = _digit_pick(h, tl.load(STATE + r * 4 + 1), NB)
        tl.store(STATE + r * 4, _next_prefix(tl.load(STATE + r * 4), b, PASS, NB))
        tl.store(STATE + r * 4 + 1, need)

    @triton.jit
    def _split_write_kernel(X, KS, KE, STATE, CNT, OUT, N, sx_r, so_r, SEG, KP: tl.constexpr,
                            BLOCK: tl.constexpr):
        r = tl.program_id(0)
        p = tl.program_id(1)
        ks, ke = _window(KS, KE, r, N)
        K = tl.load(STATE + r * 4 + 3)
        Or = OUT + r.to(tl.int64) * so_r
        if ke - ks <= K:
            if p == 0:
                _write_whole_window(Or, ks, ke - ks, K, KP)
        else:
            thr = tl.load(STATE + r * 4)
            need = tl.load(STATE + r * 4 + 1)
            first_tie = K - need
            s0 = ks + p * SEG
            s1 = tl.minimum(s0 + SEG, ke)
            Xr = X + r.to(tl.int64) * sx_r
            for t0 in range(s0, s1, BLOCK):
                t = t0 + tl.arange(0, BLOCK)
                m = t < s1
                gt, eq, gi, ei = _against_threshold(Xr, t, m, thr)
                # output slots reserved with atomic counters: arrival order, not index order
                base_gt = tl.atomic_add(CNT + r * 2, tl.sum(gi, axis=0), sem="relaxed")
                base_eq = tl.atomic_add(CNT + r * 2 + 1, tl.sum(ei, axis=0), sem="relaxed")
                _write_selected(Or, t, gt, eq, gi, ei, base_gt, base_eq, first_tie, need)

    # ------------------------------------------------------------------ torch schedule: the windows masked
    @triton.jit
    def _mask_windows_kernel(X, KS, KE, Y, N, sx_r, sy_r, BLOCK: tl.constexpr):
        """Y = X inside each row's window, -inf outside: one read and one write, where the plain mask costs
        four passes over [R, N] (two comparisons, their product, the fill)."""
        r = tl.program_id(0)
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ks, ke = _window(KS, KE, r, N)
        m = t < N
        x = tl.load(X + r.to(tl.int64) * sx_r + t, mask=m & (t >= ks) & (t < ke), other=float("-inf"))
        tl.store(Y + r.to(tl.int64) * sy_r + t, x, mask=m)


class TopkTally:
    """What :func:`topk` did while a :func:`tally` was active: on the host, the calls and rows of each schedule
    it ran (no synchronisation); on the device, ``counts`` [2]: the rows the ``sample`` schedule read again
    and the rows that fell back to plain radix (``sample`` or ``bucket``), the data-dependent work that a
    kernel's timing on random logits does not show."""

    def __init__(self, device: torch.device | str):
        self.calls: dict[str, list[int]] = {}  # schedule -> [calls, rows]
        self.counts = torch.zeros(2, dtype=torch.int32, device=device)

    def note(self, schedule: str, rows: int) -> None:
        c = self.calls.setdefault(schedule, [0, 0])
        c[0] += 1
        c[1] += rows

    def summary(self) -> dict:
        """Schedules' calls and rows, and the device counts (one synchronisation)."""
        reread, fallback = self.counts.tolist()
        return {"schedules": {k: {"calls": c, "rows": r} for k, (c, r) in sorted(self.calls.items())},
                "sample_reread_rows": reread, "radix_fallback_rows": fallback}


_TALLY: TopkTally | None = None


@contextmanager
def tally(device: torch.device | str = "cuda") -> Iterator[TopkTally]:
    """Count what every :func:`topk` call inside the block does (:class:`TopkTally`), for a benchmark to
    attribute its time: a call given its own ``stats`` keeps those instead."""
    global _TALLY
    outer, _TALLY = _TALLY, TopkTally(device)
    try:
        yield _TALLY
    finally:
        _TALLY = outer


def _torch_topk(logits: torch.Tensor, k: int, ks: torch.Tensor, ke: torch.Tensor, whole_rows: bool) -> torch.Tensor:
    """torch.topk on the windows: on the logits themselves when every window is the whole row (no mask to
    write), else on one masked copy; keys outside a window that holds fewer than k come back as -1."""
    R, N = logits.shape
    kk = min(k, N)
    if whole_rows:
        idx = logits.topk(kk, dim=-1).indices.int()
    else:
        masked = torch.empty_like(logits)
        _mask_windows_kernel[(R, triton.cdiv(N, 1024))](logits, ks, ke, masked, N, logits.stride(0),
                                                         masked.stride(0), BLOCK=1024, num_warps=4)
        vals, idx = masked.topk(kk, dim=-1)
        idx = idx.int().masked_fill_(vals == float("-inf"), -1)
    if kk < k:
        idx = torch.cat((idx, idx.new_full((R, k - kk), -1)), dim=1)
    return idx


def _prepare(logits: torch.Tensor, k: int, ks: torch.Tensor | None, ke: torch.Tensor | None):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, N], got {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits must be fp32, got {logits.dtype}")
    if not 1 <= k <= 4096:
        raise ValueError(f"k must be in [1, 4096], got {k}")
    R, N = logits.shape
    dev = logits.device
    ks = torch.zeros(R, dtype=torch.int32, device=dev) if ks is None else ks.to(torch.int32).contiguous()
    ke = torch.full((R,), N, dtype=torch.int32, device=dev) if ke is None else ke.to(torch.int32).contiguous()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, ks, ke


def topk(
    logits: torch.Tensor,
    k: int,
    ks: torch.Tensor | None = None,
    ke: torch.Tensor | None = None,
    row_len: int | None = None,
    ties: str = "lowest",
    schedule: str = "auto",
    block: int | None = None,
    num_warps: int = 8,
    segments: int | None = None,
    cap: int = 4096,
    seg_keys: int = 8192,
    collect_warps: int = 4,
    sample_keys: int | None = None,
    sample_chunk: int | None = None,
    retries: int = 2,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``k`` largest logits of each row inside ``[ks, ke)`` (default: the whole row).

    logits [R, N] fp32 (row stride free). Returns int32 [R, k], unsorted, ``-1`` where the window holds
    fewer than ``k`` keys; the set equals ``torch.topk``'s except among exactly tied values (here: lowest
    index first for ``rows``, ``bucket``, ``sample`` and ``staged``, arrival order for ``split``, torch.topk's for
    ``torch``). ``schedule``: ``sample``, ``staged``, ``bucket``, ``rows``, ``split``, ``torch``
    (torch.topk on the windows) or ``auto`` (too few rows to fill the GPU: split up to 8 rows, torch beyond;
    else sample, or bucket when k > cap / 2 or the rows are longer than ``AUTO_SAMPLE_MAX_KEYS``).
    ``seg_keys`` and ``collect_warps``: the staged schedule's keys and warps per collecting program.
    ``sample_keys`` (default ``cap / 2``, and ``cap`` for rows longer than ``SAMPLE_MAX_KEYS``),
    ``sample_chunk`` (default 16 runs) and ``retries``: the sample schedule's sample (that many keys, in
    runs of ``sample_chunk`` contiguous ones spread over the window) and how many more reads it may take
    where the sample misled before it falls back to ``rows``. ``stats``, an int32 [2] on the device: the
    sample schedule adds to it the rows it read again, and the sample and bucket schedules the rows that fell
    back to ``rows`` (inside a :func:`tally`, the tally's counts by default).
    ``cap``: candidate slots per row for ``bucket`` (a power of two). ``row_len`` and ``ties`` are the
    reference's (:func:`.reference.topk`): the kernel reads windows only and breaks ties its own way."""
    require_triton()
    whole_rows = ks is None and ke is None
    logits, ks, ke = _prepare(logits, k, ks, ke)
    R, N = logits.shape
    out = torch.full((R, k), -1, dtype=torch.int32, device=logits.device)
    if R == 0:
        return out
    kp = triton.next_power_of_2(k)
    if block is None:  # the fastest measured on H100: 2048 for bucket (8 warps), 1024 otherwise
        block = 2048 if schedule in ("auto", "bucket", "sample") else 1024  # staged: 1024-key tiles
    if schedule == "auto":
        # measured on the H200 (results/kernels/h200/topk_dispatch.json): with few long rows `split` beats torch.topk up
        # to 8 rows (52-83 us against 77-100 at 64K-200K keys) but not at 64 (175-488 us against 127-271),
        # where one program per row already fills the GPU; there torch.topk runs on the windows. With many
        # rows `sample` beats torch.topk at every length swept (0.86-3.38 ms against 1.35-6.49 ms at 8192 rows
        # of 8K-64K keys) and `bucket` does not (3.83 against 3.58 ms at 32K); bucket stays for k > cap / 2
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 1
        # Long rows: in the engine's 200K prefill the indexer once took 82.7 s with `sample` (then sampling
        # 2048 keys at every length) against 29.7 s with `bucket` (results/e2e/h200/). On the engine's own
        # logits at 123K-131K keys, 256 rows a call, `sample` with its 4096-key sample took 0.44 ms a call
        # on average against bucket's 0.54 and torch.topk's 0.51 (bucket was slower than torch.topk in every
        # call, sample in 10 of 196), never falling back (results/kernels/h200/topk_engine_partial.json);
        # longer rows were not reached by that run, so bucket keeps them until they are measured
        if R < sms and N > 8 * block:
            schedule = "split" if R <= 8 else "torch"
        elif 2 * k <= cap and cap & (cap - 1) == 0 and N <= AUTO_SAMPLE_MAX_KEYS:
            schedule = "sample"
        else:
            schedule = "bucket"
        if schedule == "split":
            block = 1024
    if _TALLY is not None:
        _TALLY.note(schedule, R)
        if stats is None and _TALLY.counts.device == logits.device:
            stats = _TALLY.counts
    if schedule == "torch":
        return _torch_topk(logits, k, ks, ke, whole_rows)
    if schedule == "rows":
        LAST_COMPILED["topk_rows"] = _topk_rows_kernel[(R,)](
            logits, ks, ke, out, N, logits.stride(0), out.stride(0), k, KP=kp, BLOCK=block, num_warps=num_warps)
        return out
    if schedule in ("sample", "staged"):
        if cap < 2 * k or cap & (cap - 1):
            raise ValueError(f"the {schedule} schedule needs cap a power of two >= 2k, got cap={cap} for k={k}")
        # a longer row needs a larger sample for the same spread of its candidate count: at 200K keys, 2048
        # sampled keys (rank j = 32) missed 3-14% of rows, 4096 missed 0-2% (results/kernels/topk_sample_emulation.json)
        ns = sample_keys or (cap if N > SAMPLE_MAX_KEYS else cap // 2)
        sample_chunk = sample_chunk or max(1, ns // 16)
        if ns & (ns - 1) or not 16 <= ns <= cap or sample_chunk < 1 or ns % sample_chunk or ns // sample_chunk < 2:
            raise ValueError(f"sample_keys must be a power of two in [16, cap], at least two runs of sample_chunk "
                             f"keys, got {ns} and {sample_chunk} (cap {cap})")
    if schedule == "sample":
        cand = torch.empty(R, cap, dtype=torch.int32, device=logits.device)
        LAST_COMPILED["topk_sample"] = _topk_sample_kernel[(R,)](
            logits, ks, ke, out, cand, out if stats is None else stats, N, logits.stride(0), out.stride(0), k,
            KP=kp, BLOCK=block, CAP=cap, NS=ns, CH=sample_chunk, RETRIES=retries, HAS_STATS=stats is not None,
            num_warps=num_warps)
        return out
    if schedule == "staged":
        dev = logits.device
        tau = torch.empty(R, dtype=torch.int32, device=dev)
        cnt = torch.zeros(R, dtype=torch.int32, device=dev)
        cand = torch.empty(R, cap, dtype=torch.int32, device=dev)
        seg = max(block, seg_keys)  # keys per collecting program
        _staged_tau_kernel[(R,)](logits, ks, ke, tau, N, logits.stride(0), k, CAP=cap, NS=ns, CH=sample_chunk,
                                 num_warps=4)
        LAST_COMPILED["topk_staged_collect"] = _staged_collect_kernel[(R, triton.cdiv(N, seg))](
            logits, ks, ke, tau, cnt, cand, N, logits.stride(0), seg, CAP=cap, BLOCK=block, num_warps=collect_warps)
        LAST_COMPILED["topk_staged_select"] = _staged_select_kernel[(R,)](
            logits, ks, ke, cnt, cand, out, N, logits.stride(0), out.stride(0), k, KP=kp, BLOCK=block, CAP=cap,
            num_warps=num_warps)
        return out
    if schedule == "bucket":
        cand = torch.empty(R, cap, dtype=torch.int32, device=logits.device)
        LAST_COMPILED["topk_bucket"] = _topk_bucket_kernel[(R,)](
            logits, ks, ke, out, cand, out if stats is None else stats, N, logits.stride(0), out.stride(0), k, KP=kp,
            BLOCK=block, CAP=cap, HAS_STATS=stats is not None, num_warps=num_warps)
        return out
    if schedule != "split":
        raise ValueError(f"unknown schedule {schedule!r} (sample, staged, bucket, rows, split, torch or auto)")
    if segments is None:
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count if logits.is_cuda else 2
        segments = max(1, min(triton.cdiv(2 * sms, R), triton.cdiv(N, 4 * block)))
    seg = triton.cdiv(triton.cdiv(N, segments), block) * block
    dev = logits.device
    state = torch.zeros(R, 4, dtype=torch.int32, device=dev)
    state[:, 1] = k
    state[:, 3] = k
    hist = torch.zeros(R, NB, dtype=torch.int32, device=dev)
    cnt = torch.zeros(R, 2, dtype=torch.int32, device=dev)
    grid = (R, segments)
    for pass_ in (1, 2, 3, 4):
        LAST_COMPILED["topk_split_hist"] = _split_hist_kernel[grid](
            logits, ks, ke, state, hist, N, logits.stride(0), seg, PASS=pass_, NB=NB, BLOCK=block,
            num_warps=num_warps)
        _split_pick_kernel[(R,)](state, hist, PASS=pass_, NB=NB, num_warps=4)
    _split_write_kernel[grid](logits, ks, ke, state, cnt, out, N, logits.stride(0), out.stride(0), seg, KP=kp,
                              BLOCK=block, num_warps=num_warps)
    return out
