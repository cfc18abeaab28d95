"""Ops: the registry (``graphc.ops.registry``), one module per op family, and the builder.

Builder functions are generated from the registry: ``ops.conv(x, w, b, pads=[1, 1, 1, 1])``
adds a ``Conv`` node to the graph of its first ``Value`` operand and returns its result. Numpy
arrays and Python lists among the operands become constants; keyword arguments are attributes
(``name=`` names the node). Ops with several results return a tuple of ``Value``.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import GraphBuildError

# Family modules are named so that no module shadows a builder function (ops.conv, ops.shape).
# fused, fused_expression, lowered_conv and winograd: the graphc-only ops passes introduce.
from . import (  # noqa: F401
    constants,
    convolution,
    elementwise,
    fused,
    fused_expression,
    gradients,
    linalg,
    lowered_conv,
    normalization,
    pool,
    reduce,
    registry,
    shapes,
    winograd,
)

_ALIASES = {"matmul": "MatMul", "prelu": "PRelu", "lrn": "LRN", "im2col": "Im2Col"}


def snake_name(op: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", op).lower()


def _builder_names() -> dict[str, str]:
    names = {snake_name(op): op for op in registry.all_ops()}
    names.update(_ALIASES)
    return names


def apply(op: str, operands, name: str | None = None, **attrs):
    """Add ``op`` applied to ``operands`` to the graph of the first ``Value`` among them."""
    from ..ir import Value

    graph = next((v.graph for v in operands if isinstance(v, Value)), None)
    if graph is None:
        raise GraphBuildError(f"{op}: at least one operand must be a graph Value")
    float_dtype = next((v.type.np_dtype for v in operands
                        if isinstance(v, Value) and v.type.dtype in ("f16", "f32", "f64")),
                       np.dtype(np.float32))
    inputs = []
    for v in operands:
        if isinstance(v, Value):
            if v.graph is not graph:
                raise GraphBuildError(f"{op}: operand {v.name} belongs to another graph")
            inputs.append(v.name)
        elif v is None:
            inputs.append(None)
        else:
            inputs.append(graph.add_constant(_operand_array(v, float_dtype)))
    outputs = graph.add_node(op, inputs, attrs, name=name)
    values = tuple(Value(graph, o) for o in outputs if o is not None)
    return values[0] if len(values) == 1 else values


def _operand_array(value, float_dtype: np.dtype) -> np.ndarray:
    """Float operands take the graph's float dtype (float64 numpy weights become float32);
    Python ints become int64; numpy integer arrays keep their dtype."""
    array = np.asarray(value)
    if array.dtype.kind == "f":
        return array.astype(float_dtype)
    if array.dtype.kind in "iu" and not isinstance(value, np.ndarray):
        return array.astype(np.int64)
    return array


def __getattr__(attr: str):
    op = _builder_names().get(attr)
    if op is None:
        raise AttributeError(f"graphc.ops has no op '{attr}'")

    def build(*operands, name: str | None = None, **attrs):
        return apply(op, operands, name=name, **attrs)

    build.__name__ = attr
    build.__doc__ = registry.get(op).doc
    return build


def __dir__():
    return sorted(list(globals()) + list(_builder_names()))
