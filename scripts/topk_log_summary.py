"""Summarise the per-call lines of a ``bench kernels --parts topk_engine`` log (a run stopped before it wrote
its JSON keeps them): per schedule, the min / mean / median / max milliseconds a call, the calls where it was
slower than torch.topk, and the sample schedule's re-read and fallen-back rows.

    python scripts/topk_log_summary.py results/kernels/h200/topk_engine_partial.log \\
        results/kernels/h200/topk_engine_partial.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

LINE = re.compile(r"call (\d+) \((\d+) rows, up to (\d+) keys\): (.*) ms \(torch\.topk ([\d.]+)\); "
                  r"sample re-read (\d+), fell back (\d+) rows")


def summarise(text: str) -> dict:
    """The summary of every per-call line in ``text`` (a log), or a ValueError when it has none."""
    calls = []
    for m in LINE.finditer(text):
        times = {name: float(ms) for name, ms in (p.split() for p in m.group(4).split(", "))}
        calls.append({"call": int(m.group(1)), "rows": int(m.group(2)), "keys": int(m.group(3)), "ms": times,
                      "torch_topk_ms": float(m.group(5)), "re_read": int(m.group(6)), "fell_back": int(m.group(7))})
    if not calls:
        raise ValueError("no 'topk on engine logits, call N (...)' lines in the log")

    def stats(v: list[float]) -> dict:
        return {"min": min(v), "mean": statistics.fmean(v), "median": statistics.median(v), "max": max(v)}

    schedules = list(calls[0]["ms"])
    per = {s: dict(stats([c["ms"][s] for c in calls]),
                   slower_than_torch_topk=sum(c["ms"][s] > c["torch_topk_ms"] for c in calls)) for s in schedules}
    per["torch.topk"] = stats([c["torch_topk_ms"] for c in calls])
    return {"calls": len(calls), "rows": sorted({c["rows"] for c in calls}),
            "keys": [min(c["keys"] for c in calls), max(c["keys"] for c in calls)], "ms_per_call": per,
            "sample_faster_than_bucket": sum(c["ms"]["sample"] < c["ms"]["bucket"] for c in calls),
            "sample_re_read_rows": stats([float(c["re_read"]) for c in calls]),
            "sample_fell_back_rows": sum(c["fell_back"] for c in calls), "per_call": calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    try:
        summary = summarise(a.log.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"topk_log_summary: {e}") from None
    summary = {"command": f"python scripts/topk_log_summary.py {a.log} {a.out}", "log": str(a.log), **summary}
    a.out.write_text(json.dumps(summary, indent=1) + "\n")
    for s, v in summary["ms_per_call"].items():
        print(f"{s:11s} mean {v['mean']:.3f} ms  [{v['min']:.3f}, {v['max']:.3f}]"
              + (f"  slower than torch.topk in {v['slower_than_torch_topk']}/{summary['calls']}" if
                 "slower_than_torch_topk" in v else ""))


if __name__ == "__main__":
    main()
