"""Checkpoint IO in transformers' on-disk format (safetensors, single file or sharded).

Loading is lazy (one tensor in memory at a time, copied straight into a model built without
initialisation), dequantises block-FP8 weights (``weight`` + ``weight_scale_inv``), skips MTP layers
with a notice, and names every missing, unexpected, misshapen or unreadable tensor in its error.
Saving writes per-expert tensors and the pattern into ``config.json``, optionally dropping the indexer
weights of Shared layers (a GLM-5.2-style checkpoint).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DSAConfig, read_config
from .errors import CheckpointError
from .model.dsa import DSAForCausalLM, checkpoint_tensors
from .ops.fp8 import block_dequant, block_quant, kept_wide
from .outputs import check_output_dir, new_temp_dir, publish_dir
from .pattern import Pattern, PatternError, format_ranges

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
INDEXER_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.indexer\.")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")
DEFAULT_SHARD_BYTES = 4 << 30




def _notice(msg: str) -> None:
    print(f"indexcache: {msg}", file=sys.stderr)


def _list_names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------- reading
class TensorSource:
    """Name -> file map over a checkpoint directory, reading tensors lazily."""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root} is not a model directory")
        index = self.root / INDEX_FILE
        single = self.root / SINGLE_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
            self.files = {name: self.root / f for name, f in weight_map.items()}
            missing = sorted({str(f.name) for f in self.files.values() if not f.exists()})
            if missing:
                raise CheckpointError(f"{INDEX_FILE} names shard files that are missing: {_list_names(missing)}")
        elif single.exists():
            self.files = {name: single for name in self._keys(single)}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.root}")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _keys(f: Path) -> list[str]:
        try:
            with safe_open(str(f), framework="pt") as h:
                return list(h.keys())
        except Exception as e:  # safetensors raises several types for bad headers
            raise CheckpointError(f"corrupt checkpoint file {f.name}: {e}") from None

    def _handle(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:
                raise CheckpointError(f"corrupt checkpoint file {f.name}: {e}") from None
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        try:
            return self._handle(f).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"corrupt tensor {name} in {f.name}: {e}") from None

    def shape(self, name: str) -> list[int]:
        f = self.files[name]
        try:
            return list(self._handle(f).get_slice(name).get_shape())
        except Exception as e:
            raise CheckpointError(f"corrupt tensor {name} in {f.name}: {e}") from None

    def close(self) -> None:
        self._handles.clear()


class LayerSubset:
    """A checkpoint seen as if it held only the decoder layers ``keep`` (renumbered 0, 1, ...), with the
    embeddings, final norm and head: what ``indexcache plan --probe`` loads to time real layers."""

    def __init__(self, src: TensorSource, keep: list[int]):
        self.src = src
        new_index = {old: j for j, old in enumerate(keep)}
        self.map: dict[str, str] = {}
        for name in src.names():
            m = LAYER_RE.match(name)
            if m is None:
                self.map[name] = name
            elif int(m.group(1)) in new_index:
                self.map[f"model.layers.{new_index[int(m.group(1))]}.{name[m.end():]}"] = name
        self.files = {n: src.files[old] for n, old in self.map.items()}

    def names(self) -> list[str]:
        return list(self.map)

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self.map[name])

    def shape(self, name: str) -> list[int]:
        return self.src.shape(self.map[name])

    def close(self) -> None:
        self.src.close()


def load_layers(path: str | Path, keep: list[int], config: dict, dtype: torch.dtype = torch.bfloat16,
                device: str | torch.device = "cuda", keep_fp8: bool | None = None) -> DSAForCausalLM:
    """Decoder layers ``keep`` of a checkpoint (their trained weights) as a model of ``len(keep)`` layers
    whose config is ``config`` (the checkpoint's, with per-layer lists cut to ``keep``)."""
    path = Path(path)
    cfg = DSAConfig.from_dict(config)
    keep_fp8, scale_fmt = _fp8_options(path, device, keep_fp8)
    src = LayerSubset(TensorSource(path), keep)
    try:
        return _load(src, cfg, path, None, dtype, device, "exact", False, keep_fp8, scale_fmt)
    finally:
        src.close()


def checkpoint_indexer_layers(names: list[str], num_layers: int) -> list[int]:
    """Layers (below ``num_layers``) for which the checkpoint ships indexer weights."""
    found = {int(m.group(1)) for n in names if (m := INDEXER_RE.match(n))}
    return sorted(i for i in found if i < num_layers)


def load_model(
    path: str | Path,
    pattern: Pattern | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    scoring: str = "exact",
    verbose: bool = True,
    keep_fp8: bool | None = None,
) -> DSAForCausalLM:
    """Load a transformers-format DSA checkpoint.

    ``pattern``: None uses the checkpoint's own (``indexer_types`` etc.), or a :class:`Pattern` / ``"FSSF..."``
    string. Shared layers get no indexer module; their checkpoint indexer weights are skipped.
    ``keep_fp8``: block-FP8 weights stay FP8 in memory (:class:`~indexcache.model.dsa.FP8Linear`), so the
    model takes its FP8 size; ``False`` dequantises them to ``dtype``; ``None`` keeps them on CUDA.
    """
    path = Path(path)
    cfg = DSAConfig.from_file(path)
    keep_fp8, scale_fmt = _fp8_options(path, device, keep_fp8)
    src = TensorSource(path)
    try:
        return _load(src, cfg, path, pattern, dtype, device, scoring, verbose, keep_fp8, scale_fmt)
    finally:
        src.close()


def _fp8_options(path: Path, device: str | torch.device, keep_fp8: bool | None) -> tuple[bool, str | None]:
    """Whether FP8 weights stay FP8 (default: on CUDA), and the activation scale format the checkpoint asks
    for (DeepSeek-V3.2: ``ue8m0``)."""
    if keep_fp8 is None:
        keep_fp8 = torch.device(device).type == "cuda"
    scale_fmt = (read_config(path).get("quantization_config") or {}).get("scale_fmt") if keep_fp8 else None
    return keep_fp8, scale_fmt


def _load(src: TensorSource, cfg: DSAConfig, path: Path, pattern, dtype, device, scoring, verbose,
          keep_fp8: bool = False, scale_fmt: str | None = None) -> DSAForCausalLM:
    names = src.names()
    n = cfg.num_hidden_layers
    indexer_layers = checkpoint_indexer_layers(names, n)
    if pattern is None:
        pat = cfg.pattern
    else:
        pat = Pattern.parse(pattern).validate(num_layers=n)
    try:
        pat.validate(indexer_layers=indexer_layers)
    except PatternError as e:
        raise CheckpointError(str(e)) from None

    with torch.device("meta"):
        model = DSAForCausalLM(cfg, pat)
        if keep_fp8:  # FP8 weights (those that ship their block scales) stay FP8
            have = set(names)
            model.keep_fp8({n for n in names if n.endswith(".weight") and f"{n}_scale_inv" in have}, scale_fmt)
    model.to_empty(device=device)
    model.tie_weights()
    model.to_dtype(dtype)
    model.set_scoring(scoring)
    # checkpoint name -> the tensor (or the expert's slice of a stacked tensor) it is copied into
    params = dict(checkpoint_tensors([*model.named_parameters(remove_duplicate=False), *model.named_buffers()]))
    tied = cfg.tie_word_embeddings

    loaded: set[str] = set()
    unexpected: list[str] = []
    mtp: set[int] = set()
    dropped: set[int] = set()
    block = cfg.fp8_block_size or (128, 128)
    for name in names:
        if name.endswith("_scale_inv") or _IGNORED.search(name):
            continue
        m = LAYER_RE.match(name)
        if m and int(m.group(1)) >= n:
            mtp.add(int(m.group(1)))
            continue
        if name not in params:
            mi = INDEXER_RE.match(name)
            if mi and not pat.is_full(int(mi.group(1))):
                dropped.add(int(mi.group(1)))
                continue
            unexpected.append(name)
            continue
        target = params[name]
        shape = src.shape(name)
        if list(target.shape) != shape:
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint has {shape}, config implies {list(target.shape)}"
            )
        t = src.get(name)
        scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith("weight") else None
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale_name is None or scale_name not in src.files:
                raise CheckpointError(f"corrupt tensor {name}: FP8 weight without its {scale_name or 'scale'}")
            scale = src.get(scale_name)
            if target.dtype == torch.float8_e4m3fn:  # kept FP8: the weight as it is, and its block scales
                held = params[scale_name]
                if list(held.shape) != list(scale.shape):
                    raise CheckpointError(f"corrupt tensor {scale_name}: shape {list(scale.shape)}, the weight's "
                                          f"128 x 128 blocks need {list(held.shape)}")
                if not torch.isfinite(scale).all():
                    raise CheckpointError(f"corrupt tensor {scale_name}: contains NaN or Inf")
                with torch.no_grad():
                    target.copy_(t.to(torch.float8_e4m3fn))
                    held.copy_(scale.float())
                loaded.update((name, scale_name))
                continue
            try:
                t = block_dequant(t, scale, block)
            except ValueError as e:
                raise CheckpointError(f"corrupt tensor {name}: {e}") from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"corrupt tensor {name} in {src.files[name].name}: contains NaN or Inf")
        with torch.no_grad():
            target.copy_(t.to(target.dtype))
        loaded.add(name)

    if unexpected:
        raise CheckpointError(f"unexpected tensors in checkpoint: {_list_names(sorted(unexpected))}")
    missing = [k for k in params if k not in loaded and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"missing tensors in checkpoint: {_list_names(missing)}")
    if verbose and mtp:
        _notice(f"ignoring MTP layer(s) {format_ranges(sorted(mtp))} (index >= num_hidden_layers={n})")
    if verbose and dropped:
        _notice(f"pattern makes layers {format_ranges(sorted(dropped))} Shared: their indexer weights were not loaded")

    model.source_dir = path
    model.eval()
    return model


# ----------------------------------------------------------------------------------------- writing
_FP8_WEIGHT = re.compile(r"^model\.layers\.\d+\..*\.weight$")


def fp8_eligible(name: str, t: torch.Tensor) -> bool:
    """A decoder layer's projection or expert weight, which DeepSeek's FP8 checkpoints store block-FP8."""
    return t.dim() == 2 and bool(_FP8_WEIGHT.match(name)) and not kept_wide(name)


_EXPERT_RE = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.\d+\.")


def wide_experts(cfg) -> bool:
    """Whether block-FP8 checkpoints keep the routed experts wide: transformers fuses each expert's gate and
    up projections with their block scales, which lines up only when the expert width is a multiple of 128
    (otherwise it reinitialises the fused scales); such experts are written in the model's dtype and listed
    in ``quantization_config.modules_to_not_convert``."""
    return cfg.moe_intermediate_size % 128 != 0 or cfg.hidden_size % 128 != 0


def _state_for_saving(
    model: DSAForCausalLM, pattern: Pattern, drop_shared_indexers: bool, dtype: torch.dtype | None,
    fp8: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    tied = model.config.tie_word_embeddings
    fp8_experts = not wide_experts(model.config)
    for name, t in checkpoint_tensors(model.state_dict().items()):
        if tied and name == "lm_head.weight":
            continue
        mi = INDEXER_RE.match(name)
        if mi and drop_shared_indexers and not pattern.is_full(int(mi.group(1))):
            continue
        if t.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):  # already FP8, with its scales
            yield name, t.detach().contiguous().cpu()
            continue
        if fp8 and fp8_eligible(name, t) and (fp8_experts or not _EXPERT_RE.match(name)):
            q, scale = block_quant(t.detach())
            yield name, q.cpu()
            yield f"{name}_scale_inv", scale.cpu()
            continue
        keep_fp32 = name.endswith("e_score_correction_bias") or name.endswith("weights_proj.weight")
        if dtype is not None and t.is_floating_point() and not keep_fp32:
            t = t.to(dtype)
        yield name, t.detach().contiguous().cpu()


def save_model(
    model: DSAForCausalLM,
    out_dir: str | Path,
    pattern: Pattern | str | None = None,
    drop_shared_indexers: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    copy_tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    command: str = "",
    fp8: bool = False,
) -> Path:
    """Write ``model`` as a transformers checkpoint with ``pattern`` (default: the model's) in config.json.
    ``fp8``: the decoder layers' projections and experts in block-FP8 (e4m3, one fp32 scale per 128 x 128
    block, DeepSeek's layout and ``quantization_config``), the rest in ``dtype``.

    The directory is written in a temporary sibling and renamed into place, so a failure never leaves a
    half-written checkpoint behind. ``extra(tmp_dir)`` may add files (a tokenizer, engine flags) before
    that. An existing ``out_dir`` is replaced only when this toolkit wrote it and ``overwrite`` is set; a
    directory holding anything else is never touched (:mod:`indexcache.outputs`).
    """
    out_dir = Path(out_dir)
    cfg = model.config
    pat = model.pattern if pattern is None else Pattern.parse(pattern)
    pat.validate(num_layers=cfg.num_hidden_layers, indexer_layers=model.indexer_layers)
    check_output_dir(out_dir, "output directory", overwrite=overwrite)
    if cfg.arch == "deepseek_v32" and (drop_shared_indexers or len(model.indexer_layers) < cfg.num_hidden_layers):
        _notice("transformers' DeepseekV32ForCausalLM builds an indexer on every layer and has no sharing: "
                "layers saved without indexer weights would be randomly initialised there")

    tmp = new_temp_dir(out_dir)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        total = 0
        has_fp8 = fp8 or any(t.dtype == torch.float8_e4m3fn for t in model.parameters())
        wide_modules: set[str] = set()
        for name, t in _state_for_saving(model, pat, drop_shared_indexers, dtype, fp8):
            m = _EXPERT_RE.match(name)
            if m and has_fp8 and t.is_floating_point() and t.dtype != torch.float8_e4m3fn \
                    and not name.endswith("_scale_inv"):
                wide_modules.add(m.group(1))
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
            total += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            (tmp / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        conf = cfg.to_dict(pat)
        conf["dtype"] = str(dtype if dtype is not None else model.dtype).removeprefix("torch.")
        if has_fp8:
            conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [128, 128]}
            # the head stays wide (transformers would make a tied one an FP8 layer without scales)
            conf["quantization_config"]["modules_to_not_convert"] = ["lm_head", *sorted(wide_modules)]
        _finish(tmp, conf, copy_tokenizer_from or getattr(model, "source_dir", None), extra)
        publish_dir(tmp, out_dir, overwrite=overwrite, command=command)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    info,
    pattern: Pattern,
    drop_shared_indexers: bool = False,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
    command: str = "",
) -> Path:
    """A copy of a checkpoint (any architecture of :mod:`indexcache.architectures`) whose ``config.json``
    carries ``pattern``: the files are copied as they are, or rewritten shard by shard when the Shared
    layers' indexer tensors are dropped or the dtype changes. Written beside ``out_dir`` and moved into
    place when complete (:mod:`indexcache.outputs`)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    src = TensorSource(src_dir)
    try:
        shipped = info.shipped_slots(src.names())
        pattern.validate(indexer_layers=shipped)
    except PatternError as e:
        src.close()
        raise CheckpointError(str(e)) from None
    check_output_dir(out_dir, "output directory", overwrite=overwrite)
    shared_layers = {info.slots[p] for p in pattern.shared_layers}

    def dropped(name: str) -> bool:
        m = info.spec.indexer_tensor.match(name)
        return drop_shared_indexers and m is not None and int(m.group(1)) in shared_layers

    tmp = new_temp_dir(out_dir)
    try:
        by_file: dict[Path, list[str]] = {}
        for name, f in src.files.items():
            by_file.setdefault(f, []).append(name)
        weight_map: dict[str, str] = {}
        for f, names in by_file.items():
            keep = [n for n in names if not dropped(n)]
            if len(keep) == len(names) and dtype is None:
                shutil.copyfile(f, tmp / f.name)
            elif keep:
                tensors = {}
                for n in keep:
                    t = src.get(n)
                    tensors[n] = t.to(dtype) if dtype is not None and t.is_floating_point() and not n.endswith(
                        "_scale_inv") else t
                save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
            weight_map.update({n: f.name for n in keep})
        if (src_dir / INDEX_FILE).exists():
            total = sum((tmp / name).stat().st_size for name in set(weight_map.values()))
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        conf = _merge(copy.deepcopy(info.raw), info.config_patch(pattern))
        if dtype is not None:
            conf["dtype"] = str(dtype).removeprefix("torch.")
        _finish(tmp, conf, src_dir, extra)
        publish_dir(tmp, out_dir, overwrite=overwrite, command=command)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        src.close()
    return out_dir


def _finish(tmp: Path, conf: dict, tokenizer_dir: str | Path | None, extra: Callable[[Path], None] | None) -> None:
    """What every exported directory gets besides its weights: config.json, the tokenizer files, extras."""
    (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
    if extra is not None:
        extra(tmp)


def _merge(base: dict, patch: dict) -> dict:
    """``patch`` written into ``base``, nested objects merged key by key."""
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base
