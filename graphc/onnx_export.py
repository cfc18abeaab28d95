"""ONNX export: a graphc ``Graph`` -> an ``onnx.ModelProto`` that ``onnx.checker`` accepts.

Constants and Params become initializers, inputs keep their symbolic dims as ``dim_param``, and
every other node maps 1:1 to an ONNX node of the default domain at ``DEFAULT_OPSET`` (graphc ops
follow the newest ONNX semantics up to that opset). A graph output that is a constant or an input
is routed through an Identity node, since ONNX names each graph output by the node producing it.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UnsupportedOpError
from .ir import CONSTANT_OPS, INPUT, Graph
from .types import TensorType

DEFAULT_OPSET = 21
IR_VERSION = 10  # the IR version of opset 21 (ONNX 1.16); ONNX Runtime 1.17+ reads it


def value_info(name: str, ttype: TensorType) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(ttype.np_dtype)
    return helper.make_tensor_value_info(name, elem, list(ttype.shape))


def _attr(value):
    if isinstance(value, np.ndarray):
        return numpy_helper.from_array(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def export_onnx(graph: Graph, path: os.PathLike | None = None,
                opset: int | None = None) -> onnx.ModelProto:
    opset = opset or DEFAULT_OPSET
    nodes, initializers, inputs, infos = [], [], [], []
    for node in graph.nodes():
        if node.op == INPUT:
            inputs.append(value_info(node.output, node.types[0]))
        elif node.op in CONSTANT_OPS:
            initializers.append(numpy_helper.from_array(node.attrs["value"], node.output))
        elif not onnx.defs.has(node.op):  # graphc-only ops (Winograd*, Fused*, ...)
            raise UnsupportedOpError(f"{node.op} node '{node.name}' has no ONNX equivalent; export "
                                     f"the graph before the passes that introduce it")
        else:
            attrs = {k: _attr(v) for k, v in node.attrs.items()}
            nodes.append(helper.make_node(
                node.op, [v or "" for v in node.inputs], [v or "" for v in node.outputs],
                name=node.name, **attrs))
            infos += [value_info(v, t) for v, t in zip(node.outputs, node.types) if v]
    outputs = []
    for v in graph.outputs:
        seen = graph.outputs[:len(outputs)]
        if graph.producer(v).op in CONSTANT_OPS or v in graph.inputs or v in seen:
            alias = f"{v}__out{len(outputs)}"
            nodes.append(helper.make_node("Identity", [v], [alias], name=alias))
            v_out = alias
        else:
            v_out = v
        outputs.append(value_info(v_out, graph.type_of(v)))
    onnx_graph = helper.make_graph(nodes, graph.name, inputs, outputs, initializers,
                                   value_info=[i for i in infos
                                               if i.name not in {o.name for o in outputs}])
    model = helper.make_model(onnx_graph, producer_name="graphc",
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model
