"""The ``indexcache search`` job: calibration, greedy trajectory, baselines, report and plots."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architectures import model_info
from ..data import load_calibration
from ..distributed import Dist
from ..errors import SearchError
from ..outputs import OutputDir, check_output_dir, write_atomic
from ..pattern import CONVENTIONS, Pattern, PatternError
from ..runner import LayerRunner, open_model
from .evaluator import LossEvaluator
from .greedy import GreedyResult, greedy_search, stage_starts
from .similarity import similarity_dp, similarity_matrix


@dataclass
class SearchOptions:
    model: str
    out: str
    data: str | None = None
    retrieval_mix: float | None = None  # splice retrieval episodes into the calibration text (this share)
    num_samples: int = 4
    seq_len: int | None = None
    seed: int = 0
    batch_size: int = 1
    keep: float | None = None
    num_full: int | None = None
    to_end: bool = False
    stages: int = 1
    force_full: list[int] = field(default_factory=list)
    baselines: list[str] = field(default_factory=lambda: ["uniform", "similarity"])
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    scoring: str = "exact"
    cache_gb: float | None = None  # device memory for prefix states (None: auto, see device_cache_gb)
    host_cache_gb: float | None = None  # host memory for states pushed out of the device's share (None: auto)
    progress: bool = True
    backend: str = "auto"  # "native": this package's model; "hf": the transformers class; "auto": native where it
    # covers the architecture (DeepSeek-V3.2, GLM-5.x), else hf
    ops: str = "auto"  # native backend: "torch" (plain ops), "triton" (kernels) or "auto" (triton on CUDA)
    device_map: str | None = None  # with backend "hf": transformers' device_map (auto, a device, JSON, .json file)
    tp: int = 1  # with backend "hf" under torchrun: ranks per model, sharded by transformers' tensor-parallel plan
    overwrite: bool = False  # replace an earlier search's outputs in ``out``
    command: str = ""  # the command line, recorded in the output directory's manifest


def target_full(n: int, keep: float | None, num_full: int | None) -> int:
    if keep is not None and num_full is not None:
        raise SearchError("give --keep or --num-full, not both")
    if num_full is not None:
        return num_full
    keep = 0.25 if keep is None else keep
    if not 0 < keep <= 1:
        raise SearchError(f"--keep must be in (0, 1], got {keep}")
    return max(1, round(n * keep))


STATE_FILE = "search_state.json"


def available_host_gb() -> float:
    """Host memory available now (GiB): MemAvailable where /proc/meminfo has it, else 0."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def device_cache_gb(requested: float | None, device: torch.device | str) -> float:
    """The device tier of the prefix cache: by default a quarter of the GPU's free memory once the model is
    loaded (at least 2 GiB; the rest is left to the forward's own working memory), 2 GiB on CPU."""
    if requested is not None:
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(2.0, free / 4 / 2**30)
    return 2.0


def host_cache_gb(requested: float | None, device: str) -> float:
    """The host tier of the prefix cache: none when the model runs on the CPU (its states are already in
    host memory); by default half the available host memory, at most 64 GiB."""
    if torch.device(device).type == "cpu":
        return 0.0
    if requested is not None:
        avail = available_host_gb()
        if avail and requested > avail:
            raise SearchError(f"--host-cache-gb {requested:g} is more than the {avail:.1f} GiB of host memory "
                              "available now")
        return requested
    return min(64.0, available_host_gb() / 2)


def run_search(opt: SearchOptions) -> dict:
    check_output_dir(opt.out, "--out", overwrite=opt.overwrite, resume_file=STATE_FILE, resume=opt.resume)
    dist = Dist.from_env(opt.device, opt.tp)
    opt.progress = opt.progress and dist.is_main  # one bar, not one per rank
    if opt.device.startswith("cuda") and dist.world > 1:
        opt.device = f"cuda:{os.environ.get('LOCAL_RANK', dist.rank)}"
        torch.cuda.set_device(opt.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opt.dtype]
    info = model_info(opt.model)
    opened = open_model(opt.model, info, opt.backend, dtype, opt.device, opt.scoring, opt.ops, opt.device_map,
                        dist.world, verbose=dist.is_main, tp=opt.tp)
    runner, model, backend, ops = opened.runner, opened.model, opened.backend, opened.ops
    n = info.num_slots  # pattern positions: the layers that own an indexer
    seq_len = opt.seq_len or default_seq_len(info, opt.device)
    info.check_calibration(seq_len)
    cal = load_calibration(opt.model, opt.data, opt.num_samples, seq_len, opt.seed, None, info.vocab_size,
                           opt.retrieval_mix)
    start = opened.start  # all Full, or a native-shared checkpoint's own Full layers
    target = target_full(n, opt.keep, opt.num_full)
    forced = sorted({0, *opt.force_full, *stage_starts(n, opt.stages)})
    if target < len(forced):
        raise SearchError(f"--keep/--num-full asks for {target} Full layers but {len(forced)} are forced Full")
    if target > start.num_full:
        raise SearchError(f"the checkpoint has indexers on only {start.num_full} layers; cannot keep {target}")
    cache_bytes = int(dist.agree_min(device_cache_gb(opt.cache_gb, runner.device)) * (1 << 30))
    host_bytes = int(dist.agree_min(host_cache_gb(opt.host_cache_gb, opt.device)) * (1 << 30))
    evaluator = LossEvaluator(runner, cal.batches(opt.batch_size), cache_bytes=cache_bytes, host_bytes=host_bytes)
    evaluator.check_budget()  # before anything is written
    out = OutputDir(opt.out, opt.command)
    if dist.is_main:
        out.open(fresh=not opt.resume)
        out.record(STATE_FILE)
    fingerprint = {"model": str(Path(opt.model).resolve()), "calibration": cal.fingerprint, "seq_len": seq_len,
                   "dtype": opt.dtype, "scoring": opt.scoring, "batch_size": opt.batch_size}
    if ops != "torch":  # kernels and plain ops agree to rounding, not bit for bit: no mixed resume
        fingerprint["ops"] = ops
    if backend != "native":  # the two backends agree to fp32 rounding, not bit for bit: no mixed resume
        fingerprint["backend"] = backend
    state_path = out.path / STATE_FILE
    result = greedy_search(evaluator, start=start, target_full=None if opt.to_end else target, stages=opt.stages,
                           forced_full=forced, state_path=state_path, resume=opt.resume,
                           fingerprint=fingerprint, dist=dist, progress=opt.progress)
    if dist.group != 0:  # the baselines run on the first model replica (all of its tensor-parallel ranks)
        dist.close()
        return {}
    wanted = {"requested": sorted(opt.baselines), "target": target}
    baselines = saved_baselines(state_path, wanted) if opt.resume else None
    if baselines is None:
        baselines = compute_baselines(opt, runner, evaluator, cal, start, target, forced)
        if dist.is_main:
            save_baselines(state_path, wanted, baselines)
    if not dist.is_main:
        dist.close()
        return {}
    report = build_report(opt, info, cal, seq_len, result, target, baselines)
    report.update(ops=ops, command=opt.command,
                  prefix_cache={"device_gib": round(cache_bytes / 2**30, 2), "host_gib": round(host_bytes / 2**30, 2)})
    if torch.device(opt.device).type == "cuda":
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    report["backend"] = {"name": backend, "placement": model.placement() if backend != "native" else opt.device}
    if dist.world > 1:  # how the processes shared the work: ranks per model (tensor parallel) and replicas
        local = sum(t.numel() for t in model.parameters()) if backend == "native" else model.local_parameters()
        report["backend"]["processes"] = {"world": dist.world, "tensor_parallel": opt.tp, "replicas": dist.groups,
                                          "parameters_on_rank_0": local}
    write_outputs(report, out)
    dist.close()
    return report


def saved_baselines(state_path: Path, wanted: dict) -> dict | None:
    """The baselines a finished search already computed for the same request (a resumed, finished run
    reports them again without recomputing)."""
    try:
        saved = json.loads(state_path.read_text()).get("baselines")
    except (OSError, ValueError):
        return None
    if isinstance(saved, dict) and saved.get("for") == wanted:
        return saved["rows"]
    return None


def save_baselines(state_path: Path, wanted: dict, baselines: dict) -> None:
    state = json.loads(state_path.read_text())
    state["baselines"] = {"for": wanted, "rows": baselines}
    write_atomic(state_path, lambda p: p.write_text(json.dumps(state, indent=2)))


LONG_CALIBRATION = 16384  # the calibration length on a GPU: see default_seq_len


def default_seq_len(info, device: str = "cpu") -> int:
    """The calibration length when none is given. On a GPU, 16384 tokens (or the model's longest window if
    shorter): on the bundled model, the 1/2 patterns searched on 16K-token books kept the tasks at 16K for
    3 of 3 sample seeds, and the pick of two of them kept them at 32K, where the picks searched on 1K tokens
    lost 23 and 45 of 68 points (docs/results.md). On the CPU, where a 16K search would not finish, twice
    what a query keeps and at least 512."""
    if str(device).startswith("cuda"):
        return min(LONG_CALIBRATION, info.max_position_embeddings)
    return max(2 * info.index_topk * info.tokens_per_unit, 512)


def compute_baselines(opt: SearchOptions, runner: LayerRunner, evaluator, cal, start: Pattern, target: int,
                      forced: list[int]) -> dict:
    n = len(runner.slots)  # pattern positions
    baselines: dict = {}
    if "uniform" in opt.baselines:
        baselines["uniform"] = uniform_baselines(evaluator, n, start, opt.progress)
    if "similarity" in opt.baselines:
        if not hasattr(runner, "attention_outputs"):
            baselines["similarity"] = {"skipped": "runs on the native backend only"}
        elif start.num_full != n:
            baselines["similarity"] = {"skipped": "needs an indexer on every layer"}
        else:
            sims = similarity_matrix(runner, cal.batches(opt.batch_size), progress=opt.progress)
            counts = sorted({target, *(u["num_full"] for u in baselines.get("uniform", []))})
            rows = []
            for m in counts:
                if len(forced) <= m <= n:
                    p, score = similarity_dp(sims, m, forced)
                    rows.append({"pattern": str(p), "num_full": m, "similarity": score, "loss": evaluator.loss(p)})
            baselines["similarity"] = rows
            baselines["similarity_matrix"] = [[round(float(v), 5) for v in row] for row in sims]
    return baselines


def uniform_patterns(n: int, start: Pattern) -> list[tuple[str, int, Pattern]]:
    """The uniform baselines' (convention, frequency, pattern) over ``n`` positions that ``start`` allows."""
    out = []
    for conv in ("official", "glm52", "paper"):
        for freq in (2, 4, 8):
            try:
                p = Pattern.uniform(n, freq, conv)
                p.validate(indexer_layers=start.full_layers)
            except PatternError:
                continue
            out.append((conv, freq, p))
    return out


def uniform_baselines(evaluator: LossEvaluator, n: int, start: Pattern, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    todo = {str(p): p for _, _, p in uniform_patterns(n, start)}
    slots, n_b = evaluator.runner.slots, len(evaluator.batches)
    # each pattern runs from its first Shared layer on (the start pattern's states are cached before it)
    left = sum((evaluator.n_layers - slots[next((i for i in range(n) if not p.is_full(i)), n - 1)]) * n_b
               for p in todo.values())
    bar = tqdm(total=left, desc="uniform baselines", unit="layer-fwd", disable=not progress, dynamic_ncols=True)
    evaluator.on_layer = bar.update
    rows, losses = [], {}
    try:
        for conv, freq, p in uniform_patterns(n, start):
            if str(p) not in losses:  # conventions that agree on a pattern share its evaluation
                losses[str(p)] = evaluator.loss(p)
            rows.append({"convention": conv, "freq": freq, "pattern": str(p), "num_full": p.num_full,
                         "loss": losses[str(p)]})
    finally:
        evaluator.on_layer = None
        bar.close()
    return rows


def build_report(opt: SearchOptions, info, cal, seq_len: int, result: GreedyResult, target: int,
                 baselines: dict) -> dict:
    sel = result.at(target)
    sel_p = sel.pattern
    return {
        "num_layers": result.num_layers,
        "method": "greedy" + (f" (stages={result.stages})" if result.stages > 1 else ""),
        "model": opt.model,
        "architecture": info.architecture,
        "index_topk": info.index_topk,
        "selection_unit": info.spec.unit,
        "indexer_layers": info.slots,
        "calibration": {"source": cal.source, "num_samples": int(cal.windows.shape[0]), "seq_len": seq_len,
                        "seed": opt.seed, "fingerprint": cal.fingerprint, "retrieval_mix": opt.retrieval_mix,
                        "answer_share": cal.answer_share},
        "all_full_loss": result.all_full_loss,
        "start_pattern": str(result.start_pattern),
        "forced_full": result.forced_full,
        "trajectory": [e.as_dict() for e in result.trajectory],
        "steps_within_noise": [e.num_full for e in result.trajectory if (e.confidence or {}).get("within_noise")],
        "selected": {"pattern": str(sel_p), "num_full": sel.num_full, "loss": sel.loss,
                     "retention": round(sel_p.retention, 4), "decoder_layers": info.decoder_form(sel_p),
                     "config_patch": info.config_patch(sel_p), "engines": info.engine_flags(sel_p)},
        "baselines": baselines,
        "counters": result.counters,
        "seconds": round(result.seconds, 2),
    }


def write_outputs(report: dict, out: OutputDir) -> None:
    out.write_text("report.json", json.dumps(report, indent=2) + "\n")
    sel = report["selected"]
    out.write_text("config_patch.json", json.dumps(sel["config_patch"], indent=2) + "\n")
    out.write_text("engine_flags.txt", engine_flags_text(sel))
    out.write("loss_curve.png", lambda p: plot_loss_curve(report, p))
    out.write_text("summary.md", summary_markdown(report))


def engine_flags_text(sel: dict) -> str:
    lines = [f"# pattern {sel['pattern']} ({sel['num_full']} Full); per decoder layer {sel['decoder_layers']}"]
    for e in sel["engines"]:
        lines.append(f"{e['engine']}: {e['flag'] or '(no flag)'}" + (f"   # {e['note']}" if e["note"] else ""))
    return "\n".join(lines) + "\n"


def summary_markdown(r: dict) -> str:
    sel = r["selected"]
    cal = r["calibration"]
    c = r["counters"]
    lines = [
        f"# IndexCache greedy search: {Path(r['model']).name}",
        "",
        f"- model: `{r['model']}` ({r['architecture']}, {r['num_layers']} layers with an indexer, index_topk "
        f"{r['index_topk']} ({r.get('selection_unit', 'token')}s))",
        f"- calibration: {cal['num_samples']} x {cal['seq_len']} tokens from {cal['source']}, windows drawn with "
        f"seed {cal['seed']}",
        f"- all-Full loss: {r['all_full_loss']:.5f}",
        f"- **selected ({sel['num_full']} Full, retention {sel['retention']:.3f})**: `{sel['pattern']}` (per decoder "
        f"layer `{sel['decoder_layers']}`), loss {sel['loss']:.5f} ({sel['loss'] - r['all_full_loss']:+.5f})",
        f"- work: {c['evaluations']} pattern evaluations, {c['layer_forwards']} layer-forwards "
        f"({c['ratio_vs_naive']:.3f}x of the {c['naive_layer_forwards']} a search without prefix reuse runs), "
        f"{r['seconds']:.1f} s",
        "",
    ]
    for e in sel["engines"]:
        lines.append(f"{e['engine']}: " + (f"`{e['flag']}`" if e["flag"] else "no flag") +
                     (f" ({e['note']})" if e["note"] else ""))
        lines.append("")
    confs = [e.get("confidence") or {} for e in r["trajectory"]]
    noisy = [e["num_full"] for e, c in zip(r["trajectory"], confs, strict=True) if c.get("within_noise")]
    measured = [c for c in confs if "stays" in c]
    if measured:
        lines += [f"- confidence: a bootstrap over the {measured[0]['windows']} calibration windows "
                  f"({measured[0]['resamples']} resamples) at each step; " +
                  (f"**{len(noisy)} of {len(measured)} steps within noise** (the runner-up's margin's 95% "
                   f"interval reaches zero), at {', '.join(map(str, noisy))} Full" if noisy else
                   f"every one of the {len(measured)} steps' margins is clear of zero"), ""]
    elif confs and any("note" in c for c in confs):
        lines += [f"- confidence: {next(c['note'] for c in confs if 'note' in c)}", ""]
    lines += [
        "| #Full | greedy loss | flipped | runner-up | margin (95% interval) | committed flip stays lowest |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for e, c in zip(r["trajectory"], confs, strict=True):
        ci = c.get("margin_ci95")
        margin = "" if "margin" not in c else f"{c['margin']:+.5f}" + (
            f" ({ci[0]:+.5f}, {ci[1]:+.5f})" + (" **within noise**" if c.get("within_noise") else "") if ci else "")
        stays = f"{100 * c['stays']:.0f}%" if "stays" in c else ""
        lines.append(f"| {e['num_full']} | {e['loss']:.5f} | {e['flipped']} | {c.get('runner_up', '')} | {margin} "
                     f"| {stays} |")
    uni = r["baselines"].get("uniform") or []
    if uni:
        greedy = {e["num_full"]: e["loss"] for e in r["trajectory"]}
        lines += ["", "| baseline | pattern | #Full | loss | greedy at same #Full |", "|---|---|---:|---:|---:|"]
        for u in uni:
            g = greedy.get(u["num_full"])
            lines.append(f"| uniform {u['convention']} freq {u['freq']} | `{u['pattern']}` | {u['num_full']} | "
                         f"{u['loss']:.5f} | {'' if g is None else f'{g:.5f}'} |")
        for s in r["baselines"].get("similarity") or []:
            if isinstance(s, dict) and "pattern" in s:
                g = greedy.get(s["num_full"])
                lines.append(f"| similarity DP | `{s['pattern']}` | {s['num_full']} | {s['loss']:.5f} | "
                             f"{'' if g is None else f'{g:.5f}'} |")
    return "\n".join(lines) + "\n"


def plot_loss_curve(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    xs = [Pattern.parse(r["start_pattern"]).num_full] + [e["num_full"] for e in r["trajectory"]]
    ys = [r["all_full_loss"]] + [e["loss"] for e in r["trajectory"]]
    ax.plot(xs, ys, "-o", ms=3, label="greedy (trajectory)", color="C0")
    markers = {"official": "s", "glm52": "^", "paper": "v"}
    colours = {"official": "C1", "glm52": "C2", "paper": "C4"}
    for conv in CONVENTIONS:
        pts = [u for u in r["baselines"].get("uniform") or [] if u["convention"] == conv]
        if pts:
            ax.scatter([u["num_full"] for u in pts], [u["loss"] for u in pts], marker=markers.get(conv, "x"),
                       s=36, color=colours.get(conv, "C5"), label=f"uniform ({conv})", zorder=3)
    sim = [s for s in r["baselines"].get("similarity") or [] if isinstance(s, dict) and "loss" in s]
    if sim:
        ax.scatter([s["num_full"] for s in sim], [s["loss"] for s in sim], marker="D", s=30, color="C3",
                   label="similarity DP", zorder=3)
    ax.axhline(r["all_full_loss"], color="grey", ls="--", lw=0.8, label="all Full")
    # keep the interesting range in view: the last flips (1 or 2 Full) can cost far more than anything else
    others = [u["loss"] for u in r["baselines"].get("uniform") or []] + [s["loss"] for s in sim]
    inner = [y for x, y in zip(xs, ys, strict=True) if x >= 2] + others
    lo, hi = min(inner + [r["all_full_loss"]]), max(inner)
    top = hi + 0.15 * max(hi - lo, 1e-6)
    for x, y in zip(xs, ys, strict=True):
        if y > top:
            ax.annotate(f"{y:.3f} at {x} Full", xy=(x, top), xytext=(x + 0.3, top - 0.12 * (top - lo)),
                        fontsize=7, arrowprops={"arrowstyle": "->", "lw": 0.6})
    ax.set_ylim(lo - 0.05 * (top - lo), top)
    sel = r["selected"]
    ax.axvline(sel["num_full"], color="C0", ls=":", lw=0.8)
    ax.set_xlabel("number of Full layers (indexers kept)")
    ax.set_ylabel("calibration LM loss (nats/token)")
    ax.set_title(f"IndexCache search, {r['num_layers']} layers")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")  # path may be a temporary name without .png
    plt.close(fig)


def run_overlap(model_dir: str, out: str, data: str | None, num_samples: int, seq_len: int | None, seed: int,
                pattern: Pattern | None, device: str = "cpu", progress: bool = True, overwrite: bool = False,
                command: str = "", backend: str = "auto", dtype: torch.dtype = torch.float32,
                ops: str = "auto", retrieval_mix: float | None = None) -> torch.Tensor:
    """The cross-layer overlap of the all-Full model, over the pattern positions, in the architecture's unit
    (per indexer head too where each head selects), on the native model's ``ops`` (the kernels on CUDA)."""
    from ..analysis.overlap import overlap_by_head, plot_heatmap, write_csv

    check_output_dir(out, "--out", overwrite=overwrite)
    info = model_info(model_dir)
    t0 = time.time()
    opened = open_model(model_dir, info, backend, dtype=dtype, device=device, ops=ops)
    seq_len = seq_len or default_seq_len(info, device)
    info.check_calibration(seq_len)
    cal = load_calibration(model_dir, data, num_samples, seq_len, seed, None, info.vocab_size, retrieval_mix)
    pat = None if pattern is None else pattern.validate(num_layers=info.num_slots)
    inter, size = overlap_by_head(opened.runner, cal.batches(1), progress=progress,
                                  first_query=info.first_restrictive_query)
    mat = inter.sum(0) / size.sum(0).view(-1, 1)
    o = OutputDir(out, command).open(fresh=True)
    o.write("overlap.csv", lambda p: write_csv(mat, p))
    o.write("overlap.png", lambda p: plot_heatmap(mat, p, pat))
    n = info.num_slots
    adjacent = [float(mat[i + 1, i]) for i in range(n - 1)]
    summary = {"num_layers": n, "indexer_layers": info.slots, "architecture": info.architecture,
               "selection_unit": info.spec.unit, "index_topk": info.index_topk, "calibration": {
                   "source": cal.source, "num_samples": int(cal.windows.shape[0]), "seq_len": seq_len, "seed": seed},
               "mean_adjacent_overlap": sum(adjacent) / max(len(adjacent), 1),
               "min_overlap": float(mat.min()), "pattern": pat and str(pat), "backend": opened.backend,
               "ops": opened.ops, "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.time() - t0, 2),
               "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
               if torch.device(device).type == "cuda" else None}
    if inter.shape[0] > 1:  # one selection per indexer head: each head's own matrix too
        summary["per_head"] = [(inter[h] / size[h].view(-1, 1)).tolist() for h in range(inter.shape[0])]
    if pat is not None:
        shared = [float(mat[i, pat.source_layer(i)]) for i in pat.shared_layers]
        summary["mean_shared_to_source_overlap"] = sum(shared) / len(shared) if shared else math.nan
    o.write_text("overlap.json", json.dumps(summary, indent=2) + "\n")
    return mat
