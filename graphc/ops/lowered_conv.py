"""The two halves of a convolution lowered to GEMM (the ``lower-conv`` pass introduces them).

* ``Im2Col(X) {kernel_shape, strides, pads, dilations, group}``: X ``[N, C, *spatial]`` ->
  columns ``[N, G, C/G * prod(kernel), prod(out)]``. Row ``c * prod(kernel) + tap`` of group
  ``g`` holds input channel ``g * C/G + c`` seen through kernel tap ``tap`` (row-major over the
  kernel), column ``p`` is output pixel ``p`` (row-major over ``out``); taps that fall on the
  padding read 0. ``pads`` are explicit (begins then ends): the pass resolves ``auto_pad``.
* ``ConvGemm(W2, COLS, B?, Z?) {group, out_spatial, activation, activation_params}``: per group
  ``W2 [G, K/G, C/G * prod(kernel)] @ COLS [N, G, C/G * prod(kernel), P]``, read as
  ``Y [N, K, *out_spatial]`` (NCHW: group ``g``'s rows are output channels ``g * K/G ...``, so
  no transpose is needed), then the epilogue of ``ops/epilogue.py`` (bias along axis 1).

Both need static spatial sizes (the column count ``P`` is their product) and a static channel
count; the batch may be symbolic. The references are the same gather and batched matmul as the
Conv reference, so a lowered graph reproduces the Conv it replaces.
"""

from __future__ import annotations

import math

import numpy as np

from ..types import TensorType
from .convolution import Window, sliding_windows, window_geometry
from .epilogue import EPILOGUE_ATTRS, apply_epilogue, check_epilogue
from .registry import OpCall, OpDef, int_, ints, register
from .rules import float_input


def _positive(value: int) -> str | None:
    return None if value >= 1 else f"must be >= 1, got {value}"


def _all_positive(values) -> str | None:
    return None if values and min(values) >= 1 else f"must be positive, got {tuple(values)}"


# -- Im2Col --------------------------------------------------------------------------------------
def im2col_window(call: OpCall) -> Window:
    """The window over X's spatial axes; X's channels and spatial dims must be static."""
    x = float_input(call, 0)
    kernel = call["kernel_shape"]
    if x.rank < 3:
        raise call.error(f"X must have rank >= 3 (N, C, spatial...), got {x}")
    if len(kernel) != x.rank - 2:
        raise call.error(f"kernel_shape {kernel} has {len(kernel)} dims, X has {x.rank - 2} "
                         f"spatial dims")
    if not all(isinstance(d, int) for d in x.shape[1:]):
        raise call.error(f"X's channel and spatial dims must be static, got {x}")
    if x.shape[1] % call["group"]:
        raise call.error(f"X has {x.shape[1]} channels, not divisible by group={call['group']}")
    return window_geometry(call, x.shape[2:], kernel)


def infer_im2col(call: OpCall) -> list[TensorType]:
    x = call.in_types[0]
    win = im2col_window(call)
    group = call["group"]
    rows = x.shape[1] // group * win.taps
    return [TensorType((x.shape[0], group, rows, math.prod(win.out)), x.dtype)]


def im2col(x: np.ndarray, win: Window, group: int) -> np.ndarray:
    """Columns ``[N, G, C/G * taps, prod(out)]`` of ``x`` (zero padding)."""
    n, c = x.shape[:2]
    k = len(win.kernel)
    windows = sliding_windows(x, win, 0)  # (N, C, *out, *kernel), a view
    windows = windows.reshape((n, group, c // group) + windows.shape[2:])
    # (N, G, C/G, *kernel, *out): rows are (channel, tap) pairs, the order W's reshape has
    order = (0, 1, 2) + tuple(range(3 + k, 3 + 2 * k)) + tuple(range(3, 3 + k))
    rows = c // group * win.taps
    return windows.transpose(order).reshape(n, group, rows, math.prod(win.out))


def im2col_reference(call: OpCall, x: np.ndarray) -> np.ndarray:
    return im2col(x, im2col_window(call), call["group"])


def _no_flops(call: OpCall, out_types) -> int:
    """A gather: no arithmetic."""
    return 0


register(OpDef(
    name="Im2Col", inputs=("X",), outputs=("COLS",),
    attrs={"kernel_shape": ints(check=_all_positive), "strides": ints(None),
           "pads": ints(None), "dilations": ints(None), "group": int_(1, check=_positive)},
    infer=infer_im2col, reference=im2col_reference, kind="injective", flops=_no_flops,
    doc="Gather the convolution windows of X (N, C, ...) into GEMM columns "
        "(N, group, C/group * prod(kernel), prod(out)), padding with zeros."))


# -- ConvGemm ------------------------------------------------------------------------------------
def _check_bias(call: OpCall, channels: int) -> None:
    if not call.has_input(2):
        return
    b = call.in_types[2]
    if b.dtype != call.in_types[0].dtype:
        raise call.error(f"B dtype {b.dtype} differs from W2 dtype {call.in_types[0].dtype}")
    if b.shape != (channels,):
        raise call.error(f"B must have shape ({channels},), got {b}")


def infer_conv_gemm(call: OpCall) -> list[TensorType]:
    w2 = float_input(call, 0)
    cols = float_input(call, 1)
    if w2.rank != 3 or cols.rank != 4:
        raise call.error(f"W2 must be [G, K/G, rows] and COLS [N, G, rows, P], got {w2} and "
                         f"{cols}")
    if w2.dtype != cols.dtype:
        raise call.error(f"W2 dtype {w2.dtype} differs from COLS dtype {cols.dtype}")
    group, k_group, rows = call.static_shape(0)
    if group != call["group"] or cols.shape[1:3] != (group, rows):
        raise call.error(f"W2 {w2} and COLS {cols} disagree with group={call['group']} "
                         f"(expects W2 [G, K/G, rows] and COLS [N, G, rows, P])")
    out_spatial = tuple(call["out_spatial"])
    if cols.shape[3] != math.prod(out_spatial):
        raise call.error(f"COLS has {cols.shape[3]} columns but out_spatial {out_spatial} has "
                         f"{math.prod(out_spatial)} pixels")
    _check_bias(call, group * k_group)
    out = TensorType((cols.shape[0], group * k_group) + out_spatial, w2.dtype)
    check_epilogue(call, out, 2)
    return [out]


def conv_gemm_reference(call: OpCall, w2: np.ndarray, cols: np.ndarray, b=None,
                        z=None) -> np.ndarray:
    """One matmul batched over (N, G); (N, G, K/G, P) is already (N, K, *out) in memory."""
    channels = w2.shape[0] * w2.shape[1]
    acc = np.matmul(w2, cols).reshape((cols.shape[0], channels) + tuple(call["out_spatial"]))
    return apply_epilogue(call, acc, b, z, bias_axis=1)


def conv_gemm_flops(call: OpCall, out_types) -> int:
    """Conv's direct count (2 * N * K * prod(out) * rows), plus one add per output for Z."""
    out = out_types[0]
    if not out.is_static:
        return 0
    rows = call.in_types[0].shape[2]
    return 2 * out.numel * rows + (out.numel if call.has_input(3) else 0)


register(OpDef(
    name="ConvGemm", inputs=("W2", "COLS", "B?", "Z?"), outputs=("Y",),
    attrs={"group": int_(1, check=_positive), "out_spatial": ints(check=_all_positive),
           **EPILOGUE_ATTRS},
    infer=infer_conv_gemm, reference=conv_gemm_reference, kind="out-fusable",
    flops=conv_gemm_flops, epilogue_bias_axis=1,
    doc="activation(W2 @ COLS per group, read as (N, K, *out_spatial), + B + Z): the GEMM of "
        "a convolution lowered by im2col."))
