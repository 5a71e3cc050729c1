"""Top-k per row inside a key window: ``reference.py`` (plain PyTorch) beside ``kernel.py`` (Triton radix
selection), picked through :mod:`indexcache.ops.backends`."""

from .reference import topk

__all__ = ["topk"]
