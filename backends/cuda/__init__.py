"""The CUDA backend (target "cuda"): the kernel IR of the CPU backend rendered as numba-CUDA
kernels, a generated tiled GEMM for the GEMM-shaped nodes, one device arena per shape.

Nothing here imports ``numba.cuda`` until a model is built (``device.require_cuda``), so graphc
imports and runs without numba-cuda or a GPU; ``CudaUnavailableError`` says what is missing.
Modules: ``device`` (finding numba.cuda, device arrays), ``codegen`` (kernel IR -> CUDA source),
``gemm`` (GEMM-shaped nodes -> tiled GEMM source), ``compiler`` (``CudaModel``, ``compile_graph``).
"""

from __future__ import annotations

from .device import CudaUnavailableError, require_cuda

__all__ = ["CudaModel", "CudaUnavailableError", "compile_graph", "require_cuda"]


def __getattr__(name: str):
    if name in ("CudaModel", "compile_graph"):
        from . import compiler

        return getattr(compiler, name)
    raise AttributeError(f"module 'backends.cuda' has no attribute '{name}'")
