"""Where a test can run. ``gpu``: real shapes on a CUDA GPU (``pytest -m gpu`` runs them all, the GPU
suite; skipped elsewhere). ``interpreter``: Triton kernels on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py on machines without a GPU; skipped where it is off)."""

import pytest
import torch

from indexcache.ops.triton_support import HAVE_TRITON, interpreted

CUDA = torch.cuda.is_available()


def gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA or not HAVE_TRITON, reason="needs a CUDA GPU")(fn))


def interpreter(fn):
    return pytest.mark.skipif(not (HAVE_TRITON and interpreted()),
                              reason="runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1)")(fn)
