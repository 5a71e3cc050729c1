"""Error bounds for comparing a kernel with its reference, derived from the dtype and the reduction length
so that they hold on any GPU (not tuned to one).

A kernel and the reference see the same inputs (the reference upcasts the kernel's bf16/fp8 operands to
fp32), so they differ only by how the kernel rounds:

* accumulation: a sum of ``n`` terms accumulated with unit roundoff ``u`` is off by at most
  ``gamma(n, u) = n u / (1 - n u)`` times the sum of the terms' magnitudes (Higham, Accuracy and Stability
  of Numerical Algorithms, 3.1). bf16/fp16 tensor-core products accumulate in fp32 (``u = 2^-24``); Hopper's
  fp8 tensor cores keep about 14 bits while accumulating (the DeepSeek-V3 report), ``u = 2^-14``;
* operands a kernel rounds itself (flash attention's probabilities cast to bf16 before ``P @ V``), once
  each, ``u = 2^-8`` for bf16 (8 significant bits: half a unit in the last place is 2^-8 of the
  smallest value with that exponent).

Tests therefore compare elementwise against ``bound * magnitude``, where ``magnitude`` is the same
computation on absolute values.
"""

from __future__ import annotations

U_FP32 = 2.0**-24
U_BF16 = 2.0**-8  # round to nearest, 8 significant bits (7 stored): u = 2^-p
U_FP16 = 2.0**-11
U_FP8_ACCUMULATE = 2.0**-14
# fp32 products as three tf32 tensor-core products (ops.triton_support's "tf32x3"): each operand is split
# into a tf32 head (10 stored bits: off by at most 2^-10 of the value, truncated or rounded) and a tf32 tail
# (the rest, again to 10 bits: off by 2^-20); head x head + head x tail + tail x head then misses each
# tail's error (2^-20 of the product each) and the dropped tail x tail (2^-20): 3 x 2^-20 < 2^-18
U_TF32X3 = 2.0**-18


def gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
