"""Which algorithm computes each Conv: Winograd F(4x4,3x3), F(2x2,3x3), im2col + GEMM, or direct.

``choose_conv_algorithm`` is the single place that decides; the ``winograd`` and ``lower-conv``
passes both ask it, so that each Conv is rewritten by exactly one of them. The user's choice
(``PassOptions.conv`` / ``conv_per_node``) wins where the conv allows it; "auto" applies the
cost rule below.
"""

from __future__ import annotations

import math

from graphc.errors import GraphcError
from graphc.ops import registry
from graphc.ops.convolution import conv_window
from graphc.ops.winograd import WINOGRAD_DTYPES

CONV_OPS = ("Conv", "FusedConv")

# Cost weights of the cost rule, in "GEMM multiply-add" units: a transform touches each element
# with a few adds but is memory-bound, so one transformed element costs about as much as
# TRANSFORM_WEIGHT multiply-adds of a well-blocked GEMM.
TRANSFORM_WEIGHT = 4.0
MIN_WINOGRAD_CHANNELS = 8  # below this (e.g. RGB first layers) transforms outweigh the GEMM


def conv_geometry(graph, node):
    """(N, C, K, group, out_h, out_w, kernel, strides, dilations) of a 2-D Conv node."""
    opdef = registry.get(node.op)
    in_types = [graph.type_of(v) if v is not None else None for v in node.inputs]
    call = registry.make_call(opdef, node.name, node.attrs, in_types[:3])
    win = conv_window(call)
    x, w = in_types[0], in_types[1]
    return (x.shape[0], x.shape[1], w.shape[0], call["group"], win.out, win.kernel,
            win.strides, win.dilations)


def winograd_obstacle(graph, node) -> str | None:
    """Why the ``winograd`` pass cannot rewrite ``node`` (None if it can)."""
    if node.op not in CONV_OPS or graph.type_of(node.inputs[0]).rank != 4:
        return "a 2-D Conv"
    _, c, _, _, out, kernel, strides, dilations = conv_geometry(graph, node)
    if tuple(kernel) != (3, 3) or tuple(strides) != (1, 1) or tuple(dilations) != (1, 1):
        return "a 3x3 kernel with stride 1 and dilation 1"
    if graph.type_of(node.inputs[0]).dtype not in WINOGRAD_DTYPES:
        # float16 rounding of the transforms would swamp the result (F4's G has entries 1/15)
        return "float32 or float64 operands"
    if not (isinstance(c, int) and all(isinstance(d, int) for d in out)):
        return "static channel and spatial dims (the tile count is an attribute)"
    return None


def winograd_eligible(graph, node) -> bool:
    """3x3 kernel, stride 1, dilation 1, 2-D, f32/f64, static channels and spatial dims."""
    return winograd_obstacle(graph, node) is None


def winograd_cost(c: int, k: int, out_h: int, out_w: int, m: int) -> float:
    """Multiply-adds of F(m x m, 3x3) per image: batched GEMM plus weighted transforms."""
    a = m + 2
    tiles = math.ceil(out_h / m) * math.ceil(out_w / m)
    gemm = tiles * a * a * c * k
    transforms = tiles * a * a * (c + k) * TRANSFORM_WEIGHT
    return gemm + transforms


def filter_transform_cost(c: int, k: int, m: int) -> float:
    """The filter transform, paid once per run when W is computed at run time (else folded)."""
    return (m + 2) ** 2 * c * k * TRANSFORM_WEIGHT


def im2col_cost(c: int, k: int, out_h: int, out_w: int) -> float:
    return out_h * out_w * 9 * c * k + out_h * out_w * 9 * c * TRANSFORM_WEIGHT / 4


def auto_algorithm(graph, node) -> str:
    """The cheapest of im2col, F(2x2, 3x3) and F(4x4, 3x3) by the cost rule (per group)."""
    if not winograd_eligible(graph, node):
        return "im2col"
    n, c, k, group, (out_h, out_w), *_ = conv_geometry(graph, node)
    c, k = c // group, k // group
    if c < MIN_WINOGRAD_CHANNELS:
        return "im2col"
    batch = n if isinstance(n, int) else 1  # a symbolic batch counts as one image
    runtime_weights = graph.constant_value(node.inputs[1]) is None
    costs = {"im2col": batch * im2col_cost(c, k, out_h, out_w)}
    for name, m in (("winograd-f2", 2), ("winograd-f4", 4)):
        costs[name] = (batch * winograd_cost(c, k, out_h, out_w, m)
                       + runtime_weights * filter_transform_cost(c, k, m))
    return min(costs, key=costs.get)


def choose_conv_algorithm(graph, node, options) -> str:
    """The algorithm for Conv/FusedConv ``node``: the user's choice where it applies, else the
    cost rule. A per-node Winograd override on a conv Winograd cannot compute is an error; a
    global one falls back to im2col for such convs (1x1, strided, dilated)."""
    chosen = options.conv_algorithm(node.name)
    if chosen == "auto":
        return auto_algorithm(graph, node)
    obstacle = winograd_obstacle(graph, node) if chosen.startswith("winograd") else None
    if obstacle is not None:
        if node.name in options.conv_per_node:
            raise GraphcError(f"{node.op} node '{node.name}': {chosen} needs {obstacle}")
        return "im2col"
    return chosen
