"""The GPU scripts' command lines, checked on CPU: a wrong flag in a script otherwise shows only on the GPU."""

import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from indexcache.cli import build_parser, check_train
from indexcache.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]
CURRICULUM_STEPS = ("dense8k", "dense16k", "warm8k", "warm16k", "sparse16k", "eval")


def dry_run(*argv: str) -> list[list[str]]:
    env = {**os.environ, "DRY_RUN": "1", "OUT": "/nonexistent/out"}
    out = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("step", CURRICULUM_STEPS)
def test_every_curriculum_step_parses_as_an_indexcache_command(step):
    (cmd,) = dry_run("scripts/long_context_curriculum.sh", step, "models/dsa-mini", "3")
    args = build_parser().parse_args(cmd)  # argparse exits (SystemExit) on a flag or value it refuses
    assert args.cmd == cmd[0]
    if step == "eval":
        assert args.lengths == [4096, 16384, 32768] and args.samples == 50
    else:
        assert args.time_limit_min == 3 and args.init == "models/dsa-mini"
        assert args.resume == (ROOT / args.out / "state.pt").exists()  # resumes only a run stopped here


def test_curriculum_eval_with_yarn_reads_an_extended_model():
    env = {**os.environ, "YARN": "2", "LENGTHS": "16384 32768"}
    out = subprocess.run(["bash", "scripts/long_context_curriculum.sh", "eval", "models/dsa-mini"], cwd=ROOT,
                         env={**env, "DRY_RUN": "1", "OUT": "o"}, capture_output=True, text=True, check=True).stdout
    args = build_parser().parse_args(shlex.split(out))
    assert args.model == "runs/yarn2-models-dsa-mini" and args.lengths == [16384, 32768]
    assert args.out == "o/eval-long-yarn2.json"


def test_curriculum_overrides(tmp_path):
    out = subprocess.run(["bash", "scripts/long_context_curriculum.sh", "sparse16k", "run:none"], cwd=ROOT,
                         env={**os.environ, "DRY_RUN": "1", "OUT": "o", "STEPS": "37"}, capture_output=True, text=True)
    assert out.returncode == 2 and "no model in runs/none" in out.stderr  # run:NAME must name a run that exists
    (cmd,) = [shlex.split(line) for line in subprocess.run(
        ["bash", "scripts/long_context_curriculum.sh", "sparse16k", "models/dsa-mini"], cwd=ROOT,
        env={**os.environ, "DRY_RUN": "1", "OUT": "o", "STEPS": "37"}, capture_output=True, text=True,
        check=True).stdout.splitlines()]
    assert build_parser().parse_args(cmd).steps == 37
    env = {**os.environ, "DRY_RUN": "1", "OUT": "o", "MIX": "0.7", "KINDS": "secret,fact"}
    (cmd,) = [shlex.split(line) for line in subprocess.run(
        ["bash", "scripts/long_context_curriculum.sh", "sparse16k", "models/dsa-mini"], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True).stdout.splitlines()]
    args = build_parser().parse_args(cmd)
    assert (args.synthetic_mix, args.synthetic_kinds) == (0.7, "secret,fact")
    for step, kl_rows in (("warm16k", {}), ("warm8k", {"KL_ROWS": "512"})):
        env = {**os.environ, "DRY_RUN": "1", "OUT": "o", "KINDS": "secret:0.6,fact", **kl_rows}
        (cmd,) = [shlex.split(line) for line in subprocess.run(
            ["bash", "scripts/long_context_curriculum.sh", step, "models/dsa-mini"], cwd=ROOT, env=env,
            capture_output=True, text=True, check=True).stdout.splitlines()]
        args = build_parser().parse_args(cmd)
        assert args.kl_rows == int(kl_rows.get("KL_ROWS", 2048)) and args.synthetic_kinds == "secret:0.6,fact"
        (tmp_path / "book.txt").write_text("A book.")
        # the books are not on this machine, and runs/ may hold an earlier run: the rest of the check runs as on the GPU
        args.data, args.out, args.resume = str(tmp_path), str(tmp_path / f"run-{step}"), False
        check_train(args)  # the weighted kinds pass the CLI's own check
    args.synthetic_kinds = "secret:often,fact"
    with pytest.raises(OptionError, match="--synthetic-kinds: retrieval episode kind 'secret:often': the weight"):
        check_train(args)


def test_curriculum_refuses_an_unknown_step():
    r = subprocess.run(["bash", "scripts/long_context_curriculum.sh", "sparse64k", "models/dsa-mini"], cwd=ROOT,
                       env={**os.environ, "DRY_RUN": "1", "OUT": "/nonexistent"}, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown step sparse64k" in r.stderr


def test_rope_extend_links_the_weights_and_sets_yarn(tmp_path):
    import torch

    from indexcache.checkpoint import load_model
    from indexcache.model.rope import inv_freq_and_scaling
    from indexcache.presets import make_random_checkpoint

    base = make_random_checkpoint(tmp_path / "m", "glm_moe_dsa", "tiny", seed=1)
    out = tmp_path / "yarn2"
    run = [sys.executable, str(ROOT / "scripts/rope_extend.py"), str(base), str(out), "--factor", "2", "--original",
           "64"]
    subprocess.run(run, check=True, capture_output=True)
    assert all((out / f.name).is_symlink() for f in Path(base).iterdir() if f.suffix == ".safetensors")
    model = load_model(out, device="cpu")
    rope = model.config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 2.0, 64)
    inv, scale = inv_freq_and_scaling(rope, model.config.qk_rope_head_dim)
    inv0, _ = inv_freq_and_scaling(load_model(base, device="cpu").config.rope, model.config.qk_rope_head_dim)
    assert torch.equal(inv[0], inv0[0]) and inv[-1] < inv0[-1] and scale > 1  # fast dims kept, slow ones stretched
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_topk_log_summary_reads_the_per_call_lines(tmp_path):
    log = tmp_path / "topk.log"
    line = ("  topk on engine logits, call {c} (256 rows, up to {n} keys): sample {s}, staged 0.2, bucket 0.5, "
            "torch 0.6, auto 0.5 ms (torch.topk 0.45); sample re-read {r}, fell back 0 rows\n")
    log.write_text("ceilings ...\n" + line.format(c=0, n=1000, s=0.3, r=1) + line.format(c=1, n=3000, s=0.7, r=3))
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/topk_log_summary.py"), str(log), str(out)], check=True,
                   capture_output=True)
    import json

    d = json.loads(out.read_text())
    assert d["calls"] == 2 and d["keys"] == [1000, 3000] and d["sample_faster_than_bucket"] == 1
    assert d["ms_per_call"]["sample"]["mean"] == pytest.approx(0.5)
    assert d["ms_per_call"]["sample"]["slower_than_torch_topk"] == 1
    assert d["ms_per_call"]["bucket"]["slower_than_torch_topk"] == 2 and d["sample_re_read_rows"]["max"] == 3
    (tmp_path / "empty.log").write_text("nothing timed\n")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/topk_log_summary.py"), str(tmp_path / "empty.log"),
                          str(tmp_path / "e.json")], capture_output=True, text=True)
    assert bad.returncode != 0 and "no 'topk on engine logits" in bad.stderr and not (tmp_path / "e.json").exists()


def test_long_study_runs_one_eval_per_pattern_and_reads_32k_with_yarn(monkeypatch):
    pats = "FFFFFFFFFFFFFFFF FSFSFSFSFSFSFSFS"
    cmds = dry_run("scripts/long_study.sh", "16384", pats)
    assert len(cmds) == 2
    for cmd, p in zip(cmds, pats.split(), strict=True):
        args = build_parser().parse_args(cmd)
        assert args.model == "models/dsa-mini" and args.pattern == [p] and args.lengths == [16384]
        assert args.samples == 50 and args.seed == 0 and args.out == f"/nonexistent/out/eval-long-16384-{p}.json"
        assert args.ppl_data == ["wikitext=.data/wikitext-2-raw/test.txt"]
    (cmd,) = dry_run("scripts/long_study.sh", "32768", "FSSSFSSSFSSSFSSS")
    args = build_parser().parse_args(cmd)
    assert args.model == "runs/yarn2-dsa-mini" and args.lengths == [32768]
    assert args.fp32_dot == "ieee"
    monkeypatch.setenv("FP32_DOT", "tf32x3")
    (cmd,) = dry_run("scripts/long_study.sh", "32768", "FSSSFSSSFSSSFSSS")
    monkeypatch.delenv("FP32_DOT")
    assert build_parser().parse_args(cmd).fp32_dot == "tf32x3"
    bad = subprocess.run(["bash", "scripts/long_study.sh", "20000", "FFFFFFFFFFFFFFFF"], cwd=ROOT,
                         env={**os.environ, "DRY_RUN": "1", "OUT": "o"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of 16384" in bad.stderr


def test_compare_evals_matches_samples_and_counts_what_agrees(tmp_path, capsys):
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    from compare_evals import main

    def report(outputs: list[str], seconds: float) -> dict:
        samples = [{"pattern": "FF", "length": 64, "family": "passkey", "index": i, "answers": [str(i)],
                    "outputs": [o], "score": float(o.strip() == str(i))} for i, o in enumerate(outputs)]
        return {"command": "indexcache eval", "samples": samples,
                "results": [{"pattern": "FF", "length": 64, "seconds": seconds, "ppl": {"w": 9.0}}]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report([" 0", " 1", " 7", " 3"], 8.0)))
    b.write_text(json.dumps(report([" 0", " 1", " 2", " 9", " 4"], 2.5)))  # one more sample: not shared
    assert main([str(a), str(b), "--out", str(tmp_path / "c.json")]) == 0
    (row,) = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert (row["samples"], row["same_outputs"], row["same_scores"]) == (4, 2, 2)
    assert (row["base_score"], row["other_score"]) == (75.0, 75.0)
    assert [d["index"] for d in row["differ"]] == [2, 3]
    assert "0.50 s each" in capsys.readouterr().out  # 2.5 s over its 5 samples
    other = report([" 0"], 1.0)
    other["samples"][0]["answers"] = ["5"]
    b.write_text(json.dumps(other))
    assert main([str(a), str(b)]) == 2  # the same index with other answers is another prompt


def test_heldout_numbers_scores_the_trainers_heldout_books(tmp_path):
    import json

    import torch

    from indexcache.checkpoint import load_model
    from indexcache.data.text import load_tokenizer
    from indexcache.presets import make_random_checkpoint
    from indexcache.search.evaluator import lm_loss
    from indexcache.train.data import fixed_windows, split_documents, tokenize

    model_dir = make_random_checkpoint(tmp_path / "m", "glm_moe_dsa", "tiny", seed=1)
    books = tmp_path / "books"
    books.mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["the", "house", "river", "light", "said", "of", "and", "winter", "road", "she"]
    for i in range(5):
        (books / f"{i}.txt").write_text(" ".join(words[j] for j in torch.randint(0, 10, (3000,), generator=g)))
    out = tmp_path / "h.json"
    run = [sys.executable, str(ROOT / "scripts/heldout_numbers.py"), str(model_dir), str(books), str(out),
           "--seq-len", "64", "--windows", "3", "--recall-windows", "1"]
    subprocess.run(run, check=True, capture_output=True)
    d = json.loads(out.read_text())
    _, test, names = split_documents(books, 3, 0)
    wins = fixed_windows(tokenize(test, load_tokenizer(model_dir)), 3, 64)
    assert d["heldout_files"] == names and len(d["window_losses"]) == 3
    assert d["heldout_lm_loss"] == pytest.approx(lm_loss(load_model(model_dir), wins, progress=False), rel=1e-5)
    rec = d["indexer_recall"]
    assert rec["index_topk"] == 8 and all(0 < r <= 1 for r in rec["recall"])  # a random model: near chance
    assert rec["random_baseline"] == pytest.approx(sum(8 / (t + 1) for t in range(8, 64)) / 56, rel=1e-9)
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_long_study_report_names_the_rows_and_pairs_them_with_all_full(tmp_path):
    import json

    import torch

    from indexcache.presets import make_random_checkpoint

    sys.path.insert(0, str(ROOT / "scripts"))
    from long_study_report import gather, table

    model_dir = make_random_checkpoint(tmp_path / "m", "glm_moe_dsa", "tiny", seed=1)
    n = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    words = ["the", "house", "river", "light", "said", "of", "and", "winter", "road", "she"]
    text = tmp_path / "wiki.txt"
    text.write_text(" ".join(words[j] for j in torch.randint(0, 10, (6000,), generator=g)))
    study = tmp_path / "study"
    study.mkdir()
    uniform = "".join("F" if i % 2 == 0 else "S" for i in range(n))
    subprocess.run([sys.executable, "-m", "indexcache.cli", "eval", str(model_dir), "--pattern", "F" * n,
                    "--pattern", uniform, "--lengths", "512", "--tasks", "niah_single,passkey", "--samples", "3",
                    "--ppl-data", f"wikitext={text}", "--quiet", "--out", str(study / "eval-long-512-x.json")],
                   check=True, capture_output=True)
    rows, chance = gather(study, tmp_path)
    assert [(r["method"], r["retention"]) for r in rows] == [("all Full", "1"), ("uniform", "1/2")]
    full, shared = rows
    assert full["average_ci95"][0] <= full["average"] <= full["average_ci95"][1]
    d = shared["minus_all_full"]  # the same prompts: a paired difference, whose mean is the difference of means
    assert d["average"] == pytest.approx(shared["average"] - full["average"], abs=1e-9)
    assert d["ci95"][0] <= d["average"] <= d["ci95"][1]
    md = table(rows, chance, ["niah_single", "passkey"], ["niah_single", "passkey"], {"wikitext": "PPL"}, ppl_ci=True)
    lo, hi = full["ppl_ci95"]["wikitext"]
    assert f"{full['ppl']['wikitext']:.1f} [{lo:.0f}, {hi:.0f}]" in md and "**512 tokens**" in md
    from long_study_report import add_speed, speed_columns

    # a bench e2e report's rows, matched by pattern and length: another length's row must not be taken
    bench = {"gpu": "x", "runs": [
        {"pattern_str": uniform, "context": 512, "prefill_speedup": 1.25, "decode_b1_speedup": 1.5, "ttft_s": 0.1,
         "decode_b1_tok_s": 90.0},
        {"pattern_str": "F" * n, "context": 4096, "prefill_speedup": 1.0, "decode_b1_speedup": 1.0, "ttft_s": 1.0,
         "decode_b1_tok_s": 60.0}]}
    add_speed(rows, bench)
    assert "speed" not in full and shared["speed"]["prefill_speedup"] == 1.25
    md = table(rows, chance, ["niah_single", "passkey"], ["niah_single", "passkey"], {"wikitext": "PPL"},
               extra=speed_columns())
    line = next(x for x in md.splitlines() if f"`{uniform}`" in x)
    assert line.endswith("| 1.25x | 1.50x |") and md.count("prefill speedup") == 1
    from long_study_report import unfinished_rows, unfinished_table

    # an evaluation stopped part way: the family it finished is a row, paired with all Full's same prompts;
    # the family it did not finish is left out
    rep = json.loads((study / "eval-long-512-x.json").read_text())
    mine = [x for x in rep["samples"] if x["pattern"] == uniform]
    done = [x for x in mine if x["family"] == "niah_single"]
    progress = tmp_path / "progress"
    progress.mkdir()
    (progress / f"eval-long-512-{uniform}.json.partial").write_text(json.dumps(
        {"signature": {"samples": 3}, "samples": done + [x for x in mine if x["family"] == "passkey"][:2],
         "ppl": {f"{uniform} 512 wikitext": [1.0, 2.0]}}))
    extra = unfinished_rows(rows, progress, tmp_path)
    assert [(r["pattern"], r["family"], r["samples"]) for r in extra] == [(uniform, "niah_single", 3)]
    (r,) = extra
    full_niah = [x["score"] for x in rep["samples"] if x["pattern"] == "F" * n and x["family"] == "niah_single"]
    assert r["score"] == pytest.approx(100 * sum(x["score"] for x in done) / 3)
    assert r["minus_all_full"]["score"] == pytest.approx(r["score"] - 100 * sum(full_niah) / 3)
    assert r["ppl"] == pytest.approx(math.exp(1.5)) and f"`{uniform}`" in unfinished_table(extra)


def _eval_report(pattern: str, length: int, scores: dict[str, list[float]], ppl: float, shift: int = 0) -> dict:
    """A minimal `indexcache eval` report: one result, and one sample record per score (``shift`` moves the
    needles, so the prompts differ)."""
    samples = [{"pattern": pattern, "length": length, "family": f, "index": i, "score": x, "answers": [f"a{i}"],
                "needles": [i + shift]} for f, v in scores.items() for i, x in enumerate(v)]
    tasks = {f: 100 * sum(v) / len(v) for f, v in scores.items()}
    return {"command": "indexcache eval ...", "samples": samples, "results": [
        {"pattern": pattern, "length": length, "ppl": {"wikitext": ppl}, "ppl_ci95": {"wikitext": [ppl, ppl]},
         "tasks": tasks, "average": sum(tasks.values()) / len(tasks)}]}


def test_long_study_report_pairs_training_aware_runs_with_their_control_and_averages_seeds(tmp_path):
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    from long_study_report import aware_rows, aware_table

    full, half = "FFFF", "FSFS"
    (tmp_path / "full.json").write_text(json.dumps(_eval_report(full, 512, {"niah_single": [1, 1, 1, 0],
                                                                         "passkey": [1, 0, 1, 0]}, 10.0)))
    rows = [{"method": "all Full", "length": 512, "pattern": full, "file": "full.json"}]
    runs = {("full", 0): (full, [1, 1, 0, 0], [1, 1, 0, 0], 0), ("full", 1): (full, [1, 1, 1, 1], [1, 0, 0, 0], 0),
            ("aware-h2", 0): (half, [1, 0, 0, 0], [0, 0, 0, 0], 0), ("aware-h2", 1): (half, [1, 1, 1, 0],
                                                                                     [1, 1, 0, 0], 0),
            ("aware-q2", 0): ("FSSS", [0, 0, 0, 0], [1, 0, 0, 0], 1)}  # other prompts: no pairing
    for (variant, seed), (pattern, niah, passkey, shift) in runs.items():
        d = tmp_path / "aware" / f"{variant}-s{seed}"
        d.mkdir(parents=True)
        (d / f"eval-long-512-{pattern}.json").write_text(json.dumps(_eval_report(
            pattern, 512, {"niah_single": niah, "passkey": passkey}, 20.0 + seed, shift)))
        (d / "train-summary.json").write_text(json.dumps({"steps": 20, "tokens": 100, "pattern": pattern}))
    # aware-q2 s0 at another length, scored on a second training of the same command: its own summary
    q_dir = tmp_path / "aware" / "aware-q2-s0"
    again_scores = {"niah_single": [0, 1], "passkey": [1, 1]}
    (q_dir / "eval-long-1024-FSSS.json").write_text(json.dumps(_eval_report("FSSS", 1024, again_scores, 30.0)))
    (q_dir / "retrain-1024-summary.json").write_text(json.dumps({"steps": 20, "tokens": 100, "seconds": 9.0}))
    (q_dir / "train-summary.json").write_text(json.dumps({"steps": 20, "tokens": 100, "seconds": 5.0}))
    out = aware_rows(rows, tmp_path / "aware", tmp_path)
    again = [r for r in out if r["length"] == 1024]
    assert [(r["retrained"], r["train"]["seconds"]) for r in again] == [(True, 9.0)]
    assert "| 0 (trained again) |" in aware_table(again)
    out = [r for r in out if r["length"] == 512]
    assert not any(r.get("retrained") for r in out)
    assert [(r["variant"], r["seed"]) for r in out] == [("full", 0), ("full", 1), ("full", "mean"), ("aware-h2", 0),
                                                       ("aware-h2", 1), ("aware-h2", "mean"), ("aware-q2", 0)]
    by = {(r["variant"], r["seed"]): r for r in out}
    h0, h1, hm = by["aware-h2", 0], by["aware-h2", 1], by["aware-h2", "mean"]
    assert h0["average"] == pytest.approx(12.5) and h0["minus_control"]["average"] == pytest.approx(12.5 - 50)
    assert h1["minus_control"]["average"] == pytest.approx(62.5 - 62.5)
    assert h1["minus_all_full"]["average"] == pytest.approx(62.5 - 62.5) and h0["train"]["steps"] == 20
    # the seeds' mean: each prompt averaged over the seeds, paired with the control's mean over the same seeds
    assert hm["average"] == pytest.approx(37.5) and hm["tasks"]["niah_single"] == pytest.approx(50.0)
    assert hm["minus_control"]["average"] == pytest.approx(37.5 - 56.25) and hm["ppl"] == pytest.approx(20.5)
    assert hm["average_ci95"][0] <= 37.5 <= hm["average_ci95"][1]
    q = by["aware-q2", 0]
    assert q["minus_all_full"] is None and q["minus_control"] is None
    md = aware_table(out)
    assert "| mean of 0, 1 |" in md and md.count("\n") == len(out) + 2
    from long_study_report import plot_aware

    # the figure: every variant, beside the bundled all Full and the untrained row of the same pattern
    band = {"average": 62.5, "average_ci95": [40.0, 80.0], "ppl": {"wikitext": 10.0},
            "ppl_ci95": {"wikitext": [9.0, 11.0]}}
    untrained = {"method": "uniform", "length": 512, "pattern": half, "average": 0.0, "average_ci95": [0.0, 0.0],
                 "ppl": {"wikitext": 30.0}, "ppl_ci95": {"wikitext": [28.0, 33.0]}}
    plot_aware([{**rows[0], **band}, untrained], out, tmp_path / "aware.png")
    assert (tmp_path / "aware.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("variant,pattern,cross_layer", [
    ("full", "FFFFFFFFFFFFFFFF", True), ("aware-h2", "FSFSFSFSFSFSFSFS", True),
    ("aware-q2", "FSSSFSSSFSSSFSSS", True), ("searched-h2", "FFFFSFSSSFSSSFFS", True),
    ("ablate-h2", "FSFSFSFSFSFSFSFS", False)])
def test_long_aware_trains_each_variant_for_its_pattern_and_scores_that_pattern(tmp_path, variant, pattern,
                                                                                 cross_layer):
    from indexcache.pattern import parse_spec

    train, *evals = dry_run("scripts/long_aware.sh", variant, "3")
    args = build_parser().parse_args(train)
    assert args.out == f"runs/long-{variant}-s3" and args.seed == 3 and args.seq_len == 16384
    assert args.stage == "sparse" and args.init == "models/dsa-mini" and args.no_cross_layer != cross_layer
    assert (str(parse_spec(args.pattern, 16)) if args.pattern else "F" * 16) == pattern
    (tmp_path / "book.txt").write_text("A book.")
    args.data, args.out, args.resume = str(tmp_path), str(tmp_path / "run"), False
    check_train(args)  # the pattern fits the bundled model, the kinds parse, 16K fits its context
    assert [build_parser().parse_args(e).lengths for e in evals] == [[4096], [16384]]
    for e in evals:
        a = build_parser().parse_args(e)
        assert a.model == f"runs/long-{variant}-s3/model" and a.pattern == [pattern] and a.samples == 50
        assert a.out.startswith(f"/nonexistent/out/{variant}-s3/")


def test_long_aware_at_32k_reads_each_run_with_its_own_yarn_copy():
    env = {**os.environ, "DRY_RUN": "1", "OUT": "/nonexistent/out", "LENGTHS": "4096 16384 32768"}
    models = {}
    for variant in ("aware-h2", "ablate-h2"):
        out = subprocess.run(["bash", "scripts/long_aware.sh", variant, "1"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        _, *evals = [build_parser().parse_args(shlex.split(x)) for x in out.splitlines() if x.strip()]
        assert [a.lengths for a in evals] == [[4096], [16384], [32768]]
        models[variant] = evals[-1].model
    # two runs' models are both named model/: each must get its own extended copy, not the first one's
    assert models == {v: f"runs/yarn2-long-{v}-s1-model" for v in ("aware-h2", "ablate-h2")}


def test_long_aware_refuses_an_unknown_variant_or_seed():
    for argv, message in ((["bogus", "0"], "unknown variant bogus"), (["aware-h2", "x"], "SEED must be")):
        r = subprocess.run(["bash", "scripts/long_aware.sh", *argv], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "DRY_RUN": "1", "OUT": "/nonexistent"})
        assert r.returncode == 2 and message in r.stderr


def test_eval_cost_times_each_phase_of_an_eval_prompt(tmp_path):
    """scripts/eval_cost.py on CPU: a row per timed prompt (with its phases) and a perplexity row per length,
    and the profiler's table for the first dtype."""
    import json

    from indexcache.presets import make_random_checkpoint

    model_dir = make_random_checkpoint(tmp_path / "m", "glm_moe_dsa", "tiny", seed=1)
    hay = tmp_path / "hay.txt"
    hay.write_text(" ".join(["the house by the river said she"] * 400))
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_cost.py"), str(model_dir), "--haystack", str(hay),
                    "--lengths", "512", "--dtypes", "float32", "--repeats", "1", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    rep = json.loads(out.read_text())["by_dtype"]["float32"]
    prompts = [r for r in rep["rows"] if "prefill_s" in r]
    assert [r["family"] for r in prompts] == ["niah_single", "passkey"]
    # two separate timings: their order is not asserted (on a loaded CPU the prefill alone can take longer
    # than the generation that repeats it); the per-step decode time is derived from them as documented
    assert all(r["prefill_s"] > 0 and r["generate_s"] > 0 and r["new_tokens"] >= 1 for r in prompts)
    for r in prompts:
        steps = max(r["new_tokens"] - 1, 1)
        assert r["decode_ms_per_step"] == pytest.approx(1e3 * max(r["generate_s"] - r["prefill_s"], 0.0) / steps)
    assert [r["length"] for r in rep["rows"] if "ppl_window_s" in r] == [512] and "Name" in rep["profile"]


def test_pick_stability_merges_tables_scored_on_the_same_windows_and_refuses_others(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from pick_stability import merge, write

    def row(p: str, loss: float) -> dict:
        return {"pattern": p, "loss": loss, "ci95": [loss - 1, loss + 1], "minus_all_full": loss - 4.0,
                "minus_all_full_ci95": [loss - 4.1, loss - 3.9]}

    def table(recipe: str, picks: list[str], seed: int = 1000) -> dict:
        runs = [{"recipe": recipe, "seed": s, "half": p, "target": p, "steps": 3, "steps_within_noise": [4][:s]}
                for s, p in enumerate(picks)]
        losses = {"windows": 2, "resamples": 10, "results": [row("FFFF", 4.0)] + [row(p, 4.5) for p in set(picks)]}
        return {"about": "x", "command": f"pick --recipes {recipe}", "runs": runs,
                "heldout": {"windows": 2, "seq_len": 64, "seed": seed, "losses": losses}}

    merged = merge([table("books", ["FSFS", "FSFS"]), table("retrieval", ["FFSS", "FSFS"])])
    assert [x["recipe"] for x in merged["runs"]] == ["books"] * 2 + ["retrieval"] * 2
    assert [r["pattern"] for r in merged["heldout"]["losses"]["results"]] == ["FFFF", "FFSS", "FSFS"]
    write(tmp_path, merged, 0.5)
    md = (tmp_path / "README.md").read_text()
    assert "| `FSFS` | 2 of 2 (0, 1) |" in md and "## retrieval, 0.5" in md and md.count("`pick --recipes") == 2
    with pytest.raises(SystemExit, match="different held-out windows"):
        merge([table("books", ["FSFS"]), table("retrieval", ["FSFS"], seed=7)])


def test_long_study_report_scores_each_16k_pick_with_the_seeds_that_picked_it(tmp_path):
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    from long_study_report import stability_rows, stability_table

    full, half, quarter = "FFFF", "FFSF", "FSSS"
    (tmp_path / "full.json").write_text(json.dumps(_eval_report(full, 512, {"niah_single": [1, 1, 1, 0],
                                                                         "passkey": [1, 0, 1, 0]}, 10.0)))
    rows = [{"method": "all Full", "length": 512, "pattern": full, "file": "full.json"}]
    stab = tmp_path / "study" / "stability-16k"
    (stab / "evals").mkdir(parents=True)
    (stab / "evals" / f"eval-long-512-{half}.json").write_text(json.dumps(_eval_report(
        half, 512, {"niah_single": [1, 1, 0, 0], "passkey": [1, 0, 1, 0]}, 11.0)))
    held = [{"pattern": p, "minus_all_full": d, "minus_all_full_ci95": [d - 0.01, d + 0.01]}
            for p, d in ((full, 0.0), (half, 0.02), (quarter, 0.1))]
    runs = [{"recipe": "books", "seed": s, "half": half, "target": quarter} for s in (0, 1)] + \
        [{"recipe": "retrieval", "seed": 0, "half": half, "target": quarter}]
    (stab / "stability.json").write_text(json.dumps({"runs": runs, "heldout": {"losses": {"results": held}}}))
    out = stability_rows(rows, tmp_path / "study", tmp_path)
    # the 1/2 pick was evaluated, the 1/4 pick was not: one row per recipe, none for the unevaluated pattern
    assert [(r["recipe"], r["retention"], r["seeds"], r["of"]) for r in out] == [("books", "1/2", [0, 1], 2),
                                                                                ("retrieval", "1/2", [0], 1)]
    r = out[0]
    assert r["heldout_minus_all_full"] == 0.02 and r["average"] == pytest.approx(50.0)
    assert r["minus_all_full"]["average"] == pytest.approx(50.0 - 62.5)  # paired on the same prompts
    assert "| books | 1/2 | `FFSF` | 2 of 2 (0, 1) | +0.0200 [+0.0100, +0.0300] | 512 |" in stability_table(out)


def test_fp32_dot_check_scores_the_study_prompts_in_both_modes():
    tf, ie = dry_run("scripts/fp32_dot_check.sh")
    a, b = build_parser().parse_args(tf), build_parser().parse_args(ie)
    assert (a.fp32_dot, b.fp32_dot) == ("tf32x3", "ieee") and (a.samples, b.samples) == (10, 5)
    for args in (a, b):  # the committed 32K study row's model, prompts and perplexity windows
        assert args.model == "runs/yarn2-dsa-mini" and args.lengths == [32768] and args.seed == 0
        assert args.haystack == ".data/gutenberg" and args.pattern == ["F" * 16] and args.device == "cuda"
    (short, _) = dry_run("scripts/fp32_dot_check.sh", "16384")
    assert build_parser().parse_args(short).model == "models/dsa-mini"
