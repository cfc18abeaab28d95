"""Shape/data-movement ops (graphc/ops/shapes.py) against onnxruntime on one-node ONNX models.

Each case builds the same op twice: as a graphc graph (data inputs as graph inputs, shape-like
inputs as constants, as static inference needs) run by the reference interpreter, and as an ONNX
model run by onnxruntime. Older-opset forms go through ``graphc.import_onnx`` and onnxruntime
runs the old model itself. Shape-rule errors must be GraphcErrors that name the node.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphc
from graphc import ops

from .oracle import OPSET, feeds_for, one_node_graph, one_node_model, run_onnxruntime, run_ort


# -- oracles --------------------------------------------------------------------------------------
def _graphc(op, inputs, attrs=None, data=(0,), n_outputs=None, symbolic=()):
    """Run ``op`` in graphc: inputs at positions ``data`` are graph inputs, the rest constants.

    ``symbolic`` lists data positions whose first dim is declared as the symbolic ``N``.
    Returns (outputs, output types).
    """
    consts = [i for i in range(len(inputs)) if i not in data]
    g = one_node_graph(op, inputs, attrs, consts=consts, n_outputs=n_outputs,
                       name="node_under_test", symbolic=symbolic)
    return graphc.interpret(g, feeds_for(inputs, consts)), [g.type_of(v) for v in g.outputs]


def _check(op, inputs, attrs=None, data=(0,), n_outputs=None, opset=OPSET):
    got, _ = _graphc(op, inputs, attrs, data, n_outputs)
    want = run_ort(op, inputs, attrs, n_outputs=n_outputs or len(got), opset=opset)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g, w)


def _error(op, inputs, attrs=None, data=(0,), match="", symbolic=()):
    with pytest.raises(graphc.GraphcError, match=match) as info:
        _graphc(op, inputs, attrs, data, symbolic=symbolic)
    assert "node_under_test" in str(info.value)


def _i64(*values):
    return np.array(values, dtype=np.int64)


@pytest.fixture
def rand(rng):
    def make(*shape, dtype=np.float32):
        if np.dtype(dtype).kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        return rng.integers(-1000, 1000, shape).astype(dtype)
    return make


# -- Flatten --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7), (5,), (3, 1, 2)])
def test_flatten_every_axis(rand, shape):
    x = rand(*shape)
    for axis in range(-len(shape), len(shape) + 1):
        _check("Flatten", [x], {"axis": axis})


def test_flatten_default_axis_and_int64(rand):
    _check("Flatten", [rand(2, 3, 4)])
    _check("Flatten", [rand(2, 3, 4, dtype=np.int64)], {"axis": 2})


def test_flatten_symbolic_batch(rand):
    (y,), (t,) = _graphc("Flatten", [rand(3, 4, 5)], symbolic=(0,))
    assert t == graphc.TensorType(("N", 20), "f32") and y.shape == (3, 20)
    _error("Flatten", [rand(3, 4, 5)], {"axis": 0}, match="symbolic", symbolic=(0,))
    _error("Flatten", [rand(3, 4)], {"axis": 3}, match="out of range")


# -- Reshape --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, target", [
    ((2, 3, 4), (4, 6)), ((2, 3, 4), (-1,)), ((2, 3, 4), (0, -1)), ((2, 3, 4), (0, 0, 2, 2)),
    ((2, 3, 4), (-1, 3, 2)), ((1, 6), (3, 1, 2)), ((2, 0, 3), (0, -1)), ((4,), (2, 2, 1)),
    ((3, 2, 4), (0, -1, 0)), ((5, 1), (5,)),
])
def test_reshape(rand, shape, target):
    _check("Reshape", [rand(*shape), _i64(*target)])


def test_reshape_allowzero(rand):
    _check("Reshape", [rand(0, 3, 4), _i64(3, 4, 0)], {"allowzero": 1})
    _check("Reshape", [rand(2, 3, 4), _i64(4, 0, 0)[[0]] * 6], {"allowzero": 1})
    _error("Reshape", [rand(2, 3), _i64(0, -1)], {"allowzero": 1}, match="0 and -1")


def test_reshape_int64_values_stay_exact():
    big = np.array([2**62 + 1, -(2**53) - 1, 7, 9], dtype=np.int64)
    (y,), _ = _graphc("Reshape", [big, _i64(2, 2)])
    assert y.dtype == np.int64 and y.ravel().tolist() == big.tolist()


@pytest.mark.parametrize("target, want", [
    ((0, -1), ("N", 1600)), ((-1, 1600), ("N", 1600)), ((0, 1600), ("N", 1600)),
    ((0, 64, 25), ("N", 64, 25)), ((-1, 64, 5, 5), ("N", 64, 5, 5)),
    ((64, 5, 5, -1), (64, 5, 5, "N")),
])
def test_reshape_symbolic_batch(rand, target, want):
    for batch in (1, 3):
        x = rand(batch, 64, 5, 5)
        (y,), (t,) = _graphc("Reshape", [x, _i64(*target)], symbolic=(0,))
        assert t == graphc.TensorType(want, "f32")
        np.testing.assert_array_equal(y, x.reshape([batch if d == "N" else d for d in want]))


def test_reshape_errors(rand):
    x = rand(2, 3, 4)
    _error("Reshape", [x, _i64(-1, -1)], match="more than one -1")
    _error("Reshape", [x, _i64(5, 5)], match="cannot reshape")
    _error("Reshape", [x, _i64(-1, 5)], match="cannot reshape")
    _error("Reshape", [x, _i64(0, 0, 0, 0)], match="does not have")
    _error("Reshape", [x, _i64(2, -2, 3)], match="invalid dim")
    # -1 would have to be 2*N: not expressible
    _error("Reshape", [rand(2, 64, 5, 5), _i64(-1, 800)], match="cannot reshape", symbolic=(0,))
    _error("Reshape", [rand(2, 64), _i64(32, -1)], match="cannot reshape", symbolic=(0,))
    # a shape computed at run time cannot be inferred statically
    _error("Reshape", [x, _i64(4, 6)], data=(0, 1), match="must be a constant")


# -- Transpose ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4), (1, 5, 2, 3), (7,)])
def test_transpose(rand, rng, shape):
    x = rand(*shape)
    _check("Transpose", [x])
    for _ in range(3):
        _check("Transpose", [x], {"perm": rng.permutation(len(shape)).tolist()})


def test_transpose_symbolic_and_errors(rand):
    _, (t,) = _graphc("Transpose", [rand(2, 3, 4)], {"perm": [1, 0, 2]}, symbolic=(0,))
    assert t.shape == (3, "N", 4)
    _error("Transpose", [rand(2, 3)], {"perm": [0, 0]}, match="permutation")
    _error("Transpose", [rand(2, 3)], {"perm": [0, 1, 2]}, match="permutation")


# -- Concat ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_concat(rand, axis):
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for k, s in enumerate(shapes):
        s[axis] += k  # differing sizes along the axis, one of them odd
    arrays = [rand(*s) for s in shapes]
    _check("Concat", arrays, {"axis": axis}, data=(0, 1, 2))
    _check("Concat", [a.astype(np.int64) for a in arrays[:2]], {"axis": axis}, data=(0, 1))


def test_concat_single_input_and_shape_vectors():
    _check("Concat", [_i64(1, 2)], {"axis": 0})
    (y,), _ = _graphc("Concat", [_i64(2**40), _i64(-1), _i64(3, 4)], {"axis": 0}, data=())
    assert y.tolist() == [2**40, -1, 3, 4] and y.dtype == np.int64


def test_concat_symbolic_and_errors(rand):
    _, (t,) = _graphc("Concat", [rand(2, 3), rand(2, 5)], {"axis": 1}, data=(0, 1),
                      symbolic=(0, 1))
    assert t.shape == ("N", 8)
    _error("Concat", [rand(2, 3), rand(2, 3)], {"axis": 0}, data=(0, 1), symbolic=(0, 1),
           match="symbolic")
    _error("Concat", [rand(2, 3), rand(3, 3)], {"axis": 1}, data=(0, 1), match="differ")
    _error("Concat", [rand(2, 3), rand(2, 3, 1)], {"axis": 1}, data=(0, 1), match="rank")
    _error("Concat", [rand(2, 3), rand(2, 3).astype(np.float64)], {"axis": 0}, data=(0, 1),
           match="dtype")
    _error("Concat", [rand(2, 3)], {"axis": 2}, match="out of range")


# -- Split ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis, split", [
    ((6, 4), 0, (1, 2, 3)), ((2, 7), 1, (3, 4)), ((2, 7), -1, (0, 7)), ((3, 5, 2), 1, (5,)),
])
def test_split_sizes(rand, shape, axis, split):
    _check("Split", [rand(*shape), _i64(*split)], {"axis": axis}, n_outputs=len(split))


@pytest.mark.parametrize("dim, n", [(6, 3), (7, 4), (5, 2), (4, 4), (9, 1)])
def test_split_num_outputs(rand, dim, n):
    _check("Split", [rand(2, dim)], {"axis": 1, "num_outputs": n}, n_outputs=n, opset=18)


def test_split_by_output_count(rand):
    x = rand(3, 8)
    got, types = _graphc("Split", [x], {"axis": 1}, n_outputs=4)
    want = run_ort("Split", [x], {"axis": 1}, n_outputs=4, opset=13)
    assert [t.shape for t in types] == [(3, 2)] * 4
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_split_symbolic_and_errors(rand):
    _, types = _graphc("Split", [rand(2, 6), _i64(2, 4)], {"axis": 1}, symbolic=(0,))
    assert [t.shape for t in types] == [("N", 2), ("N", 4)]
    _error("Split", [rand(2, 6), _i64(2, 3)], {"axis": 1}, match="sum")
    _error("Split", [rand(2, 6), _i64(7, -1)], {"axis": 1}, match="negative")
    _error("Split", [rand(2, 6)], {"axis": 0, "num_outputs": 2}, symbolic=(0,), match="symbolic")
    _error("Split", [rand(2, 6), _i64(3, 3)], {"axis": 1, "num_outputs": 2}, match="not both")
    with pytest.raises(graphc.GraphcError, match="evenly"):
        _graphc("Split", [rand(2, 7)], {"axis": 1}, n_outputs=2)


# -- Slice ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("starts, ends, axes, steps", [
    ((0, 1), (2, 3), None, None),
    ((1,), (-1,), (1,), None),
    ((-3, 0), (100, 2), (2, 0), (1, 1)),
    ((2**62,), (-2**62,), (1,), (-1,)),
    ((-1, 4), (-100, 0), (0, 2), (-2, -3)),
    ((3,), (1,), (-1,), (1,)),            # empty result
    ((0, 0, 0), (5, 5, 5), (0, 1, 2), (2, 3, 2)),
    ((10,), (-10,), (2,), (-1,)),
])
def test_slice(rand, starts, ends, axes, steps):
    x = rand(4, 5, 6)
    inputs = [x, _i64(*starts), _i64(*ends),
              None if axes is None else _i64(*axes), None if steps is None else _i64(*steps)]
    _check("Slice", inputs)
    _check("Slice", [x.astype(np.int64)] + inputs[1:])


def test_slice_random_against_onnxruntime(rand, rng):
    x = rand(3, 7, 4)
    for _ in range(25):
        axes = rng.permutation(3)[:rng.integers(1, 4)]
        starts = rng.integers(-9, 9, len(axes))
        ends = rng.integers(-9, 9, len(axes))
        steps = rng.choice([-3, -2, -1, 1, 2, 3], len(axes))
        _check("Slice", [x, starts, ends, axes.astype(np.int64), steps.astype(np.int64)])


def test_slice_symbolic_and_errors(rand):
    x = rand(3, 6)
    _, (t,) = _graphc("Slice", [x, _i64(1), _i64(-1), _i64(1)], symbolic=(0,))
    assert t.shape == ("N", 4)
    _, (t,) = _graphc("Slice", [x, _i64(0), _i64(2**63 - 1), _i64(0)], symbolic=(0,))
    assert t.shape == ("N", 6)
    _error("Slice", [x, _i64(1), _i64(3), _i64(0)], symbolic=(0,), match="symbolic")
    _error("Slice", [x, _i64(0), _i64(3), _i64(0), _i64(0)], match="steps")
    _error("Slice", [x, _i64(0, 1), _i64(3), _i64(0)], match="length")
    _error("Slice", [x, _i64(0), _i64(3), _i64(2)], match="out of range")
    _error("Slice", [x, _i64(0), _i64(3)], data=(0, 1), match="must be a constant")


# -- Pad ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [(1, 2, 2, 1), (0, 0, 2, 0), (2, 1, 0, 3), (0, 3, 1, 0)])
def test_pad_modes(rand, mode, pads):
    for dtype in (np.float32, np.int64, np.int32):
        _check("Pad", [rand(3, 4, dtype=dtype), _i64(*pads)], {"mode": mode})


def test_pad_constant_value_axes_and_crop(rand):
    x = rand(2, 3, 4)
    _check("Pad", [x, _i64(1, 1, 2, 0), np.array(1.5, np.float32), _i64(0, 2)], data=(0, 2))
    _check("Pad", [x, _i64(1, 2), np.array(-2.0, np.float32), _i64(-1)], data=(0, 2))
    _check("Pad", [x, _i64(0, -1, 1, 0, 2, -2)])  # negative pads crop
    _check("Pad", [x.astype(np.int64), _i64(1, 0, 0, 0, 0, 1), np.array(7, np.int64)],
           data=(0, 2))


def test_pad_symbolic_and_errors(rand):
    _, (t,) = _graphc("Pad", [rand(2, 3), _i64(0, 1, 0, 1)], symbolic=(0,))
    assert t.shape == ("N", 5)
    _error("Pad", [rand(2, 3), _i64(1, 0, 0, 0)], symbolic=(0,), match="symbolic")
    _error("Pad", [rand(2, 3), _i64(1, 1)], match="pads has 2")
    _error("Pad", [rand(2, 3), _i64(0, -4, 0, 0)], match="crop")
    _error("Pad", [rand(2, 3), _i64(0, 3, 0, 0)], {"mode": "reflect"}, match="exceed")
    _error("Pad", [rand(2, 0), _i64(0, 1, 0, 0)], {"mode": "edge"}, match="empty")
    _error("Pad", [rand(2, 3), _i64(1, 1, 1, 1)], {"mode": "mirror"}, match="mode")


# -- Squeeze / Unsqueeze --------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axes", [
    ((1, 3, 1, 5), (0,)), ((1, 3, 1, 5), (0, -2)), ((1, 3, 1, 5), None), ((1,), None),
    ((2, 1), (1,)), ((1, 1, 1), (2, 0)),
])
def test_squeeze(rand, shape, axes):
    _check("Squeeze", [rand(*shape), None if axes is None else _i64(*axes)])


def test_squeeze_symbolic_and_errors(rand):
    _, (t,) = _graphc("Squeeze", [rand(2, 1, 3), _i64(1)], symbolic=(0,))
    assert t.shape == ("N", 3)
    _error("Squeeze", [rand(2, 1, 3)], symbolic=(0,), match="give the axes")
    _error("Squeeze", [rand(2, 1, 3), _i64(0)], match="size 2")
    _error("Squeeze", [rand(1, 1), _i64(1, -1)], match="repeated")


@pytest.mark.parametrize("shape, axes", [
    ((3, 4), (0,)), ((3, 4), (2,)), ((3, 4), (-1,)), ((3, 4), (1, 0)), ((5,), (0, 2, 3)),
    ((), (0,)), ((2, 3), (4, 0, -2)),
])
def test_unsqueeze(rand, shape, axes):
    _check("Unsqueeze", [rand(*shape), _i64(*axes)])


def test_unsqueeze_symbolic_and_errors(rand):
    _, (t,) = _graphc("Unsqueeze", [rand(2, 3), _i64(1, -1)], symbolic=(0,))
    assert t.shape == ("N", 1, 3, 1)
    _error("Unsqueeze", [rand(2, 3), _i64(4)], match="out of range")
    _error("Unsqueeze", [rand(2, 3), _i64(1, 1)], match="repeated")


# -- Identity, Shape, ConstantOfShape ------------------------------------------------------------
def test_identity(rand):
    for dtype in (np.float32, np.int64, np.bool_):
        _check("Identity", [rand(2, 3).astype(dtype)])


@pytest.mark.parametrize("start, end", [
    (None, None), (1, None), (-1, None), (None, 2), (None, -1), (1, -1), (-10, 10), (3, 1),
])
def test_shape(rand, start, end):
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    _check("Shape", [rand(2, 3, 4, 5)], attrs)


def test_shape_of_symbolic_input(rand):
    (y,), (t,) = _graphc("Shape", [rand(3, 4)], symbolic=(0,))
    assert t == graphc.TensorType((2,), "i64") and y.tolist() == [3, 4]


@pytest.mark.parametrize("value", [None, np.array([1.5], np.float32), np.array([7], np.int64),
                                   np.array([1], np.int32), np.array([True])])
@pytest.mark.parametrize("shape", [(2, 3), (0,), (), (1, 4, 1)])
def test_constant_of_shape(value, shape):
    attrs = {} if value is None else {"value": numpy_helper.from_array(value)}
    want = run_ort("ConstantOfShape", [_i64(*shape)], attrs, consts=(0,))[0]
    (got,), (t,) = _graphc("ConstantOfShape", [_i64(*shape)],
                           {} if value is None else {"value": value}, data=())
    assert got.dtype == want.dtype and got.shape == want.shape and t.shape == shape
    np.testing.assert_array_equal(got, want)


def test_constant_of_shape_errors():
    _error("ConstantOfShape", [_i64(2, -1)], data=(), match="negative")
    _error("ConstantOfShape", [_i64(2)], {"value": np.array([1.0, 2.0])}, data=(),
           match="one element")
    _error("ConstantOfShape", [_i64(2)], data=(0,), match="must be a constant")


# -- Gather ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_gather(rand, rng, axis, index_dtype):
    x = rand(4, 5, 3)
    dim = x.shape[axis]
    for ishape in [(), (2,), (2, 3), (1, 2, 2)]:
        idx = rng.integers(-dim, dim, ishape).astype(index_dtype)
        _check("Gather", [x, idx], {"axis": axis}, data=(0, 1))
        _check("Gather", [x.astype(np.int64), idx], {"axis": axis})  # constant indices


def test_gather_symbolic_and_errors(rand):
    _, (t,) = _graphc("Gather", [rand(2, 5), _i64(0, 4, -1)], {"axis": 1}, symbolic=(0,))
    assert t.shape == ("N", 3)
    _error("Gather", [rand(2, 5), _i64(5)], {"axis": 1}, match="out of range")
    _error("Gather", [rand(2, 5), _i64(-6)], {"axis": 1}, match="out of range")
    _error("Gather", [rand(2, 5), np.array([0.0], np.float32)], match="int32 or int64")
    with pytest.raises(graphc.GraphcError, match="node_under_test.*out of range"):
        _graphc("Gather", [rand(2, 5), _i64(7)], {"axis": 1}, data=(0, 1))  # at run time


# -- Cast -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("src, to", [
    (np.float32, TensorProto.INT64), (np.float32, TensorProto.INT32),
    (np.float32, TensorProto.FLOAT16), (np.float32, TensorProto.DOUBLE),
    (np.float32, TensorProto.BOOL), (np.float32, TensorProto.UINT8),
    (np.int64, TensorProto.FLOAT), (np.int64, TensorProto.INT32), (np.int32, TensorProto.INT64),
    (np.bool_, TensorProto.FLOAT), (np.bool_, TensorProto.INT64), (np.float64, TensorProto.FLOAT),
    (np.int64, TensorProto.INT64),
])
def test_cast(rng, src, to):
    x = (rng.standard_normal((3, 5)) * 50).astype(src)
    if to == TensorProto.UINT8:
        x = np.abs(x)  # float -> uint8 of negatives is undefined in ONNX
    _check("Cast", [x], {"to": to})


def test_cast_nan_stays_nan_and_unsupported_targets(rand):
    x = np.array([np.nan, 1.0, -np.inf], np.float32)
    (y,), _ = _graphc("Cast", [x], {"to": TensorProto.DOUBLE})
    assert np.isnan(y[0]) and y.dtype == np.float64 and y[2] == -np.inf
    for to, name in [(TensorProto.BFLOAT16, "BFLOAT16"), (TensorProto.STRING, "STRING"),
                     (TensorProto.FLOAT8E4M3FN, "FLOAT8E4M3FN"), (99, "99")]:
        _error("Cast", [rand(2)], {"to": to}, match=name)


# -- older opsets through the importer ------------------------------------------------------------
def _import_and_compare(model, feeds):
    want = run_onnxruntime(model, feeds)
    g = graphc.import_onnx(model)
    got = graphc.interpret(g, feeds)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    return g


@pytest.mark.parametrize("opset", [7, 9])
def test_import_slice_attributes(rand, opset):
    x = rand(3, 4, 5)
    attrs = {"starts": [1, -3], "ends": [100, -1], "axes": [0, 2]}
    _import_and_compare(one_node_model("Slice", [x], attrs, opset=opset), feeds_for([x]))
    x = rand(3, 4)
    attrs = {"starts": [0, 1], "ends": [2, 3]}
    _import_and_compare(one_node_model("Slice", [x], attrs, opset=opset), feeds_for([x]))


@pytest.mark.parametrize("op, attrs, shape", [
    ("Squeeze", {"axes": [0, 2]}, [1, 3, 1, 2]), ("Squeeze", {}, [1, 3, 1, 2]),
    ("Unsqueeze", {"axes": [0, -1]}, [3, 2]),
])
def test_import_squeeze_unsqueeze_attributes(rand, op, attrs, shape):
    x = rand(*shape)
    _import_and_compare(one_node_model(op, [x], attrs, opset=11), feeds_for([x]))


def test_import_split_attribute_and_output_count(rand):
    x = rand(2, 5)
    model = one_node_model("Split", [x], {"axis": 1, "split": [1, 4]}, opset=11, n_outputs=2)
    _import_and_compare(model, feeds_for([x]))
    x = rand(6, 2)
    model = one_node_model("Split", [x], {"axis": 0}, opset=11, n_outputs=3)
    _import_and_compare(model, feeds_for([x]))


@pytest.mark.parametrize("mode, value", [("constant", 2.5), ("constant", None),
                                          ("reflect", None), ("edge", None)])
def test_import_pad_attributes(rand, mode, value):
    attrs = {"mode": mode, "pads": [0, 1, 1, 2]}
    if value is not None:
        attrs["value"] = value
    x = rand(3, 4)
    _import_and_compare(one_node_model("Pad", [x], attrs, opset=10), feeds_for([x]))


def test_import_folds_shape_chain_into_static_reshape(rand):
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape (a typical PyTorch flatten) folds."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(_i64(0)[0])),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(_i64(0), "ax"),
                     numpy_helper.from_array(_i64(-1), "minus1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    g = _import_and_compare(model, {"x": rand(2, 4, 3, 3)})
    (reshape,) = [n for n in g if n.op not in ("Constant", "Input")]
    assert reshape.op == "Reshape" and g.constant_value(reshape.inputs[1]).tolist() == [2, -1]
    assert g.type_of(g.outputs[0]) == graphc.TensorType((2, 36), "f32")


# -- builder, kinds, FLOPs ------------------------------------------------------------------------
def test_builder_and_registry_metadata(rand):
    g = graphc.Graph()
    x = g.input("x", (None, 4, 3))
    a, b = ops.split(x, [1, 3], axis=1)
    y = ops.reshape(ops.concat(b, a, axis=1), [0, -1])
    g.output(ops.cast(y, to=TensorProto.DOUBLE))
    assert g.type_of(g.outputs[0]) == graphc.TensorType(("N", 12), "f64")
    data = rand(2, 4, 3)
    want = np.concatenate([data[:, 1:], data[:, :1]], axis=1).reshape(2, 12).astype(np.float64)
    np.testing.assert_array_equal(graphc.interpret(g, {"x": data})[0], want)
    from graphc.ops import registry
    for name in ("Reshape", "Transpose", "Concat", "Split", "Slice", "Pad", "Gather"):
        op = registry.get(name)
        assert op.kind == "injective" and op.flops(None, []) == 0
