"""Inference engine: latent + Full-layer indexer caches, chunked prefill, batched decode with CUDA graphs."""

from .engine import CacheSpec, Engine, sample

__all__ = ["Engine", "CacheSpec", "sample"]
