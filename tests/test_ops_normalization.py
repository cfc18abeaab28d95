"""BatchNormalization, LRN and Dropout against onnxruntime and direct numpy formulas, including
the older-opset import rules (BatchNormalization-7/9 training outputs, Dropout-10 ratio).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphc
from graphc import ops
from graphc.flops import node_flops
from graphc.types import TensorType

from .oracle import feeds_for, import_and_run, one_node_model, run_graphc, run_ort
from .test_ops_conv import build_node


# -- BatchNormalization --------------------------------------------------------------------------
def bn_inputs(rng, shape, dtype=np.float32):
    c = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    scale, b, mean = (rng.standard_normal(c).astype(dtype) for _ in range(3))
    var = (rng.random(c) + 0.5).astype(dtype)
    return [x, scale, b, mean, var]


def bn_formula(x, scale, b, mean, var, epsilon=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x = x.astype(np.float64)
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
            * scale.reshape(shape) + b.reshape(shape))


def bn_batch_stats(x):
    axes = (0,) + tuple(range(2, x.ndim))
    x = x.astype(np.float64)
    return x.mean(axis=axes), ((x - x.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes)


@pytest.mark.parametrize("shape", [(4, 3), (1, 5, 7), (2, 3, 4, 5), (2, 2, 3, 4, 3)])
@pytest.mark.parametrize("epsilon", [1e-5, 0.1])
def test_batch_norm_inference(rng, shape, epsilon):
    inputs = bn_inputs(rng, shape)
    (y,) = run_graphc("BatchNormalization", inputs, {"epsilon": epsilon})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, bn_formula(*inputs, epsilon=epsilon), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, run_ort("BatchNormalization", inputs, {"epsilon": epsilon})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4, 5), (1, 2, 3, 4, 3)])
def test_batch_norm_training_statistics(rng, shape):
    x, scale, b, mean, var = inputs = bn_inputs(rng, shape)
    attrs = {"training_mode": 1, "momentum": 0.8, "epsilon": 1e-3}
    y, running_mean, running_var = run_graphc("BatchNormalization", inputs, attrs, n_outputs=3)
    batch_mean, batch_var = bn_batch_stats(x)
    np.testing.assert_allclose(y, bn_formula(x, scale, b, batch_mean, batch_var, 1e-3),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(running_mean, 0.8 * mean + 0.2 * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(running_var, 0.8 * var + 0.2 * batch_var, rtol=1e-5, atol=1e-6)
    (y_only,) = run_graphc("BatchNormalization", inputs, attrs)
    np.testing.assert_array_equal(y_only, y)


def test_batch_norm_statistics_keep_their_own_dtype(rng):
    x, scale, b, mean, var = bn_inputs(rng, (3, 2, 4))
    inputs = [x, scale, b, mean.astype(np.float64), var.astype(np.float64)]
    y, rm, rv = run_graphc("BatchNormalization", inputs, {"training_mode": 1}, n_outputs=3)
    assert (y.dtype, rm.dtype, rv.dtype) == (np.float32, np.float64, np.float64)
    (y16,) = run_graphc("BatchNormalization", [x.astype(np.float16)] + inputs[1:])
    assert y16.dtype == np.float16
    np.testing.assert_allclose(y16, bn_formula(x, scale, b, mean, var), rtol=1e-2, atol=1e-2)


def test_batch_norm_nan_propagates(rng):
    inputs = bn_inputs(rng, (2, 3, 4))
    inputs[0][1, 2, 3] = np.nan
    (y,) = run_graphc("BatchNormalization", inputs)
    assert np.isnan(y).sum() == 1 and np.isnan(y[1, 2, 3])
    (y,) = run_graphc("BatchNormalization", inputs, {"training_mode": 1})
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[:, :2]).all()


def test_batch_norm_builder_returns_y_in_inference(rng):
    x, scale, b, mean, var = bn_inputs(rng, (2, 3, 4, 4))
    g = graphc.Graph()
    xv = g.input("x", (None, 3, 4, 4))
    y = ops.batch_normalization(xv, scale, b, mean, var)
    assert y.type == TensorType(("N", 3, 4, 4), "f32")
    g.output(y)
    (got,) = graphc.interpret(g, {"x": x})
    np.testing.assert_allclose(got, bn_formula(x, scale, b, mean, var), rtol=1e-5, atol=1e-5)


def test_batch_norm_opset9_extra_outputs_mean_training(rng):
    x, scale, b, mean, var = inputs = bn_inputs(rng, (3, 2, 5))
    names = ["y", "running_mean", "running_var", "saved_mean", "saved_var"]
    model = one_node_model("BatchNormalization", inputs, {"momentum": 0.7}, opset=9,
                           output_names=names)
    y, rm, rv, sm, sv = import_and_run(model, feeds_for(inputs))
    batch_mean, batch_var = bn_batch_stats(x)
    np.testing.assert_allclose(y, bn_formula(x, scale, b, batch_mean, batch_var), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(rm, 0.7 * mean + 0.3 * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, 0.7 * var + 0.3 * batch_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sm, batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sv, batch_var, rtol=1e-5, atol=1e-6)


def test_batch_norm_opset7_spatial(rng):
    inputs = bn_inputs(rng, (2, 3, 4, 4))
    model = one_node_model("BatchNormalization", inputs, {"spatial": 1}, opset=7)
    (y,) = import_and_run(model, feeds_for(inputs))
    np.testing.assert_allclose(y, bn_formula(*inputs), rtol=1e-5, atol=1e-5)
    model = one_node_model("BatchNormalization", inputs, {"spatial": 0}, opset=7, name="n1")
    with pytest.raises(graphc.GraphcError, match="'n1'.*spatial=0"):
        graphc.import_onnx(model)


BN_ERRORS = [
    ([(2, 3, 4), (4,), (3,), (3,), (3,)], "f32", {}, r"scale must have shape \(3,\)"),
    ([(2, 3, 4), (3,), (3,), (3, 1), (3,)], "f32", {}, "input_mean must have shape"),
    ([(3,), (3,), (3,), (3,), (3,)], "f32", {}, "rank >= 2"),
    ([(2, 3, 4), (3,), (3,), (3,), (3,)], "i64", {}, "X must be a float tensor"),
]


@pytest.mark.parametrize("shapes,dtype,attrs,message", BN_ERRORS)
def test_batch_norm_shape_errors_name_the_node(shapes, dtype, attrs, message):
    types = [TensorType(shapes[0], dtype)] + [TensorType(s, "f32") for s in shapes[1:]]
    with pytest.raises(graphc.GraphcError, match=f"BatchNormalization node 'bn1'.*{message}"):
        build_node("BatchNormalization", types, attrs, name="bn1")


# -- LRN -----------------------------------------------------------------------------------------
def lrn_formula(x, size, alpha=1e-4, beta=0.75, bias=1.0):
    """The ONNX definition, one channel at a time."""
    x = x.astype(np.float64)
    channels = x.shape[1]
    square_sum = np.zeros_like(x)
    for c in range(channels):
        lo = max(0, c - math.floor((size - 1) / 2))
        hi = min(channels - 1, c + math.ceil((size - 1) / 2))
        square_sum[:, c] = (x[:, lo:hi + 1] ** 2).sum(axis=1)
    return x / (bias + alpha / size * square_sum) ** beta


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(1, 6, 3, 4), (2, 3, 5, 5)])
def test_lrn(rng, shape, size):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    attrs = {"size": size, "alpha": 0.02, "beta": 0.6, "bias": 1.5}
    (y,) = run_graphc("LRN", [x], attrs)
    assert y.dtype == np.float32
    want = lrn_formula(x, size, 0.02, 0.6, 1.5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    if size % 2:  # onnxruntime implements odd sizes only
        np.testing.assert_allclose(y, run_ort("LRN", [x], attrs)[0], rtol=1e-5, atol=1e-6)


def test_lrn_defaults_other_ranks_and_nan(rng):
    x = rng.standard_normal((2, 5, 7))
    (y,) = run_graphc("LRN", [x], {"size": 3})
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, lrn_formula(x, 3), rtol=1e-12)
    x[0, 2, 4] = np.nan
    (y,) = run_graphc("LRN", [x], {"size": 3})
    assert np.isnan(y[0, 1:4, 4]).all() and np.isnan(y).sum() == 3


def test_lrn_errors_name_the_node():
    x = [TensorType((1, 3, 4, 4), "f32")]
    with pytest.raises(graphc.GraphcError, match="'lrn1'.*size"):
        build_node("LRN", x, {"size": 0}, name="lrn1")
    with pytest.raises(graphc.GraphcError, match="'lrn1'.*size"):
        build_node("LRN", x, {}, name="lrn1")
    with pytest.raises(graphc.GraphcError, match="LRN node 'lrn1'.*float"):
        build_node("LRN", [TensorType((1, 3, 4, 4), "i32")], {"size": 3}, name="lrn1")


# -- Dropout -------------------------------------------------------------------------------------
def test_dropout_inference_is_identity(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    x[0, 0, 0] = np.nan
    for inputs in ([x], [x, np.float32(0.3)], [x, np.float32(0.3), np.bool_(False)]):
        y, mask = run_graphc("Dropout", inputs, n_outputs=2)
        np.testing.assert_array_equal(y, x)
        assert mask.dtype == np.bool_ and mask.all() and mask.shape == x.shape
    np.testing.assert_array_equal(run_ort("Dropout", [x, np.float32(0.3)])[0], x)


def test_dropout_training(rng):
    x = rng.standard_normal((40, 50)).astype(np.float32)
    inputs = [x, np.float32(0.25), np.bool_(True)]
    y, mask = run_graphc("Dropout", inputs, {"seed": 7}, n_outputs=2)
    assert y.dtype == np.float32 and mask.dtype == np.bool_
    assert 0.2 < 1 - mask.mean() < 0.3
    np.testing.assert_allclose(y, np.where(mask, x / 0.75, 0), rtol=1e-6)
    _, again_mask = run_graphc("Dropout", inputs, {"seed": 7}, n_outputs=2)
    np.testing.assert_array_equal(again_mask, mask)
    _, other_mask = run_graphc("Dropout", inputs, {"seed": 8}, n_outputs=2)
    assert (other_mask != mask).any()
    (default_ratio,) = run_graphc("Dropout", [x, None, np.bool_(True)])
    assert 0.4 < (default_ratio == 0).mean() < 0.6
    (zero_ratio,) = run_graphc("Dropout", [x, np.float32(0.0), np.bool_(True)])
    np.testing.assert_array_equal(zero_ratio, x)


def test_dropout_mask_uses_the_onnx_test_generator(rng):
    """Seeded like ONNX's own test data: uniform(0, 1) draws of RandomState(seed) >= ratio."""
    x = rng.standard_normal((20, 40, 5)).astype(np.float32)
    _, mask = run_graphc("Dropout", [x, np.float32(0.5), np.bool_(True)], {"seed": 3}, n_outputs=2)
    np.random.seed(3)
    np.testing.assert_array_equal(mask, np.random.uniform(0, 1, x.shape) >= 0.5)


def test_dropout_opset10_ratio_attribute(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    model = one_node_model("Dropout", [x], {"ratio": 0.3}, opset=10, n_outputs=2)
    g = graphc.import_onnx(model)
    y, mask = graphc.interpret(g, {g.inputs[0]: x})
    np.testing.assert_array_equal(y, x)
    assert mask.all()
    dropout = next(n for n in g.nodes() if n.op == "Dropout")
    np.testing.assert_allclose(g.constant_value(dropout.inputs[1]), 0.3)


def test_dropout_errors_and_flops():
    x = TensorType((2, 3), "f32")
    g = graphc.Graph()
    xv = g.input("x", (2, 3))
    with pytest.raises(graphc.GraphcError, match="Dropout node 'd1'.*ratio must be in"):
        g.add_node("Dropout", [xv.name, g.add_constant(np.float32(1.0))], name="d1")
    with pytest.raises(graphc.GraphcError, match="'d1'.*ratio must be a scalar"):
        build_node("Dropout", [x, TensorType((1,), "f32")], name="d1")
    with pytest.raises(graphc.GraphcError, match="'d1'.*training_mode must be a scalar"):
        build_node("Dropout", [x, TensorType((), "f32"), TensorType((), "f32")], name="d1")
    with pytest.raises(graphc.GraphcError, match="'d1'.*data must be a float"):
        build_node("Dropout", [TensorType((2, 3), "i64")], name="d1")
    (y,) = g.add_node("Dropout", [xv.name, g.add_constant(np.float32(0.5)),
                                  g.add_constant(np.bool_(True))], outputs=["y"])
    assert node_flops(g, g.node("y")) == 2 * 6
    _, (y, mask) = build_node("Dropout", [TensorType(("N", 3), "f32")], n_outputs=2)
    assert y.shape == mask.shape == ("N", 3) and mask.dtype == "bool"
