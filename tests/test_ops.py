"""Reference ops against brute-force loops on fresh random inputs."""

import pytest
import torch

from indexcache.ops import indexer_scores, indexer_topk, mla_attention


def _naive_scores(q, w, k, scale, pos):
    B, S, H, _ = q.shape
    T = k.shape[1]
    out = torch.full((B, S, T), float("-inf"))
    for b in range(B):
        for s in range(S):
            for t in range(T):
                if t <= pos[s]:
                    out[b, s, t] = sum(w[b, s, h] * torch.relu(scale * q[b, s, h] @ k[b, t]) for h in range(H))
    return out


def test_indexer_scores_and_topk_against_loops():
    g = torch.Generator().manual_seed(0)
    B, S, H, D, T = 2, 7, 3, 8, 12
    q, w, k = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, generator=g), torch.randn(B, T, D, generator=g)
    pos = torch.arange(T - S, T)  # the last S tokens of a T-token sequence (a later prefill chunk)
    ref = _naive_scores(q, w, k, 0.3, pos)
    torch.testing.assert_close(indexer_scores(q, w, k, 0.3, pos), ref, rtol=1e-5, atol=1e-5)
    idx, sc = indexer_topk(q, w, k, 4, 0.3, pos, return_scores=True)
    assert idx.shape == (B, S, 4) and torch.equal(sc, indexer_scores(q, w, k, 0.3, pos))
    for b in range(B):
        for s in range(S):
            want = set(ref[b, s].topk(4).indices.tolist())
            assert set(idx[b, s].tolist()) == want


def test_topk_rows_shorter_than_k_are_padded():
    g = torch.Generator().manual_seed(1)
    S, H, D = 10, 2, 8
    q, w, k = torch.randn(1, S, H, D, generator=g), torch.rand(1, S, H, generator=g), torch.randn(1, S, D, generator=g)
    idx, _ = indexer_topk(q, w, k, 6, 1.0, torch.arange(S))
    for s in range(S):
        row = idx[0, s].tolist()
        valid = [i for i in row if i >= 0]
        assert len(valid) == min(6, s + 1) and row[len(valid):] == [-1] * (6 - len(valid))
        assert all(i <= s for i in valid) and len(set(valid)) == len(valid)
    # k larger than the whole sequence: K = T columns
    idx, _ = indexer_topk(q, w, k, 50, 1.0, torch.arange(S))
    assert idx.shape == (1, S, S)


@pytest.mark.parametrize("budget", [1 << 30, 600])
def test_topk_independent_of_chunking(budget):
    g = torch.Generator().manual_seed(2)
    S, H, D = 33, 4, 16
    q, w, k = torch.randn(2, S, H, D, generator=g), torch.randn(2, S, H, generator=g), torch.randn(2, S, D, generator=g)
    ref, _ = indexer_topk(q, w, k, 5, 0.25, torch.arange(S))
    got, _ = indexer_topk(q, w, k, 5, 0.25, torch.arange(S), budget_bytes=budget)
    assert torch.equal(ref, got)


def _naive_attention(q, kv, scale, d_v, keys_per_query):
    B, S, H, _ = q.shape
    out = torch.zeros(B, S, H, d_v)
    for b in range(B):
        for s in range(S):
            keys = keys_per_query(b, s)
            sel = kv[b, keys]
            for h in range(H):
                p = torch.softmax(scale * sel @ q[b, s, h], dim=0)
                out[b, s, h] = p @ sel[:, :d_v]
    return out


@pytest.mark.parametrize("budget", [1 << 30, 500])
def test_sparse_and_dense_mla_against_loops(budget):
    g = torch.Generator().manual_seed(3)
    B, S, H, Dk, dv, T = 2, 6, 3, 10, 6, 9
    q, kv = torch.randn(B, S, H, Dk, generator=g), torch.randn(B, T, Dk, generator=g)
    pos = torch.arange(T - S, T)
    idx = torch.stack([torch.stack([torch.randperm(int(p) + 1, generator=g)[:4] for p in pos]) for _ in range(B)])
    idx[0, 0, 3] = -1  # an empty slot
    out, lse, probs = mla_attention(q, kv, 0.4, dv, indices=idx, return_probs=True, budget_bytes=budget)
    ref = _naive_attention(q, kv, 0.4, dv, lambda b, s: [i for i in idx[b, s].tolist() if i >= 0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert probs[0, 0, 3] == 0 and torch.allclose(probs.sum(-1), torch.ones(B, S))
    dout, dlse, dprobs = mla_attention(q, kv, 0.4, dv, q_pos=pos, return_probs=True, budget_bytes=budget)
    dref = _naive_attention(q, kv, 0.4, dv, lambda b, s: list(range(int(pos[s]) + 1)))
    torch.testing.assert_close(dout, dref, rtol=1e-5, atol=1e-5)
    assert dprobs.shape == (B, S, T) and (dprobs[0, 0, int(pos[0]) + 1:] == 0).all()
    # log-sum-exp is the softmax normaliser
    logits = 0.4 * torch.einsum("hd,td->ht", q[1, 2], kv[1, : int(pos[2]) + 1])
    torch.testing.assert_close(dlse[1, 2], torch.logsumexp(logits, -1))
