"""Constant (a fixed tensor) and Param (a trainable tensor): the graph's weights."""

from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import ImportContext, OpCall, OpDef, register, tensor


def _constant_type(call: OpCall) -> list[TensorType]:
    return [TensorType.of(call["value"])]


def _constant_value(call: OpCall) -> np.ndarray:
    return call["value"]


def _import_constant(ctx: ImportContext) -> None:
    """ONNX Constant's value_float(s)/value_int(s) (opset 12+) all become ``value``."""
    kinds = {"value_float": np.float32, "value_floats": np.float32,
             "value_int": np.int64, "value_ints": np.int64}
    for key, dtype in kinds.items():
        if key in ctx.attrs:
            ctx.attrs["value"] = np.asarray(ctx.attrs.pop(key), dtype=dtype)
    unsupported = set(ctx.attrs) - {"value"}
    if unsupported:
        raise ctx.error(f"Constant with attribute {min(unsupported)} is not supported")


register(OpDef(
    name="Constant", inputs=(), outputs=("output",), attrs={"value": tensor()},
    infer=_constant_type, reference=_constant_value, kind="opaque",
    onnx_import=_import_constant, doc="A fixed tensor (weights, shapes)."))

register(OpDef(
    name="Param", inputs=(), outputs=("output",), attrs={"value": tensor()},
    infer=_constant_type, reference=_constant_value, kind="opaque",
    doc="A trainable tensor: like Constant, but training may update it."))
