"""fuse-epilogue: fold bias adds, a residual add and an activation into the op that produces
their input, as the epilogue ``y = activation(acc + bias + residual)`` of ``ops/epilogue.py``.

Before::

    %conv = Conv(%x, %w) {pads=[1, 1, 1, 1]} : f32[N,8,9,9]
    %b = Constant() {value=tensor<f32[1,8,1,1]> [...]} : f32[1,8,1,1]
    %add = Add(%conv, %b) : f32[N,8,9,9]
    %add_1 = Add(%add, %skip) : f32[N,8,9,9]
    %relu = Relu(%add_1) : f32[N,8,9,9]

After::

    %b_bias = Constant() {value=tensor<f32[8]> [...]} : f32[8]
    %relu = FusedConv(%x, %w, %b_bias, %skip) {activation="relu", pads=[1, 1, 1, 1]} : f32[N,8,9,9]

The fused node keeps the last folded node's name and output, so its readers are untouched.

Producers: Conv -> FusedConv, Gemm -> FusedGemm, MatMul of two matrices -> FusedGemm (Gemm with
its default attributes is exactly that product), and any op whose registry entry has
``epilogue_bias_axis`` (FusedConv, FusedGemm, ConvGemm, WinogradOutput, ...) while its epilogue
has no activation yet. Following the single use of the producer's value, these rules apply:

==========================  =============================================================
consumer                    folds when
==========================  =============================================================
``Add(v, c)`` (bias)        no bias yet; ``c`` a constant per-channel vector along
                            ``epilogue_bias_axis`` (aligned as numpy broadcasts it: f32[K]
                            is per-channel only on the last axis); for Gemm ``c`` may be
                            anything that broadcasts like Gemm's C (then beta becomes 1)
``Add(v, z)`` (residual)    no residual yet; ``z`` has exactly the output type and is not
                            computed from the producer
activation of ``v``         ``epilogue.activation_of`` accepts it (Clip: constant bounds);
                            nothing folds after it (``act(y) + z`` is not an epilogue)
==========================  =============================================================

Either ``Add`` may take ``v`` as its first or second operand (IEEE addition commutes). A bias
add that comes after the residual add is moved before it: ``(acc + z) + b`` becomes
``(acc + b) + z``, a reassociation (float32 results agree to ~1e-6 relative). Every folded
value must have one use and not be a graph output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from graphc.ir import Graph, Node
from graphc.ops import registry
from graphc.ops.epilogue import activation_of
from graphc.types import FLOAT_DTYPES, TensorType
from passes.manager import PassOptions, register_pass
from passes.rewrite import remove_unused_constants, replace_with_node

# Ops that become an epilogue op when something folds into them.
TO_EPILOGUE_OP = {"Conv": "FusedConv", "Gemm": "FusedGemm", "MatMul": "FusedGemm"}
GEMM_LIKE = ("FusedGemm",)  # bias is Gemm's C: any shape that broadcasts to (M, N)


@dataclass
class Epilogue:
    """What one producer's fused epilogue will hold; ``members`` are the folded nodes in order."""

    producer: Node
    op: str
    bias: str | None = None
    bias_array: np.ndarray | None = None
    residual: str | None = None
    activation: tuple[str, tuple[float, ...]] | None = None
    members: list[Node] = field(default_factory=list)


@register_pass("fuse-epilogue")
def fuse_epilogue(graph: Graph, options: PassOptions) -> Graph:
    """Fold bias, residual Add and activation into Conv/Gemm/MatMul and epilogue ops."""
    claimed: set[str] = set()
    plans = []
    for node in graph.nodes():
        plan = plan_epilogue(graph, node, claimed)
        if plan is not None:
            claimed.update(m.name for m in plan.members)
            plans.append(plan)
    g = graph.copy()
    for plan in plans:
        apply_epilogue_plan(g, plan)
    return g


# -- planning (reads the input graph only) --------------------------------------------------------
def plan_epilogue(graph: Graph, node: Node, claimed: set[str]) -> Epilogue | None:
    """The nodes after ``node`` that fold into its epilogue, or None if none does."""
    target = _epilogue_op(graph, node)
    if target is None:
        return None
    n_inputs = len(registry.get(target).inputs)
    inputs = list(node.inputs) + [None] * (n_inputs - len(node.inputs))
    plan = Epilogue(node, target, bias=inputs[n_inputs - 2], residual=inputs[n_inputs - 1])
    out_type = node.types[0]
    value = node.output
    while plan.activation is None:
        consumer = _single_consumer(graph, value, claimed)
        if consumer is None or not _fold_step(graph, plan, consumer, value, out_type):
            break
        plan.members.append(consumer)
        value = consumer.output
    return plan if plan.members else None


def _epilogue_op(graph: Graph, node: Node) -> str | None:
    """The op ``node`` becomes with a fused epilogue, or None if it cannot take one."""
    if len(node.outputs) != 1 or node.types[0].dtype not in FLOAT_DTYPES:
        return None
    if registry.has(node.op) and registry.get(node.op).epilogue_bias_axis is not None:
        return None if node.attrs.get("activation") else node.op
    if node.op == "MatMul" and any(graph.type_of(v).rank != 2 for v in node.inputs):
        return None  # batched or vector products have no Gemm form
    return TO_EPILOGUE_OP.get(node.op)


def _single_consumer(graph: Graph, value: str, claimed: set[str]) -> Node | None:
    """The only reader of ``value`` if it has exactly one use (graph outputs count as uses)."""
    readers = graph.consumers(value)
    if graph.uses(value) != 1 or len(readers) != 1 or readers[0].name in claimed:
        return None
    return readers[0]


def _fold_step(graph: Graph, plan: Epilogue, consumer: Node, value: str,
               out_type: TensorType) -> bool:
    """Record ``consumer`` in ``plan`` if it is the next epilogue stage; False otherwise."""
    if consumer.op == "Add" and consumer.types[0] == out_type:
        other = consumer.inputs[1] if consumer.inputs[0] == value else consumer.inputs[0]
        bias = None if plan.bias is not None else _as_bias(graph, plan, other, out_type)
        if bias is not None:
            plan.bias, plan.bias_array = other, bias
            return True
        if plan.residual is None and _can_be_residual(graph, plan.producer, other, out_type):
            plan.residual = other
            return True
        return False
    activation = activation_of(graph, consumer)
    if activation is not None and consumer.inputs[0] == value:
        plan.activation = activation
        return True
    return False


def _as_bias(graph: Graph, plan: Epilogue, value: str,
             out_type: TensorType) -> np.ndarray | None:
    """The bias array that adding constant ``value`` amounts to, or None if it is not one."""
    c = graph.constant_value(value)
    if c is None or c.dtype != out_type.np_dtype:
        return None
    if plan.op in GEMM_LIKE:
        return c if _broadcasts_to(c.shape, out_type.shape) and c.ndim <= 2 else None
    rank = out_type.rank
    axis = registry.get(plan.op).epilogue_bias_axis % rank
    channels = out_type.shape[axis]
    if c.ndim > rank or not isinstance(channels, int):
        return None
    aligned = (1,) * (rank - c.ndim) + c.shape  # numpy aligns shapes at the last axis
    if aligned[axis] not in (1, channels) or any(
            d != 1 for i, d in enumerate(aligned) if i != axis):
        return None
    return np.ascontiguousarray(np.broadcast_to(c.reshape(aligned[axis]), (channels,)))


def _broadcasts_to(shape: Sequence[int], target: Sequence) -> bool:
    """``shape`` broadcasts to ``target`` without changing it (ONNX unidirectional)."""
    return len(shape) <= len(target) and all(
        d == 1 or d == t for d, t in zip(reversed(shape), reversed(target)))


def _can_be_residual(graph: Graph, producer: Node, value: str, out_type: TensorType) -> bool:
    if graph.type_of(value) != out_type:
        return False
    # The fused node reads the residual, so it must not be computed from the producer.
    return not nx.has_path(graph.nx, producer.name, graph.producer(value).name)


# -- rewriting (on the copy) ----------------------------------------------------------------------
def apply_epilogue_plan(g: Graph, plan: Epilogue) -> None:
    node = plan.producer
    n_inputs = len(registry.get(plan.op).inputs)
    inputs = list(node.inputs) + [None] * (n_inputs - len(node.inputs))
    attrs = dict(node.attrs)
    replaced = []
    if plan.bias_array is not None:
        inputs[n_inputs - 2] = _bias_value(g, plan)
        replaced.append(plan.bias)
        if plan.op in GEMM_LIKE:
            attrs.pop("beta", None)  # there was no C for beta to scale; the added C is unscaled
    inputs[n_inputs - 1] = plan.residual
    if plan.activation is not None:
        name, params = plan.activation
        attrs["activation"] = name
        if params:
            attrs["activation_params"] = params
        replaced.extend(v for v in plan.members[-1].inputs[1:] if v is not None)  # Clip bounds
    root = plan.members[-1]
    replace_with_node(g, root, [node] + plan.members[:-1], plan.op, inputs, attrs)
    remove_unused_constants(g, replaced)


def _bias_value(g: Graph, plan: Epilogue) -> str:
    """The bias as a value: the added constant itself when its shape already fits."""
    if plan.bias_array.shape == g.type_of(plan.bias).shape:
        return plan.bias
    return g.add_constant(plan.bias_array, g.fresh_name(f"{plan.bias}_bias"))
