"""ReduceSum, ReduceMean, Softmax and LogSoftmax (graphc/ops/reduce.py) against onnxruntime on
one-node ONNX models and direct numpy formulas: every axes/keepdims/noop path, the import rules
of older opsets (axes attribute; Softmax's flatten-to-2-D semantics), numerical stability, and
shape-rule errors that name the node."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.ops import registry

from .oracle import feeds_for, import_and_run, one_node_model, run_graphc, run_onnxruntime, run_ort
from .test_ops_elementwise import assert_same

AXES = [None, [], [0], [-1], [0, 2], [1, -1], [2, 0, 1]]


def _axes(axes):
    return None if axes is None else np.array(axes, np.int64)


# -- ReduceSum / ReduceMean ------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
@pytest.mark.parametrize("axes", AXES, ids=str)
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("noop", [0, 1])
@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 7, 1), (2, 1, 3)], ids=str)
def test_reduce_matches_onnxruntime(rng, op, axes, keepdims, noop, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    attrs = {"keepdims": keepdims, "noop_with_empty_axes": noop}
    inputs = [x, _axes(axes)]
    got = run_graphc(op, inputs, attrs, consts=(1,))[0]
    assert_same(got, run_ort(op, inputs, attrs, opset=18, consts=(1,))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,want", [("ReduceSum", lambda x: x.sum(axis=(0, 2))),
                                     ("ReduceMean", lambda x: x.mean(axis=(0, 2)))])
def test_reduce_float64_and_rank4(rng, op, want):
    x = rng.standard_normal((3, 2, 5, 1))
    got = run_graphc(op, [x, np.array([2, 0], np.int64)], {"keepdims": 0}, consts=(1,))[0]
    assert_same(got, want(x), rtol=1e-12)


def test_reduce_integers():
    x = np.array([[-7, 2, 1], [5, 6, 2]], np.int64)
    axes = np.array([1], np.int64)
    assert_same(run_graphc("ReduceSum", [x, axes], consts=(1,))[0], np.array([[-4], [13]]))
    # integer mean divides as integers, truncating toward zero: -4/3 -> -1, 13/3 -> 4
    assert_same(run_graphc("ReduceMean", [x, axes], {"keepdims": 0}, consts=(1,))[0],
                np.array([-1, 4]))


def test_reduce_empty_set():
    x = np.zeros((2, 0, 4), np.float32)
    axes = np.array([1], np.int64)
    assert_same(run_graphc("ReduceSum", [x, axes], consts=(1,))[0], np.zeros((2, 1, 4), np.float32))
    assert np.isnan(run_graphc("ReduceMean", [x, axes], consts=(1,))[0]).all()


def test_empty_axes_tensor_is_known_statically_even_at_run_time(rng):
    # an empty axes input needs no value to infer the shape: the ONNX conformance form
    g = graphc.Graph()
    x = g.input("x", (3, 2))
    axes = g.input("axes", (0,), "i64")
    g.output(graphc.ops.reduce_sum(x, axes, keepdims=0), graphc.ops.reduce_sum(
        x, axes, noop_with_empty_axes=1))
    a = rng.standard_normal((3, 2)).astype(np.float32)
    total, same = graphc.interpret(g, {"x": a, "axes": np.zeros(0, np.int64)})
    assert total.shape == () and total == pytest.approx(a.sum(), rel=1e-6)
    assert_same(same, a)


@pytest.mark.parametrize("op,opset", [("ReduceSum", 11), ("ReduceSum", 12), ("ReduceMean", 13),
                                      ("ReduceMean", 11)])
@pytest.mark.parametrize("axes", [None, [1], [0, -1]], ids=str)
@pytest.mark.parametrize("keepdims", [0, 1])
def test_axes_attribute_of_older_opsets_imports_as_input(rng, op, opset, axes, keepdims):
    x = rng.standard_normal((3, 4, 2)).astype(np.float32)
    attrs = {"keepdims": keepdims} | ({} if axes is None else {"axes": axes})
    model = one_node_model(op, [x], attrs, opset=opset)
    feeds = feeds_for([x])
    assert_same(import_and_run(model, feeds)[0], run_onnxruntime(model, feeds)[0],
                rtol=1e-5, atol=1e-6)


def test_symbolic_batch_passes_through_reduce(rng):
    g = graphc.Graph()
    x = g.input("x", (None, 3, 4))
    y = graphc.ops.reduce_mean(x, [1, 2])
    z = graphc.ops.reduce_sum(x, [-1], keepdims=0)
    g.output(y, z)
    assert y.shape == ("N", 1, 1) and z.shape == ("N", 3)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    got_y, got_z = graphc.interpret(g, {"x": a})
    assert_same(got_y, a.mean(axis=(1, 2), keepdims=True), rtol=1e-5)
    assert_same(got_z, a.sum(-1), rtol=1e-5)


@pytest.mark.parametrize("axes,match", [([3], "out of range"), ([-4], "out of range"),
                                        ([1, -2], "repeated")], ids=str)
def test_reduce_bad_axes_name_the_node(axes, match):
    g = graphc.Graph()
    x = g.input("x", (2, 3, 4))
    with pytest.raises(graphc.GraphcError, match=f"red5.*{match}"):
        graphc.ops.reduce_sum(x, axes, name="red5")


def test_reduce_axes_must_be_known_and_int64():
    g = graphc.Graph()
    x = g.input("x", (2, 3))
    axes = g.input("axes", (1,), "i64")
    with pytest.raises(graphc.GraphcError, match="red6.*axes.*constant"):
        graphc.ops.reduce_mean(x, axes, name="red6")
    with pytest.raises(graphc.GraphcError, match="red7.*int64"):
        graphc.ops.reduce_mean(x, g.constant(np.array([1], np.int32)), name="red7")
    with pytest.raises(graphc.GraphcError, match="red8.*dtype"):
        graphc.ops.reduce_sum(g.input("b", (2,), "u8"), name="red8")


# -- Softmax / LogSoftmax -------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, -1, 0, 1, 2, -2, -3])
@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 10, 1), (2, 1, 7)], ids=str)
def test_softmax_matches_onnxruntime(rng, op, axis, shape):
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    attrs = {} if axis is None else {"axis": axis}
    assert_same(run_graphc(op, [x], attrs)[0], run_ort(op, [x], attrs, opset=13)[0],
                rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_formula_float64(rng, axis):
    x = rng.standard_normal((4, 6)) * 10
    e = np.exp(x)
    want = e / e.sum(axis=axis, keepdims=True)
    assert_same(run_graphc("Softmax", [x], {"axis": axis})[0], want, rtol=1e-12)
    assert_same(run_graphc("LogSoftmax", [x], {"axis": axis})[0], np.log(want), rtol=1e-10,
                atol=1e-12)


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000, 1001, 1002], [-1e30, 0, 1e30], [-1000, -1000, -1000]], np.float32)
    opdef = registry.get("Softmax")
    call = registry.make_call(opdef, "s", {}, [graphc.TensorType.of(x)])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = opdef.reference(call, x)
    e = np.exp(np.array([-2.0, -1.0, 0.0]))
    np.testing.assert_allclose(y[0], e / e.sum(), rtol=1e-6)
    assert_same(y[1], np.array([0, 0, 1], np.float32))
    np.testing.assert_allclose(y[2], 1 / 3, rtol=1e-6)
    logs = run_graphc("LogSoftmax", [x])[0]
    assert np.isfinite(logs[0]).all() and logs[1, 2] == 0 and logs[1, 0] < -1e29


def test_softmax_propagates_nan():
    x = np.array([[np.nan, 1, 2], [0, 1, 2]], np.float32)
    y = run_graphc("Softmax", [x])[0]
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1, -2])
def test_softmax_before_opset13_flattens_at_axis(rng, op, opset, axis):
    x = (rng.standard_normal((2, 3, 4)) * 3).astype(np.float32)
    attrs = {} if axis is None else {"axis": axis}
    model = one_node_model(op, [x], attrs, opset=opset)
    feeds = feeds_for([x])
    got = import_and_run(model, feeds)[0]
    assert_same(got, run_onnxruntime(model, feeds)[0], rtol=1e-5, atol=1e-6)
    # the old semantics, stated directly: normalise over all dims from axis on
    start = 1 if axis is None else axis % 3
    flat = x.reshape(int(np.prod(x.shape[:start])), -1).astype(np.float64)
    soft = np.exp(flat) / np.exp(flat).sum(1, keepdims=True)
    want = (soft if op == "Softmax" else np.log(soft)).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_softmax_opset11_last_axis_imports_as_one_node(rng):
    x = rng.standard_normal((2, 5)).astype(np.float32)
    g = graphc.import_onnx(one_node_model("Softmax", [x], {"axis": -1}, opset=11))
    assert [n.op for n in g if n.op != "Input"] == ["Softmax"]


@pytest.mark.parametrize("axis", [3, -4])
def test_softmax_bad_axis_names_the_node(axis):
    g = graphc.Graph()
    x = g.input("x", (2, 3, 4))
    with pytest.raises(graphc.GraphcError, match="sm9.*axis"):
        graphc.ops.softmax(x, axis=axis, name="sm9")


def test_softmax_rejects_integers_and_keeps_symbolic_batch():
    g = graphc.Graph()
    with pytest.raises(graphc.GraphcError, match="sm1.*float"):
        graphc.ops.log_softmax(g.input("i", (2, 3), "i64"), name="sm1")
    y = graphc.ops.softmax(g.input("x", (None, 10)))
    assert y.shape == ("N", 10)


def test_reduce_and_softmax_flops_and_kinds():
    g = graphc.Graph()
    x = g.input("x", (2, 3, 4))
    for value, want in ((graphc.ops.reduce_sum(x, [1]), 24), (graphc.ops.softmax(x), 5 * 24)):
        node = g.producer(value.name)
        opdef = registry.get(node.op)
        call = registry.make_call(opdef, node.name, node.attrs,
                                  [g.type_of(v) for v in node.inputs])
        assert opdef.flops(call, list(node.types)) == want
    assert registry.get("ReduceMean").kind == "reduce"
