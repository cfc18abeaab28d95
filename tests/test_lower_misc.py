"""Lowerings of the once-missing ops on target "cpu" (backends/lower.py) against the
interpreter: BatchNormalization and Dropout in training mode, integer Pow, float16 math and
casts, Gather with run-time indices (negative ones, and the out-of-range error)."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from backends.kernel_ir import numpy_dtype
from backends.llvm.compiler import CpuModel
from graphc import ops
from graphc.errors import FeedError
from graphc.ir import Value

RNG = np.random.default_rng(11)


def _cpu(g, threads=2):
    return CpuModel(graphc.compile(g).graph, threads=threads)


def _check(g, feeds, rtol=1e-5, atol=1e-6, exact=False):
    got, want = _cpu(g).run(feeds), graphc.interpret(g, feeds)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _node(g, op, inputs, attrs, n_outputs=1):
    names = [v.name if isinstance(v, Value) else g.constant(v).name for v in inputs]
    outs = g.add_node(op, names, attrs, outputs=[f"{op.lower()}_{i}" for i in range(n_outputs)])
    return [Value(g, o) for o in outs]


# -- BatchNormalization, training mode --------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 4, 6), (5, 2)])
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_batch_norm_training_statistics_and_running_outputs(shape, n_outputs):
    c = shape[1]
    g = graphc.Graph("bn")
    x = g.input("x", shape)
    params = [RNG.random(c).astype(np.float32) + 0.5, RNG.standard_normal(c).astype(np.float32),
              RNG.standard_normal(c).astype(np.float32), RNG.random(c).astype(np.float32)]
    g.output(*_node(g, "BatchNormalization", [x, *params],
                    {"training_mode": 1, "momentum": 0.8, "epsilon": 1e-3}, n_outputs))
    feeds = {"x": (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)}
    _check(g, feeds, rtol=1e-4, atol=1e-5)


# -- Dropout, training mode -------------------------------------------------------------------
@pytest.mark.parametrize("shape,ratio,seed", [((3, 5, 7), 0.3, 4), ((1, 17), 0.5, None),
                                              ((2, 9), 0.75, 123)])
def test_dropout_training_mask_is_bit_identical(shape, ratio, seed):
    g = graphc.Graph("drop")
    x = g.input("x", shape)
    attrs = {} if seed is None else {"seed": seed}
    g.output(*_node(g, "Dropout", [x, np.asarray(ratio, np.float32), np.asarray(True)], attrs,
                    n_outputs=2))
    _check(g, {"x": RNG.standard_normal(shape).astype(np.float32)}, exact=True)


@pytest.mark.parametrize("dtype,ratio_dtype", [("f32", "f32"), ("f64", "f32"), ("f16", "f32"),
                                               ("f32", "f64")])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75])
def test_dropout_with_a_run_time_ratio_matches_the_reference_bit_for_bit(dtype, ratio_dtype,
                                                                         ratio):
    """The draws are compile-time (same seed, same generator); ratio, 1/(1-ratio) and the mask
    are computed at run time, so one compiled model serves every ratio (0 keeps everything)."""
    g = graphc.Graph("drop")
    x = g.input("x", (3, 5, 7), dtype=dtype)
    r = g.input("ratio", (), dtype=ratio_dtype)
    g.output(*_node(g, "Dropout", [x, r, np.asarray(True)], {"seed": 7}, n_outputs=2))
    feeds = {"x": RNG.standard_normal((3, 5, 7)).astype(numpy_dtype(dtype)),
             "ratio": np.asarray(ratio, numpy_dtype(ratio_dtype))}
    _check(g, feeds, exact=True)


# -- integer Pow ------------------------------------------------------------------------------
@pytest.mark.parametrize("base,exp", [("i32", "i32"), ("i64", "i64"), ("i32", "i64"),
                                      ("i64", "u8"), ("i32", "f32"), ("i64", "i32")])
def test_integer_pow_wraps_like_numpy(base, exp):
    g = graphc.Graph("pow")
    x = g.input("x", (3, 7), dtype=base)
    y = g.input("y", (7,), dtype=exp)
    g.output(ops.pow(x, y))
    info = np.iinfo(numpy_dtype(base))
    xs = RNG.integers(max(info.min, -9), min(info.max, 9), (3, 7)).astype(numpy_dtype(base))
    if exp.startswith("f"):  # NaN (a negative base) casts to a platform-defined integer
        xs, ys = np.abs(xs), RNG.uniform(0, 4, 7).astype(numpy_dtype(exp))
    else:
        ys = RNG.integers(0, 40, 7).astype(numpy_dtype(exp))  # large exponents wrap around
    _check(g, {"x": xs, "y": ys}, exact=True)


def test_integer_pow_with_negative_exponents_goes_through_float64():
    g = graphc.Graph("pow")
    x = g.input("x", (9,), dtype="i32")
    y = g.input("y", (9,), dtype="i32")
    g.output(ops.pow(x, y))
    feeds = {"x": np.array([1, -1, 2, -2, 3, 1, -1, 5, 4], np.int32),
             "y": np.array([-3, -3, -1, 2, 3, -2, -4, 0, 5], np.int32)}
    _check(g, feeds, exact=True)


# -- float16 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 5), (3, 4, 7)])
def test_f16_elementwise_math_matches_numpy(shape):
    g = graphc.Graph("half")
    a = g.input("a", shape, dtype="f16")
    b = g.input("b", shape[-1:], dtype="f16")
    g.output(a + b, ops.max(a, b), a * b - a, ops.sqrt(ops.abs(a)), ops.div(a, b),
             ops.relu(a))
    feeds = {"a": (RNG.standard_normal(shape) * 50).astype(np.float16),
             "b": (RNG.standard_normal(shape[-1:]) * 50).astype(np.float16)}
    _check(g, feeds, exact=True)


@pytest.mark.parametrize("dtype", ["f32", "f64", "i32", "i64", "u8", "bool"])
def test_f16_casts_round_to_nearest_even_both_ways(dtype):
    g = graphc.Graph("cast")
    x = g.input("x", (4, 33), dtype=dtype)
    h = g.input("h", (4, 33), dtype="f16")
    onnx_type = {"f16": 10, "f32": 1, "f64": 11, "i32": 6, "i64": 7, "u8": 2, "bool": 9}
    g.output(ops.cast(x, to=onnx_type["f16"]), ops.cast(h, to=onnx_type[dtype]))
    np_dtype = numpy_dtype(dtype)
    if np_dtype.kind == "f":  # values near f16 rounding ties, subnormals, overflow
        xs = np.concatenate([RNG.standard_normal(100) * 1000, RNG.standard_normal(20) * 1e-6,
                             [65519.9, 65520.0, 1e6, -7e4, 2.0 ** -25, np.nan, -0.0],
                             np.float16(RNG.standard_normal(5)).astype(np.float64)
                             + 2.0 ** -12])[:132].astype(np_dtype)
    elif np_dtype.kind == "b":
        xs = RNG.random(132) > 0.5
    else:
        info = np.iinfo(np_dtype)
        xs = RNG.integers(max(info.min, -70000), min(info.max, 70000), 132).astype(np_dtype)
    hs = (RNG.standard_normal(132) * 100).astype(np.float16)
    if np_dtype.kind == "u":  # out-of-range float -> integer casts are platform-defined
        hs = np.abs(hs).clip(0, 255).astype(np.float16)
    _check(g, {"x": xs.reshape(4, 33), "h": hs.reshape(4, 33)}, exact=True)


# -- Gather with run-time indices -------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("idx_dtype", ["i32", "i64"])
def test_gather_runtime_indices_wrap_negative_ones(axis, idx_dtype):
    g = graphc.Graph("gather")
    data = g.input("data", (4, 5, 3))
    idx = g.input("idx", (2, 3), dtype=idx_dtype)
    g.output(ops.gather(data, idx, axis=axis))
    dim = (4, 5, 3)[axis]
    model = _cpu(g)
    for _ in range(2):
        feeds = {"data": RNG.standard_normal((4, 5, 3)).astype(np.float32),
                 "idx": RNG.integers(-dim, dim, (2, 3)).astype(numpy_dtype(idx_dtype))}
        got = model.run(feeds)[0]  # no error recorded
        np.testing.assert_array_equal(got, graphc.interpret(g, feeds)[0])


def test_gather_out_of_range_index_is_a_feed_error_naming_the_node():
    g = graphc.Graph("gather")
    data = g.input("data", (6, 4))
    idx = g.input("idx", (5,), dtype="i64")
    g.output(ops.gather(data, idx, axis=0, name="lookup"))
    model = _cpu(g)
    feeds = {"data": RNG.standard_normal((6, 4)).astype(np.float32),
             "idx": np.array([0, -6, 9, 5, -7], np.int64)}
    # the kernel clamps the bad indices (reading only in-bounds rows) and records them
    with pytest.raises(FeedError, match=r"Gather node 'lookup'.*2 indices.*first is 9"):
        model.run(feeds)
    feeds["idx"] = np.array([0, -6, 3, 5, -1], np.int64)
    model.run(feeds)  # the slot is rewritten by every run: no stale error
