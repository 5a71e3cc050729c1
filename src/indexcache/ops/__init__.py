"""Plain-PyTorch reference ops. Every fast kernel is tested against these."""

from .fp8 import act_quant, block_dequant, fake_quant_fp8, hadamard_transform
from .indexer import indexer_scores, indexer_topk
from .sparse_mla import mla_attention

__all__ = [
    "act_quant",
    "block_dequant",
    "fake_quant_fp8",
    "hadamard_transform",
    "indexer_scores",
    "indexer_topk",
    "mla_attention",
]
