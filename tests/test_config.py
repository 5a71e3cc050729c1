import math

import pytest
import torch
from tiny import GLM_TINY

from indexcache import ConfigError, DSAConfig
from indexcache.model.rope import inv_freq_and_scaling

YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def cfg_dict(arch="glm_moe_dsa", **kw):
    name = {"glm_moe_dsa": "GlmMoeDsaForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}[arch]
    return dict(GLM_TINY, architectures=[name], model_type=arch, **kw)


def test_defaults_follow_architecture():
    glm = DSAConfig.from_dict({"architectures": ["GlmMoeDsaForCausalLM"]})
    ds = DSAConfig.from_dict({"model_type": "deepseek_v32"})
    assert (glm.num_hidden_layers, glm.index_n_heads, glm.indexer_rope_interleave, glm.rms_norm_eps) == (
        78, 32, True, 1e-5)
    assert (ds.num_hidden_layers, ds.index_n_heads, ds.indexer_rope_interleave, ds.n_group) == (61, 64, False, 8)
    assert str(glm.pattern) == "F" * 78 and glm.mlp_layer_types[:4] == ["dense"] * 3 + ["sparse"]


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown architecture \\['LlamaForCausalLM'\\]"):
        DSAConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


def test_mlp_layer_types_and_first_k_dense():
    c = DSAConfig.from_dict(cfg_dict(first_k_dense_replace=4))
    assert c.mlp_layer_types == ["dense"] * 4 + ["sparse"] * 2
    types = ["dense", "sparse", "dense", "sparse", "sparse", "dense"]
    assert DSAConfig.from_dict(cfg_dict(mlp_layer_types=types)).mlp_layer_types == types
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        DSAConfig.from_dict(cfg_dict(mlp_layer_types=["dense"]))


def test_indexcache_fields_precedence():
    c = DSAConfig.from_dict(cfg_dict(index_topk_freq=2, index_skip_topk_offset=3))
    assert str(c.pattern) == "FFFSFS"
    c = DSAConfig.from_dict(cfg_dict(index_topk_freq=2, index_topk_pattern="FSSSSF"))
    assert str(c.pattern) == "FSSSSF" and c.pattern_source == "config index_topk_pattern"
    c = DSAConfig.from_dict(cfg_dict(index_topk_pattern="FSSSSF", indexer_types=["full"] * 6))
    assert str(c.pattern) == "FFFFFF"
    with pytest.raises(ConfigError, match="wrong length"):
        DSAConfig.from_dict(cfg_dict(index_topk_pattern="FSF"))


def test_routing_fields_validated():
    with pytest.raises(ConfigError, match="n_group=3 must divide"):
        DSAConfig.from_dict(cfg_dict(n_group=3))
    with pytest.raises(ConfigError, match="topk_group"):
        DSAConfig.from_dict(cfg_dict(topk_group=4))


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_yarn_matches_transformers(where):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = cfg_dict("deepseek_v32", max_position_embeddings=163840, rope_theta=10000.0)
    d[where] = dict(YARN)
    ours = DSAConfig.from_dict(d)
    hf = transformers.DeepseekV32Config(**{k: v for k, v in d.items() if k not in ("architectures",)})
    inv_hf, attn_hf = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, attn = inv_freq_and_scaling(ours.rope, ours.qk_rope_head_dim)
    torch.testing.assert_close(inv, inv_hf, rtol=1e-6, atol=0)
    assert attn == pytest.approx(attn_hf)
    m = 0.1 * math.log(40.0) + 1.0
    assert ours.softmax_scale == pytest.approx(ours.qk_head_dim**-0.5 * m * m)


def test_yarn_attention_factor_when_mscales_differ():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = cfg_dict("glm_moe_dsa", rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=1.0, rope_theta=50000.0))
    hf = transformers.GlmMoeDsaConfig(**{k: v for k, v in d.items() if k != "architectures"})
    inv_hf, attn_hf = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, attn = inv_freq_and_scaling(DSAConfig.from_dict(d).rope, d["qk_rope_head_dim"])
    torch.testing.assert_close(inv, inv_hf)
    assert attn == pytest.approx(attn_hf) and attn != 1.0


def test_unsupported_rope_and_activation():
    with pytest.raises(ConfigError, match="unsupported rope_type 'longrope'"):
        DSAConfig.from_dict(cfg_dict(rope_scaling={"type": "longrope", "factor": 2.0}))
    with pytest.raises(ConfigError, match="hidden_act"):
        DSAConfig.from_dict(cfg_dict(hidden_act="gelu"))


def test_fp8_block_size_and_mtp_count():
    c = DSAConfig.from_dict(cfg_dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]},
                                     num_nextn_predict_layers=1))
    assert c.fp8_block_size == (128, 128) and c.num_mtp_layers == 1
    assert "quantization_config" not in c.to_dict()


def test_indexer_rope_interleave_read_when_present():
    assert DSAConfig.from_dict(cfg_dict("deepseek_v32", indexer_rope_interleave=True)).indexer_rope_interleave
    assert not DSAConfig.from_dict(cfg_dict("glm_moe_dsa", indexer_rope_interleave=False)).indexer_rope_interleave
