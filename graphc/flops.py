"""FLOP counts per node from each op's ``flops`` rule (direct-convolution counts for Conv)."""

from __future__ import annotations

from .ir import CONSTANT_OPS, INPUT, Graph
from .ops import registry


def node_flops(graph: Graph, node) -> int:
    if node.op == INPUT or node.op in CONSTANT_OPS:
        return 0
    opdef = registry.get(node.op, node.name)
    if opdef.flops is None:
        return 0
    in_types = [graph.type_of(v) if v is not None else None for v in node.inputs]
    call = registry.make_call(opdef, node.name, node.attrs, in_types,
                              [graph.constant_value(v) for v in node.inputs], len(node.outputs))
    return int(opdef.flops(call, list(node.types)))


def flops_by_node(graph: Graph) -> dict[str, int]:
    return {n.name: node_flops(graph, n) for n in graph.nodes()
            if n.op != INPUT and n.op not in CONSTANT_OPS}
