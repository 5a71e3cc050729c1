"""Gather the study's evaluation JSONs into one table (markdown + JSON) and draw its figures.

    python scripts/study_report.py --paper-overlap ../shared/reference/indexcache_fig4_overlap_estimate.csv

Reads results/study/eval-*.json (from scripts/study.sh), results/search/dsa-mini*/report.json and
results/overlap/dsa-mini/overlap.csv; writes results/study/study.json, results/study/table.md,
docs/img/study_tasks.png and docs/img/overlap_vs_paper.png (the paper's panel only when its recovered
matrix is given).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey", "vt", "cwe", "fwe",
            "mqar"]
SHORT = ["single", "m-key", "m-value", "m-query", "passkey", "vt", "cwe", "fwe", "mqar"]


def _label_patterns() -> dict[str, list[tuple[str, str]]]:
    """pattern -> [(method, retention)] for the bundled model's rows, from the search reports (two methods
    can pick the same pattern: its row is then listed under each)."""
    labels: dict[str, list[tuple[str, str]]] = {"F" * 16: [("all Full", "1")]}
    for r, freq in (("1/2", 2), ("1/4", 4), ("1/8", 8)):
        labels["".join("F" if i % freq == 0 else "S" for i in range(16))] = [("uniform", r)]
    for name, method in (("dsa-mini", "greedy (books)"), ("dsa-mini-retrieval", "greedy (retrieval)")):
        f = ROOT / "results" / "search" / name / "report.json"
        if not f.exists():
            continue
        rep = json.loads(f.read_text())
        for t in rep["trajectory"]:
            for r, n in (("1/2", 8), ("1/4", 4), ("1/8", 2)):
                if t["num_full"] == n:
                    labels.setdefault(t["pattern"], []).append((method, r))
        if name == "dsa-mini":
            for s in rep["baselines"]["similarity"]:
                if s["num_full"] == 8:
                    labels.setdefault(s["pattern"], []).append(("similarity DP", "1/2"))
    return labels


def sample_scores(rep: dict, pattern: str, length: int) -> dict[str, list[tuple[float, str]]]:
    """family -> [(score, the sample's identity)] in sample order, from an eval report's records: the
    identity (answers and needle places) tells whether two reports scored the same prompts."""
    out: dict[str, list[tuple[float, str]]] = {}
    for s in sorted((s for s in rep["samples"] if s["pattern"] == pattern and s["length"] == length),
                    key=lambda s: (s["family"], s["index"])):
        out.setdefault(s["family"], []).append((s["score"], json.dumps([s["answers"], s["needles"]])))
    return out


def same_prompts(a: dict, b: dict) -> bool:
    """Whether two :func:`sample_scores` results scored the same prompts of the same families, in order."""
    return set(a) == set(b) and all([i for _, i in a[f]] == [i for _, i in b[f]] for f in a)


def average_ci95(scores: dict) -> list[float]:
    """The task average's 95% bootstrap interval (x100) of a :func:`sample_scores` result."""
    from indexcache.intervals import average_ci

    return [100 * x for x in average_ci({f: [x for x, _ in v] for f, v in scores.items()})]


def paired_with(mine: dict, base: dict | None) -> dict | None:
    """``mine``'s task average minus ``base``'s (both family -> [(score, identity)], as :func:`sample_scores`
    gives them) over the same prompts, x100, with its 95% interval; None where there is no base or the two
    did not score the same prompts in the same order."""
    from indexcache.intervals import paired_difference

    if base is None or not same_prompts(mine, base):
        return None
    d = paired_difference({f: [x for x, _ in v] for f, v in mine.items()},
                          {f: [x for x, _ in v] for f, v in base.items()})
    return {"average": 100 * d["difference"], "ci95": [100 * x for x in d["ci95"]], "within_noise": d["within_noise"]}


def add_intervals(rows: list[dict], scores: dict[int, dict]) -> None:
    """Each row's task average with its 95% bootstrap interval over the samples, and its paired difference
    from the bundled model's all-Full row at the same length (where both scored the same prompts)."""
    for r in rows:
        mine = scores[id(r)]
        r["samples_per_family"] = sorted({len(v) for v in mine.values()})
        r["average_ci95"] = average_ci95(mine)
        full = next((q for q in rows if q["length"] == r["length"] and q["method"] == "all Full"), None)
        if full is None or full is r:
            continue
        r["minus_all_full"] = paired_with(mine, scores[id(full)]) or {
            "note": "not the same prompts as the all-Full run: no paired difference"}


def gather() -> list[dict]:
    labels = _label_patterns()
    variants = {"aware-h2": ("training-aware", "1/2"), "aware-q2": ("training-aware", "1/4"),
                "ablate-h2": ("training-aware w/o cross-layer loss", "1/2")}
    rows, scores = [], {}
    for f in sorted((ROOT / "results" / "study").glob("eval-*.json")):
        rep = json.loads(f.read_text())
        variant = f.stem.removeprefix("eval-")
        for r in rep["results"]:
            if variant in variants:
                model, methods = variant, [variants[variant]]
            else:
                model, methods = "dsa-mini", labels.get(r["pattern"], [("other", "?")])
            for method, ret in methods:
                rows.append({"model": model, "method": method, "retention": ret, "pattern": r["pattern"],
                             "num_full": r["num_full"], "length": r["length"], "ppl": r["ppl"],
                             "tasks": r["tasks"], "average": r["average"], "file": str(f.relative_to(ROOT)),
                             "command": rep["command"]})
                scores[id(rows[-1])] = sample_scores(rep, r["pattern"], r["length"])
    add_intervals(rows, scores)
    order = ["all Full", "uniform", "greedy (books)", "greedy (retrieval)", "similarity DP", "training-aware",
             "training-aware w/o cross-layer loss"]
    rows.sort(key=lambda r: (r["length"], r["model"] != "dsa-mini", order.index(r["method"])
                             if r["method"] in order else 99, -r["num_full"]))
    return rows


def _paired(r: dict) -> str:
    d = r.get("minus_all_full")
    if not d or "average" not in d:
        return ""
    noise = " (noise)" if d["within_noise"] else ""
    return f"{d['average']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]{noise}"


def table(rows: list[dict], chance: dict, families: list[str] = FAMILIES, short: list[str] = SHORT,
          ppl: dict[str, str] | None = None, ppl_ci: bool = False,
          extra: dict[str, Callable[[dict], str]] | None = None) -> str:
    """The rows per length as markdown; ``ppl`` maps each perplexity set's key to its column title,
    ``ppl_ci`` adds each perplexity's 95% interval over its windows (a row's ``ppl_ci95``), and ``extra``
    appends columns (title -> the cell of a row)."""
    extra = extra or {}
    ppl = {"heldout": "held-out PPL", "wikitext": "WikiText PPL"} if ppl is None else ppl
    head = ("| model | method | kept | pattern | " + "".join(f"{t} | " for t in ppl.values()) + " | ".join(short)
            + " | avg | avg 95% CI | vs all Full (paired 95% CI) |" + "".join(f" {t} |" for t in extra) + "\n"
            "|---|---|---|---|" + "---:|" * (len(ppl) + len(short) + 1) + "---:|---:|" + "---:|" * len(extra) + "\n")
    blank, tail = "| " * len(ppl), " |" * len(extra)
    out = []
    for length in sorted({r["length"] for r in rows}):
        at = [r for r in rows if r["length"] == length]
        n = sorted({k for r in at for k in r["samples_per_family"]})
        out.append(f"\n**{length} tokens** ({'/'.join(map(str, n))} samples per family; scores x100; intervals: "
                   "95% bootstrap over the samples, each family resampled within itself; a paired difference "
                   "resamples the same prompts for both rows, \"noise\" where its interval contains 0)\n\n" + head)
        for r in at:
            cells = " | ".join(f"{r['tasks'][f]:.1f}" for f in families)
            ppls = "".join(f"{r['ppl'][k]:.1f}" + (" [{:.0f}, {:.0f}]".format(*r["ppl_ci95"][k]) if ppl_ci else "")
                           + " | " for k in ppl)
            lo, hi = r["average_ci95"]
            out.append(f"| {r['model']} | {r['method']} | {r['retention']} | `{r['pattern']}` | {ppls}{cells} | "
                       f"{r['average']:.1f} | [{lo:.1f}, {hi:.1f}] | {_paired(r)} |"
                       + "".join(f" {cell(r)} |" for cell in extra.values()) + "\n")
        c = chance.get(str(length))
        if c:
            out.append(f"| | random guess | | | {blank}" + " | ".join(f"{c[f]['chance']:.2g}" for f in families)
                       + " | | | |" + tail + "\n")
            out.append(f"| | guess among the prompt's candidates | | | {blank}"
                       + " | ".join(f"{c[f]['copy_chance']:.1f}" for f in families) + " | | | |" + tail + "\n")
    return "".join(out)


def plot_tasks(rows: list[dict], path: Path, ppl_key: str = "heldout", styles: dict | None = None,
               title: str = "dsa-mini: which layers keep their indexer") -> None:
    """Per length: the task average (95% intervals as error bars) and the ``ppl_key`` perplexity against the
    number of Full layers, one series per method in ``styles`` (method -> (colour, marker); a marker ending
    in "-" draws a curve ending at the all-Full row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 4.2 * len(lengths)), dpi=110, squeeze=False)
    axes = axes.ravel()
    styles = styles or {"uniform": ("tab:blue", "o-"), "greedy (books)": ("tab:orange", "s-"),
                        "greedy (retrieval)": ("tab:green", "^-"), "similarity DP": ("tab:purple", "D"),
                        "training-aware": ("tab:red", "*"), "training-aware w/o cross-layer loss": ("tab:gray", "X")}
    for li, length in enumerate(lengths):
        rs = [r for r in rows if r["length"] == length]
        full = next((r for r in rs if r["method"] == "all Full"), None)
        ppl_label = {"heldout": "held-out perplexity", "wikitext": "WikiText-2 perplexity"}.get(ppl_key, ppl_key)
        for k, (key, ylabel) in enumerate((("average", "task average (x100)"), ("ppl", ppl_label))):
            ax = axes[2 * li + k]
            for method, (color, marker) in styles.items():
                pts = sorted((r for r in rs if r["method"] == method), key=lambda r: r["num_full"])
                if not pts:
                    continue
                if full is not None and marker.endswith("-"):  # the curves end at the all-Full model
                    pts = pts + [full]
                xs = [p["num_full"] for p in pts]
                if key == "average":  # the 95% intervals over the samples as error bars
                    ys = [p["average"] for p in pts]
                    err = [[y - p["average_ci95"][0] for y, p in zip(ys, pts, strict=True)],
                           [p["average_ci95"][1] - y for y, p in zip(ys, pts, strict=True)]]
                    ax.errorbar(xs, ys, yerr=err, fmt=marker, color=color, label=method, ms=8, capsize=3, lw=1)
                elif all(ppl_key in p.get("ppl_ci95", {}) for p in pts):  # intervals over the windows
                    ys = [p["ppl"][ppl_key] for p in pts]
                    err = [[y - p["ppl_ci95"][ppl_key][0] for y, p in zip(ys, pts, strict=True)],
                           [p["ppl_ci95"][ppl_key][1] - y for y, p in zip(ys, pts, strict=True)]]
                    ax.errorbar(xs, ys, yerr=err, fmt=marker, color=color, label=method, ms=8, capsize=3, lw=1)
                else:
                    ax.plot(xs, [p["ppl"][ppl_key] for p in pts], marker, color=color, label=method, ms=8)
            if full is not None:
                y = full["average"] if key == "average" else full["ppl"][ppl_key]
                ax.axhline(y, color="black", lw=0.8, ls="--", label="all Full")
                if key == "average":
                    ax.axhspan(*full["average_ci95"], color="black", alpha=0.08, label="all Full 95% CI")
            ax.set_xscale("log", base=2)
            ax.set_xticks([2, 4, 8, 16], ["2 (1/8)", "4 (1/4)", "8 (1/2)", "16"])
            ax.set_xlabel("Full layers (of 16)")
            ax.set_ylabel(ylabel + (" with 95% CI" if key == "average" or any("ppl_ci95" in r for r in rs) else ""))
            ax.set_title(f"{length} tokens")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overlap(ours: np.ndarray, paper: np.ndarray | None, blocks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    mats = [("dsa-mini (16 layers, k=256, 4 x 1024 tokens)", ours, blocks)]
    if paper is not None:
        # the paper's greedy 1/4 Full layers of its 30B model (its Appendix B; the red blocks of its Fig. 4)
        mats.append(("paper, 30B DSA (47 layers, k=2048, 200K tokens)", paper,
                     [0, 2, 4, 9, 13, 16, 17, 20, 23, 28, 32, 37]))
    fig, axes = plt.subplots(1, len(mats), figsize=(6 * len(mats), 5.2), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, (title, m, starts) in zip(axes, mats, strict=True):
        im = ax.imshow(m, cmap="viridis", vmin=0.3, vmax=1, origin="upper")
        ends = starts[1:] + [m.shape[0]]
        for s, e in zip(starts, ends, strict=True):
            ax.add_patch(Rectangle((s - 0.5, s - 0.5), e - s, e - s, fill=False, edgecolor="red", lw=1.3))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer j")
        ax.set_ylabel("layer i")
    fig.colorbar(im, ax=list(axes), label="top-k overlap |T_i ∩ T_j| / k")
    fig.suptitle("cross-layer top-k overlap; red: sharing blocks of a greedy 1/4 pattern (ours: retrieval "
                 "calibration)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def overlap_stats(m: np.ndarray) -> dict:
    n = m.shape[0]
    by_d = {d: float(np.mean([m[i, i + d] for i in range(n - d)])) for d in (1, 2, 4, 8) if d < n}
    off = m[~np.eye(n, dtype=bool)]
    return {"adjacent_mean": by_d[1], "by_distance": by_d, "min": float(off.min())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper-overlap", help="the paper's recovered 47x47 overlap matrix (CSV, no header)")
    args = p.parse_args()
    rows = gather()
    first = json.loads((ROOT / rows[0]["file"]).read_text()) if rows else {}
    chance = {}
    for f in sorted((ROOT / "results" / "study").glob("eval-bundled-*-FFFFFFFFFFFFFFFF.json")):
        chance.update(json.loads(f.read_text())["chance"])
    ours = np.loadtxt(ROOT / "results" / "overlap" / "dsa-mini" / "overlap.csv", delimiter=",", skiprows=1)[:, 1:]
    paper = np.loadtxt(args.paper_overlap, delimiter=",") if args.paper_overlap else None
    # our panel draws the blocks of the search that keeps the tasks (retrieval calibration), if it was run
    search = ROOT / "results" / "search" / "dsa-mini-retrieval" / "report.json"
    if not search.exists():
        search = ROOT / "results" / "search" / "dsa-mini" / "report.json"
    rep = json.loads(search.read_text())
    q = next(t["pattern"] for t in rep["trajectory"] if t["num_full"] == 4)
    blocks = [i for i, c in enumerate(q) if c == "F"]
    stats = {"ours": overlap_stats(ours)}
    if paper is not None:
        stats["paper"] = overlap_stats(paper)
    out = ROOT / "results" / "study"
    (out / "study.json").write_text(json.dumps({"rows": rows, "chance": chance, "overlap": stats,
                                                "device": first.get("device")}, indent=1) + "\n")
    (out / "table.md").write_text(table(rows, chance))
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_tasks(rows, img / "study_tasks.png")
    plot_overlap(ours, paper, blocks, img / "overlap_vs_paper.png")
    print(table(rows, chance))
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
