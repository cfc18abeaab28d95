"""The winograd pass and the Winograd ops: IR shape of the rewrite, interpreter equality with the
original conv, what is left alone, idempotence, purity, shape rules and FLOP rules.

Tolerances (float32 rewritten graph vs the float32 Conv reference, both by the interpreter):
``max |after - before| <= TOL[m] * max |before|`` with TOL = 1e-5 for F(2x2, 3x3) and 1e-4 for
F(4x4, 3x3), Winograd's own bounds (tests/test_winograd_accuracy.py); float64 graphs agree to
1e-12 relative, which would expose any misplaced tile or tap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphc
from graphc import ops
from graphc.flops import node_flops
from passes import PassError, PassOptions, all_passes
from passes.conv_algorithm import choose_conv_algorithm
from passes.winograd import winograd

from .pass_testing import random_feeds, run_passes

TOL = {2: 1e-5, 4: 1e-4}
ALGORITHM = {2: "winograd-f2", 4: "winograd-f4"}
STAGES = {"WinogradFilterTransform": 1, "WinogradInputTransform": 1, "MatMul": 1,
          "WinogradOutput": 1}
# fold-constants first where it exists (the brief's pipeline); winograd alone until then
PIPELINE = (["fold-constants", "winograd"] if "fold-constants" in all_passes()
            else ["winograd"])


def conv_graph(batch, c, k, size, *, group=1, bias=True, fused=None, residual=False,
               dtype="f32", weights="constant", seed=0, **conv_attrs):
    """x -> Conv (or FusedConv with activation ``fused``) named y; W/B constants or inputs."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(np.float32 if dtype == "f32" else np.float64 if dtype == "f64"
                        else np.float16)
    g = graphc.Graph("t")
    x = g.input("x", (batch, c) + tuple(size), dtype=dtype)
    w_data = rng.standard_normal((k, c // group, 3, 3)).astype(np_dtype)
    w = g.input("w", w_data.shape, dtype=dtype) if weights == "input" else g.constant(w_data)
    b = g.constant(rng.standard_normal(k).astype(np_dtype)) if bias else None
    if fused is None:
        y = ops.conv(x, w, b, group=group, name="y", **conv_attrs)
    else:
        z = g.input("z", (batch, k) + _out_size(g, x, w, group, conv_attrs), dtype=dtype) \
            if residual else None
        activation = {"activation": fused[0]}
        if fused[1]:
            activation["activation_params"] = fused[1]
        y = ops.fused_conv(x, w, b, z, group=group, name="y", **activation, **conv_attrs)
    g.output(y)
    return g


def _out_size(g, x, w, group, conv_attrs):
    """The output size of the conv about to be built (for the residual input's type)."""
    attrs = {"group": group, **conv_attrs}
    return g.infer("Conv", "probe", [x.name, w.name], attrs)[0].shape[2:]


def assert_within_winograd_bound(before, after, m, batches=(1, 3)):
    """The module docstring's bound: max |after - before| <= TOL[m] * max |before|."""
    static = before.type_of(before.inputs[0]).shape[0]
    for batch in [static] if isinstance(static, int) else batches:
        feeds = random_feeds(before, batch, seed=1)
        for got, want in zip(graphc.interpret(after, feeds), graphc.interpret(before, feeds)):
            assert got.shape == want.shape and got.dtype == want.dtype
            tol = 1e-12 if want.dtype == np.float64 else TOL[m]
            assert np.abs(got - want).max() <= tol * np.abs(want).max()


def rewrite(g, m=None, **options):
    conv = ALGORITHM[m] if m else "auto"
    return run_passes(g, PIPELINE, PassOptions(conv=conv, **options))


def op_counts(g):
    return {op: n for op, n in g.op_histogram().items()
            if op not in ("Input", "Constant", "Param")}


# -- the rewrite, case by case ------------------------------------------------------------------
def case(batch, c, k, size, **options) -> dict:
    """conv_graph's arguments: batch (None = symbolic), C -> K channels, spatial size, ..."""
    return {"batch": batch, "c": c, "k": k, "size": size, **options}


CASES = {
    "same-7x9-batch1": case(1, 4, 6, (7, 9), pads=[1, 1, 1, 1]),
    "pads0-batch3-nobias": case(3, 4, 5, (7, 9), pads=[0, 0, 0, 0], bias=False),
    "asymmetric-pads": case(1, 3, 4, (6, 5), pads=[0, 2, 1, 0]),
    "wide-pads": case(2, 2, 3, (5, 7), pads=[2, 3, 0, 1]),
    "same-upper-batch3": case(3, 4, 6, (8, 7), auto_pad="SAME_UPPER"),
    "same-lower": case(1, 4, 6, (9, 6), auto_pad="SAME_LOWER"),
    "valid": case(1, 4, 6, (9, 10), auto_pad="VALID"),
    "one-partial-tile": case(2, 4, 3, (3, 3)),
    "groups2-batch3": case(3, 4, 6, (7, 9), pads=[1, 1, 1, 1], group=2),
    "fused-relu-residual": case(3, 4, 6, (7, 9), pads=[1, 1, 1, 1], fused=("relu", ()),
                                residual=True),
    "symbolic-batch": case(None, 4, 6, (7, 9), pads=[1, 1, 1, 1]),
    "symbolic-grouped-fused": case(None, 6, 9, (5, 8), pads=[1, 0, 1, 2], group=3,
                                   fused=("clip", (0.0, 6.0)), residual=True),
    "runtime-weights": case(2, 4, 6, (7, 9), pads=[1, 1, 1, 1], weights="input"),
    "float64": case(3, 5, 4, (7, 9), pads=[1, 1, 1, 1], dtype="f64",
                    fused=("leaky_relu", (0.1,)), residual=True),
}


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_rewrite_matches_the_conv(case, m):
    g = conv_graph(**CASES[case])
    out = rewrite(g, m)
    assert op_counts(out) == STAGES
    y = out.node("y")
    assert y.op == "WinogradOutput" and y.types == g.node("y").types
    oh, ow = g.type_of("y").shape[2:]
    assert y.attrs["m"] == m
    assert y.attrs["tiles"] == (math.ceil(oh / m), math.ceil(ow / m))
    assert out.node("y_V").attrs["tiles"] == y.attrs["tiles"]
    assert_within_winograd_bound(g, out, m)


def test_ir_text_of_a_fused_conv_rewrite():
    g = conv_graph(3, 8, 16, (7, 9), pads=[1, 1, 1, 1], fused=("relu", ()), residual=True)
    out = rewrite(g, 4)
    text = str(out)
    for line in [
        "%y_U = WinogradFilterTransform(%c) {m=4} : f32[36,8,16]",
        "%y_V = WinogradInputTransform(%x) {m=4, pads=[1, 1, 1, 1], tiles=[2, 3]} : f32[36,18,8]",
        "%y_M = MatMul(%y_V, %y_U) : f32[36,18,16]",
        ('%y = WinogradOutput(%y_M, %c_1, %z) {activation="relu", m=4, out_shape=[3, 16, 7, 9], '
        "tiles=[2, 3]} : f32[3,16,7,9]"),
    ]:
        assert line in text, text
    # the text form parses back to the same graph (constants may print in another order)
    parsed = graphc.Graph.parse(text, out.constant_arrays())
    assert sorted(str(parsed).splitlines()) == sorted(text.splitlines())


def test_symbolic_batch_keeps_its_own_axis():
    out = rewrite(conv_graph(None, 8, 16, (7, 9), pads=[1, 1, 1, 1], group=2), 4)
    assert str(out.type_of("y_V")) == "f32[N,2,36,6,4]"
    assert str(out.type_of("y_U")) == "f32[2,36,4,8]"
    assert out.node("y").attrs["out_shape"] == (-1, 16, 7, 9)
    assert out.node("y").attrs["fold_batch"] == 0


def test_auto_picks_f4_for_a_wide_conv_and_f2_when_weights_change_at_run_time():
    """With constant weights the filter transform folds away; computed at run time it counts
    in the cost rule, which then prefers F2's smaller transform (64 channels, 4x4 output)."""
    for weights, m in (("constant", 4), ("input", 2)):
        g = conv_graph(1, 64, 64, (4, 4), pads=[1, 1, 1, 1], weights=weights)
        assert choose_conv_algorithm(g, g.node("y"), PassOptions()) == ALGORITHM[m]
        assert rewrite(g).node("y").attrs["m"] == m


@pytest.mark.skipif("fold-constants" not in all_passes(), reason="fold-constants not written")
def test_fold_constants_computes_the_filter_transform():
    g = conv_graph(1, 8, 8, (6, 6), pads=[1, 1, 1, 1])
    out = run_passes(g, ["winograd", "fold-constants"], PassOptions(conv="winograd-f4"))
    assert "WinogradFilterTransform" not in out.op_histogram()
    assert out.producer(out.node("y_M").inputs[1]).op == "Constant"
    assert_within_winograd_bound(g, out, 4)


# -- left alone ----------------------------------------------------------------------------------
def conv1d_graph():
    g = graphc.Graph("t")
    x = g.input("x", (1, 8, 9))
    g.output(ops.conv(x, np.ones((8, 8, 3), np.float32), pads=[1, 1], name="y"))
    return g


LEFT_ALONE = {
    "strided": lambda: conv_graph(1, 8, 8, (7, 7), strides=[2, 2], pads=[1, 1, 1, 1]),
    "dilated": lambda: conv_graph(1, 8, 8, (9, 9), dilations=[2, 2]),
    "float16": lambda: conv_graph(1, 8, 8, (7, 7), dtype="f16", pads=[1, 1, 1, 1]),
    "symbolic-spatial": lambda: conv_graph(1, 8, 8, ("H", "W"), pads=[1, 1, 1, 1]),
    "conv1d": conv1d_graph,
}


@pytest.mark.parametrize("case", LEFT_ALONE, ids=list(LEFT_ALONE))
@pytest.mark.parametrize("conv", ["auto", "winograd-f2", "winograd-f4"])
def test_convs_winograd_cannot_compute_are_left_alone(case, conv):
    g = LEFT_ALONE[case]()
    assert str(run_passes(g, PIPELINE, PassOptions(conv=conv))) == str(g)


def test_other_kernel_sizes_are_left_alone():
    g = graphc.Graph("t")
    x = g.input("x", (1, 8, 9, 9))
    g.output(ops.conv(x, np.ones((8, 8, 5, 5), np.float32), pads=[2, 2, 2, 2], name="y"),
             ops.conv(x, np.ones((8, 8, 1, 1), np.float32), name="z"))
    assert str(rewrite(g, 4)) == str(g)


@pytest.mark.parametrize("conv", ["im2col", "direct"])
def test_other_algorithms_leave_eligible_convs_alone(conv):
    g = conv_graph(1, 16, 16, (9, 9), pads=[1, 1, 1, 1])
    assert str(run_passes(g, PIPELINE, PassOptions(conv=conv))) == str(g)


def test_auto_leaves_rgb_input_layers_to_im2col():
    g = conv_graph(1, 3, 64, (16, 16), pads=[1, 1, 1, 1])
    assert str(rewrite(g)) == str(g)


def test_per_node_winograd_on_a_strided_conv_is_an_error():
    g = conv_graph(1, 8, 8, (7, 7), strides=[2, 2], pads=[1, 1, 1, 1])
    options = PassOptions(conv_per_node={"y": "winograd-f4"})
    with pytest.raises(PassError, match="in pass 'winograd'.*stride 1"):
        run_passes(g, ["winograd"], options)


# -- pass properties -----------------------------------------------------------------------------
def test_idempotent_and_pure():
    g = conv_graph(3, 4, 6, (7, 9), pads=[1, 1, 1, 1], fused=("relu", ()), residual=True)
    before = str(g)
    once = winograd(g, PassOptions(conv="winograd-f2"))
    twice = winograd(once, PassOptions(conv="winograd-f2"))
    assert str(g) == before
    assert str(twice) == str(once) != before


def test_every_conv_of_a_stack_is_rewritten():
    rng = np.random.default_rng(5)
    g = graphc.Graph("stack")
    x = g.input("x", (2, 8, 10, 10))
    a = ops.relu(ops.conv(x, rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
                          pads=[1, 1, 1, 1], name="a"))
    b = ops.conv(a, rng.standard_normal((8, 8, 3, 3)).astype(np.float32), name="b")
    g.output(b, a)
    out = rewrite(g, 2)
    assert out.op_histogram()["WinogradOutput"] == 2 and "Conv" not in out.op_histogram()
    assert_within_winograd_bound(g, out, 2)


# -- the ops: shape rules and FLOP rules ---------------------------------------------------------
def single_op(op, types, attrs):
    g = graphc.Graph("op")
    names = [g.add_input(f"x{i}", graphc.TensorType.parse(t)) for i, t in enumerate(types)]
    return g.add_node(op, names, attrs)


INPUT_ATTRS = {"m": 2, "pads": [1, 1, 1, 1], "tiles": [4, 5]}  # a 7x9 "same" conv, F2
OUTPUT_ATTRS = {"m": 2, "out_shape": [1, 6, 7, 9], "tiles": [4, 5]}


@pytest.mark.parametrize("op,types,attrs,message", [
    ("WinogradInputTransform", ["f32[1,4,7,9]"], {**INPUT_ATTRS, "tiles": [4, 4]},
     r"expected \[4, 5\]"),
    ("WinogradInputTransform", ["f32[N,4,7,9]"], INPUT_ATTRS, "needs a static batch"),
    ("WinogradInputTransform", ["f32[1,4,7,9]"], {**INPUT_ATTRS, "group": 3}, "not divisible"),
    ("WinogradInputTransform", ["f16[1,4,7,9]"], INPUT_ATTRS, "f32 or f64"),
    ("WinogradFilterTransform", ["f32[8,4,5,5]"], {"m": 2}, "3x3"),
    ("WinogradFilterTransform", ["f32[8,4,3,3]"], {"m": 4, "points": [0, 1, -1]},
     "needs 5 distinct"),
    ("WinogradOutput", ["f32[16,20,6]"], {**OUTPUT_ATTRS, "out_shape": [2, 6, 7, 9]},
     r"expected shape \[16, 40, 6\]"),
    ("WinogradOutput", ["f32[N,16,20,6]"], {**OUTPUT_ATTRS, "fold_batch": 0}, "written -1"),
    ("WinogradOutput", ["f32[16,20,6]", "f32[5]"], OUTPUT_ATTRS, r"B must be f32\[6\]"),
])
def test_shape_rules_reject_inconsistent_nodes(op, types, attrs, message):
    with pytest.raises(graphc.GraphcError, match=message):
        single_op(op, types, attrs)


def test_flop_rules():
    """F(2x2, 3x3) with Lavin & Gray's matrices: nnz(G) = 8, nnz(B^T) = 8, nnz(A^T) = 6."""
    g = conv_graph(2, 4, 6, (8, 8), pads=[1, 1, 1, 1], bias=True)
    out = rewrite(g, 2)
    tiles = 2 * 4 * 4  # 2 images of 4 x 4 tiles
    flops = {n.op: node_flops(out, n) for n in out.nodes()}
    assert flops["WinogradFilterTransform"] == 6 * 4 * 2 * 8 * (3 + 4)
    assert flops["WinogradInputTransform"] == tiles * 4 * (4 * 4 * 8)
    assert flops["MatMul"] == 2 * 16 * tiles * 4 * 6
    assert flops["WinogradOutput"] == tiles * 6 * 2 * 6 * (4 + 2) + 2 * 6 * 8 * 8  # + bias
    # the GEMM does 2.25x fewer multiplies than the direct conv on whole tiles
    assert node_flops(g, g.node("y")) == 2.25 * flops["MatMul"]
