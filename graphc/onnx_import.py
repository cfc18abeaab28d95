"""ONNX import: a ``ModelProto`` (or file) -> a verified graphc ``Graph``.

* opsets 7-21 of the default domain (later opsets are accepted where graphc's op has the same
  attributes; older ones go through ``onnx.version_converter``); older forms of an op are
  rewritten to the newest by the op's own ``onnx_import`` rule in the registry;
* initializers become ``Constant`` nodes (also when IR < 4 lists them among the inputs);
* nodes whose inputs are all constants are folded when their result is small or integer-typed,
  and ``Shape`` of a statically shaped value folds to its shape -- so that shape-computing
  subgraphs (Shape -> Gather -> Unsqueeze -> Concat -> Reshape) become static shapes. Large float
  results (e.g. ConstantOfShape weights) stay as nodes; ``fold-constants`` may fold them later.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import GraphcError, ModelFileError, ShapeError, UnsupportedOpError
from .interp import run_node
from .ir import CONSTANT_OPS, Graph
from .ops import registry
from .types import TensorType, dtype_name
from .verify import verify

MIN_OPSET = 7
MAX_TESTED_OPSET = 21
FOLD_LIMIT = 4096  # fold float results up to this many elements (integer results always fold)


def import_onnx(model: str | os.PathLike | bytes | onnx.ModelProto,
                input_shapes: dict | None = None, input_values: dict | None = None) -> Graph:
    """Import ``model`` as a verified graph.

    ``input_shapes`` (name -> shape) overrides declared input shapes, e.g. to make a symbolic
    batch static so that shape subgraphs fold. ``input_values`` (name -> array) binds inputs to
    constants, specialising the model (e.g. a Reshape whose target shape is a graph input).
    """
    proto, source = load_model(model)
    opset = _default_opset(proto, source)
    if opset < MIN_OPSET:
        proto, opset = _upgrade(proto, source, opset)
    return _GraphImporter(proto, opset, source, input_shapes or {}, input_values or {}).run()


# -- loading --------------------------------------------------------------------------------------
def load_model(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, f"model '{model.graph.name or '<unnamed>'}'"
    if isinstance(model, (bytes, bytearray, memoryview)):
        return _parse_bytes(bytes(model)), "model bytes"
    if not isinstance(model, (str, os.PathLike)):
        raise ModelFileError(f"import_onnx takes a path, bytes or an onnx.ModelProto, got "
                             f"{type(model).__name__}")
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file '{path}' does not exist")
    if os.path.getsize(path) == 0:
        raise ModelFileError(f"model file '{path}' is empty")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"'{path}' is not a valid ONNX model (truncated or another format?):"
                             f" {exc}") from None
    if proto.ir_version == 0 or not proto.HasField("graph") or not proto.graph.output:
        raise ModelFileError(f"'{path}' is not an ONNX model (no IR version or no graph outputs;"
                             f" truncated or another format?)")
    _load_external_data(proto, path)
    return proto, f"'{path}'"


def _parse_bytes(data: bytes) -> onnx.ModelProto:
    """A serialised model held in memory (e.g. from ``torch.onnx.export`` into a BytesIO)."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"model bytes are not a valid ONNX model: {exc}") from None
    if proto.ir_version == 0 or not proto.HasField("graph") or not proto.graph.output:
        raise ModelFileError("model bytes are not an ONNX model (no IR version or no graph "
                             "outputs)")
    return proto


def _load_external_data(proto: onnx.ModelProto, path: str) -> None:
    from onnx.external_data_helper import (
        _get_all_tensors,
        load_external_data_for_tensor,
        uses_external_data,
    )

    base = os.path.dirname(os.path.abspath(path))
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = os.path.join(base, info.get("location", ""))
        if not os.path.isfile(location):
            raise ModelFileError(f"'{path}': external data file '{location}' of tensor "
                                 f"'{tensor.name}' is missing")
        try:
            load_external_data_for_tensor(tensor, base)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"'{path}': cannot read external data '{location}' of tensor "
                                 f"'{tensor.name}': {exc}") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _default_opset(proto: onnx.ModelProto, source: str) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    if not proto.opset_import:  # IR v2 models without opset_import mean opset 1
        return 1
    raise UnsupportedOpError(f"{source} imports no default-domain opset "
                             f"(domains: {[e.domain for e in proto.opset_import]})")


def _upgrade(proto, source, opset):
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # noqa: BLE001 -- the converter raises bare errors of many kinds
        raise UnsupportedOpError(f"{source} uses opset {opset}; graphc supports opsets "
                                 f"{MIN_OPSET}-{MAX_TESTED_OPSET} and the ONNX version converter"
                                 f" could not upgrade it: {exc}") from None
    return proto, MIN_OPSET


# -- the graph ------------------------------------------------------------------------------------
def onnx_type(value_info, source: str, override=None) -> TensorType:
    """TensorType of an ONNX ValueInfo; unnamed unknown dims get a symbol per input and axis."""
    ttype = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or not ttype.HasField("elem_type"):
        raise UnsupportedOpError(f"{source}: input '{value_info.name}' is not a tensor")
    try:
        dtype = dtype_name(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
    except (GraphcError, KeyError, TypeError, ValueError):
        name = onnx.TensorProto.DataType.Name(ttype.elem_type)
        raise UnsupportedOpError(f"{source}: input '{value_info.name}' has element type {name}, "
                                 f"which graphc does not support") from None
    if override is not None:
        return TensorType(tuple(override), dtype)
    if not ttype.HasField("shape"):
        raise ShapeError(f"{source}: input '{value_info.name}' has no shape; pass input_shapes="
                         f"{{'{value_info.name}': (...)}}")
    dims = []
    for axis, d in enumerate(ttype.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"{value_info.name}_d{axis}")
    return TensorType(tuple(dims), dtype)


def attribute_value(attr: onnx.AttributeProto, where: str):
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise UnsupportedOpError(f"{where}: attribute '{attr.name}' holds a subgraph; control flow "
                                 f"is not supported")
    if attr.type == onnx.AttributeProto.TENSOR:
        return _tensor_array(attr.t, where)
    if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        raise UnsupportedOpError(f"{where}: sparse tensor attribute '{attr.name}' is not supported")
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return tuple(v.decode() if isinstance(v, bytes) else v for v in value)
    return value


def _tensor_array(tensor: onnx.TensorProto, where: str) -> np.ndarray:
    try:
        array = numpy_helper.to_array(tensor)
        dtype_name(array.dtype)
    except (GraphcError, ValueError, TypeError, KeyError) as exc:
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        raise UnsupportedOpError(f"{where}: tensor '{tensor.name}' of type {name} is not "
                                 f"supported ({exc})") from None
    return np.array(array)  # own, writable copy


class _GraphImporter:
    def __init__(self, proto: onnx.ModelProto, opset: int, source: str, input_shapes: dict,
                 input_values: dict):
        self.proto, self.opset, self.source = proto, opset, source
        self.input_shapes = dict(input_shapes)
        self.input_values = dict(input_values)
        self.graph = Graph(proto.graph.name or "main")
        self.names: dict[str, str] = {}  # ONNX value name -> graphc value name

    def run(self) -> Graph:
        g = self.proto.graph
        for tensor in g.initializer:
            self._bind(tensor.name, self.graph.add_constant(
                _tensor_array(tensor, self.source), self.graph.fresh_name(tensor.name)))
        for vi in g.input:
            if vi.name not in self.names:
                self._import_input(vi)
        unused = (("input_shapes", self.input_shapes), ("input_values", self.input_values))
        for what, left in unused:
            if left:
                raise ShapeError(f"{self.source}: {what} names unknown input '{min(left)}' "
                                 f"(inputs: {[vi.name for vi in g.input]})")
        for node in _sorted_nodes(g, self.source):
            self._import_node(node)
        outputs = []
        for vi in g.output:
            if vi.name not in self.names:
                raise ShapeError(f"{self.source}: graph output '{vi.name}' is produced by no node")
            outputs.append(self._output_value(vi))
        self.graph.set_outputs(outputs)
        self._drop_unused_constants()
        return verify(self.graph)

    def _import_input(self, vi) -> None:
        ttype = onnx_type(vi, self.source, self.input_shapes.pop(vi.name, None))
        if vi.name in self.input_values:
            array = np.asarray(self.input_values.pop(vi.name))
            if not ttype.matches(array):
                raise ShapeError(f"{self.source}: input_values['{vi.name}'] is "
                                 f"{TensorType.of(array)}, the input is declared {ttype}")
            self._bind(vi.name, self.graph.add_constant(array, self.graph.fresh_name(vi.name)))
        else:
            self._bind(vi.name, self.graph.add_input(self.graph.fresh_name(vi.name), ttype))

    def _drop_unused_constants(self) -> None:
        """Folding leaves the constants it consumed behind; unused weights are dropped too."""
        g = self.graph
        for node in g.nodes():
            if node.op in CONSTANT_OPS and not g.uses(node.output):
                g.remove_node(node.name)

    def _bind(self, onnx_name: str, value: str) -> None:
        self.names[onnx_name] = value

    def _value(self, onnx_name: str, where: str) -> str | None:
        if onnx_name == "":
            return None
        try:
            return self.names[onnx_name]
        except KeyError:
            raise ShapeError(f"{where}: input '{onnx_name}' is not produced by any earlier node, "
                             f"initializer or graph input") from None

    def _output_value(self, vi) -> str:
        value = self.names[vi.name]
        declared = vi.type.tensor_type
        got = self.graph.type_of(value)
        if declared.HasField("shape") and len(declared.shape.dim) != got.rank:
            raise ShapeError(f"{self.source}: graph output '{vi.name}' is declared with rank "
                             f"{len(declared.shape.dim)} but computes {got}")
        for want, have in zip(declared.shape.dim, got.shape):
            if want.HasField("dim_value") and isinstance(have, int) and want.dim_value != have:
                raise ShapeError(f"{self.source}: graph output '{vi.name}' is declared with shape "
                                 f"{[d.dim_value or d.dim_param for d in declared.shape.dim]} but "
                                 f"computes {got}")
        return value

    def _import_node(self, node: onnx.NodeProto) -> None:
        label = node.name or (node.output[0] if node.output else node.op_type)
        where = f"{self.source}: {node.op_type} node '{label}' (opset {self.opset})"
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"{where}: domain '{node.domain}' is not supported")
        if not registry.has(node.op_type) or node.op_type in ("Param",):
            raise UnsupportedOpError(f"{where}: unsupported op '{node.op_type}'")
        opdef = registry.get(node.op_type)
        attrs = {a.name: attribute_value(a, where) for a in node.attribute}
        inputs = [self._value(v, where) for v in node.input]
        outputs = [self.graph.fresh_name(o) if o else None for o in node.output]
        try:
            ctx = registry.ImportContext(self.opset, label, attrs, inputs, outputs,
                                         constant=self._constant, emit=self._emit,
                                         type_of=self.graph.type_of)
            handled = opdef.onnx_import(ctx) if opdef.onnx_import else False
            if not handled:
                while ctx.outputs and ctx.outputs[-1] is None:
                    ctx.outputs.pop()
                self._emit(node.op_type, ctx.inputs, ctx.attrs, ctx.outputs)
        except GraphcError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        for o_onnx, o in zip(node.output, outputs):
            if o_onnx:
                self._bind(o_onnx, o)

    def _constant(self, array: np.ndarray) -> str:
        return self.graph.add_constant(np.asarray(array), self.graph.fresh_name("const"))

    def _emit(self, op: str, inputs, attrs, outputs=None) -> list:
        """Add a node, folding it to constants when its value is known at import time."""
        if outputs is None:
            outputs = [self.graph.fresh_name(op.lower())]
        outputs = list(outputs)
        result = self.graph.add_node(op, inputs, attrs, outputs=outputs)
        self._fold(self.graph.node(next(o for o in result if o is not None)))
        return list(result)

    def _fold(self, node) -> None:
        g = self.graph
        if node.op in CONSTANT_OPS:
            return
        if node.op == "Shape" and g.type_of(node.inputs[0]).is_static:
            t = g.type_of(node.inputs[0])
            arrays = [np.broadcast_to(np.zeros((), t.np_dtype), t.shape)]
        elif node.inputs and all(v is None or g.constant_value(v) is not None
                                 for v in node.inputs):
            arrays = [g.constant_value(v) for v in node.inputs]
        else:
            return
        if not all(t is None or not t.is_static or t.numel <= FOLD_LIMIT
                   or t.dtype in ("i64", "i32", "bool") for t in node.types):
            return
        if any(t is not None and not t.is_static for t in node.types):
            return
        results = run_node(g, node, arrays)
        g.remove_node(node.name)
        for value, array in zip(node.outputs, results):
            if value is not None:
                g.add_node("Constant", (), {"value": np.array(array)}, outputs=(value,))


def _sorted_nodes(g: onnx.GraphProto, source: str) -> list:
    """The nodes in a topological order (ONNX requires one, but not every exporter obeys)."""
    available = {t.name for t in g.initializer} | {vi.name for vi in g.input} | {""}
    pending, ordered = list(g.node), []
    while pending:
        deferred = []
        for n in pending:  # one sweep when the file is already sorted
            if all(v in available for v in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                deferred.append(n)
        if len(deferred) == len(pending):
            n = deferred[0]
            missing = [v for v in n.input if v not in available]
            raise ShapeError(f"{source}: {n.op_type} node '{n.name or n.output[0]}' reads "
                             f"'{missing[0]}', which no node, initializer or input produces "
                             f"(or the graph has a cycle)")
        pending = deferred
    return ordered
