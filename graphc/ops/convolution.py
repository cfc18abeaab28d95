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
from .gradients import vjp
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


# -- gradient (vjp) rules (see graphc.autodiff) -------------------------------------------------
# Both gradients of a convolution are convolutions again, so the passes lower them to GEMM
# (im2col) or Winograd like any forward conv:
#
# * dX is a stride-1 Conv of dY -- spread by the stride (zeros between, ``ctx.upsample``) --
#   with the spatially flipped, in/out-swapped weights, dilated like the forward and padded by
#   dilation * (kernel - 1) - pad (a 3x3 "same" conv's dX is again a 3x3 "same" conv);
# * dW is a Conv over X with the batch and channel axes swapped, whose "weights" are dY
#   (batch and channel swapped too), with strides = forward dilations and dilations = forward
#   strides; groups become a grouped conv over (group, batch) channels. With a symbolic batch
#   the batch cannot be a channel count, so dW is then Im2Col(X) times dY, summed over the batch.


def _call_of(ctx, op: str) -> OpCall:
    types = tuple(ctx.in_type(i) if ctx.has_input(i) else None
                  for i in range(len(ctx.node.inputs)))
    values = tuple(ctx.const(i) for i in range(len(ctx.node.inputs)))
    return OpCall(op, ctx.node.name, ctx.attrs, types, values)


def _flipped(ctx, w, spatial: int):
    """``w`` reversed along its last ``spatial`` axes."""
    axes = list(range(w.type.rank - spatial, w.type.rank))
    return ctx.op("Slice", w, ctx.ints([-1] * spatial), ctx.ints([-(2 ** 62)] * spatial),
                  ctx.ints(axes), ctx.ints([-1] * spatial))


def _swap_in_out(ctx, w, group: int):
    """(A, B/G, *K) weights as (B, A/G, *K): each group's two channel axes swapped."""
    rank = w.type.rank
    if group == 1:
        return ctx.transpose(w, [1, 0] + list(range(2, rank)))
    a, b_g = w.shape[:2]
    kernel = list(w.shape[2:])
    grouped = ctx.reshape(w, [group, a // group, b_g] + kernel)
    grouped = ctx.transpose(grouped, [0, 2, 1] + list(range(3, rank + 1)))
    return ctx.reshape(grouped, [b_g * group, a // group] + kernel)


def _padded_conv(ctx, x, w, begins, ends, **attrs):
    """Conv(x, w) with explicit pads that may be negative (negative pads crop x first)."""
    n = len(begins)
    if min(list(begins) + list(ends)) < 0:
        crop = [0, 0] + [min(p, 0) for p in begins] + [0, 0] + [min(p, 0) for p in ends]
        x = ctx.op("Pad", x, ctx.ints(crop))
        begins, ends = [max(p, 0) for p in begins], [max(p, 0) for p in ends]
    pads = list(begins) + list(ends)
    if any(pads):
        attrs["pads"] = pads
    attrs = {k: v for k, v in attrs.items() if not (k in ("strides", "dilations")
                                                     and list(v) == [1] * n)}
    if attrs.get("group") == 1:
        del attrs["group"]
    return ctx.op("Conv", x, w, **attrs)


def conv_input_grad(ctx, g, w, x_spatial, win: Window, group: int):
    """dX of Y = Conv(X, W) for dY ``g``: a stride-1 conv of the spread dY with the flipped,
    swapped W (``w`` may be any Value of W's type)."""
    n = len(win.kernel)
    spread = g
    for i, s in enumerate(win.strides):
        spread = ctx.upsample(spread, 2 + i, s)
    begins, ends = [], []
    for i in range(n):
        reach = win.dilations[i] * (win.kernel[i] - 1)
        begins.append(reach - win.pads[i])
        if win.strides[i] == 1:
            ends.append(reach - win.pads[n + i])
        else:  # spread has out * stride positions, X has x_spatial[i]
            ends.append(x_spatial[i] - win.out[i] * win.strides[i] + win.pads[i])
    w_t = _flipped(ctx, _swap_in_out(ctx, w, group), n)
    return _padded_conv(ctx, spread, w_t, begins, ends, dilations=list(win.dilations),
                        group=group)


def conv_weight_grad(ctx, x, g, w_type, win: Window, group: int):
    """dW (of type ``w_type``) of Y = Conv(X, W) for dY ``g``."""
    if not isinstance(x.shape[0], int):
        return _weight_grad_im2col(ctx, x, g, w_type, win, group)
    n = len(win.kernel)
    rank = x.type.rank
    spatial = list(range(2, rank))
    batch, channels = x.shape[:2]
    # X (N, C, *S) -> (C/G, G*N, *S): channel (g, n) of "image" c
    xs = ctx.reshape(x, [batch, group, channels // group] + list(x.shape[2:]))
    xs = ctx.transpose(xs, [2, 1, 0] + [a + 1 for a in spatial])
    xs = ctx.reshape(xs, [channels // group, group * batch] + list(x.shape[2:]))
    # dY (N, M, *O) -> (M, N, *O): the "weights" of output channel m read group g's batch
    gs = ctx.transpose(g, [1, 0] + spatial)
    out = _padded_conv(ctx, xs, gs, win.pads[:n], win.pads[n:], strides=list(win.dilations),
                       dilations=list(win.strides), group=group)
    # (C/G, M, *K') -> the first K taps (a stride that does not divide leaves extra taps)
    if tuple(out.shape[2:]) != tuple(win.kernel):
        out = ctx.op("Slice", out, ctx.ints([0] * n), ctx.ints(list(win.kernel)),
                     ctx.ints(spatial))
    return ctx.transpose(out, [1, 0] + spatial)


def _weight_grad_im2col(ctx, x, g, w_type, win: Window, group: int):
    """dW as per-sample GEMMs over Im2Col(X) summed over the batch (a symbolic batch cannot be
    merged into one GEMM's K = N * pixels: the IR has no product dims). Per sample and group
    it computes dW^T = cols (C/G*taps, P) @ dY^T (P, M/G), so that the transpose feeding the
    GEMM is dY's, not the columns' (C/G*taps / (M/G) times larger; the forward pass's Im2Col
    of X is shared through CSE), and the one (C/G*taps, M/G) result per group is transposed
    after the sum."""
    m = w_type.shape[0]
    cols = ctx.op("Im2Col", x, kernel_shape=list(win.kernel), strides=list(win.strides),
                  pads=list(win.pads), dilations=list(win.dilations), group=group)
    pixels = cols.shape[3]
    gm = ctx.reshape(g, [g.shape[0], group, m // group, pixels])
    rows_t = ctx.op("MatMul", cols, ctx.transpose(gm, [0, 1, 3, 2]))  # (N, G, C/G*taps, M/G)
    total = ctx.reduce_sum(rows_t, [0], keepdims=False)
    return ctx.reshape(ctx.transpose(total, [0, 2, 1]), w_type.shape)


def _bias_grad(ctx, g):
    return ctx.reduce_sum(g, [0] + list(range(2, g.type.rank)), keepdims=False)


@vjp("Conv")
def _conv_grad(ctx, node, grads):
    (g,) = grads
    win = conv_window(_call_of(ctx, "Conv"))
    group = ctx.attrs["group"]
    x, w = ctx.input(0), ctx.input(1)
    dx = dw = db = None
    if ctx.needs(0):
        spatial = x.shape[2:]
        if any(not isinstance(d, int) for d in spatial) and any(s != 1 for s in win.strides):
            raise ctx.error(f"needs static spatial dims for its input gradient, got {x.type}")
        dx = conv_input_grad(ctx, g, w, spatial, win, group)
    if ctx.needs(1):
        dw = conv_weight_grad(ctx, x, g, ctx.in_type(1), win, group)
    if ctx.needs(2):
        db = _bias_grad(ctx, g)
    return [dx, dw, db]


@vjp("ConvTranspose")
def _conv_transpose_grad(ctx, node, grads):
    """Y = ConvTranspose(X, W) is the input gradient of the Conv with its strides, dilations
    and pads: dX is that Conv of dY, dW that Conv's weight gradient with X as its dY."""
    (g,) = grads
    x, w = ctx.input(0), ctx.input(1)
    call = _call_of(ctx, "ConvTranspose")
    kernel = w.shape[2:]
    geo = transpose_geometry(call, x.shape[2:], kernel)
    n = len(kernel)
    # the matching Conv reads dY (the Y-sized tensor) and produces X-sized output; negative
    # end pads (outputs past the full transposed conv) are positions no X element reaches
    win = Window(tuple(kernel), geo.strides, geo.dilations, geo.pads, tuple(x.shape[2:]))
    group = ctx.attrs["group"]
    dx = dw = db = None
    if ctx.needs(0):
        dx = _padded_conv(ctx, g, w, geo.pads[:n], geo.pads[n:], strides=list(geo.strides),
                          dilations=list(geo.dilations), group=group)
        dx = _crop_to(ctx, dx, x.shape[2:])
    if ctx.needs(1):
        g_read = g
        if min(geo.pads) < 0:  # crop the extension so the pads below are non-negative
            crop = [0, 0] + [min(p, 0) for p in geo.pads[:n]] + [0, 0] + \
                [min(p, 0) for p in geo.pads[n:]]
            g_read = ctx.op("Pad", g, ctx.ints(crop))
            win = Window(win.kernel, win.strides, win.dilations,
                         tuple(max(p, 0) for p in geo.pads), win.out)
        dw = conv_weight_grad(ctx, g_read, x, ctx.in_type(1), win, group)
    if ctx.needs(2):
        db = _bias_grad(ctx, g)
    return [dx, dw, db]


def _crop_to(ctx, v, spatial):
    if tuple(v.shape[2:]) == tuple(spatial):
        return v
    n = len(spatial)
    return ctx.op("Slice", v, ctx.ints([0] * n), ctx.ints(list(spatial)),
                  ctx.ints(list(range(2, 2 + n))))
