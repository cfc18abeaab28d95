"""Rewriting helpers shared by the passes: redirect readers, substitute a node's results,
turn a node into another op in place, replace a fused group by one node.

All of them edit the graph they are given (a pass calls them on its own copy) and keep graph
output names valid: a removed node whose value is a graph output becomes ``Identity(source)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from graphc.errors import GraphcError
from graphc.ir import Graph, Node
from graphc.ops import registry
from graphc.types import TensorType


def redirect_readers(g: Graph, old: str, new: str) -> None:
    """Make every node that reads ``old`` read ``new`` (graph outputs are left as they are)."""
    for node in g.consumers(old):
        g.replace_node(node.name, inputs=tuple(new if v == old else v for v in node.inputs))


def substitute(g: Graph, node: Node, subs: Mapping[str, str | np.ndarray]) -> None:
    """Remove ``node`` (in place); each result ``o`` becomes ``subs[o]``: another value of the
    same type (its readers read that) or an array (a Constant named ``o``).

    A result that is a graph output keeps its name (``Identity(value)`` or the Constant takes
    it over); results missing from ``subs`` must be unused.
    """
    if len(node.outputs) == 1 and node.output in subs:
        _substitute_single(g, node, subs[node.output])
        return
    graph_outputs = list(g.outputs)
    temporaries = {}  # result -> constant standing in while the node is removed
    for o in node.outputs:
        if o is None or o not in subs:
            continue
        new = subs[o]
        if not isinstance(new, str):
            new = temporaries[o] = g.add_constant(np.asarray(new), g.fresh_name(o))
        redirect_readers(g, o, new)
        g.outputs = [new if v == o else v for v in g.outputs]
    g.remove_node(node.name)
    for o, temp in temporaries.items():
        g.add_node("Constant", (), {"value": g.constant_value(temp)}, outputs=(o,))
        redirect_readers(g, temp, o)
    for o in node.outputs:
        if o in graph_outputs and isinstance(subs.get(o), str):
            g.add_node("Identity", (subs[o],), outputs=(o,))
    g.outputs = graph_outputs
    for temp in temporaries.values():
        g.remove_node(temp)


def _substitute_single(g: Graph, node: Node, new: str | np.ndarray) -> None:
    if not isinstance(new, str):
        array = np.asarray(new)
        g.replace_node(node.name, op="Constant", inputs=(), attrs={"value": array},
                       types=(TensorType.of(array),))
        return
    assert g.type_of(new) == node.types[0], (node.name, new)
    redirect_readers(g, node.output, new)
    if node.output in g.outputs:
        g.replace_node(node.name, op="Identity", inputs=(new,), attrs={})
    else:
        g.remove_node(node.name)


def retarget(g: Graph, node: Node, op: str, inputs: tuple, attrs: dict) -> bool:
    """Turn ``node`` (in place, keeping its name and results) into ``op(inputs)`` if that
    infers the same result types; False (and nothing changed) otherwise."""
    try:
        types = g.infer(op, node.name, inputs, attrs, len(node.outputs))
    except GraphcError:
        return False
    if tuple(types) != node.types:
        return False
    g.replace_node(node.name, op=op, inputs=tuple(inputs), attrs=attrs)
    return True


def forward(g: Graph, node: Node, value: str) -> bool:
    """Readers of ``node``'s one result read ``value`` instead; the node goes (see
    ``substitute``)."""
    substitute(g, node, {node.output: value})
    return True


def replace_with_node(g: Graph, root: Node, others: Sequence[Node], op: str,
                      inputs: Sequence[str | None], attrs: dict) -> None:
    """Turn ``root`` into ``op(inputs) {attrs}`` in place (same name, output and position) and
    remove ``others``, whose values only ``root`` and each other read."""
    inputs = list(inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = registry.get(op, root.name).normalize_attrs(root.name, attrs)
    types = tuple(g.infer(op, root.name, inputs, attrs, len(root.outputs)))
    # a rule that changed the value's type would be a bug, not a fusion
    assert types == root.types, (root.name, types, root.types)
    g.replace_node(root.name, op=op, inputs=tuple(inputs), attrs=attrs, types=types)
    pending = list(others)
    while pending:  # readers first: a node goes once nothing reads its value
        free = [n for n in pending if not any(g.uses(o) for o in n.outputs if o is not None)]
        assert free, f"nodes {[n.name for n in pending]} are still read outside the fusion"
        for node in free:
            g.remove_node(node.name)
            pending.remove(node)


def remove_unused_constants(g: Graph, values: Iterable[str]) -> None:
    """Drop the Constant nodes of ``values`` that a fusion left without readers (Params stay:
    they are trainable state)."""
    for v in dict.fromkeys(values):
        if v in g and g.producer(v).op == "Constant" and g.uses(v) == 0:
            g.remove_node(g.producer(v).name)
