"""IndexCache layer patterns: which layers run their indexer (Full) and which reuse one (Shared).

A pattern is one character per decoder layer: ``F`` runs the layer's own lightning indexer and
publishes its top-k indices, ``S`` reuses the indices of the nearest preceding ``F`` layer. Layer 0
is always ``F`` (something must seed the indices).

Serving stacks describe uniform patterns with ``index_topk_freq`` / ``index_skip_topk_offset`` but
disagree by one layer on what they mean; :meth:`Pattern.uniform` builds each convention by name and
:meth:`Pattern.match_uniform` says which conventions reproduce a given pattern. Exports are always
explicit per-layer patterns, which every stack reads the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import PatternError

FULL, SHARED = "F", "S"

# convention name -> the rule it applies
CONVENTIONS: dict[str, str] = {
    "official": "IndexCache patches / SGLang without offset: Full iff max(l-1, 0) % freq == 0",
    "transformers": "transformers / vLLM / SGLang with offset: Full iff max(i-offset+1, 0) % freq == 0",
    "glm52": "GLM-5.2 checkpoints: the transformers formula with offset 3",
    "paper": "the paper's text ('FSSS...'): Full iff i % freq == 0 (transformers formula, offset 1)",
}
DEFAULT_TRANSFORMERS_OFFSET = 2




@dataclass(frozen=True)
class Block:
    """One Full layer and the Shared layers that reuse its indices: layers ``start .. end - 1``."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start}]" if self.size == 1 else f"[{self.start}-{self.end - 1}]"


class Pattern:
    """An immutable per-layer Full/Shared pattern.

    >>> p = Pattern.parse("FSSF")
    >>> str(p), p.indexer_types, p.source_layer(2)
    ('FSSF', ['full', 'shared', 'shared', 'full'], 0)
    """

    __slots__ = ("_s", "origin")

    def __init__(self, chars: str, origin: str = "explicit"):
        if not isinstance(chars, str):
            raise PatternError(f"pattern must be a string of F/S, got {type(chars).__name__}")
        if len(chars) == 0:
            raise PatternError("pattern is empty: it needs one F/S character per layer")
        for i, c in enumerate(chars):
            if c not in (FULL, SHARED):
                raise PatternError(f"bad character {c!r} at layer {i} in pattern (expected 'F' or 'S')")
        if chars[0] != FULL:
            raise PatternError("layer 0 is Shared: the first layer must be Full (nothing precedes it to reuse)")
        self._s = chars
        self.origin = origin

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def parse(cls, value: str | Sequence[str] | Pattern) -> Pattern:
        """Parse ``"FSSF"`` (case-insensitive), an ``indexer_types`` list, or return a Pattern as is."""
        if isinstance(value, Pattern):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):  # a JSON indexer_types list given on a command line
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as e:
                    raise PatternError(f"pattern looks like a JSON list but does not parse: {e}") from None
                return cls.from_indexer_types(items)
            return cls(text.upper())
        if isinstance(value, Iterable):
            return cls.from_indexer_types(list(value))
        raise PatternError(f"cannot make a pattern from {type(value).__name__}")

    @classmethod
    def from_indexer_types(cls, types: Sequence[str]) -> Pattern:
        """From transformers' ``indexer_types`` (``"full"`` / ``"shared"``; ``"F"``/``"S"`` also taken)."""
        names = {"full": FULL, "shared": SHARED, "f": FULL, "s": SHARED}
        chars = []
        for i, t in enumerate(types):
            c = names.get(str(t).lower())
            if c is None:
                raise PatternError(f"bad indexer type {t!r} at layer {i} (expected 'full' or 'shared')")
            chars.append(c)
        return cls("".join(chars), origin="indexer_types")

    @classmethod
    def all_full(cls, num_layers: int) -> Pattern:
        _check_num_layers(num_layers)
        return cls(FULL * num_layers, origin="all-full")

    @classmethod
    def uniform(
        cls, num_layers: int, freq: int, convention: str = "official", offset: int | None = None
    ) -> Pattern:
        """A uniform pattern under a named convention (see ``CONVENTIONS``).

        ``offset`` is only read by the ``transformers`` convention (default 2, which equals ``official``).
        """
        _check_num_layers(num_layers)
        if not isinstance(freq, int) or freq < 1:
            raise PatternError(f"freq must be a positive integer, got {freq!r}")
        if convention not in CONVENTIONS:
            raise PatternError(f"unknown convention {convention!r} (known: {', '.join(CONVENTIONS)})")
        if convention != "transformers" and offset is not None:
            raise PatternError(f"convention {convention!r} takes no offset (use 'transformers' for a custom offset)")
        if offset is not None and (not isinstance(offset, int) or offset < 0):
            raise PatternError(f"offset must be a whole number >= 0, got {offset!r}")
        if convention == "official":
            full = [max(i - 1, 0) % freq == 0 for i in range(num_layers)]
            origin = f"uniform freq={freq} ({CONVENTIONS['official']})"
        else:
            off = {"glm52": 3, "paper": 1}.get(convention, DEFAULT_TRANSFORMERS_OFFSET if offset is None else offset)
            full = [max(i - off + 1, 0) % freq == 0 for i in range(num_layers)]
            origin = f"uniform freq={freq} offset={off} (Full iff max(i-{off}+1, 0) % {freq} == 0; {convention})"
        chars = "".join(FULL if f else SHARED for f in full)
        if chars[0] != FULL:
            raise PatternError(
                f"freq={freq} with convention {convention!r} makes layer 0 Shared, which no engine can run"
            )
        return cls(chars, origin=origin)

    @classmethod
    def from_config(cls, config: dict, num_layers: int | None = None) -> tuple[Pattern, str]:
        """The pattern a ``config.json`` asks for, with transformers' precedence, and where it came from.

        ``indexer_types`` > ``index_topk_pattern`` > ``index_topk_freq`` / ``index_skip_topk_offset``
        (offset default 2) > all Full.
        """
        n = num_layers if num_layers is not None else config.get("num_hidden_layers")
        if config.get("indexer_types") is not None:
            return cls.from_indexer_types(config["indexer_types"]), "config indexer_types"
        if config.get("index_topk_pattern") is not None:
            return cls.parse(config["index_topk_pattern"]), "config index_topk_pattern"
        freq = config.get("index_topk_freq")
        if freq is not None and int(freq) > 1:
            offset = config.get("index_skip_topk_offset")
            offset = DEFAULT_TRANSFORMERS_OFFSET if offset is None else int(offset)
            p = cls.uniform(int(n), int(freq), convention="transformers", offset=offset)
            return p, f"config index_topk_freq={freq}, index_skip_topk_offset={offset}"
        return cls.all_full(int(n)), "all Full (config declares no pattern)"

    # --------------------------------------------------------------------------------- accessors
    def __str__(self) -> str:
        return self._s

    def __repr__(self) -> str:
        return f"Pattern({self._s!r})"

    def __len__(self) -> int:
        return len(self._s)

    def __getitem__(self, i: int) -> str:
        return self._s[i]

    def __iter__(self):
        return iter(self._s)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pattern):
            return self._s == other._s
        if isinstance(other, str):
            return self._s == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._s)

    @property
    def num_layers(self) -> int:
        return len(self._s)

    @property
    def indexer_types(self) -> list[str]:
        return ["full" if c == FULL else "shared" for c in self._s]

    def is_full(self, layer: int) -> bool:
        return self._s[layer] == FULL

    @property
    def full_layers(self) -> list[int]:
        return [i for i, c in enumerate(self._s) if c == FULL]

    @property
    def shared_layers(self) -> list[int]:
        return [i for i, c in enumerate(self._s) if c == SHARED]

    @property
    def num_full(self) -> int:
        return self._s.count(FULL)

    @property
    def retention(self) -> float:
        """Fraction of indexers kept."""
        return self.num_full / len(self._s)

    def source_layer(self, layer: int) -> int:
        """The layer whose indices ``layer`` attends with: itself if Full, else the nearest preceding Full."""
        return self._s.rindex(FULL, 0, layer + 1)

    @property
    def sources(self) -> list[int]:
        return [self.source_layer(i) for i in range(len(self._s))]

    @property
    def blocks(self) -> list[Block]:
        starts = self.full_layers
        return [Block(s, e) for s, e in zip(starts, starts[1:] + [len(self._s)], strict=True)]

    def with_layer(self, layer: int, kind: str) -> Pattern:
        """A copy with one layer set to ``"F"`` or ``"S"``."""
        if kind not in (FULL, SHARED):
            raise PatternError(f"bad character {kind!r} (expected 'F' or 'S')")
        if not 0 <= layer < len(self._s):
            raise PatternError(f"layer {layer} is out of range for a {len(self._s)}-layer pattern")
        return Pattern(self._s[:layer] + kind + self._s[layer + 1 :], origin="edited")

    # -------------------------------------------------------------------------------- validation
    def validate(
        self,
        num_layers: int | None = None,
        stage_starts: Sequence[int] | None = None,
        indexer_layers: Sequence[int] | None = None,
    ) -> Pattern:
        """Check the pattern against a model; raise :class:`PatternError` naming the first problem.

        - ``num_layers``: the pattern has one character per decoder layer (MTP layers excluded).
        - ``stage_starts``: first layer of each pipeline stage; each must be Full, since top-k indices
          are not handed across stages by any engine.
        - ``indexer_layers``: layers that have indexer weights (a GLM-5.2-style checkpoint ships them only
          on its native Full layers); a Full layer outside that set would run an untrained indexer.
        """
        if num_layers is not None and len(self._s) != num_layers:
            raise PatternError(
                f"wrong length: pattern has {len(self._s)} layers but the model has {num_layers} "
                "(one F/S per decoder layer, MTP layers excluded)"
            )
        if stage_starts is not None:
            for s in stage_starts:
                if not 0 <= s < len(self._s):
                    raise PatternError(f"pipeline stage start {s} is outside the {len(self._s)} layers")
                if self._s[s] != FULL:
                    raise PatternError(
                        f"layer {s} starts a pipeline stage but is Shared: stage starts must be Full"
                    )
        if indexer_layers is not None:
            have = set(indexer_layers)
            bad = [i for i in self.full_layers if i not in have]
            if bad:
                raise PatternError(
                    f"layers {format_ranges(bad)} are Full but the checkpoint has no indexer weights for them "
                    f"(it has indexers on layers {format_ranges(sorted(have))})"
                )
        return self

    # ----------------------------------------------------------------------------- descriptions
    def describe(self) -> dict:
        return {
            "pattern": self._s,
            "num_layers": len(self._s),
            "num_full": self.num_full,
            "num_shared": len(self._s) - self.num_full,
            "retention": round(self.retention, 4),
            "full_layers": self.full_layers,
            "blocks": [str(b) for b in self.blocks],
            "origin": self.origin,
        }

    def describe_text(self) -> str:
        d = self.describe()
        lines = [
            f"pattern   {d['pattern']}",
            f"layers    {d['num_layers']}  Full {d['num_full']}  Shared {d['num_shared']}  "
            f"retention {d['retention']:.3f} ({d['num_shared']} of {d['num_layers']} indexers removed)",
            f"Full at   {format_ranges(d['full_layers'])}",
            f"blocks    {' '.join(d['blocks'])}",
            f"from      {d['origin']}",
        ]
        return "\n".join(lines)

    def match_uniform(self, max_freq: int = 16) -> list[str]:
        """Every uniform convention/freq/offset that reproduces this pattern (empty if none)."""
        n, found = len(self._s), []
        for freq in range(1, max_freq + 1):
            for conv in ("official", "glm52", "paper"):
                try:
                    if Pattern.uniform(n, freq, conv)._s == self._s:
                        found.append(f"{conv} freq={freq}")
                except PatternError:
                    pass
            for off in range(0, 9):
                if off in (1, 2, 3):
                    continue  # same formula as paper / official / glm52, already listed
                try:
                    if Pattern.uniform(n, freq, "transformers", off)._s == self._s:
                        found.append(f"transformers freq={freq} offset={off}")
                except PatternError:
                    pass
        return found

    # ---------------------------------------------------------------------------------- exports
    def config_patch(self) -> dict:
        """Keys to merge into ``config.json`` (transformers reads ``indexer_types`` first)."""
        return {"indexer_types": self.indexer_types, "index_topk_pattern": self._s}

    def sglang_override(self) -> str:
        """The value of SGLang's ``--json-model-override-args``."""
        return json.dumps({"index_topk_pattern": self._s})

    def vllm_override(self) -> str:
        """The value of vLLM's ``--hf-overrides`` (``use_index_cache`` is read by some versions)."""
        return json.dumps({"use_index_cache": True, "index_topk_pattern": self._s})

    def engine_flags(self) -> dict[str, str]:
        return {
            "sglang": f"--json-model-override-args '{self.sglang_override()}'",
            "vllm": f"--hf-overrides '{self.vllm_override()}'",
            "transformers": f"indexer_types={json.dumps(self.indexer_types)}",
        }


def _check_num_layers(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise PatternError(f"num_layers must be a positive integer, got {n!r}")


def format_ranges(xs: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in list(xs[1:]) + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


SPEC_FORMS = "FSSF... (one F/S per layer), a JSON indexer_types list, all-full, or uniform:FREQ[:CONVENTION[:OFFSET]]"


def parse_spec(spec: str, num_layers: int | None) -> Pattern:
    """A pattern from a command-line or config spec, checked against ``num_layers``: the one parser every
    command uses.

    ``FSSF...`` | a JSON ``indexer_types`` list | ``all-full`` | ``uniform:FREQ[:CONVENTION[:OFFSET]]``
    (e.g. ``uniform:4``, ``uniform:4:glm52``, ``uniform:2:transformers:3``). The rule forms need
    ``num_layers``; an explicit string is checked against it when it is given.
    """
    if isinstance(spec, Pattern):
        return spec.validate(num_layers=num_layers)
    text = str(spec).strip()
    low = text.lower()
    rule = low in ("all-full", "full", "dense") or low.startswith("uniform:")
    if rule and num_layers is None:
        raise PatternError(f"pattern {text!r} is a rule, not a per-layer string: it needs the layer count "
                           "(give --num-layers N or --model DIR)")
    if low in ("all-full", "full", "dense"):
        return Pattern.all_full(num_layers)
    if low.startswith("uniform:"):
        parts = text.split(":")[1:]
        try:
            freq = int(parts[0])
            offset = int(parts[2]) if len(parts) > 2 else None
        except (ValueError, IndexError):
            raise PatternError(f"bad uniform spec {spec!r} (expected uniform:FREQ[:CONVENTION[:OFFSET]] with whole "
                               "numbers, e.g. uniform:4 or uniform:2:transformers:3)") from None
        if len(parts) > 3:
            raise PatternError(f"bad uniform spec {spec!r}: at most FREQ, CONVENTION and OFFSET after 'uniform:'")
        conv = parts[1] if len(parts) > 1 else "official"
        return Pattern.uniform(num_layers, freq, conv, offset)
    if text and text[0].upper() not in (FULL, SHARED) and not text.startswith("["):
        raise PatternError(f"cannot read pattern {spec!r}: give {SPEC_FORMS}")
    return Pattern.parse(text).validate(num_layers=num_layers)
