"""The compiled-variant count that tells a benchmark whether kernels compiled inside its timing, and the
fp32 product mode the kernels are launched with."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from markers import gpu

from indexcache.ops import triton_support
from indexcache.ops.triton_support import compiled_variants, fp32_dot, fp32_dot_mode, set_fp32_dot, variants_added


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


def test_fp32_dot_mode_applies_to_fp32_on_the_gpu_only_and_is_restored(monkeypatch):
    monkeypatch.setattr(triton_support, "interpreted", lambda: False)  # as on a GPU
    assert fp32_dot(torch.float32) == "ieee" and fp32_dot(torch.bfloat16) == ""
    with fp32_dot_mode("tf32x3"):
        assert fp32_dot(torch.float32) == "tf32x3" and fp32_dot(torch.float16) == ""
        with pytest.raises(ValueError, match="fp32 dot 'tf32': choose from ieee, tf32x3"):
            set_fp32_dot("tf32")  # plain tf32 (10 bits a product) is not offered
        assert fp32_dot(torch.float32) == "tf32x3"  # a refused mode changes nothing
    assert fp32_dot(torch.float32) == "ieee"
    monkeypatch.setattr(triton_support, "interpreted", lambda: True)
    with fp32_dot_mode("tf32x3"):
        assert fp32_dot(torch.float32) == ""  # the interpreter multiplies fp32 exactly whatever it is told
