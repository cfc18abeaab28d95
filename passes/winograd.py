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
# The fused form (target "cpu"): worth it where one image's staged V and M overflow the last
# level cache (32 MB here) between the stages (> FUSE_MIN_FLOATS) while U is small enough to
# be re-read from cache once per block of tiles (<= FUSE_MAX_U_FLOATS); see fuse_stages.
# Measured on VGG-16 (F4, batch 1): 64->64@224 (V + M 58 MB) runs 2x faster fused; at
# 64->128@112 and 128->128@112 (22 and 29 MB) the staged form is still faster.
FUSE_MIN_FLOATS = 8 << 20
FUSE_MAX_U_FLOATS = 1 << 20


@register_pass("winograd")
def winograd(graph: Graph, options: PassOptions) -> Graph:
    """Rewrite each Conv/FusedConv chosen for Winograd into filter/input/GEMM/output stages."""
    g = graph.copy()
    for node in g.nodes():
        if node.op in CONV_OPS:
            m = TILE_SIZES.get(choose_conv_algorithm(g, node, options))
            if m is not None:
                _rewrite(g, node, m, fuse=options.target == "cpu")
    return g


def _rewrite(g: Graph, node: Node, m: int, fuse: bool) -> None:
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
    k = g.type_of(w).shape[0]
    out_attrs = {"out_shape": [batch if fold else -1, k, out_h, out_w],
                 **{key: value for key, value in node.attrs.items() if key in EPILOGUE_ATTRS}}
    c = g.type_of(x).shape[1]
    tiles = layout["tiles"][0] * layout["tiles"][1]  # per image: the rule holds at any batch
    fusable = fuse and fold and group == 1 and g.type_of(x).dtype == "f32"
    if fusable and fuse_stages(c, k, tiles, m):
        attrs = {**common, **layout, "pads": win.pads, **out_attrs}
        _replace(g, node, "WinogradConv", (x, u) + tuple(node.inputs[2:]), attrs)
        return
    v = _add(g, "WinogradInputTransform", [x], {**common, **layout, "pads": win.pads},
             f"{node.name}_V")
    products = _add(g, "MatMul", [v, u], {}, f"{node.name}_M")
    # Conv's B and FusedConv's (B, Z) are exactly WinogradOutput's epilogue operands.
    _replace(g, node, "WinogradOutput", (products,) + tuple(node.inputs[2:]),
             {**common, **layout, **out_attrs})


def fuse_stages(c: int, k: int, tiles: int, m: int) -> bool:
    """Whether target "cpu" runs this conv as one ``WinogradConv`` (block by block over the
    tiles, the transformed data staying in L2) instead of three stages whose V and M make a
    round trip through memory: when one image's V and M (``tiles`` per image) together exceed
    ``FUSE_MIN_FLOATS`` and U, which every block re-reads, is at most ``FUSE_MAX_U_FLOATS``."""
    a2 = (m + 2) ** 2
    return a2 * tiles * (c + k) > FUSE_MIN_FLOATS and a2 * c * k <= FUSE_MAX_U_FLOATS


def _replace(g: Graph, node: Node, op: str, inputs: tuple, attrs: dict) -> None:
    """Turn ``node`` into ``op``, keeping its name and output value (same type)."""
    attrs = registry.get(op).normalize_attrs(node.name, attrs)
    types = tuple(g.infer(op, node.name, inputs, attrs))
    assert types == node.types, (types, node.types)
    g.replace_node(node.name, op=op, inputs=inputs, attrs=attrs)


def _add(g: Graph, op: str, inputs: list, attrs: dict, name: str) -> str:
    return g.add_node(op, inputs, attrs, outputs=[g.fresh_name(name)])[0]
