"""lower-conv: Conv/FusedConv -> (Im2Col | Reshape) -> ConvGemm, and the two ops it introduces.

The oracle is the interpreter running the original Conv (whose reference test_ops_conv checks
against onnxruntime and a loop oracle). The lowered graph runs the same gather and the same
batched matmul, so results agree to float32 rounding; the bound used is rtol 1e-5, atol 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops
from graphc.errors import ShapeError
from graphc.flops import flops_by_node
from passes import PassOptions, all_passes
from passes.lower_conv import lower_conv

from .pass_testing import assert_same_outputs, random_feeds, run_passes

RTOL = ATOL = 1e-5
BATCHES = (1, 3)


def conv_graph(channels, spatial, w_shape, bias=True, op="Conv", residual=False, **attrs):
    """x: f32[N, channels, *spatial] -> one conv named "y" (symbolic batch N)."""
    rng = np.random.default_rng(1)
    g = graphc.Graph("conv")
    x = g.input("x", (None, channels) + tuple(spatial))
    w = g.constant(rng.standard_normal(w_shape).astype(np.float32))
    b = g.constant(rng.standard_normal(w_shape[0]).astype(np.float32)) if bias else None
    if op == "Conv":
        g.output(ops.conv(x, w, b, name="y", **attrs))
        return g
    conv_attrs = {k: v for k, v in attrs.items() if not k.startswith("activation")}
    out = g.infer("Conv", "y", (x.name, w.name), conv_attrs)[0]
    z = g.input("z", out.shape) if residual else None
    operands = (x, w, b, z)
    g.output(ops.fused_conv(*operands, name="y", **attrs))
    return g


def lower(g, **options):
    return run_passes(g, ["lower-conv"], PassOptions(**options))


def op_counts(g):
    return {op: n for op, n in g.op_histogram().items() if op not in ("Constant", "Input")}


# -- IR: what the rewrite produces ---------------------------------------------------------------
def test_1x1_conv_is_a_reshape_and_a_gemm():
    g = conv_graph(8, (5, 7), (4, 8, 1, 1))
    low = lower(g, conv="im2col")
    assert op_counts(low) == {"Reshape": 2, "ConvGemm": 1}
    cols = low.producer(low.node("y").inputs[1])
    assert cols.op == "Reshape" and cols.inputs[0] == "x"
    # the symbolic batch is copied by a 0 in the shape
    assert low.constant_value(cols.inputs[1]).tolist() == [0, 1, 8, 35]
    assert str(low.type_of("y_cols")) == "f32[N,1,8,35]"


def test_strided_3x3_conv_is_im2col_and_gemm():
    g = conv_graph(8, (7, 7), (16, 8, 3, 3), pads=[1, 1, 1, 1], strides=[2, 2])
    low = lower(g, conv="im2col")
    assert op_counts(low) == {"Reshape": 1, "Im2Col": 1, "ConvGemm": 1}
    im2col = low.node("y_cols")
    assert im2col.op == "Im2Col"
    assert im2col.attrs == {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}
    gemm = low.node("y")
    assert gemm.op == "ConvGemm" and gemm.inputs == ("y_w2", "y_cols", g.node("y").inputs[2])
    assert gemm.attrs == {"out_spatial": (4, 4)}
    assert str(low.type_of("y_w2")) == "f32[1,16,72]"
    assert str(low.type_of("y_cols")) == "f32[N,1,72,16]"
    assert low.outputs == ["y"] and low.type_of("y") == g.type_of("y")


def test_groups_reach_both_ops():
    g = conv_graph(8, (6, 6), (12, 4, 3, 3), group=2, dilations=[2, 2])
    low = lower(g, conv="im2col")
    assert low.node("y_cols").attrs["group"] == 2
    assert low.node("y_cols").attrs["dilations"] == (2, 2)
    assert low.node("y").attrs["group"] == 2
    assert str(low.type_of("y_w2")) == "f32[2,6,36]"
    assert str(low.type_of("y_cols")) == "f32[N,2,36,4]"


def test_auto_pad_is_resolved_to_explicit_pads():
    g = conv_graph(3, (7, 8), (4, 3, 4, 4), auto_pad="SAME_LOWER", strides=[2, 2])
    im2col = lower(g, conv="im2col").node("y_cols")
    assert "auto_pad" not in im2col.attrs
    assert im2col.attrs["pads"] == (2, 1, 1, 1)


def test_weight_reshape_folds_to_a_constant():
    g = conv_graph(4, (5, 5), (6, 4, 3, 3))
    low = lower(g, conv="im2col")
    reshape = low.node("y_w2")
    assert all(low.constant_value(v) is not None for v in reshape.inputs)
    if "fold-constants" not in all_passes():
        pytest.skip("fold-constants is not registered yet")
    folded = run_passes(g, ["lower-conv", "fold-constants"], PassOptions(conv="im2col"))
    w2 = folded.node("y").inputs[0]
    assert folded.producer(w2).op == "Constant"
    assert_same_outputs(g, folded, batches=BATCHES, rtol=RTOL, atol=ATOL)


def test_fused_conv_epilogue_moves_into_conv_gemm():
    g = conv_graph(4, (5, 5), (6, 4, 3, 3), op="FusedConv", residual=True, pads=[1, 1, 1, 1],
                   activation="clip", activation_params=[-0.5, 0.5])
    low = lower(g, conv="im2col")
    gemm = low.node("y")
    assert gemm.op == "ConvGemm" and gemm.inputs[2:] == g.node("y").inputs[2:]
    assert gemm.attrs["activation"] == "clip"
    assert gemm.attrs["activation_params"] == (-0.5, 0.5)


def test_lowered_ir_prints_and_parses_back():
    g = conv_graph(4, (5, 5), (6, 4, 3, 3), op="FusedConv", residual=True, strides=[2, 1],
                   activation="relu")
    low = lower(g, conv="im2col")
    parsed = graphc.Graph.parse(str(low), low.constant_arrays())
    graphc.verify(parsed)
    assert parsed.op_histogram() == low.op_histogram()
    assert_same_outputs(low, parsed, batches=(2,), rtol=RTOL, atol=ATOL)


def test_flop_count_is_the_conv_count():
    g = conv_graph(4, (5, 5), (6, 4, 3, 3), op="FusedConv", residual=True, pads=[1, 1, 1, 1])
    static = graphc.Graph.parse(str(g).replace("N,", "2,"), g.constant_arrays())
    low = lower(static, conv="im2col")
    assert sum(flops_by_node(low).values()) == sum(flops_by_node(static).values()) > 0


# -- interpreter equality on many shapes ---------------------------------------------------------
CASES = {
    "3x3 pad 1, odd H/W": (3, (7, 9), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "3x3 no pad": (4, (6, 5), (2, 4, 3, 3), {}),
    "stride 2, odd": (4, (7, 7), (6, 4, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "asymmetric pads": (3, (5, 6), (4, 3, 3, 2), {"pads": [0, 1, 2, 0]}),
    "SAME_UPPER stride 2": (3, (7, 8), (4, 3, 4, 4), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "SAME_LOWER stride 2": (3, (7, 8), (4, 3, 4, 4), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "SAME_UPPER stride 1": (3, (5, 5), (4, 3, 2, 3), {"auto_pad": "SAME_UPPER"}),
    "VALID": (3, (7, 6), (4, 3, 3, 3), {"auto_pad": "VALID"}),
    "dilation 2": (3, (9, 8), (4, 3, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "dilation and stride": (3, (11, 9), (4, 3, 3, 2), {"dilations": [2, 3], "strides": [2, 3]}),
    "groups 2": (6, (5, 7), (4, 3, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "depthwise": (5, (7, 7), (5, 1, 3, 3), {"group": 5, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    "depthwise x2": (4, (6, 5), (8, 1, 3, 3), {"group": 4, "pads": [1, 0, 1, 0]}),
    "1x1": (6, (5, 7), (4, 6, 1, 1), {}),
    "1x1 groups 3": (6, (3, 5), (9, 2, 1, 1), {"group": 3}),
    "1x1 stride 2": (6, (5, 7), (4, 6, 1, 1), {"strides": [2, 2]}),
    "1x1 padded": (6, (3, 4), (4, 6, 1, 1), {"pads": [1, 0, 0, 1]}),
    "kernel wider than input": (2, (3, 3), (3, 2, 5, 5), {"pads": [2, 2, 2, 2]}),
    "1-D": (3, (11,), (4, 3, 3), {"pads": [1, 2], "strides": [2]}),
    "1-D dilated groups": (4, (10,), (6, 2, 3), {"dilations": [2], "group": 2}),
    "1-D 1x1": (3, (9,), (5, 3, 1), {}),
    "3-D": (2, (5, 4, 3), (3, 2, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
    "3-D strided groups": (4, (5, 6, 5), (4, 2, 3, 2, 3),
                           {"strides": [2, 1, 2], "group": 2, "pads": [1, 0, 1, 0, 1, 1]}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_lowered_conv_matches_conv(case, bias):
    channels, spatial, w_shape, attrs = CASES[case]
    g = conv_graph(channels, spatial, w_shape, bias=bias, **attrs)
    low = lower(g, conv="im2col")
    assert "Conv" not in low.op_histogram() and low.op_histogram()["ConvGemm"] == 1
    assert_same_outputs(g, low, batches=BATCHES, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("activation, params", [("relu", ()), ("leaky_relu", (0.1,)),
                                                ("clip", (-0.5, 0.5)), ("", ())])
@pytest.mark.parametrize("case", ["stride 2, odd", "1x1", "depthwise"])
def test_lowered_fused_conv_matches(case, activation, params):
    channels, spatial, w_shape, attrs = CASES[case]
    g = conv_graph(channels, spatial, w_shape, op="FusedConv", residual=True,
                   activation=activation, activation_params=params, **attrs)
    low = lower(g, conv="im2col")
    assert op_counts(low).get("FusedConv") is None
    assert_same_outputs(g, low, batches=BATCHES, rtol=RTOL, atol=ATOL)


def test_fused_conv_with_residual_and_no_bias():
    g = conv_graph(4, (5, 6), (6, 4, 3, 3), bias=False, op="FusedConv", residual=True,
                   pads=[1, 1, 1, 1], activation="relu")
    low = lower(g, conv="im2col")
    assert low.node("y").inputs[2] is None and low.node("y").inputs[3] == "z"
    assert_same_outputs(g, low, batches=BATCHES, rtol=RTOL, atol=ATOL)


def test_run_time_weights_are_reshaped_at_run_time():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4, 6, 6))
    w = g.input("w", (6, 2, 3, 3))
    g.output(ops.conv(x, w, group=2, strides=[2, 2], name="y"))
    low = lower(g, conv="im2col")
    assert low.node("y_w2").inputs[0] == "w"
    assert_same_outputs(g, low, batches=BATCHES, rtol=RTOL, atol=ATOL)


def test_f64_conv():
    g = graphc.Graph("t")
    x = g.input("x", (2, 3, 5, 5), dtype="f64")
    g.output(ops.conv(x, np.ones((4, 3, 3, 3)), pads=[1, 1, 1, 1], name="y"))
    low = lower(g, conv="im2col")
    assert low.type_of("y").dtype == "f64"
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 5, 5))}
    np.testing.assert_allclose(graphc.interpret(low, feeds)[0], graphc.interpret(g, feeds)[0],
                               rtol=1e-12)


def two_convs():
    """a: 3x3 same conv (Winograd-eligible), b: 1x1 on top of it."""
    rng = np.random.default_rng(2)
    g = graphc.Graph("two")
    x = g.input("x", (None, 16, 9, 9))
    a = ops.conv(x, rng.standard_normal((16, 16, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1],
                 name="a")
    b = ops.conv(a, rng.standard_normal((8, 16, 1, 1)).astype(np.float32), name="b")
    g.output(b)
    return g


def test_model_through_compile_matches():
    g = two_convs()
    model = graphc.compile(g, conv="im2col", passes="lower-conv")
    assert op_counts(model.graph) == {"Reshape": 3, "Im2Col": 1, "ConvGemm": 2}
    for batch in BATCHES:
        feeds = random_feeds(g, batch)
        np.testing.assert_allclose(model.run(feeds)[0], graphc.interpret(g, feeds)[0],
                                   rtol=RTOL, atol=ATOL)


# -- which convs the options send here -----------------------------------------------------------
def test_direct_option_leaves_every_conv_alone():
    g = two_convs()
    assert str(lower(g, conv="direct")) == str(g)


def test_per_node_overrides():
    g = two_convs()
    low = lower(g, conv="im2col", conv_per_node={"a": "direct"})
    assert low.node("a").op == "Conv" and low.node("b").op == "ConvGemm"
    low = lower(g, conv="direct", conv_per_node={"a": "im2col"})
    assert low.node("a").op == "ConvGemm" and low.node("b").op == "Conv"
    assert_same_outputs(g, low, batches=BATCHES, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("conv", ["winograd-f2", "winograd-f4"])
def test_winograd_choice_leaves_eligible_convs_to_the_winograd_pass(conv):
    low = lower(two_convs(), conv=conv)
    # the 3x3 stride-1 conv is Winograd's; the 1x1 falls back to im2col
    assert low.node("a").op == "Conv" and low.node("b").op == "ConvGemm"


def test_auto_follows_the_cost_rule():
    g = two_convs()
    rng = np.random.default_rng(3)
    rgb = graphc.Graph("rgb")
    x = rgb.input("x", (1, 3, 16, 16))
    rgb.output(ops.conv(x, rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
                        pads=[1, 1, 1, 1], name="y"))
    low = lower(g)
    assert low.node("a").op == "Conv"  # 16 channels, 3x3: Winograd wins
    assert low.node("b").op == "ConvGemm"
    assert lower(rgb).node("y").op == "ConvGemm"  # 3 input channels: im2col


def test_symbolic_spatial_dims_are_left_alone():
    g = graphc.Graph("t")
    x = g.input("x", (1, 4, "H", "W"))
    g.output(ops.conv(x, np.ones((4, 4, 3, 3), np.float32), pads=[1, 1, 1, 1], name="y"))
    assert str(lower(g, conv="im2col")) == str(g)


# -- pass properties -----------------------------------------------------------------------------
def test_idempotent_and_pure():
    g = conv_graph(4, (7, 7), (6, 4, 3, 3), op="FusedConv", residual=True, strides=[2, 2],
                   activation="relu")
    before = str(g)
    once = lower_conv(g, PassOptions(conv="im2col"))
    twice = lower_conv(once, PassOptions(conv="im2col"))
    assert str(g) == before
    assert str(twice) == str(once) != before


# -- the ops on their own ------------------------------------------------------------------------
def loop_im2col(x, kernel_shape, strides, pads, dilations, group):
    """Columns written out element by element from the definition in graphc/ops/lowered_conv.py."""
    n, c, h, w = x.shape
    kernel = kernel_shape
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    out_h = (h + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    out_w = (w + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    cg = c // group
    cols = np.zeros((n, group, cg * kernel[0] * kernel[1], out_h * out_w), x.dtype)
    for b, gi, ci, ki, kj, oi, oj in np.ndindex(n, group, cg, *kernel, out_h, out_w):
        row = (ci * kernel[0] + ki) * kernel[1] + kj
        cols[b, gi, row, oi * out_w + oj] = padded[b, gi * cg + ci,
                                                   oi * strides[0] + ki * dilations[0],
                                                   oj * strides[1] + kj * dilations[1]]
    return cols


def test_im2col_layout_matches_a_loop():
    x = np.random.default_rng(4).standard_normal((2, 4, 5, 6)).astype(np.float32)
    attrs = {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 0, 1],
             "dilations": [1, 2], "group": 2}
    g = graphc.Graph("t")
    g.output(ops.im2col(g.input("x", x.shape), **attrs))
    got = graphc.interpret(g, {"x": x})[0]
    np.testing.assert_array_equal(got, loop_im2col(x, **attrs))


@pytest.mark.parametrize("w2, cols, attrs, message", [
    ((2, 3, 8), (1, 2, 8, 6), {"out_spatial": [2, 3]}, "group=1"),
    ((1, 3, 8), (1, 1, 9, 6), {"out_spatial": [2, 3]}, "disagree"),
    ((1, 3, 8), (1, 1, 8, 6), {"out_spatial": [2, 2]}, "6 columns"),
])
def test_conv_gemm_shape_errors(w2, cols, attrs, message):
    g = graphc.Graph("t")
    a, b = g.input("w2", w2), g.input("cols", cols)
    with pytest.raises(ShapeError, match=message):
        ops.conv_gemm(a, b, **attrs)


def test_im2col_needs_static_spatial_dims():
    g = graphc.Graph("t")
    with pytest.raises(ShapeError, match="must be static"):
        ops.im2_col(g.input("x", (1, 4, "H", 5)), kernel_shape=[3, 3])
