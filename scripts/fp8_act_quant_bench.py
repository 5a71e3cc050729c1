"""The FP8 linear layer with the activations quantised by plain PyTorch against the one-pass Triton
kernel, at DeepSeek-V3.2 projection shapes with 4096 and 32768 rows (one H200: results/scale/).

    python scripts/fp8_act_quant_bench.py OUT.json
"""

# ruff: noqa: B023  (every timed lambda runs inside the loop iteration that made it)
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from indexcache.bench.kernels import FP8_SHAPES, _bench  # noqa: E402
from indexcache.ops.fp8 import act_quant, block_quant  # noqa: E402
from indexcache.ops.fp8_gemm.kernel import act_quant as act_quant_kernel  # noqa: E402
from indexcache.ops.fp8_gemm.kernel import fp8_gemm  # noqa: E402


def main() -> None:
    rows = []
    for name in ("q_a", "kv_a", "o_proj", "expert_gate_up", "dense_down"):
        N, K = FP8_SHAPES[name]
        for M in (4096, 32768):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            wq, ws = block_quant(torch.randn(N, K, device="cuda") * 0.02)
            xq, xs = act_quant_kernel(x)
            gemm = _bench(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16))
            torch_quant = _bench(lambda: act_quant(x, 128, None))
            kernel_quant = _bench(lambda: act_quant_kernel(x))
            bf16 = (wq.float() * ws.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]).bfloat16()
            cublas = _bench(lambda: x @ bf16.T)
            rows.append({"layer": name, "M": M, "N": N, "K": K, "gemm_ms": gemm, "act_quant_torch_ms": torch_quant,
                         "act_quant_kernel_ms": kernel_quant, "bf16_cublas_ms": cublas,
                         "linear_with_kernel_quant_ms": gemm + kernel_quant,
                         "linear_tflops": 2 * M * N * K / (gemm + kernel_quant) / 1e9})
            r = rows[-1]
            print(f"| {name} | {M} x {N} x {K} | {gemm:.3f} | {torch_quant:.3f} | {kernel_quant:.3f} | "
                  f"{r['linear_tflops']:.0f} | {cublas:.3f} |", flush=True)
    Path(sys.argv[1]).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
