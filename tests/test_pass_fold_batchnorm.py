"""The fold-batchnorm pass: BatchNorm and per-channel Mul/Add folded into Conv/Gemm weights.

Folded weights are computed in float64 and rounded once to float32, so folded and unfolded
graphs agree to float32 rounding: rtol 1e-4, atol 1e-5 (the brief's tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops

from .pass_testing import assert_same_outputs, run_passes

RTOL, ATOL = 1e-4, 1e-5
RNG = np.random.default_rng(0)


def _fold(g: graphc.Graph) -> graphc.Graph:
    out = run_passes(g, ["fold-batchnorm"])
    assert str(run_passes(out, ["fold-batchnorm"])) == str(out)  # idempotent
    return out


def _f32(*shape, low=None, high=None):
    if low is not None:
        return RNG.uniform(low, high, shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def _bn(x, channels, name="bn"):
    return ops.batch_normalization(x, _f32(channels, low=0.5, high=1.5), _f32(channels),
                                   _f32(channels), _f32(channels, low=0.5, high=1.5),
                                   epsilon=1e-3, name=name)


def _ops(g):
    return sorted(n.op for n in g.nodes() if n.op not in ("Input", "Constant"))


# -- Conv + BatchNormalization ---------------------------------------------------------------------
PADDINGS = [{"pads": [1, 1, 1, 1]}, {"pads": [0, 2, 1, 0]}, {"auto_pad": "SAME_UPPER"},
            {"auto_pad": "SAME_LOWER"}, {"auto_pad": "VALID"}, {"strides": [2, 2]}]


@pytest.mark.parametrize("padding", PADDINGS, ids=lambda p: str(p))
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_then_batchnorm_folds_into_the_conv(padding, group, bias):
    g = graphc.Graph("convbn")
    x = g.input("x", (None, 4, 7, 5))
    conv = ops.conv(x, _f32(6, 4 // group, 3, 3), _f32(6) if bias else None, group=group,
                    name="conv", **padding)
    g.output(ops.relu(_bn(conv, 6)))
    out = _fold(g)
    assert _ops(out) == ["Conv", "Relu"]
    assert out.producer(out.producer(out.outputs[0]).inputs[0]).name == "conv"  # name kept
    assert_same_outputs(g, out, rtol=RTOL, atol=ATOL, seed=RNG)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 5), ()])
def test_gemm_then_batchnorm_on_n_c_folds(trans_b, c_shape):
    g = graphc.Graph("gemmbn")
    x = g.input("x", (3, 4))
    w = _f32(5, 4) if trans_b else _f32(4, 5)
    c = None if c_shape is None else _f32(*c_shape)
    y = ops.gemm(x, w, c, transB=trans_b, alpha=0.7, beta=1.3)
    g.output(ops.relu(_bn(y, 5)))
    out = _fold(g)
    assert _ops(out) == ["Gemm", "Relu"]
    assert "beta" not in next(n for n in out.nodes() if n.op == "Gemm").attrs
    assert_same_outputs(g, out, batches=(3,), rtol=RTOL, atol=ATOL, seed=RNG)


def test_a_conv_output_with_two_readers_keeps_its_batchnorm():
    g = graphc.Graph("branch")
    x = g.input("x", (None, 3, 6, 6))
    conv = ops.conv(x, _f32(3, 3, 3, 3), _f32(3), pads=[1, 1, 1, 1])
    g.output(_bn(conv, 3) + conv)  # residual: the raw conv output is needed too
    out = _fold(g)
    assert str(out) == str(g)


def test_batchnorm_in_training_mode_or_with_params_or_after_other_ops_stays():
    g = graphc.Graph("stay")
    x = g.input("x", (2, 3, 4, 4))
    conv1 = ops.conv(x, _f32(3, 3, 1, 1), None)
    train = ops.batch_normalization(conv1, *(_f32(3, low=0.5, high=1.5) for _ in range(4)),
                                    training_mode=1)
    conv2 = ops.conv(x, _f32(3, 3, 1, 1), None)
    gamma = g.param(_f32(3, low=0.5, high=1.5))
    trainable = ops.batch_normalization(conv2, gamma, _f32(3), _f32(3), _f32(3, low=1, high=2))
    pooled = _bn(ops.max_pool(x, kernel_shape=[2, 2]), 3, name="after_pool")
    weight = g.param(_f32(3, 3, 1, 1))
    param_conv = _bn(ops.conv(x, weight, None), 3, name="param_conv")
    g.output(train, trainable, pooled, param_conv)
    assert str(_fold(g)) == str(g)


def test_a_folded_batchnorm_that_was_a_graph_output_keeps_its_name():
    g = graphc.Graph("out")
    x = g.input("x", (None, 2, 5, 5))
    g.output(_bn(ops.conv(x, _f32(4, 2, 3, 3), None, name="conv"), 4, name="bn"))
    out = _fold(g)
    assert out.outputs == ["bn"] and out.producer("bn").op == "Identity"
    assert out.producer("bn").inputs == ("conv",)
    assert_same_outputs(g, out, rtol=RTOL, atol=ATOL, seed=RNG)


# -- per-channel Mul / Add around the layer --------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,)])
def test_following_per_channel_mul_and_add_fold(shape):
    g = graphc.Graph("after")
    x = g.input("x", (None, 3, 7, 5))
    conv = ops.conv(x, _f32(4, 3, 3, 3), _f32(4), pads=[1, 1, 1, 1])
    g.output(ops.relu(ops.add(_f32(*shape), _bn(conv, 4) * _f32(*shape))))
    out = _fold(g)
    assert _ops(out) == ["Conv", "Relu"]
    assert_same_outputs(g, out, rtol=RTOL, atol=ATOL, seed=RNG)


def test_a_mul_along_another_axis_does_not_fold():
    g = graphc.Graph("width")
    x = g.input("x", (None, 3, 6, 4))
    conv = ops.conv(x, _f32(4, 3, 3, 3), _f32(4), pads=[1, 1, 1, 1])
    g.output(conv * _f32(4), conv * _f32(2, 4, 1, 1))  # along W; broadcasting to a new dim
    assert str(_fold(g)) == str(g)


@pytest.mark.parametrize("padding, padded", [
    ({"pads": [1, 1, 1, 1]}, True), ({"pads": [0, 2, 1, 0]}, True),
    ({"auto_pad": "SAME_UPPER"}, True), ({"auto_pad": "VALID"}, False),
    ({"strides": [2, 2]}, False), ({"pads": [0, 0, 0, 0], "dilations": [2, 1]}, False)])
def test_a_preceding_scale_folds_into_any_conv_and_a_shift_only_into_an_unpadded_one(padding,
                                                                                     padded):
    g = graphc.Graph("before")
    x = g.input("x", (None, 4, 7, 5))
    scaled = ops.conv(x * _f32(4, 1, 1), _f32(6, 2, 3, 3), _f32(6), group=2, **padding)
    shifted = ops.conv(x + _f32(1, 4, 1, 1), _f32(6, 2, 3, 3), None, group=2, **padding)
    g.output(scaled, shifted)
    out = _fold(g)
    # at a padded border x + a would read 0 where the folded conv reads a: the Add stays
    assert _ops(out) == (["Add", "Conv", "Conv"] if padded else ["Conv", "Conv"])
    assert_same_outputs(g, out, rtol=RTOL, atol=ATOL, seed=RNG)


@pytest.mark.parametrize("trans_a", [0, 1])
def test_a_preceding_per_k_scale_and_shift_fold_into_a_gemm(trans_a):
    g = graphc.Graph("gemm_before")
    x = g.input("x", (6, 3) if trans_a else (3, 6))
    vector_shape = (6, 1) if trans_a else (6,)
    y = x * _f32(*vector_shape) + _f32(*vector_shape)
    g.output(ops.gemm(y, _f32(6, 5), _f32(5), transA=trans_a, alpha=0.5, beta=2.0))
    out = _fold(g)
    assert _ops(out) == ["Gemm"]
    assert_same_outputs(g, out, batches=(g.type_of("x").shape[0],), rtol=RTOL, atol=ATOL,
                        seed=RNG)


def test_a_batchnorm_that_stays_absorbs_the_mul_and_add_after_it():
    g = graphc.Graph("densenet_like")
    x = g.input("x", (None, 4, 5, 5))
    pooled = ops.max_pool(x, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output(ops.relu(_bn(pooled, 4) * _f32(4, 1, 1) + _f32(4, 1, 1)))
    out = _fold(g)
    assert _ops(out) == ["BatchNormalization", "MaxPool", "Relu"]
    assert_same_outputs(g, out, rtol=RTOL, atol=ATOL, seed=RNG)


def test_a_small_cnn_through_the_manager_folds_every_batchnorm():
    g = graphc.Graph("cnn")
    x = g.input("x", (None, 3, 9, 7))
    y = x
    for c_in, c_out in ((3, 4), (4, 4), (4, 2)):
        y = ops.relu(_bn(ops.conv(y, _f32(c_out, c_in, 3, 3) * 0.5, None, pads=[1, 1, 1, 1]),
                         c_out, name=f"bn{c_out}{c_in}"))
    y = ops.flatten(ops.global_average_pool(y), axis=1)
    g.output(_bn(ops.gemm(y, _f32(2, 3), None, transB=0), 3, name="bn_fc"))
    out = run_passes(g, ["canonicalize", "fold-constants", "fold-batchnorm", "cse", "dce"])
    assert "BatchNormalization" not in out.op_histogram()
    assert_same_outputs(g, out, rtol=RTOL, atol=ATOL, seed=RNG)
