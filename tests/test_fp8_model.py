"""Block-FP8 checkpoints kept FP8 in the native model: the layers hold e4m3 weights and their scales (the
model's footprint is its FP8 size), each FP8 layer equals its dequantised weight applied to the quantised
activations, the trained model quantised to FP8 keeps its loss and its next tokens, the Triton backend
agrees with the plain one, a re-saved FP8 model is bit-identical, and a scale of the wrong shape is one
line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from markers import interpreter
from samples import opening_ids

from indexcache.checkpoint import load_model, save_model
from indexcache.errors import CheckpointError
from indexcache.model.dsa import FP8Experts, FP8Linear
from indexcache.ops.fp8 import block_dequant, fake_quant_fp8
from indexcache.presets import make_random_checkpoint

# every FP8 layer needs in-features divisible by 128
WIDE = dict(hidden_size=128, q_lora_rank=128, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=32,
            qk_rope_head_dim=16, index_head_dim=32)  # and shapes the Triton kernels take


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("fp8") / "m", "deepseek_v32", "tiny", seed=3, fp8=True,
                                  **WIDE)


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


def test_fp8_checkpoint_stays_fp8(fp8_dir):
    conf = json.loads((fp8_dir / "config.json").read_text())
    assert conf["quantization_config"]["weight_block_size"] == [128, 128]
    kept = load_model(fp8_dir, dtype=torch.bfloat16, keep_fp8=True, verbose=False)
    deq = load_model(fp8_dir, dtype=torch.bfloat16, keep_fp8=False, verbose=False)
    fp8_layers = [m for m in kept.modules() if isinstance(m, FP8Linear)]
    assert fp8_layers and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8_layers)
    assert all(isinstance(layer.mlp.experts, FP8Experts) for layer in kept.model.layers[2:])  # the MoE layers
    assert not any(isinstance(m, FP8Linear) for m in deq.modules())
    # kv_b_proj is read as a matrix by the absorbed attention: it stays dequantised
    assert all(isinstance(layer.self_attn.kv_b_proj, torch.nn.Linear) for layer in kept.model.layers)
    assert _bytes(kept) < 0.7 * _bytes(deq)


def test_fp8_layers_equal_dequantised_weights_on_quantised_activations(fp8_dir):
    kept = load_model(fp8_dir, keep_fp8=True, verbose=False)
    g = torch.Generator().manual_seed(0)
    lin = kept.model.layers[0].self_attn.q_b_proj
    x = torch.randn(2, 9, lin.in_features, generator=g)
    want = F.linear(fake_quant_fp8(x, 128, None), block_dequant(lin.weight, lin.weight_scale_inv))
    torch.testing.assert_close(lin(x), want, rtol=1e-6, atol=1e-6)
    ex = kept.model.layers[3].mlp.experts
    xe = torch.randn(5, 128, generator=g)

    def deq(part: str, e: int) -> torch.Tensor:
        return block_dequant(getattr(ex, part)[e], getattr(ex, f"{part}_scale_inv")[e])

    h = F.silu(F.linear(fake_quant_fp8(xe, 128, None), deq("gate_proj", 1))) \
        * F.linear(fake_quant_fp8(xe, 128, None), deq("up_proj", 1))
    want = F.linear(fake_quant_fp8(h, 128, None), deq("down_proj", 1))
    torch.testing.assert_close(ex.run(1, xe), want, rtol=1e-5, atol=1e-6)


def test_trained_model_in_fp8_keeps_its_loss_and_tokens(tmp_path):
    """The bundled model quantised to block-FP8 and run with FP8 activations: the same math as DeepSeek's
    FP8 inference. Its loss on text moves by under 0.02 nats and its next-token choice agrees at 90% or
    more of the positions."""
    from indexcache.bundled import default_model

    orig = load_model(default_model(), verbose=False)
    save_model(orig, tmp_path / "q", fp8=True, copy_tokenizer_from=default_model())
    kept = load_model(tmp_path / "q", keep_fp8=True, verbose=False)
    assert sum(isinstance(m, FP8Linear) for m in kept.modules()) > 50
    ids = opening_ids(default_model())
    with torch.no_grad():
        a, b = orig(ids), kept(ids)

    def loss(lg):
        return F.cross_entropy(lg[0, :-1], ids[0, 1:]).item()

    assert abs(loss(a) - loss(b)) < 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


@interpreter
def test_triton_backend_runs_the_fp8_layers_like_the_plain_ops(fp8_dir):
    kept = load_model(fp8_dir, keep_fp8=True, verbose=False)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(4))
    kept.set_tie_break("lowest")  # exactly tied index scores: the Triton top-k's order
    with torch.no_grad():
        plain = kept(ids)
        kept.set_backend("triton")
        fast = kept(ids)
    assert all(m.backend == "triton" for m in kept.modules() if isinstance(m, (FP8Linear, FP8Experts)))
    # fp32 activations, sums of at most 256 terms in another order through the model: agreement to 1e-5
    # (a kernel's rounding could move an activation across an e4m3 rounding boundary; these inputs do not)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def test_a_kept_fp8_model_saves_bit_identical(fp8_dir, tmp_path):
    kept = load_model(fp8_dir, keep_fp8=True, verbose=False)
    save_model(kept, tmp_path / "again")
    back = load_model(tmp_path / "again", keep_fp8=True, verbose=False)
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for (na, pa), (nb, pb) in zip(kept.named_parameters(), back.named_parameters(), strict=True):
        assert na == nb and pa.dtype == pb.dtype and torch.equal(bits(pa), bits(pb)), na


def test_a_scale_of_the_wrong_shape_is_refused(fp8_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(fp8_dir, bad)
    f = next(bad.glob("*.safetensors"))
    tensors = load_file(str(f))
    name = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"
    tensors[name] = torch.ones(2, 3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="128 x 128 blocks need"):
        load_model(bad, keep_fp8=True, verbose=False)
    with pytest.raises(CheckpointError, match="does not match weight"):
        load_model(bad, keep_fp8=False, verbose=False)


def test_random_model_command_writes_fp8(tmp_path, capsys):
    from indexcache.checkpoint import TensorSource
    from indexcache.cli import main

    rc = main(["random-model", str(tmp_path / "r"), "--arch", "deepseek_v32", "--preset", "tiny", "--fp8"])
    assert rc == 0 and "block-FP8" in capsys.readouterr().out
    src = TensorSource(tmp_path / "r")
    try:
        names = src.names()
        assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in names
        assert src.get("model.layers.0.self_attn.q_a_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.0.input_layernorm.weight_scale_inv" not in names
    finally:
        src.close()
    # widths of 64 are not multiples of 128: such layers load dequantised, the model still runs
    model = load_model(tmp_path / "r", keep_fp8=True, verbose=False)
    assert torch.isfinite(model(torch.randint(0, 300, (1, 12)))).all()
