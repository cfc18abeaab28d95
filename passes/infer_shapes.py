"""Shape inference: recompute every node's stored result types from its operands' types.

Nodes are visited in topological order and each op's shape rule runs again, so a change to a
graph input's type (a fixed batch, another image size) flows to every value. A valid graph is
left as it is; a graph with stale types becomes valid::

    graph g(%x: f32[1,8]) {                     graph g(%x: f32[1,8]) {
      %y = Relu(%x) : f32[N,8]           ->       %y = Relu(%x) : f32[1,8]
      return %y                                   return %y
    }                                           }

``with_input_shapes(graph, {"x": (1, 3, 32, 32)})`` is the user-facing form: a copy of the graph
with new input shapes and every type re-inferred. Constants are not recomputed: a shape that
the ONNX importer already folded into a constant keeps its value (re-import with
``input_shapes=`` to change such a shape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from graphc.errors import GraphcError, ShapeError
from graphc.ir import INPUT, Graph, Node
from graphc.types import TensorType

from .manager import PassOptions, register_pass


@register_pass("infer-shapes")
def infer_shapes(graph: Graph, options: PassOptions) -> Graph:
    """Re-run every node's shape rule in topological order and store the inferred types."""
    g = graph.copy()
    _reinfer_all(g)
    return g


def with_input_shapes(graph: Graph, shapes: Mapping[str, Sequence | TensorType]) -> Graph:
    """A copy of ``graph`` whose inputs have the given shapes (``None`` = symbolic batch ``N``,
    a ``TensorType`` also sets the dtype) and every type re-inferred.

    Raises ``GraphcError`` naming the first node whose shape rule rejects the new shapes.
    """
    unknown = sorted(set(shapes) - set(graph.inputs))
    if unknown:
        raise GraphcError(f"with_input_shapes: '{unknown[0]}' is not an input of graph "
                          f"'{graph.name}' (inputs: {', '.join(graph.inputs)})")
    g = graph.copy()
    for name, shape in shapes.items():
        if isinstance(shape, TensorType):
            new = shape
        else:
            old = g.type_of(name)
            new = old.with_shape("N" if d is None else d for d in shape)
        g.replace_node(g.producer(name).name, types=(new,))
    _reinfer_all(g)
    return g


def _reinfer_all(g: Graph) -> None:
    for node in g.nodes():
        if node.op != INPUT:
            reinfer_node(g, node)


def reinfer_node(g: Graph, node: Node) -> None:
    """Store ``node``'s re-inferred result types (in place)."""
    try:
        types = g.infer(node.op, node.name, node.inputs, node.attrs, len(node.outputs))
    except GraphcError as exc:
        where = "" if f"'{node.name}'" in str(exc) else f"{node.op} node '{node.name}': "
        raise ShapeError(f"re-inferring types: {where}{exc}") from exc
    types = tuple(t if o is not None else None for o, t in zip(node.outputs, types))
    if types != node.types:
        g.replace_node(node.name, types=types)
