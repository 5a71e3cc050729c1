"""Synthetic retrieval windows for training: exact length, determinism, answers that are look-ups, and no
overlap with the evaluation suite's prompts."""

import re
from pathlib import Path

import numpy as np
import pytest

from indexcache.data.synthetic import corpus
from indexcache.evals import tasks
from indexcache.train import retrieval
from indexcache.train.data import tokenize
from indexcache.train.retrieval import retrieval_batch, retrieval_window

MODEL = Path(__file__).resolve().parents[1] / "models" / "dsa-mini"


@pytest.fixture(scope="module")
def tok_stream():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    return tok, tokenize(corpus(120_000, seed=3), tok)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_windows_have_the_length_and_are_deterministic(tok_stream):
    tok, stream = tok_stream
    a_ids, a_mask = retrieval_batch(stream, tok, 3, 1024, seed=7, step=4)
    b_ids, b_mask = retrieval_batch(stream, tok, 3, 1024, seed=7, step=4)
    c_ids, _ = retrieval_batch(stream, tok, 3, 1024, seed=7, step=5)
    assert a_ids.shape == (3, 1024) and a_mask.shape == (3, 1024)
    assert np.array_equal(a_ids, b_ids) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_ids, c_ids)
    assert all(0.0 < m.mean() < 0.6 for m in a_mask)  # every window asks something, none is all answers


def test_every_answer_is_a_look_up_of_earlier_text(tok_stream):
    tok, stream = tok_stream
    checked = 0
    for i in range(12):
        ids, mask = retrieval_window(stream, tok, 1024, np.random.default_rng([11, i]), density=0.4)
        for s, e in _runs(mask):
            before = tok.decode(ids[:s].tolist())
            answer = tok.decode(ids[s:e].tolist())
            n = e - s + 1  # the answer with the token before it
            verbatim = any(np.array_equal(ids[j : j + n], ids[s - 1 : e]) for j in range(s - n + 1))
            if not verbatim:  # a multi-value or chain answer: every word of it was given before
                for word in re.findall(r"[A-Za-z0-9-]+", answer):
                    assert word == "and" or word in before, (word, answer)
            checked += 1
    assert checked > 50


def test_templates_and_words_are_not_the_evaluation_suites():
    ours = set(retrieval.WORDS + retrieval.COLOURS + retrieval.FIRST + retrieval.LAST
               + [w for t in retrieval.THINGS + retrieval.PLACE_NOUN for w in t.split()])
    assert not ours & (set(tasks.ADJECTIVES) | set(tasks.NOUNS))
    src = Path(retrieval.__file__).read_text().split('"""', 2)[2]  # the code, not the module docstring
    for phrase in ("magic number", "pass key", "VAR ", ": I will ask"):
        assert phrase not in src


def test_too_short_a_stream_is_refused(tok_stream):
    tok, stream = tok_stream
    with pytest.raises(ValueError, match="too short"):
        retrieval_window(stream[:1000], tok, 1024, np.random.default_rng(0))


def test_a_window_too_short_for_any_episode_is_refused(tok_stream):
    tok, stream = tok_stream
    with pytest.raises(ValueError, match="too short for retrieval"):
        retrieval_window(stream, tok, 8, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["secret", "group", "roster", "track", "rank"])
def test_each_later_kind_asks_only_for_what_it_stated(tok_stream, kind):
    tok, stream = tok_stream
    answers = 0
    for i in range(6):
        ids, mask = retrieval_window(stream, tok, 2048, np.random.default_rng([5, i]), density=0.4, kinds=(kind,))
        assert ids.shape == (2048,)
        for s, e in _runs(mask):
            before = tok.decode(ids[:s].tolist())
            for word in re.findall(r"[A-Za-z0-9-]+", tok.decode(ids[s:e].tolist())):
                assert word == "and" or word in before, (kind, word)
            answers += 1
    assert answers >= 6


def test_chains_and_value_lists_keep_their_written_order(tok_stream):
    tok, stream = tok_stream
    checked = 0
    for i in range(8):
        ids, _ = retrieval_window(stream, tok, 2048, np.random.default_rng([9, i]), density=0.3, kinds=("track",))
        text = tok.decode(ids.tolist())
        # each name is assigned (left of "=" / ":=" / "into") before it is read from
        for m in re.finditer(r"(?:LET|REG|CELL|SLOT|BOX) ([A-Z]+) = (?:(?:REG|CELL|SLOT|BOX) )?([A-Z]+)\.", text):
            b, a = m.groups()
            first_set = re.search(rf"(?:LET|REG|CELL|SLOT|BOX) {a} = ", text)
            assert first_set is not None and first_set.start() < m.start(), (a, b)
            checked += 1
    assert checked > 5


def test_the_first_six_kinds_draw_what_they_drew_before_the_others_existed(tok_stream):
    """Naming the first curriculum's kinds reproduces its windows: adding kinds must not move its draws.
    The reference is a fixed digest of the windows the first curriculum's code made for these arguments."""
    import hashlib

    tok, stream = tok_stream
    ids, mask = retrieval_batch(stream, tok, 2, 512, seed=3, step=1, kinds=retrieval.FIRST_KINDS)
    digest = hashlib.sha256(ids.astype(np.int64).tobytes() + mask.astype(bool).tobytes()).hexdigest()
    assert digest == "b0a8674f233e9b3b4c1f87beebe0087d833df80c95ef5fa89de988586340d135"
    everything = retrieval_batch(stream, tok, 2, 512, seed=3, step=1)
    assert not np.array_equal(ids, everything[0])  # the default draws from all kinds


def test_kind_weights_default_and_override(tok_stream):
    """A bare kind keeps its weight (so the old draws stay), ``name:w`` sets it, and bad entries are refused."""
    from indexcache.errors import DataError

    names, w = retrieval.kind_weights(["secret", "fact"])
    assert names == ["fact", "secret"] and w.tolist() == [0.4, 0.12]  # KINDS order, default weights
    names, w = retrieval.kind_weights(["secret:2", "fact"])
    assert names == ["fact", "secret"] and w.tolist() == [0.4, 2.0]
    for bad, msg in (("nope", "unknown retrieval episode kind 'nope'"), ("secret:x", "must be a number"),
                     ("secret:0", "must be positive")):
        with pytest.raises(DataError, match=msg):
            retrieval.kind_weights([bad])
    tok, stream = tok_stream
    plain = retrieval_batch(stream, tok, 2, 512, seed=3, step=1, kinds=("fact", "secret"))[0]
    same = retrieval_batch(stream, tok, 2, 512, seed=3, step=1, kinds=("fact:0.4", "secret:0.12"))[0]
    heavy = retrieval_batch(stream, tok, 2, 512, seed=3, step=1, kinds=("fact", "secret:5"))[0]
    assert np.array_equal(plain, same) and not np.array_equal(plain, heavy)


def test_retrieval_calibration_windows(tmp_path):
    from indexcache.data import load_calibration
    from indexcache.data.text import DataError

    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(corpus(40_000, seed=5)))
    plain = load_calibration(MODEL, text, 3, 700, seed=1)
    mixed = load_calibration(MODEL, text, 3, 700, seed=1, retrieval_mix=0.5)
    again = load_calibration(MODEL, text, 3, 700, seed=1, retrieval_mix=0.5)
    assert tuple(mixed.windows.shape) == (3, 700) and mixed.fingerprint != plain.fingerprint
    assert mixed.fingerprint == again.fingerprint  # from (seed, window) alone
    assert load_calibration(MODEL, text, 3, 700, seed=2, retrieval_mix=0.5).fingerprint != mixed.fingerprint
    assert 0.03 < mixed.answer_share < 0.5 and "retrieval episodes" in mixed.source
    assert plain.answer_share is None
    rows = tmp_path / "rows.npy"
    np.save(rows, plain.windows.numpy())
    with pytest.raises(DataError, match="ready windows"):
        load_calibration(MODEL, rows, 2, 700, retrieval_mix=0.5)
    with pytest.raises(DataError, match="must be in"):
        load_calibration(MODEL, text, 2, 700, retrieval_mix=0.95)


def test_search_calibrates_on_retrieval_windows(tmp_path, capsys):
    import json

    from indexcache.cli import main
    from indexcache.presets import make_random_checkpoint

    d = make_random_checkpoint(tmp_path / "tiny", preset="tiny", seed=4)
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(corpus(20_000, seed=6)))
    out = tmp_path / "s"
    assert main(["search", str(d), "--data", str(text), "--retrieval-mix", "0.4", "--num-samples", "2", "--seq-len",
                 "600", "--num-full", "3", "--baselines", "none", "--out", str(out)]) == 0
    cal = json.loads((out / "report.json").read_text())["calibration"]
    assert cal["retrieval_mix"] == 0.4 and cal["answer_share"] > 0 and "retrieval episodes" in cal["source"]
    capsys.readouterr()
    assert main(["search", str(d), "--retrieval-mix", "1.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--retrieval-mix" in err and err.strip().count("\n") == 0 and not (tmp_path / "bad").exists()
