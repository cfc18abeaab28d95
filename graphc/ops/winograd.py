"""Winograd F(m x m, 3x3) convolution in stages (the ``winograd`` pass introduces them).

A 3x3 stride-1 conv becomes ``Y = A^T [(G g G^T) . (B^T d B)] A`` per output tile (Lavin & Gray,
arXiv:1509.09308): an output tile is ``m x m``, the input tile it reads ``a x a`` (``a = m + 2``),
and input tiles overlap by 2 (stride ``m``). The matrices come from ``graphc.ops.winograd_matrices``
(derived from interpolation points; ``points`` selects the finite ones, ``()`` the default set).

* ``WinogradFilterTransform(W) {m, points, group}``: W ``[K, C/G, 3, 3]`` -> U
  ``[G?, a*a, C/G, K/G]``, ``U[xi*a + nu, c, k] = (G w[k, c] G^T)[xi, nu]``. Constant when W is,
  so ``fold-constants`` computes it at compile time.
* ``WinogradInputTransform(X) {m, points, pads, tiles, group, fold_batch}``: X ``[N, C, H, W]``
  -> V; tile ``(i, j)`` reads padded rows ``i*m .. i*m + a - 1`` (zeros outside X: the conv's
  ``pads`` and the partial tiles at the bottom/right border), ``V[xi*a + nu, t, c] =
  (B^T d B)[xi, nu]``.
* the products: a plain ``MatMul(V, U) -> M`` (one ``T x C/G x K/G`` GEMM per tile element
  ``xi*a + nu`` and group; a batch axis broadcasts).
* ``WinogradOutput(M, B?, Z?) {m, points, out_shape, tiles, group, fold_batch, activation,
  activation_params}``: ``A^T M A`` per tile, tiles laid side by side and cropped to
  ``out_shape = [N, K, OH, OW]``, then the epilogue of ``ops/epilogue.py`` (bias along axis 1).

Layouts. ``tiles = [th, tw]`` is the tile grid, ``th = ceil(OH / m)``. With ``fold_batch=1``
the batch folds into the tile axis, ``t = (n*th + i)*tw + j``: V ``[G?, a*a, N*th*tw, C/G]``,
M ``[G?, a*a, N*th*tw, K/G]``. A symbolic batch cannot fold (graphc types cannot write
``N*th*tw``), so ``fold_batch=0`` keeps it as a leading axis: V ``[N, G?, a*a, th*tw, C/G]``,
M ``[N, G?, a*a, th*tw, K/G]`` and ``out_shape[0] = -1`` (the batch is M's axis 0). The group
axis ``G?`` is present only when ``group > 1``; group ``g`` covers input channels
``g*C/G ..`` and output channels ``g*K/G ..``, as Conv does.

The references compute in the input's dtype with the matrices rounded to it once, so a float32
graph shows float32 Winograd error (``docs/winograd.md``). FLOP rules count 2 per use of a
nonzero transform coefficient (the transforms) and ``2 * a*a * T * C * K`` for the MatMul.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..types import TensorType
from .epilogue import EPILOGUE_ATTRS, apply_epilogue, check_epilogue
from .registry import Attr, OpCall, OpDef, int_, ints, register
from .winograd_matrices import float_matrices

R = 3  # filter taps per axis
WINOGRAD_DTYPES = ("f32", "f64")


def _positive(value: int) -> str | None:
    return None if value >= 1 else f"must be >= 1, got {value}"


def _pair(values) -> str | None:
    return None if len(values) == 2 and min(values) >= 1 else "must be 2 positive ints"


COMMON_ATTRS = {
    "m": int_(check=_positive),            # output tile size
    "points": Attr("floats", ()),          # finite interpolation points; () = default for m
    "group": int_(1, check=_positive),
}
LAYOUT_ATTRS = {
    "tiles": ints(check=_pair),             # [th, tw]
    "fold_batch": int_(1, choices=(0, 1)),  # 1: batch folded into the tile axis
}


# -- matrices ------------------------------------------------------------------------------------
def transform_matrices(call: OpCall, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T, G, B^T) of the node's F(m, 3), in ``dtype``; a ShapeError for bad points."""
    points = tuple(call["points"]) or None
    try:
        return float_matrices(call["m"], points, np.dtype(dtype).name)
    except ValueError as exc:
        raise call.error(str(exc)) from None


def _alpha(call: OpCall) -> int:
    return call["m"] + R - 1


def _nnz(matrix: np.ndarray) -> int:
    return int(np.count_nonzero(matrix))


def _float_operand(call: OpCall, index: int, what: str, rank: int) -> TensorType:
    t = call.in_types[index]
    if t.dtype not in WINOGRAD_DTYPES:
        raise call.error(f"{what} must be f32 or f64, got {t}")
    if t.rank != rank:
        raise call.error(f"{what} must have rank {rank}, got {t}")
    return t


def _group_axis(call: OpCall) -> tuple:
    """The leading group axis of U, V and M: present only for grouped convs."""
    return (call["group"],) if call["group"] > 1 else ()


def _divide(call: OpCall, total, what: str) -> int:
    if not isinstance(total, int):
        raise call.error(f"{what} must be static, got {total}")
    if total % call["group"]:
        raise call.error(f"{what} {total} is not divisible by group={call['group']}")
    return total // call["group"]


# -- WinogradFilterTransform -----------------------------------------------------------------
def infer_filter(call: OpCall) -> list[TensorType]:
    w = _float_operand(call, 0, "W", 4)
    k, c_group, kh, kw = call.static_shape(0)
    if (kh, kw) != (R, R):
        raise call.error(f"W must hold 3x3 kernels, got {w}")
    transform_matrices(call, w.np_dtype)
    k_group = _divide(call, k, "W's output channel count")
    a = _alpha(call)
    return [TensorType(_group_axis(call) + (a * a, c_group, k_group), w.dtype)]


def filter_reference(call: OpCall, w: np.ndarray) -> np.ndarray:
    """U = G w G^T per (output channel, input channel) filter."""
    _, g, _ = transform_matrices(call, w.dtype)
    k, c_group = w.shape[:2]
    group, a = call["group"], _alpha(call)
    t = np.tensordot(w, g, axes=([3], [1]))           # [K, C/G, 3, a]: w G^T
    u = np.tensordot(g, t, axes=([1], [2]))           # [a, K, C/G, a]: G (w G^T)
    u = u.reshape(a, group, k // group, c_group, a)   # [xi, g, k, c, nu]
    u = u.transpose(1, 0, 4, 3, 2).reshape(_group_axis(call) + (a * a, c_group, k // group))
    return np.ascontiguousarray(u, dtype=w.dtype)


def filter_flops(call: OpCall, out_types) -> int:
    w = call.in_types[0]
    if not w.is_static:
        return 0
    _, g, _ = transform_matrices(call, w.np_dtype)
    filters = w.shape[0] * w.shape[1]
    return 2 * filters * _nnz(g) * (R + _alpha(call))


register(OpDef(
    name="WinogradFilterTransform", inputs=("W",), outputs=("U",),
    attrs=dict(COMMON_ATTRS), infer=infer_filter, reference=filter_reference, kind="opaque",
    flops=filter_flops,
    doc="Winograd filter transform: W [K, C/G, 3, 3] -> U [G?, a*a, C/G, K/G], U = G w G^T"))


# -- WinogradInputTransform ------------------------------------------------------------------
def tile_grid(call: OpCall, out_h: int, out_w: int) -> tuple[int, int]:
    """Check ``tiles`` against the output size: ``ceil(out / m)`` tiles per axis."""
    m = call["m"]
    want = (math.ceil(out_h / m), math.ceil(out_w / m))
    if tuple(call["tiles"]) != want:
        raise call.error(f"tiles {list(call['tiles'])} do not cover the {out_h}x{out_w} output "
                         f"with {m}x{m} tiles; expected {list(want)}")
    return want


def _batch_layout(call: OpCall, batch, tiles: tuple[int, int]) -> tuple[tuple, object]:
    """(leading batch axis, tile-axis length) of V and M."""
    per_image = tiles[0] * tiles[1]
    if call["fold_batch"]:
        if not isinstance(batch, int):
            raise call.error(f"fold_batch=1 needs a static batch, got {batch}")
        return (), batch * per_image
    return (batch,), per_image


def _input_pads(call: OpCall) -> tuple[int, int, int, int]:
    pads = tuple(call["pads"])
    if len(pads) != 4 or min(pads) < 0:
        raise call.error(f"pads {list(pads)} must be 4 non-negative ints (top, left, bottom, "
                         f"right)")
    return pads


def infer_input(call: OpCall) -> list[TensorType]:
    x = _float_operand(call, 0, "X", 4)
    n, c, h, w = x.shape
    if not all(isinstance(d, int) for d in (c, h, w)):
        raise call.error(f"X's channel and spatial dims must be static, got {x}")
    transform_matrices(call, x.np_dtype)
    top, left, bottom, right = _input_pads(call)
    out_h, out_w = h + top + bottom - R + 1, w + left + right - R + 1
    if min(out_h, out_w) < 1:
        raise call.error(f"a 3x3 window does not fit {h}x{w} padded by {list(call['pads'])}")
    tiles = tile_grid(call, out_h, out_w)
    lead, per_axis = _batch_layout(call, n, tiles)
    a = _alpha(call)
    c_group = _divide(call, c, "X's channel count")
    return [TensorType(lead + _group_axis(call) + (a * a, per_axis, c_group), x.dtype)]


# Axis orders between the canonical tile array [xi, nu, N, G, channel, th, tw] and the layouts
# [G, a*a, N*th*tw, channel] (fold_batch=1) and [N, G, a*a, th*tw, channel] (fold_batch=0).
_LAYOUT_PERM = {1: (3, 0, 1, 2, 5, 6, 4), 0: (2, 3, 0, 1, 5, 6, 4)}


def _to_layout(call: OpCall, canonical: np.ndarray) -> np.ndarray:
    a, n, _, channels, th, tw = canonical.shape[1:]
    fold = call["fold_batch"]
    out = canonical.transpose(_LAYOUT_PERM[fold])
    tail = (a * a, n * th * tw, channels) if fold else (a * a, th * tw, channels)
    lead = () if fold else (n,)
    return np.ascontiguousarray(out.reshape(lead + _group_axis(call) + tail))


def _from_layout(call: OpCall, array: np.ndarray, batch: int) -> np.ndarray:
    """M in its layout -> the canonical [xi, nu, N, G, channel, th, tw]."""
    a = _alpha(call)
    th, tw = call["tiles"]
    group = call["group"]
    if call["fold_batch"]:
        shape = (group, a, a, batch, th, tw, array.shape[-1])
    else:
        shape = (batch, group, a, a, th, tw, array.shape[-1])
    return array.reshape(shape).transpose(np.argsort(_LAYOUT_PERM[call["fold_batch"]]))


def input_tiles(call: OpCall, x: np.ndarray) -> np.ndarray:
    """The overlapping a x a tiles ``[N, C, th, tw, a, a]`` of X, zero-padded (a view)."""
    m, a = call["m"], _alpha(call)
    th, tw = call["tiles"]
    top, left = call["pads"][:2]
    h, w = x.shape[2:]
    # pad to exactly the rows/columns the tiles read: the conv's bottom/right pads and the
    # partial last tiles both read zeros
    widths = ((0, 0), (0, 0), (top, th * m + R - 1 - top - h), (left, tw * m + R - 1 - left - w))
    padded = np.pad(x, widths)
    return sliding_window_view(padded, (a, a), axis=(2, 3))[:, :, ::m, ::m]


def input_reference(call: OpCall, x: np.ndarray) -> np.ndarray:
    """V = B^T d B per tile and channel."""
    _, _, bt = transform_matrices(call, x.dtype)
    n, c = x.shape[:2]
    group = call["group"]
    tiles = input_tiles(call, x)
    tiles = tiles.reshape((n, group, c // group) + tiles.shape[2:])  # [N, G, c, th, tw, a, a]
    t = np.tensordot(tiles, bt, axes=([6], [1]))       # d B: [N, G, c, th, tw, a, nu]
    v = np.tensordot(bt, t, axes=([1], [5]))           # B^T (d B): [xi, N, G, c, th, tw, nu]
    return _to_layout(call, v.transpose(0, 6, 1, 2, 3, 4, 5)).astype(x.dtype, copy=False)


def input_flops(call: OpCall, out_types) -> int:
    v = out_types[0]
    if not v.is_static:
        return 0
    _, _, bt = transform_matrices(call, v.np_dtype)
    a = _alpha(call)
    tile_channels = v.numel // (a * a)
    return tile_channels * 4 * a * _nnz(bt)  # d B, then B^T (d B)


register(OpDef(
    name="WinogradInputTransform", inputs=("X",), outputs=("V",),
    attrs={**COMMON_ATTRS, **LAYOUT_ATTRS, "pads": ints()},
    infer=infer_input, reference=input_reference, kind="opaque", flops=input_flops,
    doc="Winograd input transform: X [N, C, H, W] -> V (B^T d B per overlapping a x a tile)"))


# -- WinogradOutput --------------------------------------------------------------------------
def _output_shape(call: OpCall) -> tuple:
    shape = tuple(call["out_shape"])
    if len(shape) != 4:
        raise call.error(f"out_shape {list(shape)} must be [N, K, OH, OW]")
    if call["fold_batch"] and shape[0] < 1:
        raise call.error(f"out_shape {list(shape)}: fold_batch=1 needs a static batch")
    if not call["fold_batch"] and shape[0] != -1:
        raise call.error(f"out_shape {list(shape)}: with fold_batch=0 the batch is M's axis 0, "
                         f"written -1")
    if min(shape[1:]) < 1:
        raise call.error(f"out_shape {list(shape)} must be positive")
    return shape


def _check_bias(call: OpCall, dtype: str, channels: int) -> None:
    if not call.has_input(1):
        return
    b = call.in_types[1]
    wrong_size = isinstance(b.shape[0], int) and b.shape[0] != channels if b.rank else True
    if b.dtype != dtype or b.rank != 1 or wrong_size:
        raise call.error(f"B must be {dtype}[{channels}], got {b}")


def infer_output(call: OpCall) -> list[TensorType]:
    mt = call.in_types[0]
    if mt.dtype not in WINOGRAD_DTYPES:
        raise call.error(f"M must be f32 or f64, got {mt}")
    transform_matrices(call, mt.np_dtype)
    n, k, out_h, out_w = _output_shape(call)
    tiles = tile_grid(call, out_h, out_w)
    a = _alpha(call)
    batch = n if call["fold_batch"] else (mt.shape[0] if mt.rank else None)
    lead, per_axis = _batch_layout(call, batch, tiles)
    want = lead + _group_axis(call) + (a * a, per_axis, _divide(call, k, "K"))
    if mt.shape != want:
        raise call.error(f"M is {mt}, expected shape {list(want)} for out_shape "
                         f"{list(call['out_shape'])}, tiles {list(tiles)}, group "
                         f"{call['group']}, fold_batch={call['fold_batch']}")
    out = TensorType((batch, k, out_h, out_w), mt.dtype)
    _check_bias(call, mt.dtype, k)
    check_epilogue(call, out, 1)
    return [out]


def output_reference(call: OpCall, m_array: np.ndarray, b: np.ndarray | None = None,
                     z: np.ndarray | None = None) -> np.ndarray:
    """Y = A^T M A per tile, tiles side by side, cropped; then the epilogue."""
    at, _, _ = transform_matrices(call, m_array.dtype)
    n, k, out_h, out_w = call["out_shape"]
    if not call["fold_batch"]:
        n = m_array.shape[0]
    canonical = _from_layout(call, m_array, n)         # [xi, nu, N, G, k, th, tw]
    y = np.tensordot(at, canonical, axes=([1], [0]))   # A^T M: [u, nu, N, G, k, th, tw]
    y = np.tensordot(y, at, axes=([1], [1]))           # (A^T M) A: [u, N, G, k, th, tw, v]
    th, tw = call["tiles"]
    m = call["m"]
    y = y.transpose(1, 2, 3, 4, 0, 5, 6).reshape(n, k, th * m, tw * m)[:, :, :out_h, :out_w]
    y = np.ascontiguousarray(y, dtype=m_array.dtype)
    return apply_epilogue(call, y, b, z, bias_axis=1)


def output_flops(call: OpCall, out_types) -> int:
    mt, y = call.in_types[0], out_types[0]
    if not mt.is_static or not y.is_static:
        return 0
    at, _, _ = transform_matrices(call, mt.np_dtype)
    a, m = _alpha(call), call["m"]
    tile_channels = mt.numel // (a * a)
    epilogue = sum(1 for i in (1, 2) if call.has_input(i)) + bool(call["activation"])
    return tile_channels * 2 * _nnz(at) * (a + m) + epilogue * y.numel


register(OpDef(
    name="WinogradOutput", inputs=("M", "B?", "Z?"), outputs=("Y",),
    attrs={**COMMON_ATTRS, **LAYOUT_ATTRS, "out_shape": ints(), **EPILOGUE_ATTRS},
    infer=infer_output, reference=output_reference, kind="out-fusable", flops=output_flops,
    epilogue_bias_axis=1,
    doc="Winograd output transform: M -> Y [N, K, OH, OW] (A^T M A per tile, cropped) with "
        "the fused epilogue activation(Y + B + Z)"))


# -- WinogradConv: the three run-time stages in one op ----------------------------------------
def infer_conv(call: OpCall) -> list[TensorType]:
    """X [N, C, H, W] and U [a*a, C, K] -> Y [N, K, OH, OW]; group 1 and a static batch only
    (the fused kernel walks blocks of the folded tile axis)."""
    x = _float_operand(call, 0, "X", 4)
    u = _float_operand(call, 1, "U", 3)
    if call["group"] != 1 or not call["fold_batch"]:
        raise call.error("the fused form takes group=1 and fold_batch=1 (use the staged ops)")
    v_type = infer_input(call)[0]                     # checks pads, tiles and X
    a2, c = v_type.shape[0], v_type.shape[2]
    if u.dtype != x.dtype or u.shape[:2] != (a2, c) or not isinstance(u.shape[2], int):
        raise call.error(f"U must be {x.dtype}[{a2}, {c}, K] for X {x}, got {u}")
    n, k = _output_shape(call)[:2]
    if n != x.shape[0] or k != u.shape[2]:
        raise call.error(f"out_shape {list(call['out_shape'])} does not match X {x} and U {u}")
    return infer_output(_as_output_call(call, TensorType((a2, v_type.shape[1], k), x.dtype)))


def _as_output_call(call: OpCall, m_type: TensorType) -> OpCall:
    """The call as WinogradOutput sees it: inputs (M, B?, Z?) instead of (X, U, B?, Z?)."""
    return dataclasses.replace(call, in_types=(m_type, *call.in_types[2:]), in_values=())


def conv_reference(call: OpCall, x: np.ndarray, u: np.ndarray, b: np.ndarray | None = None,
                   z: np.ndarray | None = None) -> np.ndarray:
    """The staged references in order: V, then M = V @ U per tile element, then the output."""
    v = input_reference(call, x)
    products = np.matmul(v, u)
    m_type = TensorType(products.shape, call.in_types[0].dtype)
    return output_reference(_as_output_call(call, m_type), products, b, z)


def conv_flops(call: OpCall, out_types) -> int:
    x, u = call.in_types[:2]
    if not (x.is_static and u.is_static):
        return 0
    a2, c, k = u.shape
    tiles = x.shape[0] * call["tiles"][0] * call["tiles"][1]
    v_type = TensorType((a2, tiles, c), x.dtype)
    m_type = TensorType((a2, tiles, k), x.dtype)
    return (input_flops(call, [v_type]) + 2 * a2 * tiles * c * k
            + output_flops(_as_output_call(call, m_type), out_types))


register(OpDef(
    name="WinogradConv", inputs=("X", "U", "B?", "Z?"), outputs=("Y",),
    attrs={**COMMON_ATTRS, **LAYOUT_ATTRS, "pads": ints(), "out_shape": ints(),
           **EPILOGUE_ATTRS},
    infer=infer_conv, reference=conv_reference, kind="out-fusable", flops=conv_flops,
    epilogue_bias_axis=1,
    doc="Winograd conv in one op: WinogradInputTransform, MatMul with U and WinogradOutput "
        "(epilogue included), so a backend can run them block by block over the tiles"))
