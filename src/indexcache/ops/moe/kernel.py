"""The routed experts as a grouped GEMM in Triton, over the stacked expert weights read in place.

The (token, slot) pairs are sorted by expert (a stable sort, so the order is the same on every run). Each
expert's run of pairs is cut into tiles of ``BM`` rows, and one program computes one tile of one expert:
it gathers its tokens' activations and multiplies them by that expert's weights, addressed in place in
the stacked ``[E, ...]`` tensors. No expert weight is ever copied, in prefill (many rows per expert, a
grouped GEMM) or in decode (a row or two per expert: the kernel reads only the chosen experts).

Two kernels: ``gate_up`` writes ``h = silu(x W_gate^T) * (x W_up^T)`` per pair (both products from one
read of x), ``down`` multiplies h by ``W_down^T`` and the routing weight and writes each pair's row once,
at its (token, slot) place. No atomics, so the result is deterministic.

The tile table (expert, first row, end row of every tile) is built with torch ops whose shapes depend only
on the number of pairs, never on the routing (argsort, searchsorted, cumsum): no host synchronisation, so
a decode step that calls this can be captured in a CUDA graph. Programs past the last real tile return at
once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..triton_support import HAVE_TRITON, LAST_COMPILED, fp32_dot, interpreted, require_triton
from .reference import check_fp8_experts, check_moe_operands, shared_blocks

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(TILE_E, TILE_R0, TILE_R1, BM: tl.constexpr, PER_PAIR: tl.constexpr):
        """This program's tile: its expert, its rows of sorted pairs and their mask, and whether it is empty
        (a program past the last real tile). ``PER_PAIR``: program t is pair t alone and TILE_E the routing
        itself (a decode step: no table is built)."""
        t = tl.program_id(0)
        if PER_PAIR:
            r0 = t
            r1 = t + 1
        else:
            r0 = tl.load(TILE_R0 + t).to(tl.int32)
            r1 = tl.load(TILE_R1 + t).to(tl.int32)
        rows = r0 + tl.arange(0, BM)
        return tl.load(TILE_E + t).to(tl.int64), rows, rows < r1, r0 >= r1

    @triton.jit
    def _gate_up_kernel(X, WG, WU, WGS, WUS, H, ORDER, TILE_E, TILE_R0, TILE_R1, D, INTER, SLOTS, E_ROUTED,
                        s_xn, s_we, s_wi, s_wd, s_hp,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP32_DOT: tl.constexpr,
                        SHARED: tl.constexpr, PER_PAIR: tl.constexpr):
        e, rows, row_ok, empty = _tile(TILE_E, TILE_R0, TILE_R1, BM, PER_PAIR)
        if empty:  # past the last tile
            return
        if PER_PAIR:  # the pairs in routing order: row r is pair r
            tok = rows // SLOTS
        else:
            tok = tl.load(ORDER + rows, mask=row_ok, other=0) // SLOTS
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < INTER
        rk = tl.arange(0, BK)
        x_ptr = X + tok[:, None].to(tl.int64) * s_xn + rk[None, :]
        wg_base = WG + e * s_we  # expert e in place
        wu_base = WU + e * s_we
        if SHARED:
            if e >= E_ROUTED:  # a block of I channels of the shared MLP [S, D], the same row stride
                wg_base = WGS + (e - E_ROUTED) * INTER * s_wi
                wu_base = WUS + (e - E_ROUTED) * INTER * s_wi
        w_off = rn[None, :].to(tl.int64) * s_wi + rk[:, None] * s_wd  # [BK, BN]
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(D, BK)):
            k_left = D - kb * BK
            a = tl.load(x_ptr, mask=row_ok[:, None] & (rk[None, :] < k_left), other=0.0)
            w_ok = n_ok[None, :] & (rk[:, None] < k_left)
            wg = tl.load(wg_base + w_off, mask=w_ok, other=0.0)
            wu = tl.load(wu_base + w_off, mask=w_ok, other=0.0)
            if FP32_DOT != "":  # fp32 operands: the chosen product (Triton's own default for fp32 is tf32)
                acc_g = tl.dot(a, wg, acc_g, input_precision=FP32_DOT)
                acc_u = tl.dot(a, wu, acc_u, input_precision=FP32_DOT)
            else:
                acc_g = tl.dot(a, wg, acc_g)
                acc_u = tl.dot(a, wu, acc_u)
            x_ptr += BK
            w_off += BK * s_wd
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(H + rows[:, None].to(tl.int64) * s_hp + rn[None, :], h.to(H.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_kernel(H, WD, WDS, OUT, ORDER, RW, TILE_E, TILE_R0, TILE_R1, D, INTER, SLOTS, K_ROUTED, E_ROUTED,
                     s_hp, s_we, s_wo, s_wi, s_wso, s_op,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP32_DOT: tl.constexpr,
                     SHARED: tl.constexpr, PER_PAIR: tl.constexpr):
        e, rows, row_ok, empty = _tile(TILE_E, TILE_R0, TILE_R1, BM, PER_PAIR)
        if empty:  # past the last tile
            return
        if PER_PAIR:
            pair = rows
        else:
            pair = tl.load(ORDER + rows, mask=row_ok, other=0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < D
        rk = tl.arange(0, BK)
        h_ptr = H + rows[:, None].to(tl.int64) * s_hp + rk[None, :]
        wd_base = WD + e * s_we
        w_off = rn[None, :].to(tl.int64) * s_wo + rk[:, None] * s_wi  # [BK, BN]
        if SHARED:
            if e >= E_ROUTED:  # columns [jI, (j+1)I) of the shared down projection [D, S]
                wd_base = WDS + (e - E_ROUTED) * INTER * s_wi
                w_off = rn[None, :].to(tl.int64) * s_wso + rk[:, None] * s_wi
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(INTER, BK)):
            k_left = INTER - kb * BK
            a = tl.load(h_ptr, mask=row_ok[:, None] & (rk[None, :] < k_left), other=0.0)
            w = tl.load(wd_base + w_off, mask=n_ok[None, :] & (rk[:, None] < k_left), other=0.0)
            if FP32_DOT != "":
                acc = tl.dot(a, w, acc, input_precision=FP32_DOT)
            else:
                acc = tl.dot(a, w, acc)
            h_ptr += BK
            w_off += BK * s_wi
        # the routing weight of (token, slot) = pair's place in [N, SLOTS]; the shared slots (>= K_ROUTED) weigh 1
        tok = pair // SLOTS
        slot = pair - tok * SLOTS
        rw = tl.load(RW + tok * K_ROUTED + slot, mask=row_ok & (slot < K_ROUTED), other=1.0)
        y = acc * rw[:, None]
        tl.store(OUT + pair[:, None].to(tl.int64) * s_op + rn[None, :], y.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


if HAVE_TRITON:

    @triton.jit
    def _gate_up_fp8_kernel(XQ, XS, WG, WGS, WU, WUS, H, ORDER, TILE_E, TILE_R0, TILE_R1, D, INTER, SLOTS,
                            s_xn, s_xsn, s_we, s_wi, s_wse, s_wsi, s_hp,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # block-FP8: x in e4m3 with one scale per token and 128 channels, each expert's weights in e4m3 with
        # one scale per 128 x 128 block; K is walked in the blocks' steps (BK = 128), and each step's product
        # takes its row and column scales before it joins the fp32 accumulator
        e, rows, row_ok, empty = _tile(TILE_E, TILE_R0, TILE_R1, BM, False)
        if empty:  # past the last tile
            return
        tok = (tl.load(ORDER + rows, mask=row_ok, other=0) // SLOTS).to(tl.int64)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < INTER
        rk = tl.arange(0, BK)
        x_ptr = XQ + tok[:, None] * s_xn + rk[None, :]
        w_off = e * s_we + rn[None, :].to(tl.int64) * s_wi + rk[:, None]  # [BK, BN], expert e in place
        ws_off = e * s_wse + (rn // BK) * s_wsi
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(D, BK)):
            a = tl.load(x_ptr, mask=row_ok[:, None], other=0.0)
            a_s = tl.load(XS + tok * s_xsn + kb, mask=row_ok, other=0.0)
            wg = tl.load(WG + w_off, mask=n_ok[None, :], other=0.0)
            wu = tl.load(WU + w_off, mask=n_ok[None, :], other=0.0)
            wg_s = tl.load(WGS + ws_off + kb, mask=n_ok, other=0.0)
            wu_s = tl.load(WUS + ws_off + kb, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, wg) * a_s[:, None] * wg_s[None, :]
            acc_u += tl.dot(a, wu) * a_s[:, None] * wu_s[None, :]
            x_ptr += BK
            w_off += BK
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(H + rows[:, None].to(tl.int64) * s_hp + rn[None, :], h.to(H.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_fp8_kernel(HQ, HS, WD, WDS, OUT, ORDER, RW, TILE_E, TILE_R0, TILE_R1, D, INTER,
                         s_hp, s_hsp, s_we, s_wo, s_wse, s_wso, s_op,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        e, rows, row_ok, empty = _tile(TILE_E, TILE_R0, TILE_R1, BM, False)
        if empty:  # past the last tile
            return
        pair = tl.load(ORDER + rows, mask=row_ok, other=0)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < D
        rk = tl.arange(0, BK)
        h_ptr = HQ + rows[:, None].to(tl.int64) * s_hp + rk[None, :]
        w_off = e * s_we + rn[None, :].to(tl.int64) * s_wo + rk[:, None]
        ws_off = e * s_wse + (rn // BK) * s_wso
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(INTER, BK)):
            a = tl.load(h_ptr, mask=row_ok[:, None], other=0.0)
            a_s = tl.load(HS + rows.to(tl.int64) * s_hsp + kb, mask=row_ok, other=0.0)
            w = tl.load(WD + w_off, mask=n_ok[None, :], other=0.0)
            w_s = tl.load(WDS + ws_off + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
            h_ptr += BK
            w_off += BK
        rw = tl.load(RW + pair, mask=row_ok, other=0.0)
        tl.store(OUT + pair[:, None].to(tl.int64) * s_op + rn[None, :], (acc * rw[:, None]).to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])

PER_PAIR_TILES = 32  # up to this many (token, slot) pairs, one tile per pair (decode)


def tile_table(idx: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The pairs sorted by expert and the tiles over them: ``(order [P], tile_expert, tile_first_row,
    tile_end_row)`` (int32, one entry per possible tile). Shapes depend on ``P = idx.numel()`` and
    ``n_experts`` only; tiles past the last real one have first row = end row. Up to ``PER_PAIR_TILES``
    pairs, each pair is its own tile in routing order: the table is then the routing itself, three
    operators instead of about twenty for the sort, a decode step's fixed cost; an expert two pairs chose
    is read twice, the second time mostly from L2. (:func:`moe_experts` builds no table at all then: its
    kernels take the routing itself, ``PER_PAIR``.)"""
    flat = idx.reshape(-1)
    P = flat.numel()
    if P <= PER_PAIR_TILES:
        pairs = torch.arange(P, device=idx.device, dtype=torch.int32)
        return pairs, flat.to(torch.int32), pairs, pairs + 1
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    experts = torch.arange(n_experts, device=idx.device, dtype=flat.dtype)
    starts = torch.searchsorted(sorted_e, experts)
    ends = torch.searchsorted(sorted_e, experts, right=True)
    tiles = (ends - starts + block_m - 1) // block_m
    last = torch.cumsum(tiles, 0)  # tiles of experts [0, e]
    first = last - tiles
    # at most one partial tile per expert that has pairs, and at most P experts have any
    max_tiles = -(-P // block_m) + min(n_experts, P)
    t = torch.arange(max_tiles, device=idx.device, dtype=last.dtype)
    tile_e = torch.searchsorted(last, t, right=True).clamp_max(n_experts - 1)
    r0 = starts[tile_e] + (t - first[tile_e]) * block_m
    r1 = ends[tile_e]
    real = t < last[-1]
    r0 = torch.where(real, r0, torch.zeros_like(r0))
    r1 = torch.where(real, r1, torch.zeros_like(r1))
    as32 = lambda v: v.to(torch.int32).contiguous()  # noqa: E731
    return as32(order), as32(tile_e), as32(r0), as32(r1)


def _block_m(P: int, n_experts: int) -> int:
    """Rows per tile: the average run of pairs per expert that has any, as a power of two in [16, 64]
    (16 is the smallest ``tl.dot`` tile; a decode step has a row or two per expert)."""
    avg = P / max(1, min(n_experts, P))
    bm = 16
    while bm < 64 and bm < avg:
        bm *= 2
    return bm


def default_tiles(P: int, n_experts: int) -> tuple[int, int, int, int, int]:
    """(block_m, block_n, block_k, num_warps, num_stages) for ``P`` (token, slot) pairs over ``n_experts``,
    from the H200 sweep (results/kernels/h200/moe_topk_fused_sweep.json). Long runs per expert (prefill)
    take 128 x 128 tiles with 8 warps: 439 and 397 TFLOP/s at 16K tokens of GLM-4.7-Flash and DeepSeek-V3.2
    widths, against 293 and 286 with 64-row tiles. A row or two per expert (decode) takes narrow, deep
    tiles: 39 against 52 us at batch 1 on GLM-4.7-Flash (1.2 against 1.3 ms at batch 8 on V3.2; 3% slower
    at V3.2's batch 1). Between the two, the earlier default."""
    avg = P / max(1, min(n_experts, P))
    if avg >= 128:
        return 128, 128, 64, 8, 3
    if avg <= 4:
        return 16, 32, 128, 4, 4
    return _block_m(P, n_experts), 64, 64, 4, 3


def moe_experts(  # the signature twin of reference.moe_experts (one API, two implementations)
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[N, k, D]`` in x's dtype (the signature of :func:`.reference.moe_experts`): x [N, D] and the
    stacked weights in bf16, fp16 or fp32, idx [N, k] integer experts, weights [N, k] routing weights;
    ``shared`` adds the shared MLP's ``S / I`` blocks as slots after the routed ones (``[N, k + S / I, D]``):
    each block is one more expert of the tile table, its weights read in place from the shared tensors.
    The other arguments tune the kernels: all None picks :func:`default_tiles`; otherwise the ones left None
    are 64 x 64 tiles of :func:`_block_m` rows, 4 warps, 3 stages."""
    require_triton()
    check_moe_operands(x, w_gate, w_up, w_down, idx, weights)
    blocks = shared_blocks(w_gate, shared)
    N, D = x.shape
    E, inter, _ = w_gate.shape
    k_routed = idx.shape[1]
    rw = weights.float().reshape(-1).contiguous()  # [N, k_routed]: the down kernel weighs the shared slots 1
    if blocks:  # block j of the shared MLP is expert E + j, chosen by every token
        sg, su, sd = (t.contiguous() for t in shared)
        idx = F.pad(idx, (0, blocks), value=E)
        if blocks > 1:
            idx[:, k_routed:] += torch.arange(blocks, device=idx.device, dtype=idx.dtype)
    else:
        sg, su, sd = w_gate, w_up, w_down  # not read (SHARED is off)
    k = idx.shape[1]
    P = N * k
    out = x.new_empty(N, k, D)
    if P == 0:
        return out
    n_experts = E + blocks
    if all(v is None for v in (block_m, block_n, block_k, num_warps, num_stages)):
        block_m, block_n, block_k, num_warps, num_stages = default_tiles(P, n_experts)
    block_n, block_k, num_warps, num_stages = block_n or 64, block_k or 64, num_warps or 4, num_stages or 3
    if interpreted():  # small tiles: the interpreter is slow and its shapes are small
        block_n, block_k = min(block_n, 32), min(block_k, 32)
    bm = block_m or _block_m(P, n_experts)
    per_pair = P <= PER_PAIR_TILES
    if per_pair:  # program t is pair t: the kernels read the routing itself, no table is built
        flat_idx = idx.reshape(-1)
        order = tile_e = r0 = r1 = flat_idx
    else:
        order, tile_e, r0, r1 = tile_table(idx, n_experts, bm)
    x = x.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    h = x.new_empty(P, inter)  # per sorted pair, rounded to x's dtype as the reference's F.linear output is
    prec = fp32_dot(x.dtype)
    tiles = tile_e.numel()
    LAST_COMPILED["moe_gate_up"] = _gate_up_kernel[(tiles, triton.cdiv(inter, block_n))](
        x, w_gate, w_up, sg, su, h, order, tile_e, r0, r1, D, inter, k, E,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2), h.stride(0),
        BM=bm, BN=block_n, BK=block_k, FP32_DOT=prec, SHARED=blocks > 0, PER_PAIR=per_pair, num_warps=num_warps,
        num_stages=num_stages,
    )
    flat_out = out.view(P, D)
    LAST_COMPILED["moe_down"] = _down_kernel[(tiles, triton.cdiv(D, block_n))](
        h, w_down, sd, flat_out, order, rw, tile_e, r0, r1, D, inter, k, k_routed, E,
        h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), sd.stride(0), flat_out.stride(0),
        BM=bm, BN=block_n, BK=block_k, FP32_DOT=prec, SHARED=blocks > 0, PER_PAIR=per_pair, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def moe_experts_fp8(  # the signature twin of reference.moe_experts_fp8
    x: torch.Tensor,
    experts: dict[str, torch.Tensor],
    idx: torch.Tensor,
    weights: torch.Tensor,
    scale_fmt: str | None = None,
    block_m: int | None = None,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Block-FP8 experts (the signature of :func:`.reference.moe_experts_fp8`): x quantised once per token
    and 128 channels, h once per pair, each by the one-pass quantisation kernel; the products on the
    e4m3 tensor cores, the experts' weights and scales read in place."""
    from ..fp8_gemm.kernel import act_quant

    require_triton()
    wg, wgs, wu, wus, wd, wds = check_fp8_experts(x, experts, idx, weights)
    N, D = x.shape
    k = idx.shape[1]
    if N * k == 0:
        return x.new_empty(N, k, D)
    bm = block_m or _block_m(N * k, wg.shape[0])
    table = (*tile_table(idx, wg.shape[0], bm), bm, k)
    tune = {"block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}
    xq, xs = act_quant(x, 128, scale_fmt)
    h = fp8_gate_up(xq, xs, wg, wgs, wu, wus, table, x.dtype, **tune)
    hq, hs = act_quant(h, 128, scale_fmt)
    return fp8_down(hq, hs, wd, wds, table, weights, N, x.dtype, **tune)


def fp8_gate_up(xq: torch.Tensor, xs: torch.Tensor, wg: torch.Tensor, wgs: torch.Tensor, wu: torch.Tensor,
                wus: torch.Tensor, table: tuple, out_dtype: torch.dtype, block_n: int = 128, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """The first stage of :func:`moe_experts_fp8`: ``h = silu(x W_gate^T) * (x W_up^T)`` [P, I] in
    ``out_dtype``, one row per (token, slot) pair in the table's sorted order (row r is pair
    ``order[r]``). ``table``: :func:`tile_table`'s four tensors, then the rows per tile and the slots."""
    order, tile_e, r0, r1, bm, slots = table
    D, inter = xq.shape[1], wg.shape[1]
    block_n = 32 if interpreted() else block_n
    h = torch.empty(order.numel(), inter, dtype=out_dtype, device=xq.device)
    LAST_COMPILED["moe_gate_up_fp8"] = _gate_up_fp8_kernel[(tile_e.numel(), triton.cdiv(inter, block_n))](
        xq, xs, wg, wgs, wu, wus, h, order, tile_e, r0, r1, D, inter, slots,
        xq.stride(0), xs.stride(0), wg.stride(0), wg.stride(1), wgs.stride(0), wgs.stride(1), h.stride(0),
        BM=bm, BN=block_n, BK=128, num_warps=num_warps, num_stages=num_stages,
    )
    return h


def fp8_down(hq: torch.Tensor, hs: torch.Tensor, wd: torch.Tensor, wds: torch.Tensor, table: tuple,
             weights: torch.Tensor, n_tokens: int, out_dtype: torch.dtype, block_n: int = 128, num_warps: int = 4,
             num_stages: int = 3) -> torch.Tensor:
    """The second stage of :func:`moe_experts_fp8`: the quantised h (sorted rows) times ``W_down^T`` and the
    routing weights, each pair's row written once at its (token, slot) place: ``[n_tokens, slots, D]``."""
    order, tile_e, r0, r1, bm, slots = table
    D, inter = wd.shape[1], wd.shape[2]
    block_n = 32 if interpreted() else block_n
    out = torch.empty(n_tokens, slots, D, dtype=out_dtype, device=hq.device)
    flat_out = out.view(-1, D)
    rw = weights.float().reshape(-1).contiguous()
    LAST_COMPILED["moe_down_fp8"] = _down_fp8_kernel[(tile_e.numel(), triton.cdiv(D, block_n))](
        hq, hs, wd, wds, flat_out, order, rw, tile_e, r0, r1, D, inter,
        hq.stride(0), hs.stride(0), wd.stride(0), wd.stride(1), wds.stride(0), wds.stride(1), flat_out.stride(0),
        BM=bm, BN=block_n, BK=128, num_warps=num_warps, num_stages=num_stages,
    )
    return out


__all__ = ["moe_experts", "moe_experts_fp8", "tile_table"]
