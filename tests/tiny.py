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


# ----------------------------------------------------------------- the newer DSA-family architectures
CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
V4_TINY = dict(  # 7 layers: CSA (indexer) at 1, 2, 4, 6; HCA at 0, 3; sliding window at 5
    vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, q_lora_rank=32, partial_rotary_factor=0.25, num_experts_per_tok=2,
    n_routed_experts=4, n_shared_experts=1, layer_types=[HCA, CSA, CSA, HCA, CSA, SWA, CSA],
    compress_rates={CSA: 4, HCA: 16}, hc_mult=4, hc_sinkhorn_iters=20, sliding_window=16, o_groups=2,
    o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=4, max_position_embeddings=4096,
)
LIN, IDX = "linear_attention", "indexed_attention"
GLM53_TINY = dict(  # 8 layers: indexed (indexer) at 1, 3, 4, 6; KDA linear attention elsewhere
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=0, qk_nope_head_dim=16, v_head_dim=16, index_topk=16,
    index_kpool=4, index_head_dim=16, index_n_heads=4, linear_head_dim=16, linear_num_heads=4,
    linear_conv_kernel_dim=4, hc_mult=4, layer_types=[LIN, IDX, LIN, IDX, IDX, LIN, IDX, LIN], pad_token_id=0,
    max_position_embeddings=4096,
)
GLM53_VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                    projection_intermediate_size=64, patch_size=14, image_size=28)
FULL_ATTN, SPARSE = "full_attention", "minimax_m3_sparse"
MINIMAX_TINY = dict(  # 6 layers: sparse (indexer) at 1, 2, 4, 5
    vocab_size=256, hidden_size=64, intermediate_size=32, dense_intermediate_size=64, shared_intermediate_size=32,
    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
    num_experts_per_tok=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    index_n_heads=2, index_head_dim=16, index_block_size=8, index_topk_blocks=3, index_local_blocks=1,
    layer_types=[FULL_ATTN, SPARSE, SPARSE, FULL_ATTN, SPARSE, SPARSE], max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=2,
)
NEW_ARCHS = ["deepseek_v4", "glm5_next", "minimax_m3"]
INDEXER_LAYERS = {"deepseek_v4": [1, 2, 4, 6], "glm5_next": [1, 3, 4, 6], "minimax_m3": [1, 2, 4, 5]}


def hf_new(arch: str, seed: int = 0, randomize: bool = True, **overrides):
    """A transformers model of a newer architecture ('deepseek_v4', 'glm5_next', 'minimax_m3') at toy size,
    with transformers' own random init, then (``randomize``) larger random weights everywhere."""
    import transformers

    torch.manual_seed(seed)
    if arch == "deepseek_v4":
        model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**dict(V4_TINY, **overrides)))
    elif arch == "glm5_next":
        cfg = transformers.Glm5NextConfig(text_config=dict(GLM53_TINY, **overrides), vision_config=GLM53_VISION)
        model = transformers.Glm5NextForConditionalGeneration(cfg)
    elif arch == "minimax_m3":
        cfg = transformers.MiniMaxM3VLTextConfig(**dict(MINIMAX_TINY, **overrides))
        model = transformers.MiniMaxM3VLForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    if randomize:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "hc_" not in name and "tid2eid" not in name:  # mixing matrices stay as made
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def save_new(model, path) -> None:
    """save_pretrained, with a byte-level tokenizer so text commands run on it."""
    from pathlib import Path

    from indexcache.presets import byte_tokenizer_files

    model.save_pretrained(str(path))
    byte_tokenizer_files(Path(path))


OLD_ARCHS = ["deepseek_v32", "glm_moe_dsa"]
ALL_ARCHS = OLD_ARCHS + NEW_ARCHS
INDEXER_LAYERS.update({a: [0, 1, 2, 3] for a in OLD_ARCHS})


def any_model(arch: str, seed: int = 0):
    """A tiny random model of any of the five architectures, four layers with an indexer each."""
    if arch in OLD_ARCHS:
        return hf_model(arch, seed=seed, vocab_size=256, num_hidden_layers=4, first_k_dense_replace=1)
    return hf_new(arch, seed=seed)
