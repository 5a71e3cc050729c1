"""RMSNorm over the last dimension: ``reference.py`` (plain PyTorch, the model's own math) beside
``kernel.py`` (Triton, one pass per row), picked through :mod:`indexcache.ops.backends`."""

from .reference import rms_norm

__all__ = ["rms_norm"]
