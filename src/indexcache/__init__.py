"""IndexCache for DeepSeek-Sparse-Attention models."""

__version__ = "0.1.0"  # before the imports: outputs.py reads it

from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, DSAConfig
from .errors import IndexCacheError
from .model import DSAForCausalLM, Trace
from .pattern import Pattern, PatternError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DSAConfig",
    "DSAForCausalLM",
    "IndexCacheError",
    "Pattern",
    "PatternError",
    "Trace",
    "load_model",
    "save_model",
]
