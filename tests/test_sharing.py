"""IndexCache semantics: Shared layers own no indexer and attend exactly to their source layer's indices."""

import pytest
import tiny
import torch

from indexcache import PatternError, Trace, load_model

PATTERN = "FSSFSF"


@pytest.fixture(scope="module")
def dsv32_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dsv32")
    tiny.save_hf(tiny.hf_model("deepseek_v32", seed=13), d)
    return d


def test_shared_layers_have_no_indexer(dsv32_dir):
    model = load_model(dsv32_dir, pattern=PATTERN, verbose=False)
    assert model.indexer_layers == [0, 3, 5]
    names = [n for n, _ in model.named_parameters()]
    for layer in (1, 2, 4):
        assert not any(n.startswith(f"model.layers.{layer}.self_attn.indexer.") for n in names)


def test_deepseek_shared_layers_attend_to_source_indices(dsv32_dir):
    model = load_model(dsv32_dir, pattern=PATTERN, verbose=False)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    trace = Trace(indices=True, attn=True)
    with torch.no_grad():
        model(ids, trace=trace)
    rec = trace.records
    for layer, src in enumerate([0, 0, 0, 3, 3, 5]):
        assert rec[layer].source == src
        assert torch.equal(rec[layer].indices, rec[src].indices)
        # the attention puts all its mass on the source's selection and nowhere else
        idx = rec[src].indices
        sel = torch.zeros(*idx.shape[:2], 41, dtype=torch.bool)  # column 40 absorbs the -1 slots
        sel.scatter_(-1, torch.where(idx < 0, 40, idx), True)
        assert rec[layer].attn.masked_fill(sel[..., :40], 0).abs().max() == 0
        torch.testing.assert_close(rec[layer].attn.sum(-1), torch.ones(2, 40))
    # distinct Full layers really select differently (so the equality above is not vacuous)
    assert not torch.equal(rec[0].indices, rec[3].indices)
    # each query keeps min(index_topk, visible) tokens
    counts = (rec[0].indices >= 0).sum(-1)[0]
    assert counts.tolist() == [min(8, p + 1) for p in range(40)]


def test_shared_output_equals_forcing_source_indices(dsv32_dir):
    """Running a Shared layer is the same as handing the Full model's layer the source's indices."""
    full = load_model(dsv32_dir, verbose=False)
    ids = torch.randint(0, 128, (1, 36), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        shared_logits = full(ids, pattern=PATTERN)
        ctx = full.make_context(ids.shape[1])
        h = full.model.embed_tokens(ids)
        indices = None
        for i, layer in enumerate(full.model.layers):
            if PATTERN[i] == "F":
                indices, _ = layer.self_attn.indexer(layer.input_layernorm(h),
                                                     layer.self_attn.latents(layer.input_layernorm(h), ctx)[0], ctx)
            h, _ = layer(h, ctx, False, indices)  # run as Shared with the forced indices
        assert (full.head(h) - shared_logits).abs().max() < 1e-5


def test_pattern_needs_indexer_weights(dsv32_dir):
    model = load_model(dsv32_dir, pattern=PATTERN, verbose=False)
    with pytest.raises(PatternError, match="layers 1 are Full"):
        model(torch.zeros(1, 4, dtype=torch.long), pattern="FFSFSF")


def test_trace_index_scores_and_dense_mode(dsv32_dir):
    model = load_model(dsv32_dir, verbose=False)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    trace = Trace(indices=True, index_scores=True, attn=True, layers={2})
    with torch.no_grad():
        model(ids, trace=trace)
        dense_trace = Trace(attn=True, layers={2})
        model(ids, trace=dense_trace, dense=True)
    assert set(trace.records) == {2}
    scores = trace.records[2].index_scores
    future = torch.ones(30, 30, dtype=torch.bool).triu(1)
    assert scores.shape == (1, 30, 30)
    assert torch.isinf(scores[0][future]).all() and torch.isfinite(scores[0][~future]).all()
    top = scores.topk(8, dim=-1).indices.sort(-1).values
    got = trace.records[2].indices.sort(-1).values
    assert torch.equal(top[:, 8:], got[:, 8:])
    # dense mode attends to every visible token
    p = dense_trace.records[2].attn[0]
    assert (p[~future] > 0).all() and (p[future] == 0).all()
