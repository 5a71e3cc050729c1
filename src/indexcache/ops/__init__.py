"""DSA's ops, one folder each, the plain-PyTorch reference beside the Triton kernel:

    ops/indexer/     reference.py  kernel.py   lightning-indexer logits; __init__: the chunked causal top-k
    ops/topk/        reference.py  kernel.py   top-k per row inside a key window
    ops/sparse_mla/  reference.py  kernel.py   MLA over the latent cache (sparse; dense and traced: reference)
    ops/fp8_gemm/    reference.py  kernel.py   block-scaled FP8 linear layers, the activations' quantisation
    ops/moe/         reference.py  kernel.py   the routed experts over stacked weights (grouped GEMM)
    ops/fp8.py                                 Hadamard rotation, e4m3 quantisation, block-FP8 dequantisation
    ops/common.py                              the flat layout (rows, caches, windows) and memory budgets
    ops/backends.py                            the registry: ``get_backend("torch" | "triton")``

Every kernel has the signature of its reference and is tested against it on fresh random inputs.
"""

from .backends import BACKENDS, Backend, get_backend
from .fp8 import act_quant, block_dequant, fake_quant_fp8, fp8_indexer_operands, hadamard_transform
from .indexer import dense_scores, indexer_topk
from .sparse_mla import mla_attention

__all__ = [
    "BACKENDS",
    "Backend",
    "act_quant",
    "block_dequant",
    "dense_scores",
    "fake_quant_fp8",
    "fp8_indexer_operands",
    "get_backend",
    "hadamard_transform",
    "indexer_topk",
    "mla_attention",
]
