"""How many operators one decode step runs, by part of the model: the engine's decode step on the
GLM-4.7-Flash-DSA layer layout (47 layers, the first dense, the same attention, indexer and MoE structure as
`bench e2e`'s model, in bf16, at toy widths: the count of operators does not depend on the widths), on the
plain PyTorch ops and (with ``TRITON_INTERPRET=1``) on the Triton kernels, counted by a dispatch mode.

    TRITON_INTERPRET=1 python scripts/decode_op_count.py results/e2e/decode_op_count.json

Counted: ATen operators that launch work (views and bare allocations are not counted); on a GPU each is at
least one kernel, and in a CUDA graph each costs a few microseconds however small. Runs on CPU in seconds.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from indexcache.bench.e2e import GLM47_FLASH_DSA  # noqa: E402
from indexcache.config import DSAConfig  # noqa: E402
from indexcache.engine import Engine  # noqa: E402
from indexcache.model import dsa, rope  # noqa: E402
from indexcache.ops.triton_support import HAVE_TRITON, interpreted  # noqa: E402
from indexcache.pattern import Pattern  # noqa: E402

# toy widths, the real head counts (the kernels' launchers pad too few heads, which would add operators)
TOY_WIDTHS = dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                  q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  n_routed_experts=8, index_head_dim=32, index_topk=8, max_position_embeddings=4096)
NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
           "promote_types", "_unsafe_view"}


class OpCount(TorchDispatchMode):
    """Operators that launch work, in total and by the innermost region they ran in (``other`` outside
    every region). A Triton launch counts as one operator; what the CPU interpreter does inside it is not
    counted."""

    def __init__(self):
        super().__init__()
        self.total, self.inside, self.calls = 0, Counter(), Counter()
        self.region: list[str] = []
        self.in_kernel = 0

    def count(self, n: int = 1) -> None:
        self.total += n
        self.inside[self.region[-1] if self.region else "other"] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel and not func.is_view and func.overloadpacket.__name__ not in NO_WORK:
            self.count()
        return func(*args, **(kwargs or {}))


# (region, owner, attribute): the functions whose operators are counted apart
REGIONS = [("norm", dsa.RMSNorm, "forward"), ("rope", rope.Rope, "_apply"), ("moe", dsa.MoE, "forward"),
           ("dense mlp", dsa.MLP, "forward"), ("indexer projection", dsa.Indexer, "project"),
           ("indexer selection", Engine, "select_indices"), ("q/kv projections", dsa.MLA, "latents"),
           ("output projection", dsa.MLA, "project_out"), ("head", dsa.DSAForCausalLM, "head")]


def patched(counter: OpCount):
    """Wrap every region's function, and Triton's launches (interpreter) as one operator each."""
    saved = []

    def wrap(region: str, fn):
        def wrapped(*args, **kwargs):
            counter.calls[region] += 1
            counter.region.append(region)
            try:
                return fn(*args, **kwargs)
            finally:
                counter.region.pop()
        return wrapped

    for region, owner, attr in REGIONS:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrap(region, getattr(owner, attr)))
    try:
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def launch(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return run(self, *args, **kwargs)
            counter.count()
            counter.calls["triton launches"] += 1
            counter.in_kernel += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                counter.in_kernel -= 1

        saved.append((InterpretedFunction, "run", run))
        InterpretedFunction.run = launch
    except ImportError:  # no Triton: the torch backend only
        pass
    return saved


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "results/e2e/decode_op_count.json"
    cfg = DSAConfig.from_dict(dict(GLM47_FLASH_DSA, **TOY_WIDTHS))
    torch.manual_seed(0)
    model = dsa.DSAForCausalLM(cfg).init_random(0, std=0.05).eval()
    model.to_dtype(torch.bfloat16)  # the engine's dtype: the casts to and from fp32 are operators too
    L = cfg.num_hidden_layers
    rows = []
    # (label, backend, pairs up to which the MoE kernel gives each pair its own tile); 0: the table sorted
    # by expert at every size, as the kernel did before
    variants = [("torch", "torch", None)]
    if HAVE_TRITON and interpreted():
        from indexcache.ops.moe import kernel as moe_kernel

        variants += [("triton", "triton", moe_kernel.PER_PAIR_TILES), ("triton, MoE table sorted", "triton", 0)]
    for label, backend, per_pair in variants:
        if per_pair is not None:
            saved_per_pair, moe_kernel.PER_PAIR_TILES = moe_kernel.PER_PAIR_TILES, per_pair
        for name, pattern in (("all Full", Pattern.all_full(L)), ("uniform 1/4", Pattern.uniform(L, 4))):
            eng = Engine(model, pattern, max_len=64, chunk=32, backend=backend, cuda_graphs=False)
            logits = eng.prefill(0, torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(1)))
            counter = OpCount()
            saved = patched(counter)
            try:
                with counter:
                    eng.decode(logits.argmax(-1).view(1))
            finally:
                for owner, attr, fn in saved:
                    setattr(owner, attr, fn)
            rows.append({"ops": label, "pattern": name, "full_layers": len(pattern.full_layers),
                         "operators": counter.total, "by_region": dict(counter.inside.most_common()),
                         "calls": dict(counter.calls)})
            print(f"{label:24s} {name:12s} {counter.total:5d} operators per decode step: "
                  + ", ".join(f"{k} {v}" for k, v in counter.inside.most_common()))
        if per_pair is not None:
            moe_kernel.PER_PAIR_TILES = saved_per_pair
    report = {"about": __doc__.splitlines()[0], "command": "TRITON_INTERPRET=1 python scripts/decode_op_count.py "
              + str(out), "layout": {k: GLM47_FLASH_DSA[k] for k in ("num_hidden_layers", "first_k_dense_replace",
                                                                     "num_experts_per_tok", "n_shared_experts")},
              "toy_widths": TOY_WIDTHS, "torch": torch.__version__, "steps": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
