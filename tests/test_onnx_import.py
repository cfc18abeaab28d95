"""ONNX import specifics: shape-subgraph folding, symbolic batch, opset upgrades, odd files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphc
from graphc import ops
from graphc.errors import ShapeError

from .oracle import run_onnxruntime

pytest.importorskip("onnxruntime")


def _flatten_by_shape_model(batch, opset=13):
    """x -> Shape -> Gather(0) -> Unsqueeze -> Concat([n, -1]) -> Reshape: how exporters
    flatten a feature map while keeping the batch dynamic."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 36])
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0")]
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "target"], ["y"], name="flatten_reshape"),
    ]
    graph = helper.make_graph(nodes, "flat", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_shape_subgraph_folds_to_a_static_reshape():
    model = _flatten_by_shape_model(2)
    g = graphc.import_onnx(model)
    assert set(g.op_histogram()) == {"Input", "Relu", "Constant", "Reshape"}
    reshape = next(n for n in g if n.op == "Reshape")
    np.testing.assert_array_equal(g.constant_value(reshape.inputs[1]), [2, -1])
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(graphc.interpret(g, {"x": x})[0],
                                  run_onnxruntime(model, {"x": x})[0])


def test_symbolic_batch_needs_input_shapes_and_says_so():
    model = _flatten_by_shape_model("batch")
    with pytest.raises(ShapeError, match="flatten_reshape.*input_shapes"):
        graphc.import_onnx(model)
    g = graphc.import_onnx(model, input_shapes={"x": (3, 4, 3, 3)})
    assert g.type_of(g.outputs[0]) == graphc.TensorType((3, 36))


def test_symbolic_batch_passes_through_static_reshapes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 36])
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x],
                              [y], [shape])
    g = graphc.import_onnx(helper.make_model(graph))
    assert g.type_of(g.outputs[0]) == graphc.TensorType(("batch", 36))
    for n in (1, 5):
        x_val = np.ones((n, 4, 3, 3), np.float32)
        assert graphc.interpret(g, {"x": x_val})[0].shape == (n, 36)


def test_old_opset_is_upgraded_by_the_version_converter():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "old", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 3
    g = graphc.import_onnx(model)
    x_val = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    np.testing.assert_array_equal(graphc.interpret(g, {"x": x_val})[0], -np.maximum(x_val, 0))


def test_initializers_listed_as_inputs_are_constants_and_unsorted_nodes_are_ordered():
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    nodes = [helper.make_node("Relu", ["m"], ["y"]),           # consumer listed first
             helper.make_node("MatMul", ["x", "w"], ["m"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, w_info], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 9)])
    g = graphc.import_onnx(model)
    assert g.inputs == ["x"] and g.constant_value("w") is not None
    x_val = np.array([[1, -1, 2]], np.float32)
    np.testing.assert_array_equal(graphc.interpret(g, {"x": x_val})[0],
                                  np.maximum(x_val @ numpy_helper.to_array(w), 0))


def test_declared_output_shape_is_checked():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [x], [y]))
    with pytest.raises(ShapeError, match="'y'"):
        graphc.import_onnx(model)


def test_input_values_bind_and_check_their_type():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])],
                                                "g", [x, s], [y]))
    g = graphc.import_onnx(model, input_values={"s": np.array([3, 4], np.int64)})
    assert g.inputs == ["x"] and g.type_of(g.outputs[0]) == graphc.TensorType((3, 4))
    with pytest.raises(ShapeError, match="input_values\\['s'\\]"):
        graphc.import_onnx(model, input_values={"s": np.array([3, 4], np.int32)})
    with pytest.raises(ShapeError, match="unknown input 'q'"):
        graphc.import_onnx(model, input_values={"q": np.zeros(1)})


def test_import_of_a_saved_file_equals_import_of_the_proto(tmp_path):
    model = _flatten_by_shape_model(2)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert str(graphc.import_onnx(str(path))) == str(graphc.import_onnx(model))


def test_import_from_serialised_bytes_matches_import_from_a_file(tmp_path):
    g = graphc.Graph("tiny")
    x = g.input("x", (2, 3))
    g.output(ops.relu(x * np.float32(2.0)))
    path = tmp_path / "tiny.onnx"
    graphc.export_onnx(g, path)
    from_bytes = graphc.import_onnx(path.read_bytes())
    assert str(from_bytes) == str(graphc.import_onnx(path))
    with pytest.raises(graphc.GraphcError, match="model bytes"):
        graphc.import_onnx(b"\x08\x07 not a model")
