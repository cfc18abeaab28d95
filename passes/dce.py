"""Dead-code elimination: drop every node none of whose results reaches a graph output.

Graph inputs stay (they are the graph's signature) even when nothing reads them. A node with
several results stays as long as one of them is used::

    graph g(%x: f32[4]) {                      graph g(%x: f32[4]) {
      %a = Relu(%x) : f32[4]               ->    %b = Neg(%x) : f32[4]
      %b = Neg(%x) : f32[4]                      return %b
      return %b                                }
    }

``remove_dead(graph, values)`` is the local form other passes call after a rewrite: it drops
the producers of ``values`` that the rewrite left unused, and whatever only they read.
"""

from __future__ import annotations

from collections.abc import Iterable

from graphc.ir import INPUT, Graph

from .manager import PassOptions, register_pass


@register_pass("dce")
def dce(graph: Graph, options: PassOptions) -> Graph:
    """Remove nodes none of whose outputs reaches a graph output (graph inputs stay)."""
    g = graph.copy()
    live = _live_nodes(g)
    # reverse topological order: a dead node's readers are all dead and already gone
    for node in reversed(g.nodes()):
        if node.name not in live and node.op != INPUT:
            g.remove_node(node.name)
    return g


def _live_nodes(g: Graph) -> set[str]:
    """Names of the nodes some graph output depends on (a walk up from the outputs)."""
    live: set[str] = set()
    stack = [g.producer(v).name for v in g.outputs]
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        stack.extend(g.producer(v).name for v in g.node(name).inputs if v is not None)
    return live


def remove_dead(g: Graph, values: Iterable[str | None]) -> None:
    """Remove (in place) the producers of ``values`` left without readers, transitively.

    Graph inputs and graph outputs are never removed; a node goes only when none of its
    results is read.
    """
    stack = [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        if value not in g:
            continue
        node = g.producer(value)
        if node.op == INPUT or any(o is not None and g.uses(o) for o in node.outputs):
            continue
        g.remove_node(node.name)
        stack.extend(v for v in node.inputs if v is not None)
