"""Long-context task generators: RULER-style needle, tracking and aggregation tasks, passkey retrieval and
multi-query associative recall, fitted to a context length in tokens of the model's own tokenizer.

Every sample is deterministic from ``(seed, family, length, index)`` and carries its prompt, its gold
answers, where its needles sit (characters and tokens) and the metric that scores it.

Families and their metrics (scores are fractions here; the runner reports them x100, as RULER does):

=================  ===================================================================  ==========================
family             what the model must do                                               metric
=================  ===================================================================  ==========================
niah_single        copy the one 7-digit number hidden for a key                         string_match_all (1 ref)
niah_multikey      the same, with 3 distractor needles for other keys                   string_match_all (1 ref)
niah_multivalue    list the 4 numbers hidden for one key                                string_match_all (4 refs)
niah_multiquery    answer 4 keys in turn (one answer per turn)                          string_match_all per turn
passkey            the pass key of LongLoRA's prompt                                    first integer == key
vt                 every variable of a 4-hop assignment chain                           string_match_all, words
cwe                the 10 words that repeat most in a numbered list                     string_match_all, words
fwe                the 3 most frequent coded words (Zipf counts)                        string_match_all, words
mqar               the number paired with a key, for 4 keys in turn                     first integer per turn
=================  ===================================================================  ==========================

``string_match_all`` is RULER's metric: the fraction of gold answers found (case-insensitive) in the output;
"words" means a gold answer must match whole words, so ``rain`` is not found in ``train``.
``string_match_part`` (1 if any gold answer is found) is what RULER uses for its QA tasks; no family here is
scored with it, and with a single gold answer the two metrics agree.

Templates follow RULER (``NVIDIA/RULER``), LongLoRA's passkey prompt and Zoology's MQAR, adapted for small
base models with no instruction tuning (each adaptation is named in its generator's docstring). The common
rule: **the prompt ends exactly where the answer begins**, and the answer can be copied from the context
(the needle says ``The special magic number for K is: V.`` and the prompt ends with
``The special magic number for K is:``). Multi-query tasks are asked one query per turn: the model's own
greedy answer to a turn (cut at its stop string) is kept in the context before the next query.

Haystacks (:class:`Haystack`): text from a file or directory of books (a random passage, starting at a
sentence), the built-in synthetic corpus of :mod:`indexcache.data.synthetic` (the default), or RULER's
``noise`` sentence repeated.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.synthetic import corpus
from ..data.text import DataError, read_texts
from ..errors import TaskError

FAMILIES = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey", "vt", "cwe", "fwe", "mqar",
)

INT = "<int>"  # a stop marker: the output is complete once its first integer is (the first-integer metric)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER's needle depths (%): round(linspace(0, 100, 40))

# Keys of the needle tasks are adjective-noun pairs, as RULER's "words" keys.
ADJECTIVES = (
    "amber ancient bitter brave bright broken calm clever cold crimson curious dusty eager early faint fierce "
    "gentle golden hidden hollow humble icy jolly lazy little lively lonely loud lucky marble mellow misty "
    "narrow noble odd pale patient plain polite proud quiet rapid rough rusty salty shy silent silver sleepy "
    "smooth sour steady stormy sunny swift tall tender tidy wandering warm wild wise wooden young"
).split()
NOUNS = (
    "anchor apple badger barrel basket beacon bell blanket bottle bridge candle canyon carpet castle cellar "
    "chimney cloud comet compass cottage crow desert drum engine falcon feather fiddle forest fountain garden "
    "glacier harbor helmet island kettle ladder lantern lemon meadow mirror mountain needle orchard otter "
    "parcel pepper pigeon pillow puzzle quarry rabbit river saddle shadow signal spoon statue thimble tower "
    "trumpet tunnel valley violin wagon walnut whistle window"
).split()


# ------------------------------------------------------------------------------------------- samples
@dataclass
class Needle:
    """Inserted text and where it sits in the prompt: ``prompt[char_start:char_end] == text``; tokens
    ``token_start:token_end`` of the prompt's encoding are the smallest run that covers those characters."""

    text: str
    char_start: int
    char_end: int
    token_start: int = -1
    token_end: int = -1


@dataclass
class Sample:
    family: str
    length: int  # the requested context length in tokens
    index: int
    seed: int
    prompt: str  # ends exactly where the (first) answer begins
    answers: list[str]  # gold answers; with followups, one per turn
    targets: list[str]  # a perfect completion per turn, in the template's format
    followups: list[str] = field(default_factory=list)  # turn 2.. queries, each appended after the last answer
    needles: list[Needle] = field(default_factory=list)
    metric: str = "all"  # all | all_words | first_int (applied per turn when there are followups)
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 16  # at least the longest target turn's tokens plus 4
    num_tokens: int = 0  # tokens of the prompt plus the followups (what the runner feeds, answers aside)
    chance: float = 0.0  # expected score of a blind guess from the answers' distribution
    copy_chance: float = 0.0  # expected score of a uniform pick among same-form candidates in the prompt
    meta: dict = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return 1 + len(self.followups)

    def to_dict(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        if not with_prompt:
            for k in ("prompt", "followups"):
                d.pop(k)
        return d


# ------------------------------------------------------------------------------------------- metrics
def _found(ref: str, pred: str, whole_words: bool) -> bool:
    ref, pred = ref.strip().lower(), pred.lower()
    if not whole_words:
        return ref in pred
    return re.search(r"(?<![0-9a-z])" + re.escape(ref) + r"(?![0-9a-z])", pred) is not None


def string_match_all(pred: str, refs: list[str], whole_words: bool = False) -> float:
    """RULER's metric: the fraction of ``refs`` found in ``pred`` (case-insensitive substrings)."""
    return sum(_found(r, pred, whole_words) for r in refs) / len(refs) if refs else 0.0


def string_match_part(pred: str, refs: list[str], whole_words: bool = False) -> float:
    """RULER's QA metric: 1 if any of ``refs`` is found in ``pred``."""
    return float(any(_found(r, pred, whole_words) for r in refs))


def first_int_match(pred: str, ref: str) -> float:
    """1 if the first integer in ``pred`` equals ``ref`` (landmark attention's passkey scoring)."""
    m = re.search(r"\d+", pred)
    return float(m is not None and int(m.group()) == int(ref))


def _metric(name: str, pred: str, refs: list[str]) -> float:
    if name == "all":
        return string_match_all(pred, refs)
    if name == "all_words":
        return string_match_all(pred, refs, whole_words=True)
    if name == "part":
        return string_match_part(pred, refs)
    if name == "first_int":
        return sum(first_int_match(pred, r) for r in refs) / len(refs)
    raise TaskError(f"unknown metric {name!r}")


def score(sample: Sample, outputs: list[str]) -> float:
    """The sample's score in [0, 1] for the model's outputs (one string per turn)."""
    if len(outputs) != sample.turns:
        raise TaskError(f"{sample.family} sample {sample.index} has {sample.turns} turns, got {len(outputs)} outputs")
    if sample.followups:  # one gold answer per turn, each scored against its own turn only
        return sum(_metric(sample.metric, o, [a]) for o, a in zip(outputs, sample.answers, strict=True)) / len(outputs)
    return _metric(sample.metric, outputs[0], sample.answers)


# ------------------------------------------------------------------------------------------ haystack
_SENT_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)")


def _boundaries(text: str) -> list[int]:
    """Character offsets where a sentence ends (plus both ends): needles go there."""
    return sorted({0, len(text), *(m.end() for m in _SENT_END.finditer(text))})


def pseudo_words(n: int, rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``n`` distinct pronounceable lowercase words (consonant-vowel syllables) in the order drawn."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(*syllables)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class Haystack:
    """Filler text for the needle tasks.

    ``source``: ``None`` for the built-in synthetic corpus, ``"noise"`` for RULER's repeated noise
    sentence, or a text file / directory of books / ``.jsonl`` (read with :func:`indexcache.data.read_texts`).
    A passage starts at a random sentence of the text and holds a requested number of tokens; text too short
    for a passage is repeated, as RULER repeats its essays.
    """

    def __init__(self, source: str | Path | None = None):
        self.kind = "synthetic" if source is None else "noise" if str(source) == "noise" else "text"
        self.name = {"synthetic": "built-in synthetic corpus", "noise": "noise"}.get(self.kind, str(source))
        self._text = ""
        if self.kind == "text":
            docs = [d.strip() for d in read_texts(source) if d.strip()]
            if not docs:
                raise DataError(f"haystack {source} holds no text")
            self._text = "\n\n".join(docs)
        self._words: list[str] | None = None

    def anchor(self, rng: random.Random) -> int:
        """A random starting point: a sentence start in the text, or a seed of the synthetic corpus."""
        if self.kind == "text":
            pos = rng.randrange(len(self._text))
            m = _SENT_END.search(self._text, pos)
            return m.end() if m and m.end() < len(self._text) else 0
        return rng.randrange(1 << 30) if self.kind == "synthetic" else 0

    def _chars(self, anchor: int, n: int) -> str:
        if self.kind == "noise":
            unit = NOISE + "\n"
            return (unit * (n // len(unit) + 1))[:n]
        if self.kind == "synthetic":
            text = "\n\n".join(corpus(n, seed=anchor))
            return text[:n]
        text = self._text
        out = text[anchor : anchor + n]
        while len(out) < n:  # wrap around: the passage continues at the start of the text
            out += "\n\n" + text[: n - len(out) - 2]
        return out[:n]

    def passage(self, anchor: int, num_tokens: int, tokenizer) -> str:
        """Text of exactly ``num_tokens`` tokens (as encoded alone) starting at ``anchor``."""
        if num_tokens <= 0:
            return ""
        n = num_tokens * 5 + 64
        while True:
            chunk = self._chars(anchor, n).lstrip()
            enc = tokenizer.encode(chunk)
            if len(enc.ids) > num_tokens:
                return chunk[: enc.offsets[num_tokens][0]].rstrip()
            n *= 2

    def words(self) -> list[str]:
        """Distinct lowercase words of the haystack (4-10 letters, seen at least twice, sorted), for the
        word-list tasks; pseudo-words stand in when the haystack has too few (the synthetic corpus)."""
        if self._words is None:
            text = self._text[:4_000_000] if self.kind == "text" else "\n".join(corpus(400_000, seed=0))
            counts = Counter(re.findall(r"(?<![A-Za-z'])[a-z]{4,10}(?![A-Za-z'])", text))
            words = sorted(w for w, c in counts.items() if c >= 2)
            if len(words) < 4000:
                extra = [w for w in pseudo_words(8000, random.Random(0)) if w not in set(words)]
                words += extra[: 8000 - len(words)]
            self._words = words
        return self._words


# ------------------------------------------------------------------------------------------- helpers
def _insert(text: str, pieces: list[str], depths: list[float], sep: str = " ") -> tuple[str, list[tuple[int, int]]]:
    """Insert each piece at the sentence boundary nearest its depth (a fraction of the text); pieces at the
    same boundary keep their order. Returns the text and each piece's character span in it."""
    bounds = _boundaries(text)
    places = [min(bounds, key=lambda b, d=d: (abs(b - d * len(text)), b)) for d in depths]
    order = sorted(range(len(pieces)), key=lambda i: (places[i], i))
    out: list[str] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(pieces)
    pos = prev = 0
    for i in order:
        b = places[i]
        head = text[prev:b] + (sep if b > 0 else "")
        out.append(head)
        pos += len(head)
        spans[i] = (pos, pos + len(pieces[i]))
        tail = pieces[i] + ("" if b > 0 or not text else sep)
        out.append(tail)
        pos += len(tail)
        prev = b
    out.append(text[prev:])
    return "".join(out), spans


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _keys(rng: random.Random, n: int) -> list[str]:
    return [f"{a}-{b}" for a, b in rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)]


def _values(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return rng.sample(range(lo, hi + 1), n)


def _zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (sum plus the integral tail; exact enough for counts)."""
    n = 10_000
    return sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha


def _upper_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


@dataclass
class _Draft:
    """What a generator builds for one size: the prompt, its pieces' spans, answers and scoring."""

    prompt: str
    answers: list[str]
    targets: list[str]
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (text, char_start, char_end) in prompt
    followups: list[str] = field(default_factory=list)
    metric: str = "all"
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 16
    chance: float = 0.0
    copy_chance: float = 0.0
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- generators
def _niah(family: str, hay: Haystack, tok, rng: random.Random, size: int, length: int) -> _Draft:
    """RULER's niah_single_2 / niah_multikey_1 / niah_multivalue / niah_multiquery (essay-style haystack,
    adjective-noun keys, 7-digit values).

    Adapted for a base model: the needle reads ``The special magic number for K is: V.`` (``One of the
    special magic numbers for K is: V.`` for multi-value), and the question is followed by the answer's
    lead-in ending in ``is:`` / ``are:``, so the answer is the next tokens and can be copied. Multi-query
    asks its 4 keys one per turn (``The special magic number for K2 is:`` after the model's answer for K1)
    instead of asking for all four numbers in one list.
    """
    nk, nv, nq = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
                  "niah_multiquery": (4, 1, 4)}[family]
    keys = _keys(rng, nk)
    values = _values(rng, nk * nv, 1_000_000, 9_999_999)
    if nv > 1:
        pairs = [(keys[0], v) for v in values]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in pairs]
    else:
        pairs = list(zip(keys, values, strict=True))
        needles = [f"The special magic number for {k} is: {v}." for k, v in pairs]
    depths = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
    queried = list(range(nq)) if nq > 1 else [rng.randrange(nk)]
    anchor = hay.anchor(rng)
    context, spans = _insert(hay.passage(anchor, size, tok), needles, depths)
    single = nv == 1 and nq == 1
    noun = "number" if single else "numbers"
    intro = (f"{'A special magic number is' if single else 'Some special magic numbers are'} hidden within the "
             f"following text. Make sure to memorize {'it' if single else 'them'}. I will quiz you about the "
             f"{noun} afterwards.\n")
    d = _Draft(prompt="", answers=[], targets=[], stop=("\n", "."), max_new_tokens=8, chance=1 / 9_000_000,
               copy_chance=1 / len(needles), meta={"depths": depths, "keys": keys})
    if nv > 1:
        key = keys[0]
        question = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                    f"The special magic numbers for {key} mentioned in the provided text are:")
        d.answers = [str(v) for v in values]
        d.targets = [" " + ", ".join(d.answers) + "."]
        d.stop, d.max_new_tokens = ("\n",), 8
        d.copy_chance, d.chance = 1.0, 1 / 9_000_000  # every 7-digit number in the prompt is an answer
    elif nq > 1:
        qkeys = [keys[i] for i in queried]
        question = (f"\nWhat are the special magic numbers for {_join_keys(qkeys)} mentioned in the provided text?"
                    f"\nThe special magic number for {qkeys[0]} is:")
        d.followups = [f".\nThe special magic number for {k} is:" for k in qkeys[1:]]
        d.answers = [str(values[i]) for i in queried]
        d.targets = [" " + a for a in d.answers]
    else:
        k = keys[queried[0]]
        question = (f"\nWhat is the special magic number for {k} mentioned in the provided text? "
                    f"The special magic number for {k} is:")
        d.answers = [str(values[queried[0]])]
        d.targets = [" " + d.answers[0]]
    d.prompt = intro + context + question
    d.spans = [(n, len(intro) + a, len(intro) + b) for n, (a, b) in zip(needles, spans, strict=True)]
    d.meta["queried"] = [keys[i] for i in queried]
    return d


def _passkey(family: str, hay: Haystack, tok, rng: random.Random, size: int, length: int) -> _Draft:
    """LongLoRA's passkey prompt, word for word, with the haystack's text around the key line (LongLoRA
    uses the noise sentence; pass ``noise`` as the haystack for that). The key is 1..50000 and the prompt
    ends with ``The pass key is``; scored by the first integer of the output, as landmark attention does."""
    key = rng.randint(1, 50_000)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    depth = rng.random()
    anchor = hay.anchor(rng)
    context, spans = _insert(hay.passage(anchor, size, tok), [info], [depth], sep="\n")
    intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
             "I will quiz you about the important information there.\n")
    prompt = intro + context + "\nWhat is the pass key? The pass key is"
    a, b = spans[0]
    return _Draft(prompt=prompt, answers=[str(key)], targets=[f" {key}."],
                  spans=[(info, len(intro) + a, len(intro) + b)],
                  metric="first_int", stop=("\n", ".", INT), max_new_tokens=6, chance=1 / 50_000, copy_chance=1.0,
                  meta={"depths": [depth]})


_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_block(context: str, value: int, n: int) -> tuple[str, str]:
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
                f"the value {value}, they are:")
    return _VT_INTRO + context + question, question


def _vt(family: str, hay: Haystack, tok, rng: random.Random, size: int, length: int) -> _Draft:
    """RULER's variable tracking (1 chain, 4 hops: 5 variables of 5 capital letters, a 5-digit value), its
    chain lines inserted in order at sorted random sentence boundaries, after one solved example (as RULER).
    The lines end with a full stop, and the answer is the variables separated by spaces."""
    hops = 4
    names = []
    while len(names) < 2 * (hops + 1):
        n = _upper_name(rng)
        if n not in names:
            names.append(n)
    ex_names, names = names[: hops + 1], names[hops + 1 :]
    ex_value, value = _values(rng, 2, 10_000, 99_999)

    def chain(ns: list[str], v: int) -> list[str]:
        return [f"VAR {ns[0]} = {v}."] + [f"VAR {ns[i + 1]} = VAR {ns[i]}." for i in range(hops)]

    ex_depths = sorted(rng.random() for _ in range(hops + 1))
    depths = sorted(rng.random() for _ in range(hops + 1))
    ex_anchor, anchor = hay.anchor(rng), hay.anchor(rng)
    ex_ctx, _ = _insert(hay.passage(ex_anchor, 60, tok), chain(ex_names, ex_value), ex_depths)
    example = _vt_block(ex_ctx, ex_value, hops + 1)[0] + " " + " ".join(ex_names) + "\n\n"
    lines = chain(names, value)
    context, spans = _insert(hay.passage(anchor, size, tok), lines, depths)
    body, _ = _vt_block(context, value, hops + 1)
    prompt = example + body
    off = len(example) + len(_VT_INTRO)
    # a guesser that names 5 of the 10 variables in the prompt finds half of the answers on average
    return _Draft(prompt=prompt, answers=list(names), targets=[" " + " ".join(names)],
                  spans=[(t, off + a, off + b) for t, (a, b) in zip(lines, spans, strict=True)],
                  metric="all_words", stop=("\n",), max_new_tokens=8, chance=(hops + 1) / 26**5, copy_chance=0.5,
                  meta={"depths": depths, "value": value, "example_answers": ex_names})


_CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")


def _cwe_block(words: list[str], n_common: int) -> tuple[str, str, int, int]:
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    question = (f"\nQuestion: What are the {n_common} most common words in the above list? Answer: The top "
                f"{n_common} words that appear most often in the list are:")
    return _CWE_INTRO + listing + question, listing, len(_CWE_INTRO), len(_CWE_INTRO) + len(listing)


def _cwe(family: str, hay: Haystack, tok, rng: random.Random, size: int, length: int) -> _Draft:
    """RULER's common words extraction: 10 common words appear 30 times each and ``size`` others 3 times each
    (6 and 1 below 4096 tokens, as RULER), shuffled into a numbered list, after one solved example list
    (10 words x 3 and 10 x 1). Words come from the haystack's vocabulary (pseudo-words for the synthetic
    corpus). The answer is the numbered list ``1. w 2. w ...`` in any order; whole-word matching."""
    n_common = 10
    freq_cw, freq_ucw = (30, 3) if length >= 4096 else (6, 1)
    pool = hay.words()
    if len(pool) < 2 * n_common + 10 + size:
        raise TaskError(f"cwe needs {2 * n_common + 10 + size} distinct words, the haystack has {len(pool)}")
    order = rng.sample(pool, len(pool))
    ex_common, ex_rare = order[:n_common], order[n_common : n_common + 10]
    common, rare = order[n_common + 10 : 2 * n_common + 10], order[2 * n_common + 10 : 2 * n_common + 10 + size]
    ex_words = ex_common * 3 + ex_rare
    rng.shuffle(ex_words)
    words = common * freq_cw + rare * freq_ucw
    rng.shuffle(words)

    def answer(ws: list[str]) -> str:
        return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws))

    example = _cwe_block(ex_words, n_common)[0] + answer(ex_common) + "\n\n"
    body, _, a, b = _cwe_block(words, n_common)
    n_unique = len(common) + len(rare)
    return _Draft(prompt=example + body, answers=list(common), targets=[answer(common)], metric="all_words",
                  stop=("\n",), max_new_tokens=8, chance=n_common / len(pool), copy_chance=n_common / n_unique,
                  meta={"freq_common": freq_cw, "freq_other": freq_ucw, "example_answers": ex_common,
                        "list_span": [len(example) + a, len(example) + b]})


def _coded_words(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        if w not in out:
            out.append(w)
    return out


def _fwe_text(rng: random.Random, vocab: list[str], total: int, alpha: float) -> tuple[str, list[int]]:
    z = _zeta(alpha)
    counts = [int(total * (k + 1) ** -alpha / z) for k in range(len(vocab))]
    words = [("...." if k == 0 else w) for k, w in enumerate(vocab) for _ in range(counts[k])]
    rng.shuffle(words)
    return " ".join(words), counts


_FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the three most "
              "frequently appeared coded words. ")
_FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                 "most frequently appeared words in the above coded text? Answer: According to the coded text "
                 "above, the three most frequently appeared words are:")


def _fwe(family: str, hay: Haystack, tok, rng: random.Random, size: int, length: int) -> _Draft:
    """RULER's frequent words extraction: ``length // 50`` random 6-letter coded words, word of rank k
    repeated ``int(N k^-2 / zeta(2))`` times (N = ``size``), rank 0 replaced by ``....``; the answer is
    ranks 1-3. Adapted: one solved example (a short coded text) comes first, to show the answer's format."""
    alpha = 2.0
    vocab_n = max(8, length // 50)
    coded = _coded_words(rng, vocab_n + 8)
    ex_vocab, vocab = coded[:8], coded[8:]
    ex_text, _ = _fwe_text(rng, ex_vocab, 60, alpha)
    text, counts = _fwe_text(rng, vocab, size, alpha)
    example = _FWE_INTRO + ex_text + _FWE_QUESTION + " " + " ".join(ex_vocab[1:4]) + "\n\n"
    prompt = example + _FWE_INTRO + text + _FWE_QUESTION
    start = len(example) + len(_FWE_INTRO)
    present = sum(1 for c in counts[1:] if c > 0)
    return _Draft(prompt=prompt, answers=vocab[1:4], targets=[" " + " ".join(vocab[1:4])], metric="all_words",
                  stop=("\n",), max_new_tokens=8, chance=3 / 26**6, copy_chance=3 / max(present, 3),
                  meta={"counts": counts[:4], "list_span": [start, start + len(text)],
                        "example_answers": ex_vocab[1:4]})


def _mqar(family: str, hay: Haystack, tok, rng: random.Random, size: int, length: int) -> _Draft:
    """Multi-query associative recall (Zoology's MQAR) in text: ``size`` pairs ``key: value`` (distinct
    pseudo-word keys, distinct 4-digit values), one per line, then 4 queried keys asked one per turn
    (``key:``; the model's answer is kept before the next query). Unlike Zoology's power-law gaps, the
    queried pairs are drawn uniformly over the list, so retrieval depth is spread evenly. Scored by the
    first integer of each turn's answer."""
    n_q = min(4, size)
    keys = pseudo_words(size, rng)
    values = _values(rng, size, 1000, 9999)
    queried = rng.sample(range(size), n_q)
    intro = "Below is a list of keys, each followed by its number. Memorize them: I will ask for some of them.\n"
    lines = [f"{k}: {v}" for k, v in zip(keys, values, strict=True)]
    starts, pos = [], len(intro)
    for ln in lines:
        starts.append(pos)
        pos += len(ln) + 1
    prompt = intro + "\n".join(lines) + f"\n\nNow the numbers of some keys from the list.\n{keys[queried[0]]}:"
    return _Draft(prompt=prompt, answers=[str(values[i]) for i in queried],
                  targets=[f" {values[i]}" for i in queried],
                  followups=[f"\n{keys[i]}:" for i in queried[1:]],
                  spans=[(lines[i], starts[i], starts[i] + len(lines[i])) for i in queried],
                  metric="first_int", stop=("\n", INT), max_new_tokens=6, chance=1 / 9000, copy_chance=1 / size,
                  meta={"num_pairs": size, "queried": [keys[i] for i in queried]})


# name -> (generator, what ``size`` counts, tokens per unit of size (a first guess), initial size per token)
_GENERATORS: dict[str, tuple[Callable[..., _Draft], float, float]] = {
    "niah_single": (_niah, 1.0, 1.0),
    "niah_multikey": (_niah, 1.0, 1.0),
    "niah_multivalue": (_niah, 1.0, 1.0),
    "niah_multiquery": (_niah, 1.0, 1.0),
    "passkey": (_passkey, 1.0, 1.0),
    "vt": (_vt, 1.0, 1.0),
    "cwe": (_cwe, 4.5, 0.12),  # size = words seen once (or 3x); about 4.5 tokens per "12. word" entry
    "fwe": (_fwe, 3.0, 0.33),  # size = coded words in the text
    "mqar": (_mqar, 9.0, 0.1),  # size = key-value lines
}


def _count(tok, d: _Draft) -> int:
    return len(tok.encode(d.prompt).ids) + sum(len(tok.encode(f).ids) for f in d.followups)


def token_span(offsets: list[tuple[int, int]], a: int, b: int) -> tuple[int, int]:
    """The smallest run of tokens ``[t0, t1)`` (by their character ``offsets``) that covers characters
    ``[a, b)``."""
    t0 = next(i for i, (_, e) in enumerate(offsets) if e > a)
    t1 = max(i for i, (s, _) in enumerate(offsets) if s < b) + 1
    return t0, t1


class TooShortError(TaskError):
    """A family whose fixed text (instructions, needles, queries) does not fit the requested length."""


def make_sample(family: str, tokenizer, length: int, index: int = 0, seed: int = 0,
                haystack: Haystack | None = None) -> Sample:
    """One sample of ``family`` whose prompt plus followups hold ``length`` tokens of ``tokenizer`` (to within
    0.25%, never more), deterministic from ``(seed, family, length, index)``."""
    if family not in _GENERATORS:
        raise TaskError(f"unknown task family {family!r} (choose from {', '.join(FAMILIES)})")
    hay = haystack if haystack is not None else Haystack()
    gen, per_unit, init = _GENERATORS[family]
    rng_key = f"{seed}:{family}:{length}:{index}"  # str seeds are hashed with sha512: stable everywhere

    def build(size: int) -> tuple[_Draft, int]:
        d = gen(family, hay, tokenizer, random.Random(rng_key), size, length)
        return d, _count(tokenizer, d)

    tol = max(3, length // 400)
    base_draft, base = build(0 if per_unit == 1.0 else 1)
    if base > length - tol:
        raise TooShortError(f"{family} needs more than {length} tokens for its fixed text ({base} tokens)")
    size = max(1, int((length - base) / per_unit)) if per_unit != 1.0 else length - base
    seen: dict[int, tuple[_Draft, int]] = {}
    best: tuple[_Draft, int] | None = None
    slope = per_unit
    for _ in range(24):
        d, n = seen.get(size) or build(size)
        seen[size] = (d, n)
        if n <= length and (best is None or n > best[1]):
            best = (d, n)
        if length - tol <= n <= length:
            break
        # move by the observed tokens per unit; never revisit a size (the count is not exactly monotone)
        others = [(s, m) for s, (_, m) in seen.items() if s != size]
        if others:
            s0, m0 = min(others, key=lambda t: abs(t[0] - size))
            if m0 != n:
                slope = max(0.5, (n - m0) / (size - s0))
        step = (length - n) / slope
        step = int(step) if abs(step) >= 1 else (1 if n < length else -1)
        nxt = max(1, size + step)
        while nxt in seen and 1 <= nxt:
            nxt += 1 if n < length else -1
        if nxt < 1:
            break
        size = nxt
    if best is None or best[1] < length * 0.98:
        raise TaskError(f"could not fit {family} to {length} tokens")
    d, n = best
    # A perfect answer fits with room to spare: the decoding budget is the longest target turn plus slack
    # (LongLoRA decodes exactly the answer's length); the generator's own figure is a floor.
    budget = max(d.max_new_tokens, max(len(tokenizer.encode(t).ids) for t in d.targets) + 4)
    enc = tokenizer.encode(d.prompt)
    needles = []
    for text, a, b in d.spans:
        t0, t1 = token_span(enc.offsets, a, b)
        needles.append(Needle(text, a, b, t0, t1))
    return Sample(family=family, length=length, index=index, seed=seed, prompt=d.prompt, answers=d.answers,
                  targets=d.targets, followups=d.followups, needles=needles, metric=d.metric, stop=d.stop,
                  max_new_tokens=budget, num_tokens=n, chance=d.chance, copy_chance=d.copy_chance,
                  meta=dict(d.meta, haystack=hay.name))


def make_samples(families: list[str], tokenizer, length: int, num_samples: int, seed: int = 0,
                 haystack: Haystack | None = None) -> list[Sample]:
    """``num_samples`` samples of each family at ``length`` tokens."""
    hay = haystack if haystack is not None else Haystack()
    return [make_sample(f, tokenizer, length, i, seed, hay) for f in families for i in range(num_samples)]


def parse_families(spec: list[str] | str | None) -> list[str]:
    """Families from ``["niah_single", "cwe"]``, ``"niah_single,cwe"``, ``"all"``, ``"niah"`` (a prefix), or
    ``"none"`` (perplexity only)."""
    if spec is None:
        return list(FAMILIES)
    if spec == "none" or spec == ["none"]:
        return []
    items = [s for part in ([spec] if isinstance(spec, str) else spec) for s in part.split(",") if s.strip()]
    out: list[str] = []
    for s in items:
        s = s.strip()
        hit = list(FAMILIES) if s == "all" else [f for f in FAMILIES if f == s or f.startswith(s + "_")]
        if not hit:
            raise TaskError(f"unknown task family {s!r} (choose from all, none, niah, {', '.join(FAMILIES)})")
        out += [f for f in hit if f not in out]
    return out


def chance_levels(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Mean blind-guess and in-prompt-guess scores per family."""
    out: dict[str, dict[str, float]] = {}
    for f in dict.fromkeys(s.family for s in samples):
        ss = [s for s in samples if s.family == f]
        out[f] = {"chance": sum(s.chance for s in ss) / len(ss),
                  "copy_chance": sum(s.copy_chance for s in ss) / len(ss)}
    return out


__all__ = [
    "DEPTHS", "FAMILIES", "INT", "Haystack", "Needle", "Sample", "TaskError", "TooShortError", "chance_levels",
    "first_int_match", "make_sample", "make_samples", "parse_families", "pseudo_words", "score", "string_match_all",
    "string_match_part",
]
