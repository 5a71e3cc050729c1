"""The MoE router in Triton: one program per token computes its E expert scores (an fp32 dot product per
expert, summed in registers, no tensor cores), adds the selection bias, keeps the best groups, picks the
top k by repeated arg-max and writes the normalised, scaled weights with the experts. The reference
(:func:`.reference.route`) is about eleven kernels (two casts, the product, sigmoid, the bias, top-k,
gather, sum, add, divide, scale); a decode step runs it in every MoE layer.

Ties: the arg-max takes the lowest index among equal values, where ``torch.topk`` may take another; with
fp32 sigmoid scores an exact tie is rare, and only the choice among the tied experts can differ."""

from __future__ import annotations

import torch

from ..triton_support import HAVE_TRITON, LAST_COMPILED, require_triton
from . import reference

# Up to this many tokens the kernel routes (decode): each program reads all E x D router weights, so for
# prefill's thousands of tokens the reference's one matrix product is the better schedule
KERNEL_MAX_TOKENS = 256

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _argmax_first(v, ids, BIG: tl.constexpr):
        """(max of v, the lowest id holding it)."""
        best = tl.max(v, axis=0)
        return best, tl.min(tl.where(v == best, ids, BIG), axis=0)

    @triton.jit
    def _route_kernel(X, W, B, OUT_W, OUT_I, D, sx, sw, K: tl.constexpr, KP: tl.constexpr, E: tl.constexpr,
                      G: tl.constexpr, TOPK_G: tl.constexpr, NORM: tl.constexpr, scale, BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, E)
        acc = tl.zeros([E], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            xv = tl.load(X + n * sx + d, mask=dm, other=0.0).to(tl.float32)
            wv = tl.load(W + e[:, None] * sw + d[None, :], mask=dm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        score = tl.sigmoid(acc)
        choice = score + tl.load(B + e).to(tl.float32)
        if G > 1:  # a group's score is the sum of its two best; the best TOPK_G groups stay
            EG: tl.constexpr = E // G
            grp = e // EG
            gi = tl.arange(0, G)
            c2 = tl.reshape(choice, (G, EG))
            j = tl.arange(0, EG)
            first = tl.max(c2, axis=1)
            at = tl.min(tl.where(c2 == first[:, None], j[None, :], EG), axis=1)
            second = tl.max(tl.where(j[None, :] == at[:, None], float("-inf"), c2), axis=1)
            gscore = first + second
            keep = tl.zeros([G], dtype=tl.int1)
            for _ in tl.static_range(TOPK_G):
                _, g = _argmax_first(tl.where(keep, float("-inf"), gscore), gi, G)
                keep = keep | (gi == g)
            kept = tl.sum(tl.where(grp[:, None] == gi[None, :], keep[None, :].to(tl.int32), 0), axis=1) > 0
            choice = tl.where(kept, choice, float("-inf"))
        kk = tl.arange(0, KP)
        picked_e = tl.zeros([KP], dtype=tl.int32)
        picked_w = tl.zeros([KP], dtype=tl.float32)
        taken = tl.zeros([E], dtype=tl.int1)
        for s in tl.static_range(K):
            _, i = _argmax_first(tl.where(taken, float("-inf"), choice), e, E)
            taken = taken | (e == i)
            w_i = tl.sum(tl.where(e == i, score, 0.0), axis=0)
            picked_e = tl.where(kk == s, i, picked_e)
            picked_w = tl.where(kk == s, w_i, picked_w)
        if NORM:  # IEEE-rounded division, as the reference's (Triton's fp32 `/` is approximate on the GPU)
            picked_w = tl.math.div_rn(picked_w, tl.sum(picked_w, axis=0) + 1e-20)
        tl.store(OUT_W + n * K + kk, picked_w * scale, mask=kk < K)
        tl.store(OUT_I + n * K + kk, picked_e.to(tl.int64), mask=kk < K)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The signature twin of :func:`.reference.route`: x [N, D] (rows may be strided), weight [E, D] with E a
    power of two and k <= E, bias [E]. More than ``KERNEL_MAX_TOKENS`` tokens, and shapes the kernel does not
    take, run the reference."""
    require_triton()
    N, D = x.shape
    E = weight.shape[0]
    if not 0 < k <= E or n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"route: k={k} of E={E} experts in {n_group} groups, {topk_group} kept, is not a routing")
    # shapes the kernel does not take (E not a power of two, groups of one expert) take the reference
    if N > KERNEL_MAX_TOKENS or E & (E - 1) or (n_group > 1 and E // n_group < 2):
        return reference.route(x, weight, bias, k, n_group, topk_group, norm_topk_prob, scale)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    out_w = torch.empty(N, k, dtype=torch.float32, device=x.device)
    out_i = torch.empty(N, k, dtype=torch.int64, device=x.device)
    if N:
        # E x BLOCK_D weights in registers per step: keep it near 8K values
        block_d = max(16, min(triton.next_power_of_2(D), 8192 // E))
        LAST_COMPILED["route"] = _route_kernel[(N,)](
            x, weight, bias.contiguous(), out_w, out_i, D, x.stride(0), weight.stride(0), K=k,
            KP=triton.next_power_of_2(k), E=E, G=n_group,
            TOPK_G=topk_group, NORM=norm_topk_prob, scale=float(scale), BLOCK_D=block_d, num_warps=4)
    return out_w, out_i


__all__ = ["route"]
