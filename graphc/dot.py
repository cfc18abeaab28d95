"""Graphviz DOT text for a graph (``graph.to_dot()``), and rendering when ``dot`` is installed."""

from __future__ import annotations

import json
import shutil
import subprocess

from .errors import GraphcError
from .ir import CONSTANT_OPS, INPUT, Graph


def _q(text: str) -> str:
    return json.dumps(text)


def to_dot(graph: Graph) -> str:
    """Ops as boxes, inputs as ellipses, constants folded into their readers' labels."""
    lines = [f"digraph {_q(graph.name)} {{", "  rankdir=TB;",
             '  node [shape=box, fontname="Helvetica", fontsize=10];']
    for node in graph.nodes():
        if node.op in CONSTANT_OPS:
            continue
        if node.op == INPUT:
            label = _q(f"{node.name}: {node.types[0]}")
            lines.append(f"  {_q(node.name)} [shape=ellipse, label={label}];")
            continue
        consts = [v for v in node.inputs if v is not None and graph.constant_value(v) is not None]
        extra = "".join(f"\\n{v}: {graph.type_of(v)}" for v in consts)
        types = ", ".join(str(t) for t in node.types if t is not None)
        label = f"{node.op}\\n{types}{extra}"
        lines.append(f"  {_q(node.name)} [label=\"{label}\"];")
        for v in node.inputs:
            if v is not None and graph.constant_value(v) is None:
                lines.append(f"  {_q(graph.producer(v).name)} -> {_q(node.name)} "
                             f"[label={_q(v)}];")
    for i, v in enumerate(graph.outputs):
        lines.append(f"  {_q('out:' + v)} [shape=ellipse, label={_q(f'output {i}: {v}')}];")
        lines.append(f"  {_q(graph.producer(v).name)} -> {_q('out:' + v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(graph: Graph, path: str, fmt: str = "svg") -> str:
    """Write the graph as SVG/PNG with graphviz's ``dot``; GraphcError if it is not installed."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphcError("rendering needs graphviz's 'dot' program (apt install graphviz); "
                          "graph.to_dot() gives the DOT text without it")
    subprocess.run([dot, f"-T{fmt}", "-o", path], input=to_dot(graph), text=True, check=True)
    return path
