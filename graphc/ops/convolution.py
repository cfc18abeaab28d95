"""Convolutions: Conv and ConvTranspose (1-D/2-D/3-D, groups, dilations, auto_pad).

The references are the oracle for later GEMM/Winograd passes, so they are plain im2col + GEMM:
Conv gathers every window with ``sliding_window_view`` and multiplies per group; ConvTranspose
multiplies first and scatters the columns back (col2im) with one strided add per kernel tap.

``Window``/``window_geometry``/``sliding_windows`` are shared with the pooling ops so that both
families use one definition of output sizes, padding and ``auto_pad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..types import Dim, TensorType
from .registry import OpCall, OpDef, int_, ints, register, string
from .rules import resolve_pads, spatial_attr, window_output

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
FLOAT_DTYPES = ("f16", "f32", "f64")


def _positive(value: int) -> str | None:
    return None if value >= 1 else f"must be >= 1, got {value}"


# -- window geometry shared with pool.py ---------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """A sliding window over the spatial axes: its taps, steps, padding and output size."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as ONNX orders them
    out: tuple[Dim, ...]

    @property
    def effective(self) -> tuple[int, ...]:
        """Extent of one window on the (padded) input: ``dilation * (kernel - 1) + 1``."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations))

    @property
    def taps(self) -> int:
        return int(np.prod(self.kernel, dtype=np.int64))


def window_geometry(call: OpCall, spatial: Sequence[Dim], kernel: Sequence[int],
                    ceil_mode: bool = False) -> Window:
    """Strides, dilations, pads and output size of a conv/pool window from the node's attrs.

    A symbolic spatial dim passes through only where the output size does not depend on it
    (stride 1 and ``pads`` summing to ``effective - 1``, as in a "same" 3x3 conv); otherwise
    the dim must be static.
    """
    n = len(spatial)
    kernel = tuple(int(k) for k in kernel)
    strides = spatial_attr(call, "strides", n, 1)
    dilations = spatial_attr(call, "dilations", n, 1)
    auto_pad = call.attrs.get("auto_pad", "NOTSET")
    for size, s in zip(spatial, strides):
        if isinstance(size, str) and s != 1:
            raise call.error(f"spatial dim '{size}' must be static with stride {s}")
    # With stride 1 the auto_pad amounts do not depend on the size, so any placeholder works.
    sizes = [size if isinstance(size, int) else 1 for size in spatial]
    pads = resolve_pads(call, sizes, kernel, strides, dilations)
    # auto_pad makes the padded extent an exact multiple of the stride: ceil_mode changes nothing.
    ceil_mode = bool(ceil_mode) and auto_pad == "NOTSET"
    out: list[Dim] = []
    for i, size in enumerate(spatial):
        begin, end = pads[i], pads[n + i]
        effective = dilations[i] * (kernel[i] - 1) + 1
        if isinstance(size, str):
            if begin + end != effective - 1:
                raise call.error(f"spatial dim '{size}' must be static: the output size "
                                 f"depends on it (kernel {kernel[i]}, pads {begin}+{end})")
            out.append(size)
            continue
        length = window_output(size, kernel[i], strides[i], dilations[i], begin, end, ceil_mode)
        if length < 1:
            raise call.error(f"window of extent {effective} does not fit spatial axis {i} of "
                             f"size {size} padded by {begin}+{end}")
        out.append(length)
    return Window(kernel, strides, dilations, pads, tuple(out))


def sliding_windows(x: np.ndarray, win: Window, fill) -> np.ndarray:
    """A view ``(N, C, *out, *kernel)`` of the windows of ``x`` padded with ``fill``.

    The input is padded by ``pads`` and, in ceil mode, further at the end so that the last
    window fits; taps beyond the ceil-mode end read ``fill`` as well.
    """
    n = len(win.kernel)
    widths = [(0, 0)] * (x.ndim - n)
    for i in range(n):
        span = (win.out[i] - 1) * win.strides[i] + win.effective[i]  # padded extent read
        begin = win.pads[i]
        widths.append((begin, max(0, span - begin - x.shape[x.ndim - n + i])))
    if any(w != (0, 0) for w in widths):
        x = np.pad(x, widths, constant_values=fill)
    axes = tuple(range(x.ndim - n, x.ndim))
    view = sliding_window_view(x, win.effective, axis=axes)
    index = (slice(None),) * (x.ndim - n)
    index += tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(win.out, win.strides))
    index += tuple(slice(None, None, d) for d in win.dilations)
    return view[index]


# -- shared shape checks -------------------------------------------------------------------------
def _float_input(call: OpCall, index: int, what: str) -> TensorType:
    t = call.in_types[index]
    if t.dtype not in FLOAT_DTYPES:
        raise call.error(f"{what} must be a float tensor, got {t}")
    return t


def _conv_operands(call: OpCall) -> tuple[TensorType, tuple[int, ...]]:
    """Check X, W and B; returns X's type and W's (static) shape."""
    x = _float_input(call, 0, "X")
    w = _float_input(call, 1, "W")
    if x.rank < 3:
        raise call.error(f"X must have rank >= 3 (N, C, spatial...), got {x}")
    if w.rank != x.rank:
        raise call.error(f"W must have the rank of X ({x.rank}), got {w}")
    if w.dtype != x.dtype:
        raise call.error(f"W dtype {w.dtype} differs from X dtype {x.dtype}")
    w_shape = call.static_shape(1)
    kernel_attr = call.attrs.get("kernel_shape")
    if kernel_attr and tuple(kernel_attr) != tuple(w_shape[2:]):
        raise call.error(f"kernel_shape {tuple(kernel_attr)} does not match W's spatial dims "
                         f"{tuple(w_shape[2:])}")
    return x, w_shape


def _check_bias(call: OpCall, channels: int) -> None:
    if not call.has_input(2):
        return
    b = call.in_types[2]
    if b.dtype != call.in_types[0].dtype:
        raise call.error(f"B dtype {b.dtype} differs from X dtype {call.in_types[0].dtype}")
    if b.rank != 1 or (isinstance(b.shape[0], int) and b.shape[0] != channels):
        raise call.error(f"B must have shape ({channels},), got {b}")


def _check_channels(call: OpCall, channels: Dim, expected: int, group: int) -> None:
    if isinstance(channels, int) and channels != expected:
        raise call.error(f"X has {channels} channels but W expects {expected} "
                         f"(group={group})")


def _add_bias(y: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if b is None:
        return y
    return y + b.reshape((1, -1) + (1,) * (y.ndim - 2))


# -- Conv ----------------------------------------------------------------------------------------
def conv_window(call: OpCall) -> Window:
    x = call.in_types[0]
    w_shape = call.static_shape(1)
    return window_geometry(call, x.shape[2:], w_shape[2:])


def infer_conv(call: OpCall) -> list[TensorType]:
    x, w_shape = _conv_operands(call)
    group = call["group"]
    m, c_group = w_shape[0], w_shape[1]
    if m % group:
        raise call.error(f"W has {m} output channels, not divisible by group={group}")
    _check_channels(call, x.shape[1], c_group * group, group)
    _check_bias(call, m)
    win = conv_window(call)
    return [TensorType((x.shape[0], m) + win.out, x.dtype)]


def conv_reference(call: OpCall, x: np.ndarray, w: np.ndarray,
                   b: np.ndarray | None = None) -> np.ndarray:
    """im2col with ``sliding_window_view``, then one GEMM per group (batched by matmul)."""
    group = call["group"]
    n, c = x.shape[:2]
    m = w.shape[0]
    win = conv_window(call)
    k = len(win.kernel)
    windows = sliding_windows(x, win, 0)  # (N, C, *out, *kernel)
    windows = windows.reshape((n, group, c // group) + windows.shape[2:])
    # (N, G, C/G, *kernel, *out): the rows of a group's column matrix are (channel, tap) pairs
    order = (0, 1, 2) + tuple(range(3 + k, 3 + 2 * k)) + tuple(range(3, 3 + k))
    pixels = int(np.prod(win.out, dtype=np.int64))
    cols = windows.transpose(order).reshape(n, group, -1, pixels)
    weights = w.reshape(group, m // group, -1)
    y = np.matmul(weights, cols).reshape((n, m) + tuple(win.out))
    return _add_bias(y, b).astype(x.dtype, copy=False)


def conv_flops(call: OpCall, out_types) -> int:
    """Direct count: 2 * N * M * prod(out) * C/group * prod(kernel)."""
    out = out_types[0]
    w = call.in_types[1]
    if not out.is_static or not w.is_static:
        return 0
    return 2 * out.numel * int(np.prod(w.shape[1:], dtype=np.int64))


register(OpDef(
    name="Conv", inputs=("X", "W", "B?"), outputs=("Y",),
    attrs={"auto_pad": string("NOTSET", choices=AUTO_PADS), "dilations": ints(None),
           "group": int_(1, check=_positive), "kernel_shape": ints(None), "pads": ints(None),
           "strides": ints(None)},
    infer=infer_conv, reference=conv_reference, kind="out-fusable", flops=conv_flops,
    doc="N-d convolution (cross-correlation) of X (N, C, ...) with W (M, C/group, ...) plus B."))


# -- ConvTranspose -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransposeGeometry:
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends; an end may be negative (output past the full one)
    out: tuple[int, ...]


def _transpose_total_pads(call: OpCall, totals: Sequence[int]) -> tuple[int, ...]:
    """Split the padding that ``output_shape``/``auto_pad`` imply, as the ONNX spec says.

    A negative total (an output larger than the full transposed convolution) extends the
    output at the end, like ``output_padding`` does (ONNX's reference and onnxruntime agree).
    """
    upper = call["auto_pad"] == "SAME_UPPER"
    begins, ends = [], []
    for total in totals:
        if total < 0:
            begins.append(0)
            ends.append(total)
        else:
            small, big = total // 2, total - total // 2
            begins.append(small if upper else big)
            ends.append(big if upper else small)
    return tuple(begins + ends)


def _output_padding(call: OpCall, n: int, strides, dilations) -> tuple[int, ...]:
    output_padding = tuple(call.attrs.get("output_padding") or (0,) * n)
    if len(output_padding) != n:
        raise call.error(f"output_padding has {len(output_padding)} values, expects {n}")
    for p, s, d in zip(output_padding, strides, dilations):
        if not 0 <= p < max(s, d):
            raise call.error(f"output_padding {output_padding} must be >= 0 and less than the "
                             f"stride or dilation")
    return output_padding


def _requested_output(call: OpCall, spatial: Sequence[int], strides) -> list[int] | None:
    """The output size ``output_shape`` or ``auto_pad`` SAME asks for; None for explicit pads."""
    n = len(spatial)
    output_shape = call.attrs.get("output_shape")
    if output_shape:
        if len(output_shape) == n + 2:  # some exporters include the batch and channel dims
            output_shape = tuple(output_shape)[2:]
        if len(output_shape) != n:
            raise call.error(f"output_shape has {len(output_shape)} values, expects {n}")
        target = [int(o) for o in output_shape]
    elif call["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        target = [size * s for size, s in zip(spatial, strides)]
    else:
        return None
    if min(target) < 1:
        raise call.error(f"output shape {tuple(target)} must be positive")
    return target


def _explicit_transpose_pads(call: OpCall, n: int) -> tuple[int, ...]:
    if call["auto_pad"] == "VALID":
        return (0,) * (2 * n)
    pads = tuple(call.attrs.get("pads") or (0,) * (2 * n))
    if len(pads) != 2 * n or min(pads) < 0:
        raise call.error(f"pads {pads} must be {2 * n} non-negative values")
    return pads


def transpose_geometry(call: OpCall, spatial: Sequence[Dim],
                       kernel: Sequence[int]) -> TransposeGeometry:
    """Strides, dilations, pads and output size of ConvTranspose (ONNX spec equations)."""
    n = len(spatial)
    for size in spatial:
        if isinstance(size, str):
            raise call.error(f"spatial dim '{size}' of X must be static")
    strides = spatial_attr(call, "strides", n, 1)
    dilations = spatial_attr(call, "dilations", n, 1)
    output_padding = _output_padding(call, n, strides, dilations)
    # the full output: every position some input pixel and tap writes (plus output_padding)
    full = [s * (size - 1) + p + d * (k - 1) + 1
            for size, s, p, d, k in zip(spatial, strides, output_padding, dilations, kernel)]
    target = _requested_output(call, spatial, strides)
    if target is not None:
        pads = _transpose_total_pads(call, [f - t for f, t in zip(full, target)])
        return TransposeGeometry(strides, dilations, pads, tuple(target))
    pads = _explicit_transpose_pads(call, n)
    out = tuple(f - pads[i] - pads[n + i] for i, f in enumerate(full))
    if min(out) < 1:
        raise call.error(f"pads {pads} leave an empty output {out}")
    return TransposeGeometry(strides, dilations, pads, out)


def infer_conv_transpose(call: OpCall) -> list[TensorType]:
    x, w_shape = _conv_operands(call)
    group = call["group"]
    if w_shape[0] % group:
        raise call.error(f"W has {w_shape[0]} input channels, not divisible by group={group}")
    _check_channels(call, x.shape[1], w_shape[0], group)
    m = w_shape[1] * group
    _check_bias(call, m)
    geo = transpose_geometry(call, x.shape[2:], w_shape[2:])
    return [TensorType((x.shape[0], m) + geo.out, x.dtype)]


def col2im(cols: np.ndarray, geo: TransposeGeometry, kernel: Sequence[int]) -> np.ndarray:
    """Sum columns ``(N, M, *kernel, *in)`` into the output ``(N, M, *out)``.

    One strided add per kernel tap (vectorised over all pixels): input pixel ``i`` and tap
    ``t`` land on output position ``i * stride + t * dilation - pad_begin``.
    """
    n = len(kernel)
    lead = cols.shape[:2]
    in_sizes = cols.shape[2 + n:]
    begins = geo.pads[:n]
    # The buffer spans every written position and every output position (negative end pads
    # put output positions beyond the last written one).
    spans = [max(s * (i - 1) + d * (k - 1) + 1, b + o)
             for s, i, d, k, b, o in zip(geo.strides, in_sizes, geo.dilations, kernel, begins,
                                         geo.out)]
    buffer = np.zeros(lead + tuple(spans), dtype=cols.dtype)
    for tap in np.ndindex(*kernel):
        target = tuple(slice(t * d, t * d + s * (i - 1) + 1, s)
                       for t, d, s, i in zip(tap, geo.dilations, geo.strides, in_sizes))
        buffer[(Ellipsis,) + target] += cols[(slice(None), slice(None)) + tap]
    crop = tuple(slice(b, b + o) for b, o in zip(begins, geo.out))
    return buffer[(Ellipsis,) + crop]


def conv_transpose_reference(call: OpCall, x: np.ndarray, w: np.ndarray,
                             b: np.ndarray | None = None) -> np.ndarray:
    """GEMM per group (W^T @ X gives every tap's contribution), then col2im."""
    group = call["group"]
    n, c = x.shape[:2]
    kernel = w.shape[2:]
    m_group = w.shape[1]
    geo = transpose_geometry(call, x.shape[2:], kernel)
    pixels = int(np.prod(x.shape[2:], dtype=np.int64))
    # (G, C/G, M/G * taps) -> (G, M/G * taps, C/G): rows are (output channel, tap) pairs
    weights = w.reshape(group, c // group, -1).transpose(0, 2, 1)
    cols = np.matmul(weights, x.reshape(n, group, c // group, pixels))
    cols = cols.reshape((n, group * m_group) + tuple(kernel) + tuple(x.shape[2:]))
    y = col2im(cols, geo, kernel)
    return _add_bias(y, b).astype(x.dtype, copy=False)


def conv_transpose_flops(call: OpCall, out_types) -> int:
    """Direct count over the input: 2 * N * C * prod(in) * M/group * prod(kernel)."""
    x, w = call.in_types[0], call.in_types[1]
    if not x.is_static or not w.is_static:
        return 0
    return 2 * x.numel * int(np.prod(w.shape[1:], dtype=np.int64))


register(OpDef(
    name="ConvTranspose", inputs=("X", "W", "B?"), outputs=("Y",),
    attrs={"auto_pad": string("NOTSET", choices=AUTO_PADS), "dilations": ints(None),
           "group": int_(1, check=_positive), "kernel_shape": ints(None),
           "output_padding": ints(None), "output_shape": ints(None), "pads": ints(None),
           "strides": ints(None)},
    infer=infer_conv_transpose, reference=conv_transpose_reference, kind="out-fusable",
    flops=conv_transpose_flops,
    doc="Transposed convolution (gradient of Conv w.r.t. its input) of X (N, C, ...) with "
        "W (C, M/group, ...) plus B."))
