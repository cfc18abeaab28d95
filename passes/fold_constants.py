"""Constant folding: evaluate at compile time every node whose operands are all constants.

    graph g(%x: f32[2,3]) {                         graph g(%x: f32[2,3]) {
      %a = Constant() {... [1.0, 2.0, 3.0]} : f32[3]  %c = Constant() {... [2.0, 3.0, 4.0]} : f32[3]
      %b = Constant() {... [1.0, 1.0, 1.0]} : f32[3]  %y = Mul(%x, %c) : f32[2,3]
      %c = Add(%a, %b) : f32[3]                 ->    %s = Constant() {... [2, 3]} : i64[2]
      %y = Mul(%x, %c) : f32[2,3]                     return %y, %s
      %s = Shape(%x) : i64[2]                       }
      return %y, %s
    }

The interpreter's ``run_node`` computes the values, so folded and unfolded graphs agree exactly.
Each folded result becomes a Constant *of the same name* (graph outputs stay valid), and what
only the folded nodes read goes (the constants they consumed; a value only a Shape read).
``Shape`` of a statically shaped value folds without computing the value.
Not folded: ``Param`` operands (trainable, so not constant), random nodes (Dropout in training
mode: a fixed seed here, but a fresh draw in general), and nodes no one reads (``dce``'s job).
"""

from __future__ import annotations

import numpy as np

from graphc.interp import run_node
from graphc.ir import CONSTANT_OPS, INPUT, Graph, Node

from .canonicalize import dropout_is_identity
from .dce import remove_dead
from .manager import PassOptions, register_pass
from .rewrite import substitute


def is_random(g: Graph, node: Node) -> bool:
    """True for nodes whose result is a random draw (Dropout in training mode)."""
    return node.op == "Dropout" and not dropout_is_identity(g, node)


@register_pass("fold-constants")
def fold_constants(graph: Graph, options: PassOptions) -> Graph:
    """Evaluate every node whose inputs are all constants and replace it by a Constant."""
    g = graph.copy()
    operands_of_folded: list[str] = []
    for name in [n.name for n in g.nodes()]:
        node = g.node(name)
        arrays = _operand_values(g, node)
        if arrays is None:
            continue
        results = run_node(g, node, arrays)
        subs = {o: _contiguous(r) for o, r in zip(node.outputs, results)
                if o is not None and g.uses(o)}
        operands_of_folded += node.inputs
        substitute(g, node, subs)
    remove_dead(g, operands_of_folded)
    return g


def _operand_values(g: Graph, node: Node) -> list | None:
    """The arrays to evaluate ``node`` on, or None if it does not fold."""
    if node.op in CONSTANT_OPS or node.op == INPUT or not node.inputs:
        return None
    if not any(o is not None and g.uses(o) for o in node.outputs):
        return None
    if node.op == "Shape":
        t = g.type_of(node.inputs[0])
        if t.is_static:  # only the shape is read: a zero-strided stand-in of the right shape
            return [np.broadcast_to(np.zeros((), t.np_dtype), t.shape)]
    if is_random(g, node):
        return None
    if all(v is None or g.producer(v).op == "Constant" for v in node.inputs):
        return [g.constant_value(v) for v in node.inputs]
    return None


def _contiguous(array: np.ndarray) -> np.ndarray:
    """An own C-ordered array (a folded Transpose is a view; ``np.ascontiguousarray`` would
    turn a scalar into shape (1,))."""
    return array if array.flags.c_contiguous else np.array(array, order="C")
