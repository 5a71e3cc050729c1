"""Triton kernels for DSA: lightning-indexer logits, top-k selection and sparse MLA.

Each kernel module holds the Triton kernel and its launcher; the plain-PyTorch reference it is tested
against lives in :mod:`indexcache.ops.reference` (built on the same math the model uses). Triton is an
optional dependency: importing this package never fails, ``HAVE_TRITON`` says whether the kernels can
run. On a machine without a GPU they run under ``TRITON_INTERPRET=1`` (small shapes, fp16/fp32), which is
how CI tests them.
"""

from __future__ import annotations

import os

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
