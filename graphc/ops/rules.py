"""Shape-rule building blocks shared by the op families (broadcasting, axes, pooling windows)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..types import Dim, TensorType
from .registry import OpCall


def broadcast_dims(a: Sequence[Dim], b: Sequence[Dim], call: OpCall) -> tuple[Dim, ...]:
    """Numpy (multidirectional) broadcasting of two shapes; symbolic dims broadcast with 1."""
    out = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1 or isinstance(x, str) and isinstance(y, int):
            out.append(y)
        elif isinstance(y, str) and isinstance(x, int):
            out.append(x)
        else:
            raise call.error(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
    return tuple(reversed(out))


def broadcast(call: OpCall) -> list[TensorType]:
    """All (present) inputs broadcast together; the result has the first input's dtype."""
    types = [t for t in call.in_types if t is not None]
    shape: tuple = types[0].shape
    for t in types[1:]:
        if t.dtype != types[0].dtype:
            raise call.error(f"input dtypes differ: {types[0].dtype} and {t.dtype}")
        shape = broadcast_dims(shape, t.shape, call)
    return [TensorType(shape, types[0].dtype)]


def same_as_input(index: int = 0):
    def rule(call: OpCall) -> list[TensorType]:
        return [call.in_types[index]]

    rule.__name__ = f"same_as_input_{index}"
    return rule


def float_input(call: OpCall, index: int = 0) -> TensorType:
    t = call.in_types[index]
    if t.dtype not in ("f16", "f32", "f64"):
        raise call.error(f"input {index} must be a float tensor, got {t}")
    return t


def normalize_axis(axis: int, rank: int, call: OpCall) -> int:
    if not -rank <= axis < max(rank, 1):
        raise call.error(f"axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def normalize_axes(axes, rank: int, call: OpCall) -> tuple[int, ...]:
    out = tuple(normalize_axis(int(a), rank, call) for a in axes)
    if len(set(out)) != len(out):
        raise call.error(f"repeated axis in {tuple(axes)}")
    return out


def elementwise_flops(call: OpCall, out_types) -> int:
    t = out_types[0]
    return t.numel if t.is_static else 0


def window_output(size: int, kernel: int, stride: int, dilation: int, pad_begin: int,
                  pad_end: int, ceil_mode: bool = False) -> int:
    """Output length of a sliding window (conv or pool) along one axis."""
    effective = dilation * (kernel - 1) + 1
    span = size + pad_begin + pad_end - effective
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1  # the last window must start inside the input or the begin padding
    return out


def resolve_pads(call: OpCall, spatial: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> tuple[int, ...]:
    """Explicit pads (begins then ends) from ``pads``/``auto_pad`` as ONNX defines them."""
    n = len(spatial)
    auto_pad = call.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = call.attrs.get("pads") or (0,) * (2 * n)
        if auto_pad == "VALID":
            pads = (0,) * (2 * n)
        if len(pads) != 2 * n:
            raise call.error(f"pads has {len(pads)} values, expects {2 * n}")
        if min(pads) < 0:
            raise call.error(f"negative pads {tuple(pads)}")
        return tuple(int(p) for p in pads)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return tuple(begins + ends)


def spatial_attr(call: OpCall, name: str, n: int, fill: int) -> tuple[int, ...]:
    value = call.attrs.get(name)
    if value is None or len(value) == 0:
        return (fill,) * n
    if len(value) != n:
        raise call.error(f"{name} has {len(value)} values, expects {n} (one per spatial axis)")
    if min(value) < 1:
        raise call.error(f"{name} must be positive, got {tuple(value)}")
    return tuple(int(v) for v in value)


def as_int_list(array: np.ndarray) -> list[int]:
    return [int(v) for v in np.asarray(array).ravel()]
