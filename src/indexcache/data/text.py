"""Token data: text files (plain or .xz/.gz), directories of them, .jsonl with a "text" field, or token-id .npy."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError


def load_tokenizer(model_dir: str | Path):
    """The model directory's ``tokenizer.json`` (the `tokenizers` library, as transformers' fast tokenizers)."""
    from tokenizers import Tokenizer

    f = Path(model_dir) / "tokenizer.json"
    if not f.exists():
        raise DataError(f"{model_dir} has no tokenizer.json: pass token ids as a .npy file instead")
    return Tokenizer.from_file(str(f))


TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz")


def read_text_file(path: Path) -> str:
    """A text file, decompressing .xz / .gz; refuses binary data (a NUL byte) and text that is not UTF-8."""
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix)
    try:
        if opener is not None:
            with opener(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return decode_text(raw, path)


def decode_text(raw: bytes, path: str | Path) -> str:
    """UTF-8 text; a NUL byte or more than 0.1% undecodable bytes means the file is not text."""
    if b"\x00" in raw:
        raise DataError(f"{path} is not a text file (it holds NUL bytes): give a UTF-8 text file, a directory of "
                        ".txt/.txt.xz/.txt.gz books, a .jsonl with a 'text' field, or a token-id .npy")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > max(8, len(text) // 1000):
        raise DataError(f"{path} is not UTF-8 text ({bad} bytes do not decode): convert it to UTF-8, or give a "
                        "token-id .npy")
    return text


def list_text_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))


def read_texts(path: str | Path) -> list[str]:
    """Documents from a text file, a directory of text files (sorted; .txt, .txt.xz, .txt.gz), or a .jsonl
    with a "text" field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such data file or directory: {path}")
    if path.is_dir():
        files = list_text_files(path)
        if not files:
            raise DataError(f"directory {path} holds no .txt, .txt.xz or .txt.gz files")
        return [read_text_file(f) for f in files]
    if path.name.endswith((".jsonl", ".jsonl.xz", ".jsonl.gz")):
        texts = []
        for i, line in enumerate(read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{i} has no string 'text' field")
            texts.append(obj["text"])
        return texts
    return [read_text_file(path)]


def token_windows(
    path: str | Path,
    seq_len: int,
    tokenizer=None,
    max_windows: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] of token ids.

    A 2-D ``.npy`` is taken row by row (rows longer than ``seq_len`` are cut); a 1-D ``.npy`` or text
    is one stream cut into windows (documents joined by the tokenizer's text, a blank line apart).
    """
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    if path.suffix == ".npy":
        arr = load_npy(path)
        if arr.ndim == 2:
            if arr.shape[1] < seq_len:
                raise DataError(f"{path} rows have {arr.shape[1]} tokens, fewer than --seq-len {seq_len}")
            windows = torch.from_numpy(arr[:, :seq_len].astype(np.int64))
        else:
            windows = _cut(torch.from_numpy(arr.astype(np.int64)), seq_len, path)
    else:
        if tokenizer is None:
            raise DataError("text data needs a tokenizer (tokenizer.json in the model directory)")
        ids: list[int] = []
        for doc in read_texts(path):
            ids.extend(tokenizer.encode(doc).ids)
        windows = _cut(torch.tensor(ids, dtype=torch.long), seq_len, path)
    if max_windows is not None:
        windows = windows[:max_windows]
    if vocab_size is not None and windows.numel() and (int(windows.max()) >= vocab_size or int(windows.min()) < 0):
        raise DataError(f"{path} has token ids outside the model's vocabulary [0, {vocab_size})")
    return windows


def load_npy(path: Path) -> np.ndarray:
    """Integer token ids, [tokens] or [samples, seq_len], from a .npy file."""
    if not path.exists():
        raise DataError(f"no such data file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} as a .npy array ({e})") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path} holds {arr.dtype}, not integer token ids")
    if arr.ndim not in (1, 2):
        raise DataError(f"{path} has {arr.ndim} dimensions; expected [tokens] or [samples, seq_len]")
    return arr


def _cut(stream: torch.Tensor, seq_len: int, path: Path) -> torch.Tensor:
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(f"{path} has {stream.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)
