"""Where the time of one long-context evaluation prompt goes, on a GPU: ``indexcache eval``'s own path (the
engine as ``make_engine`` builds it, one niah_single and one passkey prompt with a book haystack) per dtype and
length, split into building the sample, the chunked prefill and the cached decode steps, and the perplexity of
one window through the layer runner. The first dtype at the longest length also runs one prompt under
``torch.profiler``, whose top kernels by GPU time go into the JSON.

    python scripts/eval_cost.py models/dsa-mini --haystack .data/gutenberg --lengths 4096 32768 \
        --dtypes float32 bfloat16 --out results/study-long/eval_cost.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from indexcache.architectures import model_info
from indexcache.evals.runner import greedy_generate_cached, load_tokenizer, make_engine
from indexcache.evals.tasks import Haystack, make_sample
from indexcache.runner import open_model
from indexcache.search.evaluator import lm_window_losses

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """``with Clock() as c: ...`` leaves the block's wall seconds, the GPU drained at both ends, in ``c.s``."""

    def __enter__(self) -> Clock:
        sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync()
        self.s = time.perf_counter() - self.t0


def measure(path: str, dtype: str, lengths: list[int], hay: Haystack, repeats: int, profile_at: int | None,
            device: str = "cuda") -> dict:
    """One dtype's rows: per timed prompt its phases, per length one perplexity window (and the profile)."""
    info = model_info(path)
    opened = open_model(path, info, "auto", DTYPES[dtype], device, verbose=False, keep_fp8=False)
    model, runner = opened.model, opened.runner
    pat = opened.start
    tok = load_tokenizer(path)
    rows, prof_table = [], None
    for L in lengths:
        engine = make_engine(model, pat, L + 256)
        for fam in ("niah_single", "passkey"):
            for i in range(repeats + 1):  # the first is a warm-up (kernel compilation, CUDA graph capture)
                with Clock() as build:
                    s = make_sample(fam, tok, L, i, 0, hay)
                ids = tok.encode(s.prompt).ids
                with Clock() as prefill:
                    engine.prefill(0, torch.tensor(ids, dtype=torch.long))
                with Clock() as gen:
                    g = greedy_generate_cached(engine, tok, ids, s.max_new_tokens, s.stop, None)
                t_build, t_prefill, t_gen = build.s, prefill.s, gen.s
                if i == 0:
                    continue
                steps = max(len(g.ids) - 1, 1)  # the generation's own prefill costs what the one above did
                rows.append({"dtype": dtype, "length": L, "family": fam, "index": i, "build_s": t_build,
                             "prefill_s": t_prefill, "generate_s": t_gen, "new_tokens": len(g.ids),
                             "decode_ms_per_step": 1e3 * max(t_gen - t_prefill, 0.0) / steps})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if profile_at == L:
            from torch.profiler import ProfilerActivity, profile

            s = make_sample("niah_single", tok, L, 0, 0, hay)
            ids = tok.encode(s.prompt).ids
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                greedy_generate_cached(engine, tok, ids, s.max_new_tokens, s.stop, None)
                sync()
            prof_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            print(prof_table, file=sys.stderr, flush=True)
        del engine
        win = torch.randint(0, info.vocab_size, (1, L))
        lm_window_losses(runner, win, pat, progress=False)  # warm-up
        with Clock() as ppl:
            lm_window_losses(runner, win, pat, progress=False)
        rows.append({"dtype": dtype, "length": L, "ppl_window_s": ppl.s})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    del model, runner, opened
    return {"rows": rows, "profile": prof_table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--haystack", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=2, help="timed prompts per family, after one warm-up")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script on small lengths")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("eval_cost.py: no CUDA GPU here (--device cpu to try it on small lengths)")
    hay = Haystack(a.haystack)
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    report = {"command": "python " + " ".join(sys.argv), "gpu": gpu, "torch": torch.__version__,
              "model": a.model, "by_dtype": {}}
    for d in a.dtypes:
        report["by_dtype"][d] = measure(a.model, d, a.lengths, hay, a.repeats,
                                        max(a.lengths) if d == a.dtypes[0] else None, a.device)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
