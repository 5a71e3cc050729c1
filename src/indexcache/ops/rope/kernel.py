"""RoPE in Triton: one pass that reads x and the position's cos/sin rows and writes the rotated x. Every
product, difference and sum is rounded to the result dtype as in :func:`.reference.apply_rope` (PyTorch's
elementwise ops), so with 16-bit results the two are bit-identical; in fp32 the compiler may fuse a
product into the subtraction (one rounding fewer). PyTorch spends about eight kernels on one rotation, and
a decode step rotates four tensors per layer."""

from __future__ import annotations

import torch

from ..triton_support import HAVE_TRITON, LAST_COMPILED, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, S, H, sxb, sxs, sxh, scs, sys_, syh, HALF: tl.constexpr, HP: tl.constexpr,
                     BH: tl.constexpr, INTERLEAVED: tl.constexpr, REST: tl.constexpr, RP: tl.constexpr):
        bs = tl.program_id(0).to(tl.int64)  # one (batch, position) per program, BH heads at a time
        b, s = bs // S, bs % S
        h = tl.program_id(1) * BH + tl.arange(0, BH)
        i = tl.arange(0, HP)
        hm, im = h < H, i < HALF
        m = hm[:, None] & im[None, :]
        if INTERLEAVED:
            first, second = 2 * i, 2 * i + 1
        else:
            first, second = i, i + HALF
        xrow = X + b * sxb + s * sxs + h[:, None].to(tl.int64) * sxh
        x1 = tl.load(xrow + first[None, :], mask=m, other=0.0)
        x2 = tl.load(xrow + second[None, :], mask=m, other=0.0)
        c = tl.load(COS + s * scs + i, mask=im, other=0.0)[None, :]
        sn = tl.load(SIN + s * scs + i, mask=im, other=0.0)[None, :]
        out_t = Y.dtype.element_ty
        x1f, x2f, cf, sf = x1.to(tl.float32), x2.to(tl.float32), c.to(tl.float32), sn.to(tl.float32)
        # each op rounded to the result dtype, as the reference's separate elementwise ops are
        a = (x1f * cf).to(out_t).to(tl.float32)
        bb = (x2f * sf).to(out_t).to(tl.float32)
        o1 = (a - bb).to(out_t)
        a = (x2f * cf).to(out_t).to(tl.float32)
        bb = (x1f * sf).to(out_t).to(tl.float32)
        o2 = (a + bb).to(out_t)
        yrow = Y + b * (S * sys_) + s * sys_ + h[:, None].to(tl.int64) * syh
        tl.store(yrow + first[None, :], o1, mask=m)
        tl.store(yrow + second[None, :], o2, mask=m)
        if REST > 0:  # the columns after the rotated ones, copied
            j = tl.arange(0, RP)
            mr = hm[:, None] & (j < REST)[None, :]
            rest = tl.load(xrow + 2 * HALF + j[None, :], mask=mr, other=0.0)
            tl.store(yrow + 2 * HALF + j[None, :], rest.to(out_t), mask=mr)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
               seq_dim: int = 1, rope_dims: int | None = None) -> torch.Tensor:
    """The signature twin of :func:`.reference.apply_rope` for x [B, S, d] or [B, S, H, d] (``seq_dim`` 1;
    rows may be strided, as a slice of wider rows is); with ``rope_dims`` the rest of each row is copied in
    the same pass (no concatenation afterwards)."""
    require_triton()
    if seq_dim != 1 or x.dim() not in (3, 4):
        raise ValueError(f"the rope kernel takes x [B, S, d] or [B, S, H, d] with the positions on dim 1, got "
                         f"{tuple(x.shape)} with seq_dim {seq_dim}")
    width = x.shape[-1]
    d = width if rope_dims is None else rope_dims
    S = x.shape[1]
    if d % 2 or d > width or tuple(cos.shape) != (S, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope tables {tuple(cos.shape)} do not fit x {tuple(x.shape)} (want [{S}, {d // 2}])")
    rest = width - d
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    x4 = x if x.dim() == 4 else x.unsqueeze(2)
    B, _, H, _ = x4.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if out.numel():
        y4 = out if out.dim() == 4 else out.unsqueeze(2)
        half = d // 2
        bh = min(16, triton.next_power_of_2(H))
        LAST_COMPILED["rope"] = _rope_kernel[(B * S, triton.cdiv(H, bh))](
            x4, cos, sin, y4, S, H, x4.stride(0), x4.stride(1), x4.stride(2), cos.stride(0), y4.stride(1),
            y4.stride(2), HALF=half, HP=triton.next_power_of_2(half), BH=bh, INTERLEAVED=interleaved,
            REST=rest, RP=triton.next_power_of_2(max(rest, 1)), num_warps=4,
            # no fused multiply-adds: the compiler would otherwise fold a rounded product into the sum
            # (one rounding where the reference has two), a last-bit difference on the GPU only
            enable_fp_fusion=False)
    return out


__all__ = ["apply_rope"]
