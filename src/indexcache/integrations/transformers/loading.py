"""Loading a local DSA checkpoint into its transformers class with a pattern applied."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, HFModelError, PatternError
from ...ops.common import DEFAULT_BUDGET_BYTES
from ...pattern import Pattern
from .fp8 import dequantize_fp8_modules, fp8_layers_on_any_device, is_fp8_checkpoint, provide_fp8_matmul
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
    tp: int = 1,
    keep_fp8: bool | None = None,
    **kwargs,
) -> nn.Module:
    """``from_pretrained`` a local DSA checkpoint with a pattern (default: the checkpoint's own) applied.

    Like :func:`indexcache.load_model`, it reads which layers ship indexer weights: a Full layer without
    them is an error, never an untrained indexer (transformers' DeepSeek-V3.2 builds an indexer on every
    layer and would initialise the missing ones at random; they are dropped here). ``scoring`` patches
    the indexers' scoring (:func:`patch_indexer_scoring`); ``None`` keeps transformers' dense scoring.
    ``device_map`` (``"auto"``, or {module name: device}) spreads the model over several devices and
    needs ``accelerate``; without it the model is loaded and moved to ``device``. ``tp`` > 1 (under
    ``torchrun``) shards it with transformers' own tensor-parallel plan over groups of ``tp`` ranks; the
    ranks beyond one group hold replicas (for splitting the search's candidates). A block-FP8 checkpoint
    loads into transformers' own FP8 layers (its fine-grained FP8 support); ``keep_fp8`` (default: on
    CUDA) keeps them FP8, so the model takes its FP8 size, with this package's block-FP8 GEMM behind them
    where transformers cannot fetch its own kernels (:mod:`.fp8`); otherwise they are dequantised to
    ``dtype`` with the checkpoint's blocks. Other keyword arguments go to ``from_pretrained``.
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
        names = src.names()
        shipped = info.shipped_slots(names)
    finally:
        src.close()
    width = info.raw.get("moe_intermediate_size")
    if width and width % 128 and any(".mlp.experts." in n and n.endswith("_scale_inv") for n in names):
        raise HFModelError(f"{path}: block-FP8 experts of width {width}: transformers fuses their gate and up "
                           "scales only for widths that are multiples of 128 (it would reinitialise them); "
                           "load it with the native backend, or write the experts wide")
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
    if tp > 1:  # transformers' own tensor parallel plan, on the process group torchrun set up
        world = int(os.environ.get("WORLD_SIZE", "1"))
        kwargs["distributed_config"] = transformers.DistributedConfig(
            tp_size=tp, **({"dp_replicate_size": world // tp} if world > tp else {}))
    fp8 = is_fp8_checkpoint(info.raw)
    if keep_fp8 is None:
        keep_fp8 = torch.device(device).type == "cuda" or device_map is not None or tp > 1
    if fp8:
        provide_fp8_matmul(force=not keep_fp8)  # dequantised experts still go through the grouped slot
        with fp8_layers_on_any_device():
            model = cls.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
        if not keep_fp8:
            dequantize_fp8_modules(model, dtype)
    else:
        model = cls.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    if device_map is None and tp == 1:  # a tensor-parallel model is already placed, one shard per rank
        model.to(device)
    if tp > 1 and int(os.environ.get("WORLD_SIZE", "1")) > tp:
        # transformers keeps the replicas with FSDP2 wrappers (one shard per replica: the weights stay whole);
        # FSDP2 sets its modules up at the root's first forward, and the layer runner calls the decoder layers
        # one by one, so one token through the whole model first
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)
    # transformers fills indexers the checkpoint does not ship with random weights: they must never run
    drop_indexers(model, [pos for pos in range(info.num_slots) if pos not in shipped])
    apply_pattern(model, p, drop_shared_indexers=True)
    if scoring is not None:
        patch_indexer_scoring(model, budget_bytes, scoring)
    return model
