"""Peak memory and time of one dense training step (forward, LM loss, backward) of the bundled model, with
the attention through the fused path (``dense_mla_fused``, what dense training uses) and through the
chunked reference (``mla_attention``), one sequence per process so that each peak is its own.

    python scripts/dense_attention_memory.py results/train/dense_attention_memory.json

CPU: the peak is the process's maximum resident set (``ru_maxrss``), model and data included.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

STEP = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
from indexcache import load_model
from indexcache.bundled import default_model
length, path = int(sys.argv[1]), sys.argv[2]
if path == "reference":
    import indexcache.model.dsa as dsa
    from indexcache.ops.sparse_mla import mla_attention
    dsa.dense_mla_fused = lambda q, kv, scale, d_v, pos: mla_attention(q, kv, scale, d_v, q_pos=pos)[0]
model = load_model(default_model(), verbose=False).train()
ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
t0 = time.time()
logits = model(ids, dense=True)
F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
print(json.dumps({"tokens": length, "attention": path, "seconds": round(time.time() - t0, 1),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    runs = [(n, "fused") for n in (2048, 4096, 8192, 16384)] + [(n, "reference") for n in (2048, 4096)]
    rows = []
    for n, path in runs:
        done = subprocess.run([sys.executable, "-c", STEP, str(n), path], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"about": __doc__.splitlines()[0], "command": " ".join(["python", *sys.argv]),
                                 "device": "cpu", "machine": platform.processor() or platform.machine(),
                                 "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
