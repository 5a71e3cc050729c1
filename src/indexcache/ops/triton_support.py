"""Triton kernels for DSA: lightning-indexer logits, top-k selection and sparse MLA.

Each kernel module holds the Triton kernel and its launcher; the plain-PyTorch reference it is tested
against lives in :mod:`indexcache.ops.reference` (built on the same math the model uses). Triton is an
optional dependency: importing this package never fails, ``HAVE_TRITON`` says whether the kernels can
run. On a machine without a GPU they run under ``TRITON_INTERPRET=1`` (small shapes, fp16/fp32), which is
how CI tests them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

try:  # pragma: no cover - depends on the install
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_scalar_index() -> None:
    """The interpreter turns a scalar into ``int()`` of a 1-element array, which numpy >= 2.4 refuses, so
    loops with run-time bounds (``range(lo, hi)`` on loaded values) fail there. Index with the single
    element instead; compiled kernels are unaffected."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_index", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index = True
    interpreter._patch_lang_tensor = patched


if HAVE_TRITON and interpreted():  # pragma: no cover - CPU test path
    _interpreter_scalar_index()


LAST_COMPILED: dict[str, object] = {}  # kernel name -> the compiled kernel of its last launch

# How the kernels multiply fp32 operands on the GPU. "ieee": exact fp32 products on the CUDA cores, as the
# reference computes them. "tf32x3": each operand split into a tf32 head and tail, three tensor-core products
# summed in fp32 (the tail x tail term dropped), so each product carries about 2^-21 relative error instead
# of 2^-24, on the tensor cores instead of the CUDA cores. bf16 and fp8 operands are unaffected.
FP32_DOTS = ("ieee", "tf32x3")
_fp32_dot = "ieee"


def set_fp32_dot(mode: str) -> str:
    """Make ``mode`` (one of :data:`FP32_DOTS`) the fp32 product of every kernel launched from now on;
    returns the previous mode."""
    global _fp32_dot
    if mode not in FP32_DOTS:
        raise ValueError(f"fp32 dot {mode!r}: choose from {', '.join(FP32_DOTS)}")
    previous, _fp32_dot = _fp32_dot, mode
    return previous


@contextmanager
def fp32_dot_mode(mode: str) -> Iterator[None]:
    """:func:`set_fp32_dot` for the ``with`` block."""
    previous = set_fp32_dot(mode)
    try:
        yield
    finally:
        set_fp32_dot(previous)


def fp32_dot(dtype) -> str:
    """The ``input_precision`` a kernel's ``tl.dot`` gets for operands of ``dtype``: the current mode for
    fp32 on the GPU, "" (Triton's default) otherwise: bf16/fp8, and the interpreter, which multiplies fp32
    exactly whatever it is told."""
    return _fp32_dot if dtype == torch.float32 and not interpreted() else ""


def resources(name: str) -> dict | None:
    """Registers per thread, spilled registers and shared memory of a kernel's last compiled variant
    (the compiler's resource report, for the benchmark notes)."""
    k = LAST_COMPILED.get(name)
    if k is None:
        return None
    meta = getattr(k, "metadata", None)
    return {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
            "shared_bytes": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
            "num_stages": getattr(meta, "num_stages", None)}


def require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the triton backend needs the `triton` package (pip install triton)")


def compiled_variants() -> dict[str, int]:
    """How many compiled variants each launched kernel of :mod:`indexcache.ops` holds in this process,
    ``{"topk.kernel._topk_sample_kernel": 3, ...}``: two snapshots around a region name the kernels that
    compiled inside it (a benchmark's timing should find none). Reads Triton's in-process kernel cache
    (``JITFunction.device_caches``, through an autotuner's ``fn``); empty under the interpreter, which
    compiles nothing."""
    out: dict[str, int] = {}
    for modname, module in list(sys.modules.items()):
        if not modname.startswith("indexcache.ops.") or module is None:
            continue
        for name, obj in list(vars(module).items()):
            caches = getattr(getattr(obj, "fn", obj), "device_caches", None)
            if not isinstance(caches, dict):
                continue
            n = sum(len(entry[0]) for entry in list(caches.values()) if isinstance(entry, tuple) and entry
                    and isinstance(entry[0], dict))
            if n:
                out[f"{modname.removeprefix('indexcache.ops.')}.{name}"] = n
    return out


def variants_added(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The kernels of ``after`` (:func:`compiled_variants`) with more variants than in ``before``, and how
    many more."""
    return {k: n - before.get(k, 0) for k, n in sorted(after.items()) if n > before.get(k, 0)}
