"""``graphc.compile``: run a graph through a target's pass pipeline and wrap the result.

Targets: ``"reference"`` runs the optimised graph on the numpy interpreter (every node kind the
passes introduce has interpreter semantics); ``"cpu"`` generates LLVM code for it
(``backends/llvm``: memory plan, kernels, one threaded entry per shape specialisation).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TextIO

import numpy as np

from .errors import GraphcError
from .interp import interpret
from .ir import Graph

TARGETS = ("reference", "cpu")


class CompiledModel:
    """A graph after its target's passes; ``run(feeds)`` or ``model(x=...)`` executes it."""

    def __init__(self, graph: Graph, target: str, pipeline: list[str], manager, backend=None):
        self.graph = graph
        self.target = target
        self.pipeline = pipeline
        self._manager = manager
        self.backend = backend  # the target's compiled form (CpuModel for "cpu"), else None

    @property
    def timings(self):
        return list(self._manager.timings)

    def timing_report(self) -> str:
        return self._manager.timing_report()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self.backend is not None:
            return self.backend.run(feeds)
        return interpret(self.graph, feeds)

    def emit(self, what: str = "ir", dims: Mapping[str, int] | None = None) -> str:
        """Text of a compilation stage: "ir" (the optimised graph); for target "cpu" also
        "kernel" (loop-level kernels), "llvm" (generated LLVM IR), "llvm-opt" (after O3) and
        "asm" (machine code). ``dims`` binds symbolic dims for the code stages."""
        if what == "ir":
            return str(self.graph)
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
            out: TextIO | None = None, threads: int | None = None) -> CompiledModel:
    """Optimise ``graph`` for ``target``.

    ``conv`` is the convolution algorithm for every Conv ("auto", "im2col", "winograd-f2",
    "winograd-f4", "direct"), or a mapping of Conv node names to algorithms (the key "*" sets
    the default). ``passes`` replaces the target's default pipeline (a list or "a,b,c").
    ``threads`` (target "cpu") defaults to ``GRAPHC_NUM_THREADS`` or every available core.
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
    optimised = manager.run(graph)
    backend = None
    if target == "cpu":
        from backends.llvm.compiler import CpuModel

        backend = CpuModel(optimised, threads=threads)
    return CompiledModel(optimised, target, manager.pipeline, manager, backend)
