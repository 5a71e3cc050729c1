"""The indexer-logits kernel's tiles at a few heads, on a GPU: every (queries per program, keys per tile, key-major
or query-major, warps) of a small grid, per operand dtype and shape, timed (CUDA events, median of ``--reps``)
and checked against the default tiles' logits (fp32 and IEEE dots: the tiles change no reduction order, so
the logits should be equal bit for bit). ``float32-tf32x3`` is fp32 under tf32x3 products
(``ops.triton_support.fp32_dot_mode``); its default row also records how far its logits are from the exact
(``ieee``) ones. Writes every row, and per shape the default's time and the best.

    python scripts/indexer_tile_sweep.py --out results/kernels/h200/indexer_tiles.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from indexcache.bench.kernels import _causal_windows
from indexcache.ops.indexer.kernel import indexer_logits
from indexcache.ops.triton_support import fp32_dot_mode

# name -> (operand dtype, fp32 products)
DTYPES = {"float32": (torch.float32, "ieee"), "float32-tf32x3": (torch.float32, "tf32x3"),
          "bfloat16": (torch.bfloat16, "ieee")}


def bench(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after two warm-ups (a fixed count of runs, so that
    a sweep of 32 tiles fits a time budget; ``bench.kernels._bench`` times a fixed duration instead)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


GRID = list(itertools.product([8, 16, 32, 64], [64, 128], [True, False], [4, 8]))  # block_q, block_n, key-major, warps


def sweep_shape(dname: str, spec: str, reps: int, deadline: float) -> tuple[list[dict], dict]:
    """The default tiles, then every tile of ``GRID`` until ``deadline``, on one dtype and HEADSxDIM:ROWSxKEYS."""
    dtype, mode = DTYPES[dname]
    with fp32_dot_mode(mode):
        return _sweep(dname, dtype, spec, reps, deadline, exact=mode != "ieee")


def _sweep(dname: str, dtype: torch.dtype, spec: str, reps: int, deadline: float,
           exact: bool) -> tuple[list[dict], dict]:
    hd, rk = spec.split(":")
    H, D = map(int, hd.split("x"))
    R, T = map(int, rk.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(R, H, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, T, D, device="cuda", generator=g).to(dtype)
    w = torch.rand(R, H, device="cuda", generator=g)
    ks, ke = _causal_windows(R, T, "cuda")  # a prefill chunk of R queries at the end of T tokens
    inside = torch.arange(T, device="cuda")[None, :] < ke[:, None]
    flops = 2.0 * H * D * float((ke - ks).sum())
    run = partial(indexer_logits, q, k, w, ks, ke, clean=False)
    ref = run()
    ms0 = bench(run, reps)
    best = {"dtype": dname, "shape": spec, "config": "default", "ms": ms0, "tflops": flops / ms0 / 1e9}
    if exact:  # how far these products are from exact ones, relative to the largest logit of the row
        with fp32_dot_mode("ieee"):
            exact_logits = run()
        err = (ref - exact_logits).abs().where(inside, 0).amax(-1) / exact_logits.abs().where(inside, 0).amax(-1)
        best["max_rel_diff_vs_ieee"] = float(err.nan_to_num(0).max())
    rows = [best]
    print(json.dumps(best), file=sys.stderr, flush=True)
    for bq, bn, key_major, warps in GRID:
        if time.time() > deadline:
            break
        tiled = partial(run, block_q=bq, block_n=bn, key_major=key_major, num_warps=warps)
        config = {"block_q": bq, "block_n": bn, "key_major": key_major, "num_warps": warps}
        try:
            diff = float((tiled() - ref).abs().where(inside, 0).max())
            ms = bench(tiled, reps)
        except Exception as e:  # a tile that does not fit (shared memory, registers) is a row, not a stop
            row = {"dtype": dname, "shape": spec, "config": config, "error": repr(e)[:200]}
        else:
            row = {"dtype": dname, "shape": spec, "config": config, "ms": ms, "tflops": flops / ms / 1e9,
                   "max_abs_diff_vs_default": diff}
            if ms < best["ms"]:
                best = row
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4x64:2048x16384", "4x64:2048x32768", "4x64:8192x32768"],
                    help="HEADSxDIM:ROWSxKEYS")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this many seconds")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("indexer_tile_sweep.py needs a CUDA GPU")
    t0 = time.time()
    report = {"command": "python " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "rows": [], "best": []}
    for dname, spec in itertools.product(a.dtypes, a.shapes):
        rows, best = sweep_shape(dname, spec, a.reps, t0 + a.budget_s)
        report["rows"] += rows
        report["best"].append({"dtype": dname, "shape": spec, "default_ms": rows[0]["ms"], "best": best,
                               "speedup": rows[0]["ms"] / best["ms"]})
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    for b in report["best"]:
        print(f"{b['dtype']:9s} {b['shape']:18s} default {b['default_ms']:8.3f} ms, best {b['best']['ms']:8.3f} ms "
              f"({b['speedup']:.1f}x) {b['best']['config']}")


if __name__ == "__main__":
    main()
