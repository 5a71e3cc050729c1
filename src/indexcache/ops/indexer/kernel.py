"""Lightning-indexer logits in Triton: ``logits[s, n] = sum_h w[s,h] * relu(q[s,h] . k[n]) * k_scale[n]``.

Tiling follows the shape of the problem rather than a generic GEMM: a program holds ``BQ`` queries x all
``H`` heads as one ``[BQ*H, D]`` operand (BQ = 256 / H, so 4 queries at H = 64) and streams key tiles of
``BN`` tokens through it. With ``key_major`` the product is laid out keys x (queries*heads), the way
DeepGEMM's fp8 kernel orients it, so the ReLU, the head weights and the sum over heads all happen on the
accumulator in registers, and the per-token k scale multiplies once after the head sum (it is positive,
so it commutes with the ReLU). The q scale and the softmax scale are folded into ``w`` by the caller.

Each program walks only the key tiles inside ``[min ks, max ke)`` of its queries (causal prefill skips the
upper triangle at tile granularity); a second grid axis splits that range when there are too few query
blocks to fill the GPU (decode, short prefill). Logits outside a query's window are ``-inf`` in the
tiles a program visits and left unwritten elsewhere unless ``clean=True`` (the top-k reads windows only).
"""

from __future__ import annotations

import torch

from ..triton_support import HAVE_TRITON, LAST_COMPILED, fp32_dot, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mqa_logits_kernel(
        Q, K, KSC, W, KS, KE, OUT,
        S, N, QPB,
        sq_s, sq_h, sk_b, sk_n, ssc_b, sw_s, so_s,
        H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr,
        HAS_SCALE: tl.constexpr, KEY_MAJOR: tl.constexpr, FP32_DOT: tl.constexpr,
        TAU=None, CNT=None, CIDX=None, CAP=0, CAND: tl.constexpr = False,
    ):
        pid_q = tl.program_id(0)
        pid_n = tl.program_id(1)
        n_split = tl.num_programs(1)
        q0 = pid_q * BQ
        # keys of a batched cache: every query of the block belongs to batch q0 // QPB
        kb = (q0 // QPB).to(tl.int64)
        Kb = K + kb * sk_b
        m = tl.arange(0, BQ * H)
        qi = q0 + m // H
        hh = m % H
        d = tl.arange(0, D)
        q_ok = qi < S
        q = tl.load(Q + qi[:, None].to(tl.int64) * sq_s + hh[:, None] * sq_h + d[None, :], mask=q_ok[:, None],
                    other=0.0)
        w = tl.load(W + qi.to(tl.int64) * sw_s + hh, mask=q_ok, other=0.0)
        rows = q0 + tl.arange(0, BQ)
        r_ok = rows < S
        ks = tl.load(KS + rows, mask=r_ok, other=2**30)
        ke = tl.minimum(tl.load(KE + rows, mask=r_ok, other=0), N)
        lo = tl.maximum(tl.min(ks, axis=0), 0)
        hi = tl.max(ke, axis=0)
        blk_lo = lo // BN
        blk_hi = (hi + BN - 1) // BN
        per = (blk_hi - blk_lo + n_split - 1) // n_split
        b0 = blk_lo + pid_n * per
        b1 = tl.minimum(b0 + per, blk_hi)
        out_rows = OUT + rows.to(tl.int64) * so_s
        if CAND:
            tau = tl.load(TAU + rows, mask=r_ok, other=float("inf"))
        for b in range(b0, b1):
            n = b * BN + tl.arange(0, BN)
            n_ok = n < N
            kt = tl.load(Kb + n[:, None].to(tl.int64) * sk_n + d[None, :], mask=n_ok[:, None], other=0.0)
            if KEY_MAJOR:
                if FP32_DOT != "":  # fp32 operands: the chosen product (Triton's own default for fp32 is tf32)
                    s = tl.dot(kt, tl.trans(q), input_precision=FP32_DOT)  # [BN, BQ*H]
                else:
                    s = tl.dot(kt, tl.trans(q))
                s = tl.maximum(s, 0.0) * w[None, :]
                lg = tl.sum(tl.reshape(s, (BN, BQ, H)), axis=2)  # [BN, BQ]
                if HAS_SCALE:
                    sc = tl.load(KSC + kb * ssc_b + n, mask=n_ok, other=0.0)
                    lg = lg * sc[:, None]
                inside = (n[:, None] >= ks[None, :]) & (n[:, None] < ke[None, :])
                if CAND:  # only the logits at or above their row's threshold leave, as (value, key) pairs
                    keep = inside & n_ok[:, None] & r_ok[None, :] & (lg >= tau[None, :])
                    ki = keep.to(tl.int32)
                    base = tl.atomic_add(CNT + rows, tl.sum(ki, axis=0), mask=r_ok, sem="relaxed")  # [BQ]
                    slot = base[None, :] + tl.cumsum(ki, axis=0) - 1  # [BN, BQ]
                    ok = keep & (slot < CAP)
                    tl.store(out_rows[None, :] + slot, lg, mask=ok)
                    tl.store(CIDX + rows[None, :].to(tl.int64) * so_s + slot, n[:, None], mask=ok)
                else:
                    lg = tl.where(inside, lg, float("-inf"))
                    tl.store(out_rows[None, :] + n[:, None], lg, mask=n_ok[:, None] & r_ok[None, :])
            else:
                if FP32_DOT != "":
                    s = tl.dot(q, tl.trans(kt), input_precision=FP32_DOT)  # [BQ*H, BN]
                else:
                    s = tl.dot(q, tl.trans(kt))
                s = tl.maximum(s, 0.0) * w[:, None]
                lg = tl.sum(tl.reshape(s, (BQ, H, BN)), axis=1)  # [BQ, BN]
                if HAS_SCALE:
                    sc = tl.load(KSC + kb * ssc_b + n, mask=n_ok, other=0.0)
                    lg = lg * sc[None, :]
                inside = (n[None, :] >= ks[:, None]) & (n[None, :] < ke[:, None])
                lg = tl.where(inside, lg, float("-inf"))
                tl.store(out_rows[:, None] + n[None, :], lg, mask=r_ok[:, None] & n_ok[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def supported(h: int, d: int) -> bool:
    """Shapes the kernel handles (power-of-two heads and head dim, at least 16 rows per tile)."""
    return _pow2(h) and _pow2(d) and d >= 16 and h <= 128


def _launch(q, k, w, ks, ke, k_scale, out, S, N, qpb, sk_b, ssc_b, block_q, block_n, n_split, key_major,
            num_warps, num_stages, cand: tuple | None = None) -> None:
    H, D = q.shape[-2], q.shape[-1]
    if not supported(H, D):
        raise ValueError(f"mqa_logits supports power-of-two heads (<=128) and head dim (>=16), got H={H} D={D}")
    # block_q comes from _block_q (through _operands); fp32 operands get one pipeline stage less, so that
    # everything fits the 227 KB of shared memory per SM
    elem = q.element_size()
    bq = block_q
    if elem == 4:
        num_stages = min(num_stages, 2)
    if bq * H < 16:
        bq = 16 // H
    n_qblocks = triton.cdiv(S, bq)
    if n_split is None:
        target = 2 * _num_sms(q.device)
        n_split = 1 if n_qblocks >= target else min(triton.cdiv(target, n_qblocks), max(1, triton.cdiv(N, block_n)))
    grid = (n_qblocks, n_split)
    LAST_COMPILED["mqa_logits"] = _mqa_logits_kernel[grid](
        q, k, k_scale if k_scale is not None else w, w, ks, ke, out,
        S, N, qpb,
        q.stride(-3), q.stride(-2), sk_b, k.stride(-2), ssc_b, w.stride(-2), out.stride(-2),
        H=H, D=D, BQ=bq, BN=block_n, HAS_SCALE=k_scale is not None, KEY_MAJOR=key_major, FP32_DOT=fp32_dot(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
        **({} if cand is None else dict(zip(("TAU", "CNT", "CIDX", "CAP"), cand, strict=True), CAND=True)),
    )


def _check(q, k, w, k_scale):
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if w.dtype != torch.float32:
        raise ValueError("w must be fp32 (it carries the folded scales)")
    if q.dtype == torch.float8_e4m3fn and k_scale is None:
        raise ValueError("fp8 keys need their per-token k_scale")


def _logits_out(rows: int, n: int, device: torch.device, clean: bool) -> torch.Tensor:
    # the kernel writes only the tiles inside its queries' windows; `clean` makes the rest -inf
    if clean:
        return torch.full((rows, n), float("-inf"), dtype=torch.float32, device=device)
    return torch.empty(rows, n, dtype=torch.float32, device=device)


def _block_q(qpb: int, heads: int, elem: int, dim: int, block_q: int | None) -> int:
    """Queries per program: a power of two that divides the queries of one cache (a program reads one
    cache), at least 16 rows of queries x heads when it can. 4 queries x 64 heads was the fastest tile
    measured on the H100 (bf16 and fp8), and the q tile stays <= 64 KB of shared memory. fp32 operands (IEEE
    dots on the CUDA cores, whose accumulator tile lives in registers) hold at most 64 query-heads a tile: at
    4 heads x 64 dims on the H200, 16 queries a tile ran the logits 3.7-4.5x faster than 64, with the same
    logits bit for bit (results/kernels/h200/indexer_tiles.json)."""
    cap = 64 if elem == 4 else 256
    bq = block_q or max(1, min(cap // heads, 65536 // (heads * dim * elem)))
    while qpb % bq:
        bq //= 2
    return bq


def _operands(q, k, w, ks, ke, scale, k_scale, block_q):
    """Checked, contiguous kernel operands with the scale folded into ``w``, and the queries per cache and
    per program; heads padded with zero heads where a program would hold fewer than 16 query-heads."""
    require_triton()
    _check(q, k, w, k_scale)
    R, H, D = q.shape
    G = k.shape[0]
    if G < 1 or R % G:
        raise ValueError(f"{R} query rows do not split evenly over {G} key caches")
    qpb = R // G
    w = w.float() * scale
    bq = _block_q(qpb, H, q.element_size(), D, block_q)
    if bq * H < 16:
        # a program holds at least 16 rows of queries x heads; with fewer it would span several caches.
        # Zero heads with zero weight add exactly nothing.
        pad = -(-16 // bq) - H
        q = torch.cat((q, q.new_zeros(R, pad, D)), dim=1)
        w = torch.cat((w, w.new_zeros(R, pad)), dim=1)
    sc = k_scale.float().contiguous() if k_scale is not None else None
    return (q.contiguous(), k.contiguous(), w.contiguous(), ks.to(torch.int32).contiguous(),
            ke.to(torch.int32).contiguous(), sc, qpb, bq)


def indexer_logits(  # the signature twin of reference.indexer_logits (one API, two implementations)
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    scale: float = 1.0,
    k_scale: torch.Tensor | None = None,
    budget_bytes: int | None = None,
    clean: bool = True,
    block_q: int | None = None,
    block_n: int = 128,
    n_split: int | None = None,
    key_major: bool = True,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """Indexer logits ``[R, T]`` fp32 in the flat layout of :mod:`indexcache.ops.common` (the signature of
    :func:`.reference.indexer_logits`): q [R,H,D] and k [G,T,D] in bf16, fp16, fp32 or float8_e4m3fn (then
    ``k_scale`` [G,T] fp32), w [R,H] fp32, ks/ke [R]. ``clean=False`` leaves the logits outside the
    windows' tiles unwritten (a top-k reads windows only). ``budget_bytes`` is the reference's; the
    other arguments tune the kernel."""
    q, k, w, ks, ke, sc, qpb, bq = _operands(q, k, w, ks, ke, scale, k_scale, block_q)
    R, T = q.shape[0], k.shape[1]
    out = _logits_out(R, T, q.device, clean)
    if R == 0 or T == 0:
        return out
    _launch(q, k, w, ks, ke, sc, out, R, T, qpb=qpb, sk_b=k.stride(0), ssc_b=sc.stride(0) if sc is not None else 0,
            block_q=bq, block_n=block_n, n_split=n_split, key_major=key_major, num_warps=num_warps,
            num_stages=num_stages)
    return out


def indexer_candidates(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    tau: torch.Tensor,
    cap: int,
    scale: float = 1.0,
    k_scale: torch.Tensor | None = None,
    block_n: int = 128,
    n_split: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The indexer's logits that reach their row's threshold, without the ``[R, T]`` matrix: for each row
    r, every key t of its window with ``logits[r, t] >= tau[r]``, as ``(values [R, cap] fp32, keys [R, cap]
    int32, count [R] int32)``. The first ``min(count, cap)`` slots of a row hold its pairs in no fixed order
    (slots are reserved with atomic counters); a count above ``cap`` means some were not kept. Same
    operands as :func:`indexer_logits` (key-major tiles)."""
    q, k, w, ks, ke, sc, qpb, bq = _operands(q, k, w, ks, ke, scale, k_scale, None)
    R, T = q.shape[0], k.shape[1]
    values = torch.empty(R, cap, dtype=torch.float32, device=q.device)
    keys = torch.empty(R, cap, dtype=torch.int32, device=q.device)
    count = torch.zeros(R, dtype=torch.int32, device=q.device)
    if R == 0 or T == 0:
        return values, keys, count
    _launch(q, k, w, ks, ke, sc, values, R, T, qpb=qpb, sk_b=k.stride(0), ssc_b=sc.stride(0) if sc is not None else 0,
            block_q=bq, block_n=block_n, n_split=n_split, key_major=True, num_warps=num_warps, num_stages=num_stages,
            cand=(tau.float().contiguous(), count, keys, cap))
    return values, keys, count


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with one fp32 scale per row (last dim), as indexer caches store keys: ``x ~ q * scale``."""
    amax = x.float().abs().amax(dim=-1).clamp_min(1e-12)
    scale = amax / 448.0
    q = (x.float() / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale
