"""Export round trip: graphs built with the builder -> ONNX -> ONNX Runtime, vs the interpreter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings

import graphc
from graphc import ops

from .oracle import run_onnxruntime
from .test_ir import random_graph

pytest.importorskip("onnxruntime")


def _cnn(batch=None, seed=0):
    rng = np.random.default_rng(seed)
    g = graphc.Graph("cnn")
    x = g.input("x", (batch, 3, 11, 11))
    h = ops.relu(ops.conv(x, rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8),
                          pads=[1, 1, 1, 1]))
    h = ops.batch_normalization(h, rng.uniform(0.5, 1.5, 8), rng.standard_normal(8),
                                rng.standard_normal(8), rng.uniform(0.5, 1.5, 8))
    h = ops.max_pool(h, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    h = ops.conv(h, rng.standard_normal((8, 4, 3, 3)), None, group=2, strides=[2, 2],
                 pads=[0, 1, 0, 1])
    h = ops.global_average_pool(ops.leaky_relu(h, alpha=0.1))
    h = ops.flatten(h, axis=1)
    y = ops.log_softmax(ops.gemm(h, rng.standard_normal((10, 8)), rng.standard_normal(10),
                                 transB=1), axis=1)
    g.output(y, h)
    return g


@pytest.mark.parametrize("batch", [1, 4])
def test_exported_cnn_runs_in_onnxruntime_with_same_results(tmp_path, batch):
    g = _cnn()
    path = tmp_path / "cnn.onnx"
    model = graphc.export_onnx(g, path)
    onnx.checker.check_model(onnx.load(str(path)))
    x = np.random.default_rng(batch).standard_normal((batch, 3, 11, 11)).astype(np.float32)
    want = graphc.interpret(g, {"x": x})
    got = run_onnxruntime(model, {"x": x})
    for w, o in zip(want, got):
        np.testing.assert_allclose(o, w, rtol=1e-4, atol=1e-5)


def test_export_keeps_symbolic_batch_and_reimports_identically():
    g = _cnn()
    model = graphc.export_onnx(g)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    back = graphc.import_onnx(model)
    assert back.type_of(back.outputs[0]) == g.type_of(g.outputs[0])
    x = np.random.default_rng(0).standard_normal((2, 3, 11, 11)).astype(np.float32)
    for a, b in zip(graphc.interpret(back, {"x": x}), graphc.interpret(g, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_output_that_is_an_input_or_constant_is_exported():
    g = graphc.Graph("passthrough")
    x = g.input("x", (2,))
    c = g.constant(np.array([1.0, 2.0], np.float32))
    g.output(x, c, ops.add(x, c))
    model = graphc.export_onnx(g)
    x_val = np.array([3.0, 4.0], np.float32)
    for w, o in zip(graphc.interpret(g, {"x": x_val}), run_onnxruntime(model, {"x": x_val})):
        np.testing.assert_array_equal(o, w)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=random_graph())
def test_random_graphs_export_to_onnxruntime(g):
    model = graphc.export_onnx(g)
    t = g.type_of("x")
    x = np.random.default_rng(0).standard_normal(
        [2 if isinstance(d, str) else d for d in t.shape]).astype(np.float32)
    np.testing.assert_allclose(run_onnxruntime(model, {"x": x})[0],
                               graphc.interpret(g, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_graphc_only_ops_are_refused_by_name():
    g = _cnn(batch=2)
    fused = graphc.compile(g, conv="winograd-f2").graph
    node = next(n for n in fused if n.op not in ("Input", "Constant") and not onnx.defs.has(n.op))
    assert node.op.startswith("Winograd")
    with pytest.raises(graphc.GraphcError, match=f"{node.op} node '{node.name}' has no ONNX"):
        graphc.export_onnx(fused)
