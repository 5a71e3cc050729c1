"""RoPE: the Triton kernel against the plain reference (the model's own rotation). Every op rounds to the
result dtype in both, so in fp16 and bf16 they are bit-identical; in fp32 within a few units (the compiler
may fuse a product into the sum)."""

import pytest
import torch
from markers import gpu, interpreter

from indexcache.ops.rope.reference import apply_rope as reference


def _tables(g, S: int, half: int, dtype, device="cpu"):
    ang = torch.rand(S, half, generator=g) * 40
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("interleaved", [True, False])
def test_kernel_equals_the_reference(dtype, interleaved):
    from indexcache.ops.rope.kernel import apply_rope

    g = torch.Generator().manual_seed(int(interleaved))
    cos, sin = _tables(g, 7, 8, dtype)
    exact = torch.equal if dtype == torch.float16 else (lambda a, b: torch.allclose(a, b, rtol=3e-7, atol=1e-7))
    q = torch.randn(2, 7, 5, 24, generator=g).to(dtype)[..., 8:]  # [B, S, H, d]: the rope part of wider rows
    k = torch.randn(2, 7, 40, generator=g).to(dtype)[..., 24:]  # [B, S, d]: the latent's rope tail
    for x in (q, k):
        got = apply_rope(x, cos, sin, interleaved)
        want = reference(x, cos, sin, interleaved)
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
        assert exact(got, want)
    # the indexer's rows: the first 16 dims rotated, the other 24 kept (copied in the same pass)
    rows = torch.randn(2, 7, 5, 40, generator=g).to(dtype)
    got = apply_rope(rows, cos, sin, interleaved, rope_dims=16)
    assert torch.equal(got[..., 16:], rows[..., 16:]) and exact(got, reference(rows, cos, sin, interleaved, 1, 16))
    with pytest.raises(ValueError, match="do not fit"):
        apply_rope(q, cos[:, :4], sin[:, :4], interleaved)
    with pytest.raises(ValueError, match="do not fit"):
        apply_rope(rows, cos, sin, interleaved, rope_dims=12)
    with pytest.raises(ValueError, match="positions on dim 1"):
        apply_rope(q, cos, sin, interleaved, seq_dim=2)


@interpreter
def test_the_models_rotations_run_on_the_kernel():
    from indexcache.model.rope import Rope
    from indexcache.ops.triton_support import LAST_COMPILED
    from indexcache.presets import preset_config

    cfg = preset_config("tiny")
    rope = Rope(cfg, torch.arange(6), torch.float16)
    x = torch.randn(1, 6, 3, cfg.qk_rope_head_dim).half()
    LAST_COMPILED.pop("rope", None)
    with torch.no_grad():
        got = rope.interleaved(x, backend="triton")
    assert "rope" in LAST_COMPILED and torch.equal(got, rope.interleaved(x))
    LAST_COMPILED.pop("rope", None)
    rope.half_split(x.float().requires_grad_(), backend="triton").sum().backward()  # trains: the reference
    assert "rope" not in LAST_COMPILED


@gpu
@pytest.mark.parametrize("interleaved", [True, False])
def test_kernel_is_bit_identical_to_the_reference_on_gpu(interleaved):
    from indexcache.ops.rope.kernel import apply_rope

    g = torch.Generator().manual_seed(3)
    cos, sin = _tables(g, 4096, 32, torch.bfloat16, "cuda")
    q = torch.randn(1, 4096, 128, 192, generator=g).to("cuda", torch.bfloat16)[..., 128:]  # V3.2's q_pe
    k = torch.randn(1, 4096, 576, generator=g).to("cuda", torch.bfloat16)[..., 512:]  # its k_pe
    for x in (q, k, q[:, :1]):
        c, s = cos[: x.shape[1]], sin[: x.shape[1]]
        assert torch.equal(apply_rope(x, c, s, interleaved), reference(x, c, s, interleaved))
    rows = torch.randn(1, 4096, 64, 128, generator=g).to("cuda", torch.bfloat16)  # the indexer's q rows
    assert torch.equal(apply_rope(rows, cos, sin, interleaved, rope_dims=64),
                       reference(rows, cos, sin, interleaved, 1, 64))
