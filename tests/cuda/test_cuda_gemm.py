"""The generated tiled GEMM: Gemm/FusedGemm/MatMul/ConvGemm with partial tiles, transposes,
broadcast C, batches and every epilogue part, against the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from backends.cuda.gemm import DEVICE_TILING, GemmTiling
from graphc import ops

from .helpers import check, ops_of, random_input

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("batch,trans_a,trans_b", [(1, 0, 1), (5, 1, 0), (3, 1, 1)])
def test_gemm_transposes_and_broadcast_bias_with_partial_tiles(batch, trans_a, trans_b):
    rng = np.random.default_rng(batch)
    k, n = 19, 21  # neither divides a tile
    g = graphc.Graph("gemm")
    x = g.input("x", (k, batch) if trans_a else (batch, k))
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    g.output(ops.gemm(x, w, rng.standard_normal(n).astype(np.float32), transA=trans_a,
                      transB=trans_b, alpha=0.5, beta=2.0))
    model = check(g, {"x": random_input(rng, g.type_of("x").shape)}, rtol=1e-4)
    assert "Gemm" in ops_of(model)


@pytest.mark.parametrize("c_shape", [(1,), (7, 1), (7, 9), ()])
def test_gemm_run_time_operands_and_every_shape_of_c(c_shape):
    rng = np.random.default_rng(len(c_shape))
    g = graphc.Graph("gemm_c")
    a, b = g.input("a", (11, 7)), g.input("b", (11, 9))
    c = g.input("c", c_shape)
    g.output(ops.gemm(a, b, c, transA=1, beta=0.25))
    feeds = {"a": random_input(rng, (11, 7)), "b": random_input(rng, (11, 9)),
             "c": random_input(rng, c_shape)}
    check(g, feeds, rtol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "clip", "sigmoid"])
def test_fused_gemm_epilogue_bias_residual_activation(activation):
    rng = np.random.default_rng(0)
    g = graphc.Graph("fused")
    x, z = g.input("x", (3, 17)), g.input("z", (3, 10))
    h = ops.gemm(x, rng.standard_normal((17, 10)).astype(np.float32),
                 rng.standard_normal(10).astype(np.float32)) + z
    act = {"relu": ops.relu, "sigmoid": ops.sigmoid,
           "leaky_relu": lambda v: ops.leaky_relu(v, alpha=0.2),
           "clip": lambda v: ops.clip(v, np.float32(-0.5), np.float32(0.5))}[activation]
    g.output(act(h))
    model = check(g, {"x": random_input(rng, (3, 17)), "z": random_input(rng, (3, 10))},
                  rtol=1e-4)
    assert "FusedGemm" in ops_of(model)


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3, 5, 6), (6, 4)), ((5,), (4, 5, 3)),
                                             ((3, 1, 4, 5), (2, 5, 7)), ((4, 6), (6,))])
def test_batched_matmul_broadcasting_and_vectors(a_shape, b_shape):
    rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
    g = graphc.Graph("matmul")
    a, b = g.input("a", a_shape), g.input("b", b_shape)
    g.output(ops.matmul(a, b))
    check(g, {"a": random_input(rng, a_shape), "b": random_input(rng, b_shape)}, rtol=1e-4)


def test_device_tiling_in_one_partial_block():
    """The tiling a GPU uses (64x64x16, 16x16 threads) on a problem smaller than one tile."""
    rng = np.random.default_rng(1)
    g = graphc.Graph("big_tile")
    x = g.input("x", (2, 37))
    g.output(ops.relu(ops.gemm(x, rng.standard_normal((37, 45)).astype(np.float32),
                               rng.standard_normal(45).astype(np.float32))))
    check(g, {"x": random_input(rng, (2, 37))}, rtol=1e-4, tiling=DEVICE_TILING)


def test_grouped_strided_conv_as_im2col_gemm_with_residual():
    rng = np.random.default_rng(2)
    g = graphc.Graph("conv_gemm")
    x = g.input("x", (2, 4, 9, 7))
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    y = ops.conv(x, w, rng.standard_normal(6).astype(np.float32), group=2, strides=[2, 1],
                 pads=[1, 1, 1, 1])
    r = g.input("r", (2, 6, 5, 7))
    g.output(ops.relu(y + r))
    model = check(g, {"x": random_input(rng, (2, 4, 9, 7)), "r": random_input(rng, (2, 6, 5, 7))},
                  conv="im2col", rtol=1e-4)
    assert {"Im2Col", "ConvGemm"} <= ops_of(model)


def test_pointwise_conv_is_a_gemm_over_the_input():
    rng = np.random.default_rng(3)
    g = graphc.Graph("conv1x1")
    x = g.input("x", (1, 5, 4, 3))
    g.output(ops.conv(x, rng.standard_normal((3, 5, 1, 1)).astype(np.float32), None))
    check(g, {"x": random_input(rng, (1, 5, 4, 3))}, rtol=1e-4)


def test_gemm_with_empty_k_and_f64():
    g = graphc.Graph("empty_k")
    a, b = g.input("a", (3, 0), "f64"), g.input("b", (0, 2), "f64")
    g.output(ops.matmul(a, b))
    check(g, {"a": np.zeros((3, 0)), "b": np.zeros((0, 2))})


def test_tiling_must_divide():
    from backends.lower import LoweringError

    with pytest.raises(LoweringError, match="multiples"):
        GemmTiling(8, 8, 4, 3, 2)
