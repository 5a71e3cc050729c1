"""How often the sample top-k's threshold would mislead on the engine's own index logits, emulated in
PyTorch on CPU: layer 0 of `bench e2e`'s random GLM-4.7-Flash-DSA model (its real indexer widths, 32 heads
x 128, rope 64, theta 1e6; vocabulary and experts cut, which layer 0's logits do not depend on) scores the
last 64 query rows of a T-token sequence of random ids, and the kernel's rule (a sample of NS keys in runs
of CH, its j-th largest with j set for about 1.5 k candidates) is applied to each row; a row is missed when
fewer than k or more than cap keys reach the threshold. Random normal rows of the same windows beside it.

    python scripts/topk_sample_emulation.py results/kernels/topk_sample_emulation.json [T ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from indexcache.bench.e2e import GLM47_FLASH_DSA  # noqa: E402
from indexcache.config import DSAConfig  # noqa: E402
from indexcache.model.dsa import DSAForCausalLM  # noqa: E402
from indexcache.ops.indexer.reference import indexer_logits  # noqa: E402

K, CAP, ROWS = 2048, 4096, 64


def layer0_logits(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index logits [ROWS, T] of the last ROWS positions and their window ends, on the e2e model's init."""
    import dataclasses

    cfg = DSAConfig.from_dict(dict(GLM47_FLASH_DSA, n_routed_experts=2, num_hidden_layers=1, vocab_size=4096))
    with torch.device("meta"):
        model = DSAForCausalLM(cfg)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # bench e2e's random_model: norms 1, the rest N(0, 0.02)
            p.fill_(1.0) if ("norm" in name and name.endswith("weight")) else p.normal_(0.0, 0.02, generator=g)
        for b in model.buffers():
            b.zero_()
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
        ctx = model.make_context(T)
        layer = model.model.layers[0]
        att = layer.self_attn
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        rows = torch.arange(T - ROWS, T)
        ctx_q = dataclasses.replace(ctx, rope=type(ctx.rope)(cfg, rows, torch.float32), positions=rows)
        xq = x[:, rows]
        q, w, _ = att.indexer.project(xq, att.q_a_layernorm(att.q_a_proj(xq)), ctx_q)
        _, _, k = att.indexer.project(x, att.q_a_layernorm(att.q_a_proj(x)), ctx)
        ke = (rows + 1).to(torch.int32)
        return indexer_logits(q[0], k, w[0], torch.zeros_like(ke), ke, att.indexer.softmax_scale), ke


def candidates(logits: torch.Tensor, ke: torch.Tensor, NS: int, CH: int) -> list[int]:
    """Keys reaching each row's sampled threshold (the kernel's _sample_key / _sample_rank in PyTorch)."""
    out = []
    i = torch.arange(NS)
    for r in range(logits.shape[0]):
        n = int(ke[r])
        row = logits[r, :n]
        stride = (n - CH) // (NS // CH - 1)
        j = min(max((3 * K * NS + 2 * n - 1) // (2 * n), 1), NS)
        tau = row[(i // CH) * stride + (i % CH)].topk(j).values[-1]
        out.append(int((row >= tau).sum()))
    return out


def main(out: str, lengths: list[int]) -> dict:
    res: dict = {"command": "python scripts/topk_sample_emulation.py " + " ".join([out, *map(str, lengths)]),
                 "about": __doc__.strip().split("\n\n")[0], "k": K, "cap": CAP, "rows": ROWS, "runs": []}
    for T in lengths:
        t0 = time.time()
        lg, ke = layer0_logits(T)
        normal = torch.randn(lg.shape, generator=torch.Generator().manual_seed(1))
        for NS, CH in ((2048, 128), (2048, 8), (4096, 8)):
            for name, x in (("engine layer 0", lg), ("random normal", normal)):
                c = torch.tensor(candidates(x, ke, NS, CH))
                missed = float(((c < K) | (c > CAP)).float().mean())
                res["runs"].append({"T": T, "logits": name, "sample_keys": NS, "run": CH, "missed_share": missed,
                                    "candidates_median": int(c.median()), "candidates_min": int(c.min()),
                                    "candidates_max": int(c.max())})
                print(f"T={T} {name:14s} sample {NS} in runs of {CH:3d}: missed {100 * missed:4.1f}%, candidates "
                      f"median {int(c.median())} [{int(c.min())}, {int(c.max())}]", flush=True)
        res["runs"][-1]["seconds_for_T"] = round(time.time() - t0, 1)
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or [65536, 200000])
