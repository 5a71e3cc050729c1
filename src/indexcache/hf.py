"""IndexCache inside transformers' own DSA models (``GlmMoeDsaForCausalLM``, ``DeepseekV32ForCausalLM``).

- :func:`apply_pattern` makes a loaded transformers model run a Full/Shared layer pattern. GLM-MoE-DSA
  shares top-k indices natively: a Shared layer's attention has ``indexer=None`` and attends with the
  indices handed up from the layer below, and ``config.indexer_types`` records the pattern.
  transformers' DeepSeek-V3.2 has no sharing, so there each Shared layer gets a weightless stand-in
  indexer (:class:`SharedIndexer`) that returns the indices the nearest preceding Full layer's indexer
  produced in the same forward.
- :func:`patch_indexer_scoring` replaces the indexers' scoring, which builds a dense fp32 [B, S, H, T]
  tensor (64 GiB for DeepSeek-V3.2's 64 indexer heads at 16K tokens), by the chunked scoring of
  :mod:`indexcache.ops.indexer`: the same scores and top-k, in memory bounded by a budget.
- :func:`capture_layer_inputs`, :func:`forward_layers` and :func:`head_nll` run the decoder layers of a
  transformers model piece by piece, so that a search can reuse the hidden states of an unchanged
  prefix (:mod:`indexcache.search.hf_backend`).

transformers' files are never edited. A pattern sets attributes and swaps indexer modules; the scoring
patch sets a ``forward`` on each indexer instance. :func:`remove_pattern` and
:func:`unpatch_indexer_scoring` undo them, and applying either one again is harmless.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HFModelError
from .ops.common import DEFAULT_BUDGET_BYTES
from .ops.fp8 import fp8_indexer_operands
from .ops.indexer import causal_windows, indexer_topk
from .pattern import Pattern, PatternError, _ranges

# transformers class name (or any base class of the model) -> architecture
SUPPORTED_CLASSES: dict[str, str] = {
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "GlmMoeDsaModel": "glm_moe_dsa",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "DeepseekV32Model": "deepseek_v32",
}
# The indexer's RoPE, looked up in the indexer class's own modeling module so that q and k are computed
# by transformers' code: GLM rotates interleaved pairs, DeepSeek-V3.2 the two halves.
_ROPE_FUNCTION = {"glm_moe_dsa": "apply_rotary_pos_emb_interleave", "deepseek_v32": "apply_rotary_pos_emb"}
_STATE_ATTR = "_indexcache_pattern_state"
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


def _is_indexer(module: nn.Module | None) -> bool:
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
class _PatternState:
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


def _state(hf_model: nn.Module) -> _PatternState:
    st = hf_model.__dict__.get(_STATE_ATTR)
    if st is not None:
        return st
    arch = model_arch(hf_model)
    layers = decoder_layers(hf_model)
    indexers = {i: layer.self_attn.indexer for i, layer in enumerate(layers) if _is_indexer(layer.self_attn.indexer)}
    st = _PatternState(
        arch=arch, indexers=indexers, had_indexer=[i in indexers for i in range(len(layers))],
        config_before={k: getattr(hf_model.config, k, _MISSING) for k in _CONFIG_KEYS},
    )
    if arch == "deepseek_v32":
        # No forward may ever read indices left over from an earlier one (or keep them alive after it).
        base = getattr(hf_model, "model", hf_model)
        st.model_hooks = [base.register_forward_pre_hook(lambda *_: _clear(st.slot)),
                          base.register_forward_hook(lambda *_: _clear(st.slot))]
    hf_model.__dict__[_STATE_ATTR] = st
    return st


def _clear(slot: _IndexSlot) -> None:
    slot.indices = None


def indexer_layers(hf_model: nn.Module) -> list[int]:
    """Layers for which the model holds a trained indexer (attached, or set aside by a pattern)."""
    st = hf_model.__dict__.get(_STATE_ATTR)
    if st is not None:
        return sorted(st.indexers)
    return [i for i, layer in enumerate(decoder_layers(hf_model)) if _is_indexer(layer.self_attn.indexer)]


def current_pattern(hf_model: nn.Module) -> Pattern:
    """The pattern the model runs now: the applied one, else Full exactly where an indexer is attached."""
    st = hf_model.__dict__.get(_STATE_ATTR)
    if st is not None and st.pattern is not None:
        return st.pattern
    layers = decoder_layers(hf_model)
    return Pattern("".join("F" if _is_indexer(layer.self_attn.indexer) else "S" for layer in layers))


def _device_of(module: nn.Module) -> torch.device | None:
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
    st = _state(hf_model)
    layers = decoder_layers(hf_model)
    p = Pattern.parse(pattern)
    p.validate(num_layers=len(layers))
    missing = [i for i in p.full_layers if i not in st.indexers]
    if missing:
        have = sorted(st.indexers)
        raise PatternError(
            f"layers {_ranges(missing)} are Full but the model holds no indexer for them (it has indexers on "
            f"layers {_ranges(have) if have else 'none'}; indexers dropped by drop_shared_indexers=True are gone)"
        )
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if p.is_full(i):
            ind = st.indexers[i]
            if attn.indexer is not ind:
                dev = _device_of(attn)
                if dev is not None and _device_of(ind) not in (None, dev):
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
    st = hf_model.__dict__.get(_STATE_ATTR)
    if st is None:
        return
    layers = decoder_layers(hf_model)
    lost = [i for i, had in enumerate(st.had_indexer) if had and i not in st.indexers]
    if lost:
        raise HFModelError(f"cannot restore layers {_ranges(lost)}: their indexers were dropped by "
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
    del hf_model.__dict__[_STATE_ATTR]


# ---------------------------------------------------------------------------------------- scoring
def _all_indexers(hf_model: nn.Module) -> list[nn.Module]:
    found: dict[int, nn.Module] = {}
    st = hf_model.__dict__.get(_STATE_ATTR)
    if st is not None:
        found.update({id(m): m for m in st.indexers.values()})
    for layer in decoder_layers(hf_model):
        if _is_indexer(layer.self_attn.indexer):
            found[id(layer.self_attn.indexer)] = layer.self_attn.indexer
    return list(found.values())


def patch_indexer_scoring(
    hf_model: nn.Module, budget_bytes: int = DEFAULT_BUDGET_BYTES, scoring: str = "exact"
) -> int:
    """Swap every indexer's dense scoring for chunked scoring; returns how many indexers were patched.

    transformers scores all queries at once through a [B, S, H, T] fp32 tensor. Here the queries run in
    chunks whose [B, chunk, H, T] logits fit ``budget_bytes``, keys after a chunk's last query are never
    scored, and each chunk keeps its top-k. The projections and RoPE are transformers' own code; the
    scores are the same sums in fp32 (equal within fp32 rounding) and, the attention mask applied the same
    way, the same top-k. ``scoring="fp8"`` scores DeepSeek's fp8-faithful way (Hadamard rotation, e4m3
    blocks with power-of-two scales), as ``DSAForCausalLM.set_scoring("fp8")``. Calling it again only
    updates the budget and mode; :func:`unpatch_indexer_scoring` restores the original scoring.
    """
    if scoring not in SCORING_MODES:
        raise HFModelError(f"unknown scoring mode {scoring!r} (choose from {', '.join(SCORING_MODES)})")
    if budget_bytes < 1:
        raise HFModelError(f"budget_bytes must be positive, got {budget_bytes}")
    arch = model_arch(hf_model)
    count = 0
    for module in _all_indexers(hf_model):
        info = module.__dict__.get(_SCORING_ATTR)
        if info is None:
            rope = getattr(sys.modules[type(module).__module__], _ROPE_FUNCTION[arch], None)
            if rope is None:
                raise HFModelError(f"{type(module).__name__}'s module has no {_ROPE_FUNCTION[arch]}: "
                                   "this transformers version is not supported")
            # accelerate's hooks (device_map over several devices) call the saved ``_old_forward``
            attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
            info = {"attr": attr, "saved": module.__dict__.get(attr), "rope": rope,
                    "pairs": arch == "glm_moe_dsa"}
            module.__dict__[_SCORING_ATTR] = info
            module.__dict__[attr] = types.MethodType(_chunked_indexer_forward, module)
        info.update(budget=int(budget_bytes), scoring=scoring)
        count += 1
    return count


def unpatch_indexer_scoring(hf_model: nn.Module) -> int:
    """Give every patched indexer its original scoring back; returns how many were restored."""
    count = 0
    for module in _all_indexers(hf_model):
        info = module.__dict__.pop(_SCORING_ATTR, None)
        if info is None:
            continue
        if info["saved"] is None:
            module.__dict__.pop(info["attr"], None)
        else:
            module.__dict__[info["attr"]] = info["saved"]
        count += 1
    return count


@torch.no_grad()
def _chunked_indexer_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    q_resid: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
) -> torch.Tensor:
    """The indexer forward of transformers' GLM-MoE-DSA / DeepSeek-V3.2, with chunked scoring."""
    info = self.__dict__[_SCORING_ATTR]
    B, S, _ = hidden_states.shape
    H, D, rope_dim = self.n_heads, self.head_dim, self.qk_rope_head_dim
    cos, sin = position_embeddings
    q = self.wq_b(q_resid).view(B, S, H, D)
    q_rot, q_pass = torch.split(q, [rope_dim, D - rope_dim], dim=-1)
    k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [rope_dim, D - rope_dim], dim=-1)
    q_rot, k_rot = info["rope"](q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    del q_rot, q_pass  # frees the projection's output now: at 16K tokens each copy of q is 512 MiB in fp32
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    if past_key_values is not None:
        k = past_key_values.update_indexer(k, self.layer_idx)
    w = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float() * (H**-0.5)
    if info["scoring"] == "fp8":
        # The Hadamard rotation mixes dimensions, so it must see them in the reference layout: transformers'
        # interleaved RoPE returns the rotated pairs de-interleaved (evens, then odds); put them back in place.
        if info["pairs"]:
            q, k = _pairs_in_place(q, rope_dim), _pairs_in_place(k, rope_dim)
        q, k = fp8_indexer_operands(q, k)
    # eager / SDPA scatter the indices into a mask, where -1 is not an index (other kernels take -1 as "none")
    fill = getattr(self.config, "_attn_implementation", None) in ("eager", "sdpa", None)
    return masked_indexer_topk(q, w, k, self.index_topk, self.softmax_scale, attention_mask, info["budget"],
                               fill_missing=fill)


def _pairs_in_place(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """[e0 e1 .. | o0 o1 .. | rest] -> [e0 o0 e1 o1 .. | rest] over the first ``rope_dim`` dims."""
    h = rope_dim // 2
    pairs = torch.stack((x[..., :h], x[..., h:rope_dim]), dim=-1).flatten(-2)
    return torch.cat((pairs, x[..., rope_dim:]), dim=-1)


def masked_indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    scale: float,
    mask: torch.Tensor | None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    fill_missing: bool = False,
    backend: str = "torch",
) -> torch.Tensor:
    """Top-k key indices [B, S, min(topk, T)] (int32 as transformers returns them), through the same
    indexer op as the model (:func:`indexcache.ops.indexer.indexer_topk`).

    A query that sees fewer than k keys gets ``-1`` in the slots left over, or with ``fill_missing`` its
    best index repeated there: it keeps every key it sees either way, and a repeat is a valid index for
    transformers' eager / SDPA paths, which scatter the indices into a mask.

    ``q`` [B,S,H,D] are the last S of the T key slots (a prefill after ``T - S`` cached tokens), ``w``
    [B,S,H] fp32 head gates, ``k`` [B,T,D]. ``mask`` is transformers' [B or 1, S, T] attention mask (bool:
    True = visible; float: additive, its minimum = hidden), applied as transformers applies it; the
    queries stay causal either way. Memory: one [chunk, H, T] block at a time.
    """
    B, S, H, D = q.shape
    T = k.shape[1]
    pos = torch.arange(S) + (T - S)
    ks, ke = causal_windows(pos.to(q.device), B)
    idx = indexer_topk(q.reshape(B * S, H, D), k, w.reshape(B * S, H), ks, ke, topk, scale, backend=backend,
                       mask=mask, budget_bytes=budget_bytes, ke_host=causal_windows(pos, B)[1],
                       index_dtype=torch.int32).view(B, S, -1)
    if fill_missing:  # a query that sees nothing (left padding) repeats index 0: a valid slot, masked anyway
        idx = torch.where(idx < 0, idx[..., :1].clamp_min(0), idx)
    return idx


def dense_indexer_bytes(batch: int, seq: int, n_heads: int, keys: int | None = None) -> int:
    """Bytes of the fp32 [B, S, H, T] score tensor transformers' indexer materialises (per layer)."""
    return batch * seq * n_heads * (seq if keys is None else keys) * 4


# ----------------------------------------------------------------------------------------- loading
def load_pretrained(
    path: str | Path,
    pattern: Pattern | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    scoring: str | None = "exact",
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    **kwargs,
) -> nn.Module:
    """``from_pretrained`` a local DSA checkpoint with a pattern (default: the checkpoint's own) applied.

    Like :func:`indexcache.load_model`, it reads which layers ship indexer weights: a Full layer without
    them is an error, never an untrained indexer (transformers' DeepSeek-V3.2 builds an indexer on every
    layer and would initialise the missing ones at random; they are dropped here). ``scoring`` patches
    the indexers' scoring (:func:`patch_indexer_scoring`); ``None`` keeps transformers' dense scoring.
    ``device_map`` (``"auto"``, or {module name: device}) spreads the model over several devices and
    needs ``accelerate``; without it the model is loaded and moved to ``device``. Other keyword arguments
    go to ``from_pretrained``.
    """
    try:
        import transformers
    except ImportError:
        raise HFModelError("transformers is not installed (pip install transformers)") from None
    from .checkpoint import CheckpointError, TensorSource, checkpoint_indexer_layers
    from .config import DSAConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFModelError(f"{path} is not a local model directory with a config.json")
    cfg = DSAConfig.from_file(path)
    n = cfg.num_hidden_layers
    src = TensorSource(path)
    try:
        shipped = checkpoint_indexer_layers(src.names(), n)
    finally:
        src.close()
    p = cfg.pattern if pattern is None else Pattern.parse(pattern)
    p.validate(num_layers=n)
    try:
        p.validate(indexer_layers=shipped)
    except PatternError as e:
        raise CheckpointError(str(e)) from None
    cls = getattr(transformers, cfg.architecture, None)
    if cls is None:
        raise HFModelError(f"this transformers ({transformers.__version__}) has no {cfg.architecture}")
    if cfg.arch == "glm_moe_dsa":
        kwargs.setdefault("indexer_types", p.indexer_types)  # build indexers only where they will run
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = cls.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    if device_map is None:
        model.to(device)
    apply_pattern(model, p, drop_shared_indexers=True)
    if scoring is not None:
        patch_indexer_scoring(model, budget_bytes, scoring)
    return model


# ------------------------------------------------------------------------------- layer-wise running
class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(hf_model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(hidden states entering layer 0, the keyword arguments the model passes to every decoder layer).

    The model's own forward builds them (embedding, RoPE tables, causal mask) and is stopped at layer 0,
    so :func:`forward_layers` then runs the layers exactly as the model would.
    """
    layers = decoder_layers(hf_model)
    base = getattr(hf_model, "model", hf_model)
    got: dict = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict):
        got["hidden"] = args[0] if args else kwargs["hidden_states"]
        got["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "prev_topk_indices")}
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        base(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in got:
        raise HFModelError(f"{type(base).__name__}.forward never reached its first decoder layer")
    return got["hidden"], got["kwargs"]


def forward_layers(
    hf_model: nn.Module,
    hidden: torch.Tensor,
    layer_kwargs: dict,
    start: int = 0,
    end: int | None = None,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run decoder layers ``start .. end-1`` with the current pattern; ``indices`` are the top-k carried
    in from before ``start`` (needed when layer ``start`` is Shared). Returns (hidden, carried indices)."""
    st = _state(hf_model)
    layers = decoder_layers(hf_model)
    end = len(layers) if end is None else end
    for i in range(start, end):
        if st.arch == "glm_moe_dsa":
            hidden, indices = layers[i](hidden, prev_topk_indices=indices, **layer_kwargs)
        else:
            st.slot.indices = indices
            try:
                hidden = layers[i](hidden, **layer_kwargs)
                indices = st.slot.indices
            finally:
                st.slot.indices = None
    return hidden, indices


@torch.no_grad()
def head_nll(hf_model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
             budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[float, int]:
    """Summed next-token cross-entropy of final hidden states, and the number of predicted tokens.

    The final norm and ``lm_head`` run on chunks of positions, so [B, S, vocab] logits (10 GiB at 16K
    tokens with a 155K vocabulary) never exist at once.
    """
    base = getattr(hf_model, "model", None)
    head = getattr(hf_model, "lm_head", None)
    if base is None or head is None:
        raise HFModelError(f"{type(hf_model).__name__} has no lm_head: load the ...ForCausalLM class")
    B, S, _ = hidden.shape
    vocab = head.out_features if isinstance(head, nn.Linear) else hf_model.config.vocab_size
    step = max(1, budget_bytes // max(B * vocab * 4, 1))
    total = 0.0
    for s0 in range(0, S - 1, step):
        s1 = min(S - 1, s0 + step)
        logits = head(base.norm(hidden[:, s0:s1]))
        target = ids[:, s0 + 1 : s1 + 1].to(logits.device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                       reduction="sum"))
    return total, B * (S - 1)


def describe_placement(hf_model: nn.Module) -> dict:
    """Where each decoder layer (and the embedding / head) lives: {name: device}."""
    def where(module: nn.Module) -> str:
        dev = _device_of(module)  # "meta": offloaded by accelerate, loaded to the execution device per call
        return str(dev) if dev is not None else "meta"

    base = getattr(hf_model, "model", hf_model)
    out = {"embed_tokens": where(base.embed_tokens)}
    for i, layer in enumerate(decoder_layers(hf_model)):
        out[f"layers.{i}"] = where(layer)
    if getattr(hf_model, "lm_head", None) is not None:
        out["lm_head"] = where(hf_model.lm_head)
    return out


__all__ = [
    "HFModelError",
    "SharedIndexer",
    "SUPPORTED_CLASSES",
    "apply_pattern",
    "capture_layer_inputs",
    "current_pattern",
    "decoder_layers",
    "dense_indexer_bytes",
    "describe_placement",
    "forward_layers",
    "head_nll",
    "indexer_layers",
    "load_pretrained",
    "masked_indexer_topk",
    "model_arch",
    "patch_indexer_scoring",
    "remove_pattern",
    "unpatch_indexer_scoring",
]
