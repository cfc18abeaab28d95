"""FLOP counts per node from each op's ``flops`` rule (direct-convolution counts for Conv).

Symbolic dims (a batch ``N``) count as 1, so a model with a symbolic batch reports FLOPs per
sample; ``symbols(graph)`` names them so that reports can say so.
"""

from __future__ import annotations

from .ir import CONSTANT_OPS, INPUT, Graph
from .ops import registry
from .types import TensorType


def _per_unit(t):
    if t is None or t.is_static:
        return t
    return TensorType(tuple(1 if isinstance(d, str) else d for d in t.shape), t.dtype)


def node_flops(graph: Graph, node) -> int:
    if node.op == INPUT or node.op in CONSTANT_OPS:
        return 0
    opdef = registry.get(node.op, node.name)
    if opdef.flops is None:
        return 0
    in_types = [_per_unit(graph.type_of(v)) if v is not None else None for v in node.inputs]
    call = registry.make_call(opdef, node.name, node.attrs, in_types,
                              [graph.constant_value(v) for v in node.inputs], len(node.outputs))
    return int(opdef.flops(call, [_per_unit(t) for t in node.types]))


def flops_by_node(graph: Graph) -> dict[str, int]:
    return {n.name: node_flops(graph, n) for n in graph.nodes()
            if n.op != INPUT and n.op not in CONSTANT_OPS}


def symbols(graph: Graph) -> list[str]:
    """Symbolic dims of the graph inputs, in order of first appearance."""
    out: list[str] = []
    for v in graph.inputs:
        out += [d for d in graph.type_of(v).shape if isinstance(d, str) and d not in out]
    return out
