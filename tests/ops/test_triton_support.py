"""The compiled-variant count that tells a benchmark whether kernels compiled inside its timing."""

from __future__ import annotations

import sys
import types

import torch
from markers import gpu

from indexcache.ops.triton_support import compiled_variants, variants_added


def test_compiled_variants_counts_each_launched_kernels_cache(monkeypatch):
    module = types.ModuleType("indexcache.ops.fake_kernels")

    class Jit:  # Triton 3.6's JITFunction: device -> (kernel cache, key cache, target, backend, binder)
        def __init__(self, variants: int):
            self.device_caches = {0: ({f"key{i}": object() for i in range(variants)}, {}, None, None, None)}

    module._two = Jit(2)
    module._tuned = types.SimpleNamespace(fn=Jit(3))  # an autotuner wraps its JITFunction
    module._helper = Jit(0)  # a device function: never launched, no variants
    module.not_a_kernel = 7
    monkeypatch.setitem(sys.modules, module.__name__, module)
    before = compiled_variants()
    assert before["fake_kernels._two"] == 2 and before["fake_kernels._tuned"] == 3
    assert "fake_kernels._helper" not in before and "fake_kernels.not_a_kernel" not in before
    module._two.device_caches[0][0]["key9"] = object()  # one more variant compiled
    module._new = Jit(1)
    assert variants_added(before, compiled_variants()) == {"fake_kernels._new": 1, "fake_kernels._two": 1}
    assert variants_added(before, before) == {}


@gpu
def test_compiled_variants_sees_a_real_launch_compile_once():
    from indexcache.ops.topk.kernel import topk

    # a 256-key tile: a variant (constexpr BLOCK) that no other test launches, so this call compiles it
    before = compiled_variants()
    topk(torch.randn(64, 3000, device="cuda"), 32, schedule="rows", block=256)
    assert variants_added(before, compiled_variants()) == {"topk.kernel._topk_rows_kernel": 1}
    again = compiled_variants()
    topk(torch.randn(64, 3000, device="cuda"), 32, schedule="rows", block=256)  # the same variant: no compile
    assert variants_added(again, compiled_variants()) == {}
