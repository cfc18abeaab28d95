"""Shape and data-movement ops: Flatten, Reshape, Transpose, Concat, Split, Slice, Pad, Squeeze,
Unsqueeze, Identity, ConstantOfShape, Shape, Gather and Cast.

Shape-valued inputs (Reshape's ``shape``, Slice's ``starts``/``ends``, Pad's ``pads``, ...) must
be constants for the shape rules; the references read them from their run-time arrays instead,
so that the ONNX importer can fold shape-computing subgraphs by running the references on small
int64 tensors (all index arithmetic here is done on Python ints, never through floats).

A symbolic dim (e.g. the batch ``N``) passes through wherever its size does not matter; where an
op would have to compute with it (merge it with other dims, slice or pad it) the shape rule
raises an error naming the node instead of inventing a new symbol.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..errors import GraphcError
from ..types import Dim, TensorType, dtype_name
from .gradients import vjp
from .registry import ImportContext, OpCall, OpDef, int_, ints, register, string, tensor
from .rules import as_int_list, normalize_axes, normalize_axis, same_as_input

# Slice ends/starts at least this large (in magnitude) mean "to the end" even on symbolic dims:
# exporters write INT_MAX / INT64_MAX there.
_TO_THE_END = 2**31 - 1


def _no_flops(call: OpCall, out_types) -> int:
    """Data movement: no arithmetic."""
    return 0


def _shape_input(call: OpCall, i: int, what: str) -> list[int]:
    """A constant 1-D integer input (a shape, axes, pads, ...) as a list of Python ints."""
    t = call.in_types[i]
    if t.dtype not in ("i64", "i32") or t.rank != 1:
        raise call.error(f"input {i} ({what}) must be a 1-D int64 tensor, got {t}")
    return as_int_list(call.const_input(i, what))


def _dim_product(dims: Sequence[Dim], call: OpCall, what: str) -> Dim:
    """Product of ``dims``: an int, or one symbolic dim when every other factor is 1."""
    static = math.prod(d for d in dims if isinstance(d, int))
    symbols = [d for d in dims if isinstance(d, str)]
    if not symbols or static == 0:
        return static
    if len(symbols) == 1 and static == 1:
        return symbols[0]
    raise call.error(f"{what} would merge symbolic dim(s) {symbols} with other dims "
                     f"{tuple(dims)}; graphc types cannot express such a product "
                     f"(import with static input_shapes=)")


# -- Flatten --------------------------------------------------------------------------------------
def _flatten_axis(call: OpCall, rank: int) -> int:
    axis = call["axis"]
    if not -rank <= axis <= rank:
        raise call.error(f"axis {axis} out of range for rank {rank} (allowed {-rank}..{rank})")
    return axis + rank if axis < 0 else axis


def _flatten_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    axis = _flatten_axis(call, t.rank)
    outer = _dim_product(t.shape[:axis], call, "flattening the leading dims")
    inner = _dim_product(t.shape[axis:], call, "flattening the trailing dims")
    return [TensorType((outer, inner), t.dtype)]


def _flatten_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    axis = _flatten_axis(call, x.ndim)
    # explicit sizes, not -1: -1 is ambiguous when the tensor is empty
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


register(OpDef(
    name="Flatten", inputs=("input",), outputs=("output",), attrs={"axis": int_(1)},
    infer=_flatten_infer, reference=_flatten_ref, kind="injective", flops=_no_flops,
    doc="Reshape to 2-D: dims before `axis` form the rows, the rest the columns."))


# -- Reshape --------------------------------------------------------------------------------------
def _split_dims(dims: Sequence[Dim]) -> tuple[int, Counter]:
    """(product of the static dims, multiset of the symbolic dims)."""
    return (math.prod(d for d in dims if isinstance(d, int)),
            Counter(d for d in dims if isinstance(d, str)))


def _reshape_dims(in_shape: Sequence[Dim], spec: Sequence[int], allowzero: int,
                  call: OpCall) -> tuple[Dim, ...]:
    """ONNX Reshape's target shape: 0 copies the input dim (unless allowzero), -1 is inferred.

    Works on symbolic input shapes too: a copied symbolic dim stays symbolic, and -1 may stand
    for exactly one symbolic dim of the input that the other output dims do not account for.
    """
    out: list[Dim | None] = []
    infer_at = None
    for i, s in enumerate(spec):
        if s == -1:
            if infer_at is not None:
                raise call.error(f"shape {list(spec)} has more than one -1")
            infer_at = i
            out.append(None)
        elif s == 0 and not allowzero:
            if i >= len(in_shape):
                raise call.error(f"shape {list(spec)}: 0 at position {i} copies a dim the input "
                                 f"(rank {len(in_shape)}) does not have")
            out.append(in_shape[i])
        elif s < 0:
            raise call.error(f"shape {list(spec)} has invalid dim {s}")
        else:
            out.append(s)
    if allowzero and infer_at is not None and 0 in spec:
        raise call.error(f"shape {list(spec)} has both 0 and -1 with allowzero=1")
    in_static, in_symbols = _split_dims(in_shape)
    out_static, out_symbols = _split_dims([d for d in out if d is not None])
    missing, extra = in_symbols - out_symbols, out_symbols - in_symbols
    if extra:
        raise call.error(f"cannot reshape {tuple(in_shape)} to {list(spec)}: the result would "
                         f"have symbolic dims {sorted(extra)} the input does not account for")
    bad = call.error(f"cannot reshape {tuple(in_shape)} to {list(spec)}")
    if infer_at is None:
        if missing or in_static != out_static:
            raise bad
        return tuple(out)
    if missing:
        # -1 must be exactly the one symbolic factor left over
        if sum(missing.values()) != 1 or in_static != out_static:
            raise bad
        out[infer_at] = next(iter(missing))
    else:
        if out_static == 0 or in_static % out_static:
            raise bad
        out[infer_at] = in_static // out_static
    return tuple(out)


def _reshape_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    spec = _shape_input(call, 1, "shape")
    return [t.with_shape(_reshape_dims(t.shape, spec, call["allowzero"], call))]


def _reshape_ref(call: OpCall, x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    return x.reshape(_reshape_dims(x.shape, as_int_list(shape), call["allowzero"], call))


register(OpDef(
    name="Reshape", inputs=("data", "shape"), outputs=("reshaped",),
    attrs={"allowzero": int_(0, choices=(0, 1))},
    infer=_reshape_infer, reference=_reshape_ref, kind="injective", flops=_no_flops,
    doc="Reshape to `shape` (0 copies the input dim unless allowzero=1; one -1 is inferred)."))


# -- Transpose ------------------------------------------------------------------------------------
def _transpose_perm(call: OpCall, rank: int) -> tuple[int, ...]:
    perm = call["perm"]
    if perm is None or len(perm) == 0:
        return tuple(reversed(range(rank)))
    if sorted(perm) != list(range(rank)):
        raise call.error(f"perm {tuple(perm)} is not a permutation of the {rank} axes")
    return tuple(perm)


def _transpose_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    perm = _transpose_perm(call, t.rank)
    return [t.with_shape(t.shape[p] for p in perm)]


def _transpose_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, _transpose_perm(call, x.ndim))


register(OpDef(
    name="Transpose", inputs=("data",), outputs=("transposed",), attrs={"perm": ints(None)},
    infer=_transpose_infer, reference=_transpose_ref, kind="injective", flops=_no_flops,
    doc="Permute the axes (default: reverse them)."))


# -- Concat ---------------------------------------------------------------------------------------
def _merge_dim(a: Dim, b: Dim, call: OpCall, axis: int) -> Dim:
    """Two dims that must agree; a static dim wins over a symbolic one."""
    if isinstance(a, int) and isinstance(b, int):
        if a != b:
            raise call.error(f"inputs differ in dim {axis} ({a} vs {b}), which is not the "
                             f"concatenation axis")
        return a
    return a if isinstance(a, int) else b


def _concat_infer(call: OpCall) -> list[TensorType]:
    types = call.in_types
    first = types[0]
    if first.rank == 0:
        raise call.error("cannot concatenate scalars")
    axis = normalize_axis(call["axis"], first.rank, call)
    shape = list(first.shape)
    for t in types[1:]:
        if t.dtype != first.dtype or t.rank != first.rank:
            raise call.error(f"inputs must share dtype and rank: {first} vs {t}")
        for i, d in enumerate(t.shape):
            if i != axis:
                shape[i] = _merge_dim(shape[i], d, call, i)
    along = [t.shape[axis] for t in types]
    shape[axis] = _dim_sum(along, call)
    return [first.with_shape(shape)]


def _dim_sum(dims: Sequence[Dim], call: OpCall) -> Dim:
    """Sum of dims along the concatenation axis: an int, or one symbolic dim plus zeros."""
    symbols = [d for d in dims if isinstance(d, str)]
    static = sum(d for d in dims if isinstance(d, int))
    if not symbols:
        return static
    if len(symbols) == 1 and static == 0:
        return symbols[0]
    raise call.error(f"concatenating symbolic dims {tuple(dims)} along the axis; graphc types "
                     f"cannot express the sum")


def _concat_ref(call: OpCall, *arrays: np.ndarray) -> np.ndarray:
    return np.concatenate(arrays, axis=normalize_axis(call["axis"], arrays[0].ndim, call))


register(OpDef(
    name="Concat", inputs=("inputs*",), outputs=("concat_result",), attrs={"axis": int_()},
    infer=_concat_infer, reference=_concat_ref, kind="injective", flops=_no_flops,
    doc="Concatenate the inputs along `axis` (negative counts from the end)."))


# -- Split ----------------------------------------------------------------------------------------
def _split_sizes(call: OpCall, dim: Dim, split: list[int] | None) -> list[Dim]:
    """Chunk sizes along the split axis: from ``split``, ``num_outputs`` or the output count."""
    num_outputs = call["num_outputs"]
    n_outputs = call.n_outputs
    if split is not None:
        if num_outputs is not None:
            raise call.error("give either the split input or num_outputs, not both")
        if min(split, default=0) < 0:
            raise call.error(f"negative split sizes {split}")
        if isinstance(dim, int) and sum(split) != dim:
            raise call.error(f"split sizes {split} sum to {sum(split)}, not the axis size {dim}")
        sizes: list[Dim] = list(split)
    elif num_outputs is not None:
        if num_outputs < 1:
            raise call.error(f"num_outputs must be positive, got {num_outputs}")
        if not isinstance(dim, int):
            raise call.error(f"cannot split symbolic dim {dim} into {num_outputs} chunks")
        chunk = -(-dim // num_outputs)  # ceil: the last chunk is the smaller one
        last = dim - chunk * (num_outputs - 1)
        if last < 0:
            raise call.error(f"axis size {dim} cannot be split into {num_outputs} chunks")
        sizes = [chunk] * (num_outputs - 1) + [last]
    elif n_outputs == 1:
        sizes = [dim]
    else:
        if not isinstance(dim, int) or dim % n_outputs:
            raise call.error(f"axis size {dim} does not split evenly into {n_outputs} outputs")
        sizes = [dim // n_outputs] * n_outputs
    if n_outputs > 1 and len(sizes) != n_outputs:
        raise call.error(f"{len(sizes)} chunks but the node has {n_outputs} outputs")
    return sizes


def _split_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    axis = normalize_axis(call["axis"], t.rank, call)
    split = _shape_input(call, 1, "split") if call.has_input(1) else None
    sizes = _split_sizes(call, t.shape[axis], split)
    return [t.with_shape(t.shape[:axis] + (s,) + t.shape[axis + 1:]) for s in sizes]


def _split_ref(call: OpCall, x: np.ndarray, split: np.ndarray | None = None) -> tuple:
    axis = normalize_axis(call["axis"], x.ndim, call)
    sizes = _split_sizes(call, x.shape[axis], None if split is None else as_int_list(split))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _import_split(ctx: ImportContext) -> None:
    """Split < 13 takes `split` as an attribute."""
    if ctx.opset < 13:
        ctx.attr_to_input("split", 1)


register(OpDef(
    name="Split", inputs=("input", "split?"), outputs=("outputs*",),
    attrs={"axis": int_(0), "num_outputs": int_(None)},
    infer=_split_infer, reference=_split_ref, kind="injective", flops=_no_flops,
    onnx_import=_import_split,
    doc="Split along `axis` into chunks given by `split`, or num_outputs (last chunk smaller),"
        " or as many equal chunks as the node has outputs."))


# -- Slice ----------------------------------------------------------------------------------------
def _clamp_slice(dim: int, start: int, end: int, step: int) -> tuple[int, int, int]:
    """ONNX Slice's clamping of one axis: (start, end, length), end may be -1 for step < 0."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    length = max(0, -(-(end - start) // step))
    return start, end, length


def _slice_params(call: OpCall, rank: int, starts, ends, axes, steps) -> list[tuple]:
    """(axis, start, end, step) per sliced axis, with the ONNX defaults and checks."""
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise call.error(f"starts, ends, axes and steps differ in length: {len(starts)}, "
                         f"{len(ends)}, {len(axes)}, {len(steps)}")
    if 0 in steps:
        raise call.error("steps must not be 0")
    axes = normalize_axes(axes, rank, call)
    return list(zip(axes, starts, ends, steps))


def _slice_symbolic(dim: str, start: int, end: int, step: int, call: OpCall) -> str:
    """A slice of a symbolic dim is only typeable when it keeps the whole axis."""
    forward = (step == 1 and (start == 0 or start <= -_TO_THE_END)
               and end >= _TO_THE_END)
    backward = (step == -1 and (start == -1 or start >= _TO_THE_END)
                and end <= -_TO_THE_END)
    if forward or backward:
        return dim
    raise call.error(f"slicing symbolic dim {dim} with start={start}, end={end}, step={step} "
                     f"gives a size graphc types cannot express")


def _slice_inputs(call: OpCall) -> tuple:
    """The constant starts, ends, axes and steps (None where absent) for the shape rule."""
    starts, ends = _shape_input(call, 1, "starts"), _shape_input(call, 2, "ends")
    axes = _shape_input(call, 3, "axes") if call.has_input(3) else None
    steps = _shape_input(call, 4, "steps") if call.has_input(4) else None
    return starts, ends, axes, steps


def _slice_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    params = _slice_params(call, t.rank, *_slice_inputs(call))
    shape = list(t.shape)
    for axis, start, end, step in params:
        dim = shape[axis]
        if isinstance(dim, str):
            shape[axis] = _slice_symbolic(dim, start, end, step, call)
        else:
            shape[axis] = _clamp_slice(dim, start, end, step)[2]
    return [t.with_shape(shape)]


def _slice_ref(call: OpCall, x: np.ndarray, starts, ends, axes=None, steps=None) -> np.ndarray:
    params = _slice_params(call, x.ndim, as_int_list(starts), as_int_list(ends),
                           None if axes is None else as_int_list(axes),
                           None if steps is None else as_int_list(steps))
    index = [slice(None)] * x.ndim
    for axis, start, end, step in params:
        start, end, length = _clamp_slice(x.shape[axis], start, end, step)
        # end == -1 (step < 0) means "past index 0", which a Python slice spells None
        index[axis] = slice(start, end if end >= 0 else None, step) if length else slice(0, 0)
    return x[tuple(index)]


def _import_slice(ctx: ImportContext) -> None:
    """Slice < 10 takes starts/ends/axes as attributes (and has no steps)."""
    if ctx.opset < 10:
        for position, attr in enumerate(("starts", "ends", "axes"), start=1):
            ctx.attr_to_input(attr, position)


register(OpDef(
    name="Slice", inputs=("data", "starts", "ends", "axes?", "steps?"), outputs=("output",),
    infer=_slice_infer, reference=_slice_ref, kind="injective", flops=_no_flops,
    onnx_import=_import_slice,
    doc="data[starts:ends:steps] along `axes`; negative indices count from the end and are "
        "clamped to the axis."))


# -- Pad ------------------------------------------------------------------------------------------
_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_widths(call: OpCall, rank: int, pads: list[int],
                axes: list[int] | None) -> list[tuple[int, int]]:
    """(begin, end) per axis; negative values crop."""
    axes = list(range(rank)) if axes is None else list(normalize_axes(axes, rank, call))
    if len(pads) != 2 * len(axes):
        raise call.error(f"pads has {len(pads)} values, expects {2 * len(axes)} "
                         f"(begins then ends for axes {axes})")
    widths = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[len(axes) + i])
    return widths


def _check_pad_source(call: OpCall, kept: int, begin: int, end: int) -> None:
    """Non-constant modes read the (cropped) input: it must be large enough to read from."""
    mode, grow = call["mode"], max(begin, 0, end)
    if mode == "constant" or grow == 0:
        return
    if kept <= 0:
        raise call.error(f"mode {mode} cannot pad an empty axis")
    if mode == "reflect" and grow > kept - 1:
        # a single reflection (as onnxruntime and PyTorch do); numpy would reflect repeatedly
        raise call.error(f"mode reflect pads ({begin}, {end}) exceed the axis size {kept} - 1")


def _pad_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    axes = _shape_input(call, 3, "axes") if call.has_input(3) else None
    widths = _pad_widths(call, t.rank, _shape_input(call, 1, "pads"), axes)
    if call.has_input(2):
        value = call.in_types[2]
        if value.is_static and value.numel != 1:
            raise call.error(f"constant_value must be a scalar, got {value}")
    shape = []
    for dim, (begin, end) in zip(t.shape, widths):
        if isinstance(dim, str):
            if begin or end:
                raise call.error(f"cannot pad symbolic dim {dim} by ({begin}, {end})")
            shape.append(dim)
            continue
        size = dim + begin + end
        if size < 0:
            raise call.error(f"pads ({begin}, {end}) crop more than the dim {dim}")
        _check_pad_source(call, dim + min(begin, 0) + min(end, 0), begin, end)
        shape.append(size)
    return [t.with_shape(shape)]


def _pad_ref(call: OpCall, x: np.ndarray, pads: np.ndarray, value=None, axes=None):
    widths = _pad_widths(call, x.ndim, as_int_list(pads),
                         None if axes is None else as_int_list(axes))
    # negative pads crop first; the positive ones then pad what is left
    crop = tuple(slice(-min(b, 0), dim + min(e, 0)) for dim, (b, e) in zip(x.shape, widths))
    x_cropped = x[crop]
    grow = [(max(b, 0), max(e, 0)) for b, e in widths]
    mode = call["mode"]
    if mode == "constant":
        fill = x.dtype.type(0) if value is None else np.asarray(value).ravel()[0]
        # older opsets give the value as a float attribute, whatever the data dtype
        fill = np.asarray(fill).astype(x.dtype)
        return np.pad(x_cropped, grow, mode="constant", constant_values=fill)
    return np.pad(x_cropped, grow, mode=mode)


def _import_pad(ctx: ImportContext) -> None:
    """Pad < 11 takes `pads` and `value` as attributes."""
    if ctx.opset < 11:
        ctx.attr_to_input("pads", 1)
        ctx.attr_to_input("value", 2, dtype=np.float32)


register(OpDef(
    name="Pad", inputs=("data", "pads", "constant_value?", "axes?"), outputs=("output",),
    attrs={"mode": string("constant", choices=_PAD_MODES)},
    infer=_pad_infer, reference=_pad_ref, kind="injective", flops=_no_flops,
    onnx_import=_import_pad,
    doc="Pad (negative pads crop) with a constant, or by reflecting, repeating the edge or "
        "wrapping around."))


# -- Squeeze / Unsqueeze --------------------------------------------------------------------------
def _import_axes_input(ctx: ImportContext) -> None:
    """Squeeze/Unsqueeze < 13 take `axes` as an attribute."""
    if ctx.opset < 13:
        ctx.attr_to_input("axes", 1)


def _squeeze_axes(call: OpCall, shape: Sequence[Dim], axes: list[int] | None) -> tuple:
    if axes is None:
        if any(isinstance(d, str) for d in shape):
            raise call.error(f"Squeeze without axes on symbolic shape {tuple(shape)}: whether a "
                             f"symbolic dim is 1 is not known; give the axes")
        return tuple(i for i, d in enumerate(shape) if d == 1)
    axes = normalize_axes(axes, len(shape), call)
    for a in axes:
        if isinstance(shape[a], int) and shape[a] != 1:
            raise call.error(f"cannot squeeze axis {a} of size {shape[a]}")
    return axes


def _squeeze_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    axes = _shape_input(call, 1, "axes") if call.has_input(1) else None
    drop = _squeeze_axes(call, t.shape, axes)
    return [t.with_shape(d for i, d in enumerate(t.shape) if i not in drop)]


def _squeeze_ref(call: OpCall, x: np.ndarray, axes=None) -> np.ndarray:
    drop = _squeeze_axes(call, x.shape, None if axes is None else as_int_list(axes))
    return x.reshape(tuple(d for i, d in enumerate(x.shape) if i not in drop))


register(OpDef(
    name="Squeeze", inputs=("data", "axes?"), outputs=("squeezed",),
    infer=_squeeze_infer, reference=_squeeze_ref, kind="injective", flops=_no_flops,
    onnx_import=_import_axes_input,
    doc="Remove the size-1 dims at `axes` (all size-1 dims when axes is absent)."))


def _unsqueeze_shape(call: OpCall, shape: Sequence[Dim], axes: list[int]) -> tuple:
    rank = len(shape) + len(axes)
    new = set(normalize_axes(axes, rank, call))
    rest = iter(shape)
    return tuple(1 if i in new else next(rest) for i in range(rank))


def _unsqueeze_infer(call: OpCall) -> list[TensorType]:
    t = call.in_types[0]
    return [t.with_shape(_unsqueeze_shape(call, t.shape, _shape_input(call, 1, "axes")))]


def _unsqueeze_ref(call: OpCall, x: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return x.reshape(_unsqueeze_shape(call, x.shape, as_int_list(axes)))


register(OpDef(
    name="Unsqueeze", inputs=("data", "axes"), outputs=("expanded",),
    infer=_unsqueeze_infer, reference=_unsqueeze_ref, kind="injective", flops=_no_flops,
    onnx_import=_import_axes_input,
    doc="Insert size-1 dims at `axes` (positions in the output)."))


# -- Identity -------------------------------------------------------------------------------------
def _identity_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    return x


register(OpDef(
    name="Identity", inputs=("input",), outputs=("output",),
    infer=same_as_input(0), reference=_identity_ref, kind="elementwise", flops=_no_flops,
    doc="The input, unchanged."))


# -- ConstantOfShape ------------------------------------------------------------------------------
def _fill_value(call: OpCall) -> np.ndarray:
    value = call["value"]
    if value is None:
        return np.zeros((1,), np.float32)
    value = np.asarray(value)
    if value.size != 1:
        raise call.error(f"value must hold one element, got shape {value.shape}")
    try:
        dtype_name(value.dtype)
    except GraphcError as exc:
        raise call.error(f"value has unsupported dtype {value.dtype}") from exc
    return value


def _constant_of_shape_infer(call: OpCall) -> list[TensorType]:
    shape = _shape_input(call, 0, "shape")
    if min(shape, default=0) < 0:
        raise call.error(f"negative dims in shape {shape}")
    return [TensorType(tuple(shape), dtype_name(_fill_value(call).dtype))]


def _constant_of_shape_ref(call: OpCall, shape: np.ndarray) -> np.ndarray:
    value = _fill_value(call)
    return np.full(tuple(as_int_list(shape)), value.ravel()[0], dtype=value.dtype)


register(OpDef(
    name="ConstantOfShape", inputs=("input",), outputs=("output",),
    attrs={"value": tensor(None)},
    infer=_constant_of_shape_infer, reference=_constant_of_shape_ref, kind="opaque",
    flops=_no_flops,
    doc="A tensor of the given shape filled with `value` (default float32 0)."))


# -- Shape ----------------------------------------------------------------------------------------
def _shape_range(call: OpCall, rank: int) -> tuple[int, int]:
    """ONNX Shape's start/end: negative counts from the end, both clamped to [0, rank]."""
    start, end = call["start"], call["end"]
    end = rank if end is None else end
    start, end = (v + rank if v < 0 else v for v in (start, end))
    return min(max(start, 0), rank), min(max(end, 0), rank)


def _shape_infer(call: OpCall) -> list[TensorType]:
    start, end = _shape_range(call, call.in_types[0].rank)
    return [TensorType((max(0, end - start),), "i64")]


def _shape_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    start, end = _shape_range(call, x.ndim)
    return np.array(x.shape[start:end], dtype=np.int64)


register(OpDef(
    name="Shape", inputs=("data",), outputs=("shape",),
    attrs={"start": int_(0), "end": int_(None)},
    infer=_shape_infer, reference=_shape_ref, kind="opaque", flops=_no_flops,
    doc="The input's shape (dims start..end) as an int64 vector."))


# -- Gather ---------------------------------------------------------------------------------------
def _gather_infer(call: OpCall) -> list[TensorType]:
    data, indices = call.in_types[0], call.in_types[1]
    if data.rank == 0:
        raise call.error("cannot gather from a scalar")
    if indices.dtype not in ("i32", "i64"):
        raise call.error(f"indices must be int32 or int64, got {indices}")
    axis = normalize_axis(call["axis"], data.rank, call)
    dim = data.shape[axis]
    known = call.in_values[1] if len(call.in_values) > 1 else None
    if known is not None and isinstance(dim, int):
        _check_indices(call, known, dim)
    return [data.with_shape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])]


def _check_indices(call: OpCall, indices: np.ndarray, dim: int) -> None:
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        raise call.error(f"indices out of range [{-dim}, {dim - 1}]: min {indices.min()}, "
                         f"max {indices.max()}")


def _gather_ref(call: OpCall, data: np.ndarray, indices: np.ndarray) -> np.ndarray:
    axis = normalize_axis(call["axis"], data.ndim, call)
    _check_indices(call, indices, data.shape[axis])
    return np.take(data, indices, axis=axis)


register(OpDef(
    name="Gather", inputs=("data", "indices"), outputs=("output",), attrs={"axis": int_(0)},
    infer=_gather_infer, reference=_gather_ref, kind="injective", flops=_no_flops,
    doc="Entries of `data` along `axis` at `indices` (any rank; negative counts from the end)."))


# -- Cast -----------------------------------------------------------------------------------------
# ONNX TensorProto data type numbers of the dtypes graphc has; the names of the others are kept
# for error messages (strings, complex, bfloat16, float8/float4, int4/int2 are not supported).
_ONNX_DTYPES = {1: "f32", 2: "u8", 3: "i8", 4: "u16", 5: "i16", 6: "i32", 7: "i64", 9: "bool",
                10: "f16", 11: "f64", 12: "u32", 13: "u64"}
_ONNX_UNSUPPORTED = {0: "UNDEFINED", 8: "STRING", 14: "COMPLEX64", 15: "COMPLEX128",
                     16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2",
                     20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1",
                     24: "FLOAT8E8M0", 25: "UINT2", 26: "INT2"}


def _cast_target_problem(to: int) -> str | None:
    if to in _ONNX_DTYPES:
        return None
    name = _ONNX_UNSUPPORTED.get(to, f"data type number {to}")
    return f"cast to {name} is not supported (graphc dtypes: {sorted(_ONNX_DTYPES.values())})"


def _cast_target(call: OpCall) -> str:
    problem = _cast_target_problem(call["to"])
    if problem:
        raise call.error(problem)
    return _ONNX_DTYPES[call["to"]]


def _cast_infer(call: OpCall) -> list[TensorType]:
    return [call.in_types[0].with_dtype(_cast_target(call))]


def _cast_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(TensorType((), _cast_target(call)).np_dtype)


register(OpDef(
    name="Cast", inputs=("input",), outputs=("output",),
    attrs={"to": int_(check=_cast_target_problem), "saturate": int_(1, choices=(0, 1))},
    infer=_cast_infer, reference=_cast_ref, kind="elementwise", flops=_no_flops,
    doc="Convert to the ONNX data type `to` (a TensorProto number: 1 float32, 7 int64, ...)."))


# -- gradient (vjp) rules (see graphc.autodiff) -------------------------------------------------
@vjp("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape_grad(ctx, node, grads):
    return [ctx.reshape_like(grads[0], 0)]  # the same elements in X's shape


@vjp("Identity")
def _identity_grad(ctx, node, grads):
    return [grads[0]]


@vjp("Cast")
def _cast_grad(ctx, node, grads):
    # float -> float (integer casts never carry gradients: the driver rejects them)
    return [ctx.op("Cast", grads[0], to=_ONNX_CODES[ctx.in_type(0).dtype])]


_ONNX_CODES = {v: k for k, v in _ONNX_DTYPES.items()}


@vjp("Transpose")
def _transpose_grad(ctx, node, grads):
    perm = _transpose_perm(OpCall("Transpose", node.name, ctx.attrs, ()), ctx.in_type(0).rank)
    return [ctx.transpose(grads[0], np.argsort(perm).tolist())]  # the inverse permutation


@vjp("Concat")
def _concat_grad(ctx, node, grads):
    """Each input gets its slab of dY along the axis."""
    g = grads[0]
    axis = ctx.attrs["axis"] % g.type.rank
    out, offset = [], 0
    for i in range(len(node.inputs)):
        size = ctx.in_type(i).shape[axis]
        if not isinstance(size, int):
            if len(node.inputs) > 1:
                raise ctx.error(f"input {i} has symbolic size {size} along the axis")
            return [g]
        out.append(_slab(ctx, g, axis, offset, size) if ctx.needs(i) else None)
        offset += size
    return out


def _slab(ctx, g, axis: int, start: int, size: int):
    if start == 0 and size == g.shape[axis]:
        return g
    return ctx.op("Slice", g, ctx.ints([start]), ctx.ints([start + size]), ctx.ints([axis]))


@vjp("Split")
def _split_grad(ctx, node, grads):
    """dX = the outputs' gradients concatenated (zeros for outputs no gradient reaches)."""
    axis = ctx.attrs["axis"] % ctx.in_type(0).rank
    parts = [g if g is not None else ctx.broadcast_like(ctx.scalar(0.0, ctx.output(i)),
                                                        ctx.output(i))
             for i, g in enumerate(grads)]
    return [parts[0] if len(parts) == 1 else ctx.op("Concat", *parts, axis=axis)]


@vjp("Slice")
def _slice_grad(ctx, node, grads):
    """dY scattered back to the sliced positions, zeros elsewhere: per sliced axis, dY is
    reversed (negative steps), spread by the step (zeros between) and padded into place."""
    g = grads[0]
    x_t = ctx.in_type(0)
    values = [ctx.const_input(i, what) if i < 3 or ctx.has_input(i) else None
              for i, what in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))]
    params = _slice_params(OpCall("Slice", node.name, ctx.attrs, ()), x_t.rank,
                           *[None if v is None else as_int_list(v) for v in values])
    for axis, start, end, step in params:
        dim = x_t.shape[axis]
        if not isinstance(dim, int):
            continue  # the shape rule only allows whole symbolic axes
        start, _, length = _clamp_slice(dim, start, end, step)
        if length == 0:
            return [ctx.broadcast_like(ctx.scalar(0.0, g), ctx.input(0))]
        first = start
        if step < 0:
            g = ctx.op("Slice", g, ctx.ints([-1]), ctx.ints([-(2 ** 62)]), ctx.ints([axis]),
                       ctx.ints([-1]))
            first = start + (length - 1) * step
        g = ctx.upsample(g, axis, abs(step))
        pads = [0] * (2 * x_t.rank)
        pads[axis], pads[x_t.rank + axis] = first, dim - first - length * abs(step)
        if any(pads):
            g = ctx.op("Pad", g, ctx.ints(pads))
    return [g]


@vjp("Pad")
def _pad_grad(ctx, node, grads):
    """Constant mode: dX is dY cropped back (Pad by the negated pads: crops undo pads, pads of
    zeros undo crops); the fill value gets the sum of dY over the padding."""
    if ctx.attrs["mode"] != "constant":
        raise ctx.error(f"mode '{ctx.attrs['mode']}' has no gradient rule (constant mode only)")
    g = grads[0]
    x_t = ctx.in_type(0)
    axes = as_int_list(ctx.const_input(3, "axes")) if ctx.has_input(3) else None
    widths = _pad_widths(OpCall("Pad", node.name, ctx.attrs, ()), x_t.rank,
                         as_int_list(ctx.const_input(1, "pads")), axes)
    negated = [-b for b, _ in widths] + [-e for _, e in widths]
    dx = ctx.op("Pad", g, ctx.ints(negated)) if any(negated) else g
    dvalue = None
    if ctx.needs(2):
        padding_sum = ctx.op("ReduceSum", g, keepdims=0) - ctx.op("ReduceSum", dx, keepdims=0)
        dvalue = ctx.reshape_like(padding_sum, 2)
    return [dx if ctx.needs(0) else None, None, dvalue]


@vjp("Gather")
def _gather_grad(ctx, node, grads):
    # w.r.t. data: scatter-add; the indices are integers (the driver rejects a gradient there)
    return [ctx.op("GatherGrad", grads[0], ctx.input(1), ctx.input(0), axis=ctx.attrs["axis"])]
