"""winograd: 3x3 stride-1 convs that ``choose_conv_algorithm`` gives to Winograd F(m x m, 3x3).

Every Conv/FusedConv for which ``passes.conv_algorithm.choose_conv_algorithm`` answers
"winograd-f2" (m = 2) or "winograd-f4" (m = 4) becomes the four stages of ``graphc/ops/winograd.py``
(Lavin & Gray, arXiv:1509.09308); the last one keeps the conv's name and output value::

    %y = FusedConv(%x, %w, %b, %z) {activation="relu", pads=[1, 1, 1, 1]} : f32[3,16,7,9]

becomes, for F(4x4, 3x3)::

    %y_U = WinogradFilterTransform(%w) {m=4} : f32[36,8,16]
    %y_V = WinogradInputTransform(%x) {m=4, pads=[1, 1, 1, 1], tiles=[2, 3]} : f32[36,18,8]
    %y_M = MatMul(%y_V, %y_U) : f32[36,18,16]
    %y = WinogradOutput(%y_M, %b, %z) {activation="relu", m=4, out_shape=[3, 16, 7, 9],
        tiles=[2, 3]} : f32[3,16,7,9]

``m`` is the output tile size and ``tiles`` the tile grid (3 images x 2 x 3 tiles = 18 rows of
each GEMM). ``pads`` are the conv's, with ``auto_pad`` resolved. The filter transform has a
constant operand when W is a constant, so a later ``fold-constants`` computes U at compile time.
FusedConv's bias, residual and activation move to WinogradOutput's epilogue unchanged.

A symbolic batch keeps its own axis (``fold_batch=0``: V ``[N, 36, 6, 8]``, out_shape
``[-1, 16, 7, 9]``); grouped convs get a group axis (``group=2``: U ``[2, 36, 4, 8]``). Convs the
chooser does not give to Winograd are left alone; ``winograd_eligible`` (3x3, stride 1,
dilation 1, 2-D, f32/f64, static channels and spatial size) decides what it may give.
"""

from __future__ import annotations

import math

from graphc.ir import Graph, Node
from graphc.ops import registry
from graphc.ops.convolution import conv_window
from graphc.ops.epilogue import EPILOGUE_ATTRS

from .conv_algorithm import CONV_OPS, choose_conv_algorithm
from .manager import PassOptions, register_pass

TILE_SIZES = {"winograd-f2": 2, "winograd-f4": 4}  # algorithm -> output tile size m


@register_pass("winograd")
def winograd(graph: Graph, options: PassOptions) -> Graph:
    """Rewrite each Conv/FusedConv chosen for Winograd into filter/input/GEMM/output stages."""
    g = graph.copy()
    for node in g.nodes():
        if node.op in CONV_OPS:
            m = TILE_SIZES.get(choose_conv_algorithm(g, node, options))
            if m is not None:
                _rewrite(g, node, m)
    return g


def _rewrite(g: Graph, node: Node, m: int) -> None:
    x, w = node.inputs[:2]
    opdef = registry.get(node.op)
    group = opdef.full_attrs(node.attrs)["group"]
    win = conv_window(registry.make_call(opdef, node.name, node.attrs,
                                         [g.type_of(v) for v in node.inputs[:2]]))
    out_h, out_w = win.out
    batch = g.type_of(x).shape[0]
    fold = isinstance(batch, int)
    common = {"m": m, **({"group": group} if group != 1 else {})}
    layout = {"tiles": [math.ceil(out_h / m), math.ceil(out_w / m)],
              **({} if fold else {"fold_batch": 0})}
    u = _add(g, "WinogradFilterTransform", [w], common, f"{node.name}_U")
    v = _add(g, "WinogradInputTransform", [x], {**common, **layout, "pads": win.pads},
             f"{node.name}_V")
    products = _add(g, "MatMul", [v, u], {}, f"{node.name}_M")
    k = g.type_of(w).shape[0]
    attrs = {**common, **layout, "out_shape": [batch if fold else -1, k, out_h, out_w],
             **{key: value for key, value in node.attrs.items() if key in EPILOGUE_ATTRS}}
    # Conv's B and FusedConv's (B, Z) are exactly WinogradOutput's epilogue operands.
    inputs = (products,) + tuple(node.inputs[2:])
    attrs = registry.get("WinogradOutput").normalize_attrs(node.name, attrs)
    types = tuple(g.infer("WinogradOutput", node.name, inputs, attrs))
    assert types == node.types, (types, node.types)
    g.replace_node(node.name, op="WinogradOutput", inputs=inputs, attrs=attrs)


def _add(g: Graph, op: str, inputs: list, attrs: dict, name: str) -> str:
    return g.add_node(op, inputs, attrs, outputs=[g.fresh_name(name)])[0]
