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

Templates, word lists and seeds are disjoint from the evaluation suite's (:mod:`indexcache.evals.tasks`;
a test checks the word lists), so the suite measures whether the skill transfers, not memorised prompts.
Every window is drawn from ``(seed, step, row)`` alone, so a resumed run sees the same data.
"""

from __future__ import annotations

import numpy as np

KINDS = ("fact", "repeat", "listing", "chain", "tally", "echo")
KIND_WEIGHTS = (0.4, 0.3, 0.12, 0.07, 0.06, 0.05)

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


BUILDERS = {"fact": _fact, "listing": _listing, "chain": _chain, "tally": _tally}


def retrieval_window(stream: np.ndarray, tokenizer, seq_len: int, rng: np.random.Generator,
                     density: float | None = None, kinds: tuple[str, ...] = KINDS) -> tuple[np.ndarray, np.ndarray]:
    """One window of ``seq_len`` tokens: book text from ``stream`` with episodes of ``kinds`` spliced in
    until about ``density`` of the tokens (default: random in [0.15, 0.5]) are structured. Returns (ids,
    answer_mask); the mask marks the tokens that can only be predicted by retrieving an earlier part of the
    window."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown retrieval episode kinds {sorted(unknown)} (choose from {', '.join(KINDS)})")
    weights = np.array([w for k, w in zip(KINDS, KIND_WEIGHTS, strict=True) if k in kinds])
    chosen = [k for k in KINDS if k in kinds]
    if stream.shape[0] <= 2 * seq_len:
        raise ValueError(f"the token stream ({stream.shape[0]} tokens) is too short for windows of {seq_len}")
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
            if kind in ("listing", "tally"):  # a block, then its queries as one block, each in order
                t0 = float(rng.uniform(0, 0.9))
                times = {0: t0, 1: float(rng.uniform(t0, 1))}
            else:  # statements before ``split``, queries after it, each at its own place
                split = float(rng.uniform(0.1, 0.9))
            for j, ((_, ans, group), ids) in enumerate(zip(ep.items, enc, strict=False)):
                if kind in ("listing", "tally"):
                    t = times[group] + 1e-9 * j
                else:
                    t = float(rng.uniform(0, split) if group == 0 else rng.uniform(split, 1))
                mask = np.zeros(ids.shape[0], bool)
                if ans:
                    a = next(answers)
                    ids, mask = np.concatenate([ids, a]), np.concatenate([mask, np.ones(a.shape[0], bool)])
                items.append((t, ids, mask))
        size = sum(i[1].shape[0] for i in items)
        if used + size > seq_len * 0.9:
            if placed:
                break
            tries += 1
            if tries == 50:
                raise ValueError(f"windows of {seq_len} tokens are too short for retrieval episodes")
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


__all__ = ["retrieval_window", "retrieval_batch", "KINDS"]
