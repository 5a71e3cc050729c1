"""Calibration sets: fixed, seeded token windows on which every candidate pattern is scored."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .synthetic import corpus
from .text import DataError, load_npy, load_tokenizer, read_texts


@dataclass
class Calibration:
    windows: torch.Tensor  # [num_samples, seq_len] int64
    source: str
    answer_share: float | None = None  # with retrieval episodes: the share of tokens only a look-up predicts

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()[:16]

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return [self.windows[i : i + batch_size] for i in range(0, self.windows.shape[0], batch_size)]


def load_calibration(
    model_dir: str | Path | None,
    data: str | Path | None,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    index_topk: int | None = None,
    vocab_size: int | None = None,
    retrieval_mix: float | None = None,
) -> Calibration:
    """``num_samples`` windows of ``seq_len`` tokens, drawn with ``seed`` from ``data`` (text file, directory,
    .jsonl, or a token-id .npy) or, with no data, from the built-in synthetic corpus (tokenized with the
    model directory's tokenizer). Refuses windows not longer than ``index_topk``: there every query keeps
    all its tokens and every pattern gives the same loss.

    ``retrieval_mix`` D: each window is the text with retrieval episodes spliced in until about D of its
    tokens are structured (facts stated and asked for later, repeated spans, tables, chains: the
    trainer's generator, :mod:`indexcache.train.retrieval`, whose templates are disjoint from the task
    suite's), so that the calibration loss sees what sharing breaks in look-ups."""
    if num_samples < 1:
        raise DataError(f"--num-samples must be positive, got {num_samples}")
    if retrieval_mix is not None and not 0 < retrieval_mix <= 0.9:
        raise DataError(f"--retrieval-mix must be in (0, 0.9], got {retrieval_mix:g}")
    if index_topk is not None and seq_len <= index_topk:
        raise DataError(
            f"calibration sequences of {seq_len} tokens are not longer than index_topk={index_topk}: every "
            "query would keep all its tokens and every pattern would give the same loss (use a larger --seq-len)"
        )
    rng = np.random.default_rng(seed)
    if data is not None and str(data).endswith(".npy"):
        arr = load_npy(Path(data))
        if arr.ndim == 2:
            if retrieval_mix is not None:
                raise DataError(f"--retrieval-mix splices episodes into text or a token stream; {data} holds "
                                "ready windows (rows), which are taken as they are")
            if arr.shape[1] < seq_len:
                raise DataError(f"{data} rows have {arr.shape[1]} tokens, fewer than --seq-len {seq_len}")
            rows = rng.permutation(arr.shape[0])[:num_samples]
            windows = torch.from_numpy(arr[np.sort(rows), :seq_len].astype(np.int64))
            return _check(Calibration(windows, f"{data} (rows)"), num_samples, vocab_size)
        stream, source = arr.astype(np.int64), str(data)
    else:
        if model_dir is None:
            raise DataError("text calibration needs the model directory's tokenizer")
        tok = load_tokenizer(model_dir)
        if data is None:
            docs, source = corpus(num_samples * seq_len * 6, seed), f"built-in synthetic corpus (seed {seed})"
        else:
            docs, source = read_texts(data), str(data)
        ids: list[int] = []
        for d in docs:
            ids.extend(tok.encode(d).ids)
        stream = np.asarray(ids, dtype=np.int64)
    if retrieval_mix is not None:
        return _retrieval_windows(model_dir, stream, source, num_samples, seq_len, seed, retrieval_mix, vocab_size)
    n_windows = stream.shape[0] // seq_len
    if n_windows == 0:
        raise DataError(f"{source} has {stream.shape[0]} tokens, fewer than one window of --seq-len {seq_len}")
    picked = np.sort(rng.permutation(n_windows)[:num_samples])
    windows = torch.from_numpy(np.stack([stream[i * seq_len : (i + 1) * seq_len] for i in picked]))
    return _check(Calibration(windows, source), num_samples, vocab_size)


def _retrieval_windows(model_dir, stream: np.ndarray, source: str, num_samples: int, seq_len: int, seed: int,
                       density: float, vocab_size: int | None) -> Calibration:
    from ..train.retrieval import retrieval_window

    if model_dir is None:
        raise DataError("--retrieval-mix needs the model directory's tokenizer to write its episodes")
    tok = load_tokenizer(model_dir)
    windows, answers = [], 0
    for i in range(num_samples):  # each window from (seed, i) alone
        ids, mask = retrieval_window(stream, tok, seq_len, np.random.default_rng([seed, i, 0x5E4C]), density=density)
        windows.append(ids)
        answers += int(mask.sum())
    share = answers / (num_samples * seq_len)
    cal = Calibration(torch.from_numpy(np.stack(windows)),
                      f"{source} with retrieval episodes (about {density:g} of each window; {share:.1%} of the "
                      "tokens are answers)")
    cal.answer_share = share
    return _check(cal, num_samples, vocab_size)


def _check(cal: Calibration, wanted: int, vocab_size: int | None) -> Calibration:
    w = cal.windows
    if vocab_size is not None and (int(w.max()) >= vocab_size or int(w.min()) < 0):
        raise DataError(f"{cal.source} has token ids outside the model's vocabulary [0, {vocab_size})")
    if w.shape[0] < wanted:
        print(f"indexcache: {cal.source} holds only {w.shape[0]} windows; using all of them", file=sys.stderr)
    return cal
