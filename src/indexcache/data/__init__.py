"""Text and token data: readers, calibration sets, and a built-in synthetic corpus."""

from .calibration import Calibration, load_calibration
from .text import DataError, load_tokenizer, read_texts, token_windows

__all__ = ["Calibration", "DataError", "load_calibration", "load_tokenizer", "read_texts", "token_windows"]
