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
filled in, also those derived from the operands such as a window's unit strides; arrays
compared by value) and the same result types. Two Constants are the same when
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
            first = expressions.setdefault(_expression_key(g, node), name)
            if node.op == "Identity" and node.output in g.outputs:
                continue  # it names a graph output: it may be kept, but not merged away
        if first is not None and first != name:
            kept = g.node(first)
            substitute(g, node, {o: k for o, k in zip(node.outputs, kept.outputs)
                                 if o is not None})
    return g


def _expression_key(g: Graph, node: Node) -> tuple:
    inputs = node.inputs
    if node.op in COMMUTATIVE:
        inputs = tuple(sorted(inputs))
    attrs = canonical_attrs(g, node)
    return (node.op, inputs, tuple(sorted((k, _attr_key(v)) for k, v in attrs.items())),
            node.types, tuple(o is None for o in node.outputs))


# Window attributes whose default (None) means "this value on every spatial axis": the
# lowering of a Conv spells them out (Im2Col {dilations=[1, 1], strides=[1, 1]}) where the
# weight-gradient rule leaves them out, and the two Im2Cols must still merge.
WINDOW_DEFAULTS = {"strides": (1, 1), "dilations": (1, 1), "pads": (0, 2)}  # (value, per axis)


def canonical_attrs(g: Graph, node: Node) -> dict:
    """``node``'s attributes with every default filled in, including the defaults that depend
    on the operands: window strides/dilations/pads (pads only without auto_pad or an explicit
    output shape, which derive them) and Transpose's reversed ``perm``."""
    opdef = registry.get(node.op)
    attrs = opdef.full_attrs(node.attrs)
    if node.op == "Transpose" and attrs.get("perm") is None and node.inputs:
        attrs["perm"] = tuple(reversed(range(g.type_of(node.inputs[0]).rank)))
    axes = _spatial_axes(g, node, attrs)
    if axes is None:
        return attrs
    derived_pads = attrs.get("auto_pad", "NOTSET") != "NOTSET" or \
        attrs.get("output_shape") is not None
    for name, (value, per_axis) in WINDOW_DEFAULTS.items():
        if name in opdef.attrs and attrs.get(name) is None and not (name == "pads"
                                                                    and derived_pads):
            attrs[name] = (value,) * (per_axis * axes)
    return attrs


def _spatial_axes(g: Graph, node: Node, attrs: dict) -> int | None:
    """How many spatial axes a windowed op slides over (kernel_shape's length, else X's rank
    minus batch and channels); None for other ops."""
    if not any(name in attrs for name in WINDOW_DEFAULTS):
        return None
    if attrs.get("kernel_shape") is not None:
        return len(attrs["kernel_shape"])
    if not node.inputs or node.inputs[0] is None:
        return None
    return max(g.type_of(node.inputs[0]).rank - 2, 0)


def _attr_key(value):
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list):
        return tuple(_attr_key(v) for v in value)  # [1, 1] == (1, 1)
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
