"""How close DeepSeek's fp8 indexer (the engine's fp8 indexer-K cache) selects to exact scoring, on the
bundled model: per query row with a restrictive window, the share of the exact top-k it keeps, through a
chunked prefill of book windows; and the greedy tokens and logits of a few decode steps after it.

    python scripts/fp8_indexer_recall.py results/e2e/fp8_index_recall.json --data .data/books --variants

Runs on CPU (plain ops) in seconds; ``--device cuda --backend triton`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    from indexcache import load_model
    from indexcache.bundled import default_model
    from indexcache.data import load_calibration
    from indexcache.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", default=".data/books")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--variants", action="store_true",
                    help="also the model's selections under other fp8 layouts (fp32 scales, no rotation, exact q)")
    a = ap.parse_args()
    model = load_model(default_model(), device=a.device, verbose=False)
    cal = load_calibration(default_model(), a.data, a.windows, a.seq_len, 3, None, model.config.vocab_size)
    K = model.config.index_topk

    def run(ids: torch.Tensor, fp8: bool):
        model.set_scoring("fp8" if fp8 else "exact")
        e = Engine(model, max_len=a.seq_len + a.steps, chunk=512, backend=a.backend, fp8_index_cache=fp8)
        e.selections = chosen = []
        logits = [e.prefill(0, ids)]
        for _ in range(a.steps):
            logits.append(e.decode(logits[-1].argmax(-1).view(1))[0])
        model.set_scoring("exact")
        return chosen, torch.stack(logits).float().cpu()

    recalls, windows = [], []
    for ids in cal.windows:
        exact, le = run(ids, False)
        fp8, lf = run(ids, True)
        per = []
        for x, y in zip(exact, fp8, strict=True):
            for r in range(x.shape[0]):
                xs = set(x[r][x[r] >= 0].tolist())
                if len(xs) >= K:  # only rows whose window holds more than the selection
                    per.append(len(xs & set(y[r][y[r] >= 0].tolist())) / len(xs))
        recalls += per
        same = (le.argmax(-1) == lf.argmax(-1)).tolist()
        first = same.index(False) if False in same else None  # after it each engine feeds its own token
        upto = len(same) if first is None else first + 1
        windows.append({"rows": len(per), "mean_recall": sum(per) / len(per), "greedy_steps": len(same),
                        "first_different_token": first,
                        "max_logit_diff_until_then": float((le[:upto] - lf[:upto]).abs().max()),
                        "logit_scale": float(le.abs().max())})
    r = torch.tensor(recalls)
    variants = layout_variants(model, cal.windows, K) if a.variants else None
    report = {"about": __doc__.splitlines()[0], "command": " ".join(["python", *sys.argv]),
              "model": os.path.relpath(default_model(), Path(__file__).resolve().parents[1]), "index_topk": K,
              "seq_len": a.seq_len, "data": a.data,
              "rows": len(recalls), "mean_recall": float(r.mean()), "min_recall": float(r.min()),
              "share_of_rows_at_or_above_0.99": float((r >= 0.99).float().mean()),
              "quantiles": {str(q): float(torch.quantile(r, q)) for q in (0.01, 0.05, 0.5)},
              "windows": windows, "device": a.device, "backend": a.backend}
    if variants:
        report["layout_variants"] = variants
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "windows"}, indent=1))
    for w in windows:
        print(w)


def layout_variants(model, windows, K: int) -> dict:
    """The model's own selections (whole forwards, like the engine's) under variants of the fp8 layout,
    against exact scoring: which part of the layout costs the recall."""
    import indexcache.model.dsa as dsa
    from indexcache import Trace
    from indexcache.ops.fp8 import fake_quant_fp8, hadamard_transform

    def operands(kind: str):
        def quant(q: torch.Tensor, k: torch.Tensor):
            b = min(128, q.shape[-1])
            if kind == "fp32 scales":
                return fake_quant_fp8(hadamard_transform(q), b, None), fake_quant_fp8(hadamard_transform(k), b, None)
            if kind == "no rotation":
                return fake_quant_fp8(q, b, "ue8m0"), fake_quant_fp8(k, b, "ue8m0")
            if kind == "exact q, fp8 keys":
                return hadamard_transform(q), fake_quant_fp8(hadamard_transform(k), b, "ue8m0")
            return dsa.fp8_indexer_operands_default(q, k)
        return quant

    def selections(scoring: str) -> list[dict]:
        model.set_scoring(scoring)
        out = []
        with torch.no_grad():
            for ids in windows:
                t = Trace(indices=True)
                model(ids.view(1, -1), trace=t)
                out.append({layer: rec.indices[0] for layer, rec in t.records.items()})
        model.set_scoring("exact")
        return out

    exact = selections("exact")
    dsa.fp8_indexer_operands_default = dsa.fp8_indexer_operands
    result = {}
    try:
        for kind in ("DeepSeek's (power-of-two scales, rotated)", "fp32 scales", "no rotation", "exact q, fp8 keys"):
            dsa.fp8_indexer_operands = operands(kind)
            rows = []
            for x_all, y_all in zip(exact, selections("fp8"), strict=True):
                for layer, x in x_all.items():
                    y = y_all[layer]
                    for r in range(K, x.shape[0]):  # rows whose window holds more than the selection
                        xs = set(x[r][x[r] >= 0].tolist())
                        rows.append(len(xs & set(y[r][y[r] >= 0].tolist())) / len(xs))
            t = torch.tensor(rows)
            result[kind] = {"rows": len(rows), "mean_recall": float(t.mean()),
                            "share_at_or_above_0.99": float((t >= 0.99).float().mean())}
            print(kind, result[kind])
    finally:
        dsa.fp8_indexer_operands = dsa.fp8_indexer_operands_default
        del dsa.fp8_indexer_operands_default
    return result


if __name__ == "__main__":
    main()
