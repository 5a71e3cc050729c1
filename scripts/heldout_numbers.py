"""The held-out LM loss and indexer recall a model card quotes, on the trainer's own held-out books.

    python scripts/heldout_numbers.py MODEL BOOKS OUT.json [--seq-len 2048] [--windows 8] [--recall-windows 2]

The books are split as ``indexcache train --heldout 3`` splits them (whole files, seed 0); the loss is the
mean next-token cross-entropy over ``--windows`` evenly spaced windows of the held-out stream, with the
model's own pattern and sparse attention (what the trainer's held-out evaluation reports), and the recall is
each layer's dense attention mass inside its top-k on the first ``--recall-windows`` of them (the trainer's
``indexer_recall``). fp32 on the CPU, so a GPU run's bf16 numbers differ in the last digits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from indexcache import load_model  # noqa: E402
from indexcache.analysis.recall import indexer_recall  # noqa: E402
from indexcache.data.text import load_tokenizer  # noqa: E402
from indexcache.errors import IndexCacheError  # noqa: E402
from indexcache.search.evaluator import lm_window_losses  # noqa: E402
from indexcache.train.data import fixed_windows, split_documents, tokenize  # noqa: E402


def heldout_numbers(model_dir: str, books: str, seq_len: int = 2048, windows: int = 8, recall_windows: int = 2,
                    heldout: int = 3, seed: int = 0) -> dict:
    """The held-out loss (with its per-window values) and the recall of ``model_dir`` on ``books``."""
    _, test, names = split_documents(books, heldout, seed)
    ids = tokenize(test, load_tokenizer(model_dir))
    wins = fixed_windows(ids, windows, seq_len)
    model = load_model(model_dir, verbose=False)
    per_window = lm_window_losses(model, wins, desc="held-out loss")
    with torch.no_grad():
        recall = indexer_recall(model, [w[None] for w in wins[:recall_windows]])
    return {"model": model_dir, "heldout_files": names, "heldout_tokens": int(ids.shape[0]), "seq_len": seq_len,
            "windows": windows, "heldout_lm_loss": sum(per_window) / len(per_window),
            "window_losses": per_window, "recall_windows": recall_windows, "indexer_recall": recall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("books")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--recall-windows", type=int, default=2)
    a = ap.parse_args()
    if a.out.exists():
        raise SystemExit(f"heldout_numbers: {a.out} exists; remove it or give another name")
    t0 = time.time()
    try:
        r = heldout_numbers(a.model, a.books, a.seq_len, a.windows, a.recall_windows)
    except (IndexCacheError, OSError, ValueError) as e:
        raise SystemExit(f"heldout_numbers: {e}") from None
    r = {"command": "python scripts/heldout_numbers.py " + " ".join(sys.argv[1:]), **r,
         "seconds": round(time.time() - t0, 1)}
    a.out.write_text(json.dumps(r, indent=1) + "\n")
    rec = r["indexer_recall"]
    print(f"held-out LM loss {r['heldout_lm_loss']:.4f} at {a.seq_len} tokens ({a.windows} windows); recall "
          f"{rec['mean_recall']:.3f} (random {rec['random_baseline']:.3f}); wrote {a.out}")


if __name__ == "__main__":
    main()
