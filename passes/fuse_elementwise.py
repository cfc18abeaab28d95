"""fuse-elementwise: fuse each maximal tree of elementwise and broadcast ops whose intermediate
values have one use into one ``FusedElementwise`` node (``graphc/ops/fused_expression.py``).

Before::

    %mul = Mul(%x, %s) : f32[N,8,5]
    %c = Constant() {value=tensor<f32[]> [0.5]} : f32[]
    %add = Add(%mul, %c) : f32[N,8,5]
    %relu = Relu(%add) : f32[N,8,5]

After::

    %relu = FusedElementwise(%x, %s) {expr="relu(x0 * x1 + 0.5)"} : f32[N,8,5]

Rules:

* a member is an op of registry kind "elementwise" or "broadcast" that the expression language
  can write (``fused_elementwise.function_for``), or a FusedElementwise (its body is spliced
  in, so fusing is idempotent and merges earlier fusions); its result is a float tensor;
* a producer joins its reader's tree when its value has exactly one use (not a graph output)
  and the same dtype as the tree's result; everything else becomes an input x<i>, numbered in
  order of first appearance (a value read twice is one input);
* size-1 float constants become literals when they have the dtype of the operation's first
  non-constant operand (literals take that dtype); a literal that would change the result's
  broadcast shape is not inlined (the tree is rebuilt without literals);
* a body nests at most ``MAX_BODY_DEPTH`` (64) operations deep: longer chains become several
  nodes, and a second run leaves them so (merging would exceed the limit);
* a tree of one op stays as it is.

The fused node keeps the tree root's name and output, so its readers are untouched.
"""

from __future__ import annotations

import numpy as np

from graphc.errors import GraphcError
from graphc.ir import Graph, Node
from graphc.ops import registry
from graphc.ops.fused_expression import (
    Call,
    Expr,
    Input,
    Literal,
    depth,
    function_for,
    input_reads,
    parse_expr,
    renumber,
    substitute,
    to_text,
)
from graphc.types import FLOAT_DTYPES
from passes.manager import PassOptions, register_pass
from passes.rewrite import remove_unused_constants, replace_with_node

FUSED = "FusedElementwise"
FUSABLE_KINDS = ("elementwise", "broadcast")
# Clip's absent bounds become these literals: max(x, -inf) and min(x, inf) return x exactly.
ABSENT_CLIP_BOUNDS = {1: float("-inf"), 2: float("inf")}
# Bodies nest at most this many operations deep (a longer chain becomes several nodes), which
# keeps printing, parsing and evaluating them far inside Python's recursion limit.
MAX_BODY_DEPTH = 64


@register_pass("fuse-elementwise")
def fuse_elementwise(graph: Graph, options: PassOptions) -> Graph:
    """Fuse trees of single-use elementwise/broadcast ops into FusedElementwise nodes."""
    claimed: set[str] = set()
    trees = []
    for node in reversed(graph.nodes()):  # readers before producers: roots come first
        if node.name not in claimed and is_fusable(node):
            members = grow_tree(graph, node, claimed)
            claimed.update(m.name for m in members)
            if len(members) > 1:
                trees.append(members)
    g = graph.copy()
    for members in trees:
        fuse_tree(g, graph, members)
    return g


def is_fusable(node: Node) -> bool:
    if len(node.outputs) != 1 or node.types[0] is None or node.types[0].dtype not in FLOAT_DTYPES:
        return False
    if node.op == FUSED:
        return True
    if not registry.has(node.op) or registry.get(node.op).kind not in FUSABLE_KINDS:
        return False
    return function_for(node.op, registry.get(node.op).full_attrs(node.attrs)) is not None


def grow_tree(graph: Graph, root: Node, claimed: set[str]) -> list[Node]:
    """``root`` and every producer that joins its tree, readers before producers."""
    members = [root]
    depths = {root.name: body_depth(root)}  # operations from the root down to a member's inputs
    dtype = root.types[0].dtype
    for node in members:  # grows while iterating: a breadth-first walk
        for v in dict.fromkeys(node.inputs):
            if v is None or reads(graph, v) != 1:
                continue
            producer = graph.producer(v)
            if (producer.name in claimed or not is_fusable(producer)
                    or producer.types[0].dtype != dtype):
                continue
            below = depths[node.name] + body_depth(producer)
            if below <= MAX_BODY_DEPTH:
                depths[producer.name] = below
                members.append(producer)
    return members


def body_depth(node: Node) -> int:
    return depth(parse_expr(node.attrs["expr"])) if node.op == FUSED else 1


def reads(graph: Graph, value: str) -> int:
    """Uses of ``value``, where a FusedElementwise reads an input as often as its body does: a
    value its body reads twice must stay an input, as it would in the unfused graph."""
    count = graph.outputs.count(value)
    for node in graph.consumers(value):
        slots = [i for i, v in enumerate(node.inputs) if v == value]
        if node.op == FUSED:
            body_reads = input_reads(parse_expr(node.attrs["expr"]))
            count += sum(body_reads.get(i, 0) for i in slots)
        else:
            count += len(slots)
    return count


# -- building the body ----------------------------------------------------------------------------
class _Builder:
    """Writes a tree of graph nodes as one expression whose leaves are graph values."""

    def __init__(self, graph: Graph, members: list[Node], inline: bool):
        self.graph = graph
        self.members = {m.output: m for m in members}
        self.inline = inline
        self.leaves: list[str] = []
        self.inlined: list[str] = []

    def expression(self, value: str) -> Expr:
        node = self.members.get(value)
        if node is None:
            return self.leaf(value)
        if node.op == FUSED:
            return substitute(parse_expr(node.attrs["expr"]),
                              [self.expression(v) for v in node.inputs])
        full = registry.get(node.op).full_attrs(node.attrs)
        func, params = function_for(node.op, full)
        literals = self.literal_slots(node) if self.inline else {}
        args = []
        for i, v in enumerate(node.inputs):
            if v is None:
                args.append(Literal(ABSENT_CLIP_BOUNDS[i]))
            elif i in literals:
                args.append(literals[i])
                self.inlined.append(v)
            else:
                args.append(self.expression(v))
        for i in range(len(node.inputs), 3 if func == "clip" else 0):
            args.append(Literal(ABSENT_CLIP_BOUNDS[i]))
        return Call(func, tuple(args), params)

    def leaf(self, value: str) -> Input:
        if value not in self.leaves:
            self.leaves.append(value)
        return Input(self.leaves.index(value))

    def literal_slots(self, node: Node) -> dict[int, Literal]:
        """Operand slots of ``node`` holding size-1 constants that can be written as literals."""
        constants = {i: self.graph.constant_value(v) for i, v in enumerate(node.inputs)}
        candidates = {i: c for i, c in constants.items()
                      if c is not None and c.size == 1 and c.dtype.kind == "f"}
        kept = [i for i, v in enumerate(node.inputs) if v is not None and i not in candidates]
        if not kept:
            return {}  # an operation needs one operand that is not a literal
        dtype = self.graph.type_of(node.inputs[kept[0]]).np_dtype
        return {i: literal_of(c) for i, c in candidates.items() if c.dtype == dtype}


def literal_of(array: np.ndarray) -> Literal:
    """The literal of a size-1 array: its shortest decimal form in its own dtype where that reads
    back to the same bits, else the exact float64 value."""
    x = np.asarray(array).reshape(())
    if np.isnan(x):
        return Literal(float("nan"))
    short = float(str(x[()]))
    exact = np.asarray(short, dtype=x.dtype).tobytes() == x.tobytes()
    return Literal(short if exact else float(x))


def build_body(graph: Graph, members: list[Node]) -> tuple[str, list[str], list[str]] | None:
    """(expr text, input values, inlined constants) of the tree, or None if it cannot be
    written with its result type unchanged."""
    root = members[0]
    for inline in (True, False):
        builder = _Builder(graph, members, inline)
        expr, order = renumber(builder.expression(root.output))
        inputs = [builder.leaves[i] for i in order]
        text = to_text(expr)
        try:
            types = graph.infer(FUSED, root.name, inputs, {"expr": text})
        except GraphcError:  # a body the op rejects is left unfused
            continue
        if tuple(types) == root.types:
            return text, inputs, builder.inlined
    return None


def fuse_tree(g: Graph, graph: Graph, members: list[Node]) -> None:
    """Replace the tree ``members`` (planned on ``graph``) by one FusedElementwise in ``g``."""
    body = build_body(graph, members)
    if body is None:
        return
    text, inputs, inlined = body
    replace_with_node(g, members[0], members[1:], FUSED, inputs, {"expr": text})
    remove_unused_constants(g, inlined)

