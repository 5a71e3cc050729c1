"""Block-scaled FP8 matrix product in Triton (Hopper's e4m3 tensor cores).

:func:`fp8_gemm`: one program computes a [BM, BN] tile of ``C = A @ B.T``. K is walked in steps of 128, the activation
scales' group: each step's e4m3 product, accumulated by ``tl.dot`` in fp32, is multiplied by the rows'
activation scales and the columns' weight-block scale before it joins the fp32 accumulator (the scales
differ from step to step, so they cannot be applied once at the end). Tiles are visited in groups of
``GROUP_M`` row-blocks so that neighbouring programs share B's columns in L2.

:func:`act_quant`: the activations' quantisation in one pass (one program per 128-channel group of a block
of rows: amax, scale, e4m3), the same arithmetic as :func:`indexcache.ops.fp8.act_quant`, which otherwise
reads and writes the activations several times.
"""

from __future__ import annotations

import torch

from ..triton_support import HAVE_TRITON, interpreted, require_triton
from .reference import BLOCK

if HAVE_TRITON:
    import triton
    import triton.language as tl

    def _configs():
        if interpreted():  # one small tile: the interpreter is slow and autotuning would multiply that
            return [triton.Config({"BM": 32, "BN": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
        return [triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, bn, w, s in [(128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4),
                                     (64, 64, 4, 5), (32, 128, 4, 4), (16, 128, 4, 4)]]

    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _fp8_gemm_kernel(A, B, C, AS, BS, M, N, K, M_BUCKET,
                         s_am, s_ak, s_bn, s_bk, s_cm, s_cn, s_asm, s_ask, s_bsn, s_bsk,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        in_group = GROUP_M * n_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m

        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptr = A + rm[:, None].to(tl.int64) * s_am + rk[None, :] * s_ak
        b_ptr = B + rn[None, :].to(tl.int64) * s_bn + rk[:, None] * s_bk
        as_ptr = AS + rm.to(tl.int64) * s_asm
        bs_ptr = BS + (rn // BK) * s_bsn  # the weight block of each column (BK = the 128 of the blocks)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BK)):
            k_left = K - kb * BK
            a = tl.load(a_ptr, mask=m_ok[:, None] & (rk[None, :] < k_left), other=0.0)
            b = tl.load(b_ptr, mask=n_ok[None, :] & (rk[:, None] < k_left), other=0.0)
            a_s = tl.load(as_ptr + kb * s_ask, mask=m_ok, other=0.0)
            b_s = tl.load(bs_ptr + kb * s_bsk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptr += BK * s_ak
            b_ptr += BK * s_bk
        c_ptr = C + rm[:, None].to(tl.int64) * s_cm + rn[None, :] * s_cn
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


if HAVE_TRITON:

    @triton.jit
    def _act_quant_kernel(X, Q, S, M, K, s_xm, s_qm, s_sm, AMAX_FLOOR: tl.constexpr, FP8_MAX: tl.constexpr,
                          UE8M0: tl.constexpr, BM: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        kb = tl.program_id(1)
        rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(X + rm[:, None].to(tl.int64) * s_xm + rk[None, :], mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)
        s = amax / FP8_MAX
        if UE8M0:  # rounded up to a power of two
            s = tl.exp2(tl.ceil(tl.log2(s)))
        # IEEE-rounded division, as torch divides (Triton's `/` on fp32 is an approximate division on the GPU)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None]), -FP8_MAX), FP8_MAX)
        # round to the e4m3 grid here, to nearest even, so that the cast below is exact on every backend (the
        # CPU interpreter's cast loses the carry when rounding up a mantissa of all ones): the grid's step is
        # 2^(e - 3) for a value of exponent e, 2^-9 below 2^-6; (v + 1.5 * 2^23) - 1.5 * 2^23 rounds v to an
        # integer, to even, in fp32. It rounds the magnitude, and the sign goes back on after: a negative value
        # that rounds to zero is -0 in torch's cast (0x80), and the magic-number sum would give +0
        e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inv_step = ((127 - (tl.maximum(e, -6) - 3)) << 23).to(tl.float32, bitcast=True)  # powers of two: exact
        r = ((tl.abs(y) * inv_step + 12582912.0) - 12582912.0) * step
        sign = ((y.to(tl.uint32, bitcast=True) >> 31) << 7).to(tl.uint8)  # -0.0 included
        bits = r.to(tl.float8e4nv).to(tl.uint8, bitcast=True) | sign
        tl.store(Q + rm[:, None].to(tl.int64) * s_qm + rk[None, :], bits, mask=ok)  # Q: the e4m3 bytes
        tl.store(S + rm.to(tl.int64) * s_sm + kb, s, mask=rm < M)


def act_quant(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`indexcache.ops.fp8.act_quant` for 2-D ``x`` [M, K] (K a multiple of 128)."""
    from ..fp8 import AMAX_FLOOR, FP8_MAX

    require_triton()
    M, K = x.shape
    if block != BLOCK or K % BLOCK:
        raise ValueError(f"the act_quant kernel takes groups of {BLOCK} channels and K divisible by it, got {K}")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"unknown scale_fmt {scale_fmt!r} (None or 'ue8m0')")
    x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, K // BLOCK, dtype=torch.float32, device=x.device)
    if M:
        bm = 16 if interpreted() else 32
        _act_quant_kernel[(triton.cdiv(M, bm), K // BLOCK)](x, q.view(torch.uint8), s, M, K, x.stride(0), q.stride(0),
                                                            s.stride(0),
                                                            AMAX_FLOOR=AMAX_FLOOR, FP8_MAX=FP8_MAX,
                                                            UE8M0=scale_fmt == "ue8m0", BM=bm, BLOCK_K=BLOCK)
    return q, s


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Same contract as :func:`indexcache.ops.fp8_gemm.reference.fp8_gemm`."""
    require_triton()
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K or tuple(a_scale.shape) != (M, triton.cdiv(K, BLOCK)) \
            or tuple(b_scale.shape) != (triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK)):
        raise ValueError(f"fp8_gemm shapes do not agree: a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)}, "
                         f"b {tuple(b.shape)}, b_scale {tuple(b_scale.shape)}")
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    a_scale, b_scale = a_scale.float(), b_scale.float()
    bucket = min(triton.next_power_of_2(M), 4096)  # tiles tuned per size class of M, not per exact M

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _fp8_gemm_kernel[grid](a, b, c, a_scale, b_scale, M, N, K, bucket,
                           a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                           a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), BK=BLOCK)
    return c
