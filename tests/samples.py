"""Text the tests feed the trained bundled model: its tokens, read with the model's own tokenizer."""

from __future__ import annotations

import torch

OPENING = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair. "
) * 3


def opening_ids(model_dir, tokens: int = 512) -> torch.Tensor:
    """[1, <= tokens] ids of :data:`OPENING`."""
    from indexcache.data.text import load_tokenizer

    return torch.tensor([load_tokenizer(model_dir).encode(OPENING).ids[:tokens]])
