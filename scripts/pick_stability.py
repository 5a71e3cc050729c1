"""How stable is a greedy search's pick: the same search with several calibration sample seeds, per recipe.

For each recipe (``books``: windows of the books directory drawn with the seed; ``retrieval``: the trainer's
held-out books with synthetic retrieval episodes spliced in, the episodes and windows drawn with the seed)
and each seed, ``indexcache search`` runs down to ``--keep``; then every pattern any run picked at 1/2 and at
the target is scored on the same held-out windows (the trainer's held-out books, a seed no search used), and
the table says how often each was picked, its loss and its difference from all Full (95% bootstrap intervals
over the held-out windows), and how many of the runs' steps were within noise.

    python scripts/pick_stability.py models/dsa-mini ../shared/data/gutenberg results/search/stability \\
        --seeds 0 1 2 --num-samples 4 --seq-len 1024 --keep 0.25

Long calibration on a GPU: ``--seq-len 16384 --device cuda``.

Writes OUT/stability.json and OUT/README.md; each search's own output stays in OUT/<recipe>/seed<k>/.
Resumable: a finished search (its report.json) is not run again. ``--merge A.json B.json`` joins the tables of
earlier runs (say, one recipe each, scored on the same held-out windows) into OUT's, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 1000  # the held-out evaluation windows: a seed no calibration draw uses


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def retrieval_windows(model: str, data: str, out: Path, num: int, seq_len: int, seed: int) -> Path:
    """Held-out books (the trainer's split, seed 0) with retrieval episodes drawn with ``seed``."""
    from tokenizers import Tokenizer

    from indexcache.train.data import split_documents, tokenize
    from indexcache.train.retrieval import retrieval_batch

    tok = Tokenizer.from_file(f"{model}/tokenizer.json")
    _, test, _ = split_documents(data, 3, 0)
    ids, _ = retrieval_batch(tokenize(test, tok), tok, num, seq_len, seed, 0, salt=5, density=0.5)
    np.save(out, ids.astype(np.int32))
    return out


def heldout_windows(model: str, data: str, out: Path, num: int, seq_len: int) -> Path:
    """Plain windows of the trainer's held-out books, drawn with :data:`EVAL_SEED`."""
    from tokenizers import Tokenizer

    from indexcache.train.data import split_documents, tokenize

    tok = Tokenizer.from_file(f"{model}/tokenizer.json")
    _, test, _ = split_documents(data, 3, 0)
    stream = np.asarray(tokenize(test, tok), dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(EVAL_SEED)
    starts = np.sort(rng.choice(len(stream) - seq_len, size=num, replace=False))
    np.save(out, np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int32))
    return out


def score(model_dir: str, windows_npy: Path, patterns: list[str], resamples: int = 2000, device: str = "cpu") -> dict:
    """Each pattern's mean loss on the held-out windows with a 95% bootstrap interval over the windows, and
    its paired difference from all Full (the same resampled windows for both) with its interval."""
    import torch

    from indexcache import load_model
    from indexcache.intervals import quantiles, resample_indices
    from indexcache.pattern import Pattern
    from indexcache.search import LossEvaluator

    model = load_model(model_dir, device=device, verbose=False)
    ids = torch.from_numpy(np.load(windows_npy).astype(np.int64))
    ev = LossEvaluator(model, [ids[i : i + 1] for i in range(ids.shape[0])])
    full = Pattern.all_full(model.config.num_hidden_layers)
    per = {}
    for p in [str(full), *patterns]:
        ev.loss(Pattern.parse(p))
        per[p] = torch.tensor(ev.last_window_losses, dtype=torch.float64)
    draw = resample_indices(ids.shape[0], resamples)  # the same windows for every pattern: paired differences

    def ci(x: torch.Tensor) -> list[float]:
        return quantiles(x[draw].mean(-1))

    rows = [{"pattern": p, "loss": float(w.mean()), "ci95": ci(w), "minus_all_full": float((w - per[str(full)]).mean()),
             "minus_all_full_ci95": ci(w - per[str(full)])} for p, w in per.items()]
    return {"windows": int(ids.shape[0]), "resamples": resamples, "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data", help="books directory")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--recipes", nargs="+", default=["books", "retrieval"], choices=["books", "retrieval"])
    ap.add_argument("--device", default="cpu", help="where the searches and the scoring run (cuda for long windows)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="STABILITY_JSON",
                    help="write OUT's table from these earlier stability.json files instead of searching (no GPU)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        tables = [json.loads(f.read_text()) for f in a.merge]
        write(a.out, merge(tables), a.keep)
        return
    ic = [sys.executable, "-m", "indexcache.cli"]
    tmp = Path(tempfile.mkdtemp(prefix="stability-"))
    runs = []
    for recipe in a.recipes:
        for seed in a.seeds:
            out = a.out / recipe / f"seed{seed}"
            if not (out / "report.json").exists():
                if recipe == "books":
                    data, draw = a.data, seed
                else:
                    data = str(retrieval_windows(a.model, a.data, tmp / f"retrieval{seed}.npy", a.num_samples,
                                                 a.seq_len, seed))
                    draw = 0  # the rows are already this seed's
                run([*ic, "search", a.model, "--data", data, "--num-samples", str(a.num_samples), "--seq-len",
                     str(a.seq_len), "--seed", str(draw), "--keep", str(a.keep), "--baselines", "none",
                     "--device", a.device, "--overwrite", "--out", str(out)])
            r = json.loads((out / "report.json").read_text())
            n = r["num_layers"]
            half = next((e for e in r["trajectory"] if e["num_full"] == n // 2), None)
            runs.append({"recipe": recipe, "seed": seed, "half": half and half["pattern"],
                         "target": r["selected"]["pattern"], "num_full": r["selected"]["num_full"],
                         "calibration_loss": r["selected"]["loss"], "all_full_loss": r["all_full_loss"],
                         "steps": len(r["trajectory"]), "steps_within_noise": r.get("steps_within_noise", []),
                         "last_step": r["trajectory"][-1].get("confidence")})
    patterns = sorted({p for x in runs for p in (x["half"], x["target"]) if p})
    heldout = heldout_windows(a.model, a.data, tmp / "heldout.npy", a.eval_windows, a.seq_len)
    losses = score(a.model, heldout, patterns, device=a.device)
    table = {"about": __doc__.splitlines()[0], "command": " ".join(sys.argv), "runs": runs,
             "heldout": {"windows": a.eval_windows, "seq_len": a.seq_len, "seed": EVAL_SEED, "losses": losses}}
    write(a.out, table, a.keep)


def write(out: Path, table: dict, keep: float) -> None:
    """OUT/stability.json and OUT/README.md (its tables) from one stability table."""
    runs, held = table["runs"], table["heldout"]
    losses = held["losses"]
    (out / "stability.json").write_text(json.dumps(table, indent=1) + "\n")
    commands = table["command"] if isinstance(table["command"], list) else [table["command"]]
    lines = [f"# {__doc__.splitlines()[0]}", "", *[f"`{c}`\n" for c in commands],
             f"Held-out loss: {held['windows']} x {held['seq_len']} tokens of the trainer's held-out books "
             f"(seed {held['seed']}).", ""]
    for recipe in dict.fromkeys(x["recipe"] for x in runs):
        mine = [x for x in runs if x["recipe"] == recipe]
        for key, label in (("half", "1/2"), ("target", f"{keep:g}")):
            count = Counter(x[key] for x in mine if x[key])
            lines += [f"## {recipe}, {label}", "", "| pattern | picked by seeds | held-out loss (95% interval) "
                      "| minus all Full (95% interval) |", "|---|---|---:|---:|"]
            for p, c in count.most_common():
                seeds = [x["seed"] for x in mine if x[key] == p]
                lines.append(f"| `{p}` | {c} of {len(mine)} ({', '.join(map(str, seeds))}) | {_loss(losses, p)} |")
            lines.append("")
        noisy = [f"seed {x['seed']}: {len(x['steps_within_noise'])} of {x['steps']}" for x in mine]
        lines += [f"Steps within noise ({recipe}): " + "; ".join(noisy), ""]
    lines.append(f"All Full, held-out loss: {_loss(losses, losses['results'][0]['pattern']).split(' |')[0]}")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def merge(tables: list[dict]) -> dict:
    """One table from several runs of this script (say, one recipe each) scored on the same held-out windows:
    their runs and their patterns' losses joined. Refuses tables whose held-out windows or all-Full loss differ,
    since their differences would then not be paired."""
    first = tables[0]["heldout"]
    rows: dict[str, dict] = {}
    for t in tables:
        h = t["heldout"]
        if (h["windows"], h["seq_len"], h["seed"]) != (first["windows"], first["seq_len"], first["seed"]):
            sys.exit("pick_stability: the tables were scored on different held-out windows; they cannot be merged")
        if h["losses"]["results"][0] != first["losses"]["results"][0]:
            sys.exit("pick_stability: the tables' all-Full losses differ (another model?); they cannot be merged")
        for r in h["losses"]["results"]:
            rows.setdefault(r["pattern"], r)
    full, *rest = rows.values()
    losses = {**first["losses"], "results": [full, *sorted(rest, key=lambda r: r["pattern"])]}
    commands = [c for t in tables for c in (t["command"] if isinstance(t["command"], list) else [t["command"]])]
    return {"about": tables[0]["about"], "command": commands, "runs": [x for t in tables for x in t["runs"]],
            "heldout": {**first, "losses": losses}}


def _loss(losses: dict, pattern: str) -> str:
    """``loss (lo, hi) | difference (lo, hi)`` of one pattern, as the table shows it."""
    r = next(r for r in losses["results"] if r["pattern"] == pattern)
    lo, hi = r["ci95"]
    dlo, dhi = r["minus_all_full_ci95"]
    return f"{r['loss']:.4f} ({lo:.4f}, {hi:.4f}) | {r['minus_all_full']:+.4f} ({dlo:+.4f}, {dhi:+.4f})"


if __name__ == "__main__":
    main()
