"""The greedy search over a transformers model: ``indexcache search MODEL --backend hf``.

:class:`HFLossEvaluator` has :class:`~indexcache.search.evaluator.LossEvaluator`'s interface and prefix
cache; only the model it runs differs. Each pattern is applied to the transformers model
(:func:`indexcache.hf.apply_pattern`, keeping every trained indexer so any candidate can be built), the
decoder layers run one by one from the longest cached prefix with the arguments the model's own forward
builds, and the loss is the same mean next-token cross-entropy. The model can be spread over several
devices with ``device_map`` (transformers moves the hidden states between layers), so a model that does
not fit one device can be searched.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import DSAConfig
from ..hf import (
    apply_pattern,
    capture_layer_inputs,
    current_pattern,
    decoder_layers,
    describe_placement,
    forward_layers,
    head_nll,
    indexer_layers,
    load_pretrained,
    model_arch,
)
from ..ops.common import DEFAULT_BUDGET_BYTES
from ..pattern import Pattern
from .evaluator import LossEvaluator, State
from .greedy import SearchError


class HFLossEvaluator(LossEvaluator):
    """Mean LM loss of a pattern on fixed calibration batches, run by a transformers DSA model.

    Shares :class:`LossEvaluator`'s prefix cache (``_store``/``_lookup``/``prune``) and counters: the
    state entering layer ``j`` is cached under ``pattern[:j]``. Candidate patterns may only make Full the
    layers for which the model holds a trained indexer.
    """

    def __init__(self, hf_model: nn.Module, batches: list[torch.Tensor], cache_bytes: int = 2 << 30,
                 reuse: bool = True, head_budget_bytes: int = DEFAULT_BUDGET_BYTES):
        # LossEvaluator.__init__ builds a context for this package's own model; only its cache is shared
        model_arch(hf_model)
        self.model = hf_model
        self.head_budget_bytes = head_budget_bytes
        self._init_cache(len(decoder_layers(hf_model)), batches, hf_model.get_input_embeddings().weight.device,
                         cache_bytes, reuse)
        self.indexer_layers = indexer_layers(hf_model)
        embedded, self._layer_kwargs = [], []
        for ids in self.batches:
            h, kw = capture_layer_inputs(hf_model, ids)
            embedded.append((h, None))
            self._layer_kwargs.append(_share_equal(kw, self._layer_kwargs))
        self._embedded = embedded

    def _select(self, pat: str) -> None:
        # validates the pattern against the model's indexers; keep them all, later candidates need them
        apply_pattern(self.model, pat, drop_shared_indexers=False)

    def _run_layer(self, i: int, state: State) -> State:
        return [forward_layers(self.model, h, kw, i, i + 1, carry)
                for (h, carry), kw in zip(state, self._layer_kwargs, strict=True)]

    def _nll(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        return head_nll(self.model, h, ids, self.head_budget_bytes)


def _share_equal(kwargs: dict, earlier: list[dict]) -> dict:
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
    """What ``run_search`` needs from a transformers model: its config, starting pattern and evaluator."""

    hf: nn.Module
    config: DSAConfig
    pattern: Pattern  # the start: Full exactly on the layers with trained indexers (the checkpoint's own)
    offload: tempfile.TemporaryDirectory | None = None  # disk-offloaded weights, removed with this object

    def evaluator(self, batches: list[torch.Tensor], cache_bytes: int = 2 << 30, reuse: bool = True
                  ) -> HFLossEvaluator:
        return HFLossEvaluator(self.hf, batches, cache_bytes=cache_bytes, reuse=reuse)

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
                       device_map: str | None = None, scoring: str = "exact", world: int = 1) -> HFSearchModel:
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
    cfg = DSAConfig.from_file(path)
    kwargs, offload = {}, None
    if isinstance(dm, dict) and "disk" in {str(v) for v in dm.values()}:
        # transformers re-saves disk-offloaded weights it fuses (the MoE experts); the folder lives as long
        # as the model does
        offload = tempfile.TemporaryDirectory(prefix="indexcache-offload-")
        kwargs["offload_folder"] = offload.name
    hf = load_pretrained(path, dtype=dtype, device=device, device_map=dm, scoring=scoring, **kwargs)
    return HFSearchModel(hf=hf, config=cfg, pattern=current_pattern(hf), offload=offload)
