"""Every input checked, nothing lost: outputs never replace what the toolkit did not write, every option is
validated before any model or data loads, and every refusal is one sentence on one line with exit code 2."""

import json
import os
import stat

import numpy as np
import pytest

from indexcache.cli import main
from indexcache.outputs import MANIFEST


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from indexcache.presets import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "glm_moe_dsa", "tiny", seed=3)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def refused(capsys, *argv) -> str:
    """Run a command that must be refused: exit 2, nothing on stdout, one line on stderr (returned)."""
    rc, out, err = run(capsys, *argv)
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]
    assert rc == 2 and out == "" and len(lines) == 1, (rc, out, err)
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    import indexcache.checkpoint as ck
    import indexcache.integrations.transformers.runner as hr

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(ck, "load_model", boom)
    monkeypatch.setattr(hr, "load_pretrained", boom)


# --------------------------------------------------------------------------------- nothing lost
def test_export_never_destroys_a_users_directory_or_file(capsys, tiny_dir, tmp_path, no_loading):
    proj = tmp_path / "myproject"
    (proj / "src").mkdir(parents=True)
    (proj / "notes.txt").write_text("notes")
    (proj / "src" / "a.py").write_text("print(1)")
    for extra in ([], ["--overwrite"]):
        msg = refused(capsys, "export", tiny_dir, "--pattern", "uniform:4", "--out", proj, *extra)
        assert "holds files indexcache did not write (notes.txt, src)" in msg and "--overwrite" in msg
    assert (proj / "notes.txt").read_text() == "notes" and (proj / "src" / "a.py").read_text() == "print(1)"
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    msg = refused(capsys, "export", tiny_dir, "--pattern", "uniform:4", "--out", afile)
    assert "is an existing file" in msg
    assert afile.read_text() == "keep me" and not (tmp_path / "afile.old").exists()
    msg = refused(capsys, "export", tiny_dir, "--pattern", "uniform:4", "--out", tmp_path / "afile" / "x")
    assert "afile is a file, not a directory" in msg


def test_export_dot_and_a_second_export(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("k")
    msg = refused(capsys, "export", tiny_dir, "--pattern", "uniform:4", "--out", ".")
    assert "holds files indexcache did not write (keep.txt)" in msg
    old = os.umask(0o022)
    try:
        rc, _, _ = run(capsys, "export", tiny_dir, "--pattern", "uniform:4", "--out", "x")
        assert rc == 0
        msg = refused(capsys, "export", tiny_dir, "--pattern", "uniform:2", "--out", "x")
        assert "holds an earlier indexcache output; pass --overwrite to replace it" in msg
        rc, _, _ = run(capsys, "export", tiny_dir, "--pattern", "uniform:2", "--out", "x", "--overwrite")
    finally:
        os.umask(old)
    assert rc == 0 and json.loads((tmp_path / "x" / "config.json").read_text())["index_topk_pattern"] == "FFSFSF"
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755
    files = [p for p in (tmp_path / "x").iterdir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    wanted = {"model.safetensors", "config.json", "engine_flags.txt", "tokenizer.json", MANIFEST}
    assert wanted <= {p.name for p in files}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "x"]


def test_outputs_of_search_and_eval_are_checked_before_loading(capsys, tiny_dir, tmp_path, no_loading):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is an existing file" in refused(capsys, "search", tiny_dir, "--out", afile)
    msg = refused(capsys, "eval", tiny_dir, "--out", afile / "x.json")
    assert "cannot create --out" in msg and "afile is a file" in msg
    msg = refused(capsys, "eval", tiny_dir, "--out", afile)
    assert "indexcache did not write it; it is never replaced" in msg and afile.read_text() == "x"
    (tmp_path / "d").mkdir()
    assert "is a directory; give a file name" in refused(capsys, "eval", tiny_dir, "--out", tmp_path / "d")


def test_eval_report_is_replaced_only_with_overwrite(capsys, tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    argv = ["eval", tiny_dir, "--tasks", "none", "--ppl-data", tiny_dir / "tokenizer.json", "--lengths", "64",
            "--ppl-windows", "1", "--quiet", "--out", out]
    assert run(capsys, *argv)[0] == 0
    assert json.loads(out.read_text())["written_by"].startswith("indexcache")
    assert "pass --overwrite" in refused(capsys, *argv)
    assert run(capsys, *argv, "--overwrite")[0] == 0


# ------------------------------------------------------------------------------------ patterns
def test_every_command_takes_every_pattern_form(capsys, tiny_dir, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 2)
    for spec in ("uniform:4", "all-full", "FSFSFS", '["full","shared","full","shared","full","shared"]'):
        rc, out, err = run(capsys, "generate", tiny_dir, "--prompt-file", prompt, "--pattern", spec,
                           "--max-new-tokens", 3, "--device", "cpu", "--dtype", "float32")
        assert rc == 0, err
        rc, out, err = run(capsys, "info", tiny_dir, "--pattern", spec, "--context", "1K")
        assert rc == 0, err
    msg = refused(capsys, "pattern", "uniform:4")
    assert "needs the layer count (give --num-layers N or --model DIR)" in msg
    assert "needs the layer count" in refused(capsys, "pattern", "all-full")
    assert "offset must be a whole number >= 0" in refused(capsys, "pattern", "uniform:4:transformers:-3",
                                                            "--num-layers", 12)
    assert "cannot read pattern 'bogus'" in refused(capsys, "pattern", "bogus")


# ------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("argv, message", [
    (["info", "{m}", "--context", "0"], "argument --context: expected a positive token count such as 8192 or 8K"),
    (["info", "{m}", "--context", "-100"], "argument --context: expected a positive token count"),
    (["generate", "{m}", "--prompt-file", "p", "--top-p", "0"], "argument --top-p: expected a number in (0, 1]"),
    (["generate", "{m}", "--prompt-file", "p", "--temperature", "-1"],
     "argument --temperature: expected a number >= 0"),
    (["generate", "{m}", "--prompt-file", "p", "--top-k", "-5"], "argument --top-k: expected a whole number >= 0"),
    (["search", "{m}", "--cache-gb", "-1"], "argument --cache-gb: expected 'auto' or a number > 0, got '-1'"),
    (["search", "{m}", "--keep", "1.5"], "argument --keep: expected a number in (0, 1]"),
    (["pattern", "FSFS", "--stage-starts", "a,b"], "argument --stage-starts: expected comma-separated layer numbers"),
    (["train", "o", "--stage", "dense", "--data", "d", "--synthetic-mix", "2"], "argument --synthetic-mix"),
    (["search", "{m}", "--force-full", "9"], "--force-full layer 9 is outside the model's 6 indexer layers (0-5"),
    (["search", "{m}", "--num-full", "7"], "--num-full 7 exceeds the model's 6 layers with an indexer"),
    (["search", "{m}", "--baselines", "uniform,magic"], "unknown baseline 'magic'"),
    (["search", "{m}", "--seq-len", "9000"], "--seq-len 9000 exceeds the model's max_position_embeddings 4096"),
    (["eval", "{m}", "--lengths", "5K", "--out", "o.json"],
     "--lengths 5000 exceeds the model's max_position_embeddings"),
    (["eval", "{m}", "--tasks", "none", "--out", "o.json"], "--tasks none leaves nothing to evaluate"),
    (["eval", "{m}", "--tasks", "bogus", "--out", "o.json"], "unknown task family 'bogus'"),
    (["bench", "e2e", "--out", "o.json", "--pattern", "FSFS"], "--pattern times a checkpoint's patterns"),
    (["bench", "e2e", "--out", "o.json", "--model", "{m}", "--pattern", "FSF"], "--pattern FSF"),
    (["bench", "kernels", "--out", "o.json", "--model", "{m}"], "--model is for bench e2e"),
    (["bench", "kernels", "--out", "o.json", "--fused-from", "65536"], "--fused-from is for bench e2e"),
    (["bench", "e2e", "--out", "o.json", "--fused-from", "0"], "--fused-from"),
    (["bench", "e2e", "--out", "o.json", "--repeats", "0"], "--repeats"),
    (["bench", "e2e", "--out", "o.json", "--select-budget-mb", "256,256"], "a value is repeated in '256,256'"),
    (["bench", "e2e", "--out", "o.json", "--select-budget-mb", "256,0"], "--select-budget-mb: expected a positive"),
    (["bench", "e2e", "--out", "o.json", "--dtype", "float32"], "--dtype sets a checkpoint's dtype in bench e2e"),
    (["bench", "kernels", "--out", "o.json", "--parts", "topk,topk_engines"], "unknown kernel group 'topk_engines'"),
])
def test_bad_values_are_one_sentence_naming_the_option(capsys, tiny_dir, tmp_path, monkeypatch, no_loading, argv,
                                                        message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").write_text("hello")
    msg = refused(capsys, *[a.format(m=tiny_dir) for a in argv])
    assert message in msg, msg


# -------------------------------------------------------------------------------- files and text
def test_missing_and_wrong_files_get_sentences(capsys, tiny_dir, tmp_path, no_loading):
    msg = refused(capsys, "generate", tiny_dir, "--prompt-file", tmp_path / "missing.txt")
    assert "--prompt-file" in msg and "does not exist; give a UTF-8 text file" in msg
    readme = tmp_path / "README.md"
    readme.write_text("# hi")
    msg = refused(capsys, "info", readme)
    assert "is a file, not a model directory" in msg and "JSON" not in msg
    msg = refused(capsys, "info", tmp_path)
    assert "is not a model directory: it has no config.json" in msg


def test_binary_data_is_refused(capsys, tiny_dir, tmp_path, no_loading):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 40)
    msg = refused(capsys, "loss", tiny_dir, "--data", blob)
    assert "is not a text file (it holds NUL bytes)" in msg
    msg = refused(capsys, "loss", tiny_dir, "--data", tiny_dir / "model.safetensors")
    assert "model.safetensors is not a text file" in msg
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 500)
    assert "is not UTF-8 text" in refused(capsys, "search", tiny_dir, "--data", latin)


def test_binary_data_refused_by_the_reader_too(tmp_path):
    from indexcache.data import read_texts
    from indexcache.errors import DataError

    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_text("fine text")
    (d / "b.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DataError, match="b.txt is not a text file"):
        read_texts(d)


def test_config_that_contradicts_itself(tmp_path):
    from indexcache import DSAConfig
    from indexcache.errors import ConfigError

    with pytest.raises(ConfigError, match="contradicts itself: architectures \\['GlmMoeDsaForCausalLM'\\]"):
        DSAConfig.from_dict({"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "deepseek_v32"})
    with pytest.raises(ConfigError, match="unknown architecture \\['LlamaForCausalLM'\\]"):
        DSAConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "glm_moe_dsa"})


# ----------------------------------------------------------------------------------- generate
def test_generate_refuses_a_prompt_beyond_the_context(capsys, tiny_dir, tmp_path, no_loading):
    prompt = tmp_path / "long.txt"
    prompt.write_text("x" * 5000)  # byte-level tokenizer: 5000 tokens against max_position_embeddings 4096
    msg = refused(capsys, "generate", tiny_dir, "--prompt-file", prompt, "--device", "cpu")
    assert "holds 5,000 tokens" in msg and "beyond the model's max_position_embeddings 4,096" in msg


# ------------------------------------------------------------------------------------- partial output
def test_info_on_a_corrupt_shard_prints_only_the_error(capsys, tiny_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    msg = refused(capsys, "info", bad)
    assert "corrupt checkpoint file model.safetensors" in msg


def test_eval_skips_a_family_that_does_not_fit_the_length(capsys, tiny_dir, tmp_path):
    out = tmp_path / "e.json"
    rc, stdout, err = run(capsys, "eval", tiny_dir, "--tasks", "niah_single", "cwe", "--lengths", 512, "--samples", 1,
                          "--quiet", "--out", out)
    assert rc == 0, err
    rep = json.loads(out.read_text())
    assert [s["family"] for s in rep["skipped"]] == ["cwe"]
    assert "needs more than 512 tokens" in rep["skipped"][0]["reason"]
    assert set(rep["results"][0]["tasks"]) == {"niah_single"}
    assert "cwe skipped: cwe needs more than 512 tokens" in stdout


def test_eval_notes_lengths_where_patterns_cannot_matter(capsys, tiny_dir, tmp_path):
    rc, out, _ = run(capsys, "eval", tiny_dir, "--tasks", "none", "--ppl-data", tiny_dir / "tokenizer.json",
                     "--lengths", 8, 64, "--ppl-windows", 1, "--quiet", "--out", tmp_path / "e.json")
    assert rc == 0 and "note: at 8 tokens (a query keeps 8 tokens) every query keeps all the tokens it sees" in out


# ------------------------------------------------------------------------------------- search resume
def test_search_resume_says_what_it_does(capsys, tiny_dir, tmp_path, monkeypatch):
    import indexcache.search.run as sr

    out = tmp_path / "s"
    base = ["search", tiny_dir, "--num-samples", 1, "--seq-len", 24, "--num-full", 4, "--out", out]
    rc, _, err = run(capsys, *base, "--resume")
    assert rc == 0 and "no search_state.json" in err and "starting a new search" in err
    first = json.loads((out / "report.json").read_text())

    def no_recompute(*a, **k):
        raise AssertionError("a finished search recomputed its baselines on --resume")

    monkeypatch.setattr(sr, "compute_baselines", no_recompute)
    rc, _, err = run(capsys, *base, "--resume")
    assert rc == 0, err
    again = json.loads((out / "report.json").read_text())
    assert again["baselines"] == first["baselines"] and again["selected"] == first["selected"]
    msg = refused(capsys, "search", tiny_dir, "--num-samples", 1, "--seq-len", 24, "--num-full", 3, "--out", out,
                  "--resume")
    assert "cannot resume" in msg and "target_full: 4 then, 3 now" in msg
    assert "pass --overwrite to replace it or --resume to continue it" in refused(capsys, *base)


def test_search_names_the_next_steps(capsys, tiny_dir, tmp_path):
    rc, out, _ = run(capsys, "search", tiny_dir, "--num-samples", 1, "--seq-len", 24, "--num-full", 5,
                     "--baselines", "none", "--out", tmp_path / "s")
    assert rc == 0
    assert "built-in synthetic corpus, which is out of distribution" in out
    assert f"indexcache eval {tiny_dir} --pattern all-full --pattern " in out and "indexcache export" in out
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "(seed 0) (seed 0)" not in summary and "windows drawn with seed 0" in summary


def test_random_model_refuses_a_file_and_keeps_it(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert "is an existing file" in refused(capsys, "random-model", afile, "--preset", "tiny")
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_every_npy_path_still_works(capsys, tiny_dir, tmp_path):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 300, size=(2, 30)))
    rc, out, _ = run(capsys, "loss", tiny_dir, "--data", tmp_path / "ids.npy", "--seq-len", 30, "--json")
    assert rc == 0 and json.loads(out)["num_seqs"] == 2


def test_bench_kernels_accepts_every_group_it_can_time(tmp_path, monkeypatch):
    """The CLI's check reads the benchmark's own table, so no group the benchmark times is refused by name."""
    from indexcache.bench.kernels import BENCHES
    from indexcache.cli import build_parser, check_bench

    monkeypatch.chdir(tmp_path)
    assert "topk_engine" in BENCHES
    args = build_parser().parse_args(["bench", "kernels", "--out", "o.json", "--parts", ",".join(BENCHES)])
    check_bench(args)  # raises OptionError on a name it does not know
