"""``indexcache plan``: what a greedy search of a model will cost before it runs.

From a model directory (or only its ``config.json``), a calibration size and a GPU count it gives the
memory per GPU of each way of splitting the model (one GPU, transformers' tensor parallel over T ranks with
the candidates split over the replicas, accelerate's ``device_map``), the layer-forwards of the search (the
same count the search's progress bar makes, :func:`~indexcache.search.estimate_layer_forwards`) and its
wall time. Seconds per layer-forward come from a short probe on this machine's GPU (``--probe``: one or two
random decoder layers of each kind, at the calibration length, through the runner the search would use) or,
without one, from the committed table of measured searches scaled by the work of a layer-forward.

The parameter counts are exact: transformers' own class is built on the meta device. Attention and indexer
FLOPs are counted from the config; they only rescale a measured time, they do not predict one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .architectures import ModelInfo, model_info
from .errors import ConfigError
from .ops.fp8 import kept_wide
from .pattern import Pattern
from .search.greedy import layer_forward_counts, stage_starts

TABLE = Path(__file__).with_name("bundled") / "layer_forward_table.json"
GIB = 1 << 30


# ------------------------------------------------------------------------------------------ the model's size
@dataclass
class LayerSize:
    kind: str  # layer type and MLP kind: decoder layers of one kind cost the same
    params: int  # all parameters of the decoder layer
    active: int  # parameters one token touches (routed experts scaled by top-k / experts)
    fp8_params: int  # parameters an FP8 checkpoint stores in FP8 (the big projections)
    indexer_params: int


@dataclass
class ModelSize:
    layers: list[LayerSize]
    other_params: int  # embeddings, final norm, head (and any vision tower)
    head_params: int
    fp8: bool  # the checkpoint stores its projections block-FP8
    hidden: int
    heads: int  # attention heads, and the query-key and value widths of one head
    qk_dim: int
    v_dim: int
    index_heads: int  # indexer heads and their width
    index_dim: int

    @property
    def params(self) -> int:
        return sum(x.params for x in self.layers) + self.other_params

    def weight_bytes(self, fp8: bool | None = None) -> int:
        """Bytes of the weights: FP8 projections at one byte plus a float32 scale per 128 x 128 block, the
        rest bf16 (``fp8=False``: everything bf16, as a dequantising loader holds it)."""
        fp8 = self.fp8 if fp8 is None else fp8
        q = sum(x.fp8_params for x in self.layers) if fp8 else 0
        return 2 * (self.params - q) + q + 4 * math.ceil(q / (128 * 128))


def model_size(info: ModelInfo) -> ModelSize:
    """Exact parameter counts per decoder layer, from transformers' own class built on the meta device."""
    import transformers

    from .integrations.transformers.patterns import decoder_layers

    cfg = info.transformers_config(text=False)
    cls = getattr(transformers, info.architecture)
    with torch.device("meta"):
        model = cls._from_config(cfg)
    tc = info.transformers_config()
    top_k = int(getattr(tc, "num_experts_per_tok", 0) or 0)
    q = info.raw.get("quantization_config") or {}
    fp8 = str(q.get("quant_method", "")).lower() == "fp8"
    skip = tuple(q.get("modules_to_not_convert") or ())
    layers = []
    mlp_types = list(getattr(tc, "mlp_layer_types", None) or [])
    dense_first = int(getattr(tc, "first_k_dense_replace", 0) or 0)
    for i, layer in enumerate(decoder_layers(model)):
        params = active = fp8_params = idx = 0
        for name, p in layer.state_dict(keep_vars=True).items():  # parameters and persistent buffers
            n = p.numel()
            params += n
            routed = ".experts." in f".{name}" and "shared" not in name and p.dim() == 3
            active += n * top_k // p.shape[0] if routed and top_k else n
            if "indexer" in name:
                idx += n
            if p.dim() >= 2 and not kept_wide(name) and not any(s in f"model.layers.{i}.{name}" for s in skip):
                fp8_params += n
        ltype = info.layer_types[i] if i < len(info.layer_types) else "layer"
        moe = (mlp_types[i] if i < len(mlp_types) else ("dense" if i < dense_first else "moe"))
        layers.append(LayerSize(f"{ltype}/{moe}", params, active, fp8_params, idx))
    layer_ids = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    others = [p for p in model.parameters() if id(p) not in layer_ids]
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    heads = int(getattr(tc, "num_attention_heads", 1))
    qk = int(getattr(tc, "qk_nope_head_dim", 0) or 0) + int(getattr(tc, "qk_rope_head_dim", 0) or 0)
    qk = qk or int(getattr(tc, "head_dim", 0) or tc.hidden_size // heads)
    ih = int(getattr(tc, "index_n_heads", 0) or getattr(tc, "indexer_n_heads", 0) or 1)
    idim = int(getattr(tc, "index_head_dim", 0) or getattr(tc, "indexer_head_dim", 0) or qk)
    return ModelSize(layers, sum(p.numel() for p in others), head_params, fp8, int(tc.hidden_size), heads, qk,
                     int(getattr(tc, "v_head_dim", 0) or 0) or qk, ih, idim)


# ------------------------------------------------------------------------------------------ work of a forward
def layer_flops(info: ModelInfo, size: ModelSize, layer: int, tokens: int, full: bool) -> float:
    """FLOPs of decoder layer ``layer`` on one sequence of ``tokens``: the projections and experts a token
    touches, the indexer's scores over what precedes each query (Full layers), and attention over what a
    query keeps. Used only to rescale a measured time to another model or length."""
    flops = 2.0 * size.layers[layer].active * tokens
    keep = min(tokens / 2, info.index_topk * info.tokens_per_unit)
    flops += 2.0 * tokens * keep * size.heads * (size.qk_dim + size.v_dim)
    if full and layer in info.slots:
        scored = tokens / 2 / max(info.tokens_per_unit, info.pool)
        flops += 2.0 * tokens * scored * size.index_heads * size.index_dim
    return flops


# ------------------------------------------------------------------------------------------ the search's work
@dataclass
class SearchWork:
    layer_forwards: int  # greedy steps, with prefix reuse
    evaluations: int  # candidate patterns scored (each ends in the head and the loss, per batch)
    first_evaluation: int  # the all-Full loss: every layer, every batch
    flips: int
    candidates: int
    full_runs: list[float] = field(default_factory=list)  # per decoder layer: runs with its own selection
    shared_runs: list[float] = field(default_factory=list)  # and runs reusing an earlier layer's


def search_work(info: ModelInfo, num_samples: int, target_full: int, flips: int | None = None,
                start: Pattern | None = None, stages: int = 1, reuse_previous: bool = True, draws: int = 64,
                seed: int = 0, flip_order: Sequence[int] | None = None) -> SearchWork:
    """The greedy search's work, counted as the search's own bar counts it
    (:func:`~indexcache.search.layer_forward_counts`)."""
    n = info.num_slots
    start = start or info.pattern
    forced = sorted({0, *stage_starts(n, stages)})
    flips = start.num_full - target_full if flips is None else min(flips, start.num_full - target_full)
    full, shared = layer_forward_counts(start, flips, info.slots, info.num_layers, num_samples, forced,
                                        draws=draws, reuse_previous=reuse_previous, seed=seed, flip_order=flip_order)
    cands = sum(1 for i in range(n) if start.is_full(i) and i not in forced)
    evals = sum(max(cands - j, 0) for j in range(flips)) * num_samples
    return SearchWork(int(round(sum(full) + sum(shared))), evals, info.num_layers * num_samples, flips, cands,
                      [round(x, 3) for x in full], [round(x, 3) for x in shared])


# ------------------------------------------------------------------------------------------ seconds per forward
@dataclass
class Timing:
    source: str  # "probe on <GPU>" or "table: <entry>"
    full_s: dict[str, float]  # seconds per layer-forward by layer kind, indexer layers Full
    shared_s: dict[str, float]  # the same for indexer layers run Shared
    head_s: float  # the head and the loss, one batch
    working_bytes: int = 0  # memory one layer-forward needs beyond the weights (probe only)
    state_bytes: int = 0  # one cached prefix state (one batch at one layer, with the selection it carries)
    notes: list[str] = field(default_factory=list)


def _kinds_to_probe(info: ModelInfo, size: ModelSize) -> list[int]:
    """Decoder layers that stand for every kind: the first of each kind, and for indexer layers a second of
    the same kind so that it can run Shared."""
    seen: dict[str, int] = {}
    keep: list[int] = []
    for i, layer in enumerate(size.layers):
        want = 2 if i in info.slots else 1
        if seen.get(layer.kind, 0) < want:
            seen[layer.kind] = seen.get(layer.kind, 0) + 1
            keep.append(i)
    if info.slots[0] not in keep:
        keep = sorted({*keep, info.slots[0]})
    return keep


def _reduced_config(info: ModelInfo, keep: list[int]) -> dict:
    """The config dict of a model made of decoder layers ``keep`` only (per-layer lists sliced, counts of
    leading dense or hash-routed layers cut to what is kept)."""
    d = json.loads(json.dumps(info.raw))
    d.pop("quantization_config", None)
    d.pop("index_topk_pattern", None)
    body = d.get("text_config", d) if info.arch == "glm5_next" else d
    n = info.num_layers
    for key, val in list(body.items()):
        if isinstance(val, list) and len(val) == n:
            body[key] = [val[i] for i in keep]
    for key in ("first_k_dense_replace", "num_hash_layers"):
        if isinstance(body.get(key), int):
            body[key] = sum(1 for i in keep if i < body[key])
    body["num_hidden_layers"] = len(keep)
    body.pop("num_nextn_predict_layers", None)
    return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(info: ModelInfo, size: ModelSize, tokens: int, device: str = "cuda", backend: str = "auto",
          dtype: torch.dtype = torch.bfloat16, repeats: int = 2, weights: str | Path | None = None,
          ids: torch.Tensor | None = None) -> Timing:
    """Time each layer kind at ``tokens`` on a model made of one or two layers of every kind, run by the
    runner the search would use (this package's model with its kernels, or transformers' class). The
    layers carry the checkpoint's trained weights when ``weights`` (its directory) is given and the native
    model runs it, else random ones; ``ids`` [1, tokens] are the tokens (default: random). Both matter: the
    top-k's cost depends on how the index scores are spread."""
    from .runner import NativeRunner, native_ops, resolve_backend

    keep = _kinds_to_probe(info, size)
    cfg = _reduced_config(info, keep)
    dev = torch.device(device)
    chosen = resolve_backend(backend, info.spec.native, info.architecture)
    torch.manual_seed(0)
    notes = []
    if chosen == "native":  # FP8 layers where the checkpoint is FP8, as the loader keeps them on CUDA
        from .config import DSAConfig
        from .presets import random_model_in_place

        if weights is not None:
            from .checkpoint import load_layers

            model = load_layers(weights, keep, cfg, dtype, dev)
            notes.append(f"trained layers {keep} of {weights}")
        else:
            model = random_model_in_place(DSAConfig.from_dict(cfg), dev, dtype, fp8=size.fp8 and dev.type == "cuda")
            notes.append("random layers")
        model.set_backend(native_ops(model, "auto"))
        runner = NativeRunner(model)
    else:
        import transformers

        from .integrations.transformers import TransformersRunner, apply_pattern, patch_indexer_scoring
        from .presets import randomize_

        reduced = model_info(cfg)
        tcfg = reduced.transformers_config(text=False)
        with dev:
            hf = getattr(transformers, info.architecture)._from_config(tcfg, dtype=dtype).eval()
        randomize_(hf)
        apply_pattern(hf, Pattern.all_full(reduced.num_slots), drop_shared_indexers=False)
        patch_indexer_scoring(hf)
        runner = TransformersRunner(hf)
        notes.append("random layers")
    if ids is None:
        ids = torch.randint(1, info.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        notes.append("random tokens")
    else:
        notes.append("calibration tokens")
    full = Pattern.all_full(len(runner.slots))
    slot_of = {layer: j for j, layer in enumerate(runner.slots)}
    full_s: dict[str, list[float]] = {}
    shared_s: dict[str, list[float]] = {}
    working = 0
    state_bytes = 0
    head = []
    for rep in range(repeats + 1):  # the first pass warms up kernels and allocator
        state = runner.start(ids)
        state_bytes = state.nbytes()
        for j, orig in enumerate(keep):
            kind = size.layers[orig].kind
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            _sync(dev)
            t0 = time.perf_counter()
            nxt, _ = runner.run(state, full, j, j + 1)
            _sync(dev)
            state_bytes = max(state_bytes, nxt.nbytes())  # with the selection it carries on
            if rep:
                full_s.setdefault(kind, []).append(time.perf_counter() - t0)
            if dev.type == "cuda":
                working = max(working, torch.cuda.max_memory_allocated(dev) - base)
            if j in slot_of and state.carry is not None and slot_of[j] > 0:  # the same layer, Shared
                t0 = time.perf_counter()
                runner.run(state, full.with_layer(slot_of[j], "S"), j, j + 1)
                _sync(dev)
                if rep:
                    shared_s.setdefault(kind, []).append(time.perf_counter() - t0)
            state = nxt
        t0 = time.perf_counter()
        runner.nll(state, ids)
        _sync(dev)
        if rep:
            head.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    med = {k: sorted(v)[len(v) // 2] for k, v in full_s.items()}
    return Timing(f"probe on {name} ({chosen} backend, {tokens} tokens, {', '.join(notes)})", med,
                  {k: sorted(v)[len(v) // 2] for k, v in shared_s.items()}, sorted(head)[len(head) // 2],
                  int(working), int(state_bytes), notes)


def table_timing(info: ModelInfo, size: ModelSize, tokens: int, backend: str) -> Timing:
    """Seconds per layer-forward from the committed table of measured searches: the entry of the same
    backend nearest in length, its achieved FLOP/s applied to this model's layer-forwards."""
    entries = json.loads(TABLE.read_text())["entries"]
    same = [e for e in entries if e["backend"] == backend] or entries
    mine = sum(layer_flops(info, size, i, tokens, True) for i in range(len(size.layers))) / len(size.layers)
    # the measured search nearest in length and in the work of a layer-forward
    e = min(same, key=lambda e: abs(math.log(e["tokens"] / tokens))
            + abs(math.log(e["flops_per_layer_forward"] / mine)))
    rate = e["flops_per_layer_forward"] / e["s_per_layer_forward"]
    full_s, shared_s = {}, {}
    for i, layer in enumerate(size.layers):
        full_s.setdefault(layer.kind, layer_flops(info, size, i, tokens, True) / rate)
        shared_s.setdefault(layer.kind, layer_flops(info, size, i, tokens, False) / rate)
    head = 2.0 * size.head_params * tokens / rate
    return Timing(f"table: {e['name']} ({e['device']}, {e['tokens']} tokens, {rate / 1e12:.1f} TFLOP/s achieved)",
                  full_s, shared_s, head, notes=["from a measured search of another model, rescaled by FLOPs"])


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class Layout:
    name: str
    gpus: int
    tensor_parallel: int
    replicas: int
    weights_gib_per_gpu: float
    working_gib: float
    fits: bool
    search_s: float | None  # None: the layout cannot run this model
    note: str = ""


@dataclass
class Plan:
    model: str
    architecture: str
    params: int
    weights_gib: float  # as the search would hold them (FP8 kept FP8 where the checkpoint is FP8)
    fp8: bool
    seq_len: int
    num_samples: int
    target_full: int
    work: SearchWork
    timing: Timing
    s_per_layer_forward: float  # weighted over the layers a candidate runs
    search_s_one_gpu: float
    prefix_cache_gib: float  # what full reuse keeps: the states one greedy step stores for the next
    layouts: list[Layout]
    auto_cache_gib: float = 0.0  # what --cache-gb auto gives on one GPU of this size
    reuse_previous: bool = True  # whether the count assumes candidates restart from their previous evaluation
    # one GPU's search time for the quickest and the slowest of 32 random flip orders: which layers the
    # search flips first decides how many later runs are Shared, which matters where a Full layer-forward
    # costs many Shared ones
    search_s_range: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict:
        return asdict(self)


def mean_forward_seconds(info: ModelInfo, size: ModelSize, timing: Timing, work: SearchWork) -> float:
    """Seconds per layer-forward averaged as the search spends them: each decoder layer's runs with its own
    selection and its Shared runs (``work``), at the probe's or the table's time for its kind."""
    slowest = max(timing.full_s.values())
    total = 0.0
    for layer, (f, sh) in enumerate(zip(work.full_runs, work.shared_runs, strict=True)):
        kind = size.layers[layer].kind
        t_full = timing.full_s.get(kind, slowest)
        total += f * t_full + sh * timing.shared_s.get(kind, t_full)
    return total / max(sum(work.full_runs) + sum(work.shared_runs), 1e-9)


def cache_for_reuse(info: ModelInfo, work: SearchWork, num_samples: int) -> int:
    """States the prefix cache must hold for the reuse the estimate counts: those one greedy step stores
    (every candidate's state entering each later layer that owns an indexer, per batch), which the next step
    starts from, plus the all-Full pass's. The first step, with the most candidates, stores the most."""
    first = search_work(info, num_samples, 0, flips=1)
    entering = {s - 1 for s in info.slots if s > 0}
    stored = sum(first.full_runs[layer] + first.shared_runs[layer] for layer in entering)
    return int(stored + info.num_slots * num_samples) if work.flips else info.num_slots * num_samples


def make_plan(model: str | Path, seq_len: int, num_samples: int, target_full: int | None = None,
              keep: float | None = None, gpus: int = 1, gpu_gib: float | None = None, flips: int | None = None,
              do_probe: bool = False, device: str = "cuda", backend: str = "auto", data: str | None = None) -> Plan:
    from .runner import resolve_backend

    info = model_info(model)
    size = model_size(info)
    if target_full is None:
        target_full = max(1, round(info.num_slots * (keep if keep is not None else 0.25)))
    chosen = resolve_backend(backend, info.spec.native, info.architecture)  # the one-GPU search's runner
    if do_probe:
        path = Path(model)
        has_weights = path.is_dir() and any(path.glob("*.safetensors"))
        ids = None
        if data is not None:
            from .data import load_calibration

            ids = load_calibration(path, data, 1, seq_len, 0, None, info.vocab_size).batches(1)[0]
        timing = probe(info, size, seq_len, device, backend, weights=path if has_weights else None, ids=ids)
    else:
        timing = table_timing(info, size, seq_len, chosen)
    return estimate_plan(str(model), info, size, timing, seq_len, num_samples, target_full, flips, gpus, gpu_gib)


def estimate_plan(model: str, info: ModelInfo, size: ModelSize, timing: Timing, seq_len: int, num_samples: int,
                  target_full: int, flips: int | None = None, gpus: int = 1, gpu_gib: float | None = None,
                  flip_order: Sequence[int] | None = None) -> Plan:
    """The plan from a timing (a probe's, the table's, or one recorded earlier): work, memory, layouts.
    ``flip_order``: count a known order of flips (a finished search's) instead of averaging random ones."""
    work = search_work(info, num_samples, target_full, flips, flip_order=flip_order)
    weights = size.weight_bytes()
    # a state: the residual stream and the selection it carries (int64 indices), unless the probe measured it
    state = timing.state_bytes or seq_len * size.hidden * 2 + seq_len * info.index_topk * info.index_heads * 8
    cache = cache_for_reuse(info, work, num_samples) * state
    working = timing.working_bytes or seq_len * size.hidden * 2 * 24  # rough without a probe
    if gpu_gib is None:
        gpu_gib = (torch.cuda.get_device_properties(0).total_memory / GIB) if torch.cuda.is_available() else 139.0
    usable = 0.9 * gpu_gib
    auto_cache = max(2 * GIB, (gpu_gib * GIB - weights - working) / 4)  # what --cache-gb auto will take
    # with less than a step's states (with host memory, --host-cache-gb's default of up to 64 GiB), no
    # candidate finds its previous evaluation: each starts at its own layer
    reuse_previous = cache <= auto_cache + 64 * GIB
    if not reuse_previous:
        work = search_work(info, num_samples, target_full, flips, reuse_previous=False, flip_order=flip_order)
    per_fwd = mean_forward_seconds(info, size, timing, work)
    first = sum(timing.full_s.get(x.kind, per_fwd) for x in size.layers) * num_samples
    fixed = first + (work.evaluations + num_samples) * timing.head_s
    one = work.layer_forwards * per_fwd + fixed
    orders = [search_work(info, num_samples, target_full, flips, reuse_previous=reuse_previous, draws=1, seed=k)
              for k in range(32)]
    spread = [o.layer_forwards * mean_forward_seconds(info, size, timing, o) + fixed for o in orders]
    layouts = []
    layer_bytes = weights - 2 * size.other_params

    def row(name, tp, replicas, per_gpu, seconds, note=""):
        layouts.append(Layout(name, tp * replicas, tp, replicas, round(per_gpu / GIB, 2), round(working / GIB, 2),
                              per_gpu + working + 2 * GIB <= usable * GIB, round(seconds, 3), note))

    row("one GPU", 1, 1, weights, one)
    for tp in [t for t in range(2, gpus + 1) if gpus % t == 0]:
        try:
            info.check_tensor_parallel(tp)
        except ConfigError as e:
            layouts.append(Layout(f"tensor parallel {tp}", tp, tp, gpus // tp, 0.0, 0.0, False, None, str(e)))
            continue
        per_gpu = layer_bytes / tp + 2 * size.other_params
        row(f"{gpus // tp} x tensor parallel {tp}", tp, gpus // tp, per_gpu, one / gpus,
            "time assumes tensor parallel speeds a layer up T times (not yet measured)")
    if gpus > 1:
        row(f"{gpus} replicas (candidates split, NCCL)", 1, gpus, weights, one / gpus,
            "each GPU holds the whole model")
        row(f"device_map over {gpus}", 1, 1, weights / gpus, one, "one GPU busy at a time")
    return Plan(model, info.architecture, size.params, round(weights / GIB, 3), size.fp8, seq_len, num_samples,
                target_full, work, timing, per_fwd, round(one, 3), round(cache / GIB, 3), layouts,
                round(auto_cache / GIB, 3), reuse_previous, (round(min(spread), 3), round(max(spread), 3)))


def format_plan(p: Plan) -> str:
    w = p.work
    lines = [
        f"{p.architecture}: {_count(p.params)} parameters, weights {p.weights_gib:.2f} GiB"
        + (" (block-FP8 projections kept FP8)" if p.fp8 else " (bf16)"),
        f"calibration {p.num_samples} x {p.seq_len:,} tokens; search to {p.target_full} Full: {w.flips} flips over "
        f"{w.candidates} candidates",
        f"work: {w.layer_forwards:,} layer-forwards with prefix reuse (+ {w.first_evaluation:,} for the all-Full "
        f"loss), {w.evaluations:,} head evaluations",
        f"seconds per layer-forward: {p.s_per_layer_forward:.4f} ({p.timing.source})",
        f"prefix cache for full reuse: {p.prefix_cache_gib:.1f} GiB; --cache-gb auto gives {p.auto_cache_gib:.1f} GiB "
        "on one GPU",
        *([f"  more than auto gives: pass --cache-gb {math.ceil(p.prefix_cache_gib) + 1} if it fits, or states spill "
           "to host memory, which the estimate does not count (the bundled model at 4 x 64K took over twice as long "
           "spilling)"] if p.reuse_previous and p.prefix_cache_gib > p.auto_cache_gib else []),
        *(["  beyond device and host memory: counted with each candidate starting at its own layer (no reuse of "
           "the previous step's evaluations)"] if not p.reuse_previous else []),
        "",
        f"{'layout':<40} {'GPUs':>4} {'weights/GPU':>12} {'working':>8} {'fits':>5} {'search':>10}",
    ]
    for lay in p.layouts:
        t = _duration(lay.search_s) if lay.search_s is not None else "-"
        lines.append(f"{lay.name:<40} {lay.gpus:>4} {lay.weights_gib_per_gpu:>9.1f} GiB {lay.working_gib:>5.1f} GiB "
                     f"{'yes' if lay.fits else 'no':>5} {t:>10}" + (f"  ({lay.note})" if lay.note else ""))
    fit = [lay for lay in p.layouts if lay.fits and lay.search_s is not None]
    if fit:
        best = min(fit, key=lambda lay: lay.search_s)
        lines += ["", f"fastest layout that fits: {best.name}, about {_duration(best.search_s)}"]
        lo, hi = (x * best.search_s / max(p.search_s_one_gpu, 1e-9) for x in p.search_s_range)
        if hi > 1.05 * lo:
            lines.append(f"  {_duration(lo)} to {_duration(hi)} over flip orders: which layers the search flips "
                         "first decides how many later runs are Shared")
    else:
        lines += ["", "no layout fits these GPUs: more GPUs, or FP8 weights"]
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _duration(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


__all__ = ["ModelSize", "Plan", "SearchWork", "Timing", "estimate_plan", "format_plan", "layer_flops", "make_plan",
           "model_size", "probe", "search_work", "table_timing"]
