"""Tiny random DSA checkpoints written by transformers itself, for parity tests."""

from __future__ import annotations

import torch

GLM_TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    n_group=2, topk_group=1, index_topk=8, index_head_dim=16, index_n_heads=4, first_k_dense_replace=2,
    max_position_embeddings=512, routed_scaling_factor=1.5,
)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Replace every weight by fresh random values (norm gains around 1, a random router bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def hf_model(arch: str, seed: int = 0, randomize: bool = True, **overrides):
    """A transformers model of ``arch`` ('glm_moe_dsa' or 'deepseek_v32'): its own random init, then
    (``randomize``) larger random weights everywhere, norms and router bias included."""
    import transformers

    kw = dict(GLM_TINY, **overrides)
    if arch == "glm_moe_dsa":
        cfg = transformers.GlmMoeDsaConfig(**kw)
        cls = transformers.GlmMoeDsaForCausalLM
    elif arch == "deepseek_v32":
        for k in ("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset", "indexer_types"):
            kw.pop(k, None)
        cfg = transformers.DeepseekV32Config(**kw)
        cls = transformers.DeepseekV32ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if randomize:
        randomize_(model, seed)
    return model


def save_hf(model, path) -> None:
    model.save_pretrained(str(path))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
