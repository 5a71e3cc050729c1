"""Benchmarks: kernels and the end-to-end engine, each writing JSON."""
