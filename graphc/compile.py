"""``graphc.compile``: run a graph through a target's pass pipeline and wrap the result.

Targets: ``"reference"`` runs the optimised graph on the numpy interpreter (every node kind the
passes introduce has interpreter semantics). The LLVM CPU and CUDA backends add theirs here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TextIO

import numpy as np

from .errors import GraphcError
from .interp import interpret
from .ir import Graph

TARGETS = ("reference",)


class CompiledModel:
    """A graph after its target's passes; ``run(feeds)`` or ``model(x=...)`` executes it."""

    def __init__(self, graph: Graph, target: str, pipeline: list[str], manager):
        self.graph = graph
        self.target = target
        self.pipeline = pipeline
        self._manager = manager

    @property
    def timings(self):
        return list(self._manager.timings)

    def timing_report(self) -> str:
        return self._manager.timing_report()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return interpret(self.graph, feeds)

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
            out: TextIO | None = None) -> CompiledModel:
    """Optimise ``graph`` for ``target``.

    ``conv`` is the convolution algorithm for every Conv ("auto", "im2col", "winograd-f2",
    "winograd-f4", "direct"), or a mapping of Conv node names to algorithms (the key "*" sets
    the default). ``passes`` replaces the target's default pipeline (a list or "a,b,c").
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
    return CompiledModel(manager.run(graph), target, manager.pipeline, manager)
