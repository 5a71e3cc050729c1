"""Gather the long-context study's evaluation JSONs into one table (markdown + JSON) and draw its figure.

    python scripts/long_study_report.py

Reads results/study-long/eval-long-LENGTH-PATTERN.json (from scripts/long_study.sh) and, where it exists,
results/study-long/speed.json (`indexcache bench e2e --model models/dsa-mini --pattern P ...`: each row's
prefill and batch-1 decode speedup over all Full at the same length, beside its scores), and names each pattern's
method from the searches that picked it: the 1K greedy searches of results/search/stability-16k-model (books
and retrieval windows, sample seed 0), the 16K greedy search of results/study-long/search-books-16k and the
similarity DP of results/study-long/similarity-16k. Evaluations stopped before their end
(results/study-long/progress-32k/*.json.partial) add the families they finished, in a table of their own.
The training-aware runs (results/study-long/aware/VARIANT-sSEED/, from scripts/long_aware.sh) make the
paper's Table 3: each seed's row, and the seeds' mean where every seed scored the same prompts, each paired
with the bundled model's all Full and with the all-Full control given the same training. Writes
results/study-long/study.json,
results/study-long/table.md, docs/img/long_study.png and docs/img/long_aware.png.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from study_report import add_intervals, average_ci95, paired_with, plot_tasks, same_prompts, sample_scores, table  # noqa: E402

STUDY = ROOT / "results" / "study-long"
FAMILIES = ["niah_single", "passkey"]
METHODS = ["all Full", "uniform", "greedy (books, 1K)", "greedy (retrieval, 1K)", "greedy (books, 16K)",
           "similarity DP (16K)"]
STYLES = {"uniform": ("tab:blue", "o-"), "greedy (books, 1K)": ("tab:orange", "s-"),
          "greedy (retrieval, 1K)": ("tab:green", "^-"), "greedy (books, 16K)": ("tab:brown", "v-"),
          "similarity DP (16K)": ("tab:purple", "D")}


def label_patterns(root: Path = ROOT, study: Path = STUDY, n: int = 16) -> dict[str, list[tuple[str, str]]]:
    """pattern -> [(method, retention)] for an ``n``-layer model: by construction for all Full and uniform,
    else the search reports' 1/2 and 1/4 picks (a pattern two methods picked is listed under each)."""
    labels: dict[str, list[tuple[str, str]]] = {"F" * n: [("all Full", "1")]}
    for freq in (2, 4, 8):
        labels.setdefault("".join("F" if i % freq == 0 else "S" for i in range(n)), []).append(("uniform", f"1/{freq}"))
    kept = {n // 2: "1/2", n // 4: "1/4"}
    searches = [("greedy (books, 1K)", root / "results/search/stability-16k-model/books/seed0/report.json"),
                ("greedy (retrieval, 1K)", root / "results/search/stability-16k-model/retrieval/seed0/report.json"),
                ("greedy (books, 16K)", study / "search-books-16k" / "report.json")]
    for method, f in searches:
        if f.exists():
            for t in json.loads(f.read_text())["trajectory"]:
                if t["num_full"] in kept and len(t["pattern"]) == n:
                    labels.setdefault(t["pattern"], []).append((method, kept[t["num_full"]]))
    f = study / "similarity-16k" / "report.json"
    if f.exists():
        for s in json.loads(f.read_text())["baselines"]["similarity"]:
            if s["num_full"] in kept and len(s["pattern"]) == n:
                labels.setdefault(s["pattern"], []).append(("similarity DP (16K)", kept[s["num_full"]]))
    return labels


def gather(study: Path = STUDY, root: Path = ROOT) -> tuple[list[dict], dict]:
    """The rows (one per method and pattern and length, with intervals and paired differences from all
    Full) and the chance levels per length."""
    rows, scores, chance, labels = [], {}, {}, None
    for f in sorted(study.glob("eval-long-*.json")):
        rep = json.loads(f.read_text())
        if labels is None:  # the layer count from the first report's patterns
            labels = label_patterns(root, study, len(rep["results"][0]["pattern"]))
        chance.update(rep["chance"])
        for r in rep["results"]:
            for method, ret in labels.get(r["pattern"], [("other", "?")]):
                rows.append({"model": "dsa-mini", "method": method, "retention": ret, "pattern": r["pattern"],
                             "num_full": r["num_full"], "length": r["length"], "ppl": r["ppl"],
                             "ppl_ci95": r["ppl_ci95"], "tasks": r["tasks"], "average": r["average"],
                             "file": str(f.relative_to(root)) if f.is_relative_to(root) else str(f),
                             "command": rep["command"]})
                scores[id(rows[-1])] = sample_scores(rep, r["pattern"], r["length"])
    add_intervals(rows, scores)
    rows.sort(key=lambda r: (r["length"], METHODS.index(r["method"]) if r["method"] in METHODS else 99,
                             -r["num_full"]))
    return rows, chance


def unfinished_rows(rows: list[dict], progress: Path = STUDY / "progress-32k", root: Path = ROOT) -> list[dict]:
    """Rows from evaluations stopped before their end (``indexcache eval``'s ``OUT.partial`` files, which
    ``--resume`` continues): one per pattern and family that the run finished (every sample of the family
    scored), with the family's score, its 95% bootstrap interval over the samples, and its paired difference
    from the all-Full row's same family at the same length where both scored the same prompts. A family the
    run did not finish is left out, never averaged over part of its samples."""
    from indexcache.intervals import mean_ci, paired_difference

    out = []
    full = {r["length"]: r for r in rows if r["method"] == "all Full"}
    labels = None
    for f in sorted(progress.glob("eval-long-*.json.partial")):
        rep = json.loads(f.read_text())  # its samples are the report's records: sample_scores reads them
        for pattern, length in sorted({(x["pattern"], x["length"]) for x in rep["samples"]}):
            if labels is None:
                labels = label_patterns(root, root / "results" / "study-long", len(pattern))
            losses = rep["ppl"].get(f"{pattern} {length} wikitext")
            base = full.get(length)
            theirs = {} if base is None else sample_scores(json.loads((root / base["file"]).read_text()),
                                                           base["pattern"], length)
            for family, mine in sample_scores(rep, pattern, length).items():
                if len(mine) < rep["signature"]["samples"]:
                    continue
                scores = [x for x, _ in mine]
                row = {"pattern": pattern, "length": length, "family": family, "samples": len(scores),
                       "methods": labels.get(pattern, [("other", "?")]), "score": 100 * sum(scores) / len(scores),
                       "ci95": [100 * x for x in mean_ci(scores)],
                       "ppl": math.exp(sum(losses) / len(losses)) if losses else None,
                       "file": str(f.relative_to(root)) if f.is_relative_to(root) else str(f)}
                ref = theirs.get(family, [])
                if same_prompts({family: ref}, {family: mine}):
                    d = paired_difference({family: scores}, {family: [x for x, _ in ref]})
                    row["minus_all_full"] = {"score": 100 * d["difference"], "ci95": [100 * x for x in d["ci95"]],
                                             "within_noise": d["within_noise"]}
                    row["all_full"] = 100 * sum(x for x, _ in ref) / len(ref)
                out.append(row)
    return out


def unfinished_table(extra: list[dict]) -> str:
    """Markdown for :func:`unfinished_rows`."""
    lines = ["| method | kept | pattern | length | family | samples | score [95% CI] | all Full | minus all Full "
             "[95% CI] | WikiText-2 PPL |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in extra:
        d = r.get("minus_all_full")
        diff = (f"{d['score']:+.1f} [{d['ci95'][0]:+.0f}, {d['ci95'][1]:+.0f}]" + (" (noise)" if d["within_noise"]
                                                                                 else "")) if d else ""
        for method, kept in r["methods"]:
            lines.append(f"| {method} | {kept} | `{r['pattern']}` | {r['length']} | {r['family']} | {r['samples']} | "
                         f"{r['score']:.1f} [{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}] | "
                         f"{r.get('all_full', float('nan')):.1f} | {diff} | "
                         + (f"{r['ppl']:.2f} |" if r["ppl"] is not None else " |"))
    return "\n".join(lines) + "\n"


AWARE_VARIANTS = {"full": ("all Full, the same training", "1"), "aware-h2": ("training-aware", "1/2"),
                  "aware-q2": ("training-aware", "1/4"), "searched-h2": ("training-aware, searched pattern", "1/2"),
                  "ablate-h2": ("training-aware w/o cross-layer loss", "1/2")}


def aware_rows(rows: list[dict], aware: Path = STUDY / "aware", root: Path = ROOT) -> list[dict]:
    """The training-aware rows: one per variant, training seed and length (``aware/VARIANT-sSEED/``: the
    evaluations and the training summary), then per variant and length the mean over its seeds (each prompt's
    score averaged over the seeds, so the interval is over prompts: it does not measure seed-to-seed spread,
    which the per-seed rows show). Each is paired with the bundled model's all-Full row at the length
    (``minus_all_full``) and with the all-Full model given the same training and seed (``minus_control``;
    for the mean, the control's mean over the same seeds)."""
    base = _all_full_scores(rows, root)
    runs: dict[tuple[str, int], dict[int, tuple[dict, dict]]] = {}  # (variant, length) -> seed -> (row, scores)
    out = []
    for d in sorted(p for p in aware.glob("*-s*") if p.is_dir()):
        variant, seed = d.name.rsplit("-s", 1)
        if variant not in AWARE_VARIANTS or not seed.isdigit():
            continue
        f = d / "train-summary.json"
        train = json.loads(f.read_text()) if f.exists() else {}
        for e in sorted(d.glob("eval-long-*.json")):
            rep = json.loads(e.read_text())
            for r in rep["results"]:
                # a length evaluated on a second training of the same command (the first one's weights not
                # kept) carries that training's own summary
                again = d / f"retrain-{r['length']}-summary.json"
                retrained = again.exists()
                run = json.loads(again.read_text()) if retrained else train
                mine = sample_scores(rep, r["pattern"], r["length"])
                method, kept = AWARE_VARIANTS[variant]
                row = {"variant": variant, "seed": int(seed), "method": method, "retention": kept,
                       "pattern": r["pattern"], "length": r["length"], "ppl": r["ppl"], "ppl_ci95": r["ppl_ci95"],
                       "tasks": r["tasks"], "average": r["average"],
                       "average_ci95": average_ci95(mine),
                       "minus_all_full": paired_with(mine, base.get(r["length"])),
                       "train": {k: run.get(k) for k in ("steps", "tokens", "seconds", "pattern", "cross_layer")},
                       "retrained": retrained,
                       "file": str(e.relative_to(root)) if e.is_relative_to(root) else str(e),
                       "command": rep["command"]}
                runs.setdefault((variant, r["length"]), {})[int(seed)] = (row, mine)
                out.append(row)
    for (variant, length), seeds in runs.items():  # the control: the same seed's all-Full training
        control = runs.get(("full", length), {})
        for seed, (row, mine) in seeds.items():
            if variant != "full":
                row["minus_control"] = paired_with(mine, control[seed][1] if seed in control else None)
    for (variant, length), seeds in sorted(runs.items()):
        if len(seeds) < 2:
            continue
        mean = _seed_mean([m for _, m in seeds.values()])
        if mean is None:
            continue
        row = {**{k: seeds[min(seeds)][0][k] for k in ("variant", "method", "retention", "pattern", "length")},
               "seed": "mean", "seeds": sorted(seeds),
               "ppl": sum(r["ppl"]["wikitext"] for r, _ in seeds.values()) / len(seeds),
               "average": 100 * sum(sum(x for x, _ in v) / len(v) for v in mean.values()) / len(mean),
               "tasks": {k: 100 * sum(x for x, _ in v) / len(v) for k, v in mean.items()},
               "average_ci95": average_ci95(mean),
               "minus_all_full": paired_with(mean, base.get(length))}
        control = runs.get(("full", length), {})
        if variant != "full" and set(seeds) <= set(control):
            row["minus_control"] = paired_with(mean, _seed_mean([control[s][1] for s in seeds]))
        out.append(row)
    out.sort(key=lambda r: (r["length"], list(AWARE_VARIANTS).index(r["variant"]), str(r["seed"])))
    return out


def _all_full_scores(rows: list[dict], root: Path = ROOT) -> dict[int, dict]:
    """length -> the bundled all-Full row's per-prompt scores, which every other row is paired with."""
    full = {r["length"]: r for r in rows if r["method"] == "all Full"}
    return {n: sample_scores(json.loads((root / r["file"]).read_text()), r["pattern"], n) for n, r in full.items()}


def _seed_mean(runs: list[dict]) -> dict | None:
    """Each prompt's score averaged over several runs that scored the same prompts (None if they did not)."""
    first = runs[0]
    if not all(same_prompts(m, first) for m in runs):
        return None
    return {f: [(sum(m[f][j][0] for m in runs) / len(runs), first[f][j][1]) for j in range(len(first[f]))]
            for f in first}


def _diff_cell(d: dict | None) -> str:
    """``+1.0 [-3.0, +5.0] (noise)``: a paired difference of task averages, blank where there is none."""
    if not d:
        return ""
    return f"{d['average']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" + (" (noise)" if d["within_noise"] else "")


def aware_table(extra: list[dict]) -> str:
    """Markdown for :func:`aware_rows`."""

    lines = ["| length | variant | kept | pattern | training seed | WikiText-2 PPL | niah_single | passkey | avg "
             "[95% CI] | vs bundled all Full (paired 95% CI) | vs all Full, same training (paired 95% CI) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in extra:
        ppl = r["ppl"]["wikitext"] if isinstance(r["ppl"], dict) else r["ppl"]  # a seeds' mean: the mean
        seed = "mean of " + ", ".join(map(str, r["seeds"])) if r["seed"] == "mean" else r["seed"]
        if r.get("retrained"):  # the same training command run again, for this length (weights not kept)
            seed = f"{seed} (trained again)"
        t = r["tasks"]
        lines.append(f"| {r['length']} | {r['method']} | {r['retention']} | `{r['pattern']}` | {seed} | {ppl:.1f} | "
                     f"{t['niah_single']:.1f} | {t['passkey']:.1f} | {r['average']:.1f} "
                     f"[{r['average_ci95'][0]:.1f}, {r['average_ci95'][1]:.1f}] | "
                     f"{_diff_cell(r.get('minus_all_full'))} | {_diff_cell(r.get('minus_control'))} |")
    return "\n".join(lines) + "\n"


def plot_aware(rows: list[dict], trained: list[dict], path: Path) -> None:
    """Per length, each training-aware variant's task average and WikiText-2 perplexity (95% intervals)
    untrained (the bundled model on the same pattern, from ``rows``) and after its training, one point per
    seed, beside the bundled model's all Full."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in trained})
    fig, axes = plt.subplots(2, len(lengths), figsize=(6.2 * len(lengths), 8.4), dpi=110, squeeze=False)
    seeds = sorted({r["seed"] for r in trained if r["seed"] != "mean"})
    colors = ("tab:red", "tab:orange", "tab:brown", "tab:pink")
    marks = {"untrained": ("tab:gray", "o")} | {s: (colors[i % len(colors)], "s") for i, s in enumerate(seeds)}
    short = {"full": "all Full\n(the same training)", "aware-h2": "uniform 1/2", "aware-q2": "uniform 1/4",
             "searched-h2": "searched 1/2\nFFFFSFSSSFSSSFFS", "ablate-h2": "uniform 1/2\nw/o cross-layer loss"}

    def value(r: dict, key: str) -> tuple[float, float, float]:
        if key == "average":
            return r["average"], *r["average_ci95"]
        return r["ppl"]["wikitext"], *r["ppl_ci95"]["wikitext"]

    for col, length in enumerate(lengths):
        full = next((r for r in rows if r["length"] == length and r["method"] == "all Full"), None)
        names = [v for v in AWARE_VARIANTS if any(r["variant"] == v and r["length"] == length for r in trained)]
        for row, (key, ylabel) in enumerate((("average", "task average (x100) with 95% CI"),
                                             ("ppl", "WikiText-2 perplexity with 95% CI"))):
            ax = axes[row, col]
            if full is not None:
                y, lo, hi = value(full, key)
                ax.axhspan(lo, hi, color="0.9", label="bundled all Full 95% CI")
                ax.axhline(y, color="k", ls="--", lw=1)
            for i, v in enumerate(names):
                mine = sorted((r for r in trained if r["variant"] == v and r["length"] == length
                               and r["seed"] != "mean"), key=lambda r: r["seed"])
                before = next((r for r in rows if r["length"] == length and r["pattern"] == mine[0]["pattern"]), None)
                pts = ([("untrained", before)] if before is not None and v != "full" else []) + \
                    [(r["seed"], r) for r in mine]
                for j, (who, r) in enumerate(pts):
                    color, m = marks[who]
                    y, lo, hi = value(r, key)
                    ax.errorbar(i + 0.16 * (j - (len(pts) - 1) / 2), y, yerr=[[y - lo], [hi - y]], fmt=m,
                                color=color, ms=7, capsize=3, lw=1,
                                label=who if who == "untrained" else f"trained, seed {who}")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([short.get(v, v) for v in names], fontsize=8)
            ax.set_title(f"{length} tokens")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if key == "average":  # the perplexity panels below use the same marks
                handles, labels = ax.get_legend_handles_labels()
                keep = dict(zip(labels, handles, strict=True))  # one legend entry per label
                ax.legend(keep.values(), keep.keys(), fontsize=7, loc="center right")
    fig.suptitle("dsa-mini: training-aware IndexCache at 16K (20 steps), before and after, per training seed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def stability_rows(rows: list[dict], study: Path = STUDY, root: Path = ROOT) -> list[dict]:
    """The 16K-calibration searches' picks across sample seeds (``stability-16k/stability.json`` from
    scripts/pick_stability.py): one row per recipe, retention, pattern and
    length, with the seeds that picked it, its held-out loss minus all Full (the stability run's 16 windows)
    and, where it was evaluated (a row of the main table, or ``stability-16k/evals/eval-long-LENGTH-P.json``),
    its task average with its interval and its paired difference from all Full at that length. A pattern not
    evaluated at a length has no row there."""
    f = study / "stability-16k" / "stability.json"
    if not f.exists():
        return []
    table = json.loads(f.read_text())
    runs = table["runs"]
    loss = {r["pattern"]: r for r in table["heldout"]["losses"]["results"]}
    base = _all_full_scores(rows, root)
    evals: dict[tuple[str, int], tuple[dict, Path]] = {}  # (pattern, length) -> (result, its report)
    for r in rows:
        evals.setdefault((r["pattern"], r["length"]), (r, root / r["file"]))
    for e in sorted((study / "stability-16k" / "evals").glob("eval-long-*.json")):
        for r in json.loads(e.read_text())["results"]:
            evals[r["pattern"], r["length"]] = (r, e)
    out = []
    for recipe in dict.fromkeys(x["recipe"] for x in runs):
        mine = sorted((x for x in runs if x["recipe"] == recipe), key=lambda x: x["seed"])
        for key, kept in (("half", "1/2"), ("target", "1/4")):
            for pattern in dict.fromkeys(x[key] for x in mine if x[key]):
                seeds = [x["seed"] for x in mine if x[key] == pattern]
                held = loss.get(pattern)
                for length in sorted(base):
                    if (pattern, length) not in evals:
                        continue
                    r, e = evals[pattern, length]
                    scores = sample_scores(json.loads(e.read_text()), pattern, length)
                    file = str(e.relative_to(root)) if e.is_relative_to(root) else str(e)
                    out.append({"recipe": recipe, "retention": kept, "pattern": pattern, "seeds": seeds,
                                "of": len(mine), "length": length,
                                "heldout_minus_all_full": held and held["minus_all_full"],
                                "heldout_minus_all_full_ci95": held and held["minus_all_full_ci95"],
                                "tasks": r["tasks"], "average": r["average"], "average_ci95": average_ci95(scores),
                                "minus_all_full": paired_with(scores, base.get(length)), "file": file})
    for bench in (study / "speed.json", study / "stability-16k" / "speed.json"):  # the later file's rows win
        if bench.exists():
            add_speed(out, json.loads(bench.read_text()))
    return out


def stability_table(extra: list[dict]) -> str:
    """Markdown for :func:`stability_rows`."""
    lines = ["| recipe | kept | pattern | picked by seeds | held-out loss minus all Full [95% CI] | length | "
             "niah_single | passkey | avg [95% CI] | vs all Full (paired 95% CI) | prefill / decode b1 speedup |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in extra:
        held = (f"{r['heldout_minus_all_full']:+.4f} [{r['heldout_minus_all_full_ci95'][0]:+.4f}, "
                f"{r['heldout_minus_all_full_ci95'][1]:+.4f}]") if r["heldout_minus_all_full"] is not None else ""
        t = r["tasks"]
        lines.append(f"| {r['recipe']} | {r['retention']} | `{r['pattern']}` | {len(r['seeds'])} of {r['of']} "
                     f"({', '.join(map(str, r['seeds']))}) | {held} | {r['length']} | {t['niah_single']:.1f} | "
                     f"{t['passkey']:.1f} | {r['average']:.1f} [{r['average_ci95'][0]:.1f}, "
                     f"{r['average_ci95'][1]:.1f}] | {_diff_cell(r['minus_all_full'])} | {_speed_cell(r)} |")
    return "\n".join(lines) + "\n"


def _speed_cell(r: dict) -> str:
    """``1.60x / 1.45x (H200)``: a row's engine speedups and the GPU they were timed on."""
    if "speed" not in r:
        return ""
    gpu = (r["speed"].get("gpu") or "").replace("NVIDIA ", "").split()[0]
    return f"{r['speed']['prefill_speedup']:.2f}x / {r['speed']['decode_b1_speedup']:.2f}x ({gpu})"


def stability_unfinished(rows: list[dict], picks: list[dict], study: Path = STUDY, root: Path = ROOT) -> list[dict]:
    """The 16K picks' evaluations stopped before their end (``stability-16k/progress-32k/``): the families they
    finished (:func:`unfinished_rows`), named by the recipe and seeds that picked the pattern."""
    extra = unfinished_rows(rows, study / "stability-16k" / "progress-32k", root)
    f = study / "stability-16k" / "stability.json"
    runs = json.loads(f.read_text())["runs"] if f.exists() else []
    for r in extra:
        r["methods"] = []
        for recipe in dict.fromkeys(y["recipe"] for y in runs):
            for key, kept in (("half", "1/2"), ("target", "1/4")):
                seeds = [str(y["seed"]) for y in runs if y["recipe"] == recipe and y[key] == r["pattern"]]
                if seeds:
                    word = "seeds" if len(seeds) > 1 else "seed"
                    r["methods"].append((f"greedy ({recipe}, 16K, {word} {', '.join(seeds)})", kept))
    return extra


def add_speed(rows: list[dict], bench: dict) -> None:
    """Each row's engine speedups over all Full from an ``indexcache bench e2e --model`` report, matched by
    pattern and context length (``speed`` stays absent where the bench did not time the row)."""
    runs = {(r["pattern_str"], r["context"]): r for r in bench["runs"]}
    for r in rows:
        b = runs.get((r["pattern"], r["length"]))
        if b is not None and "prefill_speedup" in b:
            r["speed"] = {"prefill_speedup": b["prefill_speedup"], "decode_b1_speedup": b["decode_b1_speedup"],
                          "ttft_s": b["ttft_s"], "decode_b1_tok_s": b["decode_b1_tok_s"], "gpu": bench.get("gpu")}


def speed_columns() -> dict:
    def cell(key: str):
        return lambda r: f"{r['speed'][key]:.2f}x" if "speed" in r else ""
    return {"prefill speedup": cell("prefill_speedup"), "decode b1 speedup": cell("decode_b1_speedup")}


def main() -> None:
    rows, chance = gather()
    if not rows:
        raise SystemExit(f"no eval-long-*.json under {STUDY}")
    speed = STUDY / "speed.json"
    if speed.exists():
        add_speed(rows, json.loads(speed.read_text()))
    md = table(rows, chance, FAMILIES, ["niah_single", "passkey"], {"wikitext": "WikiText-2 PPL [95% CI]"},
               ppl_ci=True, extra=speed_columns() if speed.exists() else None)
    extra = unfinished_rows(rows)
    if extra:
        md += ("\n**Evaluations not finished yet** (`progress-32k/`, resumable with `--resume`): the families they "
               "finished, each with all its samples\n\n" + unfinished_table(extra))
    trained = aware_rows(rows)
    if trained:
        md += ("\n**Training-aware IndexCache** (the paper's Table 3; `aware/`, scripts/long_aware.sh: the bundled "
               "model trained 20 more steps at 16384 tokens, 2.6M tokens, for each variant's pattern; the same 50 "
               "prompts per family as the rows above; a seeds' mean averages each prompt over the seeds, so its "
               "interval is over prompts, not seeds)\n\n" + aware_table(trained))
    picks = stability_rows(rows)
    if picks:
        md += ("\n**How stable is a 16K search's pick** (`stability-16k/`, scripts/pick_stability.py: the greedy "
               "search on 4 x 16384 tokens with calibration sample seeds 0, 1 and 2, per recipe; the held-out loss "
               "on 16 x 16384 tokens of the trainer's held-out books; the tasks on the same 50 prompts per family "
               "as the rows above; speedups from `speed.json` (H200) or `stability-16k/speed.json` (H100), each "
               "over all Full on the same GPU)\n\n" + stability_table(picks))
        late = stability_unfinished(rows, picks)
        if late:
            md += ("\n**The 16K picks at 32K, evaluations not finished** (`stability-16k/progress-32k/`, resumable "
                   "with `--resume`): the families they finished, each with all its samples\n\n"
                   + unfinished_table(late))
    (STUDY / "study.json").write_text(json.dumps({"rows": rows, "chance": chance, "unfinished": extra,
                                                  "training_aware": trained, "stability": picks,
                                                  "stability_unfinished": late if picks else []}, indent=1) + "\n")
    (STUDY / "table.md").write_text(md)
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_tasks(rows, img / "long_study.png", ppl_key="wikitext", styles=STYLES,
               title="dsa-mini at 4K, 16K and 32K tokens: which layers keep their indexer")
    if trained:
        plot_aware(rows, trained, img / "long_aware.png")
    print(md)


if __name__ == "__main__":
    main()
