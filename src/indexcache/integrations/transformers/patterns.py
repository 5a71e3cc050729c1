"""Patterns inside transformers' own DSA-family models, without editing transformers.

:func:`apply_pattern` makes a loaded model run a Full/Shared pattern, one character per layer that owns an
indexer (:mod:`indexcache.architectures`: every layer of DeepSeek-V3.2 and GLM-5, the CSA layers of
DeepSeek-V4, the indexed layers of GLM-5.3, the sparse layers of MiniMax-M3).

- GLM-MoE-DSA shares natively: a Shared layer's attention has ``indexer=None`` and attends with the indices
  handed up from the layer below, and ``config.indexer_types`` records the pattern.
- Every other architecture gets a weightless stand-in indexer on each Shared layer (:class:`SharedIndexer`):
  it returns what the nearest preceding Full layer's indexer returned in the same forward, in that
  architecture's unit (tokens, compressed entries, pools expanded to tokens, per-head key blocks). The
  Full indexers record their output through a forward hook; a hook on the base model clears it around
  every forward, so no forward reads indices of another. (GLM-5.3's own ``indexer_types`` sharing is not
  used: it loses the indices across a linear-attention layer.)

:func:`remove_pattern` undoes it; applying a pattern again is harmless. A pattern stays fixed for the life
of a generation cache: a Shared layer never fills its indexer's cache state.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...architectures import describe_positions
from ...errors import HFModelError, PatternError
from ...pattern import Pattern, format_ranges

# transformers class name (or any base class of the model) -> architecture
SUPPORTED_CLASSES: dict[str, str] = {
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "GlmMoeDsaModel": "glm_moe_dsa",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "DeepseekV32Model": "deepseek_v32",
    "DeepseekV4ForCausalLM": "deepseek_v4",
    "DeepseekV4Model": "deepseek_v4",
    "Glm5NextForConditionalGeneration": "glm5_next",
    "MiniMaxM3VLForCausalLM": "minimax_m3",
}
# the layer type that owns an indexer, by architecture (the others: every layer)
_INDEXED_TYPE = {"deepseek_v4": "compressed_sparse_attention", "glm5_next": "indexed_attention",
                 "minimax_m3": "minimax_m3_sparse"}
STATE_ATTR = "_indexcache_pattern_state"


# ------------------------------------------------------------------------------------------ lookup
def model_arch(hf_model: nn.Module) -> str:
    """The architecture key of a transformers model; :class:`HFModelError` for any other class."""
    for cls in type(hf_model).__mro__:
        arch = SUPPORTED_CLASSES.get(cls.__name__)
        if arch is not None:
            return arch
    raise HFModelError(
        f"{type(hf_model).__name__} is not a DSA model this supports (use one of {', '.join(SUPPORTED_CLASSES)})"
    )


def text_model(hf_model: nn.Module) -> nn.Module:
    """The module that holds the decoder layers (and the final norm)."""
    arch = model_arch(hf_model)
    base = getattr(hf_model, "model", hf_model)
    if arch == "glm5_next":
        return getattr(base, "language_model", base)
    return base


def text_config(hf_model: nn.Module):
    cfg = hf_model.config
    return cfg.text_config if model_arch(hf_model) == "glm5_next" and hasattr(cfg, "text_config") else cfg


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder layers (MTP layers excluded)."""
    return text_model(hf_model).layers[: text_config(hf_model).num_hidden_layers]


def slot_layers(hf_model: nn.Module) -> list[int]:
    """The decoder layer of each pattern position: the layers that own an indexer."""
    arch = model_arch(hf_model)
    cfg = text_config(hf_model)
    n = cfg.num_hidden_layers
    if arch not in _INDEXED_TYPE:
        return list(range(n))
    return [i for i in range(n) if cfg.layer_types[i] == _INDEXED_TYPE[arch]]


def holder(hf_model: nn.Module, layer: int) -> nn.Module:
    """The module whose ``indexer`` attribute a pattern swaps (DeepSeek-V4: the CSA compressor)."""
    attn = decoder_layers(hf_model)[layer].self_attn
    return attn.compressor if model_arch(hf_model) == "deepseek_v4" else attn


def is_indexer(module: nn.Module | None) -> bool:
    return module is not None and not isinstance(module, SharedIndexer)


# --------------------------------------------------------------------------------------- patterns
class _IndexSlot:
    """The selection of the last Full layer run in the current forward."""

    __slots__ = ("indices",)

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None


class SharedIndexer(nn.Module):
    """A Shared layer's indexer: no weights; it returns the selection of the nearest preceding Full layer of
    the same forward, so the attention around it runs unchanged."""

    def __init__(self, slot: _IndexSlot, layer_idx: int):
        super().__init__()
        self._slot = slot
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs) -> torch.Tensor:
        indices = self._slot.indices
        if indices is None:
            raise PatternError(f"layer {self.layer_idx} is Shared but no Full layer ran before it in this forward")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        return indices.to(hidden.device) if hidden is not None else indices  # device_map: another device

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, reuses the previous Full layer's selection"


class SharedBlockIndexer(SharedIndexer):
    """MiniMax-M3's Shared indexer: the attention also calls its ``build_block_mask`` (the real indexer
    class's, bound to this module), and its cache layer gets an empty indexer-key history, which the
    cache's ``crop`` (prompt-lookup and assisted decoding) expects to find."""

    def __init__(self, slot: _IndexSlot, layer_idx: int, config, indexer_cls: type):
        super().__init__(slot, layer_idx)
        self.config = config
        self.block_size = config.index_block_size
        self.head_dim = config.index_head_dim
        self.build_block_mask = types.MethodType(indexer_cls.build_block_mask, self)

    def forward(self, hidden_states, position_embeddings=None, past_key_values=None, position_ids=None):
        if past_key_values is not None and hasattr(past_key_values, "layers"):
            layer = past_key_values.layers[self.layer_idx]
            if getattr(layer, "idx_keys", False) is None:
                layer.idx_keys = hidden_states.new_zeros(hidden_states.shape[0], 1, 0, self.head_dim)
        return super().forward(hidden_states)


@dataclass
class PatternState:
    """Bookkeeping kept on a patched model (a plain attribute: never part of its state dict). Keys are
    pattern positions."""

    arch: str
    slots: list[int]  # the decoder layer of each position
    indexers: dict[int, nn.Module]  # trained indexers still held (attached or set aside)
    had_indexer: list[bool]  # which positions had an indexer before the first patch
    config_before: dict  # config values replaced by the pattern (missing keys: absent)
    slot: _IndexSlot = field(default_factory=_IndexSlot)
    record_hooks: dict[int, object] = field(default_factory=dict)
    model_hooks: list = field(default_factory=list)
    pattern: Pattern | None = None


_MISSING = object()
_CONFIG_KEYS = ("indexer_types", "index_topk_pattern")


def pattern_state(hf_model: nn.Module) -> PatternState:
    st = hf_model.__dict__.get(STATE_ATTR)
    if st is not None:
        return st
    arch = model_arch(hf_model)
    slots = slot_layers(hf_model)
    indexers = {p: holder(hf_model, layer).indexer for p, layer in enumerate(slots)
                if is_indexer(holder(hf_model, layer).indexer)}
    st = PatternState(
        arch=arch, slots=slots, indexers=indexers, had_indexer=[p in indexers for p in range(len(slots))],
        config_before={k: getattr(hf_model.config, k, _MISSING) for k in _CONFIG_KEYS},
    )
    if arch != "glm_moe_dsa":
        # No forward may ever read indices left over from an earlier one (or keep them alive after it).
        base = getattr(hf_model, "model", hf_model)
        st.model_hooks = [base.register_forward_pre_hook(lambda *_: _clear(st.slot)),
                          base.register_forward_hook(lambda *_: _clear(st.slot))]
    hf_model.__dict__[STATE_ATTR] = st
    return st


def _clear(slot: _IndexSlot) -> None:
    slot.indices = None


def indexer_layers(hf_model: nn.Module) -> list[int]:
    """Pattern positions for which the model holds a trained indexer (attached, or set aside by a pattern)."""
    st = hf_model.__dict__.get(STATE_ATTR)
    if st is not None:
        return sorted(st.indexers)
    return [p for p, layer in enumerate(slot_layers(hf_model)) if is_indexer(holder(hf_model, layer).indexer)]


def current_pattern(hf_model: nn.Module) -> Pattern:
    """The pattern the model runs now: the applied one, else Full exactly where an indexer is attached."""
    st = hf_model.__dict__.get(STATE_ATTR)
    if st is not None and st.pattern is not None:
        return st.pattern
    return Pattern("".join("F" if is_indexer(holder(hf_model, layer).indexer) else "S"
                           for layer in slot_layers(hf_model)))


def device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def _stand_in(hf_model: nn.Module, st: PatternState, layer: int) -> SharedIndexer:
    if st.arch == "minimax_m3":
        import sys

        real_cls = sys.modules[type(decoder_layers(hf_model)[layer].self_attn).__module__].MiniMaxM3VLIndexer
        return SharedBlockIndexer(st.slot, layer, text_config(hf_model), real_cls)
    return SharedIndexer(st.slot, layer)


def apply_pattern(
    hf_model: nn.Module, pattern: Pattern | str | Sequence[str], drop_shared_indexers: bool = True
) -> Pattern:
    """Make a loaded transformers DSA model run ``pattern`` (one character per layer that owns an indexer).

    Full layers run their own indexer; Shared layers reuse the nearest preceding Full layer's selection.
    ``config.index_topk_pattern`` is set (and ``config.indexer_types`` on GLM-MoE-DSA), so
    ``save_pretrained`` writes the pattern. With ``drop_shared_indexers`` the Shared layers' indexers are
    released (their weights are gone, as in a GLM-5.2-style checkpoint); without it they are set aside, so a
    later pattern can make those layers Full again and :func:`remove_pattern` can restore the model. A Full
    layer must have a trained indexer: a checkpoint that ships indexers only on some layers limits the
    patterns it can run.
    """
    st = pattern_state(hf_model)
    p = Pattern.parse(pattern)
    if len(p) != len(st.slots):
        raise PatternError(f"wrong length: pattern has {len(p)} characters but the model has {len(st.slots)} layers "
                           f"with an indexer (decoder layers {format_ranges(st.slots)})")
    missing = [i for i in p.full_layers if i not in st.indexers]
    if missing:
        have = sorted(st.indexers)
        raise PatternError(
            f"{_where(st, missing)} are Full but the model holds no indexer for them (it has indexers on "
            f"{_where(st, have) if have else 'no layer'}; indexers dropped by drop_shared_indexers=True are gone)"
        )
    for pos, layer in enumerate(st.slots):
        h = holder(hf_model, layer)
        if p.is_full(pos):
            ind = st.indexers[pos]
            if h.indexer is not ind:
                dev = device_of(h)
                if dev is not None and device_of(ind) not in (None, dev):
                    ind.to(dev)  # an indexer set aside stays where its layer was; the layer may have moved
                h.indexer = ind
            if st.arch != "glm_moe_dsa" and pos not in st.record_hooks:
                st.record_hooks[pos] = ind.register_forward_hook(_recorder(st.slot))
        else:
            if st.arch == "glm_moe_dsa":
                h.indexer = None  # transformers' GLM attention then takes the indices handed up to it
            elif not isinstance(h.indexer, SharedIndexer):
                h.indexer = _stand_in(hf_model, st, layer)
            if drop_shared_indexers and pos in st.indexers:
                del st.indexers[pos]
                hook = st.record_hooks.pop(pos, None)
                if hook is not None:
                    hook.remove()
        if st.arch == "glm_moe_dsa" and hasattr(h, "skip_topk"):
            h.skip_topk = not p.is_full(pos)
    if st.arch in ("glm_moe_dsa", "deepseek_v32"):  # transformers' per-layer key for these two
        hf_model.config.indexer_types = p.indexer_types
    hf_model.config.index_topk_pattern = str(p)
    st.pattern = p
    return p


def _where(st: PatternState, positions: Sequence[int]) -> str:
    return describe_positions(st.slots, list(positions))


def _recorder(slot: _IndexSlot):
    def hook(module: nn.Module, args, output: torch.Tensor) -> None:  # returns None: the output stays as it is
        slot.indices = output

    return hook


def remove_pattern(hf_model: nn.Module) -> None:
    """Undo :func:`apply_pattern`: every layer gets back the indexer it had, the config its old values.

    Raises :class:`HFModelError` if an indexer it needs was dropped (``drop_shared_indexers=True``).
    Does nothing on a model that was never patched.
    """
    st = hf_model.__dict__.get(STATE_ATTR)
    if st is None:
        return
    lost = [i for i, had in enumerate(st.had_indexer) if had and i not in st.indexers]
    if lost:
        raise HFModelError(f"cannot restore {_where(st, lost)}: their indexers were dropped by "
                           "apply_pattern(..., drop_shared_indexers=True); reload the model instead")
    for pos, layer in enumerate(st.slots):
        h = holder(hf_model, layer)
        if st.had_indexer[pos]:
            h.indexer = st.indexers[pos]
        elif st.arch == "glm_moe_dsa":
            h.indexer = None
        # elsewhere a position that never had a trained indexer keeps its stand-in (the attention calls one)
        if st.arch == "glm_moe_dsa" and hasattr(h, "skip_topk"):
            h.skip_topk = h.indexer is None
    for hook in [*st.record_hooks.values(), *st.model_hooks]:
        hook.remove()
    for key, value in st.config_before.items():
        if value is _MISSING:
            if hasattr(hf_model.config, key):
                delattr(hf_model.config, key)
        else:
            setattr(hf_model.config, key, value)
    del hf_model.__dict__[STATE_ATTR]


def drop_indexers(hf_model: nn.Module, positions: Sequence[int]) -> None:
    """Forget the indexers at ``positions`` (a checkpoint that ships none there: transformers built them with
    random weights, which must never run)."""
    st = pattern_state(hf_model)
    for pos in positions:
        if pos in st.indexers:
            del st.indexers[pos]
            st.had_indexer[pos] = False
            hook = st.record_hooks.pop(pos, None)
            if hook is not None:
                hook.remove()


__all__ = [
    "SUPPORTED_CLASSES",
    "PatternState",
    "SharedBlockIndexer",
    "SharedIndexer",
    "apply_pattern",
    "current_pattern",
    "decoder_layers",
    "device_of",
    "drop_indexers",
    "holder",
    "indexer_layers",
    "is_indexer",
    "model_arch",
    "pattern_state",
    "remove_pattern",
    "slot_layers",
    "text_config",
    "text_model",
]
