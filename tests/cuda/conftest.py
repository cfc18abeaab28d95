"""The CUDA tests run on numba's CUDA simulator unless ``NUMBA_ENABLE_CUDASIM=0`` is set (a real
GPU: ``benchmarks/gpu_check.sh``).

numba reads ``NUMBA_ENABLE_CUDASIM`` when ``numba.cuda`` is first imported, so this conftest sets
it (and numba's already-loaded config, if another test imported numba first) before any CUDA
test imports the backend; nothing outside ``backends/cuda`` imports ``numba.cuda``. If
``numba.cuda`` was nevertheless loaded without the simulator and there is no GPU, every test here
is skipped with that reason.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if "numba" in sys.modules and "numba.cuda" not in sys.modules:
    import numba

    numba.config.ENABLE_CUDASIM = int(os.environ["NUMBA_ENABLE_CUDASIM"] or 0)


@pytest.fixture(scope="module", autouse=True)
def cuda_device():
    """numba.cuda, real or simulated; the simulator's threads switch more often (a barrier
    otherwise waits up to Python's 5 ms switch interval per thread)."""
    from backends.cuda.device import CudaUnavailableError, require_cuda

    try:
        cuda = require_cuda()
    except CudaUnavailableError as exc:
        pytest.skip(str(exc))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield cuda
    sys.setswitchinterval(interval)
