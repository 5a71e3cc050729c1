"""Training data: a byte-level BPE tokenizer trained on the corpus, whole-book held-out splits, and
random long windows from one token stream."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..data.text import DataError, list_text_files, read_text_file, read_texts

EOS, PAD = "<|endoftext|>", "<|pad|>"


def split_documents(path: str | Path, heldout: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Training texts, held-out texts (whole files: a directory's files, seeded choice) and the held-out
    file names. A single file or .jsonl holds out whole documents instead."""
    path = Path(path)
    if path.is_dir():
        files = list_text_files(path)
        if len(files) <= heldout:
            raise DataError(f"{path} has {len(files)} text files; cannot hold out {heldout} of them")
        held = set(random.Random(seed).sample(range(len(files)), heldout))
        train = [read_text_file(f) for i, f in enumerate(files) if i not in held]
        test = [read_text_file(f) for i, f in enumerate(files) if i in held]
        return train, test, [files[i].name for i in sorted(held)]
    docs = read_texts(path)
    if len(docs) <= heldout:
        raise DataError(f"{path} has {len(docs)} documents; cannot hold out {heldout} of them")
    held = set(random.Random(seed).sample(range(len(docs)), heldout))
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held],
            [f"document {i}" for i in sorted(held)])


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path, max_chars: int = 40_000_000) -> None:
    """Byte-level BPE with the `tokenizers` library; writes tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)

    def chunks():
        used = 0
        for t in texts:
            for i in range(0, len(t), 100_000):
                if used >= max_chars:
                    return
                piece = t[i : i + 100_000]
                used += len(piece)
                yield piece

    tok.train_from_iterator(chunks(), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD, "bos_token": None,
        "model_max_length": 1 << 20}, indent=2))


def tokenize(texts: list[str], tokenizer) -> np.ndarray:
    """One stream: every document's tokens followed by the end-of-text token."""
    eos = tokenizer.token_to_id(EOS)
    parts = []
    for t in texts:
        ids = [e.ids for e in tokenizer.encode_batch([t[i : i + 200_000] for i in range(0, len(t), 200_000)])]
        parts.append(np.fromiter((x for chunk in ids for x in chunk), dtype=np.int32))
        if eos is not None:
            parts.append(np.array([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def sample_windows(stream: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """``batch`` random windows of ``seq_len`` tokens; the same (seed, step) always gives the same batch,
    so a resumed run sees the data it would have seen."""
    if stream.shape[0] <= seq_len:
        raise DataError(f"the token stream ({stream.shape[0]} tokens) is shorter than one window of {seq_len}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.shape[0] - seq_len, size=batch)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))


def fixed_windows(stream: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """``n`` evenly spaced windows (held-out evaluation: the same every time)."""
    if stream.shape[0] <= seq_len:
        raise DataError(f"the held-out stream ({stream.shape[0]} tokens) is shorter than {seq_len}")
    starts = np.linspace(0, stream.shape[0] - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))
