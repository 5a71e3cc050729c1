"""Do two `indexcache eval` reports agree, sample by sample? For a change that should not move the answers
(another kernel, other fp32 products, another GPU), on the prompts both scored:

    python scripts/compare_evals.py BASE.json OTHER.json [--out compare.json]

matches the samples by pattern, length, family and index (the same prompts when both ran with the same
seed and haystack), and reports per family how many have the same outputs and the same scores, each
report's score on the shared samples, and each row's perplexity and seconds per sample. Exits 1 when the
reports share no sample, 2 when one cannot be read or a shared index holds another prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _key(s: dict) -> tuple:
    return s["pattern"], s["length"], s["family"], s["index"]


def compare(base: dict, other: dict) -> dict:
    """The agreement of ``other`` with ``base`` on their shared samples, per (pattern, length, family)."""
    theirs = {_key(s): s for s in other["samples"]}
    groups: dict[tuple, dict] = {}
    for s in base["samples"]:
        t = theirs.get(_key(s))
        if t is None:
            continue
        if s["answers"] != t["answers"]:
            raise ValueError(f"sample {_key(s)} has other answers in the two reports: not the same prompt")
        g = groups.setdefault(_key(s)[:3], {"samples": 0, "same_outputs": 0, "same_scores": 0, "base_score": 0.0,
                                             "other_score": 0.0, "differ": []})
        g["samples"] += 1
        g["same_outputs"] += s["outputs"] == t["outputs"]
        g["same_scores"] += s["score"] == t["score"]
        g["base_score"] += s["score"]
        g["other_score"] += t["score"]
        if s["outputs"] != t["outputs"]:
            g["differ"].append({"index": s["index"], "base": s["outputs"], "other": t["outputs"],
                                "base_score": s["score"], "other_score": t["score"]})
    rows = []
    for (pattern, length, family), g in sorted(groups.items()):
        n = g["samples"]
        rows.append({"pattern": pattern, "length": length, "family": family, **g,
                     "base_score": 100 * g["base_score"] / n, "other_score": 100 * g["other_score"] / n})

    def timing(report: dict) -> list[dict]:
        out = []
        for r in report["results"]:
            n = sum(1 for s in report["samples"] if (s["pattern"], s["length"]) == (r["pattern"], r["length"]))
            out.append({"pattern": r["pattern"], "length": r["length"], "samples": n, "seconds": r.get("seconds"),
                        "ppl": r.get("ppl", {})})
        return out

    return {"base": base.get("command"), "other": other.get("command"), "rows": rows,
            "base_rows": timing(base), "other_rows": timing(other)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--out", help="JSON to write (the comparison, with both reports' commands)")
    a = ap.parse_args(argv)
    try:
        result = compare(json.loads(Path(a.base).read_text()), json.loads(Path(a.other).read_text()))
    except (OSError, ValueError, KeyError) as e:
        print(f"compare_evals: {e}", file=sys.stderr)
        return 2
    if not result["rows"]:
        print("compare_evals: the two reports share no sample (other seeds, lengths or patterns?)", file=sys.stderr)
        return 1
    print("| pattern | length | family | samples | same outputs | same scores | base | other |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['pattern']} | {r['length']} | {r['family']} | {r['samples']} | {r['same_outputs']} | "
              f"{r['same_scores']} | {r['base_score']:.1f} | {r['other_score']:.1f} |")
    for name in ("base_rows", "other_rows"):
        for r in result[name]:
            per = r["seconds"] / r["samples"] if r["seconds"] and r["samples"] else float("nan")
            print(f"{name[:-5]}: {r['pattern']} at {r['length']}: {r['samples']} samples, {per:.2f} s each (with "
                  f"its perplexity windows), perplexity {r['ppl']}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
