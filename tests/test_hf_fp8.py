"""Block-FP8 checkpoints in transformers' own FP8 layers (its fine-grained FP8 support), with this package's
block-FP8 GEMM in transformers' kernel slot: kept FP8, the layers hold e4m3 weights (the model's footprint is
its FP8 size) and each equals its dequantised weight on the quantised activations; the trained model keeps
its loss through them; dequantised, the model equals the native one exactly (transformers' own
dequantisation mis-scales weights whose rows are not a multiple of 128, which these checkpoints have)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bounds import U_BF16, U_FP8_ACCUMULATE, U_FP32, gamma
from markers import gpu, interpreter
from samples import opening_ids

from indexcache.checkpoint import load_model, save_model
from indexcache.integrations.transformers import fp8 as hf_fp8
from indexcache.integrations.transformers.loading import load_pretrained
from indexcache.ops.fp8 import block_dequant, block_quant, fake_quant_fp8
from indexcache.presets import make_random_checkpoint

pytest.importorskip("transformers")
from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear  # noqa: E402

# kv_a_proj_with_mqa gets 128 + 16 = 144 rows (a partial row block, like DeepSeek-V3.2's 576); o_proj's
# 4 x 16 = 64 in-features take the zero-padded path
WIDE = dict(hidden_size=128, q_lora_rank=128, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=128,
            qk_rope_head_dim=16, index_head_dim=32)


@pytest.fixture(scope="module", params=["deepseek_v32", "glm_moe_dsa"])
def fp8_dir(request, tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("hf8") / "m", request.param, "tiny", seed=5, fp8=True,
                                  **WIDE)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


def test_dequantised_transformers_model_equals_the_native_one(fp8_dir):
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    hf = load_pretrained(fp8_dir, dtype=torch.float32, keep_fp8=False)
    assert not any(p.dtype == torch.float8_e4m3fn for p in hf.parameters())
    native = load_model(fp8_dir, keep_fp8=False, verbose=False)
    # the same fp32 weights and math in another order: agreement to fp32 rounding
    torch.testing.assert_close(_logits(hf, ids), _logits(native, ids), rtol=1e-5, atol=1e-5)


def test_kept_fp8_layers_hold_e4m3_and_equal_the_dequantised_product(fp8_dir):
    kept = load_pretrained(fp8_dir, dtype=torch.float32, keep_fp8=True)
    wide = load_pretrained(fp8_dir, dtype=torch.float32, keep_fp8=False)
    linears = [m for m in kept.modules() if isinstance(m, FP8Linear)]
    assert len(linears) >= 30 and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert any(isinstance(m, FP8Experts) for m in kept.modules())
    assert _bytes(kept) < 0.5 * _bytes(wide)
    g = torch.Generator().manual_seed(2)
    by_name = dict(kept.named_modules())
    for name in ("model.layers.0.self_attn.kv_a_proj_with_mqa", "model.layers.0.self_attn.o_proj",
                 "model.layers.3.self_attn.q_b_proj"):
        lin = by_name[name]
        x = torch.randn(3, 5, lin.in_features, generator=g)
        pad = -lin.in_features % 128  # the activation blocks of a padded row are those of the row
        xq = fake_quant_fp8(F.pad(x, (0, pad)), 128, None)[..., : lin.in_features]
        want = F.linear(xq, block_dequant(lin.weight, lin.weight_scale_inv))
        torch.testing.assert_close(lin(x), want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(_logits(kept, torch.randint(0, 300, (1, 24)))).all()


def test_expert_slots_equal_the_single_product():
    g = torch.Generator().manual_seed(3)
    E, N, K, S = 4, 256, 256, 19
    pairs = [block_quant(torch.randn(N, K, generator=g) * 0.05) for _ in range(E)]
    w = torch.stack([q for q, _ in pairs])
    s = torch.stack([sc for _, sc in pairs])
    x = torch.randn(S, K, generator=g)
    expert_ids = torch.randint(0, E, (S,), generator=g)
    expert_ids[0] = E  # an expert-parallel sentinel row: left zero
    got = hf_fp8.matmul_batched(x, w, s, [128, 128], expert_ids=expert_ids)
    for r in range(1, S):
        e = int(expert_ids[r])
        torch.testing.assert_close(got[r], hf_fp8.matmul_2d(x[r : r + 1], w[e], s[e], [128, 128])[0])
    assert torch.equal(got[0], torch.zeros(N))
    order = torch.argsort(expert_ids[1:]) + 1
    counts = torch.bincount(expert_ids[order], minlength=E)
    grouped = hf_fp8.matmul_grouped(x[order], w, s, offsets=counts.cumsum(0), tokens_per_expert=counts,
                                    block_size=[128, 128])
    torch.testing.assert_close(grouped, got[order])
    with pytest.raises(NotImplementedError, match="weight blocks"):
        hf_fp8.matmul_2d(x, w[0], s[0], [1, 128])


def test_trained_model_through_transformers_fp8_keeps_its_loss(tmp_path):
    """The bundled model quantised to block-FP8 and loaded by transformers with its FP8 layers kept: the
    loss on text moves by under 0.02 nats from the fp32 model, within 0.01 of the native FP8 model's (which
    leaves kv_b_proj wide), and the next token agrees with the native FP8 model's at 90% or more of the
    positions."""
    from indexcache.bundled import default_model

    save_model(load_model(default_model(), verbose=False), tmp_path / "q", fp8=True,
               copy_tokenizer_from=default_model())
    ids = opening_ids(default_model())
    orig = _logits(load_pretrained(default_model(), dtype=torch.float32), ids)
    kept = _logits(load_pretrained(tmp_path / "q", dtype=torch.float32, keep_fp8=True), ids)
    native = _logits(load_model(tmp_path / "q", keep_fp8=True, verbose=False), ids)

    def loss(lg: torch.Tensor) -> float:
        return F.cross_entropy(lg[0, :-1], ids[0, 1:]).item()

    assert abs(loss(kept) - loss(orig)) < 0.02 and abs(loss(kept) - loss(native)) < 0.01
    assert (kept.argmax(-1) == native.argmax(-1)).float().mean().item() >= 0.9


@interpreter
def test_the_slot_runs_the_triton_kernel(monkeypatch):
    g = torch.Generator().manual_seed(6)
    w, s = block_quant(torch.randn(256, 256, generator=g) * 0.05)
    x = torch.randn(7, 256, generator=g)
    plain = hf_fp8.matmul_2d(x, w, s, [128, 128])
    monkeypatch.setattr(hf_fp8, "_backend", lambda t: "triton")
    # fp32 activations, sums of 256 products in another order: 1e-5 relative
    torch.testing.assert_close(hf_fp8.matmul_2d(x, w, s, [128, 128]), plain, rtol=1e-5, atol=1e-5)


@gpu
def test_kept_fp8_transformers_layers_on_the_gpu(tmp_path):
    """On CUDA the FP8 layers stay FP8 by default and run the Triton GEMM. Each layer of the first decoder
    layer, on bf16 activations, against the dequantised weight on the same quantised activations in fp32:
    within a 128-wide block the tensor cores accumulate the e4m3 products at about 14 bits, the blocks'
    partial sums add in fp32, and the output is rounded once to bf16."""
    d = make_random_checkpoint(tmp_path / "m", "deepseek_v32", "tiny", seed=7, fp8=True, **WIDE)
    kept = load_pretrained(d, dtype=torch.bfloat16, device="cuda")
    linears = {n: m for n, m in kept.named_modules() if isinstance(m, FP8Linear) and n.startswith("model.layers.0.")}
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn and m.weight.is_cuda for m in linears.values())
    g = torch.Generator(device="cuda").manual_seed(8)
    for name, lin in linears.items():
        K = lin.in_features
        x = torch.randn(512, K, generator=g, device="cuda").to(torch.bfloat16)
        xq = fake_quant_fp8(F.pad(x.float(), (0, -K % 128)), 128, None)[:, :K]
        w = block_dequant(lin.weight, lin.weight_scale_inv)
        want = F.linear(xq, w)
        blocks = -(-K // 128)
        bound = (gamma(128, U_FP8_ACCUMULATE) + gamma(blocks, U_FP32)) * F.linear(xq.abs(), w.abs()) \
            + U_BF16 * want.abs()
        assert ((lin(x).float() - want).abs() <= bound + 1e-30).all(), name


@gpu
def test_trained_model_through_transformers_fp8_on_the_gpu(tmp_path):
    """The bundled model quantised to block-FP8, through transformers' FP8 layers on the Triton GEMM in
    bf16: its loss on text within 0.02 nats of the native FP8 model's on the same GPU."""
    from indexcache.bundled import default_model
    from indexcache.data.text import load_tokenizer

    save_model(load_model(default_model(), verbose=False), tmp_path / "q", fp8=True,
               copy_tokenizer_from=default_model())
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 40
    ids = torch.tensor([load_tokenizer(default_model()).encode(text).ids[:1024]], device="cuda")
    kept = load_pretrained(tmp_path / "q", dtype=torch.bfloat16, device="cuda")
    assert any(m.weight.dtype == torch.float8_e4m3fn for m in kept.modules() if isinstance(m, FP8Linear))
    native = load_model(tmp_path / "q", dtype=torch.bfloat16, device="cuda", verbose=False)
    native.set_backend("triton")

    def loss(model) -> float:
        return F.cross_entropy(_logits(model, ids)[0, :-1].float(), ids[0, 1:]).item()

    assert abs(loss(kept) - loss(native)) < 0.02


def test_experts_narrower_than_a_block_are_written_wide_and_refused_in_fp8(tmp_path, monkeypatch):
    """The bundled model's experts are 160 wide: its FP8 checkpoint keeps them wide and says so in
    ``modules_to_not_convert``; a checkpoint that has such experts in FP8 (another writer's) is refused in
    one line before transformers would reinitialise their fused scales."""
    import json

    from indexcache import checkpoint
    from indexcache.bundled import default_model
    from indexcache.errors import HFModelError

    model = load_model(default_model(), verbose=False)
    save_model(model, tmp_path / "ok", fp8=True)
    q = json.loads((tmp_path / "ok" / "config.json").read_text())["quantization_config"]
    moe = [i for i, kind in enumerate(model.config.mlp_layer_types) if kind == "sparse"]
    assert q["modules_to_not_convert"] == ["lm_head", *sorted(f"model.layers.{i}.mlp.experts" for i in moe)]
    monkeypatch.setattr(checkpoint, "wide_experts", lambda cfg: False)
    save_model(model, tmp_path / "bad", fp8=True)
    with pytest.raises(HFModelError, match="experts of width 160") as e:
        load_pretrained(tmp_path / "bad", dtype=torch.float32)
    assert "\n" not in str(e.value)
