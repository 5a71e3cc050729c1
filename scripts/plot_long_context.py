"""The long-context continuation in one figure: the sparse stage's train losses over its two segments (the
second starts from the first's weights with a fresh schedule), and the retrieval scores by context length
with their 95% intervals, from the committed JSON.

    python scripts/plot_long_context.py results/train/long-context
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (run, label, steps of the stage before it: part a stopped after 33 steps; its log holds every 10th)
SEGMENTS = (("long-sparse16k", "sparse16k, part a (from the partial warm-up)", 0),
            ("long-sparse16k-b", "sparse16k, part b (from part a's weights)", 33))
EVAL = "eval-sparse16k-b-long.json"


def main(folder: Path) -> Path:
    fig, (ax_kl, ax_lm, ax_eval) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, label, offset in SEGMENTS:
        rows = json.loads((folder / name / "losses.json").read_text())["train"]
        steps = [offset + r["step"] for r in rows]
        ax_kl.plot(steps, [r["indexer_kl"] for r in rows], marker="o", label=label)
        ax_lm.plot(steps, [r["lm_loss"] for r in rows], marker="o", label=label)
    for ax, what in ((ax_kl, "indexer KL to the dense attention"), (ax_lm, "LM loss (train batch)")):
        ax.set_xlabel("sparse-stage step (8 x 16384 tokens each)")
        ax.set_title(what)
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    report = json.loads((folder / EVAL).read_text())
    tasks = report["tasks"]
    lengths = [r["length"] for r in report["results"]]
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs = [j + (i - (len(tasks) - 1) / 2) * width for j in range(len(lengths))]
        ys = [r["tasks"][task] for r in report["results"]]
        lo = [y - r["tasks_ci95"][task][0] for y, r in zip(ys, report["results"], strict=True)]
        hi = [r["tasks_ci95"][task][1] - y for y, r in zip(ys, report["results"], strict=True)]
        ax_eval.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=task)
    ax_eval.axhline(80, color="grey", ls="--", lw=0.8)
    ax_eval.axhline(50, color="grey", ls=":", lw=0.8)
    ax_eval.set_xticks(range(len(lengths)), [f"{L // 1024}K" for L in lengths])
    ax_eval.set_ylim(0, 105)
    ax_eval.set_title(f"all Full, book haystack, {report['samples_per_task']} samples (95% CI)")
    ax_eval.set_ylabel("score x100 (bars: niah_single 80, passkey 50)")
    ax_eval.legend(fontsize=8)
    fig.tight_layout()
    out = folder / "long_context.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/train/long-context")))
