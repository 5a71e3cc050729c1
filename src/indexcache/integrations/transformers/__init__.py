"""IndexCache inside transformers' own DSA models (``GlmMoeDsaForCausalLM``, ``DeepseekV32ForCausalLM``),
without editing transformers.

- ``patterns.py``: :func:`apply_pattern` / :func:`remove_pattern` make a loaded model run a Full/Shared pattern.
- ``scoring.py``: :func:`patch_indexer_scoring` replaces the dense [B, S, H, T] indexer scoring by the
  package's own chunked indexer op.
- ``loading.py``: :func:`load_pretrained` loads a checkpoint with its pattern and the patched scoring.
- ``runner.py``: :class:`TransformersRunner`, the layer runner the search, loss and overlap use.
"""

from ...errors import HFModelError
from .loading import load_pretrained
from .patterns import (
    SUPPORTED_CLASSES,
    SharedIndexer,
    apply_pattern,
    current_pattern,
    decoder_layers,
    indexer_layers,
    model_arch,
    remove_pattern,
)
from .runner import (
    HFSearchModel,
    TransformersRunner,
    capture_layer_inputs,
    describe_placement,
    forward_layers,
    head_nll,
    load_hf_for_search,
    parse_device_map,
)
from .scoring import dense_indexer_bytes, masked_indexer_topk, patch_indexer_scoring, unpatch_indexer_scoring

__all__ = [
    "SUPPORTED_CLASSES",
    "HFModelError",
    "HFSearchModel",
    "SharedIndexer",
    "TransformersRunner",
    "apply_pattern",
    "capture_layer_inputs",
    "current_pattern",
    "decoder_layers",
    "dense_indexer_bytes",
    "describe_placement",
    "forward_layers",
    "head_nll",
    "indexer_layers",
    "load_hf_for_search",
    "load_pretrained",
    "masked_indexer_topk",
    "model_arch",
    "parse_device_map",
    "patch_indexer_scoring",
    "remove_pattern",
    "unpatch_indexer_scoring",
]
