"""IndexCache in transformers' own models (integrations.transformers) and the search over them (--backend hf).

Patched transformers models against load_model with the same pattern, for both architectures; chunked
indexer scoring against transformers' dense scoring (logits, top-k sets, padding, KV cache); the HF
search backend against the native one; native patterns; and the memory of 16K-token scoring."""

import json
import os
import random
import subprocess
import sys
import textwrap
import weakref

import pytest
import tiny
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from indexcache import CheckpointError, Pattern, PatternError, load_model, save_model
from indexcache.cli import main
from indexcache.integrations.transformers import (
    HFModelError,
    SharedIndexer,
    TransformersRunner,
    apply_pattern,
    dense_indexer_bytes,
    load_hf_for_search,
    load_pretrained,
    masked_indexer_topk,
    patch_indexer_scoring,
    remove_pattern,
    unpatch_indexer_scoring,
)
from indexcache.presets import make_random_checkpoint
from indexcache.search import LossEvaluator, greedy_search

transformers = pytest.importorskip("transformers")

ARCHS = ["glm_moe_dsa", "deepseek_v32"]
SEQ = 40  # > 4 x index_topk (8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared machine each parallel region of a busy
    2-thread pool can stall for milliseconds; the memory test's subprocess keeps 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(seed=0, seq=SEQ, batch=2, vocab=128):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _random_pattern(n, seed):
    r = random.Random(seed)
    return "F" + "".join(r.choice("FS") for _ in range(n - 1))


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request, tmp_path_factory):
    """An all-Full transformers checkpoint of each architecture (random weights, written by transformers)."""
    d = tmp_path_factory.mktemp(request.param)
    tiny.save_hf(tiny.hf_model(request.param, seed=3), d)
    return request.param, d


def _hf(arch, d):
    cls = transformers.GlmMoeDsaForCausalLM if arch == "glm_moe_dsa" else transformers.DeepseekV32ForCausalLM
    return cls.from_pretrained(str(d)).eval()


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# ------------------------------------------------------------------------------------- apply_pattern
@pytest.mark.parametrize("pattern", ["FSSSSS", "FFSSSF", "FSFSFS", _random_pattern(6, 1), _random_pattern(6, 5)])
def test_apply_pattern_equals_native(arch_dir, pattern):
    arch, d = arch_dir
    hf = _hf(arch, d)
    ids = _ids(1)
    full = _logits(hf, ids)
    assert apply_pattern(hf, pattern) == pattern
    out = _logits(hf, ids)
    with torch.no_grad():
        ref = load_model(d, pattern=pattern, verbose=False)(ids)
    assert (out - ref).abs().max().item() < 1e-4
    assert (out - full).abs().max().item() > 1e-2  # the pattern really changed the computation
    assert hf.config.indexer_types == Pattern.parse(pattern).indexer_types
    assert hf.config.index_topk_pattern == pattern
    for i, layer in enumerate(hf.model.layers):
        ind = layer.self_attn.indexer
        if pattern[i] == "F":
            assert ind is not None and not isinstance(ind, SharedIndexer)
        elif arch == "glm_moe_dsa":
            assert ind is None  # transformers' own sharing
        else:
            assert isinstance(ind, SharedIndexer) and not list(ind.parameters())
    shared_keys = [k for k in hf.state_dict() if ".indexer." in k and pattern[int(k.split(".")[2])] == "S"]
    assert shared_keys == []  # drop_shared_indexers=True: no weights left on Shared layers


def test_all_full_pattern_changes_nothing(arch_dir):
    arch, d = arch_dir
    hf = _hf(arch, d)
    ids = _ids(2)
    before = _logits(hf, ids)
    apply_pattern(hf, "FFFFFF")
    assert torch.equal(_logits(hf, ids), before)
    with torch.no_grad():
        assert (before - load_model(d, verbose=False)(ids)).abs().max().item() < 1e-4


def test_patterns_switch_and_restore(arch_dir):
    arch, d = arch_dir
    hf = _hf(arch, d)
    ids = _ids(3)
    original = _logits(hf, ids)
    types_before = list(hf.config.indexer_types) if arch == "glm_moe_dsa" else None
    seen = {}
    for p in ["FSSFSS", "FFSFSF", "FSSFSS", "FSFSFS", "FFSFSF"]:
        apply_pattern(hf, p, drop_shared_indexers=False)
        out = _logits(hf, ids)
        if p in seen:  # idempotent: the same pattern gives the same logits, however it was reached
            assert torch.equal(out, seen[p])
        seen[p] = out
        for layer in hf.model.layers:
            ind = layer.self_attn.indexer
            if ind is not None:
                assert len(ind._forward_hooks) <= 1  # re-applying never stacks hooks
    apply_pattern(hf, "FFFFFF", drop_shared_indexers=False)
    assert torch.equal(_logits(hf, ids), original)
    remove_pattern(hf)
    remove_pattern(hf)  # a model that is not patched is left alone
    assert torch.equal(_logits(hf, ids), original)
    assert all(not isinstance(layer.self_attn.indexer, SharedIndexer) for layer in hf.model.layers)
    if arch == "glm_moe_dsa":
        assert hf.config.indexer_types == types_before
    else:
        assert not hasattr(hf.config, "indexer_types") or hf.config.indexer_types is None
        assert all(not m._forward_hooks for m in hf.model.layers.modules())


def test_errors(arch_dir):
    arch, d = arch_dir
    hf = _hf(arch, d)
    with pytest.raises(PatternError, match="wrong length"):
        apply_pattern(hf, "FSF")
    with pytest.raises(PatternError, match="layer 0 is Shared"):
        apply_pattern(hf, "SFFFFF")
    apply_pattern(hf, "FSFSFS")  # drops the indexers of layers 1, 3, 5
    with pytest.raises(PatternError, match="layers 1,3 are Full but the model holds no indexer"):
        apply_pattern(hf, "FFFFFS")
    with pytest.raises(HFModelError, match="cannot restore layers 1,3,5"):
        remove_pattern(hf)
    with pytest.raises(HFModelError, match="Linear is not a DSA model"):
        apply_pattern(torch.nn.Linear(2, 2), "F")
    with pytest.raises(HFModelError, match="unknown scoring mode"):
        patch_indexer_scoring(hf, scoring="int4")


# ------------------------------------------------------------------------------------------- scoring
def _record_indexers(hf):
    """Collect each indexer's output per call, in layer order."""
    got, handles = [], []
    for i, layer in enumerate(hf.model.layers):
        ind = layer.self_attn.indexer
        if ind is not None and not isinstance(ind, SharedIndexer):
            handles.append(ind.register_forward_hook(lambda m, a, out, i=i: got.append((i, out.clone()))))
    return got, handles


def _visible_sets(indices, visible):
    """Per query, the set of selected key slots it can see (what its attention actually uses)."""
    out = []
    for b in range(indices.shape[0]):
        for s in range(indices.shape[1]):
            out.append({int(t) for t in indices[b, s] if visible[b, s, int(t)]})
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_patched_scoring_equals_dense(arch_dir, padded):
    arch, d = arch_dir
    hf = _hf(arch, d)
    apply_pattern(hf, "FFSFSS")
    ids = _ids(4, seq=48, batch=3)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0  # left padding: those keys must never be selected
        mask[2, :30] = 0
    got, handles = _record_indexers(hf)
    ref = _logits(hf, ids, attention_mask=mask)
    dense = list(got)
    got.clear()
    assert patch_indexer_scoring(hf, budget_bytes=3000) == 3  # a few query rows per chunk
    assert patch_indexer_scoring(hf, budget_bytes=3000) == 3  # idempotent
    out = _logits(hf, ids, attention_mask=mask)
    assert (out - ref).abs().max().item() < 1e-5
    t = torch.arange(48)
    visible = (t.view(1, 1, -1) <= t.view(1, -1, 1)) & mask.bool().view(3, 1, 48)
    assert [i for i, _ in got] == [i for i, _ in dense] == [0, 1, 3]
    for (_, a), (_, b) in zip(dense, got, strict=True):
        assert a.dtype == b.dtype == torch.int32 and a.shape == b.shape
        assert _visible_sets(a, visible) == _visible_sets(b, visible)
    for h in handles:
        h.remove()
    assert unpatch_indexer_scoring(hf) == 3
    assert torch.equal(_logits(hf, ids, attention_mask=mask), ref)


def test_patched_scoring_with_kv_cache(arch_dir):
    """Decoding with a cache: queries sit after T - S cached keys; Shared layers reuse the step's indices."""
    arch, d = arch_dir
    hf = _hf(arch, d)
    apply_pattern(hf, "FSFSSF")
    prompt = _ids(5, seq=20, batch=1)
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        dense = hf.generate(prompt, **kw)
        patch_indexer_scoring(hf, budget_bytes=2000)
        chunked = hf.generate(prompt, **kw)
    assert torch.equal(dense.sequences, chunked.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dense.logits, chunked.logits, strict=True)) < 1e-5


def test_fp8_scoring_equals_native(arch_dir):
    arch, d = arch_dir
    hf = _hf(arch, d)
    apply_pattern(hf, "FFSFSF")
    patch_indexer_scoring(hf, scoring="fp8")
    ids = _ids(6)
    with torch.no_grad():
        ref = load_model(d, pattern="FFSFSF", scoring="fp8", verbose=False)(ids)
        exact = load_model(d, pattern="FFSFSF", verbose=False)(ids)
    out = _logits(hf, ids)
    assert (out - ref).abs().max().item() < 1e-4
    assert (out - exact).abs().max().item() > 1e-3  # fp8 selection differs from fp32 on these weights


# -------------------------------------------------------------------------------------------- search
def _batches(seed, n=2, seq=24):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randint(0, 300, (1, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_search_equals_native(tmp_path, arch):
    d = make_random_checkpoint(tmp_path / "m", arch, "tiny", seed=1, num_hidden_layers=7, first_k_dense_replace=2)
    batches = _batches(1)
    native = greedy_search(LossEvaluator(load_model(d, verbose=False), batches), target_full=2, progress=False)
    m = load_hf_for_search(str(d))
    assert m.pattern == "F" * 7
    ev = LossEvaluator(m.runner(), batches)
    assert isinstance(ev.runner, TransformersRunner)
    res = greedy_search(ev, target_full=2, progress=False)
    assert [(e.pattern, e.flipped) for e in res.trajectory] == [(e.pattern, e.flipped) for e in native.trajectory]
    for a, b in zip(res.trajectory, native.trajectory, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert res.counters == native.counters  # same prefix reuse
    assert res.counters["ratio_vs_naive"] < 0.6
    # the evaluator's layer-by-layer run with prefix reuse equals a plain forward of the patched model
    p = res.trajectory[-1].pattern
    ev_loss = ev.loss(p)
    assert LossEvaluator(TransformersRunner(m.hf), batches, reuse=False).loss(p) == ev_loss  # prefix reuse is exact
    apply_pattern(m.hf, p, drop_shared_indexers=False)
    total = 0.0
    for ids in batches:
        logits = _logits(m.hf, ids)
        total += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
    assert ev_loss == pytest.approx(total / sum(b.shape[1] - 1 for b in batches), rel=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_native_pattern_is_respected(tmp_path, arch):
    """A checkpoint with indexer weights only on its Full layers: only those can be Full or be flipped."""
    src = make_random_checkpoint(tmp_path / "src", arch, "tiny", seed=2, num_hidden_layers=6)
    native_pattern = "FFSFSF"
    d = save_model(load_model(src, verbose=False), tmp_path / "native", pattern=native_pattern,
                   drop_shared_indexers=True, copy_tokenizer_from=src)
    hf = load_pretrained(d)
    assert [layer.self_attn.indexer is None or isinstance(layer.self_attn.indexer, SharedIndexer)
            for layer in hf.model.layers] == [c == "S" for c in native_pattern]
    ids = _ids(7, vocab=300)
    with torch.no_grad():
        assert (_logits(hf, ids) - load_model(d, verbose=False)(ids)).abs().max().item() < 1e-4
    with pytest.raises(CheckpointError, match="layers 2,4 are Full but the checkpoint has no indexer weights"):
        load_pretrained(d, pattern="FFFFFF")
    m = load_hf_for_search(str(d))
    assert m.pattern == native_pattern
    batches = _batches(2)
    res = greedy_search(LossEvaluator(m.runner(), batches), start=m.pattern, progress=False)
    assert {e.flipped for e in res.trajectory} == {1, 3, 5}
    ref = greedy_search(LossEvaluator(load_model(d, verbose=False), batches), start=Pattern.parse(native_pattern),
                        progress=False)
    assert [e.pattern for e in res.trajectory] == [e.pattern for e in ref.trajectory]
    with pytest.raises(PatternError, match="layers 2 are Full"):
        LossEvaluator(m.runner(), batches).loss(Pattern.parse("FFFFSF"))


def test_cli_search_backend_hf(capsys, tmp_path):
    d = make_random_checkpoint(tmp_path / "m", "glm_moe_dsa", "tiny", seed=4)
    common = [str(d), "--num-samples", "2", "--seq-len", "24", "--keep", "0.5", "--baselines", "uniform,similarity"]
    assert main(["search", *common, "--out", str(tmp_path / "native")]) == 0
    assert main(["search", *common, "--out", str(tmp_path / "hf"), "--backend", "hf"]) == 0
    a = json.loads((tmp_path / "native" / "report.json").read_text())
    b = json.loads((tmp_path / "hf" / "report.json").read_text())
    assert [e["pattern"] for e in a["trajectory"]] == [e["pattern"] for e in b["trajectory"]]
    assert a["selected"]["pattern"] == b["selected"]["pattern"]
    assert [u["loss"] for u in a["baselines"]["uniform"]] == pytest.approx(
        [u["loss"] for u in b["baselines"]["uniform"]], rel=1e-5)
    assert b["baselines"]["similarity"] == {"skipped": "runs on the native backend only"}
    assert b["backend"]["name"] == "hf" and b["backend"]["placement"]["device_map"] is None
    assert set(b["backend"]["placement"]["modules"].values()) == {"cpu"}
    assert len(b["backend"]["placement"]["modules"]) == 6 + 2  # embedding, 6 layers, head
    capsys.readouterr()
    rc = main(["search", *common, "--out", str(tmp_path / "x"), "--backend", "native", "--device-map", "auto"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device-map spreads a transformers model: it needs --backend hf" in err
    assert err.count("\n") == 1


def test_device_map_with_accelerate(tmp_path):
    """A device_map through accelerate's hooks (here: half the layers offloaded to disk, the only second
    "device" a CPU machine has): the chunked scoring is installed under the hooks, and the search agrees."""
    pytest.importorskip("accelerate")
    d = make_random_checkpoint(tmp_path / "m", "deepseek_v32", "tiny", seed=1)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(6)}}
    (tmp_path / "dm.json").write_text(json.dumps(dm))
    m = load_hf_for_search(str(d), device_map=str(tmp_path / "dm.json"))
    assert m.placement()["modules"]["layers.4"] == "meta" and m.placement()["device_map"]["model.layers.4"] == "disk"
    assert all(layer.self_attn.indexer.__dict__.get("_indexcache_scoring") for layer in m.hf.model.layers)
    batches = _batches(3)
    res = greedy_search(LossEvaluator(m.runner(), batches), target_full=2, progress=False)
    ref = greedy_search(LossEvaluator(load_model(d, verbose=False), batches), target_full=2, progress=False)
    assert [e.pattern for e in res.trajectory] == [e.pattern for e in ref.trajectory]


# -------------------------------------------------------------------------------------------- memory
class _AllocationTracker(TorchDispatchMode):
    """Bytes of tensor storage allocated by the ops run inside it: the peak of what is alive at once, and
    the largest single allocation. Views and in-place results share a storage already counted; a
    storage is released when the last tensor using it dies. Works on the meta device (nothing is
    computed), so a 16K-token forward of the dense version can be measured without 130 GiB."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = self.largest = 0
        for t in existing:
            t.untyped_storage()._counted = True  # weights and inputs were there before

    def _release(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if getattr(storage, "_counted", False):
                    continue
                storage._counted = True
                n = storage.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, n)
                weakref.finalize(storage, self._release, n)
        return out


# DeepSeek-V3.2's indexer (64 heads x 128, RoPE on 64 dims, top-2048) on a 2-layer, narrow model
V32_INDEXER_DIMS = dict(
    vocab_size=128, hidden_size=128, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=1, num_key_value_heads=1, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
    qk_rope_head_dim=64, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
    index_topk=2048, index_head_dim=128, index_n_heads=64, first_k_dense_replace=2,
)


def _meta_forward(seq, patched, budget=256 << 20):
    """Allocation tracking of one forward on the meta device, and of the Full layer's indexer call alone."""
    with torch.device("meta"):
        hf = transformers.DeepseekV32ForCausalLM(
            transformers.DeepseekV32Config(**V32_INDEXER_DIMS, max_position_embeddings=seq)).eval()
    apply_pattern(hf, "FS")
    if patched:
        patch_indexer_scoring(hf, budget_bytes=budget)
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    tr = _AllocationTracker([*hf.parameters(), *hf.buffers(), ids])
    inside = {}

    def enter(*_):  # measure the indexer call on its own: its peak above what was alive when it started
        inside.update(start=tr.live, outer_peak=tr.peak, outer_largest=tr.largest)
        tr.peak, tr.largest = tr.live, 0

    def leave(*_):
        inside.update(peak=tr.peak, largest=tr.largest)
        tr.peak, tr.largest = max(tr.peak, inside["outer_peak"]), max(tr.largest, inside["outer_largest"])

    ind = hf.model.layers[0].self_attn.indexer
    ind.register_forward_pre_hook(enter)
    ind.register_forward_hook(leave)
    with torch.no_grad(), tr:
        hf(input_ids=ids, logits_to_keep=1)
    return tr, inside


def test_indexer_memory_at_16k_tokens():
    """A 16K-token forward with DeepSeek-V3.2's indexer dims: transformers' scoring allocates the dense
    [1, 16K, 64, 16K] fp32 scores (64 GiB, twice with the ReLU; 129 GiB above the indexer's start). The
    patched indexer allocates nothing larger than its query projection q [1, 16K, 64, 128] (512 MiB in
    fp32, linear in S; its score chunks are [1, 64, 64, 16K], 256 MiB) and peaks about 1.3 GiB above its
    start; the whole forward, transformers' O(S*T) attention masks included, about 4 GiB."""
    seq = 16384
    dense_bytes = dense_indexer_bytes(1, seq, 64)
    q_bytes = seq * 64 * 128 * 4
    assert dense_bytes == 64 << 30
    dense, dense_in = _meta_forward(seq, patched=False)
    ours, ours_in = _meta_forward(seq, patched=True)
    assert dense_in["largest"] >= dense_bytes and dense.peak >= 2 * dense_bytes  # the tracker sees it
    indexer_extra = ours_in["peak"] - ours_in["start"]
    assert ours_in["largest"] <= q_bytes, ours_in
    assert indexer_extra < 2 << 30, indexer_extra
    assert ours.peak < 6 << 30, ours.peak
    # the scoring alone at 64K tokens: 1 TiB dense; the chunked version needs its budget plus the output
    with torch.device("meta"):
        q, w, k = torch.empty(1, 65536, 64, 128), torch.empty(1, 65536, 64), torch.empty(1, 65536, 128)
    with _AllocationTracker([q, w, k]) as tr:
        idx = masked_indexer_topk(q, w, k, 2048, 128**-0.5, None)
    assert idx.shape == (1, 65536, 2048) and idx.dtype == torch.int32
    assert tr.peak < (512 << 20) + 3 * (256 << 20), tr.peak  # int32 indices (512 MiB) + chunk buffers


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers
    from indexcache.integrations.transformers import apply_pattern, patch_indexer_scoring
    torch.set_num_threads(2)
    seq, patched, dims = int(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
    torch.manual_seed(0)
    cfg = transformers.DeepseekV32Config(**dims, max_position_embeddings=seq)
    hf = transformers.DeepseekV32ForCausalLM(cfg).eval()
    apply_pattern(hf, "FS")
    if patched:
        patch_indexer_scoring(hf, budget_bytes=32 << 20)
    ids = torch.randint(0, 128, (1, seq))
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    before = rss("VmRSS:")
    with torch.no_grad():
        hf(input_ids=ids, logits_to_keep=1)
    print(json.dumps({"extra": rss("VmHWM:") - before}))
""")


def _rss_extra(seq, patched):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(seq), "1" if patched else "0",
                        json.dumps(V32_INDEXER_DIMS)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_indexer_memory_measured():
    """Real resident memory of a forward at 2048 tokens (DeepSeek-V3.2 indexer dims): transformers'
    scoring takes more than its dense [1, S, 64, S] scores (1 GiB); the patched scoring, with a 32 MiB
    budget, less than half of that. (At 1536 tokens the patched peak, ~200-300 MiB of allocator and
    transformers' own buffers, sat too close to the bound to be a stable test.)"""
    seq = 2048
    dense_bytes = dense_indexer_bytes(1, seq, 64)
    ours = _rss_extra(seq, patched=True)
    dense = _rss_extra(seq, patched=False)
    assert dense > dense_bytes, (dense, dense_bytes)
    assert ours < dense_bytes / 2, (ours, dense_bytes)
