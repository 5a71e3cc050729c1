"""The routed experts of a MoE layer over stacked expert weights: ``reference.py`` (plain PyTorch, one
expert at a time) beside ``kernel.py`` (Triton grouped GEMM: the (token, slot) pairs sorted by expert, each
program one tile of one expert's rows, the expert's weights read in place), picked through
:mod:`indexcache.ops.backends`."""

from .reference import FP8_PARTS, moe_experts, moe_experts_fp8

__all__ = ["FP8_PARTS", "moe_experts", "moe_experts_fp8"]
