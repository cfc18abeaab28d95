"""lower-conv: convolutions that ``choose_conv_algorithm`` assigns to "im2col" become a GEMM.

Every Conv/FusedConv for which ``passes.conv_algorithm.choose_conv_algorithm`` answers "im2col"
is rewritten in place (the GEMM node keeps the conv's name and output value)::

    %y = Conv(%x, %w, %b) {pads=[1, 1, 1, 1], strides=[2, 2]} : f32[N,16,4,4]

becomes::

    %y_w2 = Reshape(%w, %y_w2_shape) : f32[1,16,72]
    %y_cols = Im2Col(%x) {kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]}
        : f32[N,1,72,16]
    %y = ConvGemm(%y_w2, %y_cols, %b) {out_spatial=[4, 4]} : f32[N,16,4,4]

A 1x1 conv with stride 1 and no padding needs no gather: its columns are ``X`` itself, so
``%y_cols = Reshape(%x, [0, G, C/G, H*W])`` (0 keeps a symbolic batch). The weight Reshape has
constant operands when W is a constant, so ``fold-constants`` turns it into the W2 constant.
FusedConv's bias, residual and activation move into ConvGemm's epilogue unchanged.

Left alone: convs the chooser gives to "direct" or Winograd, and convs whose channel or spatial
dims are symbolic (the column count ``prod(out)`` would not be a type graphc can write).
"""

from __future__ import annotations

import math

import numpy as np

from graphc.ir import Graph, Node
from graphc.ops import registry
from graphc.ops.convolution import Window, conv_window
from graphc.ops.epilogue import EPILOGUE_ATTRS

from .conv_algorithm import CONV_OPS, choose_conv_algorithm
from .manager import PassOptions, register_pass


@register_pass("lower-conv")
def lower_conv(graph: Graph, options: PassOptions) -> Graph:
    """Rewrite each Conv/FusedConv chosen for "im2col" into (Im2Col | Reshape) -> ConvGemm."""
    g = graph.copy()
    for node in g.nodes():
        if (node.op in CONV_OPS and choose_conv_algorithm(g, node, options) == "im2col"
                and _lowerable(g, node)):
            _lower(g, node)
    return g


def _lowerable(g: Graph, node: Node) -> bool:
    """Static channels and spatial dims: the GEMM's column count must be a static size."""
    x = g.type_of(node.inputs[0])
    return all(isinstance(d, int) for d in x.shape[1:])


def _window(g: Graph, node: Node) -> Window:
    """The conv's geometry with ``auto_pad`` resolved to explicit pads."""
    opdef = registry.get(node.op)
    in_types = [g.type_of(v) for v in node.inputs[:2]]
    return conv_window(registry.make_call(opdef, node.name, node.attrs, in_types))


def _lower(g: Graph, node: Node) -> None:
    x, w = node.inputs[:2]
    k_out, c_group = g.type_of(w).shape[:2]
    group = registry.get(node.op).full_attrs(node.attrs)["group"]
    win = _window(g, node)
    w2 = _reshape(g, w, (group, k_out // group, c_group * win.taps), f"{node.name}_w2")
    cols = _columns(g, x, win, group, c_group, f"{node.name}_cols")
    # Conv's B and FusedConv's (B, Z) are exactly ConvGemm's epilogue operands.
    inputs = (w2, cols) + tuple(node.inputs[2:])
    while inputs[-1] is None:
        inputs = inputs[:-1]
    attrs = {k: v for k, v in node.attrs.items() if k in EPILOGUE_ATTRS}
    attrs.update(out_spatial=win.out)
    if group != 1:
        attrs["group"] = group
    attrs = registry.get("ConvGemm").normalize_attrs(node.name, attrs)
    types = tuple(g.infer("ConvGemm", node.name, inputs, attrs))
    assert types == node.types, f"{node.name}: ConvGemm infers {types}, the conv {node.types}"
    # In place: the node keeps its name and output value, so readers and outputs need no update.
    g.replace_node(node.name, op="ConvGemm", inputs=inputs, attrs=attrs, types=types)


def _columns(g: Graph, x: str, win: Window, group: int, c_group: int, name: str) -> str:
    """COLS ``[N, G, C/G * taps, prod(out)]``: X itself for a 1x1 stride-1 unpadded conv."""
    if win.taps == 1 and set(win.strides) == {1} and not any(win.pads):
        return _reshape(g, x, (0, group, c_group, math.prod(win.out)), name)
    # Only what differs from the defaults, so that the IR reads like the Conv it came from.
    attrs = {"kernel_shape": win.kernel}
    if set(win.strides) != {1}:
        attrs["strides"] = win.strides
    if any(win.pads):
        attrs["pads"] = win.pads
    if set(win.dilations) != {1}:
        attrs["dilations"] = win.dilations
    if group != 1:
        attrs["group"] = group
    return g.add_node("Im2Col", (x,), attrs, outputs=(g.fresh_name(name),))[0]


def _reshape(g: Graph, value: str, shape: tuple, name: str) -> str:
    name = g.fresh_name(name)
    spec = g.add_constant(np.array(shape, dtype=np.int64), g.fresh_name(f"{name}_shape"))
    return g.add_node("Reshape", (value, spec), outputs=(name,))[0]
