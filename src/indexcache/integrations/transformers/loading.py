"""Loading a local DSA checkpoint into its transformers class with a pattern applied."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, HFModelError, PatternError
from ...ops.common import DEFAULT_BUDGET_BYTES
from ...pattern import Pattern
from .patterns import apply_pattern, drop_indexers
from .scoring import patch_indexer_scoring


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
    from ...architectures import model_info
    from ...checkpoint import TensorSource

    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFModelError(f"{path} is not a local model directory with a config.json")
    info = model_info(path)
    src = TensorSource(path)
    try:
        shipped = info.shipped_slots(src.names())
    finally:
        src.close()
    p = info.pattern if pattern is None else info.parse_pattern(pattern)
    try:
        p.validate(indexer_layers=shipped)
    except PatternError as e:
        raise CheckpointError(str(e)) from None
    cls = getattr(transformers, info.architecture, None)
    if cls is None:
        raise HFModelError(f"this transformers ({transformers.__version__}) has no {info.architecture}")
    if info.arch == "glm_moe_dsa":
        kwargs.setdefault("indexer_types", p.indexer_types)  # build indexers only where they will run
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = cls.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    if device_map is None:
        model.to(device)
    # transformers fills indexers the checkpoint does not ship with random weights: they must never run
    drop_indexers(model, [pos for pos in range(info.num_slots) if pos not in shipped])
    apply_pattern(model, p, drop_shared_indexers=True)
    if scoring is not None:
        patch_indexer_scoring(model, budget_bytes, scoring)
    return model
