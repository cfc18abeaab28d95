"""``graphc.compile``: run a graph through a target's pass pipeline and wrap the result.

Targets: ``"reference"`` runs the optimised graph on the numpy interpreter (every node kind the
passes introduce has interpreter semantics); ``"cpu"`` generates LLVM code for it
(``backends/llvm``: memory plan, kernels, one threaded entry per shape specialisation);
``"cuda"`` generates CUDA kernels from the same kernel plan through numba (``backends/cuda``;
a GPU with numba-cuda, or numba's simulator with ``NUMBA_ENABLE_CUDASIM=1``).

For target "cpu" the on-disk cache (``backends/llvm/cache.py``) is used unless ``cache=False``
or ``GRAPHC_CACHE=0``: the optimised graph is looked up by the input graph and the pass options
(a hit skips the pipeline), and each specialisation's object code by the optimised graph, the
dims and the host CPU. Observing the pipeline (``print_after``, ``print_after_all``,
``dump_dir``) always runs it. ``timing_report()`` says what the cache did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import TextIO

import numpy as np

from .errors import GraphcError
from .interp import interpret
from .ir import Graph
from .types import TensorType

TARGETS = ("reference", "cpu", "cuda")


class CompiledModel:
    """A graph after its target's passes; ``run(feeds)`` or ``model(x=...)`` executes it."""

    def __init__(self, graph: Graph, target: str, pipeline: list[str], manager, backend=None,
                 graph_cache: str = ""):
        self.graph = graph
        self.target = target
        self.pipeline = pipeline
        self._manager = manager
        self.backend = backend  # the target's compiled form (CpuModel for "cpu"), else None
        self.graph_cache = graph_cache  # what the cache did for the passes ("" if not used)

    @property
    def timings(self):
        return list(self._manager.timings)

    def timing_report(self) -> str:
        """Time of each pass, and for target "cpu" what the code cache did."""
        lines = [self._manager.timing_report()] if self._manager.timings else []
        if self.graph_cache:
            lines.append(self.graph_cache)
        if self.backend is not None and self.backend.cache_report():
            lines.append(self.backend.cache_report())
        return "\n".join(lines)

    def run(self, feeds: Mapping[str, np.ndarray],
            into: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Outputs of the graph for ``feeds``; outputs named in ``into`` are written into the
        given arrays (C-contiguous, the output's shape and dtype, aliasing no feed), which are
        returned in their places."""
        if self.backend is not None:
            return self.backend.run(feeds, into=into)
        results = interpret(self.graph, feeds)
        if not into:
            return results
        from backends.llvm.compiler import check_into

        types = {v: TensorType.of(r) for v, r in zip(self.graph.outputs, results)}
        targets = check_into(self.graph, into, feeds, types.__getitem__)
        for i, v in enumerate(self.graph.outputs):
            if v in targets:
                np.copyto(targets[v], results[i])
                results[i] = targets[v]
        return results

    def emit(self, what: str = "ir", dims: Mapping[str, int] | None = None) -> str:
        """Text of a compilation stage: "ir" (the optimised graph); for target "cpu" also
        "kernel" (loop-level kernels), "llvm" (generated LLVM IR), "llvm-opt" (after O3) and
        "asm" (machine code); for target "cuda" "kernel" and "cuda" (the generated kernel
        source). ``dims`` binds symbolic dims for the code stages."""
        if what == "ir":
            return str(self.graph)
        if self.target == "cuda" and what in ("kernel", "cuda"):
            return self.backend.emit(what, dims)
        if self.backend is None or what not in ("kernel", "llvm", "llvm-opt", "asm"):
            raise GraphcError(f"cannot emit '{what}' for target '{self.target}' (choices: ir"
                              + (", kernel, llvm, llvm-opt, asm" if self.backend else "") + ")")
        spec = self.backend.specialise(self.backend.check_dims(dims or {}))
        return {"kernel": spec.kernel_text, "llvm": lambda: spec.llvm_ir,
                "llvm-opt": lambda: spec.optimised_ir, "asm": lambda: spec.assembly}[what]()

    def __call__(self, feeds: Mapping[str, np.ndarray] | None = None, **named) -> list:
        return self.run({**(feeds or {}), **named})

    def __repr__(self) -> str:
        return (f"<graphc.CompiledModel target={self.target} nodes={len(self.graph)} "
                f"pipeline={','.join(self.pipeline)}>")


def compile(graph: Graph, target: str = "reference",
            conv: str | Mapping[str, str] = "auto",
            passes: str | Iterable[str] | None = None, *, training: bool = False,
            verify_each: bool = True, print_after: Iterable[str] = (),
            print_after_all: bool = False, dump_dir: os.PathLike | None = None,
            out: TextIO | None = None, threads: int | None = None,
            cache: bool | None = None) -> CompiledModel:
    """Optimise ``graph`` for ``target``.

    ``conv`` is the convolution algorithm for every Conv ("auto", "im2col", "winograd-f2",
    "winograd-f4", "direct"), or a mapping of Conv node names to algorithms (the key "*" sets
    the default). ``passes`` replaces the target's default pipeline (a list or "a,b,c").
    ``threads`` (target "cpu") defaults to ``GRAPHC_NUM_THREADS`` or every available core.
    ``cache`` (target "cpu"): use the on-disk code cache in ``GRAPHC_CACHE_DIR`` (default
    ``~/.cache/graphc``); None follows ``GRAPHC_CACHE`` (on unless 0/off).
    """
    from passes import PassManager, PassOptions, default_pipeline

    if target not in TARGETS:
        raise GraphcError(f"unknown target '{target}'; available: {', '.join(TARGETS)}")
    if isinstance(conv, str):
        options = PassOptions(target=target, conv=conv, training=training)
    else:
        per_node = {k: v for k, v in conv.items() if k != "*"}
        for name in per_node:
            if name not in graph.nx or graph.node(name).op not in ("Conv", "FusedConv"):
                raise GraphcError(f"conv override names '{name}', which is not a Conv node")
        options = PassOptions(target=target, conv=conv.get("*", "auto"), conv_per_node=per_node,
                              training=training)
    pipeline = default_pipeline(target) if passes is None else passes
    manager = PassManager(pipeline, options, verify_each=verify_each, print_after=print_after,
                          print_after_all=print_after_all, dump_dir=dump_dir, out=out)
    if target == "cuda":
        from backends.cuda import CudaModel, require_cuda

        require_cuda()  # CudaUnavailableError before spending time in the passes
        optimised = manager.run(graph)
        return CompiledModel(optimised, target, manager.pipeline, manager, CudaModel(optimised))
    if target != "cpu":
        return CompiledModel(manager.run(graph), target, manager.pipeline, manager)
    from backends.llvm.cache import CodeCache, cache_enabled
    from backends.llvm.compiler import CpuModel

    code_cache = CodeCache() if cache_enabled(cache) else None
    observed = bool(print_after or print_after_all or dump_dir)
    optimised, digest, note = _optimise_cached(graph, manager, options, code_cache, observed)
    backend = CpuModel(optimised, threads=threads, cache=code_cache, graph_digest=digest)
    return CompiledModel(optimised, target, manager.pipeline, manager, backend, note)


def _optimise_cached(graph: Graph, manager, options, code_cache, observed: bool):
    """(optimised graph, its fingerprint or None, report line): from the cache's "graph" level
    when it holds this input graph under these options, else by running the pipeline (and
    storing the result)."""
    if code_cache is None:
        return manager.run(graph), None, ""
    from backends.llvm.cache import fingerprint_graph, pipeline_key

    start = time.perf_counter()
    key = pipeline_key(fingerprint_graph(graph), manager.pipeline, options)
    found = None if observed else code_cache.load_graph(key, graph)
    if found is not None:
        seconds = time.perf_counter() - start
        return (*found, f"graph cache: hit (key {key[:8]}, passes skipped, {seconds:.2f} s)")
    optimised = manager.run(graph)
    digest = fingerprint_graph(optimised)
    stored = code_cache.store_graph(key, optimised, digest, graph)
    seconds = time.perf_counter() - start
    status = "not stored" if not stored else "miss (stored)"
    return optimised, digest, f"graph cache: {status} (key {key[:8]}, {seconds:.2f} s)"
