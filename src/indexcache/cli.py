"""``indexcache`` command line.

Every option is checked before any model or data loads: argparse types check each value's type and
range, then one pre-flight check per command (:data:`PREFLIGHT`) checks the files that must exist (or
must not), reads the model's ``config.json`` and turns every pattern argument into a :class:`Pattern`
with the one parser all commands share (:func:`indexcache.pattern.parse_spec`). Errors are one line on
stderr and exit code 2; every message names the option and what it accepts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from .errors import IndexCacheError, OptionError, PatternError
from .pattern import CONVENTIONS, SPEC_FORMS, Pattern, parse_spec


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), so every refusal reads the same."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------------- value types
def _number(text: str, kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            accepted: str = "") -> float | int:
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
    if v != v or (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, 1, accepted="a positive integer")


def positive_ints(text: str) -> list[int]:
    """``256,2048``: positive integers, comma-separated, each at most once."""
    items = [positive_int(x) for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if len(set(items)) < len(items):
        raise argparse.ArgumentTypeError(f"a value is repeated in {text!r}")
    return items


def nonneg_int(text: str) -> int:
    return _number(text, int, 0, accepted="a whole number >= 0")


def auto_or_positive_float(text: str) -> float | None:
    """``auto`` (None) or a number > 0."""
    if text.strip().lower() == "auto":
        return None
    return _number(text, float, 0.0, lo_open=True, accepted="'auto' or a number > 0")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, lo_open=True, accepted="a number > 0")


def nonneg_float(text: str) -> float:
    return _number(text, float, 0.0, accepted="a number >= 0")


def fraction(text: str) -> float:
    return _number(text, float, 0.0, 1.0, lo_open=True, accepted="a number in (0, 1]")


def retrieval_share(text: str) -> float:
    return _number(text, float, 0.0, 0.9, lo_open=True, accepted="a number in (0, 0.9]")


def share(text: str) -> float:
    return _number(text, float, 0.0, 1.0, accepted="a number in [0, 1]")


def token_count(text: str) -> int:
    """``8192``, ``8K`` or ``1.5K``: a positive number of tokens."""
    t = text.strip()
    scale = 1000 if t[-1:].lower() == "k" else 1
    v = _number(t[:-1] if scale > 1 else t, float, 0.0, lo_open=True,
                accepted="a positive token count such as 8192 or 8K")
    if v * scale != int(v * scale):
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}")
    return int(v * scale)


def token_counts(text: str) -> list[int]:
    return [token_count(x) for x in text.split(",") if x.strip()]


def layer_list(text: str) -> list[int]:
    """``0,39``: layer numbers."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() for x in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 0,39, got {text!r}")
    return [int(x) for x in items]


# -------------------------------------------------------------------------------- pre-flight helpers
def model_info_arg(path: str, option: str = "MODEL"):
    """The :class:`~indexcache.architectures.ModelInfo` of a model directory, refusing anything that is not
    one (before any weight is read)."""
    from .architectures import model_info

    p = Path(path)
    if not p.exists():
        raise OptionError(f"{option} {path} does not exist; give a model directory (config.json + safetensors)")
    if not p.is_dir():
        raise OptionError(f"{option} {path} is a file, not a model directory (a directory holding config.json "
                          "and safetensors weights)")
    if not (p / "config.json").is_file():
        raise OptionError(f"{option} {path} is not a model directory: it has no config.json")
    return model_info(p)


def model_weights(path: str, option: str = "MODEL") -> None:
    from .checkpoint import INDEX_FILE, SINGLE_FILE

    if not (Path(path) / SINGLE_FILE).is_file() and not (Path(path) / INDEX_FILE).is_file():
        raise OptionError(f"{option} {path} has a config.json but no weights ({SINGLE_FILE} or {INDEX_FILE})")


def data_path(path: str, option: str = "--data") -> None:
    """A data file or directory exists and, for text, is text (the first MiB is read)."""
    import gzip
    import lzma

    from .data.text import decode_text

    p = Path(path)
    if not p.exists():
        raise OptionError(f"{option} {path} does not exist; give a text file, a directory of .txt/.txt.xz/.txt.gz "
                          "books, a .jsonl with a 'text' field, or a token-id .npy")
    if p.is_dir() or p.suffix == ".npy":
        return
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(p.suffix, open)
    try:
        with opener(p, "rb") as f:
            head = f.read(1 << 20)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise OptionError(f"{option} {path} cannot be read: {e}") from None
    if len(head) == 1 << 20:  # a cut may split a multi-byte character: drop the incomplete tail
        head = head[: max(head.rfind(b"\n"), 0)] or head[:-4]
    decode_text(head, f"{option} {path}")


def pattern_arg(spec: str | None, info, option: str = "--pattern", model: str | None = None) -> Pattern | None:
    """A pattern option read for this model: one character per layer that owns an indexer, the
    per-decoder-layer form, or a rule; with ``model``, checked against the indexer weights it ships (the
    checkpoint headers only)."""
    if spec is None:
        return None
    from .architectures import check_trained

    try:
        p = info.parse_pattern(spec)
        if model is not None:
            check_trained(info.slots, p, _shipped(info, model))
        return p
    except PatternError as e:
        raise PatternError(f"{option} {spec}: {e}") from None


def _shipped(info, model: str) -> list[int]:
    from .checkpoint import TensorSource

    src = TensorSource(model)
    try:
        return info.shipped_slots(src.names())
    finally:
        src.close()


def _out_dir(args: argparse.Namespace, resume_file: str | None = None) -> None:
    from .outputs import check_output_dir

    check_output_dir(args.out, "--out" if args.cmd != "train" else "OUT", overwrite=args.overwrite,
                     resume_file=resume_file, resume=getattr(args, "resume", False))


def _out_file(args: argparse.Namespace) -> None:
    from .outputs import check_output_file

    check_output_file(args.out, "--out", overwrite=args.overwrite)


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _exports_text(p: Pattern, info=None) -> str:
    """Config patch and engine flags of a pattern (for a model's architecture when it is known)."""
    from .architectures import exports_text, model_info

    if info is None:  # no model: the per-layer convention of DeepSeek-V3.2 / GLM-5
        info = model_info({"architectures": ["GlmMoeDsaForCausalLM"], "num_hidden_layers": len(p)})
    return "\n" + exports_text(info, p).lstrip("\n")


# ------------------------------------------------------------------------------------------ pattern
def check_pattern(args: argparse.Namespace) -> None:
    args.indexer_layers, args.info = None, None
    if args.model:
        args.info = info = model_info_arg(args.model, "--model")
        if args.num_layers is not None and args.num_layers != info.num_slots:
            raise OptionError(f"--num-layers {args.num_layers} contradicts --model, which has {info.num_slots} "
                              f"layers with an indexer ({info.describe_slots()}); give one of them")
        args.num_layers = info.num_slots
        from .checkpoint import INDEX_FILE, SINGLE_FILE, TensorSource

        if (Path(args.model) / SINGLE_FILE).exists() or (Path(args.model) / INDEX_FILE).exists():
            args.indexer_layers = info.shipped_slots(TensorSource(args.model).names())
    if args.freq is None and (args.offset is not None or args.convention != "official"):
        raise PatternError("--convention and --offset describe a uniform pattern: give --freq too")
    if args.freq is not None:
        if args.pattern:
            raise PatternError("give a PATTERN or --freq, not both")
        if args.num_layers is None:
            raise PatternError("--freq needs the layer count: give --num-layers N or --model DIR")
        args.parsed = Pattern.uniform(args.num_layers, args.freq, args.convention, args.offset)
    elif args.pattern:
        try:
            args.parsed = args.info.parse_pattern(args.pattern) if args.info else parse_spec(args.pattern,
                                                                                                args.num_layers)
        except PatternError as e:
            raise PatternError(f"PATTERN {args.pattern}: {e}") from None
    elif args.model:
        args.parsed = args.info.pattern
        args.parsed.origin = args.info.pattern_source
    else:
        raise PatternError(f"give a PATTERN ({SPEC_FORMS}), --freq with --num-layers, or --model DIR")
    args.parsed.validate(num_layers=args.num_layers, stage_starts=args.stage_starts,
                         indexer_layers=args.indexer_layers)


def cmd_pattern(args: argparse.Namespace) -> int:
    p, n, info = args.parsed, args.num_layers or len(args.parsed), args.info
    if args.json:
        d = dict(p.describe(), uniform_matches=p.match_uniform())
        if info is not None:
            d.update(architecture=info.architecture, indexer_layers=info.slots, decoder_layers=info.decoder_form(p),
                     config_patch=info.config_patch(p), engines=info.engine_flags(p))
        else:
            d.update(config_patch=p.config_patch(), sglang=p.sglang_override(), vllm=p.vllm_override())
        print(json.dumps(d, indent=2))
        return 0
    lines = [p.describe_text()]
    if info is not None:
        lines.append(f"indexers  {info.describe_slots()}; a pattern has one character per such layer")
    matches = p.match_uniform()
    lines.append(f"uniform   {', '.join(matches) if matches else 'no uniform freq/offset reproduces it'}")
    if args.indexer_layers is not None and len(args.indexer_layers) < n:
        lines.append(f"note      the checkpoint ships indexer weights only on {len(args.indexer_layers)} of its {n} "
                     "indexer layers; only those can be Full")
    print("\n".join(lines) + _exports_text(p, info))
    return 0


# --------------------------------------------------------------------------------------------- info
def check_info(args: argparse.Namespace) -> None:
    args.info = model_info_arg(args.model)
    model_weights(args.model)
    args.parsed = pattern_arg(args.pattern, args.info)


def cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter

    from .checkpoint import TensorSource

    info = args.info
    pat = args.parsed or info.pattern
    # everything is read and computed before anything is printed: a corrupt shard prints only its error
    src = TensorSource(args.model)
    try:
        names = src.names()
        shipped = info.shipped_slots(names)
        pat.validate(indexer_layers=shipped)
        shapes = {n: src.shape(n) for n in names}
    finally:
        src.close()
    lines = [f"model        {args.model}", f"architecture {info.architecture} ({info.arch})"]
    if info.spec.native:
        lines += _native_info_lines(info, pat, shipped, shapes, args.context, given=args.parsed is not None)
    else:
        import math

        kinds = ", ".join(f"{c} {t}" for t, c in Counter(info.layer_types).items())
        total = sum(math.prod(v) for v in shapes.values())
        idx = sum(math.prod(v) for n, v in shapes.items() if info.spec.indexer_tensor.match(n))
        lines += [f"layers       {info.num_layers} ({kinds})",
                  f"indexer      on {info.describe_slots()}; a query keeps {info.describe_selection()}; "
                  f"weights on {len(shipped)}/{info.num_slots} indexer layers",
                  f"pattern      {pat}  ({pat.num_full} Full; {'given' if args.parsed else info.pattern_source}); "
                  f"per decoder layer {info.decoder_form(pat)}",
                  f"parameters   {_fmt_count(total)} in the checkpoint, {_fmt_count(idx)} of them in indexers "
                  "(read from the headers)",
                  f"note         the FLOP model covers DeepSeek-V3.2 and GLM-5.x; {info.architecture} runs through "
                  "transformers' own class"]
    print("\n".join(lines))
    return 0


def _native_info_lines(info, pat: Pattern, shipped: list[int], shapes: dict, contexts: list[int],
                       given: bool) -> list[str]:
    from .config import DSAConfig
    from .stats import count_parameters, flops

    cfg = DSAConfig.from_dict(info.raw)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    counts = count_parameters(cfg, shapes, pat)
    lines = [
        f"layers       {cfg.num_hidden_layers} ({cfg.num_hidden_layers - n_moe} dense MLP, {n_moe} MoE"
        + (f", +{cfg.num_mtp_layers} MTP ignored" if cfg.num_mtp_layers else "") + ")",
        f"hidden       {cfg.hidden_size}, {cfg.num_attention_heads} heads, q_lora {cfg.q_lora_rank}, "
        f"kv_lora {cfg.kv_lora_rank}, qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, v {cfg.v_head_dim}",
    ]
    if n_moe:
        lines.append(f"moe          {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} "
                     f"(groups {cfg.n_group}, top groups {cfg.topk_group}) + {cfg.n_shared_experts} shared, "
                     f"inter {cfg.moe_intermediate_size}")
    rope = "interleaved" if cfg.indexer_rope_interleave else "half-split"
    lines.append(f"indexer      {cfg.index_n_heads} heads x {cfg.index_head_dim}, top-{cfg.index_topk}, {rope} RoPE; "
                 f"weights on {len(shipped)}/{cfg.num_hidden_layers} layers")
    lines.append(f"rope         {cfg.rope.rope_type} theta={cfg.rope.theta:g}"
                 + (f" factor={cfg.rope.factor:g}" if cfg.rope.rope_type != "default" else ""))
    lines.append(f"pattern      {pat}  ({pat.num_full} Full; {'given' if given else cfg.pattern_source})")
    parts = ", ".join(f"{k} {_fmt_count(v)}" for k, v in counts.items() if k not in ("total", "active_per_token") and v)
    lines.append(f"parameters   {_fmt_count(counts['total'])} total, {_fmt_count(counts['active_per_token'])} "
                 f"active per token ({parts}; read from the checkpoint headers)")
    for L in contexts:
        f_pat, f_full = flops(cfg, L, pat), flops(cfg, L, Pattern.all_full(cfg.num_hidden_layers))
        lines.append(f"context {L:>7}: prefill {_fmt_count(f_pat['prefill']['total'])}FLOP, indexer "
                     f"{f_pat['prefill']['indexer_share']:.1%} (all-Full {f_full['prefill']['indexer_share']:.1%}); "
                     f"decode step {_fmt_count(f_pat['decode']['total'])}FLOP, indexer "
                     f"{f_pat['decode']['indexer_share']:.1%} (all-Full {f_full['decode']['indexer_share']:.1%})")
    return lines


# --------------------------------------------------------------------------------------------- loss
def check_loss(args: argparse.Namespace) -> None:
    args.info = model_info_arg(args.model)
    model_weights(args.model)
    data_path(args.data)
    args.parsed = [pattern_arg(s, args.info, model=args.model) for s in args.pattern or []]
    _check_length(args.seq_len, args.info, "--seq-len")


def _check_length(n: int, info, option: str) -> None:
    if n > info.max_position_embeddings:
        raise OptionError(f"{option} {n} exceeds the model's max_position_embeddings {info.max_position_embeddings}")


def cmd_loss(args: argparse.Namespace) -> int:
    import math

    from .data import load_tokenizer, token_windows
    from .runner import open_model
    from .search.evaluator import lm_loss

    info = args.info
    opened = open_model(args.model, info, args.backend, scoring=args.scoring, verbose=not args.json)
    tok = None if args.data.endswith(".npy") else load_tokenizer(args.model)
    windows = token_windows(args.data, args.seq_len, tok, args.max_seqs, info.vocab_size)
    results = []
    for pat in args.parsed or [opened.start]:
        opened.runner.validate(pat)
        loss = lm_loss(opened.runner, windows, pat, args.batch_size, progress=not args.json, desc=str(pat))
        results.append({"pattern": str(pat), "num_full": pat.num_full, "loss": loss, "ppl": math.exp(loss)})
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "seq_len": args.seq_len,
                          "num_seqs": int(windows.shape[0]), "results": results}, indent=2))
        return 0
    print(f"{windows.shape[0]} sequences x {args.seq_len} tokens from {args.data} "
          f"(a query keeps {info.describe_selection()}; scoring {args.scoring}; {opened.backend} backend)")
    for r in results:
        print(f"{r['pattern']}  Full {r['num_full']:>3}  loss {r['loss']:.5f}  ppl {r['ppl']:.3f}")
    if args.seq_len <= info.first_restrictive_query:
        print(f"note: at --seq-len {args.seq_len} every query keeps all it sees ({info.describe_selection()}), so "
              "patterns cannot change the loss")
    return 0


# ------------------------------------------------------------------------------------------- search
BASELINES = ("uniform", "similarity")


def _calibration_checks(args: argparse.Namespace) -> None:
    from .search.run import default_seq_len

    info = args.info
    if args.data is not None:
        data_path(args.data)
    seq = args.seq_len or default_seq_len(info, args.device)
    _check_length(seq, info, "--seq-len" if args.seq_len else "the default --seq-len")
    info.check_calibration(seq)


def check_search(args: argparse.Namespace) -> None:
    from .runner import resolve_backend
    from .search.greedy import stage_starts

    args.info = info = model_info_arg(args.model)
    model_weights(args.model)
    n = info.num_slots
    resolve_backend(args.backend, info.spec.native, info.architecture, args.device_map, args.tp)
    if args.tp > 1:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % args.tp:
            raise OptionError(f"--tp {args.tp} needs torchrun with a multiple of {args.tp} processes "
                              f"(--nproc_per_node); this is {world} process{'es' if world > 1 else ''}")
        if args.device_map is not None:
            raise OptionError("--tp and --device-map are two ways of splitting the model: give one")
        info.check_tensor_parallel(args.tp)
    if args.keep is not None and args.num_full is not None:
        raise OptionError("give --keep or --num-full, not both")
    if args.num_full is not None and args.num_full > n:
        raise OptionError(f"--num-full {args.num_full} exceeds the model's {n} layers with an indexer")
    bad = [f for f in args.force_full if f >= n]
    if bad:
        raise OptionError(f"--force-full layer {bad[0]} is outside the model's {n} indexer layers (0-{n - 1}; "
                          f"{info.describe_slots()})")
    stage_starts(n, args.stages)
    names = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise OptionError(f"--baselines {args.baselines}: unknown baseline {unknown[0]!r} "
                          f"(give a comma list of {', '.join(BASELINES)}, or none)")
    args.baseline_list = names
    if args.ops == "triton":
        from .ops.backends import check_backend

        try:
            check_backend("triton", args.device)
        except (ValueError, RuntimeError) as e:
            raise OptionError(f"--ops triton: {e}") from None
    _calibration_checks(args)
    _out_dir(args, resume_file="search_state.json")


def cmd_search(args: argparse.Namespace) -> int:
    from .evals.runner import command_line
    from .search.run import SearchOptions, run_search

    opt = options_from_args(SearchOptions, args, baselines=args.baseline_list, command=command_line(args.argv))
    report = run_search(opt)
    if not report:  # not the main rank of a torchrun job
        return 0
    sel, c = report["selected"], report["counters"]
    print(f"\nall-Full loss {report['all_full_loss']:.5f} on {report['calibration']['num_samples']} x "
          f"{report['calibration']['seq_len']} tokens ({report['calibration']['source']})")
    print(f"selected {sel['num_full']}/{report['num_layers']} Full: {sel['pattern']}  loss {sel['loss']:.5f}")
    print(f"work: {c['layer_forwards']} layer-forwards = {c['ratio_vs_naive']:.3f}x a search without prefix reuse; "
          f"{report['seconds']:.1f} s")
    print(_exports_text(Pattern.parse(sel["pattern"]), model_info_arg(args.model, "MODEL")))
    print(f"\nwrote {args.out}/report.json, loss_curve.png, summary.md, config_patch.json, engine_flags.txt")
    print(next_steps(args, sel["pattern"]))
    return 0


def next_steps(args: argparse.Namespace, pattern: str) -> str:
    """What to do with a searched pattern, and the warning a synthetic calibration deserves."""
    lines = []
    if args.data is None:
        lines.append("note: this search calibrated on the built-in synthetic corpus, which is out of distribution "
                     "for a real model; for real decisions pass --data with text like the model's (and longer "
                     "--seq-len, more --num-samples).")
    given = f" {args.model}" if args.model_given else ""
    lines += [
        "next:",
        f"  check it on the long-context tasks:  indexcache eval{given} --pattern all-full --pattern {pattern} "
        "--out eval.json",
        f"  write a model that carries it:       indexcache export {args.model} --pattern {pattern} "
        "--out MODEL-indexcache",
    ]
    return "\n".join(lines)


def check_overlap(args: argparse.Namespace) -> None:
    from .runner import resolve_backend

    args.info = model_info_arg(args.model)
    model_weights(args.model)
    resolve_backend(args.backend, args.info.spec.native, args.info.architecture)
    args.parsed = pattern_arg(args.pattern, args.info)
    _calibration_checks(args)
    _out_dir(args)


def cmd_overlap(args: argparse.Namespace) -> int:
    import torch

    from .evals.runner import command_line
    from .search.run import run_overlap

    mat = run_overlap(args.model, args.out, args.data, args.num_samples, args.seq_len, args.seed, args.parsed,
                      args.device, overwrite=args.overwrite, command=command_line(args.argv), backend=args.backend,
                      dtype=getattr(torch, args.dtype), ops=args.ops, retrieval_mix=args.retrieval_mix)
    n = mat.shape[0]
    adj = sum(float(mat[i + 1, i]) for i in range(n - 1)) / max(n - 1, 1)
    print(f"{n}x{n} overlap over the indexer layers ({args.info.spec.unit}s): mean adjacent-layer overlap {adj:.3f}, "
          f"minimum {float(mat.min()):.3f}")
    print(f"wrote {args.out}/overlap.csv, overlap.png, overlap.json")
    return 0


# --------------------------------------------------------------------------------------------- eval
def check_eval(args: argparse.Namespace) -> None:
    from .evals.runner import parse_ppl_spec
    from .evals.tasks import parse_families
    from .runner import resolve_backend

    args.info = model_info_arg(args.model)
    model_weights(args.model)
    resolve_backend(args.backend, args.info.spec.native, args.info.architecture)
    args.parsed = [pattern_arg(s, args.info, model=args.model) for s in args.pattern or []]
    families = parse_families(args.tasks)
    if not families and not args.ppl_data:
        raise OptionError("--tasks none leaves nothing to evaluate: give --ppl-data too, or some task families")
    for L in args.lengths:
        _check_length(L, args.info, "--lengths")
    for spec in args.ppl_data:
        for p in parse_ppl_spec(spec)[1]:
            data_path(p, "--ppl-data")
    if families and args.haystack is not None and args.haystack != "noise":
        data_path(args.haystack, "--haystack")
    _out_file(args)
    partial = Path(f"{args.out}.partial")
    if partial.exists() and not args.resume and not args.overwrite:
        raise OptionError(f"--out {args.out}: {partial} holds the progress of a stopped evaluation; --resume "
                          "continues it (the same command), --overwrite starts over")


def _interruptible_by_sigterm(fn, *args):
    """``fn(*args)`` with SIGTERM (what ``timeout`` and job schedulers send) raised as KeyboardInterrupt, so
    that the run's own clean-up (the evaluation's progress file) happens as on Ctrl-C."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        return fn(*args)
    try:
        return fn(*args)
    finally:
        signal.signal(signal.SIGTERM, before)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evals.runner import EvalOptions, command_line, format_table, run_eval
    from .outputs import write_report

    partial = Path(f"{args.out}.partial")
    if not args.resume:
        partial.unlink(missing_ok=True)  # --overwrite: start over
    opt = options_from_args(EvalOptions, args, patterns=args.parsed or [None], draft=not args.no_draft,
                            progress=not args.quiet, command=command_line(args.argv), progress_file=str(partial))
    report = _interruptible_by_sigterm(run_eval, opt)
    write_report(Path(args.out), report)
    partial.unlink(missing_ok=True)  # the report holds all of it now
    print(format_table(report))
    print(f"\n{report['seconds']:.0f} s; wrote {args.out}")
    return 0


def options_from_args(cls, args: argparse.Namespace, **derived):
    """An options dataclass from the parsed flags: every field takes the flag of its own name, unless the
    command derives it (``derived``); a field with neither keeps its default. ``tests/test_cli.py`` checks
    that flags and fields agree in name and default, so no option is written twice."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(cls):
        if f.name in derived:
            values[f.name] = derived[f.name]
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


# flags that do not map one to one onto a field of the command's options (or that no options object takes)
CLI_ONLY = {
    "search": {"baselines": "parsed into a list of names"},
    "eval": {"pattern": "parsed into patterns", "no_draft": "draft", "quiet": "progress", "out": "the report file",
             "overwrite": "checked before the run"},
    "train": {"no_cross_layer": "cross_layer", "time_limit_min": "time_limit_s"},
}
COMMON_DESTS = {"cmd", "func", "argv"}


def _add_calibration_args(p: argparse.ArgumentParser, out: str) -> None:
    """MODEL, the output directory and the calibration windows: what search and overlap share."""
    p.add_argument("model", nargs="?", help="model directory (default: the bundled models/dsa-mini)")
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    _add_overwrite(p)
    p.add_argument("--data", help="text file, directory of .txt(.xz), .jsonl, or token-id .npy "
                   "(default: the built-in synthetic corpus, tokenized with the model's tokenizer)")
    p.add_argument("--retrieval-mix", type=retrieval_share, default=None, metavar="D",
                   help="splice retrieval episodes (facts asked for later, repeats, tables, chains) into the "
                   "calibration text until about D of each window is structured; 0.5 kept the bundled model's "
                   "tasks where plain books did not (docs/results.md)")
    p.add_argument("--num-samples", type=positive_int, default=4,
                   help="calibration sequences (default 4: a small, fast default; use more for a real model)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per sequence (default: 16384 on a GPU, or the model's longest window if shorter, "
                   "since long calibration kept the tasks at long context where 1K did not (docs/results.md); "
                   "max(2*index_topk, 512) on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def _add_backend(p: argparse.ArgumentParser, ops: bool = True) -> None:
    p.add_argument("--backend", choices=["auto", "native", "hf"], default="auto",
                   help="native: this package's model (DeepSeek-V3.2, GLM-5.x); hf: the model's transformers class "
                   "with the pattern applied; auto (default): native where it covers the architecture, else hf")
    if ops:
        p.add_argument("--ops", choices=["auto", "torch", "triton"], default="auto",
                       help="native backend: plain PyTorch ops, the Triton kernels, or auto (the kernels on CUDA)")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of indexcache at --out (never anything else)")


# ------------------------------------------------------------------------------------------- export
def check_export(args: argparse.Namespace) -> None:
    args.info = model_info_arg(args.model)
    model_weights(args.model)
    args.parsed = pattern_arg(args.pattern, args.info, model=args.model)
    _out_dir(args)


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .architectures import exports_text
    from .checkpoint import export_checkpoint, load_model, save_model
    from .evals.runner import command_line

    info, pat = args.info, args.parsed
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

    def engine_flags(tmp: Path) -> None:
        (tmp / "engine_flags.txt").write_text(
            f"# pattern {pat} ({pat.num_full}/{info.num_slots} Full; per decoder layer {info.decoder_form(pat)})\n"
            + exports_text(info, pat).lstrip("\n") + "\n")

    common = dict(drop_shared_indexers=args.drop_shared_indexers, overwrite=args.overwrite, extra=engine_flags,
                  command=command_line(args.argv))
    if info.spec.native:  # through this package's model: the weights as transformers writes them
        own = info.raw.get("dtype") or info.raw.get("torch_dtype") or "float32"
        dtype = names.get(own if args.dtype == "keep" else args.dtype, torch.float32)
        model = load_model(args.model, pattern=pat, verbose=False)  # fp32 in memory: nothing is lost
        out = save_model(model, args.out, pattern=pat, dtype=dtype, copy_tokenizer_from=args.model, **common)
    else:  # the files themselves, with the config patch
        out = export_checkpoint(args.model, args.out, info, pat, dtype=names.get(args.dtype), **common)
    print(pat.describe_text() + _exports_text(pat, info))
    dropped = "; Shared layers' indexer weights dropped" if args.drop_shared_indexers else ""
    keys = ", ".join(info.config_patch(pat))
    print(f"\nwrote {out}: config.json carries {keys}{dropped}; engine_flags.txt")
    return 0


# -------------------------------------------------------------------------------------------- train
def check_train(args: argparse.Namespace) -> None:
    data_path(args.data)
    if args.stage != "dense" and args.init is None:
        raise OptionError(f"--stage {args.stage} continues a trained model: give --init MODEL_DIR")
    if args.init is not None:
        info = model_info_arg(args.init, "--init")
        if not info.spec.native:
            raise OptionError(f"--init {args.init} is {info.architecture}: training runs this package's own model "
                              "(DeepSeek-V3.2 and GLM-5.x shapes)")
        model_weights(args.init, "--init")
        pattern_arg(args.pattern, info)
        _check_length(args.seq_len, info, "--seq-len")
    elif args.pattern is not None:
        raise OptionError("--pattern trains a model for sharing in the warmup and sparse stages: give --init too")
    if args.token_cache is not None and not Path(args.token_cache).is_file():
        raise OptionError(f"--token-cache {args.token_cache} does not exist; give an earlier run's tokens.npz")
    if args.micro_batch is not None and args.micro_batch > args.batch_size:
        raise OptionError(f"--micro-batch {args.micro_batch} exceeds --batch-size {args.batch_size}")
    if args.synthetic_kinds:
        from .data.text import DataError
        from .train.retrieval import kind_weights

        try:
            kind_weights([k for k in args.synthetic_kinds.split(",") if k])
        except DataError as e:
            raise OptionError(f"--synthetic-kinds: {e}") from None
    _out_dir(args, resume_file="state.pt")


def cmd_train(args: argparse.Namespace) -> int:
    from .evals.runner import command_line
    from .train import TrainConfig, train

    cfg = options_from_args(TrainConfig, args, cross_layer=not args.no_cross_layer,
                            time_limit_s=args.time_limit_min and args.time_limit_min * 60,
                            command=command_line(args.argv))
    summary = train(cfg)
    if "stopped_at" in summary:
        print(f"stopped at step {summary['stopped_at']}/{summary['steps']}; continue with --resume")
        return 0
    e = summary["final_eval"]
    print(f"{cfg.stage}: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['seconds']:.0f} s; "
          f"held-out LM loss {e['heldout_lm_loss']:.4f}" + (f", indexer KL {e['heldout_indexer_kl']:.4f}"
                                                            if "heldout_indexer_kl" in e else "")
          + (f"; retrieval answers {e['heldout_answer_acc']:.1%} right" if "heldout_answer_acc" in e else "")
          + (f" ({e['heldout_answer_acc_new']:.1%} on the later kinds)" if "heldout_answer_acc_new" in e else ""))
    if "indexer_recall" in summary:
        r = summary["indexer_recall"]
        print(f"indexer recall (attention mass inside the top-{r['index_topk']}): mean {r['mean_recall']:.3f} "
              f"vs {r['random_baseline']:.3f} for random selection")
    print(f"wrote {cfg.out}/model, losses.json, losses.png, summary.json")
    return 0


# ------------------------------------------------------------------------------------- bench
def check_bench(args: argparse.Namespace) -> None:
    if args.what == "kernels":
        from .bench.kernels import PARTS

        unknown = [p for p in args.parts.split(",") if p not in PARTS]
        if unknown:
            raise OptionError(f"--parts: unknown kernel group {unknown[0]!r} (choose from {', '.join(PARTS)})")
    if args.pattern and args.model is None:
        raise OptionError("--pattern times a checkpoint's patterns: give --model too")
    if args.fused_from is not None and args.what != "e2e":
        raise OptionError("--fused-from is for bench e2e")
    if args.profile and args.what != "e2e":
        raise OptionError("--profile is for bench e2e")
    if args.select_budget_mb is not None and args.what != "e2e":
        raise OptionError("--select-budget-mb is for bench e2e")
    if args.dtype is not None and args.model is None:
        raise OptionError("--dtype sets a checkpoint's dtype in bench e2e: give --model too")
    if args.model is not None:
        if args.what != "e2e":
            raise OptionError("--model is for bench e2e")
        info = model_info_arg(args.model)
        if not info.spec.native:
            raise OptionError(f"bench e2e runs this package's engine, which does not cover {info.architecture}")
        model_weights(args.model)
        for spec in args.pattern or []:
            pattern_arg(spec, info)
    _out_file(args)


E2E_PATTERNS = {"full": "all-Full", "1/2": "uniform 1/2", "1/4": "uniform 1/4"}


def e2e_patterns(text: str) -> str:
    bad = [n for n in text.split(",") if n not in E2E_PATTERNS]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"unknown pattern name {', '.join(bad) or repr(text)}: choose from "
                                         f"{', '.join(E2E_PATTERNS)}, comma-separated")
    return text


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from .bench.kernels import run as run_kernels

        run_kernels(args.out, parts=tuple(args.parts.split(",")))
        return 0
    from .bench.e2e import run as run_e2e

    run_e2e(args.out, args.contexts, experts=args.experts, layers=args.layers, chunk=args.chunk,
            decode_steps=args.decode_steps, large_batch=args.large_batch, model_dir=args.model,
            patterns=[E2E_PATTERNS[n] for n in args.patterns.split(",")] if args.patterns else None,
            pattern_specs=args.pattern, fused_from=args.fused_from, dtype=args.dtype or "bfloat16",
            repeats=args.repeats, profile=args.profile, select_budget_mb=args.select_budget_mb)
    return 0


# ------------------------------------------------------------------------------------- generate
def check_generate(args: argparse.Namespace) -> None:
    from .data.text import decode_text, load_tokenizer

    args.info = model_info_arg(args.model)
    if not args.info.spec.native:
        raise OptionError(f"generate runs this package's engine, which covers DeepSeek-V3.2 and GLM-5.x, not "
                          f"{args.info.architecture}: use transformers' generate after "
                          "indexcache.integrations.transformers.load_pretrained (eval does)")
    model_weights(args.model)
    args.parsed = pattern_arg(args.pattern, args.info)
    p = Path(args.prompt_file)
    if not p.is_file():
        raise OptionError(f"--prompt-file {args.prompt_file} " + ("is a directory; give a text file" if p.is_dir()
                                                                 else "does not exist; give a UTF-8 text file"))
    text = decode_text(p.read_bytes(), f"--prompt-file {args.prompt_file}")
    args.prompt_ids = load_tokenizer(args.model).encode(text).ids
    if not args.prompt_ids:
        raise OptionError(f"--prompt-file {args.prompt_file} tokenizes to nothing; give a non-empty prompt")
    need = len(args.prompt_ids) + args.max_new_tokens
    limit = args.info.max_position_embeddings
    if need > limit:
        raise OptionError(f"--prompt-file holds {len(args.prompt_ids):,} tokens; with --max-new-tokens "
                          f"{args.max_new_tokens} that is {need:,}, beyond the model's max_position_embeddings "
                          f"{limit:,}: shorten the prompt")
    if args.max_len is not None and args.max_len < need:
        raise OptionError(f"--max-len {args.max_len} is shorter than the prompt plus --max-new-tokens ({need})")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .data.text import load_tokenizer
    from .engine import Engine

    tok = load_tokenizer(args.model)
    ids = args.prompt_ids
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    # the engine decodes under CUDA graphs, which the FP8 layers are not yet checked in: FP8 is dequantised
    model = load_model(args.model, dtype=dtype, device=args.device, verbose=False, keep_fp8=False)
    max_len = args.max_len or len(ids) + args.max_new_tokens
    eng = Engine(model, args.parsed, max_batch=1, max_len=max_len, chunk=args.chunk)
    eos = model.config.raw.get("eos_token_id")
    eos = eos if isinstance(eos, int) else None
    out: list[int] = []
    shown = ""

    def stream(step: int, new: torch.Tensor) -> None:
        nonlocal shown
        out.append(int(new[0]))
        full = tok.decode(out)
        print(full[len(shown):], end="", flush=True)
        shown = full

    eng.generate([torch.tensor(ids)], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, top_k=args.top_k, eos_token_id=eos, seed=args.seed, on_token=stream)
    print()
    return 0


# ------------------------------------------------------------------------------------- random-model
def check_random_model(args: argparse.Namespace) -> None:
    from .presets import PRESETS

    if args.pattern is not None:
        args.parsed = parse_spec(args.pattern, PRESETS[args.preset]["num_hidden_layers"])
    else:
        args.parsed = None
    _out_dir(args)


def cmd_random_model(args: argparse.Namespace) -> int:
    from .evals.runner import command_line
    from .presets import make_random_checkpoint

    out = make_random_checkpoint(args.out, args.arch, args.preset, args.seed, args.parsed, overwrite=args.overwrite,
                                 command=command_line(args.argv), fp8=args.fp8)
    kind = "block-FP8 " if args.fp8 else ""
    print(f"wrote a random {kind}{args.arch} ({args.preset}) checkpoint with a byte-level tokenizer to {out}")
    return 0


# --------------------------------------------------------------------------------------------- main
def check_plan(args: argparse.Namespace) -> None:
    from .architectures import model_info

    p = Path(args.model)
    if p.is_dir():
        args.info = model_info_arg(args.model)
    elif p.is_file() and p.suffix == ".json":
        args.info = model_info(p)  # a config.json alone is enough: the plan reads no weights
    else:
        raise OptionError(f"MODEL {args.model} is neither a model directory nor a config.json")
    if args.seq_len is None:  # 32K, or the model's longest window if that is shorter
        args.seq_len = min(32768, args.info.max_position_embeddings)
    args.info.check_calibration(args.seq_len)
    _check_length(args.seq_len, args.info, "--seq-len")
    if args.num_full is not None and args.num_full > args.info.num_slots:  # --keep and --num-full: exclusive
        raise OptionError(f"--num-full {args.num_full} is more than the {args.info.num_slots} layers with an indexer")
    if args.probe and not str(args.device or "cuda").startswith("cuda") and not args.allow_cpu_probe:
        raise OptionError("--probe times the layers on this machine's GPU: give --device cuda (or "
                          "--allow-cpu-probe for a CPU timing)")
    if args.data is not None:
        if not args.probe:
            raise OptionError("--data gives the probe its tokens: it needs --probe")
        data_path(args.data)
    if args.out is not None:
        _out_file(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from .outputs import write_report
    from .plan import format_plan, make_plan

    plan = make_plan(args.model, args.seq_len, args.num_samples, args.num_full, args.keep, args.gpus,
                     args.gpu_memory_gib, args.flips, args.probe, args.device or "cuda", args.backend, args.data)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(format_plan(plan))
    if args.out is not None:
        write_report(Path(args.out), {**plan.as_dict(), "command": "indexcache " + " ".join(args.argv)})
        print(f"wrote {args.out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


PREFLIGHT = {
    "pattern": check_pattern, "info": check_info, "loss": check_loss, "search": check_search,
    "overlap": check_overlap, "eval": check_eval, "export": check_export, "train": check_train,
    "bench": check_bench, "generate": check_generate, "random-model": check_random_model, "plan": check_plan,
}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="indexcache", description="IndexCache tools for DSA models")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pattern", help="parse, build, validate and export a layer pattern")
    p.add_argument("pattern", nargs="?", help=f"the pattern: {SPEC_FORMS}")
    p.add_argument("--num-layers", type=positive_int, help="number of layers that own an indexer (every decoder "
                   "layer of DeepSeek-V3.2 and GLM-5.x)")
    p.add_argument("--model", help="a model directory: its layer count, its own pattern, its indexer weights")
    p.add_argument("--freq", type=positive_int, help="build a uniform pattern with this frequency")
    p.add_argument("--convention", default="official", choices=list(CONVENTIONS),
                   help="how freq/offset map to layers (default: official)")
    p.add_argument("--offset", type=nonneg_int, help="offset for --convention transformers (default 2)")
    p.add_argument("--stage-starts", type=layer_list, help="comma-separated first layers of pipeline stages "
                   "(must be Full)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pattern)

    p = sub.add_parser("info", help="architecture, pattern, parameters and indexer FLOP share")
    p.add_argument("model", nargs="?", help="model directory (default: the bundled models/dsa-mini)")
    p.add_argument("--pattern", help="pattern to analyse instead of the checkpoint's own")
    p.add_argument("--context", type=token_count, nargs="+", default=[10_000, 60_000, 120_000, 200_000],
                   help="context lengths in tokens (8192 or 8K)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="memory per GPU and wall time of a search, before running it")
    p.add_argument("model", help="model directory, or only its config.json")
    p.add_argument("--seq-len", type=token_count, help="calibration tokens per sequence (default 32768, or the "
                   "model's max_position_embeddings if less)")
    p.add_argument("--num-samples", type=positive_int, default=4, help="calibration sequences (default 4)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep", type=fraction, help="fraction of indexer layers kept Full (default 0.25)")
    g.add_argument("--num-full", type=positive_int, help="Full layers to search down to")
    p.add_argument("--flips", type=positive_int, help="only the first F greedy steps (default: the whole search)")
    p.add_argument("--gpus", type=positive_int, default=1, help="GPUs on the node (default 1)")
    p.add_argument("--gpu-memory-gib", type=positive_float,
                   help="memory of one GPU (default: this machine's GPU, else 139 for an H200)")
    p.add_argument("--probe", action="store_true",
                   help="time one or two random layers of each kind on this GPU instead of using the committed table")
    p.add_argument("--data", help="with --probe: text whose tokens the probe runs (the calibration data; default "
                   "random tokens). The top-k's cost depends on how the index scores spread")
    p.add_argument("--allow-cpu-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", help="device of the probe (default cuda)")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "hf"],
                   help="which runner the search would use (default auto)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", help="also write the plan as a JSON report")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier plan report at --out")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("loss", help="mean LM loss on a text/jsonl/.npy file, per pattern")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="text file, directory of .txt, .jsonl, or token-id .npy")
    p.add_argument("--pattern", action="append", help="pattern(s) to compare (repeatable; default: the model's)")
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--max-seqs", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--scoring", choices=["exact", "fp8"], default="exact")
    _add_backend(p, ops=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_loss)

    p = sub.add_parser("search", help="greedy IndexCache layer search (training-free) with baselines")
    _add_calibration_args(p, "runs/search")
    p.add_argument("--keep", type=fraction, help="fraction of indexers to keep, in (0, 1] (default 0.25)")
    p.add_argument("--num-full", type=positive_int, help="number of Full layers to keep")
    p.add_argument("--to-end", action="store_true", help="continue the trajectory to the end (still selects --keep)")
    p.add_argument("--stages", type=positive_int, default=1, help="pipeline blocks: their first layers stay Full, "
                   "one flip per block per step")
    p.add_argument("--force-full", type=layer_list, default=[], help="comma-separated layers that must stay Full")
    p.add_argument("--baselines", default="uniform,similarity", help="uniform,similarity or none")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from OUT/search_state.json")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--scoring", choices=["exact", "fp8"], default="exact")
    p.add_argument("--cache-gb", type=auto_or_positive_float, default=None,
                   help="device memory for cached prefix states (GiB, > 0; default auto: a quarter of the GPU's "
                        "free memory once the model is loaded, at least 2; 2 on CPU)")
    p.add_argument("--host-cache-gb", type=nonneg_float, default=None,
                   help="host memory for prefix states pushed out of --cache-gb (GiB; default: half the available "
                        "host memory, at most 64; 0: none; not used on CPU, where --cache-gb is host memory)")
    _add_backend(p)
    p.add_argument("--tp", type=positive_int, default=1,
                   help="under torchrun: ranks per model, sharded by transformers' tensor-parallel plan (--backend "
                        "hf); the candidates are split across the WORLD_SIZE/tp model replicas (default 1)")
    p.add_argument("--device-map", help="with --backend hf: transformers device_map to spread the model over "
                   "devices (auto, balanced, a device, a JSON object or a .json file of module -> device)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("overlap", help="cross-layer top-k overlap of the all-Full model (csv + heatmap)")
    _add_calibration_args(p, "runs/overlap")
    _add_backend(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--pattern", help="draw this pattern's sharing blocks on the heatmap")
    p.set_defaults(func=cmd_overlap)

    p = sub.add_parser("eval", help="long-context tasks (RULER-style, passkey, MQAR) and perplexity, per pattern")
    p.add_argument("model", nargs="?", help="model directory (default: the bundled models/dsa-mini)")
    p.add_argument("--pattern", action="append", help="pattern(s) to compare, one row each (repeatable; "
                   "default: the model's own)")
    p.add_argument("--tasks", nargs="+", help="task families, space- or comma-separated: all (default), none, niah, "
                   "niah_single, niah_multikey, niah_multivalue, niah_multiquery, passkey, vt, cwe, fwe, mqar")
    p.add_argument("--lengths", type=token_count, nargs="+", default=[1024],
                   help="context lengths in tokens of the model's tokenizer (default 1024; 4096 or 4K)")
    p.add_argument("--samples", type=positive_int, default=10, help="samples per task and length (default 10)")
    p.add_argument("--haystack", help="filler text: a text file or directory of books, or 'noise' "
                   "(default: the built-in synthetic corpus)")
    p.add_argument("--ppl-data", nargs="+", default=[], metavar="[NAME=]PATH[,PATH]",
                   help="perplexity data sets (text files, directories, .jsonl, .npy), measured at each length")
    p.add_argument("--ppl-windows", type=positive_int, default=4,
                   help="perplexity windows per data set and length, evenly spaced (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--decode", default="cache", choices=["cache", "recompute"],
                   help="cache: the engine's latent/indexer caches (default); recompute: a full forward per step")
    p.add_argument("--fp32-dot", default="ieee", choices=["ieee", "tf32x3"], help="float32 on a GPU: how the "
                   "Triton kernels multiply (ieee: exact fp32, default; tf32x3: three tensor-core tf32 products, "
                   "about 2^-21 relative error per product, on the tensor cores)")
    p.add_argument("--no-draft", action="store_true",
                   help="with --decode recompute: one token per forward instead of verifying context drafts")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--diagnose", action="store_true", help="also, per sample: each layer's share of the answer's "
                   "tokens in its selection at the answer row, and the teacher-forced answer (one more forward)")
    _add_backend(p)
    p.add_argument("--out", required=True, help="JSON report to write (its progress is kept in OUT.partial while "
                   "it runs, rewritten every 15 s and when the run is stopped)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run of the same evaluation from "
                   "OUT.partial (its scored samples and perplexities are kept, the rest is run)")
    _add_overwrite(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a model directory that carries a pattern, plus engine flags")
    p.add_argument("model")
    p.add_argument("--pattern", required=True, help=f"the pattern: {SPEC_FORMS}")
    p.add_argument("--out", required=True, help="the model directory to write (new, or one indexcache wrote)")
    _add_overwrite(p)
    p.add_argument("--drop-shared-indexers", action="store_true",
                   help="leave out the indexer weights of Shared layers (GLM-5.2 style)")
    p.add_argument("--dtype", default="keep", choices=["keep", "bfloat16", "float16", "float32"],
                   help="weights dtype on disk (default: the checkpoint's own)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="train a small DSA model: dense pretraining, indexer warm-up, sparse stage")
    p.add_argument("out", help="the run's directory (new, or one indexcache wrote)")
    _add_overwrite(p)
    p.add_argument("--stage", required=True, choices=["dense", "warmup", "sparse"])
    p.add_argument("--data", required=True, help="directory of .txt/.txt.xz books, a text file, or a .jsonl")
    p.add_argument("--init", help="model directory to start from (required for warmup and sparse)")
    p.add_argument("--preset", default="mini", choices=["tiny", "small", "mini"],
                   help="architecture preset for --stage dense (default mini)")
    p.add_argument("--heldout", type=nonneg_int, default=3, help="whole files (books) held out for evaluation")
    p.add_argument("--vocab-size", type=positive_int, default=8192, help="BPE vocabulary trained for --stage dense")
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--micro-batch", type=positive_int, help="micro-batch size (gradient accumulation) to bound memory")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--indexer-lr", type=positive_float, help="learning rate of the indexers in the sparse stage")
    p.add_argument("--warmup-steps", type=nonneg_int, default=50)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.1)
    p.add_argument("--indexer-loss-weight", type=nonneg_float, default=1.0)
    p.add_argument("--pattern", help="training-aware IndexCache: the pattern to train for (e.g. uniform:4)")
    p.add_argument("--no-cross-layer", action="store_true", help="ablation: distil each indexer on its own layer")
    p.add_argument("--synthetic-mix", type=share, default=0.0,
                   help="share of each batch replaced by synthetic retrieval windows, in [0, 1]")
    p.add_argument("--synthetic-kinds",
                   help="comma-separated episode kinds: fact,repeat,listing,chain,tally,echo,secret,group,roster,"
                        "track,rank (default all), each optionally with a relative weight (secret:1,fact,repeat)")
    p.add_argument("--kl-rows", type=nonneg_int, default=0,
                   help="warm-up and sparse stages: the indexer loss on this many random query rows of each sequence "
                        "(an unbiased sample; 0 = all). At 16K tokens, 2048 rows score an eighth of the dense targets")
    p.add_argument("--synthetic-density", type=fraction,
                   help="structured share of a synthetic window, in (0, 1] (default 0.15-0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-every", type=positive_int, default=200)
    p.add_argument("--save-every", type=positive_int, default=200)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=positive_int, help="save and stop at this step (continue with --resume)")
    p.add_argument("--time-limit-min", type=positive_float, help="save and stop after this many minutes")
    p.add_argument("--selection-kernels", action="store_true", help="sparse stage on a GPU: select the top-k on the "
                   "Triton kernels (off by default: slower than the plain ops at 16K tokens on an H200)")
    p.add_argument("--shard-mb", type=positive_int, default=4096, help="safetensors shard size of the saved model")
    p.add_argument("--token-cache", help="an earlier run's tokens.npz to reuse when it matches this run's tokenizer "
                   "and books (saves tokenizing them again)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="GPU benchmarks that print tables and write JSON")
    p.add_argument("what", choices=["kernels", "e2e"],
                   help="kernels: ceilings, then each Triton kernel at anchor shapes; e2e: engine prefill/decode")
    p.add_argument("--out", required=True, help="JSON file to write")
    _add_overwrite(p)
    p.add_argument("--parts", default="indexer,topk,sparse_mla", help="comma list of kernel groups (kernels): "
                   "indexer, topk, sparse_mla, fp8_gemm, moe, fused, topk_engine (top-k on the engine's own logits)")
    p.add_argument("--contexts", type=token_counts, default=[10_000, 60_000, 120_000, 200_000],
                   help="context lengths, comma-separated (e2e; default 10K,60K,120K,200K)")
    p.add_argument("--experts", type=positive_int, default=16, help="routed experts (e2e; the real model has 64)")
    p.add_argument("--layers", type=positive_int, default=47, help="decoder layers (e2e)")
    p.add_argument("--chunk", type=positive_int, default=8192, help="prefill chunk (e2e)")
    p.add_argument("--decode-steps", type=positive_int, default=32, help="timed decode steps (e2e)")
    p.add_argument("--large-batch", type=positive_int, default=8, help="the larger decode batch (e2e)")
    p.add_argument("--model", help="e2e on this checkpoint instead of the random GLM-4.7-Flash shape")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="prefills timed per row, median reported (e2e; default 3 with --model, else 1)")
    p.add_argument("--pattern", action="append", help="with --model: a pattern to time beside all Full "
                   "(repeatable; any pattern form)")
    p.add_argument("--patterns", type=e2e_patterns, default=None, help="e2e on the random shape: which of "
                   f"{','.join(E2E_PATTERNS)} to time, comma-separated (default: all)")
    p.add_argument("--fused-from", type=positive_int, default=None, help="e2e: prefill chunks whose windows "
                   "reach this many keys select through the fused indexer + top-k (default: never)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="with --model: the dtype the checkpoint runs in (default bfloat16; float32 is what "
                        "indexcache eval runs by default)")
    p.add_argument("--profile", action="store_true", help="e2e: one more prefill per row under torch.profiler, "
                   "its longest GPU kernels kept in the JSON (use few --layers at long contexts)")
    p.add_argument("--select-budget-mb", type=positive_ints, default=None, help="e2e: MB of indexer logits per "
                   "piece of a prefill chunk (default 256: about 160 query rows a piece at 200K keys); several, "
                   "comma-separated, time each pattern under each in one process")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="generate text with the engine (chunked prefill, cached decode)")
    p.add_argument("model", help="model directory (with its tokenizer)")
    p.add_argument("--prompt-file", required=True, help="a UTF-8 text file holding the prompt")
    p.add_argument("--pattern", default=None, help="IndexCache pattern (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (>= 0)")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk", type=positive_int, default=4096, help="prefill chunk")
    p.add_argument("--max-len", type=positive_int, default=None, help="cache length (default: prompt + new)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("random-model", help="write a random DSA checkpoint (demos and tests)")
    p.add_argument("out")
    _add_overwrite(p)
    p.add_argument("--arch", default="glm_moe_dsa", choices=["glm_moe_dsa", "deepseek_v32"])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pattern", help="pattern to write into config.json")
    p.add_argument("--fp8", action="store_true", help="store the projections and experts block-FP8 (e4m3, one "
                   "scale per 128 x 128 block), as DeepSeek's checkpoints do")
    p.set_defaults(func=cmd_random_model)
    return ap


def default_model() -> str | None:
    """The bundled trained model (package data)."""
    from .bundled import default_model as bundled

    return bundled()


def _decoder_form_tokens(argv: list[str]) -> list[str]:
    """A per-decoder-layer pattern that starts with '-' (a first layer without an indexer) would read as an
    option: such tokens (only '-', 'F' and 'S', at least one F/S; no option is spelled so) pass as '.'-form."""
    from .architectures import NONE, NONE_ALIAS

    return [t.replace(NONE, NONE_ALIAS) if t.startswith(NONE) and set(t.upper()) <= {"F", "S", NONE}
            and set(t.upper()) & {"F", "S"} else t for t in argv]


def main(argv: list[str] | None = None) -> int:
    code = run_command(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose work is written and whose process group is destroyed: leave without the
        # interpreter's finalisation, where gloo's worker threads can still be torn down after Python
        # (now and then a SIGABRT, "terminate called without an active exception", after a finished run).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_command(argv: list[str] | None = None) -> int:
    """One command line, its exit status returned (0, 2 for bad input, 130 when interrupted)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(_decoder_form_tokens(raw))
    except SystemExit as e:  # a bad option (one line already printed) or --help
        return e.code if isinstance(e.code, int) else 2
    args.argv = raw  # reports record their exact command line
    prog = f"indexcache {args.cmd}"
    if args.cmd == "generate" and args.device is None:
        args.device = "cuda" if _cuda() else "cpu"
    device = getattr(args, "device", "cpu") or "cpu"
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"{prog}: error: --device {device} but no CUDA device is available", file=sys.stderr)
            return 2
    args.model_given = getattr(args, "model", None) is not None
    if args.cmd in ("search", "overlap", "info", "eval") and args.model is None:
        args.model = default_model()
        if args.model is None:
            print(f"{prog}: error: give a MODEL directory: this installation carries no bundled model (it ships "
                  "with the package as indexcache/bundled/dsa-mini; reinstall from the repository)", file=sys.stderr)
            return 2
    try:
        PREFLIGHT[args.cmd](args)  # every option and file checked before any model or data loads
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (IndexCacheError, ValueError) as e:  # ValueError: the library's own checks of its arguments
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else still gets one line; INDEXCACHE_DEBUG=1 shows the traceback
        if os.environ.get("INDEXCACHE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{prog}: error: {type(e).__name__}: {msg} (INDEXCACHE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["build_parser", "main"]
