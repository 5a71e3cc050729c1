"""Indexer distillation losses and the trainer (CPU, tiny models)."""

import json

import pytest
import torch
from markers import interpreter

from indexcache import load_model
from indexcache.data.synthetic import corpus
from indexcache.presets import make_random_checkpoint
from indexcache.train import IndexerDistillation, TrainConfig, kl_rows, train
from indexcache.train.trainer import step_losses


def test_kl_is_zero_at_p_equal_q_and_positive_otherwise():
    logits = torch.randn(3, 5, 11)
    p = torch.softmax(logits, -1)
    assert kl_rows(p, torch.log_softmax(logits, -1)).abs() < 1e-6
    assert kl_rows(p, torch.log_softmax(logits + torch.randn(3, 5, 11), -1)) > 1e-3


def test_proposition_1_multi_layer_gradient_equals_averaged_target():
    """grad of sum_j 1/(m+1) KL(p_j || q) == grad of KL(mean_j p_j || q) (the values differ by a constant)."""
    m1 = 4
    ps = [torch.softmax(torch.randn(6, 9), -1) for _ in range(m1)]
    theta = torch.randn(6, 9, requires_grad=True)
    multi = sum(kl_rows(p, torch.log_softmax(theta, -1)) for p in ps) / m1
    (g_multi,) = torch.autograd.grad(multi, theta)
    avg = kl_rows(sum(ps) / m1, torch.log_softmax(theta, -1))
    (g_avg,) = torch.autograd.grad(avg, theta)
    torch.testing.assert_close(g_multi, g_avg, rtol=1e-5, atol=1e-7)
    assert multi.item() >= avg.item() - 1e-7  # H(mean p) >= mean H(p): L_multi - L_avg >= 0


def test_restricted_kl_renormalises_over_the_selected_set():
    g = torch.Generator().manual_seed(0)
    p_full = torch.softmax(torch.randn(2, 4, 10, generator=g), -1)
    scores = torch.randn(2, 4, 10, generator=g)
    sel = torch.randn(2, 4, 10, generator=g) > 0
    sel[..., 0] = True
    p_sel = p_full.masked_fill(~sel, 0)  # mass outside the set is dropped, not renormalised yet
    log_q = torch.log_softmax(scores.masked_fill(~sel, float("-inf")), -1)
    got = kl_rows(p_sel, log_q)
    want = 0.0
    for b in range(2):
        for s in range(4):
            idx = sel[b, s].nonzero().flatten()
            pr = p_full[b, s, idx] / p_full[b, s, idx].sum()
            qr = torch.softmax(scores[b, s, idx], -1)
            want += float((pr * (pr.log() - qr.log())).sum())
    assert got.item() == pytest.approx(want / 8, rel=1e-5)
    assert torch.isfinite(got)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("t") / "m", "glm_moe_dsa", "tiny", seed=1)


def test_sparse_stage_gradients_are_isolated(tiny):
    model = load_model(tiny, pattern="FSSFSS", verbose=False)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    lm, il, terms = step_losses(model, ids, "sparse", model.pattern, cross_layer=True)
    idx_params = {n: p for n, p in model.named_parameters() if ".indexer." in n}
    backbone = {n: p for n, p in model.named_parameters() if ".indexer." not in n}
    g_idx = torch.autograd.grad(il, list(model.parameters()), allow_unused=True, retain_graph=True)
    named = dict(zip([n for n, _ in model.named_parameters()], g_idx, strict=True))
    assert all(named[n] is None or named[n].abs().max() == 0 for n in backbone)  # KL never reaches the backbone
    assert all(named[n] is not None and named[n].abs().max() > 0 for n in idx_params if "k_norm.bias" not in n)
    g_lm = torch.autograd.grad(lm, list(model.parameters()), allow_unused=True)
    named = dict(zip([n for n, _ in model.named_parameters()], g_lm, strict=True))
    assert all(named[n] is None or named[n].abs().max() == 0 for n in idx_params)  # LM never reaches indexers
    assert named["model.layers.3.self_attn.kv_b_proj.weight"].abs().max() > 0
    # the multi-layer terms: each Full layer against itself and every layer it serves
    assert set(terms) == {(0, 0), (0, 1), (0, 2), (3, 3), (3, 4), (3, 5)}


def test_multi_layer_weights_and_ablation(tiny):
    model = load_model(tiny, pattern="FSSFSS", verbose=False)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    multi = IndexerDistillation(model.pattern, cross_layer=True)
    own = IndexerDistillation(model.pattern, cross_layer=False)
    with torch.no_grad():
        model(ids, collect=multi)
        model(ids, collect=own)
    multi.finish()
    own.finish()
    assert multi.loss.item() == pytest.approx(sum(v / 3 for v in multi.terms.values()), rel=1e-5)
    assert set(own.terms) == {(0, 0), (3, 3)}
    assert own.terms[(0, 0)] == pytest.approx(multi.terms[(0, 0)], rel=1e-5)
    assert own.loss.item() == pytest.approx(own.terms[(0, 0)] + own.terms[(3, 3)], rel=1e-5)


def _per_row_kl(model, ids, pattern: str) -> dict[int, torch.Tensor]:
    """Each Full layer's KL(p || softmax(I)) per query row, [B, S], from the dense traces of a dense forward."""
    from indexcache.model.dsa import Trace

    trace = Trace(indices=False, index_scores=True, attn=True)
    with torch.no_grad():
        model(ids, pattern=pattern, dense=True, trace=trace)
    out = {}
    for layer, rec in trace.records.items():
        if rec.index_scores is None:
            continue
        p = rec.attn / rec.attn.sum(-1, keepdim=True)
        log_q = torch.log_softmax(rec.index_scores, -1)
        out[layer] = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p)).sum(-1)
    return out


def test_warmup_loss_on_sampled_rows_is_the_mean_of_those_rows(tiny):
    """The warm-up's dense target on sampled query rows: the loss is the mean of exactly those rows' KL (so
    a uniform sample is an unbiased estimate of the all-rows loss), and all rows give the all-rows loss."""
    from indexcache.train.trainer import sample_rows

    model = load_model(tiny, pattern="FFFFFF", verbose=False)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    per_row = _per_row_kl(model, ids, "FFFFFF")
    assert len(per_row) == 6
    rows = sample_rows(9, 40, seed=0, step=5, part=1)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 9 and 0 <= rows.min() <= rows.max() < 40
    assert torch.equal(rows, sample_rows(9, 40, seed=0, step=5, part=1))  # the same draw on resume
    assert not torch.equal(rows, sample_rows(9, 40, seed=0, step=6, part=1))
    assert sample_rows(0, 40, 0, 0, 0) is None and sample_rows(40, 40, 0, 0, 0) is None
    with torch.no_grad():
        _, sampled, terms = step_losses(model, ids, "warmup", model.pattern, True, kl_rows=rows)
        _, whole, _ = step_losses(model, ids, "warmup", model.pattern, True)
        _, every, _ = step_losses(model, ids, "warmup", model.pattern, True, kl_rows=torch.arange(40))
    want = sum(float(v[:, rows].mean()) for v in per_row.values())
    assert sampled.item() == pytest.approx(want, rel=1e-4)
    # one layer's term can be a KL near zero: it is a difference of a cross-entropy and an entropy of about
    # log(40) nats, whose fp32 rounding (~1e-7 relative, summed over 40 keys) bounds it absolutely, not relatively
    for layer in per_row:
        assert terms[(layer, layer)] == pytest.approx(float(per_row[layer][:, rows].mean()), rel=1e-4, abs=1e-6)
    assert whole.item() == pytest.approx(sum(float(v.mean()) for v in per_row.values()), rel=1e-4)
    # all rows through the sampled path (the fused attention gives the outputs): the same loss, to float error
    assert every.item() == pytest.approx(whole.item(), rel=1e-4)
    assert abs(sampled.item() - whole.item()) > 0.01 * whole.item()  # other rows: another value


def test_sparse_loss_on_sampled_rows_keeps_the_shared_terms_aligned(tiny):
    """In the sparse stage the sampled rows cut both the Full layer's index scores and its served layers'
    targets: every term equals the all-rows term restricted to those rows (checked one row at a time)."""
    model = load_model(tiny, pattern="FSSFSS", verbose=False)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([3, 17, 30, 39])
    with torch.no_grad():
        _, il, terms = step_losses(model, ids, "sparse", model.pattern, True, kl_rows=rows)
        singles = [step_losses(model, ids, "sparse", model.pattern, True, kl_rows=rows[i:i + 1])[2] for i in range(4)]
        _, il_all, _ = step_losses(model, ids, "sparse", model.pattern, True, kl_rows=torch.arange(40))
        _, il_none, _ = step_losses(model, ids, "sparse", model.pattern, True)
    assert set(terms) == {(0, 0), (0, 1), (0, 2), (3, 3), (3, 4), (3, 5)}
    for key, value in terms.items():
        assert value == pytest.approx(sum(t[key] for t in singles) / 4, rel=1e-4, abs=1e-6)
    assert il_all.item() == pytest.approx(il_none.item(), rel=1e-5)
    assert il.item() == pytest.approx(sum(v / 3 for v in terms.values()), rel=1e-5)


def test_training_with_sampled_rows_trains_and_records_the_setting(tmp_path):
    _data(tmp_path)
    train(_cfg(tmp_path, "dense", "dense", steps=4))
    out = train(_cfg(tmp_path, "warm", "warmup", steps=4, init=str(tmp_path / "dense" / "model"), kl_rows=16))
    log = json.loads((tmp_path / "warm" / "losses.json").read_text())["train"]
    assert all(r["indexer_kl"] > 0 for r in log) and out["final_eval"]["heldout_indexer_kl"] > 0
    assert _cfg(tmp_path, "x", "warmup", kl_rows=16).fingerprint()["kl_rows"] == 16  # a resume must match it


def _data(tmp_path):
    d = tmp_path / "books"
    d.mkdir()
    for i, doc in enumerate(corpus(200_000, seed=5)):
        (d / f"book{i:02d}.txt").write_text(doc)
    return d


def _cfg(tmp_path, out, stage, **kw):
    base = dict(out=str(tmp_path / out), stage=stage, data=str(tmp_path / "books"), preset="tiny", heldout=2,
                vocab_size=300, seq_len=48, batch_size=2, steps=12, lr=3e-3, warmup_steps=2, log_every=1,
                eval_every=6, save_every=4, eval_windows=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_three_stages_train_and_resume(tmp_path):
    _data(tmp_path)
    dense = train(_cfg(tmp_path, "dense", "dense", steps=30, lr=1e-2))
    log = json.loads((tmp_path / "dense" / "losses.json").read_text())["train"]
    first, last = log[0]["lm_loss"], sum(r["lm_loss"] for r in log[-5:]) / 5
    assert last < first - 0.5, (first, last)  # the loss falls
    assert (tmp_path / "dense" / "losses.png").exists() and len(dense["heldout_files"]) == 2
    tok = json.loads((tmp_path / "dense" / "model" / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and len(tok["model"]["vocab"]) <= 300

    warm = train(_cfg(tmp_path, "warm", "warmup", init=str(tmp_path / "dense" / "model"), steps=15, lr=1e-2,
                      pattern="FSFSFS"))
    klog = json.loads((tmp_path / "warm" / "losses.json").read_text())["train"]
    assert sum(r["indexer_kl"] for r in klog[-3:]) < sum(r["indexer_kl"] for r in klog[:3])  # the KL falls
    dense_model = load_model(tmp_path / "dense" / "model", verbose=False)
    warm_model = load_model(tmp_path / "warm" / "model", verbose=False)
    assert str(warm_model.pattern) == "FSFSFS" and warm_model.indexer_layers == [0, 2, 4]
    # warm-up trains the indexers only: the backbone is bit-identical (saved as bf16 both times)
    wp = dict(warm_model.named_parameters())
    for n, p in dense_model.named_parameters():
        if ".indexer." not in n:
            assert torch.equal(p, wp[n]), n
        elif n in wp:
            assert not torch.equal(p, wp[n]), n
    assert "indexer_recall" in warm and len(warm["indexer_recall"]["recall"]) == 3

    # sparse stage, interrupted after 4 steps and resumed, equals an uninterrupted run
    kw = dict(init=str(tmp_path / "warm" / "model"), steps=8, pattern="FSFSFS", micro_batch=1)
    full = train(_cfg(tmp_path, "sparse_a", "sparse", **kw))
    stopped = train(_cfg(tmp_path, "sparse_b", "sparse", **dict(kw, stop_after=5)))
    assert stopped["stopped_at"] == 5 and not (tmp_path / "sparse_b" / "model" / "model.safetensors").exists()
    # a stopped run leaves its weights so far, loadable, beside the state (they travel without it)
    partial = load_model(stopped["partial_model"], verbose=False)
    assert str(partial.pattern) == "FSFSFS" and (tmp_path / "sparse_b" / "partial_model" / "tokenizer.json").exists()
    resumed = train(_cfg(tmp_path, "sparse_b", "sparse", **dict(kw, resume=True)))
    assert not (tmp_path / "sparse_b" / "partial_model").exists()  # the finished model replaces it
    a = load_model(tmp_path / "sparse_a" / "model", verbose=False)
    b = load_model(tmp_path / "sparse_b" / "model", verbose=False)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert resumed["final_eval"] == full["final_eval"]
    # a refused resume names what differs; a finished run is not retrained without --overwrite
    from indexcache.errors import OutputError

    with pytest.raises(OutputError, match="cannot resume.*steps: 8 then, 9 now"):
        train(_cfg(tmp_path, "sparse_b", "sparse", **dict(kw, resume=True, steps=9)))
    with pytest.raises(OutputError, match="pass --overwrite to replace it or --resume to continue it"):
        train(_cfg(tmp_path, "sparse_b", "sparse", **kw))
    with pytest.raises(OutputError, match="--resume: no .*state.pt to resume from"):
        train(_cfg(tmp_path, "sparse_c", "sparse", **dict(kw, resume=True)))
    assert not (tmp_path / "sparse_c").exists()  # a refusal writes nothing


def test_blockwise_backward_equals_one_backward(tiny):
    """Back-propagating each sharing block as it closes gives the gradients of one backward of the sum."""
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    grads = []
    for scale in (None, 0.5):
        model = load_model(tiny, pattern="FSSFSS", verbose=False)
        for n, p in model.named_parameters():
            p.requires_grad_(".indexer." in n)
        _, il, _ = step_losses(model, ids, "warmup", model.pattern, True, indexer_backward_scale=scale)
        if scale is None:
            (0.5 * il).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_synthetic_mix_replaces_part_of_each_batch(tmp_path, monkeypatch):
    from indexcache.train import trainer

    _data(tmp_path)
    calls = []
    real = trainer.retrieval_batch

    def spy(stream, tok, n, seq_len, seed, step, salt=1, **kw):
        calls.append((n, step, salt))
        return real(stream, tok, n, seq_len, seed, step, salt, **kw)

    monkeypatch.setattr(trainer, "retrieval_batch", spy)
    with pytest.raises(ValueError, match="synthetic-mix"):
        train(_cfg(tmp_path, "bad", "dense", synthetic_mix=1.5))
    out = train(_cfg(tmp_path, "mix", "dense", steps=4, seq_len=256, batch_size=4, synthetic_mix=0.5))
    assert [c for c in calls if c[2] == 1] == [(2, s, 1) for s in range(4)]  # 2 of 4 rows, every step
    # the held-out retrieval windows are built once: the first kinds (salt 2) and the later ones (salt 3)
    assert [c[2] for c in calls].count(2) == 1 and [c[2] for c in calls].count(3) == 1
    for suffix in ("", "_new"):
        acc = out["final_eval"]["heldout_answer_acc" + suffix]
        assert 0.0 <= acc <= 1.0 and out["final_eval"]["heldout_answer_loss" + suffix] > 0


@interpreter
def test_training_on_the_kernel_backend_keeps_every_gradient():
    """A model on the triton backend (as training on a GPU runs) trains through the plain ops: the gradients of
    a sparse forward without a distillation collector, where the sparse kernel would otherwise run, equal the
    torch backend's; and the no-grad selection takes the kernels."""
    from indexcache.model.dsa import DSAForCausalLM
    from indexcache.ops.triton_support import LAST_COMPILED
    from indexcache.presets import preset_config

    cfg = preset_config("tiny", kv_lora_rank=32, qk_rope_head_dim=16, index_topk=8, num_hidden_layers=4,
                        first_k_dense_replace=1, index_n_heads=16)  # shapes the kernels take
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    grads = []
    for backend in ("torch", "triton"):
        model = DSAForCausalLM(cfg).init_random(0, std=0.1)
        model.set_backend(backend)
        LAST_COMPILED.clear()
        model(ids).float().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if backend == "triton":
            assert any(name.startswith("topk") for name in LAST_COMPILED)  # the selection ran on a kernel
            assert "sparse_mla" not in LAST_COMPILED and not any(n.startswith("moe") for n in LAST_COMPILED)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n
