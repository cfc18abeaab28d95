"""graphc: a compiler-style graph library for neural networks.

Public API: ``Graph``, ``interpret``, ``import_onnx``, ``export_onnx``, ``GraphcError``, ``ops``
(the builder), ``verify``, ``TensorType``, ``compile``; ``grad`` (autodiff), ``nn``, ``optim`` and
``kfold`` (training) load on first use.
"""

from __future__ import annotations

from . import ops
from .compile import CompiledModel, compile
from .errors import GraphcError
from .interp import interpret
from .ir import Graph, Node, Value
from .types import TensorType
from .verify import verify

__version__ = "0.1.0"


def import_onnx(model, input_shapes=None, input_values=None) -> Graph:
    """Import an ONNX model (a path, serialised bytes or a ``ModelProto``) as a verified
    graphc ``Graph``.

    ``input_shapes`` (name -> shape) fixes symbolic input dims; ``input_values`` (name -> array)
    binds inputs to constants (see ``graphc.onnx_import.import_onnx``).
    """
    from .onnx_import import import_onnx as _import

    return _import(model, input_shapes=input_shapes, input_values=input_values)


def export_onnx(graph: Graph, path=None, opset: int | None = None):
    """Write ``graph`` as an ONNX model to ``path`` (if given); returns the ``ModelProto``."""
    from .onnx_export import export_onnx as _export

    return _export(graph, path, opset=opset)


_LAZY = {"grad": ("autodiff", "grad"), "kfold": ("training", "kfold"),
         "nn": ("nn", None), "optim": ("optim", None)}


def __getattr__(name: str):
    """``graphc.grad``, ``graphc.kfold``, ``graphc.nn`` and ``graphc.optim`` import on first use,
    so that ``import graphc`` stays light."""
    if name not in _LAZY:
        raise AttributeError(f"module 'graphc' has no attribute '{name}'")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    return module if attr is None else getattr(module, attr)


__all__ = [
    "CompiledModel",
    "Graph",
    "GraphcError",
    "Node",
    "TensorType",
    "Value",
    "compile",
    "export_onnx",
    "grad",
    "import_onnx",
    "interpret",
    "kfold",
    "nn",
    "ops",
    "optim",
    "verify",
]
