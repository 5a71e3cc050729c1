"""The DSA model with IndexCache, in plain PyTorch: the one source of truth for the math.

    x -> embed -> [ RMSNorm -> MLA(+indexer) -> + -> RMSNorm -> MLP | MoE -> + ] x L -> RMSNorm -> lm_head

MLA (DeepSeek-V2/V3): queries from a q-LoRA latent ``qr = RMSNorm(q_a_proj x)``; keys/values from one
compressed latent per token ``c = RMSNorm(kv_a)`` plus a shared rope key. Attention runs in the
absorbed (MQA) form over ``[c | k_rope]`` so sparse attention gathers one latent row per selected token.

Lightning indexer (DSA): ``q_I = wq_b(qr)`` [H_I heads x D_I], ``k_I = LayerNorm(wk x)`` (one key per
token), RoPE on the first ``qk_rope_head_dim`` dims (half-split for DeepSeek-V3.2, interleaved for GLM),
head gates ``w = weights_proj(x) / sqrt(H_I)`` in fp32, scores ``sum_h w_h relu(q_h.k / sqrt(D_I))``,
causal top-k with k = min(index_topk, visible tokens).

IndexCache: a per-layer pattern; Full layers run their indexer, Shared layers own no indexer and
reuse the indices of the nearest preceding Full layer.

Module names equal transformers' checkpoint names, so a state dict maps one to one onto the files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DSAConfig
from ..errors import PatternError
from ..ops.backends import BACKENDS, check_backend, get_backend
from ..ops.common import DEFAULT_BUDGET_BYTES
from ..ops.fp8 import fp8_indexer_operands
from ..ops.fp8_gemm import fp8_linear
from ..ops.indexer import causal_windows, indexer_logits, indexer_topk
from ..ops.moe import FP8_PARTS, moe_experts
from ..ops.sparse_mla import dense_mla_fused, mla_attention
from ..ops.topk import topk as topk_reference
from ..pattern import Pattern
from .rope import Rope

SCORING_MODES = ("exact", "fp8")


# ------------------------------------------------------------------------------------------- tracing
@dataclass
class LayerRecord:
    """What one layer did. ``indices`` are the ones its attention used; ``source`` produced them."""

    source: int
    indices: torch.Tensor | None = None  # [B, S, K] int64, -1 = no token (in dense mode: what it would select)
    index_scores: torch.Tensor | None = None  # [B, S, T] fp32, -inf where not visible (Full layers)
    attn: torch.Tensor | None = None  # [B, S, T] head-averaged attention probabilities


@dataclass
class Trace:
    """Pass to ``model(..., trace=Trace(...))`` to capture per-layer internals (detached).

    ``index_scores`` and ``attn`` are dense [B, S, T] per layer: ask for them on sequences you can afford.
    ``layers`` restricts capture to some layers (default all).
    """

    indices: bool = True
    index_scores: bool = False
    attn: bool = False
    layers: set[int] | None = None
    records: dict[int, LayerRecord] = field(default_factory=dict)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@dataclass
class Context:
    rope: Rope
    positions: torch.Tensor  # [S] absolute positions of the tokens (for RoPE)
    slots: torch.Tensor  # [S] 0..S-1: query s sees key slots <= s (for the causal masks)
    dense: bool = False
    scoring: str = "exact"
    backend: str = "torch"  # the ops backend (indexcache.ops.backends): "torch" or "triton"
    ties: str = "topk"  # how exact index-score ties are broken: "topk" (torch.topk) or "lowest" index
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    trace: Trace | None = None
    pattern: Pattern | None = None  # the pattern of the running forward
    # Called once per layer with what the indexer distillation needs (see indexcache.train.losses):
    # collect(layer=, full=, attn=, x=, qr=, indices=, probs=, rows=, ctx=)
    collect: Callable | None = None
    # the query slots (sorted) whose rows ``collect`` receives (None: all). A dense target then costs
    # len(rows) * T, not S * T: an unbiased sample of the distillation loss for long sequences.
    kl_rows: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = "torch"  # the ops backend of the norm (the model's set_backend sets it)

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """On ``backend`` (default: the module's own); a forward that trains stays on the reference (the
        kernel has no backward)."""
        backend = backend or self.backend
        trains = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        op = get_backend("torch" if trains else backend).rms_norm
        return op(x, self.weight, self.eps)


class Indexer(nn.Module):
    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.topk = cfg.qk_rope_head_dim, cfg.index_topk
        self.interleave = cfg.indexer_rope_interleave
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)  # kept in fp32
        self.softmax_scale = self.head_dim**-0.5

    def _rope(self, x: torch.Tensor, rope: Rope, backend: str = "torch") -> torch.Tensor:
        # the rope dims come first in the indexer's rows; the rest is kept
        turn = rope.interleaved if self.interleave else rope.half_split
        return turn(x, backend=backend, rope_dims=self.rope_dim)

    def project(
        self, x: torch.Tensor, qr: torch.Tensor, ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,S,H,D], head gates w [B,S,H] fp32, keys k [B,S,D], as the scoring op consumes them."""
        B, S, _ = x.shape
        q = self._rope(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), ctx.rope, ctx.backend)
        k = self._rope(self.k_norm(self.wk(x)), ctx.rope, ctx.backend)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        if ctx.scoring == "fp8":
            q, k = fp8_indexer_operands(q, k)  # DeepSeek's reference; operands passed on dequantised
        return q, w, k

    def forward(
        self, x: torch.Tensor, qr: torch.Tensor, ctx: Context, want_scores: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal top-k indices [B, S, min(topk, T)] (``-1`` padding) and, with ``want_scores``, the dense
        scores [B, S, T] (plain ops). The batch is flattened once: B caches of S queries each."""
        q, w, k = self.project(x, qr, ctx)
        B, S, H, D = q.shape
        ks, ke = causal_windows(ctx.slots, B)
        rows, wr = q.reshape(B * S, H, D), w.reshape(B * S, H)
        if want_scores:
            scores = indexer_logits(rows, k, wr, ks, ke, self.softmax_scale, budget_bytes=ctx.budget_bytes)
            idx = topk_reference(scores, min(self.topk, k.shape[1]), ks, ke, ties=ctx.ties).long()
            return idx.view(B, S, -1), scores.view(B, S, -1)
        idx = indexer_topk(rows, k, wr, ks, ke, self.topk, self.softmax_scale, backend=ctx.backend,
                           fp8=ctx.scoring == "fp8", ties=ctx.ties, budget_bytes=ctx.budget_bytes,
                           ke_host=causal_windows(torch.arange(S), B)[1])  # slots are 0..S-1
        return idx.view(B, S, -1), None


class MLA(nn.Module):
    def __init__(self, cfg: DSAConfig, has_indexer: bool):
        super().__init__()
        self.cfg = cfg
        H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.n_heads, self.dn, self.dr, self.dv, self.kv_lora = H, dn, dr, dv, cfg.kv_lora_rank
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6, as in transformers
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (dn + dv), bias=False)
        self.o_proj = nn.Linear(H * dv, cfg.hidden_size, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg) if has_indexer else None
        self.softmax_scale = cfg.softmax_scale

    def latents(self, x: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qr, absorbed queries [B,S,H,kv_lora+dr], key latents [B,S,kv_lora+dr])."""
        B, S, _ = x.shape
        qr = self.q_a_layernorm(self.q_a_proj(x), ctx.backend)
        q = self.q_b_proj(qr).view(B, S, self.n_heads, self.dn + self.dr)
        q_nope, q_pe = q[..., : self.dn], ctx.rope.interleaved(q[..., self.dn :], backend=ctx.backend)
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[..., : self.kv_lora], ctx.backend)
        k_pe = ctx.rope.interleaved(ckv[..., self.kv_lora :], backend=ctx.backend)
        w_uk = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.kv_lora)[:, : self.dn]
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # absorb W_uk into the query
        return qr, torch.cat((q_abs, q_pe), dim=-1), torch.cat((c, k_pe), dim=-1)

    def forward(
        self, x: torch.Tensor, ctx: Context, layer: int, full: bool, prev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S, _ = x.shape
        qr, q, kv = self.latents(x, ctx)
        trace = ctx.trace if ctx.trace is not None and ctx.trace.wants(layer) else None
        want_scores = trace is not None and trace.index_scores
        T = kv.shape[1]

        indices = prev
        if full:
            if self.indexer is None:
                raise PatternError(f"layer {layer} is Full but has no indexer weights")
            need = not ctx.dense or (trace is not None and (trace.indices or want_scores))
            # With T <= index_topk every query keeps all it sees: selection is a no-op unless traced.
            if need and (T > self.indexer.topk or trace is not None):
                with torch.no_grad():  # selection is discrete: no gradient ever flows through it
                    indices, scores = self.indexer(x, qr, ctx, want_scores)
            else:
                indices, scores = None, None
        else:
            if prev is None and not ctx.dense and T > self.cfg.index_topk:
                raise PatternError(f"layer {layer} is Shared but no Full layer precedes it")
            scores = None

        use_idx = None if ctx.dense or indices is None else indices
        rows = ctx.kl_rows if ctx.collect is not None else None
        traced_attn = trace is not None and trace.attn
        # dense target on sampled rows: the output through the fused attention, the rows' probabilities apart
        dense_rows = rows is not None and use_idx is None and not traced_attn
        want_probs = traced_attn or (ctx.collect is not None and not dense_rows)
        trains = torch.is_grad_enabled() and q.requires_grad
        # sparse: the backend's op, the batch flattened once (the kernel has no backward: a forward that
        # trains takes the plain ops below)
        if use_idx is not None and not want_probs and not (trains and ctx.backend != "torch"):
            Dk = q.shape[-1]
            out, _ = get_backend(ctx.backend).sparse_mla(
                q.reshape(B * S, self.n_heads, Dk), kv, use_idx.reshape(B * S, -1), self.softmax_scale, self.kv_lora,
                ctx.budget_bytes)
            out, probs = out.to(q.dtype).view(B, S, self.n_heads, self.kv_lora), None
        elif use_idx is None and not want_probs and (trains or dense_rows):
            # dense training: fused attention keeps no [S, T] matrix for the backward (long sequences fit)
            out, probs = dense_mla_fused(q, kv, self.softmax_scale, self.kv_lora, ctx.slots), None
        else:  # dense attention and traced probabilities: the plain ops
            out, _, probs = mla_attention(
                q, kv, self.softmax_scale, self.kv_lora, indices=use_idx, q_pos=ctx.slots,
                return_probs=want_probs, budget_bytes=ctx.budget_bytes,
            )
        if ctx.collect is not None:
            sel, target = use_idx, probs
            if dense_rows:
                target = mla_attention(q[:, rows], kv, self.softmax_scale, self.kv_lora, q_pos=ctx.slots[rows],
                                       return_probs=True, budget_bytes=ctx.budget_bytes)[2]
            elif rows is not None:
                sel, target = (None if use_idx is None else use_idx[:, rows]), probs[:, rows]
            ctx.collect(layer=layer, full=full, attn=self, x=x, qr=qr, indices=sel, probs=target, rows=rows, ctx=ctx)
        if trace is not None:
            rec = LayerRecord(source=layer if full else ctx.pattern.source_layer(layer))
            if trace.indices:
                rec.indices = indices.detach() if indices is not None else _all_visible(B, ctx.slots, T)
            rec.index_scores = scores.detach() if scores is not None else None
            if probs is not None and trace.attn:
                rec.attn = probs.detach() if use_idx is None else _scatter_probs(probs, use_idx, T)
            trace.records[layer] = rec
        return self.project_out(out), indices

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [..., H, kv_lora] -> hidden [..., hidden]: W_uv, then o_proj."""
        w_uv = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.kv_lora)[:, self.dn :]
        o = torch.einsum("...hc,hvc->...hv", out.to(w_uv.dtype), w_uv)
        return self.o_proj(o.flatten(-2))


def _all_visible(B: int, slots: torch.Tensor, T: int) -> torch.Tensor:
    t = torch.arange(T, device=slots.device)
    idx = t.view(1, -1).expand(slots.shape[0], T)
    return idx.masked_fill(t.view(1, -1) > slots.view(-1, 1), -1).unsqueeze(0).expand(B, -1, -1)


def _scatter_probs(probs: torch.Tensor, indices: torch.Tensor, T: int) -> torch.Tensor:
    dense = probs.new_zeros(*indices.shape[:-1], T + 1)  # slot T catches the -1 entries
    idx = torch.where(indices < 0, torch.full_like(indices, T), indices)
    return dense.scatter_add_(-1, idx, probs.detach())[..., :T]


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor, graph_safe: bool = False, backend: str | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router with a selection-only correction bias and group-limited top-k (DeepSeek-V3)."""

    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.last_load: torch.Tensor | None = None  # tokens per expert of the last training forward

    def forward(self, x: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """(routing weights [N, k], experts [N, k]) of x [N, D] (``ops/router``: the bias steers the selection
        only, never the weights). On ``backend``; a forward that trains stays on the reference."""
        cfg = self.cfg
        trains = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        route = get_backend("torch" if trains else backend).moe_router
        weights, idx = route(x, self.weight, self.e_score_correction_bias, cfg.num_experts_per_tok, cfg.n_group,
                             cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        if self.training:  # summed over the forwards (micro-batches) since the trainer last read it
            load = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).detach()
            self.last_load = load if self.last_load is None else self.last_load + load
        return weights, idx


class Experts(nn.Module):
    """The routed experts, stacked (gpt-fast's layout): ``gate_proj``/``up_proj`` [E, inter, hidden],
    ``down_proj`` [E, hidden, inter]. Checkpoints store one tensor per expert
    (``experts.{e}.gate_proj.weight``); :func:`checkpoint_tensors` maps between the two."""

    PARTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))

    def __len__(self) -> int:
        return self.gate_proj.shape[0]

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens x [N, hidden] (the SwiGLU MLP of one expert)."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])


class FP8Linear(nn.Module):
    """A linear layer whose weight stays block-FP8 in memory: ``weight`` e4m3 [out, in] and
    ``weight_scale_inv`` fp32 [out/128, in/128], the names and layout of DeepSeek's FP8 checkpoints. The
    activations are quantised per token and 128 channels and multiplied on the model's ops backend
    (:func:`indexcache.ops.fp8_gemm.fp8_linear`): half the memory of bf16, and Hopper's FP8 tensor cores."""

    def __init__(self, in_features: int, out_features: int, scale_fmt: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(-(-out_features // 128), -(-in_features // 128)),
                                             requires_grad=False)
        self.scale_fmt = scale_fmt
        self.backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.backend, self.scale_fmt)


class FP8Experts(Experts):
    """The stacked experts in block-FP8: ``{part}`` e4m3 [E, out, in] beside ``{part}_scale_inv``
    [E, out/128, in/128] (per expert, the checkpoint's ``experts.{e}.{part}.weight`` and its
    ``weight_scale_inv``)."""

    def __init__(self, n: int, hidden: int, inter: int, scale_fmt: str | None = None):
        nn.Module.__init__(self)  # not Experts.__init__: its bf16 tensors would be allocated only to be replaced
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for part, (o, i) in shapes.items():
            setattr(self, part, nn.Parameter(torch.empty(n, o, i, dtype=torch.float8_e4m3fn), requires_grad=False))
            setattr(self, f"{part}_scale_inv",
                    nn.Parameter(torch.empty(n, -(-o // 128), -(-i // 128)), requires_grad=False))
        self.scale_fmt = scale_fmt
        self.backend = "torch"

    def fp8_tensors(self) -> dict[str, torch.Tensor]:
        """The six tensors by name (what :func:`indexcache.ops.moe.moe_experts_fp8` takes)."""
        return {p: getattr(self, p) for p in FP8_PARTS}

    def run(self, e: int, x: torch.Tensor) -> torch.Tensor:
        def lin(part: str, v: torch.Tensor) -> torch.Tensor:
            return fp8_linear(v, getattr(self, part)[e], getattr(self, f"{part}_scale_inv")[e], self.backend,
                              self.scale_fmt)

        return lin("down_proj", F.silu(lin("gate_proj", x)) * lin("up_proj", x))


class MoE(nn.Module):
    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.backend = "torch"  # the ops backend of the routed experts (the model's set_backend sets it)

    def forward(self, x: torch.Tensor, graph_safe: bool = False, backend: str | None = None) -> torch.Tensor:
        """Routed experts plus shared experts, on ``backend`` (default: the module's own). Each (token, slot)
        pair is computed once, then slots are summed in a fixed order, so the result is deterministic on
        every device (an ``index_add_`` would use atomics on GPUs). ``graph_safe``: shapes that do not
        depend on the routing and no host synchronisation, so a decode step can be captured in a CUDA graph
        (the same numbers). On the ``triton`` backend the stacked experts (bf16 or block-FP8) run as one
        grouped GEMM that reads the chosen experts' weights in place, graph-safe in both modes; at a decode
        step's few tokens the shared MLP joins them as more slots (:meth:`_shared_to_fold`)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        backend = backend or self.backend
        weights, idx = self.gate(flat, backend)
        ex = self.experts
        # the kernel has no backward: a forward that trains the experts, or anything before them, stays on
        # the reference
        trains = torch.is_grad_enabled() and (ex.gate_proj.requires_grad or x.requires_grad)
        if isinstance(ex, FP8Experts) and (backend != "torch" or not graph_safe):
            routed = get_backend(backend).moe_experts_fp8(flat, ex.fp8_tensors(), idx, weights, ex.scale_fmt)
        elif backend != "torch" and not trains:
            fold = self._shared_to_fold(idx)
            routed = get_backend(backend).moe_experts(flat, ex.gate_proj, ex.up_proj, ex.down_proj, idx, weights,
                                                      shared=fold)
            if fold is not None:  # the shared MLP's blocks are the last slots
                return routed.sum(1).view(shape)
        elif graph_safe:
            routed = self._routed_static(flat, weights, idx)
        else:
            routed = self._routed(flat, weights, idx)
        return (routed.sum(1) + self.shared_experts(flat)).view(shape)

    def _shared_to_fold(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The shared MLP's three weights, for the routed kernels to run as more slots, where that is faster:
        while the routing ``idx [N, k]`` padded with the shared blocks stays within the kernels' one-tile-a-pair
        table (``PER_PAIR_TILES`` pairs), for plain (not FP8) weights of the routed experts' dtype and a width
        that is a multiple of theirs. On an H100 (`bench kernels --parts moe`) the fold took a batch-1 MoE from
        70.2 to 55.5 us at GLM-4.7-Flash widths (5 pairs) and 307.9 to 296.0 us at DeepSeek-V3.2 widths (9),
        while at batch 8 (40 and 72 pairs, past the table's limit, so the pairs are sorted by expert) it was
        24% slower at the first widths and even at the second. Prefill keeps the shared MLP on its own dense GEMMs."""
        from ..ops.moe.kernel import PER_PAIR_TILES

        s, ex = self.shared_experts, self.experts
        if not all(isinstance(m, nn.Linear) for m in (s.gate_proj, s.up_proj, s.down_proj)):
            return None
        w = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        width = ex.gate_proj.shape[1]
        if any(t.dtype != ex.gate_proj.dtype for t in w) or w[0].shape[0] % width:
            return None
        if idx.shape[0] * (idx.shape[1] + w[0].shape[0] // width) > PER_PAIR_TILES:
            return None
        return w

    def _routed(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        return moe_experts(flat, ex.gate_proj, ex.up_proj, ex.down_proj, idx, weights)

    def _routed_static(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Few (token, slot) pairs: gather the chosen experts' weights; many: run every expert on every
        token and keep the chosen ones."""
        ex = self.experts
        N, k = idx.shape
        if N * k < len(ex) and not isinstance(ex, FP8Experts):
            sel = idx.flatten()
            xs = flat.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N*k, hidden, 1]
            h = F.silu(torch.bmm(ex.gate_proj[sel], xs)) * torch.bmm(ex.up_proj[sel], xs)
            y = torch.bmm(ex.down_proj[sel], h).view(N, k, -1)
            return (y * weights.unsqueeze(-1)).to(flat.dtype)
        routed = flat.new_zeros(N, k, flat.shape[-1])
        for e in range(len(ex)):
            y = ex.run(e, flat).unsqueeze(1) * weights.unsqueeze(-1)  # [N, k, hidden]
            routed = torch.where((idx == e).unsqueeze(-1), y.to(flat.dtype), routed)
        return routed


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DSAConfig, layer: int, has_indexer: bool):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, has_indexer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, h: torch.Tensor, ctx: Context, full: bool, prev: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, indices = self.self_attn(self.input_layernorm(h, ctx.backend), ctx, self.layer, full, prev)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h, ctx.backend)), indices


class DSABackbone(nn.Module):
    def __init__(self, cfg: DSAConfig, pattern: Pattern):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, pattern.is_full(i)) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DSAForCausalLM(nn.Module):
    """``logits = model(input_ids)``; ``model(ids, pattern="FSSF...", trace=Trace(...))`` for analysis."""

    def __init__(self, cfg: DSAConfig, pattern: Pattern | str | None = None):
        super().__init__()
        self.config = cfg
        self.pattern = cfg.pattern if pattern is None else Pattern.parse(pattern)
        self.pattern.validate(num_layers=cfg.num_hidden_layers)
        self.model = DSABackbone(cfg, self.pattern)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.scoring = "exact"
        self.backend = "torch"
        self.ties = "topk"
        self.budget_bytes = DEFAULT_BUDGET_BYTES

    # ---------------------------------------------------------------------------- structure
    def tie_weights(self) -> None:
        """Share lm_head with the embedding when the config says so (again after ``to_empty``,
        which replaces meta parameters one by one and so unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def indexer_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if layer.self_attn.indexer is not None]

    def runnable_pattern(self, pattern: Pattern | str | None) -> Pattern:
        """Parse a call-time pattern; its Full layers must be among the layers that own an indexer."""
        if pattern is None:
            return self.pattern
        p = Pattern.parse(pattern)
        p.validate(num_layers=self.config.num_hidden_layers, indexer_layers=self.indexer_layers)
        return p

    def set_pattern(self, pattern: Pattern | str) -> None:
        """Make ``pattern`` the model's own, dropping the indexers of layers it makes Shared."""
        p = self.runnable_pattern(pattern)
        for i in p.shared_layers:
            self.model.layers[i].self_attn.indexer = None
        self.pattern = p

    def set_scoring(self, mode: str) -> None:
        """``"exact"`` (fp32 scores, as transformers) or ``"fp8"`` (DeepSeek reference quantisation)."""
        if mode not in SCORING_MODES:
            raise ValueError(f"unknown scoring mode {mode!r} (choose from {', '.join(SCORING_MODES)})")
        self.scoring = mode

    def set_backend(self, backend: str) -> None:
        """``"torch"`` (plain PyTorch ops, any device) or ``"triton"`` (the Triton kernels for the indexer
        logits, the top-k and sparse MLA; on CUDA, or on CPU under ``TRITON_INTERPRET=1``). Traced
        scores and attention probabilities, dense attention and unsupported shapes stay on torch."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        check_backend(backend, self.device)
        cfg = self.config
        if not get_backend(backend).supports(cfg.index_n_heads, cfg.index_head_dim,
                                              cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank):
            raise ValueError("the triton kernels need power-of-two indexer heads/dims, kv_lora_rank and rope dim")
        self.backend = backend
        for m in self.modules():
            if isinstance(m, (FP8Linear, FP8Experts, MoE, RMSNorm)):
                m.backend = backend

    def keep_fp8(self, fp8_weights: set[str], scale_fmt: str | None = None) -> int:
        """Make the layers whose checkpoint weights are block-FP8 (``fp8_weights``: checkpoint names) hold
        them as FP8 (:class:`FP8Linear`, :class:`FP8Experts`) instead of dequantised. Call before the
        weights are loaded (on the meta model). ``kv_b_proj`` stays dequantised: attention absorbs its
        weight into the queries and outputs, so it is read as a matrix, not applied as a layer. Returns the
        number of layers converted."""
        converted = 0
        for name, module in list(self.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Linear) and f"{full}.weight" in fp8_weights \
                        and child_name != "kv_b_proj" and child.bias is None and child.in_features % 128 == 0:
                    setattr(module, child_name, FP8Linear(child.in_features, child.out_features, scale_fmt))
                    converted += 1
                elif isinstance(child, Experts) and not isinstance(child, FP8Experts) \
                        and f"{full}.0.gate_proj.weight" in fp8_weights:
                    n, inter, hidden = child.gate_proj.shape
                    if hidden % 128 == 0 and inter % 128 == 0:
                        setattr(module, child_name, FP8Experts(n, hidden, inter, scale_fmt))
                        converted += 1
        return converted

    def set_tie_break(self, ties: str) -> None:
        """How the plain path breaks exact index-score ties (a score of exactly 0 when every head's ReLU is
        off is common): ``"topk"`` as ``torch.topk`` (and transformers), ``"lowest"`` key index first, as
        the Triton top-k. Only the choice among exactly equal scores changes."""
        if ties not in ("topk", "lowest"):
            raise ValueError(f"unknown tie break {ties!r} (topk or lowest)")
        self.ties = ties

    def to_dtype(self, dtype: torch.dtype) -> DSAForCausalLM:
        """Cast weights to ``dtype``, except those DeepSeek/transformers keep in fp32: the indexer's
        ``weights_proj`` and the router's correction bias (cast from their current values, never
        round-tripped through a lower precision)."""
        for name, module in self.named_modules():
            keep = name.endswith("weights_proj")
            for pname, t in list(module._parameters.items()):
                if t is None or not t.is_floating_point() or t.dtype == torch.float8_e4m3fn:
                    continue  # FP8 weights stay FP8
                t.data = t.data.to(torch.float32 if keep or pname.endswith("scale_inv") else dtype)
            for key, t in list(module._buffers.items()):
                if t is not None and t.is_floating_point():
                    module._buffers[key] = t.to(torch.float32 if key == "e_score_correction_bias" else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ------------------------------------------------------------------------------ forward
    def make_context(
        self,
        seq_len: int,
        positions: torch.Tensor | None = None,
        dense: bool = False,
        trace: Trace | None = None,
        collect: Callable | None = None,
        kl_rows: torch.Tensor | None = None,
    ) -> Context:
        slots = torch.arange(seq_len, device=self.device)
        if positions is None:
            positions = slots
        elif positions.shape != (seq_len,):
            raise ValueError(f"positions must have shape [{seq_len}], got {tuple(positions.shape)}")
        return Context(
            rope=Rope(self.config, positions, self.dtype), positions=positions.to(self.device), slots=slots,
            dense=dense,
            scoring=self.scoring, backend=self.backend, ties=self.ties, budget_bytes=self.budget_bytes, trace=trace,
            collect=collect, kl_rows=None if kl_rows is None else kl_rows.to(self.device),
        )

    def forward_layers(
        self,
        h: torch.Tensor,
        ctx: Context,
        pattern: Pattern,
        start: int = 0,
        end: int | None = None,
        indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run decoder layers ``start .. end-1`` on hidden states ``h``; ``indices`` are the ones
        carried in from before ``start`` (needed when layer ``start`` is Shared)."""
        end = self.config.num_hidden_layers if end is None else end
        ctx.pattern = pattern
        for i in range(start, end):
            h, indices = self.model.layers[i](h, ctx, pattern.is_full(i), indices)
        return h, indices

    def head(self, h: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """The final norm (on ``backend``, default the model's) and the vocabulary projection."""
        return self.lm_head(self.model.norm(h, backend))

    def forward(
        self,
        input_ids: torch.Tensor,
        pattern: Pattern | str | None = None,
        trace: Trace | None = None,
        positions: torch.Tensor | None = None,
        dense: bool = False,
        collect: Callable | None = None,
        kl_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V]. ``dense=True`` attends to every visible token (DSA's dense warm-up mode);
        ``collect`` receives each layer's attention inputs and probabilities (indexer training), on the
        query rows ``kl_rows`` only if given (sorted positions)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        p = self.runnable_pattern(pattern)
        ctx = self.make_context(input_ids.shape[1], positions, dense, trace, collect, kl_rows)
        h = self.model.embed_tokens(input_ids)
        h, _ = self.forward_layers(h, ctx, p)
        return self.head(h)

    # ------------------------------------------------------------------------- random init
    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float | None = None) -> DSAForCausalLM:
        """Fill every weight with fresh random values (normal(0, std) linears, unit norms, and a small
        random router bias so the selection-only path is exercised), in checkpoint order."""
        g = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range if std is None else std
        for name, p in checkpoint_tensors(self.named_parameters()):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
        return self


# --------------------------------------------------------------------------------- checkpoint names
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.((?:gate_proj|up_proj|down_proj)(?:_scale_inv)?)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")


def checkpoint_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a model (``named_parameters()``, ``state_dict().items()``) under the
    checkpoint's names and in its order: each stacked expert tensor becomes one view per expert,
    ``experts.{e}.{gate,up,down}_proj.weight``, expert by expert."""
    held: dict[str, dict[str, torch.Tensor]] = {}

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        for prefix, parts in held.items():
            for e in range(next(iter(parts.values())).shape[0]):
                for part in Experts.PARTS:
                    if part in parts:
                        yield f"{prefix}.{e}.{part}.weight", parts[part][e]
                    if f"{part}_scale_inv" in parts:  # an FP8 expert's block scales
                        yield f"{prefix}.{e}.{part}.weight_scale_inv", parts[f"{part}_scale_inv"][e]
        held.clear()

    for name, t in items:
        m = _STACKED.match(name)
        if m:
            held.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        yield from flush()
        yield name, t
    yield from flush()


def model_tensor(name: str) -> tuple[str, int | None]:
    """Where a checkpoint tensor lives in the model: (parameter or buffer name, expert index or None)."""
    m = _PER_EXPERT.match(name)
    if m:
        return f"{m.group(1)}.{m.group(3)}{m.group(4) or ''}", int(m.group(2))
    return name, None
