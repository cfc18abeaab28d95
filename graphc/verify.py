"""The IR verifier: structural invariants and that stored types equal re-inferred types."""

from __future__ import annotations

from .errors import GraphcError, VerificationError
from .ir import INPUT, Graph
from .ops import registry


def verify(graph: Graph) -> Graph:
    """Raise ``VerificationError`` naming the first node that breaks an invariant."""
    nodes = graph.nodes()  # raises on a cycle
    for v in graph.inputs:
        if graph.producer(v).op != INPUT:
            raise VerificationError(f"graph input '{v}' is not produced by an Input node")
    for node in nodes:
        _verify_node(graph, node)
    if not graph.outputs:
        raise VerificationError(f"graph '{graph.name}' has no outputs")
    for v in graph.outputs:
        if v not in graph:
            raise VerificationError(f"graph output '{v}' is not a value of the graph")
    return graph


def _verify_node(graph: Graph, node) -> None:
    where = f"{node.op} node '{node.name}'"
    if node.op == INPUT:
        if node.inputs or len(node.types) != 1:
            raise VerificationError(f"{where}: an Input has no operands and one type")
        return
    if not registry.has(node.op):
        raise VerificationError(f"{where}: op '{node.op}' is not registered")
    opdef = registry.get(node.op)
    try:
        opdef.check_arity(node.name, node.inputs)
    except GraphcError as exc:
        raise VerificationError(str(exc)) from None
    for i, v in enumerate(node.inputs):
        if v is not None and v not in graph:
            raise VerificationError(f"{where}: input {i} '{v}' does not exist")
    edges = {k: d["value"] for _, _, k, d in graph.nx.in_edges(node.name, keys=True, data=True)}
    expected = {i: v for i, v in enumerate(node.inputs) if v is not None}
    if edges != expected:
        raise VerificationError(f"{where}: edges {edges} disagree with inputs {expected}")
    try:
        inferred = graph.infer(node.op, node.name, node.inputs, node.attrs, len(node.outputs))
    except GraphcError as exc:
        raise VerificationError(f"{where}: re-inference fails: {exc}") from None
    for o, stored, new in zip(node.outputs, node.types, inferred):
        if o is not None and stored != new:
            raise VerificationError(f"{where}: output '{o}' is stored as {stored} but infers "
                                    f"as {new}")
