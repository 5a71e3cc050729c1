"""The one backend registry: every caller (the model, the engine, the search, the transformers integration)
picks its ops here, by name.

A :class:`Backend` holds the three ops in the flat layout of :mod:`indexcache.ops.common`, each with the
same signature in both backends:

* ``indexer_logits(q [R,H,D], k [G,T,D], w [R,H], ks, ke, scale=1.0, k_scale=None, budget_bytes=..., clean=True)``
* ``topk(logits [R,n], k, ks, ke, row_len=None, ties="topk")``
* ``sparse_mla(q [R,H,Dk], kv [G,T,Dk], indices [R,K], scale, d_v, budget_bytes=...)``
* ``fp8_gemm(a [M,K] e4m3, a_scale [M,K/128], b [N,K] e4m3, b_scale [N/128,K/128], out_dtype)`` (FP8 layers)
* ``indexer_candidates(q, k, w, ks, ke, tau [R], cap, scale=1.0, k_scale=None)``: the logits at or above a
  per-row threshold as (values, keys, count), for the fused indexer + top-k (the logits never written whole)
* ``moe_router(x [N,D], weight [E,D], bias [E], k, n_group, topk_group, norm_topk_prob, scale)``: the MoE
  router's (weights [N,k] fp32, experts [N,k])
* ``moe_experts(x [N,D], w_gate [E,I,D], w_up [E,I,D], w_down [E,D,I], idx [N,k], weights [N,k], shared=None)``
  (MoE; ``shared`` = the shared MLP's three weights, folded in as more slots), and
  ``moe_experts_fp8(x, experts {part: e4m3 [E,...], part_scale_inv: [E,.../128]}, idx, weights, scale_fmt)``

``torch`` runs the plain-PyTorch references (any device; what every kernel is tested against), ``triton``
the kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``). The composite :func:`indexcache.ops.indexer.indexer_topk`
and the model build on these three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fp8 import act_quant

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    indexer_logits: Callable
    topk: Callable
    sparse_mla: Callable
    # fp8 scoring: the operands the logits op takes, from values that already hold e4m3 numbers times
    # power-of-two block scales (the model's fp8 mode). None: it takes those dequantised values as they are.
    fp8_operands: Callable | None = None
    ties: str = "topk"  # how its top-k breaks exact ties: like torch.topk, or lowest index first
    fp8_gemm: Callable | None = None  # block-scaled FP8 product of the FP8 linear layers
    act_quant: Callable = act_quant  # the activations' e4m3 quantisation per token and 128 channels
    moe_experts: Callable | None = None  # the routed experts over stacked weights (per (token, slot) pair)
    moe_experts_fp8: Callable | None = None  # the same over block-FP8 experts
    # the logits of each row that reach a threshold, as (values, keys, count): the fused indexer + top-k
    indexer_candidates: Callable | None = None
    rms_norm: Callable | None = None  # RMSNorm over the last dimension (weight, eps)
    rope: Callable | None = None  # RoPE on the last dimension from cos/sin tables (interleaved or half split)
    # the MoE router: (weights [N,k], experts [N,k]) from x [N,D], weight [E,D], bias [E], k, groups, scale
    moe_router: Callable | None = None

    def supports(self, index_heads: int, index_dim: int, latent_dim: int, d_v: int) -> bool:
        """Whether the kernels take these shapes (the references take any)."""
        if self.name == "torch":
            return True
        from .indexer.kernel import supported as indexer_ok
        from .sparse_mla.kernel import supported as mla_ok

        return indexer_ok(index_heads, index_dim) and mla_ok(latent_dim, d_v)


def _triton_fp8_operands(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor):
    """e4m3 q and k with per-row scales; q's scale folds into the head gates. Exact on values that are
    already e4m3 numbers times power-of-two scales (re-quantising them changes nothing)."""
    D = q.shape[-1]
    if D > 128:
        raise ValueError("the fp8 indexer kernel takes one scale per head, so head_dim <= 128")
    q8, qs = act_quant(q, D)
    k8, kscale = act_quant(k, D)
    return q8, w * qs[..., 0], k8, kscale[..., 0]


def _torch() -> Backend:
    from .fp8_gemm.reference import fp8_gemm
    from .indexer.reference import indexer_candidates, indexer_logits
    from .moe.reference import moe_experts, moe_experts_fp8
    from .norm.reference import rms_norm
    from .rope.reference import apply_rope
    from .router.reference import route
    from .sparse_mla.reference import sparse_mla
    from .topk.reference import topk

    return Backend("torch", indexer_logits, topk, sparse_mla, fp8_gemm=fp8_gemm, moe_experts=moe_experts,
                   moe_experts_fp8=moe_experts_fp8, indexer_candidates=indexer_candidates, rms_norm=rms_norm,
                   rope=apply_rope, moe_router=route)


def _triton() -> Backend:
    from .fp8_gemm.kernel import act_quant as act_quant_kernel
    from .fp8_gemm.kernel import fp8_gemm
    from .indexer.kernel import indexer_candidates, indexer_logits
    from .moe.kernel import moe_experts, moe_experts_fp8
    from .norm.kernel import rms_norm
    from .rope.kernel import apply_rope
    from .router.kernel import route
    from .sparse_mla.kernel import sparse_mla
    from .topk.kernel import topk
    from .triton_support import require_triton

    require_triton()
    return Backend("triton", indexer_logits, topk, sparse_mla, fp8_operands=_triton_fp8_operands, ties="lowest",
                   fp8_gemm=fp8_gemm, act_quant=act_quant_kernel, moe_experts=moe_experts,
                   moe_experts_fp8=moe_experts_fp8, indexer_candidates=indexer_candidates, rms_norm=rms_norm,
                   rope=apply_rope, moe_router=route)


_MADE: dict[str, Backend] = {}


def get_backend(name: str | Backend) -> Backend:
    """The backend called ``name`` (``torch`` or ``triton``); a Backend is returned as it is."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name not in _MADE:
        _MADE[name] = _torch() if name == "torch" else _triton()
    return _MADE[name]


def default_backend(device: torch.device | str) -> str:
    """``triton`` on CUDA when Triton is installed, else ``torch``."""
    from .triton_support import HAVE_TRITON

    return "triton" if torch.device(device).type == "cuda" and HAVE_TRITON else "torch"


def check_backend(name: str, device: torch.device | str) -> None:
    """Refuse a backend that cannot run on ``device``."""
    if name == "triton":
        from .triton_support import interpreted, require_triton

        require_triton()
        if torch.device(device).type != "cuda" and not interpreted():
            raise ValueError("the triton backend runs on CUDA (or on CPU with TRITON_INTERPRET=1)")


__all__ = ["BACKENDS", "Backend", "check_backend", "default_backend", "get_backend"]
