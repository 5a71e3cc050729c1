"""DSA training (dense pretraining, indexer warm-up, sparse stage) with IndexCache's multi-layer distillation."""

from .losses import IndexerDistillation, index_log_probs, kl_rows
from .trainer import TrainConfig, train

__all__ = ["IndexerDistillation", "TrainConfig", "index_log_probs", "kl_rows", "train"]
