"""Code generators: LLVM (CPU) and CUDA backends (see the backend issues)."""
