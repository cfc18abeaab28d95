"""Finding ``numba.cuda`` lazily, and moving arrays to and from the device.

graphc must import and run without numba-cuda and without a GPU, so nothing here imports
``numba.cuda`` at module import time: ``require_cuda()`` does it on first use, from whichever
package provides it (numba-cuda on a GPU machine, numba's built-in module otherwise). numba reads
``NUMBA_ENABLE_CUDASIM`` when it is first imported; with it set, ``numba.cuda`` is the CUDA
simulator (every thread a Python thread, device memory in host memory), which is how the tests
run without a GPU.

Device arrays given to a model are taken as they are (no copy): numba's own device arrays, and
any object exposing ``__cuda_array_interface__`` (CuPy, PyTorch, ...). On the simulator, whose
"device" memory is host memory, such an object is wrapped as a simulator array over the same
bytes, so the no-copy path is exercised there too.
"""

from __future__ import annotations

import numpy as np

from graphc.errors import GraphcError


class CudaUnavailableError(GraphcError):
    """Target "cuda" was asked for, but there is neither a CUDA GPU nor the CUDA simulator."""


def import_cuda():
    """``numba.cuda`` (or None if numba cannot provide it); separate so tests can replace it."""
    try:
        from numba import cuda
    except ImportError:
        return None
    return cuda


def require_cuda():
    """The ``numba.cuda`` module, ready to launch kernels; CudaUnavailableError otherwise."""
    cuda = import_cuda()
    if cuda is None:
        raise CudaUnavailableError(
            "target 'cuda' needs numba's CUDA support (pip install 'graphc[cuda]', i.e. "
            "numba-cuda) and a CUDA GPU, or the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    if not cuda.is_available():
        raise CudaUnavailableError(
            "target 'cuda' found no CUDA GPU (numba.cuda.is_available() is False) and the CUDA "
            "simulator is off; run on a machine with a GPU and its driver, or set "
            "NUMBA_ENABLE_CUDASIM=1 before numba is imported to use the simulator")
    return cuda


def is_simulator(cuda) -> bool:
    """True if ``cuda`` is numba's CUDA simulator (its API functions live in its simulator
    package, in numba and in numba-cuda alike)."""
    return ".simulator" in getattr(cuda.to_device, "__module__", "")


def is_device_array(cuda, x) -> bool:
    """True for numba device arrays (real or simulated) and ``__cuda_array_interface__``
    objects."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    if is_simulator(cuda):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return isinstance(x, FakeCUDAArray)
    return False


def as_device_array(cuda, x):
    """``x`` as a numba device array without copying (see the module docstring)."""
    if is_simulator(cuda):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        if isinstance(x, FakeCUDAArray):
            return x
        return FakeCUDAArray(_host_view(x.__cuda_array_interface__))
    from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase

    if isinstance(x, DeviceNDArrayBase):
        return x
    return cuda.as_cuda_array(x)


class _Interface:
    """Holds an ``__array_interface__`` so numpy can view foreign memory without a copy."""

    def __init__(self, interface: dict):
        self.__array_interface__ = interface


def _host_view(interface: dict) -> np.ndarray:
    """A numpy array over the memory a ``__cuda_array_interface__`` describes (simulator:
    device memory is host memory)."""
    view = {"shape": tuple(interface["shape"]), "typestr": interface["typestr"],
            "data": (interface["data"][0], False), "strides": interface.get("strides"),
            "version": 3}
    return np.asarray(_Interface(view))


def flat(array):
    """A 1-D view of a C-contiguous device array (kernels index buffers by element offset)."""
    return array.reshape(array.size) if array.ndim != 1 else array
