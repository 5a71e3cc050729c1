"""A built-in, seeded English-like corpus that exists on every machine.

Each document is a short chronicle: a cast of people, places and objects is introduced with
attributes, and later sentences refer back to them by name, sometimes restating an attribute far
from where it was given. That long-range reuse is what sparse attention must find, so the text
gives an indexer something to select even though it is synthetic. It is the default calibration
data when no ``--data`` is given, and a haystack generator for long-context tasks.
"""

from __future__ import annotations

import random

FIRST = ("Ada Basil Clara Dorian Edith Felix Greta Hugo Iris Jasper Leona Milo Nora Otto Pia Quentin Rosa Silas "
         "Thea Ulric Vera Walter Xenia Yusuf Zora Anselm Beatrix Cyril Delia Emrys").split()
LAST = ("Ashdown Blackwood Carver Dunmore Ellery Fairfax Glover Hartley Ingram Jessop Kendrick Lowell Marsh "
        "Norbury Oakley Pembroke Quill Radley Sutton Thorne").split()
PLACES = ("Harrow Bridge, the mill at Oxhey, Saltmarsh, the old granary, Fenwick Hall, the river quay, Larkhill, "
          "the north orchard, Copper Lane, the chapel yard, Whitcombe, the lower ford").split(", ")
OBJECTS = ("a brass compass, a sealed letter, a silver key, a ledger of debts, a painted map, a broken clock, "
           "a bundle of seeds, a lantern, a wooden flute, a velvet purse, a ship model, a book of tides").split(", ")
TRADES = "miller smith weaver clerk sailor baker mason carpenter tailor gardener teacher cooper".split()
COLOURS = "grey red green amber blue black white brown violet golden".split()
ADJ = ("quiet careful restless patient stubborn cheerful cautious generous proud weary curious honest "
       "anxious gentle").split()
VERBS = ("walked to", "waited at", "returned to", "wrote about", "spoke of", "looked for", "hurried past",
         "remembered", "painted", "argued about", "sold", "guarded")
WEATHER = ("rain came in from the west", "the wind turned cold", "fog lay on the fields", "the sun was low",
           "snow fell in the night", "the air was still", "a storm passed to the south")
LINKS = ("Later that week", "In the morning", "By evening", "Some days after", "Before the harvest",
         "At the end of the month", "On the next market day", "Long afterwards")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _person(rng: random.Random) -> dict:
    return {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "trade": rng.choice(TRADES),
            "adj": rng.choice(ADJ), "home": rng.choice(PLACES), "item": rng.choice(OBJECTS),
            "colour": rng.choice(COLOURS)}


def document(rng: random.Random, sentences: int = 120) -> str:
    """One chronicle of about ``sentences`` sentences."""
    cast = [_person(rng) for _ in range(rng.randint(4, 7))]
    out = []
    for p in cast:
        out.append(f"{p['name']} was {_a(p['adj'])} {p['trade']} who lived near {p['home']} and kept "
                   f"{p['item']} in {_a(p['colour'])} box.")
    for i in range(sentences):
        a, b = rng.sample(cast, 2)
        kind = rng.random()
        if kind < 0.35:
            s = f"{rng.choice(LINKS)}, {a['name']} {rng.choice(VERBS)} {rng.choice(PLACES)} with {b['name']}."
        elif kind < 0.55:
            s = f"{rng.choice(LINKS)}, {rng.choice(WEATHER)}, and {a['name'].split()[0]} thought of {b['home']}."
        elif kind < 0.75:  # long-range recall of an attribute given at the start
            s = f"Everyone knew that {a['name']} kept {a['item']} in {_a(a['colour'])} box near {a['home']}."
        elif kind < 0.9:
            s = f"{b['name'].split()[0]}, the {b['trade']}, said that {a['name'].split()[0]} was {a['adj']}."
        else:
            s = f"The {a['trade']} and the {b['trade']} met at {rng.choice(PLACES)} and spoke of {b['item']}."
        out.append(s)
        if i % 9 == 8:
            out.append("\n")
    return " ".join(out).replace(" \n ", "\n\n")


def corpus(num_chars: int, seed: int = 0) -> list[str]:
    """Documents totalling at least ``num_chars`` characters, the same for the same seed everywhere."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < num_chars:
        docs.append(document(rng))
        total += len(docs[-1])
    return docs
