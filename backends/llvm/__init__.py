"""LLVM CPU backend: the host JIT target and generated kernels (llvmlite IR -> O3 -> MCJIT).

``target``: ``host_target()``, the process-wide ``HostTarget`` (TargetMachine for the host CPU and
its features, new-pass-manager O3, MCJIT code library). ``gemm``: the generated, packed,
register-tiled SGEMM with fused epilogues (``Sgemm``).
"""

from __future__ import annotations

from .target import CompiledModule, HostTarget, LLVMCodegenError, host_target

__all__ = ["CompiledModule", "HostTarget", "LLVMCodegenError", "host_target"]
