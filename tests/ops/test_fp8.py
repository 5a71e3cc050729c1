"""FP8: block dequantisation against a float reference, and the fp8-faithful indexer scoring against a
plain reimplementation of DeepSeek's reference quantisation."""

import math

import numpy as np
import pytest
import torch

from indexcache.ops.fp8 import act_quant, block_dequant, fake_quant_fp8, hadamard_transform


def _e4m3_round(x: np.ndarray) -> np.ndarray:
    """Round to the nearest float8 e4m3fn value (ties to even), written out by hand."""
    out = np.zeros_like(x, dtype=np.float64)
    for i, v in enumerate(x.astype(np.float64).ravel()):
        a = abs(v)
        if a == 0:
            continue
        e = max(math.floor(math.log2(a)), -6)  # below 2^-6 the grid is subnormal with step 2^-9
        step = 2.0 ** (e - 3)
        q = a / step
        r = math.floor(q)
        frac = q - r
        if frac > 0.5 or (frac == 0.5 and r % 2 == 1):
            r += 1
        out.ravel()[i] = math.copysign(min(r * step, 448.0), v)
    return out


def test_block_dequant_matches_float_reference():
    g = torch.Generator().manual_seed(0)
    rows, cols, bm, bn = 300, 200, 128, 128  # partial last blocks on both axes
    w = (torch.randn(rows, cols, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(rows / bm), math.ceil(cols / bn), generator=g) + 0.1
    ref = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(0, cols):
            ref[i, j] = float(w[i, j].float()) * float(s[i // bm, j // bn])
    torch.testing.assert_close(block_dequant(w, s, (bm, bn)), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        block_dequant(w, s[:1], (bm, bn))


@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_act_quant_matches_plain_reimplementation(scale_fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 256, generator=g) * torch.logspace(-3, 2, 5).unsqueeze(1)
    y, s = act_quant(x, 128, scale_fmt)
    xb = x.view(5, 2, 128).numpy().astype(np.float64)
    for r in range(5):
        for b in range(2):
            amax = max(np.abs(xb[r, b]).max(), 1e-4)
            scale = amax / 448.0
            if scale_fmt == "ue8m0":
                scale = 2.0 ** math.ceil(math.log2(scale))
            assert s[r, b].item() == pytest.approx(scale, rel=1e-6)
            want = _e4m3_round(np.clip(xb[r, b] / s[r, b].item(), -448, 448))
            np.testing.assert_array_equal(y[r, b * 128 : (b + 1) * 128].float().numpy(), want)
    if scale_fmt == "ue8m0":
        assert torch.all(torch.log2(s) == torch.round(torch.log2(s)))


def test_hadamard_is_the_sylvester_matrix_and_orthonormal():
    n = 64
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    x = torch.randn(3, 7, n)
    torch.testing.assert_close(hadamard_transform(x), x @ H.T / math.sqrt(n), rtol=1e-5, atol=1e-5)
    q, k = torch.randn(10, n), torch.randn(12, n)
    torch.testing.assert_close(hadamard_transform(q) @ hadamard_transform(k).T, q @ k.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.randn(2, 48))


def test_fp8_scoring_matches_reference_formula():
    """score[t, s] = k_scale[s] * sum_h relu(q_fp8[t,h] . k_fp8[s]) * w[t,h] * q_scale[t,h] * D^-0.5,
    written as DeepSeek's reference computes it, against our scoring in fp8 mode."""
    from indexcache.ops.indexer import dense_scores

    g = torch.Generator().manual_seed(2)
    S, H, D = 20, 4, 128
    q, k = torch.randn(1, S, H, D, generator=g), torch.randn(1, S, D, generator=g)
    w = torch.randn(1, S, H, generator=g) * H**-0.5
    qh, kh = hadamard_transform(q), hadamard_transform(k)
    q8, qs = act_quant(qh)  # qs [1,S,H,1]
    k8, ks = act_quant(kh)  # ks [1,S,1]
    logits = torch.einsum("bthd,bsd->btsh", q8.float(), k8.float())
    ref = (logits.relu() * (w * qs[..., 0] * D**-0.5).unsqueeze(2)).sum(-1) * ks[..., 0].unsqueeze(1)
    ref = ref.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    ours = dense_scores(fake_quant_fp8(qh), w, fake_quant_fp8(kh), D**-0.5, torch.arange(S))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_fp8_model_mode_selects_nearly_the_same(tmp_path):
    import tiny

    from indexcache import Trace, load_model

    tiny.save_hf(tiny.hf_model("glm_moe_dsa", seed=2, index_head_dim=32), tmp_path)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    exact, fp8 = load_model(tmp_path, verbose=False), load_model(tmp_path, scoring="fp8", verbose=False)
    te, tf = Trace(layers={0}), Trace(layers={0})
    with torch.no_grad():
        exact(ids, trace=te)
        fp8(ids, trace=tf)
    a, b = te.records[0].indices[0, 16:], tf.records[0].indices[0, 16:]
    overlap = np.mean([len(set(x.tolist()) & set(y.tolist())) / 8 for x, y in zip(a, b, strict=True)])
    assert 0.8 < overlap  # quantisation flips only near-ties
    with pytest.raises(ValueError, match="unknown scoring mode"):
        exact.set_scoring("int4")
