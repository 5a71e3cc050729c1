"""Running a transformers DSA model layer by layer: :class:`TransformersRunner`, the
:class:`~indexcache.runner.LayerRunner` behind ``--backend hf``.

The model's own forward builds what every decoder layer receives (embedding, RoPE tables, causal mask)
and is stopped at layer 0 (:func:`capture_layer_inputs`); the layers then run one by one, under the
pattern the runner applies (:func:`indexcache.integrations.transformers.apply_pattern`, keeping every
trained indexer so that any candidate can be built), so the search reuses the states of an unchanged
prefix. The model can be spread over devices with ``device_map`` (transformers moves the hidden states
between layers), so a model that does not fit one device can be searched.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...architectures import ModelInfo, check_trained, model_info
from ...errors import HFModelError, SearchError
from ...lm import head_nll_chunked, head_nll_rows
from ...ops.common import DEFAULT_BUDGET_BYTES
from ...pattern import Pattern
from ...runner import LayerState
from .loading import load_pretrained
from .patterns import (
    apply_pattern,
    current_pattern,
    decoder_layers,
    device_of,
    indexer_layers,
    model_arch,
    pattern_state,
    slot_layers,
    text_config,
    text_model,
)


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(hf_model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(the residual stream entering layer 0, the keyword arguments the model passes to every decoder layer).

    The model's own forward builds them (embedding, RoPE tables, masks; DeepSeek-V4 and GLM-5.3 also widen
    the stream to their hyper-connections) and is stopped at layer 0, so :func:`forward_layers` then runs
    the layers exactly as the model would.
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
    """Run decoder layers ``start .. end-1`` with the current pattern; ``indices`` are the selection carried
    in from before ``start`` (needed when the first indexer layer run is Shared). Returns (residual stream,
    carried selection)."""
    st = pattern_state(hf_model)
    layers = decoder_layers(hf_model)
    end = len(layers) if end is None else end
    for i in range(start, end):
        if st.arch == "glm_moe_dsa":  # native sharing: the layer takes and returns the indices
            hidden, indices = layers[i](hidden, prev_topk_indices=indices, **layer_kwargs)
            continue
        st.slot.indices = indices
        try:
            extra = {"prev_topk_indices": None} if st.arch == "glm5_next" else {}  # stand-ins share, not the config
            out = layers[i](hidden, **extra, **layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            indices = st.slot.indices
        finally:
            st.slot.indices = None
    return hidden, indices


def final_hidden(hf_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the text model does after its last layer: fold the hyper-connection streams (DeepSeek-V4,
    GLM-5.3), then the final norm."""
    tm = text_model(hf_model)
    hc = getattr(tm, "hc_head", None)
    return tm.norm(hc(hidden) if hc is not None else hidden)


@torch.no_grad()
def head_logits(hf_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the final residual stream (all positions), as the model's own forward computes them."""
    return hf_model.lm_head(final_hidden(hf_model, hidden))


def _head(hf_model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """What the model does after its last layer up to the logits, and the vocabulary size."""
    head = getattr(hf_model, "lm_head", None)
    if head is None:
        raise HFModelError(f"{type(hf_model).__name__} has no lm_head: load the ...ForCausalLM class")
    vocab = head.out_features if isinstance(head, nn.Linear) else text_config(hf_model).vocab_size
    return (lambda h: head(final_hidden(hf_model, h))), vocab


@torch.no_grad()
def head_nll(hf_model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
             budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[float, int]:
    """Summed next-token cross-entropy of final hidden states, and the number of predicted tokens.

    The final norm and ``lm_head`` run on chunks of positions, so [B, S, vocab] logits (10 GiB at 16K
    tokens with a 155K vocabulary) never exist at once.
    """
    head, vocab = _head(hf_model)
    return head_nll_chunked(head, hidden, ids, vocab, budget_bytes)


@torch.no_grad()
def head_nll_rows_hf(hf_model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                     budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[list[float], int]:
    """:func:`head_nll` per row of the batch, and the tokens predicted per row."""
    head, vocab = _head(hf_model)
    return head_nll_rows(head, hidden, ids, vocab, budget_bytes)


def describe_placement(hf_model: nn.Module) -> dict:
    """Where each decoder layer (and the embedding / head) lives: {name: device}."""
    def where(module: nn.Module) -> str:
        dev = device_of(module)  # "meta": offloaded by accelerate, loaded to the execution device per call
        return str(dev) if dev is not None else "meta"

    tm = text_model(hf_model)
    out = {"embed_tokens": where(tm.embed_tokens)}
    for i, layer in enumerate(decoder_layers(hf_model)):
        out[f"layers.{i}"] = where(layer)
    if getattr(hf_model, "lm_head", None) is not None:
        out["lm_head"] = where(hf_model.lm_head)
    return out


class TransformersRunner:
    """:class:`~indexcache.runner.LayerRunner` over a transformers DSA-family model. A pattern (one character
    per layer that owns an indexer) is applied when a run asks for another one; candidates may make Full
    only the positions that hold a trained indexer."""

    def __init__(self, hf_model: nn.Module, head_budget_bytes: int = DEFAULT_BUDGET_BYTES):
        model_arch(hf_model)
        self.model = hf_model
        self.config = text_config(hf_model)
        self.num_layers = len(decoder_layers(hf_model))
        self.slots = slot_layers(hf_model)
        self.indexer_layers = indexer_layers(hf_model)
        self.head_budget_bytes = head_budget_bytes
        self._applied: Pattern | None = None
        self._kwargs: list[dict] = []  # the first batch's layer arguments: later batches share equal ones

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def validate(self, pattern: Pattern) -> Pattern:
        if len(pattern) != len(self.slots):
            from ...errors import PatternError

            raise PatternError(f"wrong length: pattern has {len(pattern)} characters but the model has "
                               f"{len(self.slots)} layers with an indexer")
        return check_trained(self.slots, pattern, self.indexer_layers)

    def start(self, ids: torch.Tensor) -> LayerState:
        h, kw = capture_layer_inputs(self.model, ids.to(self.device))
        kw = share_equal(kw, self._kwargs)
        if not self._kwargs:
            self._kwargs.append(kw)
        return LayerState(h, None, kw)

    @torch.no_grad()
    def run(self, state: LayerState, pattern: Pattern, start: int, end: int,
            selections: bool = False) -> tuple[LayerState, dict[int, torch.Tensor]]:
        if self._applied is None or self._applied != pattern:
            # keep every trained indexer: later candidates need them
            apply_pattern(self.model, pattern, drop_shared_indexers=False)
            self._applied = pattern
        h, carry, chosen = state.hidden, state.carry, {}
        owned = set(self.slots)
        for i in range(start, end):
            h, carry = forward_layers(self.model, h, state.extra, i, i + 1, carry)
            if selections and i in owned:
                chosen[i] = carry.long()
        return LayerState(h, carry, state.extra), chosen

    def nll(self, state: LayerState, ids: torch.Tensor) -> tuple[float, int]:
        return head_nll(self.model, state.hidden, ids, self.head_budget_bytes)

    def nll_rows(self, state: LayerState, ids: torch.Tensor) -> tuple[list[float], int]:
        return head_nll_rows_hf(self.model, state.hidden, ids, self.head_budget_bytes)

    def logits(self, state: LayerState) -> torch.Tensor:
        return head_logits(self.model, state.hidden)


def share_equal(kwargs: dict, earlier: list[dict]) -> dict:
    """Batches of one shape get equal masks and RoPE tables: keep one copy (a 16K mask is 256 MiB)."""
    if not earlier:
        return kwargs
    first = earlier[0]
    out = {}
    for key, value in kwargs.items():
        prev = first.get(key)
        out[key] = prev if _equal(value, prev) else value
    return out


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return False


@dataclass
class HFSearchModel:
    """What ``run_search`` needs from a transformers model: its config, starting pattern and runner."""

    hf: nn.Module
    config: ModelInfo
    pattern: Pattern  # the start: Full exactly on the layers with trained indexers (the checkpoint's own)
    offload: tempfile.TemporaryDirectory | None = None  # disk-offloaded weights, removed with this object

    def runner(self) -> TransformersRunner:
        return TransformersRunner(self.hf)

    def local_parameters(self) -> int:
        """Parameter elements held by this process: the whole model, or this rank's tensor-parallel shards."""
        return sum(getattr(t, "_local_tensor", t).numel() for t in self.hf.parameters())

    def placement(self) -> dict:
        """Where the weights are: the device of the embedding, of each decoder layer and of the head, and
        transformers' ``hf_device_map`` when the model was spread with a device_map."""
        dm = getattr(self.hf, "hf_device_map", None)
        return {"modules": describe_placement(self.hf),
                "device_map": {k: str(v) for k, v in dm.items()} if dm else None}


def parse_device_map(text: str | None) -> str | dict | None:
    """``--device-map``: ``auto``/``balanced``/``sequential``, a device (``cuda:1``), a JSON object
    ``{"model.layers.0": 0, ...}``, or a ``.json`` file holding one."""
    if text is None:
        return None
    t = text.strip()
    if t.startswith("{"):
        try:
            dm = json.loads(t)
        except json.JSONDecodeError as e:
            raise SearchError(f"--device-map looks like JSON but does not parse: {e}") from None
    elif t.endswith(".json"):
        try:
            dm = json.loads(Path(t).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SearchError(f"--device-map file {t}: {e}") from None
    else:
        return t
    if not isinstance(dm, dict) or not dm:
        raise SearchError("--device-map JSON must be a non-empty object of module name -> device")
    return dm


def load_hf_for_search(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                       device_map: str | None = None, scoring: str = "exact", world: int = 1,
                       tp: int = 1) -> HFSearchModel:
    """Load ``path`` with its transformers class for the search, with chunked indexer scoring.

    The start pattern is the checkpoint's own (all Full, or a GLM-5.2-style checkpoint's Full layers):
    only layers with trained indexer weights are ever candidates, as with the native backend.
    """
    dm = parse_device_map(device_map)
    if dm is not None and world > 1:
        raise SearchError("--device-map under torchrun: every rank would spread the model over the same "
                          "devices; use one process with --device-map, or torchrun with --device cuda")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SearchError("--backend hf needs transformers (pip install transformers)") from None
    cfg = model_info(path)
    kwargs, offload = {}, None
    if isinstance(dm, dict) and "disk" in {str(v) for v in dm.values()}:
        # transformers re-saves disk-offloaded weights it fuses (the MoE experts); the folder lives as long
        # as the model does
        offload = tempfile.TemporaryDirectory(prefix="indexcache-offload-")
        kwargs["offload_folder"] = offload.name
    if tp > 1 and dm is not None:
        raise SearchError("--tp and --device-map are two ways of splitting the model: give one")
    hf = load_pretrained(path, dtype=dtype, device=device, device_map=dm, scoring=scoring, tp=tp, **kwargs)
    return HFSearchModel(hf=hf, config=cfg, pattern=current_pattern(hf), offload=offload)
