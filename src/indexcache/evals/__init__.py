"""Offline long-context evaluation: RULER-style task generators, passkey, MQAR, and the greedy-decoding runner."""

from .tasks import FAMILIES, Haystack, Needle, Sample, TaskError, make_sample, make_samples, parse_families, score

__all__ = ["FAMILIES", "Haystack", "Needle", "Sample", "TaskError", "make_sample", "make_samples", "parse_families",
           "score"]
