"""Pooling: MaxPool (with optional argmax Indices), AveragePool, GlobalAveragePool, GlobalMaxPool.

Window sizes, padding, ``auto_pad`` and ``ceil_mode`` come from the same ``window_geometry`` as
Conv (see ``conv.py``); the references reduce a ``sliding_window_view`` of the padded input.
"""

from __future__ import annotations

import numpy as np

from ..types import TensorType
from .convolution import AUTO_PADS, Window, sliding_windows, window_geometry
from .gradients import vjp
from .registry import OpCall, OpDef, int_, ints, register, string

MAX_POOL_DTYPES = ("f16", "f32", "f64", "i8", "u8")
FLOAT_DTYPES = ("f16", "f32", "f64")


def _pool_attrs(**extra) -> dict:
    attrs = {"auto_pad": string("NOTSET", choices=AUTO_PADS), "ceil_mode": int_(0, choices=(0, 1)),
             "dilations": ints(None), "kernel_shape": ints(), "pads": ints(None),
             "strides": ints(None)}
    attrs.update(extra)
    return attrs


def _pooled_input(call: OpCall, dtypes: tuple) -> TensorType:
    x = call.in_types[0]
    if x.rank < 3:
        raise call.error(f"X must have rank >= 3 (N, C, spatial...), got {x}")
    if x.dtype not in dtypes:
        raise call.error(f"X has dtype {x.dtype}; expects one of {', '.join(dtypes)}")
    return x


def pool_window(call: OpCall) -> Window:
    x = call.in_types[0]
    kernel = call["kernel_shape"]
    if len(kernel) != x.rank - 2:
        raise call.error(f"kernel_shape {tuple(kernel)} has {len(kernel)} values, expects "
                         f"{x.rank - 2} (one per spatial axis of {x})")
    if min(kernel) < 1:
        raise call.error(f"kernel_shape must be positive, got {tuple(kernel)}")
    return window_geometry(call, x.shape[2:], kernel, bool(call["ceil_mode"]))


def _window_axes(win: Window, ndim: int) -> tuple[int, ...]:
    """The kernel axes of a ``sliding_windows`` view of an ``ndim`` input."""
    return tuple(range(ndim, ndim + len(win.kernel)))


def _pool_flops(call: OpCall, out_types) -> int:
    """One comparison or addition per window tap (AveragePool adds one division)."""
    out = out_types[0]
    if not out.is_static:
        return 0
    taps = int(np.prod(call["kernel_shape"], dtype=np.int64))
    return out.numel * (taps + (call.op == "AveragePool"))


# -- MaxPool -------------------------------------------------------------------------------------
def infer_max_pool(call: OpCall) -> list[TensorType]:
    x = _pooled_input(call, MAX_POOL_DTYPES)
    win = pool_window(call)
    y = TensorType(x.shape[:2] + win.out, x.dtype)
    return [y, y.with_dtype("i64")][:max(1, call.n_outputs)]


def _argmax_indices(arg: np.ndarray, win: Window, x_shape: tuple, column_major: bool):
    """ONNX Indices: the flat index into X of each window's maximum (padding not counted).

    ``arg`` is the flat tap index within each window, shape (N, C, *out).
    """
    n = len(win.kernel)
    spatial = x_shape[2:]
    taps = np.unravel_index(arg, win.kernel)
    # storage_order=1 flattens the spatial dims column-major (first spatial axis fastest).
    if column_major:
        steps = [int(np.prod(spatial[:i])) for i in range(n)]
    else:
        steps = [int(np.prod(spatial[i + 1:])) for i in range(n)]
    index = np.arange(x_shape[0] * x_shape[1], dtype=np.int64).reshape(x_shape[:2] + (1,) * n)
    index = index * int(np.prod(spatial, dtype=np.int64))
    for i in range(n):
        out_pos = np.arange(win.out[i], dtype=np.int64).reshape((-1,) + (1,) * (n - 1 - i))
        coord = out_pos * win.strides[i] + taps[i] * win.dilations[i] - win.pads[i]
        index = index + coord * steps[i]
    return index.astype(np.int64)


def max_pool_reference(call: OpCall, x: np.ndarray):
    """Max over each window; padding reads -inf so it never wins, NaN propagates."""
    win = pool_window(call)
    # Integer inputs pool in float64 (exact for int8/uint8) so that padding can be -inf.
    work = x if x.dtype.kind == "f" else x.astype(np.float64)
    windows = sliding_windows(work, win, -np.inf)
    if call.n_outputs < 2:
        return windows.max(axis=_window_axes(win, x.ndim)).astype(x.dtype)
    flat = windows.reshape(windows.shape[:x.ndim] + (-1,))
    arg = flat.argmax(axis=-1)  # first maximum (or first NaN) in row-major tap order
    y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    indices = _argmax_indices(arg, win, x.shape, call["storage_order"] == 1)
    return y.astype(x.dtype), indices


register(OpDef(
    name="MaxPool", inputs=("X",), outputs=("Y", "Indices?"),
    attrs=_pool_attrs(storage_order=int_(0, choices=(0, 1))),
    infer=infer_max_pool, reference=max_pool_reference, kind="out-fusable", flops=_pool_flops,
    doc="Max over sliding windows; optional Indices (int64) are flat indices into X."))


# -- AveragePool ---------------------------------------------------------------------------------
def infer_average_pool(call: OpCall) -> list[TensorType]:
    x = _pooled_input(call, FLOAT_DTYPES)
    win = pool_window(call)
    return [TensorType(x.shape[:2] + win.out, x.dtype)]


def _window_counts(win: Window, spatial: tuple, include_pad: bool) -> np.ndarray:
    """How many taps of each window the divisor counts, shape (1, 1, *out).

    Taps on the input always count; taps on ``pads`` only with count_include_pad; taps past
    the padded input (ceil mode) never do.
    """
    n = len(spatial)
    mask = np.ones((1, 1) + tuple(spatial), dtype=np.float64)
    if include_pad:
        widths = [(0, 0), (0, 0)] + [(win.pads[i], win.pads[n + i]) for i in range(n)]
        mask = np.pad(mask, widths, constant_values=1.0)
        win = Window(win.kernel, win.strides, win.dilations, (0,) * (2 * n), win.out)
    return sliding_windows(mask, win, 0.0).sum(axis=_window_axes(win, 2 + n))


def average_pool_reference(call: OpCall, x: np.ndarray) -> np.ndarray:
    win = pool_window(call)
    windows = sliding_windows(x, win, 0)
    accumulate = np.float32 if x.dtype == np.float16 else x.dtype
    sums = windows.sum(axis=_window_axes(win, x.ndim), dtype=accumulate)
    counts = _window_counts(win, x.shape[2:], call["count_include_pad"] == 1)
    return (sums / counts.astype(accumulate)).astype(x.dtype)


register(OpDef(
    name="AveragePool", inputs=("X",), outputs=("Y",),
    attrs=_pool_attrs(count_include_pad=int_(0, choices=(0, 1))),
    infer=infer_average_pool, reference=average_pool_reference, kind="out-fusable",
    flops=_pool_flops,
    doc="Mean over sliding windows; padding is counted only with count_include_pad=1."))


# -- global pools --------------------------------------------------------------------------------
def infer_global_pool(call: OpCall) -> list[TensorType]:
    x = call.in_types[0]
    dtypes = MAX_POOL_DTYPES if call.op == "GlobalMaxPool" else FLOAT_DTYPES
    if x.rank < 3:
        raise call.error(f"X must have rank >= 3 (N, C, spatial...), got {x}")
    if x.dtype not in dtypes:
        raise call.error(f"X has dtype {x.dtype}; expects one of {', '.join(dtypes)}")
    return [TensorType(x.shape[:2] + (1,) * (x.rank - 2), x.dtype)]


def _spatial_axes(x: np.ndarray) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


def global_average_pool_reference(call: OpCall, x: np.ndarray) -> np.ndarray:
    return x.mean(axis=_spatial_axes(x), keepdims=True).astype(x.dtype)


def global_max_pool_reference(call: OpCall, x: np.ndarray) -> np.ndarray:
    return x.max(axis=_spatial_axes(x), keepdims=True)


def _global_pool_flops(call: OpCall, out_types) -> int:
    """One addition or comparison per input element."""
    x = call.in_types[0]
    return x.numel if x.is_static else 0


register(OpDef(
    name="GlobalAveragePool", inputs=("X",), outputs=("Y",),
    infer=infer_global_pool, reference=global_average_pool_reference, kind="reduce",
    flops=_global_pool_flops, doc="Mean over all spatial axes, kept as size-1 dims."))

register(OpDef(
    name="GlobalMaxPool", inputs=("X",), outputs=("Y",),
    infer=infer_global_pool, reference=global_max_pool_reference, kind="reduce",
    flops=_global_pool_flops, doc="Max over all spatial axes, kept as size-1 dims."))


# -- gradient (vjp) rules (see graphc.autodiff) -------------------------------------------------
def _pool_call(ctx) -> OpCall:
    return OpCall(ctx.node.op, ctx.node.name, ctx.attrs, (ctx.in_type(0),), (None,), 1)


@vjp("MaxPool")
def _max_pool_grad(ctx, node, grads):
    # each window's dY goes to its first maximum (MaxPoolGrad, graphc/ops/gradients.py)
    attrs = {k: v for k, v in node.attrs.items()}
    return [ctx.op("MaxPoolGrad", grads[0], ctx.input(0), **attrs)]


@vjp("AveragePool")
def _average_pool_grad(ctx, node, grads):
    """dY / count spread over each window: the input gradient of a depthwise conv with a
    kernel of ones (ceil mode's extra end positions act as more end padding)."""
    from .convolution import conv_input_grad

    x = ctx.input(0)
    if any(not isinstance(d, int) for d in x.shape[1:]):
        raise ctx.error(f"needs static channel and spatial dims, got {x.type}")
    win = pool_window(_pool_call(ctx))
    n = len(win.kernel)
    spatial = x.shape[2:]
    counts = _window_counts(win, spatial, ctx.attrs["count_include_pad"] == 1)
    g = grads[0] * ctx.constant(1.0 / counts, x)
    ends = tuple(max(win.pads[n + i], (win.out[i] - 1) * win.strides[i] + win.effective[i]
                     - spatial[i] - win.pads[i]) for i in range(n))
    win = Window(win.kernel, win.strides, win.dilations, win.pads[:n] + ends, win.out)
    channels = x.shape[1]
    ones = ctx.constant(np.ones((channels, 1) + tuple(win.kernel)), x)
    return [conv_input_grad(ctx, g, ones, spatial, win, channels)]


@vjp("GlobalAveragePool")
def _global_average_pool_grad(ctx, node, grads):
    x = ctx.input(0)  # every element gets dY / (spatial size)
    spatial = x.shape[2:]
    if any(not isinstance(d, int) for d in spatial):
        raise ctx.error(f"needs static spatial dims, got {x.type}")
    return [ctx.broadcast_like(grads[0] * (1.0 / max(1, int(np.prod(spatial)))), x)]


@vjp("GlobalMaxPool")
def _global_max_pool_grad(ctx, node, grads):
    x = ctx.input(0)  # to the maxima (all of them on ties)
    y = ctx.broadcast_like(ctx.output(), x)
    at_max = 1.0 - ctx.step(ctx.op("Abs", x - y))
    return [ctx.broadcast_like(grads[0], x) * at_max]
