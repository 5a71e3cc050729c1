"""Synthetic retrieval windows, mixed into pretraining so that a small model learns to look things up.

A 15M-parameter model trained on 25M tokens of books does not learn to copy from far back: a held-out
passage repeated word for word costs it almost as much the second time as the first. Long-context tasks
need exactly that skill (find the earlier occurrence of a key, copy what followed it), so the trainer can
replace a share of each batch with windows built here: book text from the training stream with structured
items spliced in at random places, each item later queried or repeated:

    fact      "The locker number of Elm Harbour is 48213."  ...  "The locker number of Elm Harbour is 48213."
              (also as a question, and with several values for one key)
    repeat    a span of book text, or of random tokens, that recurs verbatim later in the window (random
              tokens can only be predicted the second time by copying: the cleanest signal for the
              induction heads that every look-up above relies on)
    listing   a block of ``key -> value`` lines followed by some of them again, in another order
    chain     ``SET QX to 4821.`` / ``SET ZB to QX.`` ... then ``Holding 4821: QX ZB``
    tally     a list of words, a few of them frequent, then the frequent ones
    echo      24-64 random tokens and, at once, the same tokens again: the bare copying task, on which a
              model that has not yet learnt to copy learns it in a few hundred steps (a curriculum's
              first stage: ``--synthetic-kinds echo``), where the diluted signal of the others does not
    secret    one value with no key, stated (often twice) and asked for later: "The vault code is 4821."
    group     several values of one key, stated apart, then all of them in order: "..., 77, 5108 and 9."
    roster    a long table of ``coined-word: number`` lines, then some of its keys again, one per line
    track     two interleaved chains ``LET QX = 4821.`` / ``LET ZB = QX.``, then the names of one chain
    rank      coined or plain words with a few of them frequent, then the top ones, most frequent first

The first six kinds made the first curriculum (``scripts/retrieval_curriculum.sh``); naming exactly those six
in ``--synthetic-kinds`` draws the same windows as then. The last five aim at the answer shapes the first
curriculum's model could not produce: a lone number after a restated secret, a list of values, a look-up in
a table of made-up words, the names along a chain, the most frequent words of a list.

Templates, word lists and seeds are disjoint from the evaluation suite's (:mod:`indexcache.evals.tasks`;
a test checks the word lists), so the suite measures whether the skill transfers, not memorised prompts.
Every window is drawn from ``(seed, step, row)`` alone, so a resumed run sees the same data.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

KINDS = ("fact", "repeat", "listing", "chain", "tally", "echo", "secret", "group", "roster", "track", "rank")
# the first six keep their weights, so that naming only them draws what the first curriculum drew
KIND_WEIGHTS = (0.4, 0.3, 0.12, 0.07, 0.06, 0.05, 0.12, 0.1, 0.12, 0.08, 0.08)
FIRST_KINDS = KINDS[:6]

ATTRIBUTES = ("locker number", "door code", "ticket number", "account number", "room number", "access code",
              "serial number", "order number", "house number", "badge number", "safe combination",
              "postal code", "call sign", "lucky word", "token")
FIRST = ("Abel Bryony Casper Daphne Elias Fern Gideon Hazel Ivo Juniper Kit Linnea Magnus Nell Orrin Perpetua "
         "Rufus Saskia Tobias Ursa Viggo Wren Yorick Zelda").split()
LAST = ("Abernathy Bellweather Crane Dalloway Everly Fenwright Gallow Holloway Ives Kingsley Lockhart Merriweather "
        "Nightingale Ormsby Pike Quarrington Rook Stirling Tremayne Underhill Vane Whitlock").split()
PLACE_ADJ = "North South East West Upper Lower Old New Great Little High".split()
PLACE_NOUN = ("Elm Harbour, Fox Hollow, Ash Green, Stone Cross, Reed Ford, Thorn Hill, Pine Wharf, Oak Gate, "
              "Birch Lane, Hawk Ridge, Moss Bank, Clay Pits").split(", ")
THINGS = ("teapot, umbrella, typewriter, lighthouse, bicycle, telescope, gramophone, wheelbarrow, hourglass, "
          "sextant, scarecrow, bookcase, sundial, weathervane, lamppost, chessboard").split(", ")
COLOURS = "scarlet ochre teal indigo maroon olive cobalt ivory saffron slate".split()
WORDS = ("apron basin cinder dagger ember fable gravel hinge ivory jester kernel locket mortar nectar oyster "
         "pebble quiver ribbon satchel timber umber velvet wicker yarrow zephyr acorn bramble cobweb dormouse "
         "eyelet flint goblet hemlock inkwell juniper kestrel lichen mantle nutmeg oriole pewter quill rafter "
         "sorrel tinder urchin vellum wren").split()


def _key(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    if kind == 0:
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    if kind == 1:
        return f"{rng.choice(PLACE_ADJ)} {rng.choice(PLACE_NOUN)}"
    if kind == 2:
        return f"the {rng.choice(COLOURS)} {rng.choice(THINGS)}"
    return f"unit {int(rng.integers(10, 1000))}-{''.join(rng.choice(list('ABCDEFGHJKLMNPRSTVWXZ'), 2))}"


def _value(rng: np.random.Generator) -> str:
    kind = rng.integers(5)
    if kind <= 2:
        return str(int(rng.integers(10 ** int(rng.integers(1, 8)), 10 ** 8)))
    if kind == 3:
        return str(rng.choice(WORDS))
    return "".join(rng.choice(list("ABCDEFGHJKLMNPRSTVWXZ"), 2)) + "-" + str(int(rng.integers(100, 10000)))


def _join(vals: list[str]) -> str:
    return vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " and " + vals[-1]


class _Episode:
    """Items of one episode: ``(text, answer, group)``; an answer-less item is a statement. Items of a
    higher group are laid out after every item of a lower group of the same episode."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, int]] = []

    def add(self, text: str, group: int, answer: str = "") -> None:
        self.items.append((text, answer, group))


def _fact(rng: np.random.Generator) -> _Episode:
    """Key-value facts, each stated in the episode's form and maybe asked for later; the answer always
    starts right where the query ends (as in a prompt that ends where the answer begins)."""
    ep = _Episode()
    attr = str(rng.choice(ATTRIBUTES))
    rel = str(rng.choice(["of", "for"]))
    sep = str(rng.choice([" is", " is:", ":", " =", " reads"]))
    if rng.random() < 0.15:  # one fact without a key (the whole window hides a single value)
        v = _value(rng)
        ep.add(f"\nThe {attr}{sep} {v}.\n", 0)
        ep.add(f"\nWhat is the {attr}? The {attr}{sep}", 1, f" {v}.\n")
        return ep
    keys = list(dict.fromkeys(_key(rng) for _ in range(int(rng.integers(1, 9)))))
    multi = rng.random() < 0.25
    for k in keys:
        vals = [_value(rng) for _ in range(int(rng.integers(2, 5)) if multi else 1)]
        for i, v in enumerate(vals):
            ep.add(f"\n{'The' if i == 0 else 'Another'} {attr} {rel} {k}{sep} {v}.\n", 0)
        if rng.random() < 0.8:  # not every key is asked for: the model must not expect a query
            style = rng.integers(3)
            if multi:
                ep.add(f"\nAll the {attr}s {rel} {k} are", 1, f" {_join(vals)}.\n")
            elif style == 0:
                ep.add(f"\nThe {attr} {rel} {k}{sep}", 1, f" {vals[0]}.\n")
            elif style == 1:
                ep.add(f"\nQ: What is the {attr} {rel} {k}?\nA: The {attr} {rel} {k}{sep}", 1, f" {vals[0]}.\n")
            else:
                ep.add(f"\nLooking back, the {attr} {rel} {k}{sep}", 1, f" {vals[0]}.\n")
    return ep


def _listing(rng: np.random.Generator) -> _Episode:
    ep = _Episode()
    n = int(rng.integers(4, 33))
    keys = list(dict.fromkeys(str(rng.choice(WORDS)) + "-" + str(int(rng.integers(10, 100))) for _ in range(n)))
    vals = [str(int(rng.integers(100, 100000))) for _ in keys]
    arrow = str(rng.choice(["->", "=>", "|", "=", ":"]))
    gap = "" if arrow == ":" else " "
    ep.add("\nTable:\n" + "".join(f"{k}{gap}{arrow} {v}\n" for k, v in zip(keys, vals, strict=True)), 0)
    order = rng.permutation(len(keys))[: int(rng.integers(1, len(keys) + 1))]
    ep.add("\nLookups:\n", 1)
    for i in order:
        ep.add(f"{keys[i]}{gap}{arrow}", 1, f" {vals[i]}\n")
    return ep


def _chain(rng: np.random.Generator) -> _Episode:
    ep = _Episode()
    hops = int(rng.integers(1, 5))
    names = list(dict.fromkeys("".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), int(rng.integers(2, 4))))
                               for _ in range(hops + 1)))
    v = str(int(rng.integers(1000, 100000)))
    ep.add(f"\nSET {names[0]} to {v}.\n", 0)
    for a, b in zip(names, names[1:], strict=False):
        ep.add(f"\nSET {b} to {a}.\n", 0)
    ep.add(f"\nHolding {v}:", 1, " " + " ".join(names) + "\n")
    return ep


def _tally(rng: np.random.Generator) -> _Episode:
    ep = _Episode()
    pool = list(rng.permutation(WORDS)[: int(rng.integers(8, 20))])
    top = pool[:3]
    counts = [int(rng.integers(6, 10)) for _ in top] + [int(rng.integers(1, 3)) for _ in pool[3:]]
    words = [w for w, c in zip(pool, counts, strict=True) for _ in range(c)]
    ep.add("\nWords: " + " ".join(rng.permutation(words)) + "\n", 0)
    ranked = sorted(top, key=lambda w: -counts[pool.index(w)])
    ep.add("\nMost repeated:", 1, " " + " ".join(ranked) + "\n")
    return ep


SECRET_MOD = "vault cellar gate signal harbour archive spare master winning entry tower garden locker".split()
SECRET_HEAD = "code number word figure combination cipher tag password".split()
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
CAPITALS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _coined(rng: np.random.Generator, lo: int = 4, hi: int = 8) -> str:
    """A made-up lowercase word of random letters (tokenized into several pieces, like any rare name)."""
    return "".join(rng.choice(LETTERS, int(rng.integers(lo, hi + 1))))


def _number(rng: np.random.Generator, lo_digits: int = 1, hi_digits: int = 7) -> str:
    d = int(rng.integers(lo_digits, hi_digits + 1))
    return str(int(rng.integers(10 ** (d - 1), 10**d)))


def _secret(rng: np.random.Generator) -> _Episode:
    """A lone value without a key, said once or restated around itself, then asked for."""
    ep = _Episode()
    # names from a large space: a model that memorised a few of them would not learn to look them up
    mod = [str(rng.choice(SECRET_MOD)), str(rng.choice(WORDS)), _coined(rng, 3, 6)][int(rng.integers(3))]
    name = f"{mod} {rng.choice(SECRET_HEAD)}"
    v = _number(rng, 1, 6) if rng.random() < 0.85 else str(rng.choice(WORDS))
    said = [f"The {name} is {v}.", f"The {name} is {v}. Do not forget it: {v} is the {name}.",
            f"Note this down, the {name} is {v}. Again, {v} is the {name}.",
            f"Here is the {name}: {v}. Keep {v} in mind."][int(rng.integers(4))]
    ep.add(f"\n{said}\n", 0)
    asked = [f"\nWhat is the {name}? The {name} is", f"\nThe {name} is",
             f"\nTell me the {name}. The {name} is", f"\nQ: What was the {name}?\nA: The {name} is"]
    ep.add(asked[int(rng.integers(len(asked)))], 1, f" {v}.\n")
    return ep


def _group(rng: np.random.Generator) -> _Episode:
    """Several values of one key, stated in separate sentences, then all of them in the order given."""
    ep = _Episode()
    attr, key = str(rng.choice(ATTRIBUTES)), _key(rng)
    vals = list(dict.fromkeys(_number(rng, 3, 7) for _ in range(int(rng.integers(2, 6)))))
    for v in vals:
        line = [f"One {attr} of {key} is {v}.", f"{key} has the {attr} {v}.", f"A {attr} for {key}: {v}."]
        ep.add(f"\n{line[int(rng.integers(3))]}\n", 0)
    joined = ", ".join(vals) if rng.random() < 0.5 else _join(vals)
    lead = [f"\nEvery {attr} of {key}, in order:", f"\nThe {attr}s given for {key} are:",
            f"\nList the {attr}s of {key}. They are"][int(rng.integers(3))]
    ep.add(lead, 1, f" {joined}.\n")
    return ep


def _roster(rng: np.random.Generator) -> _Episode:
    """A table of made-up words and their numbers, one per line, then some of the words again."""
    ep = _Episode()
    n = int(np.exp(rng.uniform(np.log(6), np.log(200))))
    keys = list(dict.fromkeys(_coined(rng) for _ in range(n)))
    if rng.random() < 0.3:
        keys = [k.capitalize() for k in keys]
    vals = [_number(rng, 2, 5) for _ in keys]
    head = ["", "Register:\n", "Numbers by name:\n", "Each name has its number.\n"][int(rng.integers(4))]
    ep.add("\n" + head + "".join(f"{k}: {v}\n" for k, v in zip(keys, vals, strict=True)), 0)
    order = rng.permutation(len(keys))[: int(rng.integers(1, min(len(keys), 8) + 1))]
    ep.add(["\n", "\nAgain, some of them:\n", "\nLook-ups from the register:\n"][int(rng.integers(3))], 1)
    for i in order:
        ep.add(f"{keys[i]}:", 1, f" {vals[i]}\n")
    return ep


def _track(rng: np.random.Generator) -> _Episode:
    """Two chains of assignments, their lines interleaved in order, then the names of one chain; a third of
    the time a smaller solved example in the same wording comes first (as a prompt that shows its format)."""
    ep = _Episode()
    style, lead_style = int(rng.integers(4)), int(rng.integers(3))
    word = str(rng.choice(["REG", "CELL", "SLOT", "BOX"]))
    if rng.random() < 1 / 3:
        _track_lines(ep, rng, style, lead_style, word, max_hops=3, solved=True)
    _track_lines(ep, rng, style, lead_style, word, max_hops=5, solved=False)
    return ep


def _track_lines(ep: _Episode, rng: np.random.Generator, style: int, lead_style: int, word: str, max_hops: int,
                 solved: bool) -> None:
    hops = [int(rng.integers(1, max_hops + 1)) for _ in range(2)]
    pool = list(dict.fromkeys("".join(rng.choice(CAPITALS, int(rng.integers(3, 6)))) for _ in range(16)))
    if len(pool) < sum(hops) + 2:
        hops = [1, 1]
    chains, at = [], 0
    for h in hops:
        chains.append(pool[at : at + h + 1])
        at += h + 1
    vals = list(dict.fromkeys(_number(rng, 4, 5) for _ in range(2)))
    if len(vals) < 2:
        vals.append(str(int(vals[0]) + 1))

    def line(b: str, a: str, value: bool = False) -> str:
        ref = a if value else f"{word} {a}"
        return [f"LET {b} = {a}.", f"{b} := {a};", f"Copy {a} into {b}.", f"{word} {b} = {ref}."][style]

    lines = [[line(c[0], v, value=True)] + [line(c[i + 1], c[i]) for i in range(len(c) - 1)]
             for c, v in zip(chains, vals, strict=True)]
    # interleave the two chains at random, each in its own order
    take = rng.permutation([0] * len(lines[0]) + [1] * len(lines[1]))
    pos = [0, 0]
    for t in take:
        ep.add(f"\n{lines[t][pos[t]]}\n", 0)
        pos[t] += 1
    q = int(rng.integers(2))
    lead = [f"\nNames that hold {vals[q]}:", f"\nQ: Which names end up with {vals[q]}?\nA: {len(chains[q])} names:",
            f"\nAfter these steps, {vals[q]} is in"][lead_style]
    answer = " " + " ".join(chains[q]) + "\n"
    if solved:  # stated with its answer, before the episode's own lines
        ep.add(lead + answer, 0)
    else:
        ep.add(lead, 1, answer)


def _rank(rng: np.random.Generator) -> _Episode:
    """A list of words, a few of them clearly more frequent than the rest, then the top ones by count."""
    ep = _Episode()
    numbered, coined = rng.random() < 0.5, rng.random() < 0.5
    block = ""
    for solved in [True] * int(rng.random() < 1 / 3) + [False]:  # maybe a solved list of the same form first
        text, question, answer = _rank_list(rng, numbered, coined, small=solved)
        if solved:
            block += text + question + answer + "\n"
        else:
            ep.add(block + text, 0)
            ep.add(question, 1, answer)
    return ep


def _rank_list(rng: np.random.Generator, numbered: bool, coined: bool, small: bool) -> tuple[str, str, str]:
    n_words = int(rng.integers(5, 10)) if small else int(rng.integers(8, 30))
    pool = list(dict.fromkeys(_coined(rng, 5, 7) for _ in range(n_words))) if coined else \
        [str(w) for w in rng.permutation(WORDS)[:n_words]]
    k = int(rng.integers(1, 4))
    top_counts = sorted(rng.choice(np.arange(4, 13), k, replace=False).tolist(), reverse=True)
    counts = top_counts + [int(rng.integers(1, 3)) for _ in pool[k:]]
    words = [w for w, c in zip(pool, counts, strict=True) for _ in range(c)]
    words = [str(w) for w in rng.permutation(words)]
    if numbered:
        return ("\nList: " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + "\n",
                f"\nThe {k} most frequent words, most frequent first:",
                " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(pool[:k])) + "\n")
    return "\nText: " + " ".join(words) + "\n", f"\nIts {k} commonest words:", " " + " ".join(pool[:k]) + "\n"


BLOCKS = ("listing", "tally", "roster", "rank")  # laid out as one block of statements, then one of queries
ORDERED = ("group", "track")  # statements at their own places, in the order written
BUILDERS = {"fact": _fact, "listing": _listing, "chain": _chain, "tally": _tally, "secret": _secret,
            "group": _group, "roster": _roster, "track": _track, "rank": _rank}


def kind_weights(kinds: tuple[str, ...] | list[str]) -> tuple[list[str], np.ndarray]:
    """The episode kinds to draw, in ``KINDS`` order, and their weights: a bare name keeps its default weight
    (``KIND_WEIGHTS``) and ``name:w`` sets it (``secret:1`` makes the lone-value look-up the most drawn kind).
    Weights are relative; they are normalised where the kinds are drawn."""
    given: dict[str, float] = {}
    for item in kinds:
        name, _, w = str(item).partition(":")
        if name not in KINDS:
            raise DataError(f"unknown retrieval episode kind {name!r} (choose from {', '.join(KINDS)})")
        try:
            weight = float(w) if w else KIND_WEIGHTS[KINDS.index(name)]
        except ValueError:
            raise DataError(f"retrieval episode kind {item!r}: the weight after ':' must be a number") from None
        if not weight > 0:
            raise DataError(f"retrieval episode kind {item!r}: the weight must be positive")
        given[name] = weight
    if not given:
        raise DataError(f"no retrieval episode kinds given (choose from {', '.join(KINDS)})")
    chosen = [k for k in KINDS if k in given]
    return chosen, np.array([given[k] for k in chosen])


def retrieval_window(stream: np.ndarray, tokenizer, seq_len: int, rng: np.random.Generator,
                     density: float | None = None, kinds: tuple[str, ...] = KINDS) -> tuple[np.ndarray, np.ndarray]:
    """One window of ``seq_len`` tokens: book text from ``stream`` with episodes of ``kinds`` spliced in
    until about ``density`` of the tokens (default: random in [0.15, 0.5]) are structured. Returns (ids,
    answer_mask); the mask marks the tokens that can only be predicted by retrieving an earlier part of the
    window."""
    chosen, weights = kind_weights(kinds)
    if stream.shape[0] <= 2 * seq_len:
        raise DataError(f"the token stream ({stream.shape[0]} tokens) is too short for windows of {seq_len}")
    density = float(rng.uniform(0.15, 0.5)) if density is None else density
    budget = int(density * seq_len)
    # (time in [0, 1], token ids, answer mask) per item; episodes keep their queries after their statements
    placed: list[tuple[float, np.ndarray, np.ndarray]] = []
    used = tries = 0
    while used < budget:
        kind = chosen[int(rng.choice(len(chosen), p=weights / weights.sum()))]
        if kind == "echo":
            n = int(rng.integers(24, 65))
            span = rng.integers(2, tokenizer.get_vocab_size(), size=n).astype(np.int64)
            t0 = float(rng.uniform(0, 1))
            mask = np.ones(n, bool)
            mask[0] = False
            items = [(t0, span, np.zeros(n, bool)), (t0 + 1e-9, span, mask)]
        elif kind == "repeat":
            n = int(rng.integers(16, 257))
            if rng.random() < 0.5:
                s = int(rng.integers(0, stream.shape[0] - n))
                span = stream[s : s + n].astype(np.int64)
            else:  # tokens 0 and 1 are end-of-text and padding
                span = rng.integers(2, tokenizer.get_vocab_size(), size=n).astype(np.int64)
            t0 = float(rng.uniform(0, 0.8))
            # half the repeats follow their first occurrence at once: at initialisation attention is spread
            # over the whole window, and only a nearby copy gives the copying circuit a gradient to start from
            t1 = t0 + 1e-9 if rng.random() < 0.5 else float(rng.uniform(t0, 1))
            items = [(t0, span, np.zeros(n, bool)), (t1, span, np.ones(n, bool))]
            items[1][2][0] = False  # the first token of the repeat is not yet predictable
        else:
            ep = BUILDERS[kind](rng)
            texts = [t for t, a, _ in ep.items] + [a for t, a, _ in ep.items if a]
            enc = [np.array(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)]
            answers = iter(enc[len(ep.items):])
            items = []
            if kind in BLOCKS:  # a block, then its queries as one block, each in order
                t0 = float(rng.uniform(0, 0.9))
                times = {0: t0, 1: float(rng.uniform(t0, 1))}
            else:  # statements before ``split``, queries after it, each at its own place
                split = float(rng.uniform(0.1, 0.9))
            for j, ((_, ans, group), ids) in enumerate(zip(ep.items, enc, strict=False)):
                if kind in BLOCKS:
                    t = times[group] + 1e-9 * j
                else:
                    t = float(rng.uniform(0, split) if group == 0 else rng.uniform(split, 1))
                mask = np.zeros(ids.shape[0], bool)
                if ans:
                    a = next(answers)
                    ids, mask = np.concatenate([ids, a]), np.concatenate([mask, np.ones(a.shape[0], bool)])
                items.append((t, ids, mask))
            if kind in ORDERED:  # the statements keep the order they were written in
                first = sorted(t for (t, _, _), (_, _, g) in zip(items, ep.items, strict=True) if g == 0)
                stated = iter(first)
                items = [(next(stated) if g == 0 else t, ids, m)
                         for (t, ids, m), (_, _, g) in zip(items, ep.items, strict=True)]
        size = sum(i[1].shape[0] for i in items)
        if used + size > seq_len * 0.9:
            if placed:
                break
            tries += 1
            if tries == 50:
                raise DataError(f"windows of {seq_len} tokens are too short for retrieval episodes")
            continue
        placed += items
        used += size
    placed.sort(key=lambda x: x[0])
    filler_len = seq_len - used
    s = int(rng.integers(0, stream.shape[0] - filler_len))
    filler = stream[s : s + filler_len].astype(np.int64)
    cuts = [round(t * filler_len) for t, _, _ in placed]
    ids_parts, mask_parts, prev = [], [], 0
    for cut, (_, ids, m) in zip(cuts, placed, strict=True):
        ids_parts += [filler[prev:cut], ids]
        mask_parts += [np.zeros(cut - prev, bool), m]
        prev = cut
    ids_parts.append(filler[prev:])
    mask_parts.append(np.zeros(filler_len - prev, bool))
    ids, mask = np.concatenate(ids_parts), np.concatenate(mask_parts)
    assert ids.shape[0] == seq_len
    return ids, mask


def retrieval_batch(stream: np.ndarray, tokenizer, n: int, seq_len: int, seed: int, step: int,
                    salt: int = 1, kinds: tuple[str, ...] = KINDS,
                    density: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows drawn from ``(seed, step, salt)`` alone: (ids [n, seq_len], answer mask)."""
    rows = [retrieval_window(stream, tokenizer, seq_len, np.random.default_rng([seed, step, salt, i]), density,
                             kinds) for i in range(n)]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


__all__ = ["retrieval_window", "retrieval_batch", "kind_weights", "KINDS", "FIRST_KINDS"]
