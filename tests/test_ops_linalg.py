"""Gemm and MatMul (graphc/ops/linalg.py) against onnxruntime on one-node ONNX models and
against an einsum formula: transpositions, alpha/beta, every shape of C, 1-D and batched
MatMul operands, integer dtypes, symbolic batch dims, FLOPs and shape-rule errors."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.ops import registry

from .oracle import run_graphc, run_ort
from .test_ops_elementwise import assert_same


def _flops(value) -> int:
    g, node = value.graph, value.graph.producer(value.name)
    opdef = registry.get(node.op)
    call = registry.make_call(opdef, node.name, node.attrs, [g.type_of(v) for v in node.inputs])
    return opdef.flops(call, list(node.types))


# -- Gemm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans", [(0, 0), (1, 0), (0, 1), (1, 1)], ids=str)
@pytest.mark.parametrize("c_shape", [None, (), (1,), (4,), (3, 1), (1, 4), (3, 4)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_matches_onnxruntime(rng, trans, c_shape, dtype):
    m, k, n = 3, 5, 4
    a = rng.standard_normal((k, m) if trans[0] else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans[1] else (k, n)).astype(dtype)
    c = None if c_shape is None else rng.standard_normal(c_shape).astype(dtype)
    attrs = {"transA": trans[0], "transB": trans[1], "alpha": 0.75, "beta": -1.5}
    got = run_graphc("Gemm", [a, b, c], attrs, consts=(1, 2))[0]
    assert_same(got, run_ort("Gemm", [a, b, c], attrs, opset=13, consts=(1, 2))[0], rtol=1e-5)
    a2 = a.T if trans[0] else a
    b2 = b.T if trans[1] else b
    want = 0.75 * np.einsum("ik,kj->ij", a2.astype(np.float64), b2.astype(np.float64))
    if c is not None:
        want = want - 1.5 * c
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 7, 3), (6, 1, 2), (9, 13, 11)])
def test_gemm_defaults_and_odd_sizes(rng, m, k, n):
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = rng.standard_normal((n,)).astype(np.float32)
    assert_same(run_graphc("Gemm", [a, b, c])[0], run_ort("Gemm", [a, b, c], opset=13)[0],
                rtol=1e-5)


def test_gemm_integers_are_exact(rng):
    a = rng.integers(-2**20, 2**20, (4, 3)).astype(np.int64)
    b = rng.integers(-2**20, 2**20, (3, 5)).astype(np.int64)
    c = rng.integers(-9, 9, (5,)).astype(np.int64)
    want = np.array([[sum(a[i, t] * b[t, j] for t in range(3)) + c[j] for j in range(5)]
                     for i in range(4)], np.int64)
    assert_same(run_graphc("Gemm", [a, b, c])[0], want)
    assert_same(run_graphc("Gemm", [a, b, c], {"alpha": 2.0, "beta": 0.0})[0], 2 * want - 2 * c)


def test_gemm_beta_zero_still_propagates_nan_in_c():
    a, b = np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)
    c = np.array([np.nan, 0], np.float32)
    got = run_graphc("Gemm", [a, b, c], {"beta": 0.0})[0]
    assert np.isnan(got[:, 0]).all() and (got[:, 1] == 2).all()


def test_gemm_symbolic_batch_and_flops(rng):
    g = graphc.Graph()
    x = g.input("x", (None, 5))
    y = graphc.ops.gemm(x, np.ones((3, 5), np.float32), np.zeros(3, np.float32), transB=1)
    g.output(y)
    assert y.shape == ("N", 3)
    assert _flops(y) == 0  # unknown batch: unknown cost
    a = rng.standard_normal((2, 5)).astype(np.float32)
    assert_same(graphc.interpret(g, {"x": a})[0], np.repeat(a.sum(1, keepdims=True), 3, 1))
    g2 = graphc.Graph()
    z = graphc.ops.gemm(g2.input("x", (4, 6)), np.ones((6, 7), np.float32))
    assert _flops(z) == 2 * 4 * 6 * 7


@pytest.mark.parametrize("a_shape,b_shape,c_shape,attrs,match", [
    ((3, 5), (4, 4), None, {}, "inner dims"),
    ((5, 3), (5, 4), None, {}, "inner dims"),
    ((3, 5), (5, 4), (2, 4), {}, "broadcast"),
    ((3, 5), (5, 4), (1, 3, 4), {}, "more dims"),
    ((2, 3, 5), (5, 4), None, {}, "rank 2"),
    ((3, 5), (5,), None, {}, "rank 2"),
], ids=str)
def test_gemm_shape_errors_name_the_node(a_shape, b_shape, c_shape, attrs, match):
    g = graphc.Graph()
    a = g.input("a", a_shape)
    c = None if c_shape is None else np.zeros(c_shape, np.float32)
    with pytest.raises(graphc.GraphcError, match=f"fc6.*{match}"):
        graphc.ops.gemm(a, np.zeros(b_shape, np.float32), c, name="fc6", **attrs)


def test_gemm_rejects_mixed_dtypes_and_bad_trans():
    g = graphc.Graph()
    a = g.input("a", (2, 2))
    with pytest.raises(graphc.GraphcError, match="fc1.*dtype"):
        graphc.ops.gemm(a, np.zeros((2, 2), np.int64), name="fc1")
    with pytest.raises(graphc.GraphcError, match="fc2.*transA"):
        graphc.ops.gemm(a, np.zeros((2, 2), np.float32), transA=2, name="fc2")


# -- MatMul ---------------------------------------------------------------------------------------
MATMUL_SHAPES = [((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
                 ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 6)), ((5,), (2, 5, 3)),
                 ((2, 3, 4), (4,)), ((1, 1), (1, 1)), ((3, 1, 2, 7), (1, 4, 7, 1))]


@pytest.mark.parametrize("a_shape,b_shape", MATMUL_SHAPES, ids=str)
def test_matmul_matches_onnxruntime(rng, a_shape, b_shape):
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    got = run_graphc("MatMul", [a, b])[0]
    assert_same(got, run_ort("MatMul", [a, b], opset=13)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_shape,b_shape", MATMUL_SHAPES, ids=str)
def test_matmul_integers_against_einsum(rng, a_shape, b_shape):
    a = rng.integers(-50, 50, a_shape).astype(np.int64)
    b = rng.integers(-50, 50, b_shape).astype(np.int64)
    # einsum over explicitly promoted operands: an independent statement of numpy.matmul
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    want = np.einsum("...ik,...kj->...ij", a2, b2)
    if a.ndim == 1:
        want = want[..., 0, :]
    if b.ndim == 1:
        want = want[..., 0]
    assert_same(run_graphc("MatMul", [a, b])[0], want.astype(np.int64))


def test_matmul_symbolic_batch_and_flops(rng):
    g = graphc.Graph()
    x = g.input("x", (None, 3, 4))
    y = graphc.ops.matmul(x, np.ones((4, 2), np.float32))
    g.output(y)
    assert y.shape == ("N", 3, 2)
    a = rng.standard_normal((5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(graphc.interpret(g, {"x": a})[0],
                               np.repeat(a.sum(-1, keepdims=True), 2, -1), rtol=1e-5)
    g2 = graphc.Graph()
    z = graphc.ops.matmul(g2.input("x", (2, 3, 4)), np.ones((4, 5), np.float32))
    assert _flops(z) == 2 * 2 * 3 * 5 * 4
    v = graphc.ops.matmul(g2.input("v", (4,)), np.ones((4,), np.float32))
    assert v.shape == () and _flops(v) == 8


@pytest.mark.parametrize("a_shape,b_shape,match", [
    ((3, 4), (5, 6), "inner dims"), ((4,), (3,), "inner dims"),
    ((2, 3, 4), (3, 4, 5), "do not broadcast"), ((), (3,), "rank"),
], ids=str)
def test_matmul_shape_errors_name_the_node(a_shape, b_shape, match):
    g = graphc.Graph()
    a = g.input("a", a_shape)
    with pytest.raises(graphc.GraphcError, match=f"mm3.*{match}"):
        graphc.ops.matmul(a, np.zeros(b_shape, np.float32), name="mm3")


def test_matmul_operator_and_kinds():
    g = graphc.Graph()
    x = g.input("x", (2, 3))
    y = x @ np.ones((3, 4), np.float32)
    assert y.shape == (2, 4) and g.producer(y.name).op == "MatMul"
    assert registry.get("MatMul").kind == registry.get("Gemm").kind == "out-fusable"
