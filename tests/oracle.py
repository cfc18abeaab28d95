"""Oracles shared by the op tests: one-node ONNX models run in ONNX Runtime, and the same op run
through graphc.

Both sides use the same conventions, so one list of arrays drives both: input ``i`` is named
``in{i}``, ``None`` is an absent optional input, and the positions in ``consts`` are constants
(ONNX initializers, graphc Constants) rather than fed inputs. Every runner returns the list of
the node's outputs.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

import graphc
from graphc.types import TensorType

OPSET = 21  # the default: the newest opset graphc is tested against


# -- ONNX Runtime -------------------------------------------------------------------------------
def one_node_model(op, inputs, attrs=None, *, opset=OPSET, n_outputs=1, consts=(),
                   output_names=None, name="node"):
    """A model of one ``op`` node; outputs are ``out{i}`` (``output_names``: '' = not asked for).

    Output types are left for ONNX Runtime and the importer to infer.
    """
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    while names and not names[-1]:
        names.pop()
    outputs = output_names or [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op, names, outputs, name=name, **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [_value_info(f"in{i}", a) for i, a in _present(inputs) if i not in consts],
        [helper.make_empty_tensor_value_info(o) for o in outputs if o],
        [numpy_helper.from_array(np.asarray(a), f"in{i}")
         for i, a in _present(inputs) if i in consts])
    # IR 10 came with opset 21; IR 9 reads every older opset
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=10 if opset >= 21 else 9)


def feeds_for(inputs, consts=()):
    """``in{i}`` -> array for the inputs that are fed, i.e. present and not constants."""
    return {f"in{i}": np.asarray(a) for i, a in _present(inputs) if i not in consts}


def run_onnxruntime(model, feeds):
    """Every output of ``model`` run by ONNX Runtime on the CPU."""
    # imported here so that test modules which skip without onnxruntime can import this one
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_ort(op, inputs, attrs=None, *, consts=(), **model_options):
    """Every output of one ``op`` node run by ONNX Runtime (options: ``one_node_model``'s)."""
    model = one_node_model(op, inputs, attrs, consts=consts, **model_options)
    return run_onnxruntime(model, feeds_for(inputs, consts))


# -- graphc -------------------------------------------------------------------------------------
def one_node_graph(op, inputs, attrs=None, *, consts=(), n_outputs=None, name="node",
                   symbolic=()):
    """A verified graphc graph of one ``op`` node whose results are the graph's outputs.

    ``n_outputs=None`` asks for the op's required results; inputs at the positions in
    ``symbolic`` have their first dim declared as the symbolic batch ``N``.
    """
    g = graphc.Graph()
    operands = []
    for i, a in enumerate(inputs):
        if a is None:
            operands.append(None)
        elif i in consts:
            operands.append(g.add_constant(np.asarray(a)))  # keeps the dtype
        else:
            a = np.asarray(a)
            shape = (None,) + a.shape[1:] if i in symbolic else a.shape
            operands.append(g.input(f"in{i}", shape, TensorType.of(a).dtype).name)
    outputs = None if n_outputs is None else [f"out{i}" for i in range(n_outputs)]
    g.set_outputs(g.add_node(op, operands, attrs or {}, outputs=outputs, name=name))
    return graphc.verify(g)


def run_graphc(op, inputs, attrs=None, *, consts=(), **graph_options):
    """Every output of one ``op`` node interpreted by graphc (options: ``one_node_graph``'s)."""
    g = one_node_graph(op, inputs, attrs, consts=consts, **graph_options)
    return graphc.interpret(g, feeds_for(inputs, consts))


def import_and_run(model, feeds):
    """Every output of ``model`` imported by graphc (its import rules) and interpreted."""
    return graphc.interpret(graphc.import_onnx(model), feeds)


# -- helpers ------------------------------------------------------------------------------------
def _present(inputs):
    return [(i, a) for i, a in enumerate(inputs) if a is not None]


def _value_info(name, array):
    array = np.asarray(array)
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    return helper.make_tensor_value_info(name, elem, array.shape)
