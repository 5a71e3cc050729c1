"""The routed experts of a MoE layer over stacked expert weights: ``reference.py`` (plain PyTorch, one
expert at a time) beside ``kernel.py`` (Triton grouped GEMM: the (token, slot) pairs sorted by expert, each
program one tile of one expert's rows, the expert's weights read in place), picked through
:mod:`indexcache.ops.backends`."""

from .reference import moe_experts

__all__ = ["moe_experts"]
