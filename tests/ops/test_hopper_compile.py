"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU: Triton's own compiler, down
to ptxas's cubin, on the signatures the launchers pass. The interpreter runs the kernels' Python and never
types them, so a kernel can pass every CPU test and still fail to compile on the GPU (a branch that yields a
different type than its sibling, say); this catches that before a GPU run does. Runs in a subprocess
without ``TRITON_INTERPRET`` (which turns ``@triton.jit`` into the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from indexcache.ops.triton_support import HAVE_TRITON

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from indexcache.ops.moe import kernel as K

    BF16 = {"X", "WG", "WU", "WGS", "WUS", "H", "WD", "WDS", "OUT"}
    TABLE = {"ORDER", "TILE_E", "TILE_R0", "TILE_R1"}
    for fn in (K._gate_up_kernel, K._down_kernel):
        names = fn.arg_names
        for shared in (False, True):
            for per_pair in (False, True):
                # one tile per pair: the table is the routing itself (int64); else tile_table's int32
                table = "*i64" if per_pair else "*i32"
                const = {"BM": 16, "BN": 32, "BK": 128, "FP32_DOT": "", "SHARED": shared, "PER_PAIR": per_pair}
                sig = {n: "constexpr" if n in const else "*bf16" if n in BF16 else table if n in TABLE
                       else "*fp32" if n == "RW" else "i32" for n in names}
                src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(a),): v for a, v in const.items()})
                k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 4})
                assert len(k.asm["cubin"]) > 0
                print(fn.__name__, shared, per_pair, "ok")
''')


def _can_compile() -> bool:
    if not HAVE_TRITON:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


FP32_SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from indexcache.ops.indexer import kernel as I
    from indexcache.ops.moe import kernel as M
    from indexcache.ops.sparse_mla import kernel as S

    FP32 = {"Q", "K", "KSC", "W", "OUT", "TAU", "KV", "O", "LSE", "X", "WG", "WU", "WGS", "WUS", "WD", "WDS", "RW"}
    INT = {"KS", "KE", "CNT", "CIDX", "IDX", "ORDER", "TILE_E", "TILE_R0", "TILE_R1"}

    def build(fn, const, options):
        names = fn.arg_names
        fp32 = FP32 | ({"H"} if fn in (M._gate_up_kernel, M._down_kernel) else set())  # the experts' hidden h
        sig = {n: "constexpr" if n in const else "*i32" if n in INT else "fp32" if n == "sm_scale_log2"
               else "*fp32" if n in fp32 else "i32" for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(a),): v for a, v in const.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

    for mode in ("ieee", "tf32x3"):
        for key_major in (True, False):  # the bundled model's indexer: 4 heads x 64 dims, 16 queries a tile
            const = {"H": 4, "D": 64, "BQ": 16, "BN": 128, "HAS_SCALE": False, "KEY_MAJOR": key_major,
                     "FP32_DOT": mode, "CAND": False}
            assert build(I._mqa_logits_kernel, const, {"num_warps": 8, "num_stages": 2}).asm["cubin"]
        const = {"DV": 512, "DR": 64, "BH": 16, "BK": 32, "FP32_DOT": mode}
        assert build(S._sparse_mla_kernel, const, {"num_warps": 4, "num_stages": 2}).asm["cubin"]
        for fn in (M._gate_up_kernel, M._down_kernel):
            const = {"BM": 16, "BN": 32, "BK": 32, "FP32_DOT": mode, "SHARED": False, "PER_PAIR": False}
            assert build(fn, const, {"num_warps": 4, "num_stages": 2}).asm["cubin"]
        print(mode, "ok")
''')


@pytest.mark.skipif(not _can_compile(), reason="needs Triton with its NVIDIA backend (ptxas)")
def test_fp32_kernels_compile_for_hopper_in_each_fp32_dot():
    """The fp32 variants the GPU evaluation runs (ieee and tf32x3 products) of the indexer logits, sparse MLA
    and the experts: the mode is a string constexpr, which a Python ``if`` on it would refuse to compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", FP32_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ieee", "ok", "tf32x3", "ok"]


@pytest.mark.skipif(not _can_compile(), reason="needs Triton with its NVIDIA backend (ptxas)")
def test_moe_kernels_compile_for_hopper_in_every_variant():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(" ok") == 8
