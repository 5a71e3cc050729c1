"""Read ``config.json`` of DeepSeek-V3.2 (``deepseek_v32``) and GLM-5-class (``glm_moe_dsa``) checkpoints.

Missing keys take transformers' class defaults for the architecture, RoPE parameters follow
transformers' standardisation (``rope_scaling`` wins over ``rope_parameters``; ``rope_theta`` may sit
at the top level), and the IndexCache pattern follows transformers' precedence
(``indexer_types`` > ``index_topk_pattern`` > ``index_topk_freq``/``index_skip_topk_offset``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .pattern import Pattern, PatternError

ARCHITECTURES = {
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "DeepseekV32ForCausalLM": "deepseek_v32",
}

# transformers 5.23 class defaults for every key we read.
_COMMON_DEFAULTS = dict(
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    attention_bias=False,
    index_topk=2048,
    index_head_dim=128,
    first_k_dense_replace=3,
    bos_token_id=0,
    eos_token_id=1,
)
ARCH_DEFAULTS = {
    "glm_moe_dsa": dict(
        _COMMON_DEFAULTS,
        vocab_size=154880, hidden_size=6144, intermediate_size=12288, moe_intermediate_size=2048,
        num_hidden_layers=78, num_attention_heads=64, q_lora_rank=2048, v_head_dim=256,
        qk_nope_head_dim=192, n_group=1, topk_group=1, max_position_embeddings=202752,
        rms_norm_eps=1e-5, index_n_heads=32, indexer_rope_interleave=True,
    ),
    "deepseek_v32": dict(
        _COMMON_DEFAULTS,
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, max_position_embeddings=163840,
        rms_norm_eps=1e-6, index_n_heads=64, indexer_rope_interleave=False,
    ),
}
SUPPORTED_ROPE = ("default", "linear", "yarn")




@dataclass
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def to_dict(self) -> dict:
        d = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type != "default":
            d["factor"] = self.factor
        if self.rope_type == "yarn":
            d.update(
                original_max_position_embeddings=self.original_max_position_embeddings,
                beta_fast=self.beta_fast, beta_slow=self.beta_slow,
            )
            for k in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, k) is not None:
                    d[k] = getattr(self, k)
            if not self.truncate:
                d["truncate"] = False
        return d


@dataclass
class DSAConfig:
    """Everything the model needs, resolved. ``raw`` keeps the original dict for saving."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    index_topk: int
    index_n_heads: int
    index_head_dim: int
    indexer_rope_interleave: bool
    mlp_layer_types: list[str]
    rope: RopeConfig
    pattern: Pattern
    pattern_source: str = "all Full"
    fp8_block_size: tuple[int, int] | None = None
    num_mtp_layers: int = 0
    initializer_range: float = 0.02
    raw: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def architecture(self) -> str:
        return {v: k for k, v in ARCHITECTURES.items()}[self.arch]

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale, with YaRN's mscale folded in exactly as transformers does."""
        scale = self.qk_head_dim**-0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            m = yarn_get_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == "sparse"

    # ---------------------------------------------------------------------------- IO
    @classmethod
    def from_dict(cls, d: dict) -> DSAConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        arch = detect_architecture(d)
        defaults = ARCH_DEFAULTS[arch]

        def get(key):
            v = d.get(key)
            return defaults[key] if v is None else v

        n_layers = int(get("num_hidden_layers"))
        if d.get("q_lora_rank", defaults["q_lora_rank"]) is None:
            raise ConfigError("q_lora_rank is null: DSA indexers read the q latent, so a q-LoRA is required")
        if get("hidden_act") != "silu":
            raise ConfigError(f"unsupported hidden_act {get('hidden_act')!r} (DSA models use 'silu')")

        mlp_types = d.get("mlp_layer_types")
        if mlp_types is None:
            n_dense = min(int(get("first_k_dense_replace")), n_layers)
            mlp_types = ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense)
        mlp_types = list(mlp_types)
        if len(mlp_types) != n_layers or any(t not in ("dense", "sparse") for t in mlp_types):
            raise ConfigError(
                f"mlp_layer_types must list 'dense'/'sparse' for each of the {n_layers} layers, got {mlp_types}"
            )

        try:
            pattern, source = Pattern.from_config(d, n_layers)
            pattern.validate(num_layers=n_layers)
        except PatternError as e:
            raise ConfigError(f"config pattern: {e}") from None

        n_exp, n_group, topk_group = int(get("n_routed_experts")), int(get("n_group")), int(get("topk_group"))
        if "sparse" in mlp_types:
            if n_group < 1 or n_exp % n_group:
                raise ConfigError(f"n_group={n_group} must divide n_routed_experts={n_exp}")
            if not 1 <= topk_group <= n_group:
                raise ConfigError(f"topk_group={topk_group} must be between 1 and n_group={n_group}")
            if n_exp // n_group < 2 and n_group > 1:
                raise ConfigError("group-limited routing needs at least 2 experts per group")
            if int(get("num_experts_per_tok")) > n_exp // n_group * topk_group:
                raise ConfigError("num_experts_per_tok exceeds the experts reachable in topk_group groups")

        values = {name: conv(get(name)) for name, conv in scalar_fields(cls).items()}
        values.update(num_hidden_layers=n_layers, n_routed_experts=n_exp, n_group=n_group, topk_group=topk_group)
        cfg = cls(
            arch=arch,
            **values,
            mlp_layer_types=mlp_types,
            rope=parse_rope(d, int(get("max_position_embeddings"))),
            pattern=pattern,
            pattern_source=source,
            fp8_block_size=_fp8_block_size(d),
            num_mtp_layers=int(d.get("num_nextn_predict_layers") or 0),
            raw=copy.deepcopy(d),
        )
        cfg._check_dims()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> DSAConfig:
        return cls.from_dict(read_config(path))

    def _check_dims(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"index_head_dim={self.index_head_dim} is smaller than qk_rope_head_dim={self.qk_rope_head_dim}"
            )
        if self.index_topk < 1:
            raise ConfigError(f"index_topk must be positive, got {self.index_topk}")

    def to_dict(self, pattern: Pattern | None = None) -> dict:
        """The config.json to write: the original keys, with the pattern written explicitly."""
        d = copy.deepcopy(self.raw) if self.raw else {}
        d.setdefault("architectures", [self.architecture])
        d.setdefault("model_type", self.arch)
        for key in scalar_fields(type(self)):
            d.setdefault(key, getattr(self, key))
        d.setdefault("mlp_layer_types", self.mlp_layer_types)
        d.setdefault("num_key_value_heads", self.num_attention_heads)
        d.setdefault("hidden_act", "silu")
        if "rope_scaling" not in d and "rope_parameters" not in d:
            d["rope_parameters"] = self.rope.to_dict()
        # We hold fp32/bf16 weights, never the block-FP8 ones: drop the quantization block.
        d.pop("quantization_config", None)
        p = pattern or self.pattern
        d.update(p.config_patch())
        # An explicit per-layer pattern supersedes any freq/offset: drop them so no reader re-derives.
        for k in ("index_topk_freq", "index_skip_topk_offset"):
            d.pop(k, None)
        return d


_CONVERTERS = {"int": int, "float": float, "bool": bool}


def scalar_fields(cls) -> dict[str, type]:
    """The config.json keys a DSAConfig reads as plain numbers or flags, by field, with their conversion:
    the one list from_dict and to_dict both use."""
    out = {}
    for f in dataclasses.fields(cls):
        conv = _CONVERTERS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if conv is not None and f.name != "num_mtp_layers":  # MTP depth is num_nextn_predict_layers on disk
            out[f.name] = conv
    return out


def detect_architecture(d: dict) -> str:
    """The architecture a config declares. ``architectures`` and ``model_type`` must agree: a config that
    names another class (``LlamaForCausalLM``) is refused even when its ``model_type`` is a DSA one."""
    archs = d.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"architectures must be a list of class names, got {archs!r}")
    mt = d.get("model_type")
    supported = ", ".join(f"{a} ({m})" for a, m in ARCHITECTURES.items())
    known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
    if archs and not known:
        raise ConfigError(f"unknown architecture {archs} (model_type {mt!r}): indexcache reads {supported}")
    if len(set(known)) > 1:
        raise ConfigError(f"config lists architectures of two kinds, {archs}: give one")
    if known and mt is not None and mt != known[0]:
        raise ConfigError(f"config contradicts itself: architectures {archs} is {known[0]}, but model_type is {mt!r}")
    if known:
        return known[0]
    if mt in ARCHITECTURES.values():
        return mt
    raise ConfigError(f"unknown architecture {archs or None} (model_type {mt!r}): indexcache reads {supported}")


def parse_rope(d: dict, max_pos: int) -> RopeConfig:
    """RoPE parameters as transformers standardises them."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope parameters must be an object, got {params!r}")
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE:
        raise ConfigError(f"unsupported rope_type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE)})")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    r = RopeConfig(rope_type=rope_type, theta=float(theta))
    if rope_type in ("linear", "yarn"):
        if rope_type == "linear" and params.get("factor") is None:
            raise ConfigError("linear rope scaling needs a 'factor'")
        r.original_max_position_embeddings = int(
            d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
        )
        factor = params.get("factor")
        r.factor = float(factor) if factor is not None else max_pos / r.original_max_position_embeddings
    if rope_type == "yarn":
        r.beta_fast = float(params.get("beta_fast") or 32)
        r.beta_slow = float(params.get("beta_slow") or 1)
        r.mscale = params.get("mscale")
        r.mscale_all_dim = params.get("mscale_all_dim")
        r.attention_factor = params.get("attention_factor")
        r.truncate = bool(params.get("truncate", True))
    elif params.get("mscale_all_dim"):
        r.mscale_all_dim = params.get("mscale_all_dim")  # transformers folds it into the softmax scale
    return r


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _fp8_block_size(d: dict) -> tuple[int, int] | None:
    q = d.get("quantization_config") or {}
    if q.get("quant_method") == "fp8" or "weight_block_size" in q:
        bs = q.get("weight_block_size") or [128, 128]
        return int(bs[0]), int(bs[1])
    return None


def read_config(path: str | Path) -> dict:
    """A model directory's (or a file's) config.json as a dict, with one-line errors."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"no config.json at {f}")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f} must hold a JSON object")
    return d
