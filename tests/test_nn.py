"""graphc.nn: layers, initialisation, the inference graph, training-mode forms, save/load and
ONNX export. The interpreter (graphc.interpret) and ONNX Runtime are the oracles."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import nn
from graphc.errors import FeedError, GraphBuildError, GraphcError, ModelFileError, ShapeError
from graphc.ir import Graph

TARGET = "cpu"


def small_cnn(seed=0, dropout=0.0):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.LeakyReLU(0.1), nn.AvgPool2d(2),
        nn.Dropout(dropout), nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3),
        nn.Softmax(), input_shape=(1, 8, 8), seed=seed)


def test_layer_names_shapes_and_params():
    model = small_cnn()
    assert [layer.name for layer in model.layers][:3] == ["conv2d0", "batchnorm2d1", "relu2"]
    assert model.output_shape == (3,)
    params = model.parameters()
    assert params["conv2d0.weight"].shape == (4, 1, 3, 3)
    assert params["linear9.weight"].shape == (6, 5)  # (in, out): y = x @ W + b
    assert set(model.buffers()) == {"batchnorm2d1.running_mean", "batchnorm2d1.running_var"}
    assert model.parameter_count() == sum(a.size for a in params.values())
    assert all(a.dtype == np.float32 for a in model.state_dict().values())


def test_inference_graph_has_params_and_matches_predict():
    model = small_cnn()
    graph = model.build()
    graphc.verify(graph)
    ops_used = graph.op_histogram()
    assert ops_used["Param"] == len(model.parameters())
    assert "Dropout" not in ops_used  # the identity in inference
    frozen = model.build(freeze=True)
    assert "Param" not in frozen.op_histogram()
    rng = np.random.default_rng(1)
    for batch in (1, 7, 300):  # 300 > one evaluation chunk: padding and two chunks
        x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
        (want,) = graphc.interpret(graph, {"x": x})
        got = model.predict(x, target=TARGET)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_seeded_initialisation_is_deterministic():
    a, b, c = small_cnn(seed=3), small_cnn(seed=3), small_cnn(seed=4)
    for name, array in a.parameters().items():
        np.testing.assert_array_equal(array, b.parameters()[name])
    assert not np.array_equal(a.parameters()["conv2d0.weight"],
                              c.parameters()["conv2d0.weight"])


@pytest.mark.parametrize("activation,init", [(nn.ReLU, "he"), (nn.LeakyReLU, "he"),
                                             (nn.Sigmoid, "glorot"), (nn.Tanh, "glorot")])
def test_auto_init_picks_he_before_relu_else_glorot(activation, init):
    fan_in, fan_out = 400, 300
    model = nn.Sequential(nn.Linear(fan_in, fan_out), activation(), input_shape=(fan_in,))
    weight = model.parameters()["linear0.weight"]
    if init == "he":
        expected_std = np.sqrt(2.0 / fan_in)
    else:  # uniform(-a, a) has std a / sqrt(3)
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        expected_std = bound / np.sqrt(3.0)
        assert np.abs(weight).max() <= bound
    assert abs(weight.std() / expected_std - 1) < 0.03
    assert not model.parameters()["linear0.bias"].any()


def test_explicit_init_overrides_auto():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, init="glorot"), nn.ReLU(), input_shape=(8, 5, 5))
    weight = model.parameters()["conv2d0.weight"]
    assert np.abs(weight).max() <= np.sqrt(6.0 / (8 * 9 + 16 * 9))


def _training_forward(model):
    graph = Graph("train_forward")
    x = graph.input("x", (None,) + model.input_shape)
    scope = nn.Scope(graph, training=True, as_inputs=True)
    head = model.forward(x, scope)
    graph.output(head.output, *scope.buffer_updates.values())
    return graph, scope


def test_batchnorm_training_form_matches_batchnormalization_op():
    """The decomposed training BatchNorm2d equals ONNX BatchNormalization(training_mode=1)
    on batch statistics, and its running statistics follow PyTorch's update."""
    rng = np.random.default_rng(2)
    layer = nn.BatchNorm2d(3, momentum=0.2)
    model = nn.Sequential(layer, input_shape=(3, 5, 4))
    layer.params["weight"] = rng.standard_normal(3).astype(np.float32)
    layer.params["bias"] = rng.standard_normal(3).astype(np.float32)
    layer.buffers["running_mean"] = rng.standard_normal(3).astype(np.float32)
    layer.buffers["running_var"] = rng.uniform(0.5, 2, 3).astype(np.float32)
    graph, _ = _training_forward(model)
    for batch in (2, 6):
        x = (rng.standard_normal((batch, 3, 5, 4)) * 3 + 1).astype(np.float32)
        feeds = {"x": x, "batch_size": np.array(batch, np.float32), **model.state_dict()}
        y, new_mean, new_var = graphc.interpret(graph, feeds)
        ref = Graph("bn")
        xi = ref.input("x", x.shape)
        out = graphc.ops.batch_normalization(
            xi, layer.params["weight"], layer.params["bias"], layer.buffers["running_mean"],
            layer.buffers["running_var"], training_mode=1)
        ref.output(out[0] if isinstance(out, tuple) else out)
        (want,) = graphc.interpret(ref, {"x": x})
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
        x64 = x.astype(np.float64)
        batch_var = x64.var(axis=(0, 2, 3), ddof=1)
        np.testing.assert_allclose(
            new_mean, 0.8 * layer.buffers["running_mean"] + 0.2 * x64.mean(axis=(0, 2, 3)),
            rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_var, 0.8 * layer.buffers["running_var"] + 0.2 * batch_var,
                                   rtol=1e-5, atol=1e-6)


def test_dropout_training_multiplies_by_a_fed_mask():
    model = nn.Sequential(nn.Dropout(0.25), input_shape=(50,))
    graph, scope = _training_forward(model)
    assert list(scope.mask_inputs) == ["dropout0.mask"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 50)).astype(np.float32)
    masks = [nn.draw_dropout_mask(rng, 0.25, np.empty((40, 50), np.float32)) for _ in range(2)]
    assert not np.array_equal(masks[0], masks[1])  # a fresh mask per step
    for mask in masks:
        assert set(np.unique(mask)) <= {0.0, np.float32(1 / 0.75)}
        assert abs((mask == 0).mean() - 0.25) < 0.03
        (y,) = graphc.interpret(graph, {"x": x, "dropout0.mask": mask})
        np.testing.assert_allclose(y, x * mask, rtol=1e-6)
    assert graphc.interpret(model.build(), {"x": x})[0] is not None  # identity in inference


def test_save_load_round_trip(tmp_path):
    model = small_cnn(seed=5)
    model.layers[1].buffers["running_mean"] = np.arange(4, dtype=np.float32)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = nn.load(path)
    assert repr(loaded) == repr(model)
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], array)
    x = np.random.default_rng(0).standard_normal((9, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x, target="reference"),
                                  model.predict(x, target="reference"))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ModelFileError, match="missing.npz"):
        nn.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="junk.npz"):
        nn.load(junk)
    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros(2))
    with pytest.raises(ModelFileError, match="__architecture__"):
        nn.load(plain)
    model = nn.Sequential(nn.Linear(3, 2), input_shape=(3,))
    arrays = {"__architecture__": np.array(__import__("json").dumps(model.architecture()))}
    partial = tmp_path / "partial.npz"
    np.savez(partial, **arrays)
    with pytest.raises(ModelFileError, match="linear0.weight"):
        nn.load(partial)


def test_export_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = small_cnn(seed=2)
    rng = np.random.default_rng(3)
    model.layers[1].buffers["running_mean"] = rng.standard_normal(4).astype(np.float32)
    model.layers[1].buffers["running_var"] = rng.uniform(0.5, 2, 4).astype(np.float32)
    path = tmp_path / "cnn.onnx"
    model.export_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
        (want,) = session.run(None, {"x": x})
        np.testing.assert_allclose(model.predict(x, target=TARGET), want, rtol=1e-4, atol=1e-5)


def test_layer_errors_name_the_layer():
    with pytest.raises(ShapeError, match="linear1"):
        nn.Sequential(nn.Flatten(), nn.Linear(10, 2), input_shape=(3, 3))
    with pytest.raises(ShapeError, match="conv2d0"):
        nn.Sequential(nn.Conv2d(3, 4, 3), input_shape=(1, 8, 8))
    with pytest.raises(GraphBuildError, match="item 1"):
        nn.Sequential(nn.ReLU(), "relu")
    with pytest.raises(GraphcError, match="init"):
        nn.Linear(2, 2, init="xavier")
    with pytest.raises(GraphcError, match="Dropout p"):
        nn.Dropout(1.0)
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(GraphcError, match="no input shape"):
        model.build()
    with pytest.raises(FeedError, match="batch dim"):
        model.predict(np.zeros(4, np.float32))
    model.predict(np.zeros((2, 4), np.float32), target="reference")  # takes its shape from X
    with pytest.raises(ShapeError, match=r"\(4,\)"):
        model.predict(np.zeros((2, 5), np.float32))
