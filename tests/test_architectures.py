"""DeepSeek-V4, GLM-5.3 (glm5_next) and MiniMax-M3 through transformers' own classes: tiny random checkpoints
built and saved by transformers, several seeds. All-Full equals the unpatched model bit for bit; a Shared
indexer layer selects exactly what its source selected and attends as if that selection were forced in;
remove_pattern restores the logits; the greedy search equals a brute-force one; every command runs; bad
input gets one line."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
import torch.nn.functional as F

from indexcache import Pattern
from indexcache.architectures import model_info
from indexcache.cli import main
from indexcache.integrations.transformers import (
    TransformersRunner,
    apply_pattern,
    decoder_layers,
    load_pretrained,
    remove_pattern,
)
from indexcache.integrations.transformers.patterns import holder
from indexcache.search import LossEvaluator, greedy_search

transformers = pytest.importorskip("transformers")
ARCHS = tiny.NEW_ARCHS
ALL = tiny.ALL_ARCHS  # the exactness tests and the distributed search run on all five
SEQ = 96  # V4: 24 compressed entries against top-4; GLM-5.3: 96 tokens against 16 (+ tail); MiniMax: 12 blocks of 8


@pytest.fixture(scope="module", params=[(a, s) for a in ALL for s in (1, 2)], ids=lambda p: f"{p[0]}-{p[1]}")
def ckpt(request, tmp_path_factory):
    arch, seed = request.param
    d = tmp_path_factory.mktemp(f"{arch}{seed}") / "m"
    tiny.save_new(tiny.any_model(arch, seed=seed), d)
    return arch, seed, d


def _ids(seed: int, n: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(1, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _plain(arch: str, d):
    """The checkpoint in its transformers class, untouched by this package."""
    cls = {"deepseek_v4": transformers.DeepseekV4ForCausalLM, "minimax_m3": transformers.MiniMaxM3VLForCausalLM,
           "glm5_next": transformers.Glm5NextForConditionalGeneration,
           "deepseek_v32": transformers.DeepseekV32ForCausalLM, "glm_moe_dsa": transformers.GlmMoeDsaForCausalLM}[arch]
    return cls.from_pretrained(str(d)).eval()


def _runner_logits(runner, ids, pattern) -> torch.Tensor:
    state, _ = runner.run(runner.start(ids), pattern, 0, runner.num_layers)
    return runner.logits(state)


# ------------------------------------------------------------------------------------ exactness
def test_all_full_equals_the_unpatched_model_bit_for_bit(ckpt):
    arch, seed, d = ckpt
    ids = _ids(seed)
    with torch.no_grad():
        ref = _plain(arch, d)(input_ids=ids, use_cache=False).logits
    hf = load_pretrained(d)
    runner = TransformersRunner(hf)
    assert runner.slots == tiny.INDEXER_LAYERS[arch]
    full = Pattern.all_full(len(runner.slots))
    assert torch.equal(_runner_logits(runner, ids, full), ref)  # layer by layer, as the toolkit runs it
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids, use_cache=False).logits, ref)  # the loaded model's own forward
    loss = LossEvaluator(runner, [ids[:1], ids[1:]]).loss(full)
    want = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(want, rel=1e-6)


def test_shared_layers_reuse_their_source_and_attend_with_it(ckpt):
    arch, seed, d = ckpt
    ids = _ids(seed + 10, n=1)
    hf = load_pretrained(d)
    runner = TransformersRunner(hf)
    pattern = Pattern("FSFS")
    state = runner.start(ids)
    states, chosen = [state], {}
    for i in range(runner.num_layers):
        state, sel = runner.run(state, pattern, i, i + 1, selections=True)
        states.append(state)
        chosen.update(sel)
    slots = runner.slots
    for pos in pattern.shared_layers:
        source = slots[pattern.source_layer(pos)]
        assert torch.equal(chosen[slots[pos]], chosen[source])  # the very selection of its source
    full_sel = runner.run(runner.start(ids), Pattern.all_full(4), 0, runner.num_layers, selections=True)[1]
    assert any(not torch.equal(full_sel[slots[p]], chosen[slots[p]]) for p in pattern.shared_layers)  # it matters
    # each Shared layer's output equals running that layer, on the same input, with the source's selection forced
    remove_pattern(hf)
    layers = decoder_layers(hf)
    for pos in pattern.shared_layers:
        layer, source = slots[pos], slots[pattern.source_layer(pos)]
        h = holder(hf, layer)
        real = h.indexer

        class Forced(type(real) if arch == "minimax_m3" else torch.nn.Module):
            def __init__(self, selection: torch.Tensor):
                torch.nn.Module.__init__(self)
                self.selection = selection

            def forward(self, *a, **k):
                return self.selection

        forced = Forced(chosen[source].to(torch.int32 if arch == "glm5_next" else torch.long))
        if arch == "minimax_m3":  # the attention also asks the indexer for its block mask
            forced.block_size, forced.config = real.block_size, real.config
        h.indexer = forced
        try:
            extra = {"prev_topk_indices": None} if arch == "glm5_next" else {}
            with torch.no_grad():
                out = layers[layer](states[layer].hidden, **extra, **states[layer].extra)
            out = out[0] if isinstance(out, tuple) else out
        finally:
            h.indexer = real
        assert torch.equal(out, states[layer + 1].hidden), (arch, layer)


def test_remove_pattern_restores_the_logits_bit_for_bit(ckpt):
    arch, seed, d = ckpt
    ids = _ids(seed + 20)
    hf = load_pretrained(d)
    with torch.no_grad():
        base = hf(input_ids=ids, use_cache=False).logits
        for p in ("FSFS", "FFSS", "FSSS"):
            apply_pattern(hf, p, drop_shared_indexers=False)
            assert not torch.equal(hf(input_ids=ids, use_cache=False).logits, base)
        remove_pattern(hf)
        assert torch.equal(hf(input_ids=ids, use_cache=False).logits, base)


def _brute_force(hf, batches, n, target):
    """Algorithm 1 with full forwards of the patched transformers model: min loss, ties to the lowest layer."""
    pat = ["F"] * n
    traj = []

    def loss(p):
        apply_pattern(hf, p, drop_shared_indexers=False)
        total = count = 0
        with torch.no_grad():
            for ids in batches:
                logits = hf(input_ids=ids, use_cache=False).logits
                total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        return total / count

    while pat.count("F") > target:
        scored = [(loss("".join(pat[:i] + ["S"] + pat[i + 1:])), i) for i in range(1, n) if pat[i] == "F"]
        best_loss, best = min(scored)
        pat[best] = "S"
        traj.append(("".join(pat), best, best_loss))
    return traj


def test_greedy_equals_brute_force(ckpt):
    arch, seed, d = ckpt
    batches = [_ids(seed + 30 + i, n=1) for i in range(2)]
    res = greedy_search(LossEvaluator(TransformersRunner(load_pretrained(d)), batches), progress=False)
    naive = _brute_force(load_pretrained(d), batches, 4, 1)
    assert [(str(e.pattern), e.flipped) for e in res.trajectory] == [(p, f) for p, f, _ in naive]
    for e, (_, _, loss) in zip(res.trajectory, naive, strict=True):
        assert e.loss == pytest.approx(loss, rel=1e-5)
    assert res.counters["ratio_vs_naive"] < 1.0  # the prefix cache works across layers without an indexer


# ----------------------------------------------------------------------------------- the commands
def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for arch in ALL:
        d = tmp_path_factory.mktemp(arch) / "m"
        tiny.save_new(tiny.any_model(arch, seed=3), d)
        out[arch] = d
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_info_and_pattern_name_the_indexer_layers(capsys, dirs, arch):
    d = dirs[arch]
    layers = tiny.INDEXER_LAYERS[arch]
    rc, out, err = run(capsys, "pattern", "--model", d)
    assert rc == 0, err
    assert f"decoder layers {','.join(map(str, layers))}".replace("1,2", "1-2").replace("4,5", "4-5").replace(
        "3,4", "3-4") in out
    rc, out, _ = run(capsys, "pattern", "FSFS", "--model", d, "--json")
    info = json.loads(out)
    expected = ["-"] * model_info(d).num_layers
    for layer, c in zip(layers, "FSFS", strict=True):
        expected[layer] = c
    assert info["indexer_layers"] == layers and info["decoder_layers"] == "".join(expected)
    assert {e["engine"] for e in info["engines"]} == {"vLLM", "SGLang", "transformers"}
    rc, out, err = run(capsys, "info", d, "--pattern", "FSFS")
    assert rc == 0 and "indexer layers" in out and "per decoder layer" in out, err


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_search_overlap_eval_export(capsys, dirs, arch, tmp_path):
    d = dirs[arch]
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. " * 40)
    rc, out, err = run(capsys, "loss", d, "--data", text, "--seq-len", SEQ, "--pattern", "all-full", "--pattern",
                       "FSFS", "--json")
    assert rc == 0, err
    res = json.loads(out)["results"]
    assert res[0]["loss"] != res[1]["loss"]
    common = ["--data", text, "--num-samples", 2, "--seq-len", SEQ]
    rc, out, err = run(capsys, "search", d, *common, "--num-full", 2, "--stages", 2, "--to-end", "--out",
                       tmp_path / "s")
    assert rc == 0, err
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["backend"]["name"] == "hf" and rep["indexer_layers"] == tiny.INDEXER_LAYERS[arch]
    # what it prints is this architecture's patch and flags, the same as the report's and the pattern command's
    assert json.dumps(rep["selected"]["config_patch"]) in out and f"per decoder layer ('-': no indexer): " \
        f"{rep['selected']['decoder_layers']}" in out
    assert all((e["flag"] or "(no flag)") in out for e in rep["selected"]["engines"])
    assert rep["forced_full"] == [0, 2] and rep["baselines"]["uniform"]
    assert len(rep["selected"]["decoder_layers"]) == model_info(d).num_layers
    # a finished run resumes without recomputing (same report), and the state is refused for other settings
    rc, _, err = run(capsys, "search", d, *common, "--num-full", 2, "--stages", 2, "--to-end", "--out", tmp_path / "s",
                     "--resume")
    assert rc == 0 and json.loads((tmp_path / "s" / "report.json").read_text())["trajectory"] == rep["trajectory"]
    rc, out, err = run(capsys, "overlap", d, *common, "--out", tmp_path / "o")
    assert rc == 0, err
    ov = json.loads((tmp_path / "o" / "overlap.json").read_text())
    assert ov["num_layers"] == 4 and 0 < ov["min_overlap"] <= 1
    if arch == "minimax_m3":
        assert len(ov["per_head"]) == 2  # one selection per indexer head
    rc, out, err = run(capsys, "eval", d, "--pattern", "all-full", "--pattern", "FSFS", "--tasks", "niah_single",
                       "--lengths", 400, "--samples", 1, "--ppl-data", text, "--quiet", "--out", tmp_path / "e.json")
    assert rc == 0, err
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["backend"] == "hf" and len(ev["results"]) == 2 and all(r["ppl"] for r in ev["results"])
    rc, out, err = run(capsys, "export", d, "--pattern", "FSFS", "--drop-shared-indexers", "--out", tmp_path / "x")
    assert rc == 0, err
    info = model_info(tmp_path / "x")
    assert str(info.pattern) == "FSFS"
    hf = load_pretrained(tmp_path / "x")  # a native IndexShare checkpoint: its own pattern, weights on Full only
    assert TransformersRunner(hf).indexer_layers == [0, 2]
    rc, _, err = run(capsys, "search", tmp_path / "x", *common, "--num-full", 1, "--baselines", "none", "--out",
                     tmp_path / "s2")
    assert rc == 0, err
    assert json.loads((tmp_path / "s2" / "report.json").read_text())["start_pattern"] == "FSFS"
    rc, _, err = run(capsys, "loss", tmp_path / "x", "--data", text, "--seq-len", SEQ, "--pattern", "FFFS")
    assert rc == 2 and "are Full but the checkpoint has no indexer weights" in err and "decoder layers" in err
    rc, _, err = run(capsys, "generate", d, "--prompt-file", text, "--max-new-tokens", 2)
    assert rc == 2 and "use transformers' generate" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("arch", ARCHS)
def test_bad_patterns_name_the_indexer_layers(capsys, dirs, arch):
    d = dirs[arch]
    info = model_info(d)
    rc, _, err = run(capsys, "pattern", "FSF", "--model", d)
    assert rc == 2 and "wrong length" in err and "4 layers with an indexer" in err and "decoder layers" in err
    assert err.count("\n") == 1
    rc, _, err = run(capsys, "pattern", "SFFF", "--model", d)
    assert rc == 2 and "layer 0 is Shared" in err
    bad = info.decoder_form(Pattern("FFFF")).replace("-", "F", 1)  # a layer without an indexer marked Full
    rc, _, err = run(capsys, "pattern", bad, "--model", d)
    assert rc == 2 and "own no indexer" in err
    rc, out, _ = run(capsys, "pattern", info.decoder_form(Pattern("FSFS")), "--model", d, "--json")
    assert rc == 0 and json.loads(out)["pattern"] == "FSFS"  # the per-decoder-layer form is accepted


def test_unknown_architecture_lists_the_supported_ones(capsys, tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    rc, _, err = run(capsys, "pattern", "--model", d)
    assert rc == 2 and "unknown architecture ['LlamaForCausalLM']" in err
    for name in ("DeepseekV4ForCausalLM", "Glm5NextForConditionalGeneration", "MiniMaxM3VLForCausalLM",
                 "DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM"):
        assert name in err


def test_calibration_too_short_for_the_unit(capsys, dirs, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("words and more words " * 200)
    # DeepSeek-V4: 16 tokens are 4 compressed entries, no more than the 4 a query keeps
    rc, _, err = run(capsys, "search", dirs["deepseek_v4"], "--data", text, "--seq-len", 16, "--out", tmp_path / "s")
    assert rc == 2 and "(4 compressed entries)" in err and "a query keeps 4 compressed entries of 4 tokens" in err
    rc, _, err = run(capsys, "search", dirs["minimax_m3"], "--data", text, "--seq-len", 24, "--out", tmp_path / "s")
    assert rc == 2 and "3 key blocks of 8 tokens per indexer head" in err


@pytest.mark.parametrize("arch", ALL)
def test_two_gloo_processes_split_candidates_like_one(dirs, arch, tmp_path):
    import os
    import subprocess
    import sys

    text = tmp_path / "doc.txt"
    text.write_text("A long sentence about rivers, mountains and the sea, told again and again. " * 40)
    common = ["search", dirs[arch], "--data", text, "--num-samples", 2, "--seq-len", SEQ, "--num-full", 2,
              "--baselines", "none"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    one = subprocess.run([sys.executable, "-m", "indexcache.cli", *map(str, common), "--out", tmp_path / "one"],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    # --standalone: torchrun picks a free port (fixed ports collide with sockets of an earlier run)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "indexcache.cli", *map(str, common), "--out", tmp_path / "two"], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / k / "report.json").read_text()) for k in ("one", "two"))
    assert a["trajectory"] == b["trajectory"] and a["all_full_loss"] == b["all_full_loss"]
    assert a["counters"]["evaluations"] == b["counters"]["evaluations"]


# ------------------------------------------------- DeepSeek-V3.2 and GLM-5.x: the same commands, native model
@pytest.mark.parametrize("arch", ["deepseek_v32", "glm_moe_dsa"])
def test_every_command_on_the_native_architectures(capsys, arch, tmp_path):
    d = tmp_path / "m"
    tiny.save_new(tiny.hf_model(arch, seed=4, vocab_size=256), d)
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. " * 40)
    rc, out, err = run(capsys, "info", d)
    assert rc == 0 and "6 layers" in out, err
    rc, out, err = run(capsys, "pattern", "FSSFSS", "--model", d, "--json")
    assert rc == 0 and json.loads(out)["pattern"] == "FSSFSS", err
    assert json.loads(out)["indexer_layers"] == list(range(6))
    rc, _, err = run(capsys, "pattern", "FSF", "--model", d)
    assert rc == 2 and "wrong length" in err and "6 layers with an indexer" in err
    rc, out, err = run(capsys, "loss", d, "--data", text, "--seq-len", 48, "--pattern", "all-full", "--pattern",
                       "FSSFSS", "--json")
    assert rc == 0, err
    common = ["--data", text, "--num-samples", 2, "--seq-len", 48]
    rc, _, err = run(capsys, "search", d, *common, "--num-full", 2, "--out", tmp_path / "s")
    assert rc == 0, err
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["backend"]["name"] == "native" and rep["baselines"]["uniform"]
    rc, _, err = run(capsys, "search", d, *common, "--num-full", 2, "--backend", "hf", "--baselines", "none",
                     "--out", tmp_path / "h")
    assert rc == 0, err
    via_hf = json.loads((tmp_path / "h" / "report.json").read_text())["trajectory"]
    assert [t["pattern"] for t in via_hf] == [t["pattern"] for t in rep["trajectory"]]  # fp32 rounding apart
    assert [t["loss"] for t in via_hf] == pytest.approx([t["loss"] for t in rep["trajectory"]], abs=1e-5)
    rc, _, err = run(capsys, "overlap", d, *common, "--out", tmp_path / "o")
    assert rc == 0 and json.loads((tmp_path / "o" / "overlap.json").read_text())["num_layers"] == 6, err
    rc, _, err = run(capsys, "eval", d, "--pattern", "all-full", "--pattern", "FSSFSS", "--tasks", "niah_single",
                     "--lengths", 200, "--samples", 1, "--ppl-data", text, "--quiet", "--out", tmp_path / "e.json")
    assert rc == 0 and len(json.loads((tmp_path / "e.json").read_text())["results"]) == 2, err
    rc, _, err = run(capsys, "export", d, "--pattern", "FSSFSS", "--out", tmp_path / "x")
    assert rc == 0 and str(model_info(tmp_path / "x").pattern) == "FSSFSS", err
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox")
    rc, out, err = run(capsys, "generate", tmp_path / "x", "--prompt-file", prompt, "--max-new-tokens", 3,
                       "--device", "cpu")
    assert rc == 0 and out.strip(), err
