"""``indexcache`` command line. Errors are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .pattern import CONVENTIONS, Pattern, PatternError, parse_spec


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _print_exports(p: Pattern) -> None:
    print("\nconfig.json patch (transformers):")
    print("  " + json.dumps(p.config_patch()))
    flags = p.engine_flags()
    print("SGLang:")
    print("  " + flags["sglang"])
    print("vLLM:")
    print("  " + flags["vllm"])


# ------------------------------------------------------------------------------------------ pattern
def cmd_pattern(args: argparse.Namespace) -> int:
    indexer_layers = None
    n = args.num_layers
    if args.model:
        from .checkpoint import TensorSource, checkpoint_indexer_layers
        from .config import DSAConfig

        cfg = DSAConfig.from_file(args.model)
        n = cfg.num_hidden_layers
        indexer_layers = checkpoint_indexer_layers(TensorSource(args.model).names(), n)
    if args.freq is None and (args.offset is not None or args.convention != "official"):
        raise PatternError("--convention and --offset describe a uniform pattern: give --freq too")
    if args.freq is not None:
        if n is None:
            raise PatternError("--freq needs --num-layers or --model")
        p = Pattern.uniform(n, args.freq, args.convention, args.offset)
    elif args.pattern:
        p = parse_spec(args.pattern, n) if n is not None else Pattern.parse(args.pattern)
    elif args.model:
        p = cfg.pattern
        p.origin = cfg.pattern_source
    else:
        raise PatternError("give a PATTERN, --freq with --num-layers, or --model")
    stages = [int(x) for x in args.stage_starts.split(",")] if args.stage_starts else None
    p.validate(num_layers=n, stage_starts=stages, indexer_layers=indexer_layers)
    if args.json:
        print(json.dumps(dict(p.describe(), uniform_matches=p.match_uniform(), config_patch=p.config_patch(),
                              sglang=p.sglang_override(), vllm=p.vllm_override()), indent=2))
        return 0
    print(p.describe_text())
    matches = p.match_uniform()
    print(f"uniform   {', '.join(matches) if matches else 'no uniform freq/offset reproduces it'}")
    if indexer_layers is not None and len(indexer_layers) < n:
        print(f"note      the checkpoint ships indexer weights only on {len(indexer_layers)} layers; "
              "only those can be Full")
    _print_exports(p)
    return 0


# --------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import TensorSource, checkpoint_indexer_layers
    from .config import DSAConfig
    from .stats import count_parameters, flops

    cfg = DSAConfig.from_file(args.model)
    pat = parse_spec(args.pattern, cfg.num_hidden_layers) if args.pattern else cfg.pattern
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    src = TensorSource(args.model)
    shipped = checkpoint_indexer_layers(src.names(), cfg.num_hidden_layers)
    pat.validate(indexer_layers=shipped)
    print(f"model        {args.model}")
    print(f"architecture {cfg.architecture} ({cfg.arch})")
    print(f"layers       {cfg.num_hidden_layers} ({cfg.num_hidden_layers - n_moe} dense MLP, {n_moe} MoE"
          + (f", +{cfg.num_mtp_layers} MTP ignored" if cfg.num_mtp_layers else "") + ")")
    print(f"hidden       {cfg.hidden_size}, {cfg.num_attention_heads} heads, q_lora {cfg.q_lora_rank}, "
          f"kv_lora {cfg.kv_lora_rank}, qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, v {cfg.v_head_dim}")
    if n_moe:
        print(f"moe          {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} "
              f"(groups {cfg.n_group}, top groups {cfg.topk_group}) + {cfg.n_shared_experts} shared, "
              f"inter {cfg.moe_intermediate_size}")
    rope = "interleaved" if cfg.indexer_rope_interleave else "half-split"
    print(f"indexer      {cfg.index_n_heads} heads x {cfg.index_head_dim}, top-{cfg.index_topk}, {rope} RoPE; "
          f"weights on {len(shipped)}/{cfg.num_hidden_layers} layers")
    print(f"rope         {cfg.rope.rope_type} theta={cfg.rope.theta:g}"
          + (f" factor={cfg.rope.factor:g}" if cfg.rope.rope_type != "default" else ""))
    print(f"pattern      {pat}  ({pat.num_full} Full; {'given' if args.pattern else cfg.pattern_source})")
    counts = count_parameters(cfg, {n: src.shape(n) for n in src.names()}, pat)
    parts = ", ".join(f"{k} {_fmt_count(v)}" for k, v in counts.items() if k not in ("total", "active_per_token") and v)
    print(f"parameters   {_fmt_count(counts['total'])} total, {_fmt_count(counts['active_per_token'])} "
          f"active per token ({parts}; read from the checkpoint headers)")
    for L in args.context:
        f_pat, f_full = flops(cfg, L, pat), flops(cfg, L, Pattern.all_full(cfg.num_hidden_layers))
        print(f"context {L:>7}: prefill {_fmt_count(f_pat['prefill']['total'])}FLOP, indexer "
              f"{f_pat['prefill']['indexer_share']:.1%} (all-Full {f_full['prefill']['indexer_share']:.1%}); "
              f"decode step {_fmt_count(f_pat['decode']['total'])}FLOP, indexer "
              f"{f_pat['decode']['indexer_share']:.1%} (all-Full {f_full['decode']['indexer_share']:.1%})")
    return 0


# --------------------------------------------------------------------------------------------- loss
def cmd_loss(args: argparse.Namespace) -> int:
    import math

    from .checkpoint import load_model
    from .data import load_tokenizer, token_windows
    from .lm import lm_loss

    model = load_model(args.model, scoring=args.scoring, verbose=not args.json)
    tok = None if args.data.endswith(".npy") else load_tokenizer(args.model)
    windows = token_windows(args.data, args.seq_len, tok, args.max_seqs, model.config.vocab_size)
    results = []
    for spec in args.pattern or [None]:
        pat = model.pattern if spec is None else parse_spec(spec, model.config.num_hidden_layers)
        model.runnable_pattern(pat)
        loss = lm_loss(model, windows, pat, args.batch_size, progress=not args.json, desc=str(pat))
        results.append({"pattern": str(pat), "num_full": pat.num_full, "loss": loss, "ppl": math.exp(loss)})
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "seq_len": args.seq_len,
                          "num_seqs": int(windows.shape[0]), "results": results}, indent=2))
        return 0
    print(f"{windows.shape[0]} sequences x {args.seq_len} tokens from {args.data} "
          f"(index_topk {model.config.index_topk}, scoring {args.scoring})")
    for r in results:
        print(f"{r['pattern']}  Full {r['num_full']:>3}  loss {r['loss']:.5f}  ppl {r['ppl']:.3f}")
    if args.seq_len <= model.config.index_topk:
        print(f"note: --seq-len {args.seq_len} <= index_topk {model.config.index_topk}: every query keeps all "
              "its tokens, so patterns cannot change the loss")
    return 0


# ------------------------------------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    from .search.run import SearchOptions, run_search

    opt = SearchOptions(
        model=args.model, out=args.out, data=args.data, num_samples=args.num_samples, seq_len=args.seq_len,
        seed=args.seed, batch_size=args.batch_size, keep=args.keep, num_full=args.num_full, to_end=args.to_end,
        stages=args.stages, force_full=_int_list(args.force_full), resume=args.resume, device=args.device,
        dtype=args.dtype, scoring=args.scoring, cache_gb=args.cache_gb,
        baselines=[] if args.baselines == "none" else args.baselines.split(","),
        backend=args.backend, device_map=args.device_map,
    )
    report = run_search(opt)
    if not report:  # not the main rank of a torchrun job
        return 0
    sel, c = report["selected"], report["counters"]
    print(f"\nall-Full loss {report['all_full_loss']:.5f} on {report['calibration']['num_samples']} x "
          f"{report['calibration']['seq_len']} tokens ({report['calibration']['source']})")
    print(f"selected {sel['num_full']}/{report['num_layers']} Full: {sel['pattern']}  loss {sel['loss']:.5f}")
    print(f"work: {c['layer_forwards']} layer-forwards = {c['ratio_vs_naive']:.3f}x a search without prefix reuse; "
          f"{report['seconds']:.1f} s")
    _print_exports(Pattern.parse(sel["pattern"]))
    print(f"\nwrote {args.out}/report.json, loss_curve.png, summary.md, config_patch.json, engine_flags.txt")
    return 0


def cmd_overlap(args: argparse.Namespace) -> int:
    from .search.run import run_overlap

    mat = run_overlap(args.model, args.out, args.data, args.num_samples, args.seq_len, args.seed, args.pattern,
                      args.device)
    n = mat.shape[0]
    adj = sum(float(mat[i + 1, i]) for i in range(n - 1)) / max(n - 1, 1)
    print(f"{n}x{n} overlap: mean adjacent-layer overlap {adj:.3f}, minimum {float(mat.min()):.3f}")
    print(f"wrote {args.out}/overlap.csv, overlap.png, overlap.json")
    return 0


# --------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evals.runner import EvalOptions, command_line, format_table, run_eval
    from .utils import write_atomic

    model = args.model or default_model()
    if model is None:
        raise ValueError("give a MODEL directory (no bundled model here)")
    opt = EvalOptions(
        model=model, patterns=args.pattern or [None], tasks=args.tasks, lengths=args.lengths, samples=args.samples,
        haystack=args.haystack, ppl_data=args.ppl_data or [], ppl_windows=args.ppl_windows, seed=args.seed,
        device=args.device, dtype=args.dtype, decode=args.decode, draft=not args.no_draft, progress=not args.quiet,
        command=command_line(getattr(args, "argv", [])),
    )
    report = run_eval(opt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda p: p.write_text(json.dumps(report, indent=1)))
    print(format_table(report))
    print(f"\n{report['seconds']:.0f} s; wrote {out}")
    return 0


def _int_list(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PatternError(f"expected comma-separated layer numbers, got {text!r}") from None


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="text file, directory of .txt(.xz), .jsonl, or token-id .npy "
                   "(default: the built-in synthetic corpus, tokenized with the model's tokenizer)")
    p.add_argument("--num-samples", type=positive_int, default=4,
                   help="calibration sequences (default 4: a small, fast default; use more for a real model)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per sequence (default: max(2*index_topk, 512))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


# ------------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .checkpoint import load_model, save_model
    from .config import DSAConfig

    cfg = DSAConfig.from_file(args.model)
    pat = parse_spec(args.pattern, cfg.num_hidden_layers)
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    own = cfg.raw.get("dtype") or cfg.raw.get("torch_dtype") or "float32"
    dtype = names.get(own if args.dtype == "keep" else args.dtype, torch.float32)
    model = load_model(args.model, pattern=pat, verbose=False)  # fp32 in memory: nothing is lost
    out = save_model(model, args.out, pattern=pat, drop_shared_indexers=args.drop_shared_indexers, dtype=dtype,
                     copy_tokenizer_from=args.model)
    flags = pat.engine_flags()
    (Path(out) / "engine_flags.txt").write_text(
        f"# pattern {pat} ({pat.num_full}/{cfg.num_hidden_layers} Full)\n"
        f"SGLang: {flags['sglang']}\nvLLM:   {flags['vllm']}\n")
    print(pat.describe_text())
    _print_exports(pat)
    dropped = "; Shared layers' indexer weights dropped" if args.drop_shared_indexers else ""
    print(f"\nwrote {out}: config.json carries indexer_types + index_topk_pattern{dropped}; engine_flags.txt")
    return 0


# -------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        out=args.out, stage=args.stage, data=args.data, init=args.init, preset=args.preset, heldout=args.heldout,
        vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size, micro_batch=args.micro_batch,
        steps=args.steps, lr=args.lr,
        indexer_lr=args.indexer_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        indexer_loss_weight=args.indexer_loss_weight, pattern=args.pattern, cross_layer=not args.no_cross_layer,
        synthetic_mix=args.synthetic_mix, synthetic_kinds=args.synthetic_kinds,
        synthetic_density=args.synthetic_density,
        seed=args.seed, device=args.device, eval_every=args.eval_every, save_every=args.save_every,
        resume=args.resume, stop_after=args.stop_after, time_limit_s=args.time_limit_min and args.time_limit_min * 60,
        shard_mb=args.shard_mb,
    )
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
def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from .bench.kernels import run as run_kernels

        run_kernels(args.out, parts=tuple(args.parts.split(",")))
        return 0
    if args.what == "e2e":
        from .bench.e2e import run as run_e2e

        contexts = [int(float(c[:-1]) * 1000) if c.lower().endswith("k") else int(c) for c in args.contexts.split(",")]
        run_e2e(args.out, contexts, experts=args.experts, layers=args.layers, chunk=args.chunk,
                decode_steps=args.decode_steps, large_batch=args.large_batch)
        return 0
    raise ValueError(f"unknown benchmark {args.what!r}")


# ------------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .data.text import load_tokenizer
    from .engine import Engine

    text = Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")
    tok = load_tokenizer(args.model)
    ids = tok.encode(text).ids
    if not ids:
        raise ValueError(f"{args.prompt_file} tokenizes to nothing")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_model(args.model, dtype=dtype, device=args.device, verbose=False)
    max_len = args.max_len or len(ids) + args.max_new_tokens
    eng = Engine(model, args.pattern, max_batch=1, max_len=max_len, chunk=args.chunk)
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
def cmd_random_model(args: argparse.Namespace) -> int:
    from .presets import make_random_checkpoint

    out = make_random_checkpoint(args.out, args.arch, args.preset, args.seed, args.pattern)
    print(f"wrote a random {args.arch} ({args.preset}) checkpoint with a byte-level tokenizer to {out}")
    return 0


# --------------------------------------------------------------------------------------------- main
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="indexcache", description="IndexCache tools for DSA models")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pattern", help="parse, build, validate and export a layer pattern")
    p.add_argument("pattern", nargs="?", help="FSSF..., a JSON indexer_types list, all-full, or uniform:FREQ[:CONV]")
    p.add_argument("--num-layers", type=positive_int, help="number of decoder layers (MTP excluded)")
    p.add_argument("--model", help="a model directory: its layer count, its own pattern, its indexer weights")
    p.add_argument("--freq", type=positive_int, help="build a uniform pattern with this frequency")
    p.add_argument("--convention", default="official", choices=list(CONVENTIONS),
                   help="how freq/offset map to layers (default: official)")
    p.add_argument("--offset", type=int, help="offset for --convention transformers (default 2)")
    p.add_argument("--stage-starts", help="comma-separated first layers of pipeline stages (must be Full)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pattern)

    p = sub.add_parser("info", help="architecture, pattern, parameters and indexer FLOP share")
    p.add_argument("model", nargs="?", help="model directory (default: the bundled models/dsa-mini)")
    p.add_argument("--pattern", help="pattern to analyse instead of the checkpoint's own")
    p.add_argument("--context", type=int, nargs="+", default=[10_000, 60_000, 120_000, 200_000])
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("loss", help="mean LM loss on a text/jsonl/.npy file, per pattern")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="text file, directory of .txt, .jsonl, or token-id .npy")
    p.add_argument("--pattern", action="append", help="pattern(s) to compare (repeatable; default: the model's)")
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--max-seqs", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--scoring", choices=["exact", "fp8"], default="exact")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_loss)

    p = sub.add_parser("search", help="greedy IndexCache layer search (training-free) with baselines")
    p.add_argument("model", nargs="?", help="model directory (default: the bundled models/dsa-mini)")
    p.add_argument("--out", default="runs/search")
    _add_calibration_args(p)
    p.add_argument("--keep", type=float, help="fraction of indexers to keep (default 0.25)")
    p.add_argument("--num-full", type=positive_int, help="number of Full layers to keep")
    p.add_argument("--to-end", action="store_true", help="continue the trajectory to the end (still selects --keep)")
    p.add_argument("--stages", type=positive_int, default=1, help="pipeline blocks: their first layers stay Full, "
                   "one flip per block per step")
    p.add_argument("--force-full", help="comma-separated layers that must stay Full")
    p.add_argument("--baselines", default="uniform,similarity", help="uniform,similarity or none")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from OUT/search_state.json")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--scoring", choices=["exact", "fp8"], default="exact")
    p.add_argument("--cache-gb", type=float, default=2.0, help="memory for cached prefix states")
    p.add_argument("--backend", choices=["native", "hf"], default="native",
                   help="native: this package's model; hf: the model's transformers class with the pattern applied")
    p.add_argument("--device-map", help="with --backend hf: transformers device_map to spread the model over "
                   "devices (auto, balanced, a device, a JSON object or a .json file of module -> device)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("overlap", help="cross-layer top-k overlap of the all-Full model (csv + heatmap)")
    p.add_argument("model", nargs="?", help="model directory (default: the bundled models/dsa-mini)")
    p.add_argument("--out", default="runs/overlap")
    _add_calibration_args(p)
    p.add_argument("--pattern", help="draw this pattern's sharing blocks on the heatmap")
    p.set_defaults(func=cmd_overlap)

    p = sub.add_parser("eval", help="long-context tasks (RULER-style, passkey, MQAR) and perplexity, per pattern")
    p.add_argument("model", nargs="?", help="model directory (default: the bundled models/dsa-mini)")
    p.add_argument("--pattern", action="append", help="pattern(s) to compare, one row each (repeatable; "
                   "default: the model's own)")
    p.add_argument("--tasks", nargs="+", help="task families, space- or comma-separated: all (default), none, niah, "
                   "niah_single, niah_multikey, niah_multivalue, niah_multiquery, passkey, vt, cwe, fwe, mqar")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[1024],
                   help="context lengths in tokens of the model's tokenizer (default 1024)")
    p.add_argument("--samples", type=positive_int, default=10, help="samples per task and length (default 10)")
    p.add_argument("--haystack", help="filler text: a text file or directory of books, or 'noise' "
                   "(default: the built-in synthetic corpus)")
    p.add_argument("--ppl-data", nargs="+", metavar="[NAME=]PATH[,PATH]",
                   help="perplexity data sets (text files, directories, .jsonl, .npy), measured at each length")
    p.add_argument("--ppl-windows", type=positive_int, default=4,
                   help="perplexity windows per data set and length, evenly spaced (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--decode", default="cache", choices=["cache", "recompute"],
                   help="cache: the engine's latent/indexer caches (default); recompute: a full forward per step")
    p.add_argument("--no-draft", action="store_true",
                   help="with --decode recompute: one token per forward instead of verifying context drafts")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="JSON report to write")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a model directory that carries a pattern, plus engine flags")
    p.add_argument("model")
    p.add_argument("--pattern", required=True, help="FSSF..., uniform:FREQ[:CONV], or a JSON indexer_types list")
    p.add_argument("--out", required=True)
    p.add_argument("--drop-shared-indexers", action="store_true",
                   help="leave out the indexer weights of Shared layers (GLM-5.2 style)")
    p.add_argument("--dtype", default="keep", choices=["keep", "bfloat16", "float16", "float32"],
                   help="weights dtype on disk (default: the checkpoint's own)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="train a small DSA model: dense pretraining, indexer warm-up, sparse stage")
    p.add_argument("out")
    p.add_argument("--stage", required=True, choices=["dense", "warmup", "sparse"])
    p.add_argument("--data", required=True, help="directory of .txt/.txt.xz books, a text file, or a .jsonl")
    p.add_argument("--init", help="model directory to start from (required for warmup and sparse)")
    p.add_argument("--preset", default="mini", help="architecture preset for --stage dense (default mini)")
    p.add_argument("--heldout", type=positive_int, default=3, help="whole files (books) held out for evaluation")
    p.add_argument("--vocab-size", type=positive_int, default=8192, help="BPE vocabulary trained for --stage dense")
    p.add_argument("--seq-len", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--micro-batch", type=positive_int, help="micro-batch size (gradient accumulation) to bound memory")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--indexer-lr", type=float, help="learning rate of the indexers in the sparse stage")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--indexer-loss-weight", type=float, default=1.0)
    p.add_argument("--pattern", help="training-aware IndexCache: the pattern to train for (e.g. uniform:4)")
    p.add_argument("--no-cross-layer", action="store_true", help="ablation: distil each indexer on its own layer")
    p.add_argument("--synthetic-mix", type=float, default=0.0,
                   help="share of each batch replaced by synthetic retrieval windows (facts, repeats, listings)")
    p.add_argument("--synthetic-kinds",
                   help="comma-separated episode kinds: fact,repeat,listing,chain,tally,echo,secret,group,roster,"
                        "track,rank (default all)")
    p.add_argument("--synthetic-density", type=float, help="structured share of a synthetic window (default 0.15-0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-every", type=positive_int, default=200)
    p.add_argument("--save-every", type=positive_int, default=200)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=positive_int, help="save and stop at this step (continue with --resume)")
    p.add_argument("--time-limit-min", type=float, help="save and stop after this many minutes")
    p.add_argument("--shard-mb", type=positive_int, default=4096, help="safetensors shard size of the saved model")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="GPU benchmarks that print tables and write JSON")
    p.add_argument("what", choices=["kernels", "e2e"],
                   help="kernels: ceilings, then each Triton kernel at anchor shapes; e2e: engine prefill/decode")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--parts", default="indexer,topk,sparse_mla", help="comma list of kernel groups (kernels)")
    p.add_argument("--contexts", default="10K,60K,120K,200K", help="context lengths (e2e)")
    p.add_argument("--experts", type=positive_int, default=16, help="routed experts (e2e; the real model has 64)")
    p.add_argument("--layers", type=positive_int, default=47, help="decoder layers (e2e)")
    p.add_argument("--chunk", type=positive_int, default=8192, help="prefill chunk (e2e)")
    p.add_argument("--decode-steps", type=positive_int, default=32, help="timed decode steps (e2e)")
    p.add_argument("--large-batch", type=positive_int, default=8, help="the larger decode batch (e2e)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="generate text with the engine (chunked prefill, cached decode)")
    p.add_argument("model", help="model directory (with its tokenizer)")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--pattern", default=None, help="IndexCache pattern (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk", type=positive_int, default=4096, help="prefill chunk")
    p.add_argument("--max-len", type=positive_int, default=None, help="cache length (default: prompt + new)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("random-model", help="write a random DSA checkpoint (demos and tests)")
    p.add_argument("out")
    p.add_argument("--arch", default="glm_moe_dsa", choices=["glm_moe_dsa", "deepseek_v32"])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pattern", help="pattern to write into config.json")
    p.set_defaults(func=cmd_random_model)
    return ap


def default_model() -> str | None:
    """The bundled trained model, when running from a checkout of the repository."""
    from pathlib import Path

    p = Path(__file__).resolve().parents[2] / "models" / "dsa-mini"
    return str(p) if (p / "config.json").exists() else None


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .search.greedy import SearchError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # reports record their exact command line
    device = getattr(args, "device", "cpu") or "cpu"
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"indexcache {args.cmd}: error: --device {device} but no CUDA device is available", file=sys.stderr)
            return 2
    if args.cmd in ("search", "overlap", "info") and args.model is None:
        args.model = default_model()
        if args.model is None:
            print(f"indexcache {args.cmd}: error: give a MODEL directory (no bundled model here)", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PatternError, ConfigError, CheckpointError, DataError, SearchError, ValueError) as e:
        print(f"indexcache {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else still gets one line; INDEXCACHE_DEBUG=1 shows the traceback
        if os.environ.get("INDEXCACHE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"indexcache {args.cmd}: error: {type(e).__name__}: {msg} (INDEXCACHE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser"]
