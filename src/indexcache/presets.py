"""Random DSA checkpoints of a few sizes, for demos, tests and benchmarks (never for quality claims)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import fp8_eligible, save_model
from .config import ARCHITECTURES, DSAConfig
from .model.dsa import DSAForCausalLM
from .pattern import Pattern

PRESETS: dict[str, dict] = {
    # 6 layers, index_topk 8: parity tests and quick demos.
    "tiny": dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=6,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        index_topk=8, index_head_dim=16, index_n_heads=4, first_k_dense_replace=2, max_position_embeddings=4096,
    ),
    # 16 layers, index_topk 64: deep enough for a pattern to matter, fast on a laptop CPU.
    "small": dict(
        vocab_size=320, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=16,
        num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        index_topk=64, index_head_dim=32, index_n_heads=4, first_k_dense_replace=1,
        max_position_embeddings=16384,
    ),
    # The trained default: 16 layers (mostly dense MLP, 4 small MoE layers), 4K context with top-256
    # selection; about 14M parameters, under 30 MB in bf16. vocab_size is set by the tokenizer.
    "mini": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=640, moe_intermediate_size=160, num_hidden_layers=16,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        index_topk=256, index_head_dim=64, index_n_heads=4, first_k_dense_replace=1,
        mlp_layer_types=["dense"] * 3 + ["sparse"] + ["dense"] * 3 + ["sparse"] + ["dense"] * 3 + ["sparse"]
        + ["dense"] * 3 + ["sparse"],
        max_position_embeddings=16384, rope_theta=10000.0,
    ),
}
ARCH_NAMES = {arch: name for name, arch in ARCHITECTURES.items()}


def byte_tokenizer_files(out_dir: Path) -> None:
    """A byte-level BPE with no merges (256 byte tokens + 2 specials), readable by tokenizers and transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "bos_token": None, "model_max_length": 1 << 20,
    }, indent=2))


def preset_config(preset: str, arch: str = "glm_moe_dsa", pattern: Pattern | str | None = None,
                  **overrides) -> DSAConfig:
    """The config of a preset, for ``arch``, with ``overrides`` (e.g. ``vocab_size``) and an optional pattern."""
    if arch not in ARCH_NAMES:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCH_NAMES)})")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    d = dict(PRESETS[preset], **overrides)
    d.update(architectures=[ARCH_NAMES[arch]], model_type=arch, eos_token_id=0, bos_token_id=None, pad_token_id=1)
    d["indexer_rope_interleave"] = arch == "glm_moe_dsa"
    if pattern is not None:
        d.update(Pattern.parse(pattern).config_patch())
    return DSAConfig.from_dict(d)


def make_random_checkpoint(
    out_dir: str | Path,
    arch: str = "glm_moe_dsa",
    preset: str = "tiny",
    seed: int = 0,
    pattern: Pattern | str | None = None,
    overwrite: bool = False,
    command: str = "",
    fp8: bool = False,
    **overrides,
) -> Path:
    """A random checkpoint with a byte-level tokenizer, written atomically (:func:`save_model`); ``fp8``:
    the projections and experts in block-FP8, as DeepSeek ships them."""
    model = DSAForCausalLM(preset_config(preset, arch, pattern, **overrides)).init_random(seed)
    return save_model(model, out_dir, extra=byte_tokenizer_files, overwrite=overwrite, command=command, fp8=fp8)


def random_model_in_place(cfg: DSAConfig, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                          fp8: bool = False, std: float = 0.02, seed: int = 0) -> DSAForCausalLM:
    """A random model built directly on ``device`` (no checkpoint, no host copy: fast for full-width shapes).
    ``fp8``: the projections and experts a DeepSeek FP8 checkpoint stores in FP8 are held as
    :class:`~indexcache.model.dsa.FP8Linear` / ``FP8Experts``, with e4m3 values and block scales that give
    them the same ``std``; the model then takes its FP8 size, as a loaded FP8 checkpoint does."""
    from .model.dsa import checkpoint_tensors

    with torch.device("meta"):
        model = DSAForCausalLM(cfg)
        if fp8:
            names = {n for n, t in checkpoint_tensors(model.named_parameters()) if fp8_eligible(n, t)}
            model.keep_fp8(names)
    model.to_empty(device=device)
    model.tie_weights()
    model.to_dtype(dtype)
    randomize_(model, std, seed)
    return model.eval()


def randomize_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Fresh random weights in place, on the model's own device (this package's model or a transformers
    one): normal(0, std) matrices, unit norms, a small router correction bias, and for FP8 layers e4m3
    values of std 2 with block scales of std / 2."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_inv"):
                p.fill_(std / 2.0)
            elif p.dtype == torch.float8_e4m3fn:
                for row in p.view(-1, p.shape[-1]).split(4096):  # bounded temporaries
                    row.copy_((torch.randn(row.shape, device=device, generator=g) * 2.0).to(p.dtype))
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.is_floating_point():
                p.normal_(0.0, std, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05, generator=g)
