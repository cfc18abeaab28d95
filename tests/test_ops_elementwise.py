"""Elementwise ops (graphc/ops/elementwise.py) against onnxruntime on one-node ONNX models and
against direct numpy formulas: broadcasting, dtypes, every attribute, numerical stability, NaN,
the Clip < 11 import rule, and shape-rule errors that name the node.

``assert_same`` is shared with the linalg and reduce tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphc
from graphc.ops import registry

from .oracle import feeds_for, import_and_run, one_node_model, run_graphc, run_onnxruntime, run_ort


# -- helpers ------------------------------------------------------------------------------------
def assert_same(got, want, rtol=1e-5, atol=1e-6):
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


def _random(rng, shape, dtype, low=-5, high=5):
    if np.dtype(dtype).kind == "f":
        return rng.uniform(low, high, shape).astype(dtype)
    return rng.integers(low, high, shape, endpoint=True).astype(dtype)


def _no_zeros(a):
    return np.where(a == 0, a.dtype.type(3), a)


# -- binary arithmetic ----------------------------------------------------------------------------
SHAPE_PAIRS = [((3, 4, 5), (3, 4, 5)), ((2, 1, 5), (4, 1)), ((1,), (3, 2)), ((), (2, 3)),
               ((7, 1, 3), (1, 6, 1)), ((1, 1), ())]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32"])
@pytest.mark.parametrize("shapes", SHAPE_PAIRS, ids=str)
def test_binary_matches_onnxruntime(rng, op, dtype, shapes):
    a = _random(rng, shapes[0], dtype, -50, 50)
    b = _no_zeros(_random(rng, shapes[1], dtype, -9, 9))
    assert_same(run_graphc(op, [a, b])[0], run_ort(op, [a, b], opset=14)[0])


def test_integer_div_truncates_toward_zero():
    a = np.array([-7, 7, -7, 7, -6, 0, 2**62 + 1], np.int64)
    b = np.array([2, 2, -2, -2, 3, -5, 3], np.int64)
    want = np.array([int(x / y) if abs(x) < 2**50 else x // y for x, y in zip(a.tolist(),
                                                                            b.tolist())])
    assert_same(run_graphc("Div", [a, b])[0], want.astype(np.int64))


def test_unsigned_and_small_int_arithmetic_wraps_like_onnxruntime(rng):
    a = rng.integers(0, 255, (4, 5)).astype(np.uint8)
    b = rng.integers(1, 255, (4, 5)).astype(np.uint8)
    for op in ("Add", "Sub", "Mul", "Div"):
        assert_same(run_graphc(op, [a, b])[0], run_ort(op, [a, b], opset=14)[0])


@pytest.mark.parametrize("base,exp", [("float32", "float32"), ("float32", "int64"),
                                      ("int64", "float32"), ("int64", "int64"),
                                      ("float64", "float64"), ("int32", "int32"),
                                      ("float32", "float64"), ("float64", "int32")])
def test_pow_dtypes_match_onnxruntime(rng, base, exp):
    x = _random(rng, (3, 4), base, 1, 4)
    y = _random(rng, (4,), exp, 0, 3)
    got = run_graphc("Pow", [x, y])[0]
    assert got.dtype == np.dtype(base)  # the result has the base's dtype
    assert_same(got, run_ort("Pow", [x, y], opset=15)[0])


def test_pow_integer_base_negative_and_fractional_exponents():
    x = np.array([2, 4, 9, -8, 1], np.int64)
    assert_same(run_graphc("Pow", [x, np.array([-1, -1, 0, 2, -3], np.int64)])[0],
                np.array([0, 0, 1, 64, 1], np.int64))
    assert_same(run_graphc("Pow", [x[:3], np.float32(0.5)])[0], np.array([1, 2, 3], np.int64))


def test_value_operators_build_the_arithmetic_ops(rng):
    g = graphc.Graph()
    x = g.input("x", (None, 3))
    y = (x + 1.0) * x - x / 2.0
    z = -(y ** 2.0)
    g.output(z)
    assert z.shape == ("N", 3)
    a = rng.standard_normal((4, 3)).astype(np.float32)
    want = -(((a + 1) * a - a / 2) ** 2)
    assert_same(graphc.interpret(g, {"x": a})[0], want)
    assert {"Add", "Mul", "Sub", "Div", "Pow", "Neg"} <= {n.op for n in g}


# -- variadic -------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
@pytest.mark.parametrize("shapes", [[(3,)], [(2, 3), (2, 3)], [(4, 1, 3), (5, 1), (3,)],
                                    [(1,), (2, 2), (2, 1), ()]], ids=str)
def test_variadic_matches_onnxruntime(rng, op, shapes):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    assert_same(run_graphc(op, arrays)[0], run_ort(op, arrays, opset=13)[0])


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_on_integers(rng, op):
    arrays = [_random(rng, s, np.int64, -100, 100) for s in [(3, 4), (4,), (1, 1)]]
    assert_same(run_graphc(op, arrays)[0], run_ort(op, arrays, opset=13)[0])


def test_variadic_single_input_does_not_alias_it():
    a = np.arange(4, dtype=np.float32)
    g = graphc.Graph()
    c = g.constant(a)
    g.output(graphc.ops.max(c))
    out = graphc.interpret(g, {})[0]
    assert_same(out, a)
    assert not np.shares_memory(out, a)


def test_max_min_propagate_nan():
    a = np.array([np.nan, 1.0, 2.0], np.float32)
    b = np.array([0.0, np.nan, 1.0], np.float32)
    for op in ("Max", "Min", "Sum", "Mean"):
        got = run_graphc(op, [a, b])[0]
        assert np.isnan(got[:2]).all() and not np.isnan(got[2])


# -- activations and unary math --------------------------------------------------------------------
def _gelu_erf(x):
    return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel().tolist()]
                    ).reshape(x.shape)


UNARY = [("Relu", {}, 18), ("LeakyRelu", {}, 16), ("LeakyRelu", {"alpha": 0.3}, 16),
         ("Sigmoid", {}, 13), ("HardSigmoid", {}, 6),
         ("HardSigmoid", {"alpha": 0.5, "beta": 0.1}, 6), ("Tanh", {}, 13), ("Elu", {}, 6),
         ("Elu", {"alpha": 2.5}, 6), ("Selu", {}, 6),
         ("Selu", {"alpha": 2.0, "gamma": 3.0}, 6), ("Softplus", {}, 1), ("Gelu", {}, 20),
         ("Gelu", {"approximate": "tanh"}, 20), ("Gelu", {"approximate": "none"}, 20),
         ("HardSwish", {}, 14), ("Erf", {}, 13), ("Exp", {}, 13), ("Abs", {}, 13),
         ("Neg", {}, 13)]


@pytest.mark.parametrize("op,attrs,opset", UNARY, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (4,), (2, 3), ()], ids=str)
def test_unary_matches_onnxruntime(rng, op, attrs, opset, shape):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    assert_same(run_graphc(op, [x], attrs)[0], run_ort(op, [x], attrs, opset=opset)[0],
                rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Log", "Sqrt", "Reciprocal"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_positive_domain_ops(rng, op, dtype):
    x = rng.uniform(0.1, 10, (3, 7)).astype(dtype)
    assert_same(run_graphc(op, [x])[0], run_ort(op, [x], opset=13)[0])


# LeakyRelu/HardSwish are left out: onnxruntime rounds their float64 factors to float32
@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Exp", "Relu", "Neg", "Abs"])
def test_float64_unary_matches_onnxruntime(rng, op):
    x = rng.standard_normal((5, 6))
    assert_same(run_graphc(op, [x])[0], run_ort(op, [x], opset=18)[0], rtol=1e-12, atol=1e-14)


def test_float64_erf_elu_softplus_against_math(rng):
    # onnxruntime has no float64 kernels for these
    x = rng.standard_normal(40) * 3
    xs = x.tolist()
    assert_same(run_graphc("Erf", [x])[0], np.array([math.erf(v) for v in xs]), rtol=1e-15)
    assert_same(run_graphc("Elu", [x], {"alpha": 0.7})[0],
                np.array([v if v >= 0 else 0.7 * (math.exp(v) - 1) for v in xs]), rtol=1e-12)
    assert_same(run_graphc("Softplus", [x])[0], np.array([math.log(1 + math.exp(v)) for v in xs]),
                rtol=1e-12)


def test_integer_relu_abs_neg(rng):
    x = rng.integers(-100, 100, (4, 5)).astype(np.int64)
    assert_same(run_graphc("Relu", [x])[0], np.where(x > 0, x, 0))
    assert_same(run_graphc("Abs", [x])[0], np.array([[abs(v) for v in r] for r in x.tolist()]))
    assert_same(run_graphc("Neg", [x])[0], 0 - x)


def test_gelu_against_math_erf(rng):
    x = rng.standard_normal(50) * 4
    assert_same(run_graphc("Gelu", [x])[0], _gelu_erf(x), rtol=1e-12, atol=1e-15)
    t = run_graphc("Gelu", [x], {"approximate": "tanh"})[0]
    np.testing.assert_allclose(t, _gelu_erf(x), atol=1e-3)  # the approximation is close


def test_closed_forms_of_activations():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 3.0, 7.0])
    assert_same(run_graphc("HardSwish", [x])[0], x * np.clip(x + 3, 0, 6) / 6)
    assert_same(run_graphc("HardSigmoid", [x], {"alpha": 0.25, "beta": 0.5})[0],
                np.array([0.0, 0.375, 0.5, 0.625, 1.0, 1.0]))
    assert_same(run_graphc("LeakyRelu", [x], {"alpha": 0.5})[0],
                np.array([-1.0, -0.25, 0.0, 0.5, 3.0, 7.0]))
    selu = run_graphc("Selu", [x])[0]
    assert selu[4] == pytest.approx(1.0507009873554805 * 3.0)
    assert selu[0] == pytest.approx(1.0507009873554805 * 1.6732632423543772 * (math.exp(-2) - 1))


def _run_reference(op, x, attrs=None):
    """Call an op's numpy reference directly; overflow and invalid operations raise."""
    opdef = registry.get(op)
    call = registry.make_call(opdef, "n", opdef.normalize_attrs("n", attrs or {}),
                              [graphc.TensorType.of(x)])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        return opdef.reference(call, x)


def test_sigmoid_is_stable_for_large_inputs():
    for dtype in (np.float32, np.float64):
        x = np.array([-1e30, -1000, -100, 0, 100, 1000, 1e30], dtype)
        y = _run_reference("Sigmoid", x)
        assert y.dtype == dtype
        assert y[0] == 0 and y[1] == 0 and y[-1] == 1 and y[-2] == 1 and y[3] == 0.5
        assert 0 < y[2] < 1e-40 or (dtype is np.float32 and y[2] == 0)
    x = np.array([-20.0, -3.0, 0.5, 30.0])
    np.testing.assert_allclose(_run_reference("Sigmoid", x), 1 / (1 + np.exp(-x)), rtol=1e-15)


def test_softplus_and_elu_do_not_overflow():
    x = np.array([-1000, -50, 0, 50, 1000], np.float32)
    assert_same(_run_reference("Softplus", x),
                np.array([0, math.log1p(math.exp(-50)), math.log(2), 50, 1000], np.float32))
    elu = _run_reference("Elu", x, {"alpha": 2.0})
    assert_same(elu, np.array([-2, -2, 0, 50, 1000], np.float32))
    assert _run_reference("Selu", x)[-1] == np.float32(1000 * 1.05070102214813232421875)


@pytest.mark.parametrize("op", ["Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Elu",
                                "Selu", "Softplus", "Gelu", "HardSwish", "Erf", "Exp", "Log",
                                "Sqrt", "Abs", "Neg", "Reciprocal"])
def test_unary_propagates_nan(op):
    x = np.array([np.nan, 1.0], np.float32)
    y = run_graphc(op, [x])[0]
    assert np.isnan(y[0]) and not np.isnan(y[1])


# -- PRelu -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape,slope_shape", [((2, 3, 4, 5), (5,)), ((2, 3, 4, 5), (3, 1, 1)),
                                                 ((1, 3, 4, 5), (1,)), ((2, 3), (2, 3)),
                                                 ((2, 3, 4, 5), (1, 3, 4, 5))], ids=str)
def test_prelu_matches_onnxruntime(rng, x_shape, slope_shape):
    x = rng.standard_normal(x_shape).astype(np.float32)
    slope = rng.uniform(0, 1, slope_shape).astype(np.float32)
    got = run_graphc("PRelu", [x, slope], consts=(1,))[0]
    assert_same(got, run_ort("PRelu", [x, slope], opset=16, consts=(1,))[0])
    assert_same(got, np.maximum(x, 0) + slope * np.minimum(x, 0))


@pytest.mark.parametrize("slope_shape", [(4,), (2, 3, 4, 5, 1), (3, 4, 1, 1)], ids=str)
def test_prelu_slope_must_broadcast_to_x(slope_shape):
    g = graphc.Graph()
    x = g.input("x", (2, 3, 4, 5))
    with pytest.raises(graphc.GraphcError, match="pr1"):
        graphc.ops.prelu(x, np.ones(slope_shape, np.float32), name="pr1")


# -- Clip -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (-0.5, None), (None, 0.25), (None, None),
                                    (2.0, -2.0)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_clip_matches_onnxruntime(rng, bounds, dtype):
    scale = 3 if np.dtype(dtype).kind == "f" else 1
    x = _random(rng, (3, 4, 5), dtype, -3, 3)
    lo, hi = (None if b is None else np.array(b * scale).astype(dtype) for b in bounds)
    inputs = [x, lo, hi]
    got = run_graphc("Clip", inputs, consts=(1, 2))[0]
    assert_same(got, run_ort("Clip", inputs, opset=13, consts=(1, 2))[0])
    if lo is not None and hi is not None and lo > hi:
        assert (got == hi).all()  # ONNX: min > max sets everything to max


def test_clip_bounds_may_be_run_time_inputs(rng):
    x = rng.standard_normal((2, 5)).astype(np.float32)
    lo, hi = np.float32(-0.5), np.float32(0.7)
    assert_same(run_graphc("Clip", [x, np.array(lo), np.array(hi)])[0], np.clip(x, lo, hi))


@pytest.mark.parametrize("attrs", [{"min": -0.5, "max": 0.5}, {"min": 0.0}, {"max": 0.2}, {}],
                         ids=str)
def test_clip_opset6_attributes_import_as_inputs(rng, attrs):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    model = one_node_model("Clip", [x], attrs, opset=10)
    feeds = feeds_for([x])
    assert_same(import_and_run(model, feeds)[0], run_onnxruntime(model, feeds)[0])


def test_clip_propagates_nan():
    x = np.array([np.nan, -5, 5], np.float32)
    got = run_graphc("Clip", [x, np.array(-1, np.float32), np.array(1, np.float32)])[0]
    assert np.isnan(got[0]) and list(got[1:]) == [-1, 1]


# -- shape rules and metadata ---------------------------------------------------------------------
def _input(shape, dtype="f32"):
    return graphc.Graph().input("x", shape, dtype)


def test_shape_errors_name_the_node():
    x = _input((3, 4))
    with pytest.raises(graphc.GraphcError, match="add7.*do not broadcast"):
        graphc.ops.add(x, np.ones(5, np.float32), name="add7")
    with pytest.raises(graphc.GraphcError, match="mul1.*dtype"):
        graphc.ops.mul(x, np.ones(4, np.int64), name="mul1")
    with pytest.raises(graphc.GraphcError, match="max2"):
        graphc.ops.max(x, np.ones((2, 1), np.float32), np.ones(3, np.float32), name="max2")
    with pytest.raises(graphc.GraphcError, match="clip1.*scalar"):
        graphc.ops.clip(x, np.zeros(2, np.float32), name="clip1")
    with pytest.raises(graphc.GraphcError, match="clip2.*dtype"):
        graphc.ops.clip(x, np.zeros((), np.int64), name="clip2")


@pytest.mark.parametrize("op", ["Sigmoid", "Exp", "Gelu", "Softplus", "Sum", "LeakyRelu"])
def test_float_only_ops_reject_integers(op):
    x = _input((3,), "i64")
    with pytest.raises(graphc.GraphcError, match=f"{op.lower()}_node.*float"):
        graphc.ops.apply(op, (x,), name=f"{op.lower()}_node")


def test_pow_rejects_unsupported_base_dtype():
    x = _input((3,), "u8")
    with pytest.raises(graphc.GraphcError, match="p1.*base"):
        graphc.ops.pow(x, np.float32(2.0), name="p1")


def test_bad_attribute_values_are_rejected():
    x = _input((3,))
    with pytest.raises(graphc.GraphcError, match="g1.*approximate"):
        graphc.ops.gelu(x, approximate="fast", name="g1")


def test_symbolic_batch_passes_through(rng):
    x = _input((None, 3))
    g = x.graph
    y = graphc.ops.prelu(graphc.ops.add(x, np.ones(3, np.float32)),
                         np.full(3, 0.1, np.float32))
    z = graphc.ops.sum(y, x, np.ones((1, 3), np.float32))
    g.output(z)
    assert z.shape == ("N", 3)
    for batch in (1, 4):
        a = rng.standard_normal((batch, 3)).astype(np.float32)
        b = a + 1
        want = np.where(b >= 0, b, 0.1 * b) + a + 1
        assert_same(graphc.interpret(g, {"x": a})[0], want)


def test_elementwise_flops_and_kinds():
    x = _input((2, 3, 4))
    g = x.graph
    y = graphc.ops.relu(x)
    z = graphc.ops.sum(x, y, x)
    node_y, node_z = g.producer(y.name), g.producer(z.name)
    for node, want in ((node_y, 24), (node_z, 48)):
        opdef = registry.get(node.op)
        call = registry.make_call(opdef, node.name, node.attrs,
                                  [g.type_of(v) for v in node.inputs])
        assert opdef.flops(call, list(node.types)) == want
    assert registry.get("Relu").kind == "elementwise"
    assert registry.get("Add").kind == "broadcast"
