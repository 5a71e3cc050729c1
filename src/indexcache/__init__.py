"""IndexCache for DeepSeek-Sparse-Attention models."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, DSAConfig
from .model import DSAForCausalLM, Trace
from .pattern import Pattern, PatternError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DSAConfig",
    "DSAForCausalLM",
    "Pattern",
    "PatternError",
    "Trace",
    "load_model",
    "save_model",
]
