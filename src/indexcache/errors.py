"""The package's errors: one base class, one subclass per area. The CLI catches :class:`IndexCacheError`
and prints its message as one line with exit code 2; every message is a sentence that names the input at
fault and what would be accepted."""

from __future__ import annotations


class IndexCacheError(ValueError):
    """Bad input or a request the toolkit cannot carry out; the message names the problem in one line."""


class PatternError(IndexCacheError):
    """A pattern that cannot be used."""


class ConfigError(IndexCacheError):
    """A config.json we cannot model."""


class CheckpointError(IndexCacheError):
    """A checkpoint we cannot load as asked; the message names the files or tensors at fault."""


class DataError(IndexCacheError):
    """Unusable data; the message says what and where."""


class SearchError(IndexCacheError):
    """A search that cannot run with these settings."""


class TaskError(IndexCacheError):
    """A long-context task that cannot be built or scored as asked."""


class HFModelError(IndexCacheError):
    """A transformers model (or an operation on it) that the integration cannot handle."""


class OutputError(IndexCacheError):
    """An output path that cannot be written without losing something."""


class OptionError(IndexCacheError):
    """A command-line option with a value outside what it accepts."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HFModelError",
    "IndexCacheError",
    "OptionError",
    "OutputError",
    "PatternError",
    "SearchError",
    "TaskError",
]
