"""The long-context suite: task generators (placement, length, scoring, determinism), greedy decoding with
context drafts, and ``indexcache eval`` end to end on a tiny random model."""

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch

from indexcache.data import load_tokenizer
from indexcache.data.synthetic import corpus
from indexcache.evals import runner
from indexcache.evals.tasks import (
    FAMILIES,
    INT,
    Haystack,
    TaskError,
    first_int_match,
    make_sample,
    parse_families,
    score,
    string_match_all,
    string_match_part,
)

MODEL = Path(__file__).resolve().parents[1] / "models" / "dsa-mini"


@pytest.fixture(scope="module")
def tok():
    if not (MODEL / "tokenizer.json").exists():
        pytest.skip("the bundled model is not in this checkout")
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def haystacks(tmp_path_factory):
    # a small "book": real-looking prose with sentences and line breaks, written once
    book = tmp_path_factory.mktemp("hay") / "book.txt"
    book.write_text("\n\n".join(corpus(60_000, seed=7)))
    return {"synthetic": Haystack(), "text": Haystack(book), "noise": Haystack("noise")}


# ------------------------------------------------------------------------------------------ generators
CASES = [(f, h, 1024) for f in FAMILIES for h in ("synthetic", "text")] + [(f, "noise", 2048) for f in FAMILIES]


def _wrong(sample) -> list[str]:
    """Outputs in the right format with every answer wrong."""
    if sample.metric == "first_int" or sample.family.startswith("niah"):
        return [" 0."] * sample.turns
    return [" " + " ".join(["zzqxv"] * len(sample.answers))] * sample.turns


@pytest.mark.parametrize("family, hay, length", CASES)
def test_generator(tok, haystacks, family, hay, length):
    s = make_sample(family, tok, length, index=3, seed=11, haystack=haystacks[hay])
    # the requested length, in the model's tokens, counting what the runner feeds (prompt + followups)
    n = len(tok.encode(s.prompt).ids) + sum(len(tok.encode(f).ids) for f in s.followups)
    assert n == s.num_tokens and abs(n - length) <= 0.02 * length and n <= length
    # the prompt ends where the answer begins; a perfect answer fits the decoding budget
    assert not s.prompt.endswith((" ", "\n")) and all(t.startswith(" ") for t in s.targets)
    assert len(s.targets) == s.turns and (not s.followups or len(s.answers) == s.turns)
    assert all(len(tok.encode(t).ids) < s.max_new_tokens for t in s.targets)
    # needles sit exactly where recorded, in characters and in tokens
    enc = tok.encode(s.prompt)
    for nd in s.needles:
        assert s.prompt[nd.char_start : nd.char_end] == nd.text
        assert nd.text in tok.decode(enc.ids[nd.token_start : nd.token_end])
        assert enc.offsets[nd.token_start][1] > nd.char_start and enc.offsets[nd.token_end - 1][0] < nd.char_end
    if family.startswith("niah") or family in ("passkey", "mqar"):
        # each gold answer is in a needle, and every occurrence of it in the prompt is inside a needle
        for a in s.answers:
            assert any(a in nd.text for nd in s.needles)
            for m in re.finditer(re.escape(a), s.prompt):
                assert any(nd.char_start <= m.start() and m.end() <= nd.char_end for nd in s.needles)
        expected = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4, "passkey": 1,
                    "mqar": 4}[family]
        assert len(s.needles) == expected
    if family == "niah_multikey":  # the 3 other needles are distractors with other keys and values
        key = s.meta["queried"][0]
        assert sum(key in nd.text for nd in s.needles) == 1
    if family == "vt":  # the chain, in order, each line after the previous one
        assert [nd.text.split()[1] for nd in s.needles] == s.answers
        assert all(a.char_start < b.char_start for a, b in zip(s.needles, s.needles[1:], strict=False))
        value = s.meta["value"]
        assert s.needles[0].text == f"VAR {s.answers[0]} = {value}."
    if family == "cwe":
        a, b = s.meta["list_span"]
        counts = {}
        for w in re.findall(r"\d+\. (\S+)", s.prompt[a:b]):
            counts[w] = counts.get(w, 0) + 1
        assert all(counts[w] == s.meta["freq_common"] for w in s.answers)
        assert max(c for w, c in counts.items() if w not in s.answers) == s.meta["freq_other"]
    if family == "fwe":
        a, b = s.meta["list_span"]
        counts = {}
        for w in s.prompt[a:b].split():
            counts[w] = counts.get(w, 0) + 1
        ranked = sorted((c, w) for w, c in counts.items() if w != "....")[::-1]
        assert {w for _, w in ranked[:3]} == set(s.answers) and ranked[2][0] > ranked[3][0]
    # a perfect answer scores 1, a wrong one 0
    assert score(s, s.targets) == 1.0
    assert score(s, _wrong(s)) == 0.0


def test_partial_scores_and_distractors(tok, haystacks):
    mv = make_sample("niah_multivalue", tok, 1024, haystack=haystacks["synthetic"])
    assert score(mv, [" " + ", ".join(mv.answers[:2])]) == 0.5
    mq = make_sample("niah_multiquery", tok, 1024, haystack=haystacks["synthetic"])
    assert score(mq, [" " + a for a in mq.answers[:3]] + [" 0"]) == 0.75
    # every answer given, but each in the wrong turn: per-turn scoring gives 0
    assert score(mq, [" " + a for a in mq.answers[1:] + mq.answers[:1]]) == 0.0
    mk = make_sample("niah_multikey", tok, 1024, haystack=haystacks["synthetic"])
    distractor = next(nd.text.split(": ")[1].rstrip(".") for nd in mk.needles if mk.answers[0] not in nd.text)
    assert score(mk, [" " + distractor]) == 0.0
    cwe = make_sample("cwe", tok, 1024, haystack=haystacks["text"])
    assert score(cwe, [" " + " ".join(cwe.answers[:7])]) == pytest.approx(0.7)
    assert score(cwe, [" " + " ".join(cwe.meta["example_answers"])]) == 0.0  # the solved example is not the answer


def test_metrics():
    assert string_match_all("the numbers are 12, 34", ["12", "34", "56", "78"]) == 0.5
    assert string_match_all("RAIN and snow", ["rain"]) == 1.0
    assert string_match_all("a train", ["rain"]) == 1.0  # RULER's substring semantics
    assert string_match_all("a train", ["rain"], whole_words=True) == 0.0
    assert string_match_part("only 34 here", ["12", "34"]) == 1.0 and string_match_part("none", ["12"]) == 0.0
    assert first_int_match(" 4821, then 12", "4821") == 1.0
    assert first_int_match(" 48211", "4821") == 0.0 and first_int_match(" no number", "4821") == 0.0


def test_determinism(tok, haystacks):
    for fam in ("niah_multikey", "vt", "cwe", "mqar"):
        a = make_sample(fam, tok, 1024, index=2, seed=5, haystack=haystacks["text"])
        b = make_sample(fam, tok, 1024, index=2, seed=5, haystack=haystacks["text"])
        assert a.to_dict(with_prompt=True) == b.to_dict(with_prompt=True)
        assert make_sample(fam, tok, 1024, index=3, seed=5, haystack=haystacks["text"]).prompt != a.prompt
        assert make_sample(fam, tok, 1024, index=2, seed=6, haystack=haystacks["text"]).prompt != a.prompt


def test_families_and_errors(tok):
    assert parse_families(None) == list(FAMILIES)
    assert parse_families(["niah", "cwe,passkey"])[:4] == [f for f in FAMILIES if f.startswith("niah")]
    assert parse_families("mqar,mqar") == ["mqar"] and parse_families(["none"]) == []
    with pytest.raises(TaskError, match="unknown task family 'bogus'"):
        parse_families(["bogus"])
    with pytest.raises(TaskError, match="fixed text"):
        make_sample("cwe", tok, 64)


# -------------------------------------------------------------------------------------------- decoding
class _CopyModel:
    """A stand-in whose greedy next token is the one that followed the previous occurrence of the current
    token (an ideal one-token induction rule), else ``(t * 7 + 3) % V``; counts its forwards."""

    vocab = 64

    def __init__(self):
        self.forwards = 0

    def logits(self, ids: list[int]) -> torch.Tensor:
        out = torch.zeros(len(ids), self.vocab)
        for p in range(len(ids)):
            prev = [i for i in range(p) if ids[i] == ids[p]]
            nxt = ids[prev[-1] + 1] if prev else (ids[p] * 7 + 3) % self.vocab
            out[p, nxt] = 1.0
        return out


class _ByteTok:
    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_drafts_give_the_plain_greedy_tokens(monkeypatch):
    fake = _CopyModel()

    def last_logits(model, ids, pattern, last):
        fake.forwards += 1
        return fake.logits(ids[0].tolist())[-last:]

    class Cfg:
        max_position_embeddings = 10_000

    class M:
        config, device = Cfg(), "cpu"

        def runnable_pattern(self, p):
            return p

    monkeypatch.setattr(runner, "_last_logits", last_logits)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(64) for _ in range(rng.randint(5, 60))]
        ids = ids + ids[: rng.randint(1, len(ids))]  # an earlier copy for the drafts to find
        fake.forwards = 0
        plain = runner.greedy_generate(M(), _ByteTok(), ids, 12, draft=False)
        plain_fw = fake.forwards
        fake.forwards = 0
        fast = runner.greedy_generate(M(), _ByteTok(), ids, 12, draft=True)
        assert fast.ids == plain.ids and len(plain.ids) == 12 and plain_fw == 12
        assert fake.forwards == fast.forwards <= plain_fw
    assert fast.forwards < plain_fw  # the copy rule accepts whole drafts


def test_stop_strings():
    assert runner._cut(" 12345. More", ("\n", ".")) == (" 12345", True)
    assert runner._cut("\n 42 and", ("\n", INT)) == ("\n 42", True)  # leading whitespace never stops
    assert runner._cut(" 12", (INT,)) == (" 12", False)  # the integer may still go on


def test_decoding_paths_agree_on_a_random_model(tmp_path):
    """Recompute with and without drafts and the cached engine give the same greedy tokens."""
    from indexcache.checkpoint import load_model
    from indexcache.presets import make_random_checkpoint

    d = make_random_checkpoint(tmp_path / "m", preset="tiny", seed=1)
    model = load_model(d, verbose=False).eval()
    tk = load_tokenizer(d)
    ids = tk.encode("the cat sat on the mat. " * 6 + "the cat").ids  # 151 tokens, index_topk 8
    for pat in ("FFFFFF", "FSSFSS"):
        a = runner.greedy_generate(model, tk, ids, 10, pat, draft=False)
        b = runner.greedy_generate(model, tk, ids, 10, pat, draft=True)
        c = runner.greedy_generate_cached(runner.make_engine(model, pat, 200), tk, ids, 10)
        assert a.ids == b.ids == c.ids and a.text == b.text == c.text
        assert c.forwards == 10 and a.forwards == 10


def test_decoding_paths_agree_on_the_bundled_model(tok):
    """On the trained model, past index_topk, with Shared layers: one task sample, both paths."""
    from indexcache.checkpoint import load_model

    model = load_model(MODEL, verbose=False).eval()
    s = make_sample("niah_multikey", tok, 400, seed=2)
    pat = "FSSSFSSSFSSSFSSS"
    eng = runner.make_engine(model, pat, 512)
    a = runner.run_sample(model, tok, s, pat, draft=True, eos_id=0)
    b = runner.run_sample(model, tok, s, pat, eos_id=0, engine=eng)
    assert a["outputs"] == b["outputs"] and a["score"] == b["score"]


# ------------------------------------------------------------------------------------------------- CLI
def test_eval_cli_end_to_end(tmp_path, capsys):
    from indexcache.cli import main
    from indexcache.presets import make_random_checkpoint

    d = make_random_checkpoint(tmp_path / "tiny", preset="tiny", seed=3)
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(corpus(6_000, seed=1)))
    out = tmp_path / "r" / "eval.json"
    argv = ["eval", str(d), "--pattern", "all-full", "--pattern", "uniform:2", "--tasks", "niah_single,mqar",
            "--lengths", "400", "--samples", "1", "--ppl-data", f"held={text}", "--ppl-windows", "2", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["command"] == "indexcache " + " ".join(argv)
    assert [r["pattern"] for r in rep["results"]] == ["FFFFFF", "FFSFSF"]
    for r in rep["results"]:
        assert set(r["tasks"]) == {"niah_single", "mqar"} and r["ppl"]["held"] > 1 and r["length"] == 400
        assert r["average"] == pytest.approx(sum(r["tasks"].values()) / 2)
    assert len(rep["samples"]) == 4 and all(s["num_tokens"] <= 400 for s in rep["samples"])
    for r in rep["results"]:  # intervals beside every score, and the shared pattern paired with all Full
        lo, hi = r["average_ci95"]
        assert lo <= r["average"] <= hi and r["sample_counts"] == {"niah_single": 1, "mqar": 1}
        assert r["ppl_ci95"]["held"][0] <= r["ppl"]["held"] <= r["ppl_ci95"]["held"][1]
    assert "minus_all_full" not in rep["results"][0]
    paired = rep["results"][1]["minus_all_full"]
    assert paired["average"] == pytest.approx(rep["results"][1]["average"] - rep["results"][0]["average"])
    assert paired["ci95"][0] <= paired["average"] <= paired["ci95"][1]
    assert "avg 95% CI" in printed
    assert "FFSFSF" in printed and "ppl:held" in printed and "niah_single" in printed and "in-prompt guess" in printed

    for bad, msg in ((["--lengths", "99999"], "max_position_embeddings"), (["--tasks", "nope"], "unknown task")):
        rc = main(["eval", str(d), "--samples", "1", "--quiet", "--out", str(out), *bad])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1


def test_a_stopped_eval_resumes_where_it_stopped_and_gives_the_same_report(tmp_path, capsys, monkeypatch):
    """A run stopped by SIGTERM after three samples leaves them in its progress file, --resume scores only
    the rest, and the report equals an uninterrupted run's."""
    from indexcache.cli import main
    from indexcache.presets import make_random_checkpoint

    d = make_random_checkpoint(tmp_path / "tiny", preset="tiny", seed=3)
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(corpus(6_000, seed=1)))
    base = ["eval", str(d), "--pattern", "all-full", "--pattern", "uniform:2", "--tasks", "niah_single,passkey",
            "--lengths", "400", "--samples", "2", "--ppl-data", f"held={text}", "--ppl-windows", "2", "--quiet"]
    whole = tmp_path / "whole.json"
    assert main([*base, "--out", str(whole)]) == 0
    assert not Path(f"{whole}.partial").exists()  # gone once the report holds everything

    out = tmp_path / "stopped.json"
    real, calls = runner.run_sample, []

    def stops_after_three(*args, **kwargs):
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what a time limit (timeout, a scheduler) sends
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_sample", stops_after_three)
    assert main([*base, "--out", str(out)]) != 0  # the CLI reports the interruption in one line
    partial = json.loads(Path(f"{out}.partial").read_text())
    assert len(partial["samples"]) == 3 and len(partial["ppl"]) == 1 and not out.exists()
    capsys.readouterr()

    assert main([*base, "--out", str(out)]) == 2  # without --resume the progress is not thrown away
    err = capsys.readouterr().err
    assert "--resume continues it" in err and err.count("\n") == 1
    assert main([*base[:-1], "--samples", "3", "--quiet", "--resume", "--out", str(out)]) == 2  # another evaluation
    assert "differs in samples" in capsys.readouterr().err
    assert main([*base, "--fp32-dot", "tf32x3", "--resume", "--out", str(out)]) == 2  # other fp32 products
    assert "differs in fp32_dot" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(runner, "run_sample", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main([*base, "--resume", "--out", str(out)]) == 0
    assert len(calls) == 8 - 3  # 2 patterns x 2 families x 2 samples, three of them already scored
    a, b = json.loads(whole.read_text()), json.loads(out.read_text())
    assert b["resumed"]["samples"] == 3 and b["resumed"]["ppl_sets"] == 1 and "resumed" not in a
    assert a["samples"] == b["samples"] and "fp32_dot" not in a  # named only where it acts: fp32 on a GPU
    for x, y in zip(a["results"], b["results"], strict=True):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
    assert not Path(f"{out}.partial").exists()
