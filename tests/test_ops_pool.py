"""MaxPool (with Indices), AveragePool, GlobalAveragePool, GlobalMaxPool against onnxruntime and
a direct oracle that visits every output position and reads only the valid taps of its window.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphc
from graphc.flops import node_flops
from graphc.types import TensorType

from .oracle import run_graphc, run_ort
from .test_ops_conv import build_node, spec_conv_pads


def spec_pool_out(size, k, s, d, begin, end, ceil_mode):
    """Output length per the ONNX pooling spec; ceil-mode windows may not start in the end pad."""
    exact = (size + begin + end - ((k - 1) * d + 1)) / s + 1
    if not ceil_mode:
        return math.floor(exact)
    out = math.ceil(exact)
    return out - 1 if (out - 1) * s >= size + begin else out


def naive_pool(x, attrs, kind):
    """Per output position: gather the taps inside X (and, for count_include_pad, count the
    ones on the pads); returns (Y, Indices) for max, Y for average."""
    n = x.ndim - 2
    spatial = x.shape[2:]
    kernel = attrs["kernel_shape"]
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    pads = spec_conv_pads(spatial, kernel, strides, dilations, auto_pad, attrs.get("pads"))
    ceil_mode = attrs.get("ceil_mode", 0) and auto_pad == "NOTSET"
    out = [spec_pool_out(spatial[i], kernel[i], strides[i], dilations[i], pads[i], pads[n + i],
                         ceil_mode) for i in range(n)]
    y = np.zeros(x.shape[:2] + tuple(out))
    indices = np.zeros(x.shape[:2] + tuple(out), dtype=np.int64)
    for pos in np.ndindex(*out):
        starts = [pos[i] * strides[i] - pads[i] for i in range(n)]
        taps = [[starts[i] + t * dilations[i] for t in range(kernel[i])] for i in range(n)]
        inside = [[c for c in axis if 0 <= c < spatial[i]] for i, axis in enumerate(taps)]
        values = x[(slice(None), slice(None)) + np.ix_(*inside)].astype(np.float64)
        values = values.reshape(x.shape[:2] + (-1,))
        if kind == "max":
            y[(Ellipsis,) + pos] = values.max(axis=-1)
            coords = np.unravel_index(values.argmax(axis=-1), [len(a) for a in inside])
            flat = np.zeros(x.shape[:2], dtype=np.int64)
            for i in range(n):
                step = (int(np.prod(spatial[:i])) if attrs.get("storage_order") else
                        int(np.prod(spatial[i + 1:])))
                flat += np.asarray(inside[i])[coords[i]] * step
            base = np.arange(x.shape[0] * x.shape[1]).reshape(x.shape[:2]) * np.prod(spatial)
            indices[(Ellipsis,) + pos] = base + flat
        else:
            if attrs.get("count_include_pad"):
                count = np.prod([sum(-pads[i] <= c < spatial[i] + pads[n + i] for c in axis)
                                 for i, axis in enumerate(taps)])
            else:
                count = values.shape[-1]
            y[(Ellipsis,) + pos] = values.sum(axis=-1) / count
    return (y, indices) if kind == "max" else y


POOL_CASES = [
    ((1, 1, 5, 5), {"kernel_shape": [2, 2]}),
    ((2, 3, 9, 11), {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 1, 1]}),
    ((2, 3, 10, 11), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 10, 11), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                      "ceil_mode": 1}),
    ((1, 2, 9, 8), {"kernel_shape": [2, 3], "dilations": [2, 2], "strides": [1, 2]}),
    ((2, 2, 11), {"kernel_shape": [4], "strides": [2]}),
    ((2, 2, 11), {"kernel_shape": [4], "strides": [3], "auto_pad": "SAME_UPPER"}),
    ((2, 2, 11), {"kernel_shape": [4], "strides": [3], "auto_pad": "SAME_LOWER"}),
    ((1, 3, 8, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}),
    ((1, 2, 8, 9, 7), {"kernel_shape": [2, 3, 2], "strides": [2, 2, 2], "dilations": [2, 1, 2],
                       "ceil_mode": 1, "pads": [1, 1, 0, 0, 1, 1]}),
    ((1, 2, 6, 5, 4), {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2]}),
]


# -- MaxPool -------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("shape,attrs", POOL_CASES)
def test_max_pool_and_indices_match_oracles(rng, shape, attrs, storage_order):
    attrs = dict(attrs, storage_order=storage_order)
    x = rng.standard_normal(shape).astype(np.float32)
    y, indices = run_graphc("MaxPool", [x], attrs, n_outputs=2)
    want_y, want_indices = naive_pool(x, attrs, "max")
    assert y.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_array_equal(y, want_y.astype(np.float32))
    np.testing.assert_array_equal(indices, want_indices)
    # storage_order=1 indexes X flattened column-major over its spatial axes
    layout = x if not storage_order else x.transpose((0, 1) + tuple(range(x.ndim - 1, 1, -1)))
    np.testing.assert_array_equal(np.take(layout, indices), y)
    ort_y, ort_indices = run_ort("MaxPool", [x], attrs, n_outputs=2)
    np.testing.assert_array_equal(y, ort_y)
    np.testing.assert_array_equal(indices, ort_indices)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.float64, np.float16])
def test_max_pool_dtypes(rng, dtype):
    attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 1]}
    x = rng.integers(0, 100, (2, 3, 7, 6)).astype(dtype)
    if dtype == np.int8:
        x = x - np.int8(100)  # all negative, so a zero from the padding would show
    (y,) = run_graphc("MaxPool", [x], attrs)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, naive_pool(x, attrs, "max")[0].astype(dtype))
    if dtype in (np.uint8, np.int8, np.float64):
        np.testing.assert_array_equal(y, run_ort("MaxPool", [x], attrs)[0])


def test_max_pool_pads_with_minus_infinity(rng):
    x = -1.0 - rng.random((1, 2, 5, 5)).astype(np.float32)  # every value below zero
    (y,) = run_graphc("MaxPool", [x], {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]})
    assert (y < -1).all()


def test_max_pool_propagates_nan(rng):
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    x[0, 0, 1, 1] = np.nan
    y, indices = run_graphc("MaxPool", [x], {"kernel_shape": [2, 2], "strides": [2, 2]},
                        n_outputs=2)
    assert np.isnan(y[0, 0, 0, 0]) and indices[0, 0, 0, 0] == 7
    assert np.isfinite(np.delete(y.ravel(), 0)).all()
    (y,) = run_graphc("MaxPool", [x], {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert np.isnan(y[0, 0, 0, 0])


def test_max_pool_ties_pick_the_first_maximum():
    x = np.array([[[[1, 3, 3], [3, 0, 3]]]], dtype=np.float32)
    y, indices = run_graphc("MaxPool", [x], {"kernel_shape": [2, 2]}, n_outputs=2)
    np.testing.assert_array_equal(y, [[[[3, 3]]]])
    np.testing.assert_array_equal(indices, [[[[1, 1]]]])


def test_ceil_mode_does_not_change_auto_pad_sizes():
    x = TensorType((1, 1, 11, 10), "f32")
    for auto_pad in ("SAME_UPPER", "VALID"):
        attrs = {"kernel_shape": [3, 2], "strides": [3, 4], "auto_pad": auto_pad}
        _, (floor_type,) = build_node("MaxPool", [x], attrs)
        _, (ceil_type,) = build_node("MaxPool", [x], dict(attrs, ceil_mode=1))
        assert floor_type == ceil_type


# -- AveragePool ---------------------------------------------------------------------------------
@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("shape,attrs", POOL_CASES)
def test_average_pool_matches_oracles(rng, shape, attrs, count_include_pad):
    attrs = dict(attrs, count_include_pad=count_include_pad)
    x = rng.standard_normal(shape).astype(np.float32)
    (y,) = run_graphc("AveragePool", [x], attrs)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, naive_pool(x, attrs, "average"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, run_ort("AveragePool", [x], attrs)[0], rtol=1e-5, atol=1e-6)


def test_average_pool_propagates_nan_and_keeps_float64(rng):
    x = rng.standard_normal((1, 1, 4, 4))
    x[0, 0, 3, 3] = np.nan
    (y,) = run_graphc("AveragePool", [x], {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert y.dtype == np.float64
    assert np.isnan(y[0, 0, 1, 1]) and np.isfinite(y[0, 0, 0]).all()


# -- global pools --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3, 5), (2, 4, 5, 7), (2, 2, 3, 4, 5)])
def test_global_pools(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    axes = tuple(range(2, len(shape)))
    (avg,) = run_graphc("GlobalAveragePool", [x])
    (mx,) = run_graphc("GlobalMaxPool", [x])
    assert avg.shape == mx.shape == shape[:2] + (1,) * (len(shape) - 2)
    assert avg.dtype == mx.dtype == np.float32
    np.testing.assert_allclose(avg, x.astype(np.float64).mean(axis=axes, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mx, x.max(axis=axes, keepdims=True))
    np.testing.assert_allclose(avg, run_ort("GlobalAveragePool", [x])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mx, run_ort("GlobalMaxPool", [x])[0])


def test_global_pools_propagate_nan(rng):
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    x[0, 1, 2, 0] = np.nan
    for op in ("GlobalAveragePool", "GlobalMaxPool"):
        (y,) = run_graphc(op, [x])
        assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, 0]).all()


# -- shape rules ---------------------------------------------------------------------------------
def test_pools_keep_a_symbolic_batch():
    x = TensorType(("N", 3, 9, 9), "f32")
    _, (y, indices) = build_node("MaxPool", [x], {"kernel_shape": [3, 3], "strides": [2, 2]},
                                 n_outputs=2)
    assert y == TensorType(("N", 3, 4, 4), "f32") and indices == y.with_dtype("i64")
    _, (y,) = build_node("AveragePool", [x], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})
    assert y.shape == ("N", 3, 9, 9)
    _, (y,) = build_node("GlobalAveragePool", [TensorType(("N", 3, "H", "W"), "f32")])
    assert y.shape == ("N", 3, 1, 1)


POOL_ERRORS = [
    ("MaxPool", (1, 3, 8, 8), "f32", {"kernel_shape": [2]}, "kernel_shape .* has 1 values"),
    ("MaxPool", (3, 8), "f32", {"kernel_shape": [2]}, "rank >= 3"),
    ("MaxPool", (1, 3, 8, 8), "i64", {"kernel_shape": [2, 2]}, "dtype i64"),
    ("MaxPool", (1, 3, 8, 8), "f32", {"kernel_shape": [2, 2], "strides": [2]},
     "strides has 1 values"),
    ("MaxPool", (1, 3, 2, 8), "f32", {"kernel_shape": [3, 3]}, "does not fit spatial axis 0"),
    ("MaxPool", (1, 3, 8, 8), "f32", {"kernel_shape": [0, 2]}, "must be positive"),
    ("MaxPool", (1, 3, "H", 8), "f32", {"kernel_shape": [2, 2], "strides": [2, 2]},
     "'H' must be static"),
    ("AveragePool", (1, 3, 8, 8), "i32", {"kernel_shape": [2, 2]}, "dtype i32"),
    ("AveragePool", (1, 3, 8, 8), "f32", {"kernel_shape": [2, 2], "pads": [1, 1, 1]},
     "pads has 3 values"),
    ("GlobalAveragePool", (1, 3, 8, 8), "u8", {}, "dtype u8"),
    ("GlobalMaxPool", (3, 8), "f32", {}, "rank >= 3"),
]


@pytest.mark.parametrize("op,shape,dtype,attrs,message", POOL_ERRORS)
def test_pool_shape_errors_name_the_node(op, shape, dtype, attrs, message):
    with pytest.raises(graphc.GraphcError, match=f"{op} node 'pool1'.*{message}"):
        build_node(op, [TensorType(shape, dtype)], attrs, name="pool1")


def test_pool_attribute_errors_name_the_node():
    x = [TensorType((1, 3, 8, 8), "f32")]
    with pytest.raises(graphc.GraphcError, match="'pool1'.*kernel_shape"):
        build_node("MaxPool", x, {}, name="pool1")
    with pytest.raises(graphc.GraphcError, match="'pool1'.*ceil_mode"):
        build_node("AveragePool", x, {"kernel_shape": [2, 2], "ceil_mode": 2}, name="pool1")


def test_pool_flops():
    g, _ = build_node("MaxPool", [TensorType((2, 3, 8, 8), "f32")],
                      {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert node_flops(g, g.node("node")) == 2 * 3 * 4 * 4 * 4
    g, _ = build_node("AveragePool", [TensorType((2, 3, 8, 8), "f32")], {"kernel_shape": [3, 3]})
    assert node_flops(g, g.node("node")) == 2 * 3 * 6 * 6 * 10
    g, _ = build_node("GlobalAveragePool", [TensorType((2, 3, 8, 8), "f32")])
    assert node_flops(g, g.node("node")) == 2 * 3 * 8 * 8
