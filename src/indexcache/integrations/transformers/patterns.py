"""Patterns inside transformers' own DSA models, without editing transformers.

:func:`apply_pattern` makes a loaded model run a Full/Shared layer pattern. GLM-MoE-DSA shares top-k
indices natively: a Shared layer's attention has ``indexer=None`` and attends with the indices handed up
from the layer below, and ``config.indexer_types`` records the pattern. transformers' DeepSeek-V3.2 has no
sharing, so there each Shared layer gets a weightless stand-in indexer (:class:`SharedIndexer`) that
returns the indices the nearest preceding Full layer's indexer produced in the same forward.
:func:`remove_pattern` undoes it; applying a pattern again is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import HFModelError, PatternError
from ...pattern import Pattern, format_ranges

SUPPORTED_CLASSES: dict[str, str] = {
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "GlmMoeDsaModel": "glm_moe_dsa",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "DeepseekV32Model": "deepseek_v32",
}
# The indexer's RoPE, looked up in the indexer class's own modeling module so that q and k are computed
# by transformers' code: GLM rotates interleaved pairs, DeepSeek-V3.2 the two halves.
_ROPE_FUNCTION = {"glm_moe_dsa": "apply_rotary_pos_emb_interleave", "deepseek_v32": "apply_rotary_pos_emb"}
STATE_ATTR = "_indexcache_pattern_state"
_SCORING_ATTR = "_indexcache_scoring"
SCORING_MODES = ("exact", "fp8")


# ------------------------------------------------------------------------------------------ lookup
def model_arch(hf_model: nn.Module) -> str:
    """``"glm_moe_dsa"`` or ``"deepseek_v32"``; :class:`HFModelError` for any other model class."""
    for cls in type(hf_model).__mro__:
        arch = SUPPORTED_CLASSES.get(cls.__name__)
        if arch is not None:
            return arch
    raise HFModelError(
        f"{type(hf_model).__name__} is not a DSA model this supports (use one of {', '.join(SUPPORTED_CLASSES)})"
    )


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``...ForCausalLM`` or of its base ``...Model`` (MTP layers excluded)."""
    model_arch(hf_model)
    base = getattr(hf_model, "model", hf_model)
    n = hf_model.config.num_hidden_layers
    return base.layers[:n]


def is_indexer(module: nn.Module | None) -> bool:
    return module is not None and not isinstance(module, SharedIndexer)


# --------------------------------------------------------------------------------------- patterns
class _IndexSlot:
    """The top-k indices of the last Full layer run in the current forward (DeepSeek-V3.2 sharing)."""

    __slots__ = ("indices",)

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None


class SharedIndexer(nn.Module):
    """A DeepSeek-V3.2 Shared layer's indexer: no weights; it returns the indices of the nearest preceding
    Full layer of the same forward, so the attention around it runs unchanged."""

    def __init__(self, slot: _IndexSlot, layer_idx: int):
        super().__init__()
        self._slot = slot
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        indices = self._slot.indices
        if indices is None:
            raise PatternError(f"layer {self.layer_idx} is Shared but no Full layer ran before it in this forward")
        return indices.to(hidden_states.device)  # the Full layer may sit on another device (device_map)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, reuses the previous Full layer's top-k"


@dataclass
class PatternState:
    """Bookkeeping kept on a patched model (a plain attribute: never part of its state dict)."""

    arch: str
    indexers: dict[int, nn.Module]  # trained indexers still held, by layer (attached or set aside)
    had_indexer: list[bool]  # which layers had an indexer before the first patch
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
    layers = decoder_layers(hf_model)
    indexers = {i: layer.self_attn.indexer for i, layer in enumerate(layers) if is_indexer(layer.self_attn.indexer)}
    st = PatternState(
        arch=arch, indexers=indexers, had_indexer=[i in indexers for i in range(len(layers))],
        config_before={k: getattr(hf_model.config, k, _MISSING) for k in _CONFIG_KEYS},
    )
    if arch == "deepseek_v32":
        # No forward may ever read indices left over from an earlier one (or keep them alive after it).
        base = getattr(hf_model, "model", hf_model)
        st.model_hooks = [base.register_forward_pre_hook(lambda *_: _clear(st.slot)),
                          base.register_forward_hook(lambda *_: _clear(st.slot))]
    hf_model.__dict__[STATE_ATTR] = st
    return st


def _clear(slot: _IndexSlot) -> None:
    slot.indices = None


def indexer_layers(hf_model: nn.Module) -> list[int]:
    """Layers for which the model holds a trained indexer (attached, or set aside by a pattern)."""
    st = hf_model.__dict__.get(STATE_ATTR)
    if st is not None:
        return sorted(st.indexers)
    return [i for i, layer in enumerate(decoder_layers(hf_model)) if is_indexer(layer.self_attn.indexer)]


def current_pattern(hf_model: nn.Module) -> Pattern:
    """The pattern the model runs now: the applied one, else Full exactly where an indexer is attached."""
    st = hf_model.__dict__.get(STATE_ATTR)
    if st is not None and st.pattern is not None:
        return st.pattern
    layers = decoder_layers(hf_model)
    return Pattern("".join("F" if is_indexer(layer.self_attn.indexer) else "S" for layer in layers))


def device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def apply_pattern(
    hf_model: nn.Module, pattern: Pattern | str | Sequence[str], drop_shared_indexers: bool = True
) -> Pattern:
    """Make a loaded transformers DSA model run ``pattern`` (``"FSSF..."``, a Pattern, or ``indexer_types``).

    Full layers run their own indexer; Shared layers reuse the nearest preceding Full layer's top-k.
    ``config.indexer_types`` and ``config.index_topk_pattern`` are set, so ``save_pretrained`` writes the
    pattern. With ``drop_shared_indexers`` the Shared layers' indexers are released (their weights are
    gone, as in a GLM-5.2-style checkpoint); without it they are set aside, so a later pattern can make
    those layers Full again and :func:`remove_pattern` can restore the model. A Full layer must have a
    trained indexer: a checkpoint that ships indexers only on some layers limits the patterns it can run.
    """
    st = pattern_state(hf_model)
    layers = decoder_layers(hf_model)
    p = Pattern.parse(pattern)
    p.validate(num_layers=len(layers))
    missing = [i for i in p.full_layers if i not in st.indexers]
    if missing:
        have = sorted(st.indexers)
        raise PatternError(
            f"layers {format_ranges(missing)} are Full but the model holds no indexer for them (it has indexers on "
            f"layers {format_ranges(have) if have else 'none'}; indexers dropped by drop_shared_indexers=True are gone)"
        )
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if p.is_full(i):
            ind = st.indexers[i]
            if attn.indexer is not ind:
                dev = device_of(attn)
                if dev is not None and device_of(ind) not in (None, dev):
                    ind.to(dev)  # an indexer set aside stays where its layer was; the layer may have moved
                attn.indexer = ind
            if st.arch == "deepseek_v32" and i not in st.record_hooks:
                st.record_hooks[i] = ind.register_forward_hook(_recorder(st.slot))
        else:
            if st.arch == "glm_moe_dsa":
                attn.indexer = None  # transformers' GLM attention then takes the indices handed up to it
            elif not isinstance(attn.indexer, SharedIndexer):
                attn.indexer = SharedIndexer(st.slot, i)
            if drop_shared_indexers and i in st.indexers:
                del st.indexers[i]
                hook = st.record_hooks.pop(i, None)
                if hook is not None:
                    hook.remove()
        if hasattr(attn, "skip_topk"):
            attn.skip_topk = not p.is_full(i)
    hf_model.config.indexer_types = p.indexer_types
    hf_model.config.index_topk_pattern = str(p)
    st.pattern = p
    return p


def _recorder(slot: _IndexSlot):
    def hook(module: nn.Module, args, output: torch.Tensor) -> None:
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
    layers = decoder_layers(hf_model)
    lost = [i for i, had in enumerate(st.had_indexer) if had and i not in st.indexers]
    if lost:
        raise HFModelError(f"cannot restore layers {format_ranges(lost)}: their indexers were dropped by "
                           "apply_pattern(..., drop_shared_indexers=True); reload the model instead")
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        attn.indexer = st.indexers[i] if st.had_indexer[i] else None
        if hasattr(attn, "skip_topk"):
            attn.skip_topk = attn.indexer is None
    for hook in [*st.record_hooks.values(), *st.model_hooks]:
        hook.remove()
    for key, value in st.config_before.items():
        if value is _MISSING:
            if hasattr(hf_model.config, key):
                delattr(hf_model.config, key)
        else:
            setattr(hf_model.config, key, value)
    del hf_model.__dict__[STATE_ATTR]


