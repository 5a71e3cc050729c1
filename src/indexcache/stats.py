"""Parameter counts and a FLOP model of DSA prefill/decode, to show what the indexer costs.

FLOPs count multiply-adds as 2. Attention is counted in the absorbed form the kernels use; the
indexer is counted at its real head count and dim. FLOP shares are not time shares (an fp8 indexer
is cheaper per FLOP than bf16 MLA) but they show how the indexer's O(L^2) term takes over.
"""

from __future__ import annotations

import math

from .checkpoint import LAYER_RE
from .config import DSAConfig
from .pattern import Pattern


def count_parameters(cfg: DSAConfig, shapes: dict[str, list[int]], pattern: Pattern | None = None) -> dict[str, int]:
    """Parameters by component from tensor names and shapes (a model's, or a checkpoint's headers, so a
    685B checkpoint is counted without reading a weight). Indexers of layers ``pattern`` makes Shared
    are left out; MTP layers and FP8 scales are not parameters of the model."""
    out = {"embedding": 0, "lm_head": 0, "attention": 0, "indexer": 0, "dense_mlp": 0, "router": 0,
           "routed_experts": 0, "shared_experts": 0, "norms": 0}
    for name, shape in shapes.items():
        m = LAYER_RE.match(name)
        if name.endswith("_scale_inv") or (m and int(m.group(1)) >= cfg.num_hidden_layers):
            continue
        n = math.prod(shape)
        if "embed_tokens" in name:
            out["embedding"] += n
        elif name.startswith("lm_head"):
            out["lm_head"] += n
        elif ".indexer." in name:
            if pattern is None or pattern.is_full(int(m.group(1))):
                out["indexer"] += n
        elif "self_attn" in name:
            out["attention"] += n
        elif ".mlp.gate." in name:
            out["router"] += n
        elif ".mlp.experts." in name:
            out["routed_experts"] += n
        elif ".mlp.shared_experts." in name:
            out["shared_experts"] += n
        elif ".mlp." in name:
            out["dense_mlp"] += n
        else:
            out["norms"] += n
    out["total"] = sum(out.values())
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = cfg.n_routed_experts - cfg.num_experts_per_tok
    out["active_per_token"] = out["total"] - n_moe * per_expert * idle
    return out


def _visible_sum(L: int, cap: int | None = None) -> float:
    """sum_{p=0}^{L-1} min(p+1, cap): keys attended over a causal prefill of L tokens."""
    if cap is None or cap >= L:
        return L * (L + 1) / 2
    return cap * (cap + 1) / 2 + (L - cap) * cap


def flops(cfg: DSAConfig, context: int, pattern: Pattern | None = None) -> dict[str, dict[str, float]]:
    """FLOPs of a prefill of ``context`` tokens and of one decode step at position ``context``."""
    pat = pattern or cfg.pattern
    H, dn, dr, dv, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim, cfg.kv_lora_rank)
    d, HI, DI, k = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    attn_proj = 2 * (d * cfg.q_lora_rank + cfg.q_lora_rank * H * (dn + dr) + d * (c + dr)
                     + H * dn * c + H * c * dv + H * dv * d)
    attn_per_key = 2 * H * (c + dr) + 2 * H * c  # q.kv over the latent + p.v
    idx_proj = 2 * (cfg.q_lora_rank * HI * DI + d * DI + d * HI)
    idx_per_key = 2 * HI * DI + 2 * HI  # per-head dot products + gated head sum
    mlp = 0.0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            mlp += 6 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
            mlp += 2 * d * cfg.n_routed_experts
        else:
            mlp += 6 * d * cfg.intermediate_size
    head = 2 * d * cfg.vocab_size
    L, nl, nf = context, cfg.num_hidden_layers, pat.num_full

    def row(tokens: float, keys_sparse: float, keys_all: float) -> dict[str, float]:
        r = {
            "indexer": nf * (tokens * idx_proj + keys_all * idx_per_key),
            "attention": nl * (tokens * attn_proj + keys_sparse * attn_per_key),
            "mlp": tokens * mlp,
            "lm_head": tokens * head,
        }
        r["total"] = sum(r.values())
        r["indexer_share"] = r["indexer"] / r["total"]
        return r

    return {
        "prefill": row(L, _visible_sum(L, k), _visible_sum(L)),
        "decode": row(1, min(L + 1, k), L + 1),
    }
