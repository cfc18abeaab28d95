"""The graph IR: ops as nodes of a ``networkx.MultiDiGraph``, typed values on the edges.

Invariants (checked by ``graphc.verify``):

* every value has exactly one producer; a node's ``outputs`` are its values (``None`` marks an
  optional output the node does not produce) and the node is named by its first output;
* a node's ``inputs`` is an *ordered* tuple of value names (``None`` for an absent optional input);
  the edge ``producer -> consumer`` with key ``i`` mirrors input ``i`` (a MultiDiGraph, so
  ``Add(x, x)`` keeps both edges);
* graph inputs are ``Input`` nodes, weights are ``Constant`` (fixed) or ``Param`` (trainable) nodes;
* ``types`` holds one ``TensorType`` per output, equal to what the op's shape rule infers.

Graphs are built with ``add_node`` (which infers types) or with the builder API (``Value``).
Passes never mutate their input: they ``copy()`` first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import numpy as np

from .errors import GraphBuildError, GraphcError, VerificationError
from .ops import registry
from .types import TensorType, dtype_name

INPUT = "Input"
CONSTANT_OPS = ("Constant", "Param")


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple
    outputs: tuple
    attrs: dict = field(default_factory=dict, compare=False)
    types: tuple = ()

    @property
    def output(self) -> str:
        """The first output (most ops have exactly one)."""
        return self.outputs[0]

    def type_of(self, value: str) -> TensorType:
        return self.types[self.outputs.index(value)]

    @property
    def opdef(self) -> registry.OpDef:
        return registry.get(self.op, self.name)


class Graph:
    """A dataflow graph of ops. Use ``str(graph)`` for its text form."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.nx = nx.MultiDiGraph()
        self._producer: dict[str, tuple[str, int]] = {}
        self._order = itertools.count()
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    # -- queries ----------------------------------------------------------------------------------
    def __contains__(self, value: str) -> bool:
        return value in self._producer

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def node(self, name: str) -> Node:
        try:
            return self.nx.nodes[name]["node"]
        except KeyError:
            raise GraphcError(f"graph '{self.name}' has no node '{name}'") from None

    def producer(self, value: str) -> Node:
        try:
            return self.node(self._producer[value][0])
        except KeyError:
            raise GraphcError(f"graph '{self.name}' has no value '{value}'") from None

    def type_of(self, value: str) -> TensorType:
        node_name, index = self._producer_of(value)
        return self.node(node_name).types[index]

    def _producer_of(self, value: str) -> tuple[str, int]:
        try:
            return self._producer[value]
        except KeyError:
            raise GraphcError(f"graph '{self.name}' has no value '{value}'") from None

    def consumers(self, value: str) -> list[Node]:
        node_name, _ = self._producer_of(value)
        seen, out = set(), []
        for _, dst, data in self.nx.out_edges(node_name, data=True):
            if data["value"] == value and dst not in seen:
                seen.add(dst)
                out.append(self.node(dst))
        return out

    def uses(self, value: str) -> int:
        """How many operand slots (plus graph outputs) read ``value``."""
        node_name, _ = self._producer_of(value)
        n = sum(1 for _, _, d in self.nx.out_edges(node_name, data=True) if d["value"] == value)
        return n + self.outputs.count(value)

    def constant_value(self, value: str | None) -> np.ndarray | None:
        """The array of a Constant/Param value; None for run-time values."""
        if value is None or value not in self._producer:
            return None
        node = self.producer(value)
        return node.attrs["value"] if node.op in CONSTANT_OPS else None

    def constant_arrays(self) -> dict[str, np.ndarray]:
        """Value name -> array of every Constant/Param (what ``Graph.parse`` needs as weights)."""
        return {n.output: n.attrs["value"] for n in self.nx.nodes.values()
                for n in [n["node"]] if n.op in CONSTANT_OPS}

    def nodes(self) -> list[Node]:
        """Nodes in a deterministic topological order: the ops in insertion order where their
        dependencies allow, each constant just before its first reader (unused ones last).

        Printing this order and parsing it back gives the same order again, so text dumps of a
        graph, and of the graph parsed from them, diff cleanly."""
        data = self.nx.nodes
        ops = [n for n in data if data[n]["node"].op not in CONSTANT_OPS]
        try:
            order = list(nx.lexicographical_topological_sort(
                self.nx.subgraph(ops), key=lambda n: data[n]["order"]))
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(self.nx)
            raise VerificationError(
                f"graph '{self.name}' has a cycle through nodes "
                f"{', '.join(repr(e[0]) for e in cycle)}") from None
        position = {n: i for i, n in enumerate(order)}
        before: dict[int, list[str]] = {}
        for n in data:
            if data[n]["node"].op in CONSTANT_OPS:
                first = min((position[r] for r in self.nx.successors(n)), default=len(order))
                before.setdefault(first, []).append(n)
        names = []
        for i in range(len(order) + 1):
            names += sorted(before.get(i, ()), key=lambda n: data[n]["order"])
            if i < len(order):
                names.append(order[i])
        return [data[n]["node"] for n in names]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes())

    def values(self) -> list[str]:
        return list(self._producer)

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for n in self.nx.nodes.values():
            hist[n["node"].op] = hist.get(n["node"].op, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def parameter_count(self) -> int:
        return sum(int(self.constant_value(n.output).size) for n in self
                   if n.op in CONSTANT_OPS)

    def fresh_name(self, base: str) -> str:
        base = base or "v"
        if base not in self._producer and base not in self.nx:
            return base
        for i in itertools.count(1):
            name = f"{base}_{i}"
            if name not in self._producer and name not in self.nx:
                return name
        raise AssertionError

    # -- construction -----------------------------------------------------------------------------
    def add_input(self, name: str, type_: TensorType) -> str:
        self._check_new(name)
        self._insert(Node(name, INPUT, (), (name,), {}, (type_,)))
        self.inputs.append(name)
        return name

    def add_constant(self, value, name: str | None = None, param: bool = False) -> str:
        array = np.asarray(value)
        dtype_name(array.dtype)  # rejects dtypes graphc does not support
        outputs = self.add_node("Param" if param else "Constant", (), {"value": array},
                                outputs=(name or self.fresh_name("c"),))
        return outputs[0]

    def add_node(self, op: str, inputs: Sequence[str | None], attrs: dict | None = None,
                 outputs: Sequence[str | None] | None = None, name: str | None = None,
                 types: Sequence[TensorType] | None = None) -> tuple:
        """Add a node, validating its attributes and inferring its output types.

        ``outputs`` defaults to fresh names; ``name`` (the node's name) defaults to the first
        output. Returns the output value names.
        """
        opdef = registry.get(op, name or (outputs[0] if outputs else "?"))
        inputs = tuple(inputs)
        while inputs and inputs[-1] is None:  # trailing absent optionals carry no information
            inputs = inputs[:-1]
        label = name or (outputs[0] if outputs and outputs[0] else op)
        opdef.check_arity(label, inputs)
        for v in inputs:
            if v is not None and v not in self._producer:
                raise GraphBuildError(f"{op} node '{label}': input '{v}' is not a value of "
                                      f"graph '{self.name}'")
        attrs = opdef.normalize_attrs(label, attrs or {})
        if types is None:
            types = self.infer(op, label, inputs, attrs, len(outputs) if outputs else None)
        if outputs is None:
            base = name or op.lower()
            outputs = []
            for i in range(len(types)):
                outputs.append(self.fresh_name(base if i == 0 else f"{base}_{i}"))
                self._producer[outputs[-1]] = ("", -1)  # reserve while naming the rest
            for o in outputs:
                del self._producer[o]
        outputs = tuple(outputs)
        if len(outputs) > len(types):
            raise GraphBuildError(f"{op} node '{label}': {len(outputs)} outputs named but the op "
                                  f"produces {len(types)}")
        types = tuple(t if o is not None else None for o, t in zip(outputs, types))
        node_name = name or next(o for o in outputs if o is not None)
        for o in outputs:
            if o is not None:
                self._check_new(o)
        if node_name in self.nx:
            raise GraphBuildError(f"graph '{self.name}' already has a node named '{node_name}'")
        self._insert(Node(node_name, op, inputs, outputs, attrs, types))
        return outputs

    def infer(self, op: str, node: str, inputs: Sequence[str | None], attrs: dict,
              n_outputs: int | None = None) -> list[TensorType]:
        """Output types of ``op`` applied to ``inputs`` in this graph (nothing is added)."""
        opdef = registry.get(op, node)
        in_types = [self.type_of(v) if v is not None else None for v in inputs]
        in_values = [self.constant_value(v) for v in inputs]
        if n_outputs is None:  # optional results (MaxPool's Indices) only when asked for
            n_outputs = max(opdef.min_outputs, 1)
        call = registry.make_call(opdef, node, attrs, in_types, in_values, n_outputs)
        return registry.infer_types(opdef, call)

    def _check_new(self, value: str) -> None:
        if not value or not isinstance(value, str):
            raise GraphBuildError(f"bad value name {value!r}")
        if value in self._producer:
            raise GraphBuildError(f"graph '{self.name}' already has a value named '{value}'")

    def _insert(self, node: Node) -> None:
        self.nx.add_node(node.name, node=node, order=next(self._order))
        for i, o in enumerate(node.outputs):
            if o is not None:
                self._producer[o] = (node.name, i)
        for i, v in enumerate(node.inputs):
            if v is not None:
                self.nx.add_edge(self._producer[v][0], node.name, key=i, value=v)

    def set_outputs(self, values: Iterable[str]) -> None:
        values = list(values)
        for v in values:
            if v not in self._producer:
                raise GraphBuildError(f"output '{v}' is not a value of graph '{self.name}'")
        self.outputs = values

    # -- rewriting (for passes; call on a copy) ---------------------------------------------------
    def remove_node(self, name: str) -> None:
        node = self.node(name)
        for o in node.outputs:
            if o is not None and (self.uses(o) or o in self.inputs):
                raise GraphcError(f"cannot remove node '{name}': its value '{o}' is still used")
        for o in node.outputs:
            self._producer.pop(o, None)
        self.nx.remove_node(name)

    def replace_node(self, name: str, **changes: Any) -> Node:
        """Replace fields of a node (inputs, attrs, types, ...) keeping its name and position."""
        old = self.node(name)
        new = replace(old, **changes)
        order = self.nx.nodes[name]["order"]
        self.nx.remove_edges_from([(u, name, k) for u, _, k in self.nx.in_edges(name, keys=True)])
        self.nx.nodes[name]["node"] = new
        self.nx.nodes[name]["order"] = order
        for i, v in enumerate(new.inputs):
            if v is not None:
                self.nx.add_edge(self._producer_of(v)[0], name, key=i, value=v)
        return new

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of value ``old`` (and the graph outputs) read ``new`` instead."""
        for node in self.consumers(old):
            inputs = tuple(new if v == old else v for v in node.inputs)
            self.replace_node(node.name, inputs=inputs)
        self.outputs = [new if v == old else v for v in self.outputs]

    def copy(self, name: str | None = None) -> Graph:
        """A structural copy; arrays of constants are shared (treat them as immutable)."""
        other = Graph(name or self.name)
        other.nx = self.nx.copy()
        other._producer = dict(self._producer)
        other._order = itertools.count(max((d["order"] for _, d in self.nx.nodes(data=True)),
                                           default=-1) + 1)
        other.inputs = list(self.inputs)
        other.outputs = list(self.outputs)
        return other

    # -- text -------------------------------------------------------------------------------------
    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return (f"<graphc.Graph '{self.name}': {len(self)} nodes, inputs {self.inputs}, "
                f"outputs {self.outputs}>")

    def to_dot(self) -> str:
        """Graphviz DOT text (``graphc.dot.render`` writes SVG/PNG when graphviz is installed)."""
        from .dot import to_dot

        return to_dot(self)

    @staticmethod
    def parse(text: str, weights: dict | None = None) -> Graph:
        from .printer import parse_graph

        return parse_graph(text, weights)

    # -- builder ----------------------------------------------------------------------------------
    def input(self, name: str, shape: Sequence, dtype: str = "f32") -> Value:
        """Declare a graph input; ``None`` in ``shape`` means a symbolic batch dim ``N``."""
        dims = tuple("N" if d is None else d for d in shape)
        return Value(self, self.add_input(name, TensorType(dims, dtype)))

    def constant(self, array, name: str | None = None) -> Value:
        return Value(self, self.add_constant(np.asarray(array), name))

    def param(self, array, name: str | None = None) -> Value:
        return Value(self, self.add_constant(np.asarray(array), name, param=True))

    def output(self, *values: Value) -> None:
        names = []
        for v in values:
            if not isinstance(v, Value) or v.graph is not self:
                raise GraphBuildError(f"output {v!r} is not a value of graph '{self.name}'")
            names.append(v.name)
        self.set_outputs(self.outputs + names)

    def value(self, name: str) -> Value:
        self._producer_of(name)
        return Value(self, name)


@dataclass(frozen=True)
class Value:
    """A handle on one value of a graph, for writing graphs in Python (see ``graphc.ops``)."""

    graph: Graph
    name: str

    @property
    def type(self) -> TensorType:
        return self.graph.type_of(self.name)

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"

    def _bin(self, op: str, other, reverse: bool = False) -> Value:
        from . import ops

        return ops.apply(op, (other, self) if reverse else (self, other))

    def __add__(self, o): return self._bin("Add", o)
    def __radd__(self, o): return self._bin("Add", o, True)
    def __sub__(self, o): return self._bin("Sub", o)
    def __rsub__(self, o): return self._bin("Sub", o, True)
    def __mul__(self, o): return self._bin("Mul", o)
    def __rmul__(self, o): return self._bin("Mul", o, True)
    def __truediv__(self, o): return self._bin("Div", o)
    def __rtruediv__(self, o): return self._bin("Div", o, True)
    def __matmul__(self, o): return self._bin("MatMul", o)
    def __rmatmul__(self, o): return self._bin("MatMul", o, True)
    def __pow__(self, o): return self._bin("Pow", o)

    def __neg__(self):
        from . import ops

        return ops.apply("Neg", (self,))
