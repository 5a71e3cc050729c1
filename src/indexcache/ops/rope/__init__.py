"""Rotary position embedding applied to the rope part of queries and keys: ``reference.py`` (plain PyTorch,
the model's own math) beside ``kernel.py`` (Triton, one pass), picked through :mod:`indexcache.ops.backends`."""

from .reference import apply_rope

__all__ = ["apply_rope"]
