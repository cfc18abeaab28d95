"""The nine "light" real architectures shipped with onnx: import, verify, run, compare.

Their weights are ConstantOfShape constants, so (1) every stored output is checked as shipped,
and (2) each model is run again with random weights of the same shapes against ONNX Runtime,
which a model with constant weights could pass by accident.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphc

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = sorted(f[: -len(".onnx")] for f in os.listdir(LIGHT_DIR) if f.endswith(".onnx"))


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(os.path.join(LIGHT_DIR, name + ".onnx"))


def _stored_output(name: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    with open(os.path.join(LIGHT_DIR, name + "_output_0.pb"), "rb") as f:
        tensor.ParseFromString(f.read())
    return numpy_helper.to_array(tensor)


def _random_feeds(graph: graphc.Graph, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {v: rng.standard_normal(graph.type_of(v).shape).astype(np.float32)
            for v in graph.inputs}


def test_all_nine_light_models_are_present():
    assert len(MODELS) == 9, MODELS


@pytest.mark.parametrize("name", MODELS)
def test_light_model_matches_stored_output(name):
    graph = graphc.import_onnx(os.path.join(LIGHT_DIR, name + ".onnx"))
    graphc.verify(graph)
    (got,) = graphc.interpret(graph, _random_feeds(graph))
    want = _stored_output(name)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def with_random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace each ConstantOfShape weight by a random initializer of the same shape.

    1-D tensors (biases, BatchNorm scale/shift/mean/variance) are drawn from [0.5, 1.5] so that
    variances stay positive; weights are uniform with variance 1/fan_in (He-like) so that
    activations stay in range through 50+ layers.
    """
    rng = np.random.default_rng(seed)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept, new_inits = [], []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[node.input[0]])
            if len(shape) == 1:
                value = rng.uniform(0.5, 1.5, shape)
            else:
                fan_in = int(np.prod(shape[1:]))
                value = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / fan_in)
            new_inits.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(new_inits)
    used = {v for n in kept for v in n.input}
    for init in list(model.graph.initializer):
        if init.name.endswith("__SHAPE") and init.name not in used:
            model.graph.initializer.remove(init)
    for vi in list(model.graph.input):
        if vi.name.endswith("__SHAPE") and vi.name not in used:
            model.graph.input.remove(vi)
    return model


def assert_matches_onnxruntime(name: str, compile_model, rtol: float) -> None:
    """Model ``name`` with random weights: ``compile_model(graph)`` (a function of feeds ->
    outputs) against ONNX Runtime on the same weights and inputs."""
    ort = pytest.importorskip("onnxruntime")
    model = with_random_weights(_load(name))
    graph = graphc.import_onnx(model)
    feeds = _random_feeds(graph, seed=1)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    got = compile_model(graph)(feeds)
    for g, w in zip(got, want, strict=True):
        assert np.ptp(w) > 0, "random weights must make the output vary (else it tests little)"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_light_model_with_random_weights_matches_onnxruntime(name):
    assert_matches_onnxruntime(name, lambda graph: lambda feeds: graphc.interpret(graph, feeds),
                               rtol=2e-3)
