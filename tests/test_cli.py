"""The command line: pattern tooling, info, loss, random-model, and one-line errors."""

import json

import numpy as np
import pytest

from indexcache import load_model
from indexcache.cli import main
from indexcache.stats import flops


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from indexcache.presets import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "glm_moe_dsa", "tiny", seed=3)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_pattern_command(capsys):
    rc, out, _ = run(capsys, "pattern", "--num-layers", 12, "--freq", 4, "--convention", "glm52")
    assert rc == 0 and "FFFSSSFSSSFS" in out and "glm52 freq=4" in out
    assert "--json-model-override-args '{\"index_topk_pattern\": \"FFFSSSFSSSFS\"}'" in out
    assert "--hf-overrides '{\"use_index_cache\": true, \"index_topk_pattern\": \"FFFSSSFSSSFS\"}'" in out
    rc, out, _ = run(capsys, "pattern", "FSSFSS", "--json")
    d = json.loads(out)
    assert d["num_full"] == 2 and d["blocks"] == ["[0-2]", "[3-5]"] and d["config_patch"]["index_topk_pattern"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pattern", "FSSQ"], "bad character 'Q' at layer 3"),
        (["pattern", "SFFF"], "layer 0 is Shared"),
        (["pattern", "FSF", "--num-layers", "4"], "wrong length"),
        (["pattern", "FSFS", "--stage-starts", "0,3"], "layer 3 starts a pipeline stage but is Shared"),
        (["pattern", "--freq", "4"], "--freq needs the layer count: give --num-layers N or --model DIR"),
    ],
)
def test_pattern_errors(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and message in err and err.count("\n") == 1 and out == ""


def test_pattern_against_model(capsys, tiny_dir):
    rc, out, _ = run(capsys, "pattern", "--model", tiny_dir)
    assert rc == 0 and "FFFFFF" in out
    rc, out, _ = run(capsys, "pattern", "uniform:2", "--model", tiny_dir)
    assert rc == 0 and "FFSFSF" in out


def test_info(capsys, tiny_dir):
    rc, out, _ = run(capsys, "info", tiny_dir, "--context", 1000, "--pattern", "uniform:2")
    assert rc == 0 and "GlmMoeDsaForCausalLM" in out and "FFSFSF" in out and "parameters" in out
    assert "context    1000" in out
    rc, _, err = run(capsys, "info", tiny_dir.parent / "missing")
    assert rc == 2 and "does not exist; give a model directory" in err


def test_flop_model_shares():
    from indexcache import DSAConfig, Pattern

    cfg = DSAConfig.from_dict({"architectures": ["GlmMoeDsaForCausalLM"]})
    full = flops(cfg, 200_000)
    quarter = flops(cfg, 200_000, Pattern.uniform(78, 4))
    L, HI, DI = 200_000, cfg.index_n_heads, cfg.index_head_dim
    per_layer = L * 2 * (cfg.q_lora_rank * HI * DI + cfg.hidden_size * (DI + HI)) + L * (L + 1) / 2 * 2 * HI * (DI + 1)
    assert full["prefill"]["indexer"] == pytest.approx(78 * per_layer)
    assert quarter["prefill"]["indexer"] == pytest.approx(full["prefill"]["indexer"] * 21 / 78)
    assert flops(cfg, 10_000)["prefill"]["indexer_share"] < full["prefill"]["indexer_share"]


def test_loss_on_npy_and_text(capsys, tiny_dir, tmp_path):
    ids = np.random.default_rng(0).integers(0, 300, size=(3, 40))
    np.save(tmp_path / "ids.npy", ids)
    rc, out, _ = run(capsys, "loss", tiny_dir, "--data", tmp_path / "ids.npy", "--seq-len", 40, "--json",
                     "--pattern", "all-full", "--pattern", "FSSSSS")
    res = json.loads(out)
    assert rc == 0 and res["num_seqs"] == 3 and [r["pattern"] for r in res["results"]] == ["FFFFFF", "FSSSSS"]
    assert res["results"][0]["loss"] != res["results"][1]["loss"]  # 40 > index_topk 8: the pattern matters
    # the CLI number is the model's own mean next-token cross-entropy
    import torch
    import torch.nn.functional as F

    model = load_model(tiny_dir, verbose=False)
    t = torch.from_numpy(ids)
    with torch.no_grad():
        logits = model(t)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1)).item()
    assert res["results"][0]["loss"] == pytest.approx(want, rel=1e-5)

    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rc, out, _ = run(capsys, "loss", tiny_dir, "--data", tmp_path / "doc.txt", "--seq-len", 64)
    assert rc == 0 and "sequences x 64 tokens" in out and "FFFFFF" in out

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "abc " * 50}) + "\n" + json.dumps({"txt": 1}) + "\n")
    rc, _, err = run(capsys, "loss", tiny_dir, "--data", tmp_path / "d.jsonl", "--seq-len", 16)
    assert rc == 2 and "d.jsonl:2 has no string 'text' field" in err
    rc, _, err = run(capsys, "loss", tiny_dir, "--data", tmp_path / "ids.npy", "--seq-len", 80)
    assert rc == 2 and "fewer than --seq-len 80" in err
    np.save(tmp_path / "big.npy", np.full((1, 20), 5000))
    rc, _, err = run(capsys, "loss", tiny_dir, "--data", tmp_path / "big.npy", "--seq-len", 20)
    assert rc == 2 and "outside the model's vocabulary" in err


def test_random_model_tokenizer_round_trips(tmp_path, capsys):
    import transformers

    rc, out, _ = run(capsys, "random-model", tmp_path / "r", "--preset", "tiny", "--arch", "deepseek_v32",
                     "--pattern", "FSFSFS")
    assert rc == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "r"))
    text = "IndexCache: naïve café ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    model = load_model(tmp_path / "r", verbose=False)
    assert str(model.pattern) == "FSFSFS" and not model.config.indexer_rope_interleave


def test_parameter_counts_from_headers_equal_model(tiny_dir):
    from indexcache.checkpoint import TensorSource
    from indexcache.pattern import Pattern
    from indexcache.stats import count_parameters

    src = TensorSource(tiny_dir)
    headers = {n: src.shape(n) for n in src.names()}
    model = load_model(tiny_dir, pattern="FSFSSS", verbose=False)
    from_model = {n: list(p.shape) for n, p in model.named_parameters()}
    from_model.update({n: list(b.shape) for n, b in model.named_buffers()})
    a = count_parameters(model.config, headers, Pattern.parse("FSFSSS"))
    b = count_parameters(model.config, from_model)
    assert a == b and a["total"] == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers())
    assert a["indexer"] * 3 == count_parameters(model.config, headers)["indexer"]


def test_bad_options_get_one_line_errors(capsys, tiny_dir):
    import torch

    rc, _, err = run(capsys, "pattern", "FSSF", "--offset", 3)
    assert rc == 2 and "give --freq too" in err
    if not torch.cuda.is_available():
        rc, _, err = run(capsys, "search", tiny_dir, "--device", "cuda")
        assert rc == 2 and "no CUDA device" in err and err.count("\n") == 1
    assert main(["search", str(tiny_dir), "--batch-size", "0"]) == 2  # a bad value: one line, no usage block
    assert capsys.readouterr().err == ("indexcache search: error: argument --batch-size: expected a positive integer, "
                                       "got '0'\n")


def test_export_round_trips_through_transformers(capsys, tmp_path):
    import tiny
    import torch
    import transformers

    src = tmp_path / "src"
    tiny.save_hf(tiny.hf_model("glm_moe_dsa", seed=17), src)
    rc, out, _ = run(capsys, "export", src, "--pattern", "uniform:4:paper", "--out", tmp_path / "x",
                     "--drop-shared-indexers")
    assert rc == 0 and "FSSSFS" in out
    x = tmp_path / "x"
    assert "--json-model-override-args" in (x / "engine_flags.txt").read_text()
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(str(x)).eval()
    assert hf.config.indexer_types == ["full", "shared", "shared", "shared", "full", "shared"]
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(src, pattern="FSSSFS", verbose=False)(ids)
        assert (hf(input_ids=ids).logits - ours).abs().max() < 1e-4
    assert load_model(x, verbose=False).indexer_layers == [0, 4]


@pytest.mark.parametrize("cmd, module, name", [
    ("search", "indexcache.search.run", "SearchOptions"),
    ("eval", "indexcache.evals.runner", "EvalOptions"),
    ("train", "indexcache.train", "TrainConfig"),
])
def test_flags_and_option_fields_agree(cmd, module, name):
    """Each schema once: a flag and the options field of the same name have the same default, and every flag
    either is a field or is listed (with what it becomes) in cli.CLI_ONLY."""
    import dataclasses
    import importlib

    from indexcache.cli import CLI_ONLY, build_parser

    cls = getattr(importlib.import_module(module), name)
    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    parser = sub.choices[cmd]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for action in parser._actions:
        if action.dest in ("help",) or action.dest in CLI_ONLY[cmd]:
            continue
        if action.dest in fields:
            f = fields[action.dest]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue  # a required field: the flag or positional gives it
            assert action.default == default, (cmd, action.dest, action.default, default)
        else:
            raise AssertionError(f"{cmd}: flag {action.dest} is neither a field of {name} nor in cli.CLI_ONLY")
