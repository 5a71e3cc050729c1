"""Gather the long-context study's evaluation JSONs into one table (markdown + JSON) and draw its figure.

    python scripts/long_study_report.py

Reads results/study-long/eval-long-LENGTH-PATTERN.json (from scripts/long_study.sh) and, where it exists,
results/study-long/speed.json (`indexcache bench e2e --model models/dsa-mini --pattern P ...`: each row's
prefill and batch-1 decode speedup over all Full at the same length, beside its scores), and names each pattern's
method from the searches that picked it: the 1K greedy searches of results/search/stability-16k-model (books
and retrieval windows, sample seed 0), the 16K greedy search of results/study-long/search-books-16k and the
similarity DP of results/study-long/similarity-16k. Evaluations stopped before their end
(results/study-long/progress-32k/*.json.partial) add the families they finished, in a table of their own.
Writes results/study-long/study.json,
results/study-long/table.md and docs/img/long_study.png.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from study_report import add_intervals, plot_tasks, sample_scores, table  # noqa: E402

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
                if [i for _, i in ref] == [i for _, i in mine]:  # the same prompts, in the same order
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
    (STUDY / "study.json").write_text(json.dumps({"rows": rows, "chance": chance, "unfinished": extra}, indent=1)
                                      + "\n")
    (STUDY / "table.md").write_text(md)
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_tasks(rows, img / "long_study.png", ppl_key="wikitext", styles=STYLES,
               title="dsa-mini at 4K, 16K and 32K tokens: which layers keep their indexer")
    print(md)


if __name__ == "__main__":
    main()
