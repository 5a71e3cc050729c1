"""Chunked indexer scoring inside transformers' DSA models (:func:`patch_indexer_scoring`).

transformers' indexer scores all queries against all keys in one dense fp32 [B, S, H, T] tensor (64 GiB
for DeepSeek-V3.2's 64 indexer heads at 16K tokens). The patched indexer keeps transformers' projections
and RoPE and scores through the package's own indexer op (:func:`indexcache.ops.indexer.indexer_topk`),
in chunks within a memory budget, with the same fp8 step as the model.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from ...errors import HFModelError
from ...ops.common import DEFAULT_BUDGET_BYTES
from ...ops.fp8 import fp8_indexer_operands
from ...ops.indexer import causal_windows, indexer_topk
from .patterns import STATE_ATTR, holder, is_indexer, model_arch, slot_layers

# The indexer's RoPE, looked up in the indexer class's own modeling module so that q and k are computed
# by transformers' code: GLM rotates interleaved pairs, DeepSeek-V3.2 the two halves.
_ROPE_FUNCTION = {"glm_moe_dsa": "apply_rotary_pos_emb_interleave", "deepseek_v32": "apply_rotary_pos_emb"}
_SCORING_ATTR = "_indexcache_scoring"
SCORING_MODES = ("exact", "fp8")


# ---------------------------------------------------------------------------------------- scoring
def _all_indexers(hf_model: nn.Module) -> list[nn.Module]:
    found: dict[int, nn.Module] = {}
    st = hf_model.__dict__.get(STATE_ATTR)
    if st is not None:
        found.update({id(m): m for m in st.indexers.values()})
    for layer in slot_layers(hf_model):
        ind = holder(hf_model, layer).indexer
        if is_indexer(ind):
            found[id(ind)] = ind
    return list(found.values())


def patch_indexer_scoring(
    hf_model: nn.Module, budget_bytes: int = DEFAULT_BUDGET_BYTES, scoring: str = "exact"
) -> int:
    """Swap every indexer's dense scoring for chunked scoring; returns how many indexers were patched.

    transformers scores all queries at once through a [B, S, H, T] fp32 tensor. Here the queries run in
    chunks whose [B, chunk, H, T] logits fit ``budget_bytes``, keys after a chunk's last query are never
    scored, and each chunk keeps its top-k. The projections and RoPE are transformers' own code; the
    scores are the same sums in fp32 (equal within fp32 rounding) and, the attention mask applied the same
    way, the same top-k. ``scoring="fp8"`` scores DeepSeek's fp8-faithful way (Hadamard rotation, e4m3
    blocks with power-of-two scales), as ``DSAForCausalLM.set_scoring("fp8")``. Calling it again only
    updates the budget and mode; :func:`unpatch_indexer_scoring` restores the original scoring.
    """
    if scoring not in SCORING_MODES:
        raise HFModelError(f"unknown scoring mode {scoring!r} (choose from {', '.join(SCORING_MODES)})")
    if budget_bytes < 1:
        raise HFModelError(f"budget_bytes must be positive, got {budget_bytes}")
    arch = model_arch(hf_model)
    if arch not in _ROPE_FUNCTION:
        return 0  # the newer architectures' indexers score in their own units and memory: nothing to patch
    count = 0
    for module in _all_indexers(hf_model):
        info = module.__dict__.get(_SCORING_ATTR)
        if info is None:
            rope = getattr(sys.modules[type(module).__module__], _ROPE_FUNCTION[arch], None)
            if rope is None:
                raise HFModelError(f"{type(module).__name__}'s module has no {_ROPE_FUNCTION[arch]}: "
                                   "this transformers version is not supported")
            # accelerate's hooks (device_map over several devices) call the saved ``_old_forward``
            attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
            info = {"attr": attr, "saved": module.__dict__.get(attr), "rope": rope,
                    "pairs": arch == "glm_moe_dsa"}
            module.__dict__[_SCORING_ATTR] = info
            module.__dict__[attr] = types.MethodType(_chunked_indexer_forward, module)
        info.update(budget=int(budget_bytes), scoring=scoring)
        count += 1
    return count


def unpatch_indexer_scoring(hf_model: nn.Module) -> int:
    """Give every patched indexer its original scoring back; returns how many were restored."""
    count = 0
    for module in _all_indexers(hf_model):
        info = module.__dict__.pop(_SCORING_ATTR, None)
        if info is None:
            continue
        if info["saved"] is None:
            module.__dict__.pop(info["attr"], None)
        else:
            module.__dict__[info["attr"]] = info["saved"]
        count += 1
    return count


@torch.no_grad()
def _chunked_indexer_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
) -> torch.Tensor:
    """The indexer forward of transformers' GLM-MoE-DSA / DeepSeek-V3.2, with chunked scoring."""
    info = self.__dict__[_SCORING_ATTR]
    B, S, _ = hidden_states.shape
    H, D, rope_dim = self.n_heads, self.head_dim, self.qk_rope_head_dim
    cos, sin = position_embeddings
    q = self.wq_b(q_resid).view(B, S, H, D)
    q_rot, q_pass = torch.split(q, [rope_dim, D - rope_dim], dim=-1)
    k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [rope_dim, D - rope_dim], dim=-1)
    q_rot, k_rot = info["rope"](q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    del q_rot, q_pass  # frees the projection's output now: at 16K tokens each copy of q is 512 MiB in fp32
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    if past_key_values is not None:
        k = past_key_values.update_indexer(k, self.layer_idx)
    w = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float() * (H**-0.5)
    if info["scoring"] == "fp8":
        # The Hadamard rotation mixes dimensions, so it must see them in the reference layout: transformers'
        # interleaved RoPE returns the rotated pairs de-interleaved (evens, then odds); put them back in place.
        if info["pairs"]:
            q, k = _pairs_in_place(q, rope_dim), _pairs_in_place(k, rope_dim)
        q, k = fp8_indexer_operands(q, k)
    # eager / SDPA scatter the indices into a mask, where -1 is not an index (other kernels take -1 as "none")
    fill = getattr(self.config, "_attn_implementation", None) in ("eager", "sdpa", None)
    return masked_indexer_topk(q, w, k, self.index_topk, self.softmax_scale, attention_mask, info["budget"],
                               fill_missing=fill)


def _pairs_in_place(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """[e0 e1 .. | o0 o1 .. | rest] -> [e0 o0 e1 o1 .. | rest] over the first ``rope_dim`` dims."""
    h = rope_dim // 2
    pairs = torch.stack((x[..., :h], x[..., h:rope_dim]), dim=-1).flatten(-2)
    return torch.cat((pairs, x[..., rope_dim:]), dim=-1)


def masked_indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    scale: float,
    mask: torch.Tensor | None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    fill_missing: bool = False,
    backend: str = "torch",
) -> torch.Tensor:
    """Top-k key indices [B, S, min(topk, T)] (int32 as transformers returns them), through the same
    indexer op as the model (:func:`indexcache.ops.indexer.indexer_topk`).

    A query that sees fewer than k keys gets ``-1`` in the slots left over, or with ``fill_missing`` its
    best index repeated there: it keeps every key it sees either way, and a repeat is a valid index for
    transformers' eager / SDPA paths, which scatter the indices into a mask.

    ``q`` [B,S,H,D] are the last S of the T key slots (a prefill after ``T - S`` cached tokens), ``w``
    [B,S,H] fp32 head gates, ``k`` [B,T,D]. ``mask`` is transformers' [B or 1, S, T] attention mask (bool:
    True = visible; float: additive, its minimum = hidden), applied as transformers applies it; the
    queries stay causal either way. Memory: one [chunk, H, T] block at a time.
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    pos = torch.arange(S) + (T - S)
    ks, ke = causal_windows(pos.to(q.device), B)
    idx = indexer_topk(q.reshape(B * S, H, D), k, w.reshape(B * S, H), ks, ke, topk, scale, backend=backend,
                       mask=mask, budget_bytes=budget_bytes, ke_host=causal_windows(pos, B)[1],
                       index_dtype=torch.int32).view(B, S, -1)
    if fill_missing:  # a query that sees nothing (left padding) repeats index 0: a valid slot, masked anyway
        idx = torch.where(idx < 0, idx[..., :1].clamp_min(0), idx)
    return idx


def dense_indexer_bytes(batch: int, seq: int, n_heads: int, keys: int | None = None) -> int:
    """Bytes of the fp32 [B, S, H, T] score tensor transformers' indexer materialises (per layer)."""
    return batch * seq * n_heads * (seq if keys is None else keys) * 4


