"""The bundled trained model: transformers loads it with the same logits, variants carry their patterns,
and the indexer recall helper matches a hand computation."""

import os
from pathlib import Path

import pytest
import torch

from indexcache import Trace, load_model
from indexcache.analysis.recall import indexer_recall

ROOT = Path(__file__).resolve().parents[1] / "models"
MINI = ROOT / "dsa-mini"


def _ids(n=1100, seed=0):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    from indexcache.data.synthetic import corpus

    ids = tok.encode(corpus(20_000, seed)[0]).ids
    return torch.tensor([ids[:n]])


# The held-out book is not in the repository: point INDEXCACHE_BOOKS at a directory of the Gutenberg books
# (e.g. INDEXCACHE_BOOKS=path/to/gutenberg python -m pytest -q tests/test_bundled_model.py) to run this test.
BOOKS = os.environ.get("INDEXCACHE_BOOKS")
HELDOUT_BOOK = Path(BOOKS or "/nonexistent") / "1260-jane-eyre.txt.xz"


def _hf_logits_and_indices(ids):
    """transformers' logits, and the top-k indices its indexers chose (recorded by wrapping forward)."""
    import transformers
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf_mod

    chosen = []
    orig = hf_mod.GlmMoeDsaIndexer.forward

    def record(self, *a, **k):
        out = orig(self, *a, **k)
        chosen.append(out[0].long())
        return out

    hf_mod.GlmMoeDsaIndexer.forward = record
    try:
        hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(str(MINI), dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf(input_ids=ids).logits
    finally:
        hf_mod.GlmMoeDsaIndexer.forward = orig
    return logits, chosen


def _assert_agrees_up_to_exact_ties(ids: torch.Tensor) -> None:
    """Where the two implementations pick different top-k sets, the tokens swapped have index scores equal
    to fp32 rounding (the inputs differ in the last bits: attention runs absorbed here, expanded there);
    before the first such query the logits agree to 1e-4."""
    assert ids.shape[1] >= 4 * 256
    ours = load_model(MINI, verbose=False)
    assert str(ours.pattern) == "F" * 16 and ours.config.index_topk == 256
    tr = Trace(indices=True, index_scores=True)
    with torch.no_grad():
        a = ours(ids, trace=tr)
    b, chosen = _hf_logits_and_indices(ids)
    first, root_checked = ids.shape[1], False
    for layer in range(16):
        mine, theirs = tr.records[layer].indices[0], chosen[layer]
        scores = tr.records[layer].index_scores[0]
        rows = [t for t in range(256, ids.shape[1]) if set(mine[t].tolist()) != set(theirs[t].tolist())]
        if rows and not root_checked:
            # the earliest layer that diverges sees inputs equal up to rounding: every difference is a tie
            for t in rows:
                swapped = [float(scores[t, i]) for i in set(mine[t].tolist()) ^ set(theirs[t].tolist())]
                assert max(swapped) - min(swapped) < 1e-5 * max(1.0, abs(max(swapped))), (layer, t, swapped)
            root_checked = True
        first = min([first, *rows])  # later layers' differences follow from it (positions >= first)
    assert first > 256  # the comparison covers more than the rows every selection holds whole
    assert (a[:, :first] - b[:, :first]).abs().max().item() < 1e-4


@pytest.mark.skipif(not HELDOUT_BOOK.exists(), reason="set INDEXCACHE_BOOKS to the books directory")
def test_bundled_model_matches_transformers_on_heldout_text():
    import lzma

    from tokenizers import Tokenizer

    text = lzma.open(HELDOUT_BOOK, "rt", encoding="utf-8").read()[200_000:260_000]
    _assert_agrees_up_to_exact_ties(
        torch.tensor([Tokenizer.from_file(str(MINI / "tokenizer.json")).encode(text).ids[:1100]]))


def test_bundled_model_agrees_with_transformers_up_to_exact_ties():
    _assert_agrees_up_to_exact_ties(_ids())


@pytest.mark.parametrize("name, pattern", [("dsa-mini-aware-half", "FSFSFSFSFSFSFSFS"),
                                           ("dsa-mini-aware-quarter", "FSSSFSSSFSSSFSSS")])
def test_training_aware_variant_cards_carry_their_patterns(name, pattern):
    """The variants' weights are not in the repository; their config.json records the pattern they were
    trained for, which load_model and transformers read as the checkpoint's own."""
    from indexcache import DSAConfig

    cfg = DSAConfig.from_file(ROOT / name)
    assert str(cfg.pattern) == pattern and cfg.pattern_source == "config indexer_types"


def test_recall_matches_hand_computation():
    model = load_model(MINI, verbose=False)
    ids = _ids(300, seed=3)
    r = indexer_recall(model, [ids])
    tr = Trace(indices=True, attn=True, layers={5})
    with torch.no_grad():
        model(ids, dense=True, trace=tr)
    p, idx = tr.records[5].attn[0], tr.records[5].indices[0]
    mass = [float(p[t, idx[t]].sum()) for t in range(256, 300)]
    assert r["recall"][5] == pytest.approx(sum(mass) / len(mass), rel=1e-5)
    assert r["random_baseline"] == pytest.approx(sum(256 / (t + 1) for t in range(256, 300)) / 44, rel=1e-6)
    assert r["mean_recall"] > r["random_baseline"]


def test_bundled_tokenizer_loads_in_transformers_and_round_trips():
    import transformers
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(str(MINI))
    text = "Reader, I married him. — naïve café, 1847."
    assert tok.decode(tok(text)["input_ids"]) == text
    ours = Tokenizer.from_file(str(MINI / "tokenizer.json"))
    assert ours.get_vocab_size() == 8192 and ours.encode(text).ids == tok(text)["input_ids"]
    assert len(ours.encode("the question of the day").ids) < len("the question of the day") / 2  # real merges
