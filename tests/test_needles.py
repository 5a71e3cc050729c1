"""The answer diagnosis (analysis/needles.py): the answer's tokens are found where the needle writes them,
the teacher-forced rows line up with a plain forward, and the recall reads each layer's real selection."""

import json
from pathlib import Path

import pytest
import torch

from indexcache.analysis.needles import answer_sources, diagnose_sample, summarise
from indexcache.data.text import load_tokenizer
from indexcache.evals.tasks import Haystack, make_sample
from indexcache.pattern import Pattern
from indexcache.runner import NativeRunner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from indexcache.checkpoint import load_model
    from indexcache.presets import make_random_checkpoint

    d = make_random_checkpoint(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", seed=4)
    return d, load_model(d, device="cpu"), load_tokenizer(d)


@pytest.mark.parametrize("family", ["passkey", "niah_single", "niah_multikey"])
def test_answer_tokens_spell_the_answer_inside_its_needle(tiny, family):
    _, _, tok = tiny
    s = make_sample(family, tok, 600, index=2, seed=1, haystack=Haystack())
    answer_tok, needle_tok = answer_sources(s, tok)
    enc = tok.encode(s.prompt)
    assert answer_tok and set(answer_tok) <= set(needle_tok)
    # every place the needle writes the answer, and nothing else: passkey's needle states the key twice
    runs = [[answer_tok[0]]]
    for t in answer_tok[1:]:
        (runs[-1].append(t) if t == runs[-1][-1] + 1 else runs.append([t]))
    assert len(runs) == (2 if family == "passkey" else 1)
    for r in runs:
        covered = s.prompt[enc.offsets[r[0]][0]:enc.offsets[r[-1]][1]]
        assert s.answers[0] in covered and len(covered) < len(s.answers[0]) + 4  # the answer's tokens, no more


def test_teacher_forced_rows_and_recall_match_the_model(tiny):
    """Token accuracy and NLL equal those of a plain forward's rows; each layer's recall is recomputed from the
    selections a traced forward records; a Shared layer's recall is its Full layer's."""
    from indexcache.model.dsa import Trace

    _, model, tok = tiny
    s = make_sample("passkey", tok, 500, index=0, seed=3, haystack=Haystack())
    pattern = Pattern.parse("FFSFFS")
    d = diagnose_sample(NativeRunner(model), tok, s, pattern)

    prompt, target = tok.encode(s.prompt).ids, tok.encode(s.targets[0]).ids
    ids = torch.tensor([prompt + target])
    trace = Trace(indices=True, layers=set(range(6)))
    with torch.no_grad():
        logits = model(ids, pattern=pattern, trace=trace)[0, len(prompt) - 1:-1].float()
    gold = torch.tensor(target)
    assert d["token_accuracy"] == pytest.approx(float((logits.argmax(-1) == gold).float().mean()))
    assert d["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, gold)), rel=1e-4)
    assert d["first_token_correct"] == bool(logits[0].argmax() == gold[0])
    with torch.no_grad():
        dense = model(ids, dense=True)[0, len(prompt) - 1:-1].float()
    assert d["dense_token_accuracy"] == pytest.approx(float((dense.argmax(-1) == gold).float().mean()))
    assert not torch.allclose(dense, logits)  # the dense read differs from the sparse one

    answer_tok, _ = answer_sources(s, tok)
    assert len(prompt) > 4 * model.config.index_topk  # the selection is a small part of the context
    for layer, rec in trace.records.items():
        kept = set(rec.indices[0, len(prompt) - 1].tolist()) - {-1}
        assert d["answer_recall"][layer] == pytest.approx(sum(t in kept for t in answer_tok) / len(answer_tok))
    assert d["answer_recall"][2] == d["answer_recall"][1] and d["answer_recall"][5] == d["answer_recall"][4]
    assert d["needle_recall"][2] == d["needle_recall"][1]


def test_summary_and_eval_report(tiny, tmp_path, capsys):
    from indexcache.cli import main

    path, _, _ = tiny
    out = tmp_path / "eval.json"
    argv = ["eval", str(path), "--tasks", "passkey,niah_single", "--lengths", "400", "--samples", "2", "--diagnose",
            "--quiet", "--out", str(out)]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(Path(out).read_text())
    (row,) = rep["results"]
    assert set(row["diagnosis"]) == {"passkey", "niah_single"}
    for fam, summ in row["diagnosis"].items():
        ds = [s["diagnosis"] for s in rep["samples"] if s["family"] == fam]
        assert summ["samples"] == len(ds) == 2
        assert summ["token_accuracy"] == pytest.approx(sum(x["token_accuracy"] for x in ds) / 2)
        assert summ["dense_first_token_correct"] == sum(x["dense_first_token_correct"] for x in ds) / 2
        assert all(0.0 <= v <= 1.0 for v in summ["answer_recall"].values()) and len(summ["answer_recall"]) == 6
        assert summ == json.loads(json.dumps(summarise(ds)))  # the same summary from the JSON's own samples
        assert f"{fam}: answer tokens ranked first" in printed
