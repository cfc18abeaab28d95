"""The kernel-IR path on CUDA: the CPU backend's lowerings rendered as CUDA kernels (Winograd
transforms, im2col, fused elementwise, pooling, softmax, LRN, reductions, data movement) and
the kernel IR's integer and float semantics, against the interpreter."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

import graphc
from backends.cuda import compile_graph
from graphc import ops

from .helpers import check, ops_of, random_input

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("conv,batch,hw", [("winograd-f2", 2, (7, 6)),
                                           ("winograd-f4", 1, (9, 5))])
def test_winograd_transforms_and_batched_gemm(conv, batch, hw):
    rng = np.random.default_rng(batch)
    g = graphc.Graph("wino")
    x = g.input("x", (batch, 5, *hw))
    z = g.input("z", (batch, 4, *hw))
    y = ops.conv(x, rng.standard_normal((4, 5, 3, 3)).astype(np.float32),
                 rng.standard_normal(4).astype(np.float32), pads=[1, 1, 1, 1])
    g.output(ops.relu(y + z))
    feeds = {"x": random_input(rng, (batch, 5, *hw)), "z": random_input(rng, (batch, 4, *hw))}
    model = check(g, feeds, conv=conv, rtol=1e-4, atol=1e-4)
    assert {"WinogradInputTransform", "MatMul", "WinogradOutput"} <= ops_of(model)


def test_winograd_filter_transform_of_a_run_time_weight():
    rng = np.random.default_rng(4)
    g = graphc.Graph("wino_w")
    x, w = g.input("x", (1, 3, 6, 6)), g.input("w", (2, 3, 3, 3))
    g.output(ops.conv(x, w, None, pads=[1, 1, 1, 1]))
    model = check(g, {"x": random_input(rng, (1, 3, 6, 6)), "w": random_input(rng, (2, 3, 3, 3))},
                  conv="winograd-f2", rtol=1e-4, atol=1e-4)
    assert "WinogradFilterTransform" in ops_of(model)


def test_fused_elementwise_chain_with_broadcast():
    rng = np.random.default_rng(5)
    g = graphc.Graph("chain")
    x, y = g.input("x", (3, 4, 5)), g.input("y", (4, 1))
    g.output(ops.tanh(ops.sigmoid(x * y + np.float32(0.5)) - ops.exp(ops.neg(ops.abs(x)))))
    model = check(g, {"x": random_input(rng, (3, 4, 5)), "y": random_input(rng, (4, 1))},
                  rtol=1e-5, atol=1e-6)
    assert "FusedElementwise" in ops_of(model)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # MIN / -1 wraps in the simulator
def test_integer_division_saturating_casts_and_nan_propagating_max():
    """Integer / truncates (x / 0 == 0, MIN / -1 == MIN); float -> int casts saturate where
    numpy's result is platform-defined (NaN -> 0), so those are checked against the kernel IR's
    rule rather than the interpreter."""
    g = graphc.Graph("semantics")
    a, b = g.input("a", (9,), "i32"), g.input("b", (9,), "i32")
    f = g.input("f", (9,))
    g.output(ops.div(a, b), ops.max(f, ops.neg(f)), ops.cast(f, to=TensorProto.INT32))
    i32 = np.iinfo(np.int32)
    feeds = {"a": np.array([7, -7, 7, -7, 0, i32.min, i32.min, 5, 3], np.int32),
             "b": np.array([2, 2, -2, -2, 3, -1, 2, 0, 7], np.int32),
             "f": np.array([1.5, -2.7, np.nan, 3e9, -3e9, np.inf, -np.inf, 0.0, 200.9],
                           np.float32)}
    quotient, maximum, cast = compile_graph(g).run(feeds)
    want = graphc.interpret(g, feeds)
    np.testing.assert_array_equal(quotient, want[0])
    np.testing.assert_array_equal(maximum, want[1])  # NaN at index 2 in both
    assert cast.tolist() == [1, -2, 0, i32.max, i32.min, i32.max, i32.min, 0, 200]


@pytest.mark.parametrize("batch", [1, 3])
def test_pooling_windows(batch):
    rng = np.random.default_rng(batch)
    g = graphc.Graph("pool")
    x = g.input("x", (batch, 2, 7, 9))
    g.output(ops.max_pool(x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             ops.average_pool(x, kernel_shape=[2, 3], strides=[1, 2], pads=[0, 1, 1, 1],
                              count_include_pad=1),
             ops.global_average_pool(x), ops.global_max_pool(x))
    check(g, {"x": random_input(rng, (batch, 2, 7, 9))}, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_and_log_softmax(axis):
    rng = np.random.default_rng(6)
    g = graphc.Graph("softmax")
    x = g.input("x", (2, 5, 3))
    g.output(ops.softmax(x, axis=axis), ops.log_softmax(x, axis=axis))
    check(g, {"x": random_input(rng, (2, 5, 3))}, rtol=1e-5, atol=1e-6)


def test_lrn():
    rng = np.random.default_rng(7)
    g = graphc.Graph("lrn")
    x = g.input("x", (2, 7, 3, 4))
    g.output(ops.lrn(x, size=3, alpha=1e-3, beta=0.75, bias=1.0),
             ops.lrn(x, size=5, alpha=2e-4, beta=0.5, bias=2.0))
    check(g, {"x": random_input(rng, (2, 7, 3, 4))}, rtol=1e-5, atol=1e-6)


def test_reductions():
    rng = np.random.default_rng(8)
    g = graphc.Graph("reduce")
    x = g.input("x", (3, 4, 5))
    g.output(ops.reduce_sum(x, np.array([1]), keepdims=1),
             ops.reduce_mean(x, np.array([0, 2]), keepdims=0),
             ops.reduce_sum(x, np.array([2]), keepdims=0))
    check(g, {"x": random_input(rng, (3, 4, 5))}, rtol=1e-5, atol=1e-5)


def test_transpose_concat_slice_split_pad():
    rng = np.random.default_rng(9)
    g = graphc.Graph("movement")
    x, y = g.input("x", (2, 3, 5)), g.input("y", (2, 4, 5))
    both = ops.concat(x, y, axis=1)
    first, second = ops.split(both, np.array([2, 5]), axis=1)
    g.output(ops.transpose(both, perm=[2, 0, 1]),
             ops.slice(both, np.array([1, 0]), np.array([7, 5]), np.array([1, 2]),
                       np.array([3, 2])),
             first, second, ops.pad(x, np.array([0, 1, 2, 0, 0, 1]), mode="reflect"))
    check(g, {"x": random_input(rng, (2, 3, 5)), "y": random_input(rng, (2, 4, 5))})
