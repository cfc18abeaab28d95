"""fuse-epilogue: bias, residual and activation fold into Conv/Gemm/MatMul and epilogue ops.

Most rewrites are exact (the fused op adds the bias, then the residual, then runs the
activation's own registry reference, as the unfused graph does), so they are checked with
``assert_array_equal``. The one reassociating rule (a bias added after the residual) is checked
with rtol=atol=1e-5 in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops
from graphc.ops import registry
from passes import PassOptions

from .pass_testing import SEED_BY_BATCH, assert_same_outputs, run_passes

RTOL = ATOL = 1e-5  # float32, (acc + z) + b vs (acc + b) + z


def fuse(g: graphc.Graph, times: int = 1) -> graphc.Graph:
    return run_passes(g, ["fuse-epilogue"] * times)


def only(g: graphc.Graph, op: str):
    nodes = [n for n in g.nodes() if n.op == op]
    assert len(nodes) == 1, g
    return nodes[0]


def weights(rng, *shape):
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


# -- Conv ----------------------------------------------------------------------------------------
CONV_CASES = {
    "pads": {"pads": [1, 1, 1, 1]},
    "same-upper-strided": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same-lower": {"auto_pad": "SAME_LOWER"},
    "valid": {"auto_pad": "VALID"},
    "grouped-asymmetric": {"group": 2, "pads": [0, 1, 2, 1]},
}


@pytest.mark.parametrize("bias_shape", [(1, 4, 1, 1), (4, 1, 1), (), (1,)])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bias_relu_becomes_one_fused_conv(case, bias_shape):
    rng = np.random.default_rng(0)
    g = graphc.Graph("t")
    x = g.input("x", (None, 2, 7, 5))
    attrs = CONV_CASES[case]
    w = weights(rng, 4, 2 // attrs.get("group", 1), 3, 3)
    y = ops.relu(ops.conv(x, w, None, **attrs) + rng.standard_normal(bias_shape))
    g.output(y)
    out = fuse(g)
    assert out.op_histogram() == {"Constant": 2, "FusedConv": 1, "Input": 1}
    node = only(out, "FusedConv")
    assert node.output == y.name and node.attrs["activation"] == "relu"
    assert out.type_of(node.inputs[2]).shape == (4,) and len(node.inputs) == 3
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


def test_vector_bias_aligns_with_the_last_axis_so_it_is_not_per_channel():
    # f32[4] + f32[N,4,5,4] adds along W (numpy aligns the last axes), not along the channels
    rng = np.random.default_rng(1)
    g = graphc.Graph("t")
    x = g.input("x", (None, 2, 5, 4))
    g.output(ops.conv(x, weights(rng, 4, 2, 1, 1), None) + rng.standard_normal(4))
    out = fuse(g)
    assert str(out) == str(g)
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


ACTIVATIONS = {
    "relu": (ops.relu, ()),
    "leaky_relu": (lambda v: ops.leaky_relu(v, alpha=0.2), (0.2,)),
    "sigmoid": (ops.sigmoid, ()),
    "tanh": (ops.tanh, ()),
    "clip": (lambda v: ops.clip(v, 0.0, 6.0), (0.0, 6.0)),
    "clip-max-only": (lambda v: ops.clip(v, None, np.float32(0.5)), (-np.inf, 0.5)),
    "elu": (lambda v: ops.elu(v, alpha=0.7), (0.7,)),
    "selu": (ops.selu, None),
    "hard_sigmoid": (lambda v: ops.hard_sigmoid(v, alpha=0.3, beta=0.4), (0.3, 0.4)),
    "hard_swish": (ops.hard_swish, ()),
    "softplus": (ops.softplus, ()),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_epilogue_activation_folds_with_its_parameters(name):
    build, params = ACTIVATIONS[name]
    rng = np.random.default_rng(2)
    g = graphc.Graph("t")
    x = g.input("x", (None, 3, 6, 5))
    conv = ops.conv(x, weights(rng, 4, 3, 3, 3) * 5, rng.standard_normal(4), pads=[1, 1, 1, 1])
    g.output(build(conv))
    out = fuse(g)
    node = only(out, "FusedConv")
    assert node.attrs["activation"] == name.split("-")[0]
    if params is not None:
        assert node.attrs.get("activation_params", ()) == pytest.approx(params)
    assert {n.op for n in out.nodes()} == {"Input", "Constant", "FusedConv"}
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


def test_clip_with_a_run_time_bound_is_left_alone():
    rng = np.random.default_rng(3)
    g = graphc.Graph("t")
    x = g.input("x", (1, 2, 5, 5))
    hi = g.input("hi", ())
    g.output(ops.clip(ops.conv(x, weights(rng, 2, 2, 3, 3), None), None, hi))
    out = fuse(g)
    assert str(out) == str(g)


def test_clip_with_bounds_of_shape_one_fuses():
    # Clip accepts f32[1] bounds as well as scalars
    rng = np.random.default_rng(3)
    g = graphc.Graph("t")
    x = g.input("x", (1, 2, 5, 5))
    lo, hi = np.array([0.0], np.float32), np.array([6.0], np.float32)
    g.output(ops.clip(ops.conv(x, weights(rng, 2, 2, 3, 3), None), lo, hi))
    out = fuse(g)
    node = only(out, "FusedConv")
    assert node.attrs["activation"] == "clip" and node.attrs["activation_params"] == (0.0, 6.0)
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


def test_add_after_the_activation_is_not_a_residual():
    rng = np.random.default_rng(4)
    g = graphc.Graph("t")
    x = g.input("x", (None, 2, 5, 5))
    z = g.input("z", (None, 2, 5, 5))
    g.output(ops.relu(ops.conv(x, weights(rng, 2, 2, 3, 3), None, pads=[1, 1, 1, 1])) + z)
    out = fuse(g)
    assert out.op_histogram() == {"Input": 2, "Add": 1, "Constant": 1, "FusedConv": 1}
    assert only(out, "FusedConv").attrs["activation"] == "relu"
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


def test_values_with_two_uses_are_not_folded():
    rng = np.random.default_rng(5)
    g = graphc.Graph("t")
    x = g.input("x", (None, 2, 5, 5))
    conv = ops.conv(x, weights(rng, 2, 2, 3, 3), None, pads=[1, 1, 1, 1])
    g.output(ops.relu(conv) * conv, conv + conv)
    out = fuse(g)
    assert str(out) == str(g)


def test_folding_stops_at_a_value_that_is_a_graph_output():
    rng = np.random.default_rng(6)
    g = graphc.Graph("t")
    x = g.input("x", (None, 2, 5, 5))
    biased = ops.conv(x, weights(rng, 3, 2, 3, 3), None) + rng.standard_normal((3, 1, 1))
    g.output(biased, ops.sigmoid(biased))
    out = fuse(g)
    node = only(out, "FusedConv")
    assert node.output == biased.name and "activation" not in node.attrs
    assert only(out, "Sigmoid").inputs == (biased.name,)
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


# -- a ResNet basic block -------------------------------------------------------------------------
def fold_bn(rng, w, k):
    """Conv weights and bias with a random inference BatchNorm folded in (as fold-batchnorm
    would), and the BatchNorm parameters themselves."""
    scale, shift = rng.uniform(0.5, 1.5, k), rng.standard_normal(k)
    mean, var = rng.standard_normal(k), rng.uniform(0.5, 1.5, k)
    factor = scale / np.sqrt(var + 1e-5)
    folded_w = (w * factor[:, None, None, None]).astype(np.float32)
    folded_b = (shift - mean * factor).astype(np.float32)
    return folded_w, folded_b, (scale, shift, mean, var)


def residual_block(folded: bool, projection: bool = False) -> graphc.Graph:
    """conv -> bn -> relu -> conv -> bn -> add(shortcut) -> relu."""
    rng = np.random.default_rng(7)
    g = graphc.Graph("block")
    x = g.input("x", (None, 4, 7, 7))

    def conv_bn(v, w):
        fw, fb, bn = fold_bn(rng, w, w.shape[0])
        if folded:
            return ops.conv(v, fw, fb, pads=[1, 1, 1, 1])
        return ops.batch_normalization(ops.conv(v, w, None, pads=[1, 1, 1, 1]), *bn)

    h = ops.relu(conv_bn(x, weights(rng, 4, 4, 3, 3)))
    h = conv_bn(h, weights(rng, 4, 4, 3, 3))
    shortcut = ops.conv(x, weights(rng, 4, 4, 1, 1), None) if projection else x
    g.output(ops.relu(h + shortcut))
    return g


def test_resnet_block_with_folded_batchnorm_becomes_two_fused_convs():
    g = residual_block(folded=True)
    out = fuse(g)
    first, second = [n for n in out.nodes() if n.op == "FusedConv"]
    assert first.attrs["activation"] == "relu" and len(first.inputs) == 3
    assert second.attrs["activation"] == "relu" and second.inputs[3] == "x"
    assert set(out.op_histogram()) == {"Input", "Constant", "FusedConv"}
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)
    assert str(fuse(out)) == str(out)  # idempotent


def test_resnet_block_with_a_projection_shortcut():
    g = residual_block(folded=True, projection=True)
    out = fuse(g)
    hist = out.op_histogram()
    assert hist.get("FusedConv", 0) + hist.get("Conv", 0) == 3
    assert "Add" not in hist and "Relu" not in hist
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


def test_batchnorm_between_conv_and_add_blocks_folding():
    g = residual_block(folded=False)
    out = fuse(g)
    assert str(out) == str(g)  # BatchNormalization is no epilogue stage
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


# -- Gemm and MatMul ------------------------------------------------------------------------------
def mlp() -> graphc.Graph:
    """Gemm + bias + sigmoid, Gemm(C) + relu, Gemm(alpha, beta, no C) + bias row."""
    rng = np.random.default_rng(8)
    g = graphc.Graph("mlp")
    x = g.input("x", (None, 8))
    h = ops.sigmoid(ops.gemm(x, weights(rng, 8, 16), None) + rng.standard_normal(16))
    h = ops.relu(ops.gemm(h, weights(rng, 6, 16), rng.standard_normal(6), transB=1))
    y = ops.gemm(h, weights(rng, 6, 3), None, alpha=0.5, beta=2.0) + rng.standard_normal((1, 3))
    g.output(y)
    return g


def test_gemm_bias_sigmoid_mlp_becomes_fused_gemms():
    g = mlp()
    out = fuse(g)
    first, second, third = [n for n in out.nodes() if n.op == "FusedGemm"]
    assert first.attrs == {"activation": "sigmoid"} and out.type_of(first.inputs[2]).shape == (16,)
    assert second.attrs == {"activation": "relu", "transB": 1}
    # the added row becomes C; beta scaled an absent C, so it goes back to its default 1
    assert third.attrs == {"alpha": 0.5} and out.type_of(third.inputs[2]).shape == (1, 3)
    assert set(out.op_histogram()) == {"Input", "Constant", "FusedGemm"}
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)
    assert str(fuse(out)) == str(out)


def test_gemm_with_c_takes_a_residual_but_no_second_bias():
    rng = np.random.default_rng(9)
    g = graphc.Graph("t")
    x = g.input("x", (4, 8))
    r = g.input("r", (4, 3))
    y = ops.gemm(x, weights(rng, 8, 3), rng.standard_normal(3)) + rng.standard_normal(3)
    g.output(ops.tanh(y + r))
    out = fuse(g)
    assert str(out) == str(g)  # the second bias blocks the chain: it is neither bias nor residual
    g2 = graphc.Graph("t")
    x = g2.input("x", (4, 8))
    r = g2.input("r", (4, 3))
    g2.output(ops.tanh(r + ops.gemm(x, weights(rng, 8, 3), rng.standard_normal((4, 3)))))
    out = fuse(g2)
    node = only(out, "FusedGemm")
    assert node.inputs[3] == "r" and node.attrs == {"activation": "tanh"}
    assert_same_outputs(g2, out, seed=SEED_BY_BATCH)


def test_full_matrix_constant_becomes_c_only_when_the_batch_is_static():
    rng = np.random.default_rng(10)
    for batch, fused in ((4, True), (None, False)):
        g = graphc.Graph("t")
        x = g.input("x", (batch, 8))
        g.output(ops.gemm(x, weights(rng, 8, 3), None) + rng.standard_normal((4, 3)))
        out = fuse(g)
        assert ("FusedGemm" in out.op_histogram()) == fused
        assert_same_outputs(g, out, batches=(4,), seed=SEED_BY_BATCH)


def test_matmul_of_matrices_becomes_fused_gemm_and_batched_matmul_stays():
    rng = np.random.default_rng(11)
    g = graphc.Graph("t")
    x = g.input("x", (5, 8))
    xb = g.input("xb", (2, 5, 8))
    w = weights(rng, 8, 3)
    g.output(ops.relu(ops.matmul(x, w) + rng.standard_normal(3)), ops.relu(ops.matmul(xb, w)))
    out = fuse(g)
    node = only(out, "FusedGemm")
    assert node.attrs == {"activation": "relu"} and len(node.inputs) == 3
    assert out.op_histogram()["MatMul"] == 1 and out.op_histogram()["Relu"] == 1
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


# -- extending an existing epilogue ----------------------------------------------------------------
def test_existing_epilogue_is_extended_until_it_has_an_activation():
    rng = np.random.default_rng(12)
    g = graphc.Graph("t")
    x = g.input("x", (None, 3, 5, 5))
    z = g.input("z", (None, 4, 5, 5))
    w = g.constant(weights(rng, 4, 3, 3, 3))
    partial = ops.apply("FusedConv", (x, w, None, z), pads=[1, 1, 1, 1])
    # the bias comes after the residual: (acc + z) + b is reassociated to (acc + b) + z
    y = ops.tanh(partial + rng.standard_normal((1, 4, 1, 1)))
    g.output(y + z)
    out = fuse(g)
    node = only(out, "FusedConv")
    assert node.output == y.name and node.inputs[3] == "z"
    assert node.attrs["activation"] == "tanh" and out.type_of(node.inputs[2]).shape == (4,)
    assert out.op_histogram()["Add"] == 1
    assert_same_outputs(g, out, rtol=RTOL, atol=ATOL, seed=SEED_BY_BATCH)
    assert str(fuse(out)) == str(out) == str(fuse(g, times=2))


def test_complete_epilogue_is_left_alone():
    rng = np.random.default_rng(13)
    g = graphc.Graph("t")
    x = g.input("x", (None, 3, 5, 5))
    w = g.constant(weights(rng, 4, 3, 3, 3))
    done = ops.apply("FusedConv", (x, w), pads=[1, 1, 1, 1], activation="relu")
    g.output(ops.sigmoid(done + rng.standard_normal((4, 1, 1))))
    assert str(fuse(g)) == str(g)


def test_conv_gemm_takes_its_epilogue_too():
    rng = np.random.default_rng(14)
    g = graphc.Graph("t")
    x = g.input("x", (None, 2, 5, 5))
    cols = ops.apply("Im2Col", (x,), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    w2 = g.constant(weights(rng, 1, 4, 18))
    acc = ops.apply("ConvGemm", (w2, cols), out_spatial=[5, 5])
    g.output(ops.clip(acc + rng.standard_normal((4, 1, 1)), 0.0, 6.0))
    out = fuse(g)
    node = only(out, "ConvGemm")
    assert node.attrs["activation"] == "clip" and out.type_of(node.inputs[2]).shape == (4,)
    assert "Add" not in out.op_histogram()
    assert_same_outputs(g, out, seed=SEED_BY_BATCH)


@pytest.mark.parametrize("lowering,algorithm", [("lower-conv", "im2col"),
                                                ("winograd", "winograd-f2")])
def test_lowered_convolutions_take_the_epilogue(lowering, algorithm):
    """After lower-conv / winograd the epilogue lands on ConvGemm / WinogradOutput."""
    rng = np.random.default_rng(15)
    g = graphc.Graph("t")
    x = g.input("x", (None, 4, 7, 5))
    z = g.input("z", (None, 4, 7, 5))
    conv = ops.conv(x, weights(rng, 4, 4, 3, 3), None, pads=[1, 1, 1, 1])
    g.output(ops.leaky_relu(conv + rng.standard_normal((4, 1, 1)) + z, alpha=0.1))
    lowered = run_passes(g, [lowering], PassOptions(conv=algorithm))
    out = fuse(lowered)
    (node,) = [n for n in out.nodes() if n.attrs.get("activation")]
    assert registry.get(node.op).epilogue_bias_axis is not None
    assert node.attrs["activation_params"] == pytest.approx((0.1,)) and node.inputs[-1] == "z"
    assert not {"Add", "LeakyRelu"} & set(out.op_histogram())
    assert_same_outputs(lowered, out, seed=SEED_BY_BATCH)


# -- text IR ---------------------------------------------------------------------------------------
def test_fused_graph_round_trips_through_the_text_ir():
    out = fuse(residual_block(folded=True))
    back = graphc.Graph.parse(str(out), weights=out.constant_arrays())
    assert str(back) == str(out)
    assert_same_outputs(out, back, seed=SEED_BY_BATCH)
