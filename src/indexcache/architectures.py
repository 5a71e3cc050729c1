"""The five DSA-family architectures, as every command sees them: which decoder layers own an indexer (the
positions of a pattern), what a selection is made of, how engines count a pattern, and which config keys
and flags carry it.

A pattern has one character per layer that owns an indexer, in layer order, the way engines count it:

=============  =========================================  ============================================
architecture   pattern positions (layers with an indexer)  a selection holds
=============  =========================================  ============================================
deepseek_v32   every decoder layer                         tokens (``index_topk``)
glm_moe_dsa    every decoder layer                         tokens (``index_topk``)
deepseek_v4    the compressed-sparse (CSA) layers          compressed entries of ``compress_rates[CSA]`` tokens
glm5_next      the ``indexed_attention`` layers             tokens, as pools of ``index_kpool`` plus the tail
minimax_m3     the ``minimax_m3_sparse`` layers             key blocks of ``index_block_size``, per indexer head
=============  =========================================  ============================================

The per-decoder-layer form writes ``F``/``S`` at those layers and ``-`` at the others.
:func:`model_info` reads a model directory (or a ``config.json``) into a :class:`ModelInfo`; the three new
architectures are resolved through transformers' own config classes, so defaults and legacy keys mean what
transformers makes of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import read_config
from .errors import ConfigError, PatternError
from .pattern import FULL, SHARED, Pattern, format_ranges, parse_spec

NONE = "-"  # a decoder layer without an indexer, in the per-decoder-layer form
NONE_ALIAS = "."  # the same, where a leading '-' would read as a command-line option
CSA = "compressed_sparse_attention"


@dataclass(frozen=True)
class ArchSpec:
    key: str
    classes: tuple[str, ...]  # transformers classes that load it (the first is the one used)
    model_types: tuple[str, ...]
    unit: str  # what one selected index stands for
    native: bool  # this package's own model covers it (else the transformers backend runs it)
    # checkpoint tensor names of indexer weights; group 1 is the decoder layer
    indexer_tensor: re.Pattern
    engines: str  # how engines take a pattern (for the exports)


SPECS: dict[str, ArchSpec] = {
    "deepseek_v32": ArchSpec(
        "deepseek_v32", ("DeepseekV32ForCausalLM",), ("deepseek_v32",), "token", True,
        re.compile(r"^model\.layers\.(\d+)\.self_attn\.indexer\."), "per layer"),
    "glm_moe_dsa": ArchSpec(
        "glm_moe_dsa", ("GlmMoeDsaForCausalLM",), ("glm_moe_dsa",), "token", True,
        re.compile(r"^model\.layers\.(\d+)\.self_attn\.indexer\."), "per layer"),
    "deepseek_v4": ArchSpec(
        "deepseek_v4", ("DeepseekV4ForCausalLM",), ("deepseek_v4",), "compressed entry", False,
        # on disk transformers writes DeepSeek's own names (attn.indexer.*); in memory compressor.indexer
        re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:attn\.indexer\.|self_attn\.compressor\.indexer\.)"),
        "per CSA layer"),
    "glm5_next": ArchSpec(
        "glm5_next", ("Glm5NextForConditionalGeneration",), ("glm5_next", "glm5_next_text"), "token (pooled)", False,
        re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.indexer\."), "per indexed layer"),
    "minimax_m3": ArchSpec(
        "minimax_m3", ("MiniMaxM3VLForCausalLM",), ("minimax_m3_vl_text",), "key block (per indexer head)", False,
        re.compile(r"^model\.layers\.(\d+)\.self_attn\.indexer\."), "per sparse layer"),
}


def _supported() -> str:
    return ", ".join(f"{s.classes[0]} ({s.key})" for s in SPECS.values())


def detect_arch(d: dict) -> ArchSpec:
    """The architecture of a config dict; its ``architectures`` and ``model_type`` must agree."""
    archs = d.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"architectures must be a list of class names, got {archs!r}")
    mt = d.get("model_type")
    by_class = {c: s for s in SPECS.values() for c in s.classes}
    known = [by_class[a] for a in archs if a in by_class]
    if archs and not known:
        raise ConfigError(f"unknown architecture {archs} (model_type {mt!r}): indexcache reads {_supported()}")
    if len({s.key for s in known}) > 1:
        raise ConfigError(f"config lists architectures of two kinds, {archs}: give one")
    if known and mt is not None and mt not in known[0].model_types:
        raise ConfigError(f"config contradicts itself: architectures {archs} is {known[0].key}, "
                          f"but model_type is {mt!r}")
    if known:
        return known[0]
    for s in SPECS.values():
        if mt in s.model_types:
            return s
    raise ConfigError(f"unknown architecture {archs or None} (model_type {mt!r}): indexcache reads {_supported()}")


@dataclass
class ModelInfo:
    """What the commands need from a model's config: its pattern positions, selection unit and limits."""

    spec: ArchSpec
    raw: dict
    num_layers: int  # decoder layers (MTP excluded)
    slots: list[int]  # the decoder layer of each pattern position
    index_topk: int  # indices a query keeps, in the unit
    tokens_per_unit: int  # tokens one index stands for (1 for tokens)
    max_position_embeddings: int
    vocab_size: int
    pattern: Pattern  # the config's own, over the pattern positions
    pattern_source: str
    layer_types: list[str] = field(default_factory=list)
    index_heads: int = 1  # selections per query (MiniMax-M3: one per indexer head)
    pool: int = 1  # GLM-5.3: tokens per scored pool (its selections are tokens, kept pool by pool)

    @property
    def arch(self) -> str:
        return self.spec.key

    @property
    def architecture(self) -> str:
        return self.spec.classes[0]

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def describe_slots(self) -> str:
        if self.slots == list(range(self.num_layers)):
            return f"all {self.num_layers} decoder layers"
        what = {"deepseek_v4": "CSA layers", "glm5_next": "indexed layers", "minimax_m3": "sparse layers"}
        return f"{len(self.slots)} {what.get(self.arch, 'indexer layers')} of {self.num_layers}: decoder layers " \
               f"{format_ranges(self.slots)}"

    def decoder_form(self, pattern: Pattern) -> str:
        """``F``/``S`` at the layers with an indexer, ``-`` elsewhere."""
        chars = [NONE] * self.num_layers
        for pos, layer in enumerate(self.slots):
            chars[layer] = pattern[pos]
        return "".join(chars)

    def parse_pattern(self, spec: str | Pattern) -> Pattern:
        """A pattern argument: one character per pattern position, its per-decoder-layer form (``-`` or
        ``S`` at layers without an indexer), or a rule (``all-full``, ``uniform:...``) over the positions."""
        if isinstance(spec, Pattern):
            return self._check_length(spec)
        text = str(spec).strip().replace(NONE_ALIAS, NONE)
        n = self.num_slots
        if self.slots != list(range(self.num_layers)) and len(text) == self.num_layers and set(text.upper()) <= set(
                "FS" + NONE):
            up = text.upper()
            bad = [i for i, c in enumerate(up) if c == FULL and i not in set(self.slots)]
            if bad:
                raise PatternError(f"decoder layers {format_ranges(bad)} are marked Full but own no indexer: "
                                   f"{self.describe_slots()}")
            missing = [layer for layer in self.slots if up[layer] == NONE]
            if missing:
                raise PatternError(f"decoder layers {format_ranges(missing)} own an indexer: give them F or S")
            return self._check_length(Pattern("".join(up[layer] for layer in self.slots)))
        # an explicit string is parsed without a length so that a wrong one gets this model's own message
        explicit = set(text.upper()) <= set("FS")
        return self._check_length(parse_spec(text, None if explicit else n))

    def _check_length(self, p: Pattern) -> Pattern:
        if len(p) != self.num_slots:
            raise PatternError(f"wrong length: the pattern has {len(p)} characters but the model has {self.num_slots} "
                               f"layers with an indexer ({self.describe_slots()}); give one F/S per indexer layer, "
                               f"or the {self.num_layers}-character per-decoder-layer form with '-' elsewhere")
        return p

    @property
    def first_restrictive_query(self) -> int:
        """The first query position that sees more than a selection holds (from there on, patterns differ)."""
        if self.arch == "glm5_next":  # the tail pool is always kept: restrictive once a whole pool is left out
            return self.index_topk + self.pool - 1
        if self.arch == "minimax_m3":  # blocks are counted as soon as they start
            return self.index_topk * self.tokens_per_unit
        return (self.index_topk + 1) * self.tokens_per_unit - 1 if self.tokens_per_unit > 1 else self.index_topk

    def describe_selection(self) -> str:
        """What a query keeps, in words."""
        if self.arch == "deepseek_v4":
            return f"{self.index_topk} compressed entries of {self.tokens_per_unit} tokens"
        if self.arch == "glm5_next":
            return f"{self.index_topk} tokens in pools of {self.pool}, plus the incomplete tail pool"
        if self.arch == "minimax_m3":
            return f"{self.index_topk} key blocks of {self.tokens_per_unit} tokens per indexer head"
        return f"{self.index_topk} tokens"

    def check_tensor_parallel(self, tp: int) -> None:
        """Refuse a ``--tp`` that transformers' tensor-parallel plan for this architecture cannot shard evenly:
        the attention heads and the MLP widths that the plan splits must be multiples of it."""
        if tp <= 1:
            return
        tc = self.transformers_config()
        plan = dict(getattr(type(tc), "base_model_tp_plan", None) or {})
        if not plan:
            raise ConfigError(f"transformers has no tensor-parallel plan for {self.architecture}: use --device-map")
        if "linear_attention" in (getattr(tc, "layer_types", None) or []):
            # transformers' plan shards every ``self_attn.o_proj`` row-wise but leaves the linear-attention
            # layers' q/k/v whole, so those layers' shapes do not meet (checked on transformers 5.23)
            raise ConfigError(f"transformers' tensor-parallel plan for {self.architecture} does not cover its "
                              "linear-attention layers: split the model with --device-map instead")

        def value(key: str) -> int | None:
            v = getattr(tc, key, None)
            return int(v) if isinstance(v, (int, float)) else None

        keys = " ".join(plan)
        checks = []
        if "self_attn.q_proj" in keys or "self_attn.q_b_proj" in keys:
            checks.append(("num_attention_heads", "attention heads"))
        if "self_attn.k_proj" in keys:
            checks.append(("num_key_value_heads", "key/value heads"))
        if "experts.gate_up_proj" in keys:
            checks.append(("moe_intermediate_size" if value("moe_intermediate_size") else "intermediate_size",
                           "experts' intermediate size"))
        if "layers.*.mlp.gate_proj" in keys:
            checks.append(("intermediate_size", "dense MLP's intermediate size"))
        bad = [f"{what} {value(key)} ({key})" for key, what in checks if value(key) and value(key) % tp]
        if bad:
            raise ConfigError(f"--tp {tp} does not divide the model's {' and '.join(bad)}: transformers' tensor "
                              "parallel plan splits them evenly over the ranks")

    def transformers_config(self, text: bool = True):
        """The model's transformers config object (``text``: the text config of a multimodal one)."""
        return transformers_config(self.spec, self.raw, text)

    def check_calibration(self, seq_len: int, option: str = "--seq-len") -> None:
        """Refuse windows in which every query keeps everything it sees: all patterns would tie."""
        first = self.first_restrictive_query
        if seq_len <= first:
            seen = (f" ({seq_len // self.tokens_per_unit} compressed entries)" if self.arch == "deepseek_v4" else "")
            raise ConfigError(f"{option} {seq_len} is too short{seen}: a query keeps {self.describe_selection()}, so "
                              f"every query would keep all it sees and every pattern would give the same loss; "
                              f"use --seq-len above {first}")

    def shipped_slots(self, tensor_names: list[str]) -> list[int]:
        """Pattern positions whose indexer weights the checkpoint ships."""
        have = {int(m.group(1)) for n in tensor_names if (m := self.spec.indexer_tensor.match(n))}
        return [pos for pos, layer in enumerate(self.slots) if layer in have]

    def config_patch(self, pattern: Pattern) -> dict:
        """config.json keys that carry the pattern for this architecture."""
        if self.spec.native:
            return pattern.config_patch()
        if self.arch == "glm5_next":  # transformers reads text_config.indexer_types, one entry per decoder layer
            types = ["full" if c == FULL else "shared" for c in self._types_all_layers(pattern)]
            return {"text_config": {"indexer_types": types}, "index_topk_pattern": str(pattern)}
        return {"index_topk_pattern": str(pattern)}

    def _types_all_layers(self, pattern: Pattern) -> str:
        # layers without an indexer: "full" keeps transformers from expecting shared indices there
        return "".join(FULL if c == NONE else c for c in self.decoder_form(pattern))

    def engine_flags(self, pattern: Pattern) -> list[dict]:
        """For each engine: the flag that runs the pattern (or None) and what to know about it."""
        p = str(pattern)
        vllm = f"--hf-overrides '{json.dumps({'use_index_cache': True, 'index_topk_pattern': p})}'"
        sglang = f"--json-model-override-args '{json.dumps({'index_topk_pattern': p})}'"
        if self.spec.native:
            tf = ("native: GlmMoeDsaForCausalLM reads indexer_types" if self.arch == "glm_moe_dsa" else
                  "no sharing in DeepseekV32ForCausalLM: indexcache.integrations.transformers.apply_pattern adds it")
            return [{"engine": "vLLM", "flag": vllm, "note": "one character per decoder layer"},
                    {"engine": "SGLang", "flag": sglang, "note": "one character per decoder layer"},
                    {"engine": "transformers", "flag": f"indexer_types={json.dumps(pattern.indexer_types)}",
                     "note": tf}]
        if self.arch == "deepseek_v4":
            return [{"engine": "vLLM", "flag": vllm, "note": "vLLM counts DeepSeek-V4 patterns over the CSA layers"},
                    {"engine": "SGLang", "flag": None,
                     "note": "no IndexCache for DeepSeek-V4 yet (sglang #26274, #32771)"},
                    {"engine": "transformers", "flag": None, "note": "DeepseekV4ForCausalLM has no sharing: "
                     "indexcache.integrations.transformers.apply_pattern adds it"}]
        if self.arch == "glm5_next":
            types = json.dumps(self.config_patch(pattern)["text_config"]["indexer_types"])
            return [{"engine": "vLLM", "flag": vllm, "note": "one character per indexed layer"},
                    {"engine": "SGLang", "flag": sglang, "note": "one character per indexed layer"},
                    {"engine": "transformers", "flag": f"text_config.indexer_types={types}",
                     "note": "Glm5Next's own sharing hands indices only from the layer just before: a Shared indexed "
                     "layer after a linear-attention layer fails there; indexcache.integrations.transformers."
                     "apply_pattern runs any pattern"}]
        uniform = next((m for m in pattern.match_uniform() if m.startswith("paper freq=")), None)
        env = f"SGLANG_MINIMAX_M3_INDEX_TOPK_FREQ={uniform.split('=')[1]}" if uniform else None
        return [{"engine": "vLLM", "flag": vllm, "note": "one character per sparse layer"},
                {"engine": "SGLang", "flag": env, "note": "SGLang takes only a frequency (an environment variable)"
                 + ("" if env else ": this pattern is not uniform")},
                {"engine": "transformers", "flag": None, "note": "MiniMaxM3VLForCausalLM has no sharing: "
                 "indexcache.integrations.transformers.apply_pattern adds it"}]


def describe_positions(slots: list[int], positions: list[int]) -> str:
    """Pattern positions in words: ``layers 1,3`` when every layer owns an indexer, else both numberings."""
    if slots == list(range(len(slots))):
        return f"layers {format_ranges(positions)}"
    return f"indexer layers {format_ranges(positions)} (decoder layers {format_ranges([slots[p] for p in positions])})"


def check_trained(slots: list[int], pattern: Pattern, trained: list[int]) -> Pattern:
    """Refuse a pattern that makes Full a position without trained indexer weights."""
    missing = [p for p in pattern.full_layers if p not in set(trained)]
    if missing:
        raise PatternError(f"{describe_positions(slots, missing)} are Full but the checkpoint has no indexer weights "
                           f"for them (it ships them on {describe_positions(slots, trained) if trained else 'none'})")
    return pattern


def exports_text(info: ModelInfo, pattern: Pattern) -> str:
    """The lines every command prints for a pattern: both forms, the config patch, each engine's flag."""
    lines = [f"\nper decoder layer ('-': no indexer): {info.decoder_form(pattern)}"] if info.slots != list(
        range(info.num_layers)) else []
    lines += ["config.json patch:", "  " + json.dumps(info.config_patch(pattern))]
    for e in info.engine_flags(pattern):
        lines.append(f"{e['engine']}:")
        lines.append("  " + (e["flag"] or "(no flag)") + (f"   # {e['note']}" if e["note"] else ""))
    return "\n".join(lines)


def model_info(path_or_config: str | Path | dict) -> ModelInfo:
    """A :class:`ModelInfo` from a model directory, a ``config.json`` path, or a config dict."""
    d = path_or_config if isinstance(path_or_config, dict) else read_config(path_or_config)
    spec = detect_arch(d)
    if spec.native:
        from .config import DSAConfig

        cfg = DSAConfig.from_dict(d)
        n = cfg.num_hidden_layers
        return ModelInfo(spec, d, n, list(range(n)), cfg.index_topk, 1, cfg.max_position_embeddings, cfg.vocab_size,
                         cfg.pattern, cfg.pattern_source, ["indexed"] * n, 1)
    tc = transformers_config(spec, d)
    n = int(tc.num_hidden_layers)
    types = list(tc.layer_types)[:n]
    pool = 1
    if spec.key == "deepseek_v4":
        slots = [i for i, t in enumerate(types) if t == CSA]
        k, unit = int(tc.index_topk), int(tc.compress_rates[CSA])
        heads = 1
    elif spec.key == "glm5_next":
        slots = [i for i, t in enumerate(types) if t == "indexed_attention"]
        k, unit = int(tc.index_topk), 1
        heads = 1
        pool = int(tc.index_kpool)
    else:
        slots = [i for i, t in enumerate(types) if t == "minimax_m3_sparse"]
        k, unit = int(tc.index_topk_blocks), int(tc.index_block_size)
        heads = int(tc.index_n_heads)
    if not slots:
        raise ConfigError(f"{spec.classes[0]} config has no layer with an indexer (layer_types {sorted(set(types))})")
    pattern, source = _config_pattern(spec, d, tc, slots)
    return ModelInfo(spec, d, n, slots, k, unit, int(tc.max_position_embeddings), int(tc.vocab_size), pattern, source,
                     types, heads, pool)


CONFIG_CLASSES = {"deepseek_v32": "DeepseekV32Config", "glm_moe_dsa": "GlmMoeDsaConfig",
                  "deepseek_v4": "DeepseekV4Config", "glm5_next": "Glm5NextConfig",
                  "minimax_m3": "MiniMaxM3VLTextConfig"}


def transformers_config(spec: ArchSpec, d: dict, text: bool = True):
    """A config dict as transformers' own config object; ``text``: the text config of GLM-5.3's multimodal
    one (the model class takes the whole)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{spec.classes[0]} is read through transformers' own classes: pip install transformers") \
            from None
    cls = getattr(transformers, CONFIG_CLASSES[spec.key], None)
    if cls is None:
        raise ConfigError(f"this transformers ({transformers.__version__}) has no {CONFIG_CLASSES[spec.key]}: "
                          "indexcache needs transformers 5.23 or newer for it")
    body = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "transformers_version",
                                                    "quantization_config")}
    try:
        cfg = cls(**body)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{spec.classes[0]} config: {e}") from None
    return cfg.text_config if spec.key == "glm5_next" and text else cfg


def _config_pattern(spec: ArchSpec, d: dict, tc, slots: list[int]) -> tuple[Pattern, str]:
    """The pattern a config carries: ``index_topk_pattern`` over the pattern positions (what engines and
    this package's exports write), GLM-5.3's per-decoder-layer ``indexer_types``, else all Full."""
    text = d.get("index_topk_pattern")
    if text is not None and len(str(text)) == len(slots):
        try:
            return Pattern.parse(str(text)), "config index_topk_pattern"
        except PatternError as e:
            raise ConfigError(f"config index_topk_pattern: {e}") from None
    types = getattr(tc, "indexer_types", None) if spec.key == "glm5_next" else None
    if types is not None and (d.get("text_config") or {}).get("indexer_types") is not None:
        chars = "".join(FULL if str(types[layer]).lower() == "full" else SHARED for layer in slots)
        try:
            return Pattern(chars), "config text_config.indexer_types"
        except PatternError as e:
            raise ConfigError(f"config indexer_types: {e}") from None
    return Pattern.all_full(len(slots)), "all Full (config declares no pattern)"


def arch_names() -> list[str]:
    return list(SPECS)


__all__ = ["CSA", "NONE", "NONE_ALIAS", "SPECS", "ArchSpec", "ModelInfo", "arch_names", "check_trained",
           "describe_positions", "detect_arch", "exports_text", "model_info", "read_config"]
