"""Reductions: ReduceSum and ReduceMean (axes as an optional input), Softmax and LogSoftmax.

Semantics are the newest ONNX forms (ReduceSum-13, ReduceMean-18, Softmax/LogSoftmax-13).
Import rules rewrite the older forms: ``axes`` as an attribute becomes an input, and the old
Softmax ("flatten to 2-D at ``axis``, normalise each row") becomes Flatten -> Softmax -> Reshape.
"""

from __future__ import annotations

import numpy as np

from ..types import FLOAT_DTYPES, TensorType
from .elementwise import check_dtypes, trunc_divide
from .gradients import vjp
from .registry import ImportContext, OpCall, OpDef, int_, register
from .rules import normalize_axes, normalize_axis

# ONNX's type constraint for ReduceSum/ReduceMean (bfloat16 aside).
REDUCE_DTYPES = FLOAT_DTYPES + ("i32", "i64", "u32", "u64")
_BOOL = (0, 1)


# -- ReduceSum / ReduceMean ------------------------------------------------------------------------
def reduced_axes(call: OpCall, axes: np.ndarray | None, rank: int) -> tuple | None:
    """Sorted axes to reduce, or None when the op is the identity.

    No axes (absent input or an empty tensor) means every axis, unless noop_with_empty_axes.
    """
    if axes is None or np.asarray(axes).size == 0:
        return None if call["noop_with_empty_axes"] else tuple(range(rank))
    return tuple(sorted(normalize_axes(np.asarray(axes).ravel(), rank, call)))


def _static_axes(call: OpCall) -> np.ndarray | None:
    """The axes input as known while inferring shapes (its value unless it is empty)."""
    if not call.has_input(1):
        return None
    t = call.in_types[1]
    if t.dtype != "i64" or t.rank != 1:
        raise call.error(f"axes must be a 1-D int64 tensor, got {t}")
    if t.shape == (0,):  # empty: its value (if any) carries no information
        return np.zeros(0, np.int64)
    return call.const_input(1, "axes")


def reduce_type(call: OpCall) -> list[TensorType]:
    x = call.in_types[0]
    check_dtypes(call, REDUCE_DTYPES, "float or 32/64-bit integer")
    axes = reduced_axes(call, _static_axes(call), x.rank)
    if axes is None:
        return [x]
    if call["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return [x.with_shape(shape)]


def reduce_sum_ref(call: OpCall, x: np.ndarray, axes=None) -> np.ndarray:
    axes = reduced_axes(call, axes, x.ndim)
    if axes is None:
        return x.copy()
    return np.sum(x, axis=axes, keepdims=bool(call["keepdims"]), dtype=x.dtype)


def reduce_mean_ref(call: OpCall, x: np.ndarray, axes=None) -> np.ndarray:
    axes = reduced_axes(call, axes, x.ndim)
    if axes is None:
        return x.copy()
    keep = bool(call["keepdims"])
    count = int(np.prod([x.shape[a] for a in axes]))
    if x.dtype.kind in "iu":  # integer mean: the sum divided as integers, truncating
        total = np.sum(x, axis=axes, keepdims=keep, dtype=x.dtype)
        return trunc_divide(np.asarray(total), np.asarray(count, dtype=x.dtype))
    # sum / count rather than np.mean, which warns on an empty set (the result is NaN: 0 / 0);
    # float16 sums in float32, where the count cannot overflow
    total = np.sum(x, axis=axes, keepdims=keep, dtype=np.float32 if x.dtype == np.float16
                   else x.dtype)
    return (total / total.dtype.type(count)).astype(x.dtype)


def reduce_flops(call: OpCall, out_types) -> int:
    x = call.in_types[0]
    return x.numel if x.is_static else 0


def import_axes_attribute(ctx: ImportContext) -> None:
    """ReduceSum < 13 and ReduceMean < 18 take ``axes`` as an attribute, later opsets an input."""
    ctx.attr_to_input("axes", 1)


_REDUCE_ATTRS = {"keepdims": int_(1, choices=_BOOL), "noop_with_empty_axes": int_(0, choices=_BOOL)}

register(OpDef(
    name="ReduceSum", inputs=("data", "axes?"), outputs=("reduced",), attrs=dict(_REDUCE_ATTRS),
    infer=reduce_type, reference=reduce_sum_ref, kind="reduce", flops=reduce_flops,
    onnx_import=import_axes_attribute,
    doc="sum over axes (all if none given, unless noop_with_empty_axes); keepdims keeps them as 1"))

register(OpDef(
    name="ReduceMean", inputs=("data", "axes?"), outputs=("reduced",), attrs=dict(_REDUCE_ATTRS),
    infer=reduce_type, reference=reduce_mean_ref, kind="reduce", flops=reduce_flops,
    onnx_import=import_axes_attribute,
    doc="mean over axes (all if none given, unless noop_with_empty_axes); keepdims keeps them"))


# -- Softmax / LogSoftmax -------------------------------------------------------------------------
def softmax_type(call: OpCall) -> list[TensorType]:
    x = call.in_types[0]
    check_dtypes(call, FLOAT_DTYPES)
    normalize_axis(call["axis"], x.rank, call)
    return [x]


def _shifted(call: OpCall, x: np.ndarray) -> tuple[np.ndarray, int]:
    """x minus its maximum along the axis, so that exp cannot overflow; and the axis."""
    axis = call["axis"] % x.ndim
    top = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # initial: allows an empty axis
    return x - top, axis


def softmax_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    z, axis = _shifted(call, x)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    z, axis = _shifted(call, x)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def softmax_flops(call: OpCall, out_types) -> int:
    t = out_types[0]
    return 5 * t.numel if t.is_static else 0  # max, subtract, exp, sum, divide per element


def import_softmax(ctx: ImportContext, op: str) -> bool | None:
    """Before opset 13, (Log)Softmax flattened its input to 2-D at ``axis`` (default 1) and
    normalised each row, i.e. over all dims from ``axis`` on.

    When ``axis`` is the last dim that is the newest semantics. Otherwise the node becomes
    Flatten(axis) -> op(axis=-1) -> Reshape back to x's shape (one symbolic dim becomes -1).
    """
    if ctx.opset >= 13:
        return None
    x = ctx.inputs[0]
    in_shape = ctx.type_of(x).shape
    axis = int(ctx.attrs.pop("axis", 1))
    if ctx.attrs:
        raise ctx.error(f"unknown attribute '{min(ctx.attrs)}' of {op}")
    if not -len(in_shape) <= axis < max(len(in_shape), 1):
        raise ctx.error(f"axis {axis} out of range for input of rank {len(in_shape)}")
    if axis % max(len(in_shape), 1) == len(in_shape) - 1:
        ctx.attrs["axis"] = -1
        return None
    target = [d if isinstance(d, int) else -1 for d in in_shape]
    if target.count(-1) > 1:
        raise ctx.error(f"{op} before opset 13 on {ctx.type_of(x)} needs static dims; "
                        f"import with input_shapes=")
    shape = ctx.constant(np.array(target, dtype=np.int64))
    flat = ctx.emit("Flatten", [x], {"axis": axis})[0]
    rows = ctx.emit(op, [flat], {"axis": -1})[0]
    ctx.emit("Reshape", [rows, shape], {}, outputs=ctx.outputs[:1])
    return True


def import_softmax_op(ctx: ImportContext) -> bool | None:
    return import_softmax(ctx, "Softmax")


def import_log_softmax_op(ctx: ImportContext) -> bool | None:
    return import_softmax(ctx, "LogSoftmax")


register(OpDef(
    name="Softmax", inputs=("input",), outputs=("output",), attrs={"axis": int_(-1)},
    infer=softmax_type, reference=softmax_ref, kind="opaque", flops=softmax_flops,
    onnx_import=import_softmax_op, doc="exp(x) / sum(exp(x)) along axis (default -1)"))

register(OpDef(
    name="LogSoftmax", inputs=("input",), outputs=("output",), attrs={"axis": int_(-1)},
    infer=softmax_type, reference=log_softmax_ref, kind="opaque", flops=softmax_flops,
    onnx_import=import_log_softmax_op, doc="x - log(sum(exp(x))) along axis (default -1)"))


# -- gradient (vjp) rules (see graphc.autodiff) -------------------------------------------------
def _reduce_grad_axes(ctx):
    """The reduced axes of a ReduceSum/ReduceMean node (None: the node is the identity)."""
    axes = ctx.const(1) if ctx.has_input(1) else None
    if ctx.has_input(1) and axes is None and ctx.in_type(1).shape != (0,):
        raise ctx.error("has run-time axes; differentiating it needs constant axes")
    call = OpCall(ctx.node.op, ctx.node.name, ctx.attrs, ())
    return reduced_axes(call, axes, ctx.in_type(0).rank)


def _spread(ctx, g, axes):
    """dY (the reduced shape) broadcast back over the reduced axes to X's shape."""
    if not ctx.attrs["keepdims"]:
        g = ctx.op("Unsqueeze", g, ctx.ints(axes))
    return ctx.broadcast_like(g, ctx.input(0))


@vjp("ReduceSum")
def _reduce_sum_grad(ctx, node, grads):
    axes = _reduce_grad_axes(ctx)  # every summed element gets dY
    return [grads[0] if axes is None else _spread(ctx, grads[0], axes)]


@vjp("ReduceMean")
def _reduce_mean_grad(ctx, node, grads):
    """Every averaged element gets dY / count. A count over symbolic dims (a mean over the
    batch) is only known at run time: it is then the sum of ones spread like X."""
    axes = _reduce_grad_axes(ctx)
    if axes is None:
        return [grads[0]]
    x = ctx.input(0)
    sizes = [x.shape[a] for a in axes]
    if all(isinstance(d, int) for d in sizes):
        return [_spread(ctx, grads[0] * (1.0 / max(1, int(np.prod(sizes)))), axes)]
    ones = ctx.broadcast_like(ctx.scalar(1.0, x), x)
    count = ctx.op("ReduceSum", ones, ctx.ints(axes), keepdims=ctx.attrs["keepdims"])
    return [_spread(ctx, grads[0] / count, axes)]


@vjp("Softmax")
def _softmax_grad(ctx, node, grads):
    y = ctx.output()  # dx = y (dy - sum(dy y)) along the axis
    axis = ctx.attrs["axis"] % y.type.rank
    return [y * (grads[0] - ctx.reduce_sum(grads[0] * y, [axis]))]


@vjp("LogSoftmax")
def _log_softmax_grad(ctx, node, grads):
    y = ctx.output()  # dx = dy - softmax(x) sum(dy), softmax(x) = exp(y)
    axis = ctx.attrs["axis"] % y.type.rank
    return [grads[0] - ctx.op("Exp", y) * ctx.reduce_sum(grads[0], [axis])]
