"""Every error a user can cause is a GraphcError subclass whose message names the culprit."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphc
from graphc.errors import (
    FeedError,
    InvalidAttributeError,
    ModelFileError,
    ShapeError,
    UnsupportedOpError,
    VerificationError,
)


def _model(nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _relu_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu1")], [x], [y])


def test_unsupported_op_names_op_node_and_opset():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = _model([helper.make_node("Hardmax", ["x"], ["y"], name="hm7")], [x], [y], opset=13)
    with pytest.raises(UnsupportedOpError) as err:
        graphc.import_onnx(model)
    assert "Hardmax" in str(err.value) and "hm7" in str(err.value) and "13" in str(err.value)


def test_custom_domain_is_rejected_with_its_name():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Relu", ["x"], ["y"], name="r", domain="com.example")
    model = _model([node], [x], [y])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError, match="com.example"):
        graphc.import_onnx(model)


@pytest.mark.parametrize("content,what", [(b"", "empty"), (b"hello, not a model" * 10, "not"),
                                          (None, "truncated")])
def test_bad_files_are_named(tmp_path, content, what):
    path = tmp_path / "model.onnx"
    if content is None:
        content = _relu_model().SerializeToString()[:-7]
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as err:
        graphc.import_onnx(str(path))
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ModelFileError, match="nope.onnx"):
        graphc.import_onnx(str(tmp_path / "nope.onnx"))


def test_missing_external_data_is_named(tmp_path):
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y], [w])
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert graphc.import_onnx(str(path)).parameter_count() == 64 * 64
    os.remove(tmp_path / "weights.bin")
    with pytest.raises(ModelFileError, match="weights.bin"):
        graphc.import_onnx(str(path))


def test_shape_mismatch_inside_model_names_the_node():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model([helper.make_node("Add", ["a", "b"], ["y"], name="bad_add")], [a, b], [y])
    with pytest.raises(ShapeError, match="bad_add"):
        graphc.import_onnx(model)


def test_unknown_attribute_names_node_and_attribute():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Relu", ["x"], ["y"], name="r1", bogus=3)
    with pytest.raises(InvalidAttributeError, match="r1.*bogus"):
        graphc.import_onnx(_model([node], [x], [y]))


@pytest.fixture
def relu_graph():
    return graphc.import_onnx(_relu_model())


def test_missing_feed_names_input_and_type(relu_graph):
    with pytest.raises(FeedError, match=r"x.*f32\[N,4\]"):
        graphc.interpret(relu_graph, {})


def test_unknown_feed_is_named(relu_graph):
    with pytest.raises(FeedError, match="'z'"):
        graphc.interpret(relu_graph, {"x": np.zeros((1, 4), np.float32), "z": np.zeros(1)})


@pytest.mark.parametrize("array,problem", [
    (np.zeros((2, 4), np.float64), "dtype"),
    (np.zeros((2, 4, 1), np.float32), "rank"),
    (np.zeros((2, 5), np.float32), "shape"),
])
def test_wrong_feed_names_input_and_expected_type(relu_graph, array, problem):
    with pytest.raises(FeedError) as err:
        graphc.interpret(relu_graph, {"x": array})
    message = str(err.value)
    assert "'x'" in message and "f32[N,4]" in message and problem in message


def test_symbolic_dims_must_agree_across_feeds():
    g = graphc.Graph()
    a, b = g.input("a", (None, 3)), g.input("b", (None, 3))
    g.output(graphc.ops.add(a, b))
    with pytest.raises(FeedError, match="'b'"):
        graphc.interpret(g, {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)})


def test_nan_inputs_propagate(relu_graph):
    x = np.array([[np.nan, 1.0, -1.0, np.inf]], np.float32)
    (y,) = graphc.interpret(relu_graph, {"x": x})
    assert np.isnan(y[0, 0]) and y[0, 1] == 1 and y[0, 2] == 0 and y[0, 3] == np.inf


def test_verifier_names_node_with_stale_type():
    g = graphc.Graph()
    x = g.input("x", (2, 3))
    y = graphc.ops.relu(x)
    g.output(y)
    g.replace_node(y.name, types=(graphc.TensorType((2, 4)),))
    with pytest.raises(VerificationError, match=y.name):
        graphc.verify(g)


def test_verifier_reports_a_cycle():
    g = graphc.Graph()
    x = g.input("x", (2,))
    a = graphc.ops.relu(x)
    b = graphc.ops.neg(a)
    g.output(b)
    g.replace_node(a.name, inputs=(b.name,))
    with pytest.raises(VerificationError, match="cycle"):
        graphc.verify(g)


def test_builder_rejects_values_of_another_graph():
    g1, g2 = graphc.Graph("one"), graphc.Graph("two")
    x, y = g1.input("x", (2,)), g2.input("y", (2,))
    with pytest.raises(graphc.GraphcError, match="another graph"):
        graphc.ops.add(x, y)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=1, max_value=10_000), flip=st.integers(0, 255),
       where=st.integers(0, 10_000))
def test_corrupted_model_bytes_never_crash(tmp_path_factory, cut, flip, where):
    """Truncated or bit-flipped files import or raise a GraphcError -- nothing else."""
    data = bytearray(_conv_model().SerializeToString())
    data = data[: max(1, len(data) - cut % len(data))]
    data[where % len(data)] ^= flip
    path = tmp_path_factory.mktemp("fuzz") / "m.onnx"
    path.write_bytes(bytes(data))
    try:
        graph = graphc.import_onnx(str(path))
    except graphc.GraphcError:
        return
    feeds = {v: np.ones([d if isinstance(d, int) else 1 for d in graph.type_of(v).shape],
                        graph.type_of(v).np_dtype) for v in graph.inputs}
    try:
        graphc.interpret(graph, feeds)
    except graphc.GraphcError:
        pass


def _conv_model():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [x], [y], [w, b])
