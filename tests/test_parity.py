"""Our reference model against transformers' own GlmMoeDsaForCausalLM / DeepseekV32ForCausalLM (CPU, fp32)."""

import random

import pytest
import tiny
import torch

from indexcache import Pattern, load_model

SEQ = 40  # > 4 x index_topk (8)
BATCH = 2


def _ids(seed=0, seq=SEQ, batch=BATCH):
    return torch.randint(0, tiny.GLM_TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def _random_pattern(n, seed):
    r = random.Random(seed)
    return "F" + "".join(r.choice("FS") for _ in range(n - 1))


GLM_PATTERNS = ["FFFFFF", "FFSSSF", "FSFSFS", "FSSSSS", _random_pattern(6, 1), _random_pattern(6, 7)]


@pytest.mark.parametrize("pattern", GLM_PATTERNS)
def test_glm_parity(tmp_path, pattern):
    hf = tiny.hf_model("glm_moe_dsa", seed=3, index_topk_pattern=pattern)
    tiny.save_hf(hf, tmp_path)
    ids = _ids(1)
    ref = tiny.hf_logits(hf, ids)
    model = load_model(tmp_path, verbose=False)
    assert str(model.pattern) == pattern
    assert model.config.mlp_layer_types.count("dense") == 2 and "sparse" in model.config.mlp_layer_types
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (BATCH, SEQ, tiny.GLM_TINY["vocab_size"])
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                          "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}])
def test_deepseek_v32_parity(tmp_path, rope):
    kw = {} if rope is None else {"rope_parameters": rope}
    hf = tiny.hf_model("deepseek_v32", seed=5, **kw)
    tiny.save_hf(hf, tmp_path)
    ids = _ids(2)
    ref = tiny.hf_logits(hf, ids)
    model = load_model(tmp_path, verbose=False)
    assert not model.config.indexer_rope_interleave
    with torch.no_grad():
        out = model(ids)
    assert (out - ref).abs().max().item() < 1e-4


def test_parity_is_discriminative(tmp_path):
    """The sparse selection and the indexer RoPE convention both change the logits by far more than 1e-4,
    so the parity tests above would catch a wrong top-k or a wrong RoPE layout."""
    hf = tiny.hf_model("glm_moe_dsa", seed=3)
    tiny.save_hf(hf, tmp_path)
    ids = _ids(1)
    ref = tiny.hf_logits(hf, ids)
    model = load_model(tmp_path, verbose=False)
    with torch.no_grad():
        assert (model(ids, dense=True) - ref).abs().max().item() > 1e-2
        for layer in model.model.layers:
            layer.self_attn.indexer.interleave = False  # DeepSeek's convention on a GLM model
        assert (model(ids) - ref).abs().max().item() > 1e-3


def test_long_sequence_query_chunking(tmp_path):
    """Sequences far longer than index_topk, with a memory budget small enough to force query chunks."""
    hf = tiny.hf_model("glm_moe_dsa", seed=9, index_topk_pattern="FSFSSF")
    tiny.save_hf(hf, tmp_path)
    ids = _ids(4, seq=160, batch=1)
    ref = tiny.hf_logits(hf, ids)
    model = load_model(tmp_path, verbose=False)
    model.budget_bytes = 8 << 10  # a few query rows per chunk
    with torch.no_grad():
        out = model(ids)
    assert (out - ref).abs().max().item() < 1e-4


def test_call_time_pattern_equals_loaded_pattern(tmp_path):
    hf = tiny.hf_model("glm_moe_dsa", seed=11)
    tiny.save_hf(hf, tmp_path)
    ids = _ids(5)
    full = load_model(tmp_path, verbose=False)
    shared = load_model(tmp_path, pattern="FSSFSS", verbose=False)
    assert shared.indexer_layers == [0, 3]
    with torch.no_grad():
        a, b = full(ids, pattern=Pattern.parse("FSSFSS")), shared(ids)
    assert torch.equal(a, b)
    with pytest.raises(Exception, match="layers 1 are Full but the checkpoint has no indexer weights"):
        shared(ids, pattern="FFSFSS")


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "deepseek_v32"])
def test_parity_with_transformers_default_init(tmp_path, arch):
    """transformers' own initialisation (small weights, zero router bias): many exact-zero index scores."""
    kw = {"index_topk_pattern": "FSFFSS"} if arch == "glm_moe_dsa" else {}
    hf = tiny.hf_model(arch, seed=21, randomize=False, **kw)
    tiny.save_hf(hf, tmp_path)
    ids = _ids(6, seq=48, batch=3)
    ref = tiny.hf_logits(hf, ids)
    with torch.no_grad():
        out = load_model(tmp_path, verbose=False)(ids)
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "deepseek_v32"])
@pytest.mark.parametrize(
    "variant",
    [
        {"tie_word_embeddings": True},
        {"attention_bias": True},
        {"n_group": 1, "topk_group": 1, "norm_topk_prob": False},
        {"mlp_layer_types": ["sparse", "dense", "sparse", "dense", "sparse", "sparse"]},
        # odd sizes: v != qk_nope, indexer dim not a power of two, 3 expert groups of which 2 are kept
        {"v_head_dim": 12, "qk_nope_head_dim": 20, "index_head_dim": 24, "qk_rope_head_dim": 6,
         "num_attention_heads": 5, "index_n_heads": 3, "index_topk": 5, "n_routed_experts": 6, "n_group": 3,
         "topk_group": 2, "num_experts_per_tok": 3},
    ],
)
def test_parity_config_variants(tmp_path, arch, variant):
    hf = tiny.hf_model(arch, seed=2, **variant)
    tiny.save_hf(hf, tmp_path)
    ids = _ids(7)
    model = load_model(tmp_path, verbose=False)
    if variant.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert (model(ids) - tiny.hf_logits(hf, ids)).abs().max().item() < 1e-4


def test_position_offset_moves_rope_but_keeps_causality(tmp_path):
    """positions= shifts RoPE only: the mask is over key slots, so later tokens never leak backwards."""
    hf = tiny.hf_model("glm_moe_dsa", seed=12)
    tiny.save_hf(hf, tmp_path)
    model = load_model(tmp_path, verbose=False)
    ids = _ids(9, seq=40, batch=1)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 128
    pos = torch.arange(100, 140)
    with torch.no_grad():
        a, b = model(ids, positions=pos), model(changed, positions=pos)
        base, stretched = model(ids), model(ids, positions=torch.arange(40) * 3)
    assert (a[:, :-1] - b[:, :-1]).abs().max() < 1e-5  # (expert batches change size: rounding only)
    assert (a - base).abs().max() < 1e-4  # RoPE is relative: a constant shift changes nothing
    assert (stretched - base).abs().max() > 1e-2  # ... but other positions do
