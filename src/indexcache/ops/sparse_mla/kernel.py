"""Sparse MLA in Triton over the latent cache (absorbed form): prefill and decode.

    out[s, h] = sum_{t in I(s)} softmax_t(scale * q[s, h] . kv[t]) * kv[t, :d_v]

One latent row per key token is shared by every head (MQA over ``kv = [c | k_rope]``, 512 + 64 dims for
DeepSeek-V3.2 / GLM-5), so a program takes one query and a block of ``BH`` heads, gathers ``BK`` selected
rows at a time (each a contiguous 1152-byte row in bf16, so the gather is coalesced), and runs a
flash-attention loop: ``q_nope . c + q_rope . k_rope`` as two dots into one accumulator, an online
softmax in the exp2 domain, and ``p . c`` into a ``[BH, d_v]`` fp32 accumulator. V is the first ``d_v``
columns of the same rows, so nothing is loaded twice.

Heads: ``BH`` is the smallest power of two >= 16 covering the heads when there are few (20 -> 32), else
64; a query's head blocks re-read its gathered rows from L2, not HBM.

Decode has few queries, so the selected set is split into ``n_split`` parts run by separate programs,
each writing a partial output and log-sum-exp that a final combine merges (split-K flash decoding).
"""

from __future__ import annotations

import math

import torch

from ..triton_support import HAVE_TRITON, LAST_COMPILED, fp32_dot, require_triton

LOG2E = 1.4426950408889634

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sparse_mla_kernel(
        Q, KV, IDX, O, LSE,
        N, H, TOPK, CHUNK, QPB, sm_scale_log2,
        sq_s, sq_h, skv_n, si_s, so_s, so_h, so_p, sl_s, sl_h,
        DV: tl.constexpr, DR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, FP32_DOT: tl.constexpr,
    ):
        s = tl.program_id(0)
        hb = tl.program_id(1)
        sp = tl.program_id(2)
        h = hb * BH + tl.arange(0, BH)
        h_ok = h < H
        dv = tl.arange(0, DV)
        dr = tl.arange(0, DR)
        qrow = Q + s.to(tl.int64) * sq_s + h[:, None] * sq_h
        qn = tl.load(qrow + dv[None, :], mask=h_ok[:, None], other=0.0)
        qr = tl.load(qrow + DV + dr[None, :], mask=h_ok[:, None], other=0.0)
        m_i = tl.full([BH], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BH], dtype=tl.float32)
        acc = tl.zeros([BH, DV], dtype=tl.float32)
        k_lo = sp * CHUNK
        k_hi = tl.minimum(k_lo + CHUNK, TOPK)
        irow = IDX + s.to(tl.int64) * si_s
        # a batched cache is one flat pool of QPB-query groups with N rows each: indices are per group
        KVs = KV + (s // QPB).to(tl.int64) * N * skv_n
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + tl.arange(0, BK)
            idx = tl.load(irow + kk, mask=kk < k_hi, other=-1)
            valid = (idx >= 0) & (idx < N)
            rows = KVs + tl.where(valid, idx, 0).to(tl.int64) * skv_n
            c = tl.load(rows[:, None] + dv[None, :], mask=valid[:, None], other=0.0)  # [BK, DV]
            kr = tl.load(rows[:, None] + DV + dr[None, :], mask=valid[:, None], other=0.0)  # [BK, DR]
            if FP32_DOT != "":  # fp32 operands: the chosen product (Triton's own default for fp32 is tf32)
                sc = tl.dot(qn, tl.trans(c), input_precision=FP32_DOT)
                sc = tl.dot(qr, tl.trans(kr), acc=sc, input_precision=FP32_DOT)
            else:
                sc = tl.dot(qn, tl.trans(c))
                sc = tl.dot(qr, tl.trans(kr), acc=sc)
            sc = tl.where(valid[None, :], sc * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing valid yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if FP32_DOT != "":
                acc = acc * alpha[:, None] + tl.dot(p, c, input_precision=FP32_DOT)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        orow = O + s.to(tl.int64) * so_s + h[:, None] * so_h + sp * so_p
        tl.store(orow + dv[None, :], out, mask=h_ok[:, None])
        tl.store(LSE + s.to(tl.int64) * sl_s + h * sl_h + sp, lse, mask=h_ok)

    @triton.jit
    def _combine_kernel(OP, LP, O, LSE, H, P, DV: tl.constexpr, BP: tl.constexpr):
        """Merge the split-K partials of one (query, head): weights exp(lse_p - lse)."""
        s = tl.program_id(0)
        h = tl.program_id(1)
        base = s.to(tl.int64) * H + h
        p = tl.arange(0, BP)
        lp = tl.load(LP + base * P + p, mask=p < P, other=float("-inf"))
        m = tl.max(lp, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        wgt = tl.exp(lp - m_safe)
        tot = tl.sum(wgt, axis=0)
        dv = tl.arange(0, DV)
        op = tl.load(OP + (base * P + p[:, None]) * DV + dv[None, :], mask=p[:, None] < P, other=0.0)
        tot_safe = tl.where(tot == 0.0, 1.0, tot)
        out = tl.sum(op * wgt[:, None], axis=0) / tot_safe
        tl.store(O + base * DV + dv, out)
        tl.store(LSE + base, tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tot_safe)))


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def supported(d_qk: int, d_v: int) -> bool:
    return _pow2(d_v) and _pow2(d_qk - d_v) and d_v >= 16 and d_qk - d_v >= 16


def default_block_h(h: int) -> int:
    return 64 if h >= 64 else max(16, 1 << (h - 1).bit_length())


def _combine(o_part: torch.Tensor, lse_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-K partials: o_part [S,H,P,DV] (each normalised), lse_part [S,H,P] (one kernel)."""
    S, H, P, DV = o_part.shape
    out = torch.empty(S, H, DV, dtype=torch.float32, device=o_part.device)
    lse = torch.empty(S, H, dtype=torch.float32, device=o_part.device)
    _combine_kernel[(S, H)](o_part, lse_part, out, lse, H, P, DV=DV, BP=max(2, triton.next_power_of_2(P)),
                            num_warps=4)
    return out, lse


def sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    budget_bytes: int | None = None,
    n_split: int | None = None,
    block_h: int | None = None,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA in the flat layout of :mod:`indexcache.ops.common` (the signature of
    :func:`.reference.sparse_mla`): q [R,H,d_qk], kv [G,T,d_qk] (same dtype: bf16/fp16/fp32), indices [R,K]
    into each row's own cache (``-1`` or ``>= T`` = none) -> out [R,H,d_v] fp32, lse [R,H] fp32 (natural log;
    ``-inf`` and out 0 for a row with no valid index). The caches are one flat pool and the kernel offsets
    row r's indices by its cache. ``n_split`` > 1 splits each row's selected tokens over that many programs
    (default: enough to fill the GPU when there are few rows, as in decode)."""
    require_triton()
    R, H, Dk = q.shape
    G, T = kv.shape[0], kv.shape[1]
    if G < 1 or R % G:
        raise ValueError(f"{R} query rows do not split evenly over {G} latent caches")
    qpb = R // G
    if kv.shape[-1] != Dk:
        raise ValueError(f"q and kv dims differ: {Dk} vs {kv.shape[-1]}")
    if q.dtype != kv.dtype:
        raise ValueError(f"q and kv must share a dtype, got {q.dtype} and {kv.dtype}")
    if not supported(Dk, d_v):
        raise ValueError(f"sparse_mla supports power-of-two d_v and rope dims (>= 16), got d_qk={Dk} d_v={d_v}")
    if indices.shape[0] != R:
        raise ValueError(f"indices must have {R} rows, got {indices.shape[0]}")
    K = indices.shape[1]
    bh = block_h or default_block_h(H)
    if n_split is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 2
        blocks = R * math.ceil(H / bh)
        n_split = max(1, min(triton.cdiv(4 * sms, blocks), triton.cdiv(K, 64)))
    q, kv = q.contiguous(), kv.reshape(G * T, Dk).contiguous()
    indices = indices.to(torch.int32).contiguous()
    n_split = max(1, min(n_split, triton.cdiv(K, block_k)))
    chunk = triton.cdiv(triton.cdiv(K, n_split), block_k) * block_k
    n_split = triton.cdiv(K, chunk) if K else 1
    o = torch.empty(R, H, n_split, d_v, dtype=torch.float32, device=q.device)
    lse = torch.empty(R, H, n_split, dtype=torch.float32, device=q.device)
    if R == 0:
        return o[:, :, 0], lse[:, :, 0]
    grid = (R, triton.cdiv(H, bh), n_split)
    LAST_COMPILED["sparse_mla"] = _sparse_mla_kernel[grid](
        q, kv, indices, o, lse,
        T, H, K, chunk, qpb, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        DV=d_v, DR=Dk - d_v, BH=bh, BK=block_k, FP32_DOT=fp32_dot(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if n_split == 1:
        return o[:, :, 0], lse[:, :, 0]
    return _combine(o, lse)
