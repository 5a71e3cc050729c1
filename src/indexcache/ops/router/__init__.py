"""The MoE router (DeepSeek-V3's sigmoid gate with a selection-only bias and group-limited top-k):
``reference.py`` (plain PyTorch, the model's own math) beside ``kernel.py`` (Triton, one program per
token), picked through :mod:`indexcache.ops.backends`."""

from .reference import route

__all__ = ["route"]
