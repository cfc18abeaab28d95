"""The pass manager: passes registered by name, pipelines, verification, timing, IR dumps.

A pass is a plain function ``(graph, options) -> graph`` that never mutates its input; it is
registered with ``@register_pass("name", requires=(...))`` and its docstring's first line says
what it rewrites. ``requires`` names passes that must run earlier in the same pipeline.

``PassManager(pipeline).run(graph)`` runs the passes in order; after each it verifies the graph
(``verify_each``), times it, prints the IR (``print_after``/``print_after_all``) and writes
``NN-<pass>.ir`` files (``dump_dir``). A failure inside a pass becomes a ``PassError`` naming the
pass and the passes before it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from graphc.errors import GraphcError
from graphc.ir import Graph
from graphc.verify import verify

CONV_ALGORITHMS = ("auto", "im2col", "winograd-f2", "winograd-f4", "direct")


class PassError(GraphcError):
    """A pass failed or broke an IR invariant; the message names it and the passes before it."""


@dataclass(frozen=True)
class PassOptions:
    """What passes may consult besides the graph.

    ``conv`` picks the convolution algorithm for every Conv ("auto" lets the cost rule choose);
    ``conv_per_node`` overrides it for named Conv nodes; ``training`` keeps Dropout and
    BatchNormalization in their training forms.
    """

    target: str = "reference"
    conv: str = "auto"
    conv_per_node: Mapping[str, str] = field(default_factory=dict)
    training: bool = False

    def __post_init__(self):
        for name, algo in [("*", self.conv), *self.conv_per_node.items()]:
            if algo not in CONV_ALGORITHMS:
                raise GraphcError(f"conv algorithm '{algo}' (for {name}) is not one of "
                                  f"{', '.join(CONV_ALGORITHMS)}")

    def conv_algorithm(self, node_name: str) -> str:
        return self.conv_per_node.get(node_name, self.conv)


PassFn = Callable[[Graph, PassOptions], Graph]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    description: str
    requires: tuple[str, ...] = ()


_PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, requires: Iterable[str] = ()) -> Callable[[PassFn], PassFn]:
    def wrap(fn: PassFn) -> PassFn:
        assert name not in _PASSES, f"pass {name} registered twice"
        doc = (fn.__doc__ or "").strip().splitlines()
        assert doc, f"pass {name} needs a one-line docstring"
        _PASSES[name] = PassInfo(name, fn, doc[0], tuple(requires))
        return fn

    return wrap


def _load_passes() -> None:
    import passes  # noqa: F401  -- importing the package registers every pass


def get_pass(name: str) -> PassInfo:
    _load_passes()
    try:
        return _PASSES[name]
    except KeyError:
        raise PassError(f"unknown pass '{name}'; known passes: {', '.join(sorted(_PASSES))}"
                        ) from None


def all_passes() -> dict[str, PassInfo]:
    _load_passes()
    return dict(sorted(_PASSES.items()))


def parse_pipeline(pipeline: str | Iterable[str]) -> list[str]:
    """``"a,b, c"`` or ``["a", "b"]`` -> checked list of pass names."""
    names = pipeline.split(",") if isinstance(pipeline, str) else list(pipeline)
    names = [n.strip() for n in names if n.strip()]
    for i, name in enumerate(names):
        info = get_pass(name)
        for req in info.requires:
            if req not in names[:i]:
                raise PassError(f"pass '{name}' requires '{req}' earlier in the pipeline "
                                f"({', '.join(names)})")
    return names


# The default pipeline of each target. Inference pipelines fold everything they can at compile
# time, pick a convolution algorithm per Conv, then fuse epilogues and elementwise chains.
_INFERENCE = ["canonicalize", "fold-constants", "fold-batchnorm", "winograd", "lower-conv",
              "fuse-epilogue", "fuse-elementwise", "fold-constants", "cse", "dce"]
DEFAULT_PIPELINES: dict[str, list[str]] = {"reference": list(_INFERENCE), "cpu": list(_INFERENCE),
                                           "cuda": list(_INFERENCE)}


def default_pipeline(target: str) -> list[str]:
    try:
        return list(DEFAULT_PIPELINES[target])
    except KeyError:
        raise PassError(f"no default pipeline for target '{target}' (targets: "
                        f"{', '.join(DEFAULT_PIPELINES)})") from None


@dataclass
class PassTiming:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


def fingerprint(graph: Graph) -> tuple:
    """Everything a pass could mutate, cheaply (arrays by identity: constants are immutable)."""
    def attr(v):
        return ("array", id(v)) if hasattr(v, "dtype") and hasattr(v, "shape") else v

    nodes = tuple((n.name, n.op, n.inputs, n.outputs, n.types,
                   tuple(sorted((k, attr(v)) for k, v in n.attrs.items()))) for n in graph.nodes())
    return nodes, tuple(graph.inputs), tuple(graph.outputs), graph.name


class PassManager:
    def __init__(self, pipeline: str | Iterable[str], options: PassOptions | None = None,
                 verify_each: bool = True, print_after: Iterable[str] = (),
                 print_after_all: bool = False, dump_dir: os.PathLike | None = None,
                 out: TextIO | None = None):
        self.pipeline = parse_pipeline(pipeline)
        self.options = options or PassOptions()
        self.verify_each = verify_each
        self.print_after = set(print_after)
        for name in self.print_after:
            get_pass(name)
        self.print_after_all = print_after_all
        self.dump_dir = os.fspath(dump_dir) if dump_dir is not None else None
        self.out = out
        self.timings: list[PassTiming] = []

    def run(self, graph: Graph) -> Graph:
        self.timings = []
        self._dump(0, "input", graph)
        current = graph
        for step, name in enumerate(self.pipeline, start=1):
            before = fingerprint(current) if self.verify_each else None
            current = self._run_one(step, name, current, before)
        return current

    def _run_one(self, step: int, name: str, graph: Graph, before: tuple | None) -> Graph:
        info = get_pass(name)
        done = ", ".join(self.pipeline[: step - 1]) or "none"
        start = time.perf_counter()
        try:
            result = info.fn(graph, self.options)
            if self.verify_each:
                verify(result)
        except GraphcError as exc:
            raise PassError(f"in pass '{name}' (after {done}): {exc}") from exc
        except Exception as exc:
            raise PassError(f"in pass '{name}' (after {done}): {type(exc).__name__}: {exc}"
                            ) from exc
        seconds = time.perf_counter() - start
        if before is not None and fingerprint(graph) != before:
            raise PassError(f"pass '{name}' mutated its input graph (passes must copy first)")
        self.timings.append(PassTiming(name, seconds, len(graph), len(result)))
        if self.print_after_all or name in self.print_after:
            print(f"// ----- IR after {name} -----", file=self.out or sys.stdout)
            print(result, file=self.out or sys.stdout)
        self._dump(step, name, result)
        return result

    def _dump(self, step: int, name: str, graph: Graph) -> None:
        if self.dump_dir is None:
            return
        os.makedirs(self.dump_dir, exist_ok=True)
        with open(os.path.join(self.dump_dir, f"{step:02d}-{name}.ir"), "w") as f:
            f.write(str(graph))

    def timing_report(self) -> str:
        lines = [f"{'pass':<20}{'ms':>10}{'nodes':>14}"]
        for t in self.timings:
            lines.append(f"{t.name:<20}{t.seconds * 1e3:>10.2f}"
                         f"{f'{t.nodes_before} -> {t.nodes_after}':>14}")
        lines.append(f"{'total':<20}{sum(t.seconds for t in self.timings) * 1e3:>10.2f}")
        return "\n".join(lines)
