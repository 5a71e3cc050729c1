"""MLA attention over the latent cache: ``reference.py`` (plain PyTorch: the batched dense / sparse /
traced form, and the flat sparse op) beside ``kernel.py`` (Triton sparse prefill and split-K decode),
picked through :mod:`indexcache.ops.backends`."""

from .reference import dense_mla_fused, mla_attention, sparse_mla

__all__ = ["dense_mla_fused", "mla_attention", "sparse_mla"]
