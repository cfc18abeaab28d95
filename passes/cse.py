"""Common-subexpression elimination: compute each distinct expression once.

    graph g(%x: f32[2]) {                               graph g(%x: f32[2]) {
      %c = Constant() {... [1.0, 2.0]} : f32[2]           %c = Constant() {... [1.0, 2.0]} : f32[2]
      %a = Mul(%x, %c) : f32[2]                           %a = Mul(%x, %c) : f32[2]
      %d = Constant() {... [1.0, 2.0]} : f32[2]   ->      %s = Add(%a, %a) : f32[2]
      %b = Mul(%x, %d) : f32[2]                           return %s
      %s = Add(%a, %b) : f32[2]                         }
      return %s
    }

Two nodes are the same expression when they have the same op, the same operands (the operands
of Add, Mul, Max and Min in any order: those are exactly commutative), equal attributes (defaults
filled in; arrays compared by value) and the same result types. Two Constants are the same when
dtype, shape and bytes agree (so 0.0 and -0.0 differ, and NaNs with equal bits match). The first
in topological order stays, which makes the result deterministic. Never merged: Params
(trainable; merging them would tie weights), random nodes (Dropout in training mode), and an
Identity naming a graph output. A duplicate whose value is a graph output becomes such an
Identity of the kept value, so graph output names survive.
"""

from __future__ import annotations

import hashlib

import numpy as np

from graphc.ir import INPUT, Graph, Node
from graphc.ops import registry

from .fold_constants import is_random
from .manager import PassOptions, register_pass
from .rewrite import substitute

COMMUTATIVE = ("Add", "Mul", "Max", "Min")  # exact in any operand order (Sum/Mean reassociate)


@register_pass("cse")
def cse(graph: Graph, options: PassOptions) -> Graph:
    """Merge nodes computing the same expression (and identical Constants); the first stays."""
    g = graph.copy()
    expressions: dict[tuple, str] = {}  # key -> name of the first node computing it
    constants = _ConstantTable()
    for name in [n.name for n in g.nodes()]:
        node = g.node(name)  # fresh: earlier merges may have renamed its operands
        if node.op in (INPUT, "Param") or is_random(g, node):
            continue
        if node.op == "Constant":
            first = constants.first_equal(node)
        else:
            first = expressions.setdefault(_expression_key(node), name)
            if node.op == "Identity" and node.output in g.outputs:
                continue  # it names a graph output: it may be kept, but not merged away
        if first is not None and first != name:
            kept = g.node(first)
            substitute(g, node, {o: k for o, k in zip(node.outputs, kept.outputs)
                                 if o is not None})
    return g


def _expression_key(node: Node) -> tuple:
    inputs = node.inputs
    if node.op in COMMUTATIVE:
        inputs = tuple(sorted(inputs))
    attrs = registry.get(node.op).full_attrs(node.attrs)
    return (node.op, inputs, tuple(sorted((k, _attr_key(v)) for k, v in attrs.items())),
            node.types, tuple(o is None for o in node.outputs))


def _attr_key(value):
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape, value.tobytes())
    return value


class _ConstantTable:
    """Finds an earlier Constant with the same dtype, shape and bytes.

    Arrays are hashed only once a second constant of their dtype and shape turns up, so a
    model whose weights all differ in shape is never hashed.
    """

    def __init__(self):
        self._unhashed: dict[tuple, tuple[str, np.ndarray]] = {}
        self._hashed: dict[tuple, dict[str, tuple[str, np.ndarray]]] = {}

    def first_equal(self, node: Node) -> str | None:
        array = node.attrs["value"]
        kind = (array.dtype.str, array.shape)
        if kind not in self._hashed:
            if kind not in self._unhashed:
                self._unhashed[kind] = (node.name, array)
                return None
            self._hashed[kind] = {}
            earlier = self._unhashed.pop(kind)
            self._hashed[kind][_digest(earlier[1])] = earlier
        table = self._hashed[kind]
        first = table.setdefault(_digest(array), (node.name, array))
        return first[0] if first[0] != node.name and _same_bytes(first[1], array) else None


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).data).hexdigest()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a is b or np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
