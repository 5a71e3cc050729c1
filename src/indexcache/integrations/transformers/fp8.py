"""transformers' fine-grained FP8 layers on this package's block-FP8 GEMM.

transformers loads a block-FP8 checkpoint with its own quantizer: ``FP8Linear`` and ``FP8Experts`` hold the
e4m3 weights and their 128 x 128 scales, so the model's footprint on the GPU is its FP8 size. Their products
go to a kernel bundle fetched from the Hugging Face Hub by the ``kernels`` package (or to DeepGEMM, fetched
the same way). On a machine without that package, or without a network, those layers cannot run.
:func:`provide_fp8_matmul` then fills transformers' kernel slot with :func:`indexcache.ops.fp8_gemm.fp8_linear`
(the Triton kernel on CUDA, the plain reference elsewhere): transformers' loading, modules and expert
dispatch stay as they are, only the product is ours.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.fp8 import block_dequant
from ...ops.fp8_gemm import BLOCK, fp8_linear


def _backend(x: torch.Tensor) -> str:
    from ...ops.triton_support import HAVE_TRITON

    return "triton" if HAVE_TRITON and x.is_cuda else "torch"


def _wide(weight: torch.Tensor) -> bool:
    return weight.element_size() > 1  # dequantised in place (:func:`dequantize_fp8_modules`)


def _check(weight: torch.Tensor, block_size, activation_scale) -> None:
    if _wide(weight):
        return
    if weight.dtype != torch.float8_e4m3fn:
        raise NotImplementedError(f"only e4m3 block-FP8 weights run on this package's kernel, got {weight.dtype}")
    if block_size is None or list(block_size) != [BLOCK, BLOCK]:
        raise NotImplementedError(f"only {BLOCK} x {BLOCK} weight blocks run on this package's kernel, "
                                  f"got {block_size}")
    if activation_scale is not None:
        raise NotImplementedError("static activation scales are not supported here (use activation_scheme "
                                  "'dynamic', the DeepSeek layout)")


def _product(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] @ weight.T with per-token, per-128-channel e4m3 activations; K not a multiple of 128 (tiny
    test shapes only) is zero-padded, which changes neither the block maxima nor the product. A dequantised
    weight is a plain product."""
    if _wide(weight):
        return F.linear(x, weight.to(x.dtype)).to(out_dtype)
    scale_fmt = "ue8m0" if scale.dtype == getattr(torch, "float8_e8m0fnu", None) else None
    scale = scale.float()
    K = x.shape[-1]
    if K % BLOCK:
        pad = BLOCK - K % BLOCK
        x, weight = F.pad(x, (0, pad)), F.pad(weight.view(torch.uint8), (0, pad)).view(weight.dtype)
    return fp8_linear(x, weight, scale, _backend(x), scale_fmt).to(out_dtype)


def matmul_2d(input: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size,
              output_dtype: torch.dtype | None = None, activation_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The slot ``FP8Linear`` and the eager ``FP8Experts`` loop call: input [..., K], weight [N, K]."""
    _check(weight, block_size, activation_scale)
    return _product(input, weight, weight_scale_inv, output_dtype or input.dtype)


def matmul_batched(input: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size=None,
                   expert_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Row s of input [S, K] times expert ``expert_ids[s]`` of weight [E, N, K]; rows routed past the last
    expert (expert-parallel sentinels) are left zero."""
    _check(weight, block_size, None)
    out = input.new_zeros(input.shape[0], weight.shape[1])
    for e in torch.unique(expert_ids).tolist():
        if 0 <= e < weight.shape[0]:
            rows = (expert_ids == e).nonzero().squeeze(1)
            out[rows] = _product(input[rows], weight[e], weight_scale_inv[e], input.dtype)
    return out


def matmul_grouped(input: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                   offsets: torch.Tensor | None = None, tokens_per_expert: torch.Tensor | None = None,
                   block_size=None) -> torch.Tensor:
    """input [S, K] sorted by expert, expert e's rows ending at ``offsets[e]``; rows past the last offset
    are left zero."""
    _check(weight, block_size, None)
    out = input.new_zeros(input.shape[0], weight.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = _product(input[start:end], weight[e], weight_scale_inv[e], input.dtype)
        start = end
    return out


def hub_kernels_available() -> bool:
    """Whether transformers can fetch its own FP8 kernels (the ``kernels`` package is installed)."""
    from transformers.utils.import_utils import is_kernels_available

    return bool(is_kernels_available())


def provide_fp8_matmul(force: bool = False) -> bool:
    """Put this package's block-FP8 GEMM into transformers' fine-grained FP8 kernel slot, unless transformers
    can fetch its own (``force`` replaces it anyway). Returns whether the slot now holds ours."""
    import transformers.integrations.finegrained_fp8 as tf8

    current = tf8._FINEGRAINED_FP8
    if current is not None and current.matmul is matmul_2d:
        return True
    if not force and (current is not None or hub_kernels_available()):
        return False
    tf8._FINEGRAINED_FP8 = tf8.FineGrainedFP8(matmul=matmul_2d, batched_matmul=matmul_batched,
                                              grouped_matmul=matmul_grouped)
    return True


def is_fp8_checkpoint(raw_config: dict) -> bool:
    q = raw_config.get("quantization_config") or {}
    return q.get("quant_method") == "fp8"


@contextmanager
def fp8_layers_on_any_device():
    """Load block-FP8 checkpoints into transformers' FP8 layers on every device. Without a GPU, transformers
    5.23 turns them to bf16 itself, and its dequantisation reads the scale grid as equal blocks of
    rows / scale rows: wrong for a weight whose rows are not a multiple of 128 (it mis-scales 144 rows in
    two blocks, and refuses DeepSeek-V3.2's 576-row ``kv_a_proj_with_mqa``). :func:`dequantize_fp8_modules`
    then dequantises with the checkpoint's 128 x 128 blocks, where wide weights are wanted."""
    import logging

    from transformers.quantizers import quantizer_finegrained_fp8 as quantizer

    original = quantizer.FineGrainedFP8HfQuantizer.validate_environment
    log = logging.getLogger(quantizer.__name__)
    level = log.level

    def validate(self, *args, **kwargs):
        wanted = self.quantization_config.dequantize
        log.setLevel(logging.ERROR)  # its notice that it will dequantise would be wrong here
        try:
            original(self, *args, **kwargs)
        finally:
            log.setLevel(level)
        self.quantization_config.dequantize = wanted

    quantizer.FineGrainedFP8HfQuantizer.validate_environment = validate
    try:
        yield
    finally:
        quantizer.FineGrainedFP8HfQuantizer.validate_environment = original


@torch.no_grad()
def dequantize_fp8_modules(model: nn.Module, dtype: torch.dtype) -> int:
    """Turn every e4m3 weight of transformers' FP8 layers (``X`` beside ``X_scale_inv``, or ``weight`` beside
    ``weight_scale_inv``) into ``dtype`` with its 128 x 128 block scales, in place; the layers then run
    plain products. Returns how many weights were dequantised."""
    count = 0
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            scale = getattr(module, f"{name}_scale_inv", None)
            if scale is None and name == "weight":
                scale = getattr(module, "weight_scale_inv", None)
            if param.dtype != torch.float8_e4m3fn or scale is None:
                continue
            flat, s = param.view(-1, *param.shape[-2:]), scale.float().view(-1, *scale.shape[-2:])
            wide = torch.stack([block_dequant(flat[e], s[e]) for e in range(flat.shape[0])]).to(dtype)
            setattr(module, name, nn.Parameter(wide.view(param.shape), requires_grad=False))
            count += 1
    return count


__all__ = ["dequantize_fp8_modules", "fp8_layers_on_any_device", "hub_kernels_available", "is_fp8_checkpoint",
           "matmul_2d", "matmul_batched", "matmul_grouped", "provide_fp8_matmul"]
