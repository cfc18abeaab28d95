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


def winograd_eligible(graph, node) -> bool:
    """3x3 kernel, stride 1, dilation 1, 2-D, static channels."""
    if node.op not in CONV_OPS or graph.type_of(node.inputs[0]).rank != 4:
        return False
    _, c, k, _, out, kernel, strides, dilations = conv_geometry(graph, node)
    return (tuple(kernel) == (3, 3) and tuple(strides) == (1, 1) and tuple(dilations) == (1, 1)
            and isinstance(c, int) and all(isinstance(d, int) for d in out))


def winograd_cost(c: int, k: int, out_h: int, out_w: int, m: int) -> float:
    """Multiply-adds of F(m x m, 3x3) per image: batched GEMM plus weighted transforms."""
    a = m + 2
    tiles = math.ceil(out_h / m) * math.ceil(out_w / m)
    gemm = tiles * a * a * c * k
    transforms = tiles * a * a * (c + k) * TRANSFORM_WEIGHT
    return gemm + transforms


def im2col_cost(c: int, k: int, out_h: int, out_w: int) -> float:
    return out_h * out_w * 9 * c * k + out_h * out_w * 9 * c * TRANSFORM_WEIGHT / 4


def auto_algorithm(graph, node) -> str:
    if not winograd_eligible(graph, node):
        return "im2col"
    _, c, k, group, (out_h, out_w), *_ = conv_geometry(graph, node)
    c, k = c // group, k // group
    if c < MIN_WINOGRAD_CHANNELS:
        return "im2col"
    costs = {"im2col": im2col_cost(c, k, out_h, out_w),
             "winograd-f2": winograd_cost(c, k, out_h, out_w, 2),
             "winograd-f4": winograd_cost(c, k, out_h, out_w, 4)}
    return min(costs, key=costs.get)


def choose_conv_algorithm(graph, node, options) -> str:
    """The algorithm for Conv/FusedConv ``node``: the user's choice where it applies, else the
    cost rule. A per-node Winograd override on a conv Winograd cannot compute is an error; a
    global one falls back to im2col for such convs (1x1, strided, dilated)."""
    chosen = options.conv_algorithm(node.name)
    if chosen == "auto":
        return auto_algorithm(graph, node)
    if chosen.startswith("winograd") and not winograd_eligible(graph, node):
        if node.name in options.conv_per_node:
            raise GraphcError(f"Conv node '{node.name}': {chosen} needs a 3x3 kernel with "
                              f"stride 1 and dilation 1 on a 2-D input")
        return "im2col"
    return chosen
