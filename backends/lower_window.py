"""Lowering of the windowed ops to kernel IR: pooling, LRN, Im2Col and the Winograd stages.

Registered into ``backends.lower.LOWERINGS`` (``lower.py`` imports this module at its end):
MaxPool (with the optional argmax Indices, both ``storage_order``\\ s), AveragePool, LRN, Im2Col,
WinogradFilterTransform, WinogradInputTransform and WinogradOutput (with its fused epilogue).

Geometry. Every op here slides a window over static spatial axes; ``Axis`` describes one axis
(input size, taps, stride, dilation, begin pad, output length) with the numbers the op's own
shape rule computes (``pool_window``, ``im2col_window``, the Winograd tile grid), so sizes cannot
drift from the references. Tap ``t`` of output position ``o`` reads input coordinate
``o * stride + t * dilation - pad``; coordinates outside ``[0, size)`` read the op's fill (-inf
for MaxPool, 0 elsewhere), which is how the references pad.

Borders without branches. The kernel IR has no conditionals and every load must be in bounds,
so each output axis is cut into *segments* at the positions where some tap enters or leaves the
input. Inside such a segment every tap is either always inside or always outside, so the guard
folds to a constant (``Block.index`` simplifies it over the loop ranges): interior segments load
directly, border segments drop or zero the outside taps, and no select or clamp remains. Only
when that would emit too much code (``UNROLL_BUDGET`` tap bodies) do the borders fall back to
coarse segments whose loads are clamped into range and selected against the fill.

Loop shape. Pooling outputs are viewed ``[planes, *out]`` (planes = N*C); the top-level loops
are ``parallel`` over planes times the positions of the first spatial axis (one loop per segment
of that axis; 1-D ops split planes only) and the innermost loop runs along the last output axis
with the taps unrolled inside it (up to ``UNROLL_TAPS``; larger windows loop over their leading
kernel axes), so LLVM vectorises it (strided loads become interleaved groups). LRN runs along
the contiguous spatial positions, Im2Col along output columns (a memcpy where LLVM sees one).
The Winograd transforms are parallel over tiles and run innermost over the channels, which are
contiguous on their channel-last side. Every output element is written by exactly one iteration
of one parallel loop.

Semantics (what the tests check against ``graphc.interpret``):

* MaxPool, Im2Col and the Winograd layouts are data movement or max: bit-exact, NaN propagates
  (``llvm.maximum``); MaxPool's Indices follow ``np.argmax`` (first maximum, first NaN wins; a
  window whose taps are all -inf reports its first tap, even a padded one). Integer MaxPool with
  Indices compares in f64 as the reference does; a window with no tap on the input is rejected
  for integers (the reference casts -inf to an integer there, which numpy leaves undefined).
* AveragePool sums in the reference's accumulation dtype (f32 for f16) and divides by the same
  count (taps on the input, or on the padded extent with ``count_include_pad``); sums run along
  the last kernel axis first, as numpy reduces the window view, but numpy switches to pairwise
  summation for 8+ taps, so the order may differ there.
* LRN: ``x / (bias + alpha/size * sum of squares) ** beta`` with the constants rounded to x's
  dtype as numpy's weak Python scalars are; ``pow`` is the C library's, except for beta 0.75:
  ``sqrt(s) * sqrt(sqrt(s))`` (< 2 ulp, vectorised).
* Winograd: the transform matrices of ``graphc.ops.winograd_matrices`` (rounded to the dtype, as
  the references use them) are baked into straight-line code over one tile, two stages in the
  references' order. Coefficients 0 and +-1 cost no multiply, but the references' dense
  products compute ``0 * x``, which is NaN for an infinite or NaN ``x``: each output adds
  ``x - x`` (+0, or NaN exactly then) of its zero-coefficient inputs, so NaN and infinity
  spread exactly as in the references; only the order of the additions differs.
* the WinogradOutput epilogue (bias along axis 1, residual, activation) uses the scalar rules of
  the elementwise ops (``lower.apply_scalar``), the very rules their own kernels use.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graphc.ops import registry
from graphc.ops.epilogue import ACTIVATIONS
from graphc.ops.lowered_conv import im2col_window
from graphc.ops.pool import pool_window
from graphc.ops.winograd import transform_matrices

from . import kernel_ir as k
from .kernel_ir import INDEX, Const, Load
from .lower import (
    Block,
    BoundKernel,
    KernelBuilder,
    LowerContext,
    Scalar,
    _c,
    apply_scalar,
    lowering,
)

I64 = "i64"
UNROLL_TAPS = 64          # taps unrolled into the body of the innermost output loop
UNROLL_BUDGET = 4096      # unrolled tap bodies a kernel may hold before borders get coarse
IM2COL_UNROLL_RUNS = 160  # Im2Col column loops emitted before the leading taps become loops
WINOGRAD_FILTER = 3       # the Winograd ops take 3x3 filters


def _i(value: int) -> Const:
    return Const(value, INDEX)


# -- geometry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One spatial axis of a sliding window."""

    size: int       # input extent
    kernel: int     # taps
    stride: int
    dilation: int
    pad: int        # begin padding
    out: int        # output positions

    def coord(self, o, t):
        """Input coordinate (index expression) of tap ``t`` at output position ``o``."""
        start = k.mul(o, _i(self.stride))
        if isinstance(t, Const):  # o * stride + constant: the usual, unrolled case
            shift = t.value * self.dilation - self.pad
            return k.add(start, _i(shift)) if shift >= 0 else k.sub(start, _i(-shift))
        return k.sub(k.add(start, k.mul(t, _i(self.dilation))), _i(self.pad))

    def inside(self, t: int) -> tuple[int, int]:
        """The output positions ``[lo, hi)`` whose tap ``t`` lies on the input."""
        shift = t * self.dilation - self.pad
        lo = max(0, -(shift // self.stride))   # ceil(-shift / stride)
        hi = min(self.out, (self.size - 1 - shift) // self.stride + 1)
        return lo, max(lo, hi)

    def fine_segments(self) -> list[tuple[int, int]]:
        """(start, length) runs of output positions where every tap is inside or outside
        throughout."""
        cuts = {0, self.out}
        for t in range(self.kernel):
            cuts.update(min(max(c, 0), self.out) for c in self.inside(t))
        cuts = sorted(cuts)
        return [(a, b - a) for a, b in itertools.pairwise(cuts) if b > a]

    def coarse_segments(self) -> list[tuple[int, int]]:
        """The interior run (every tap inside) and the border runs around it."""
        ranges = [self.inside(t) for t in range(self.kernel)]
        lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
        if lo >= hi:
            return [(0, self.out)]
        return [(a, b - a) for a, b in ((0, lo), (lo, hi), (hi, self.out)) if b > a]


def window_axes(win, spatial: Sequence[int]) -> list[Axis]:
    n = len(spatial)
    return [Axis(spatial[i], win.kernel[i], win.strides[i], win.dilations[i], win.pads[i],
                 win.out[i]) for i in range(n)]


def loop_axes(kernel: Sequence[int]) -> int:
    """How many leading kernel axes run as loops: the trailing ones unroll while their taps
    stay within ``UNROLL_TAPS``."""
    split, taps = len(kernel), 1
    while split > 0 and taps * kernel[split - 1] <= UNROLL_TAPS:
        split -= 1
        taps *= kernel[split]
    return split


def segments(axes: Sequence[Axis], looped: int) -> list[list[tuple[int, int]]]:
    """Per-axis segments: fine (guards fold) unless the taps loop or the unrolled code would
    exceed ``UNROLL_BUDGET``."""
    fine = [a.fine_segments() for a in axes]
    taps = math.prod(a.kernel for a in axes)
    if looped == 0 and math.prod(len(f) for f in fine) * taps <= UNROLL_BUDGET:
        return fine
    return [a.coarse_segments() for a in axes]


def _check_spatial(ctx: LowerContext, spatial: Sequence[int]) -> None:
    if min(spatial, default=1) < 1:
        raise ctx.shape_error(f"empty spatial axis in {tuple(spatial)}: nothing to slide over")


# -- guarded loads --------------------------------------------------------------------------------
def inside(b: Block, coords: Sequence, sizes: Sequence[int]):
    """Whether every coordinate lies in ``[0, size)``: a bool expression, folded if decided."""
    cond = Const(1, k.BOOL)
    for c, size in zip(coords, sizes):
        cond = k.logical_and(cond, k.logical_and(k.compare(">=", c, _i(0)),
                                                 k.compare("<", c, _i(size))))
    return b.index(cond)


def window_load(b: Block, buf: str, dtype: str, lead: Sequence, coords: Sequence,
                sizes: Sequence[int], fill: Const, tail: Sequence = ()):
    """``buf[*lead, *coords, *tail]`` cast to ``fill``'s dtype, or ``fill`` where a coordinate
    is off the input; None when the load is always outside (a tap the caller may drop)."""
    coords = [b.index(c) for c in coords]
    ok = inside(b, coords, sizes)
    if ok == Const(0, k.BOOL):
        return None
    if ok == Const(1, k.BOOL):
        return k.cast(Load(buf, (*lead, *coords, *tail), dtype), fill.dtype)
    clamped = [b.index(k.minimum(k.maximum(c, _i(0)), _i(size - 1)))
               for c, size in zip(coords, sizes)]
    return k.select(ok, k.cast(Load(buf, (*lead, *clamped, *tail), dtype), fill.dtype), fill)


# -- index -> i64 (MaxPool's Indices) -------------------------------------------------------------
def as_i64(b: Block, expr, top: int):
    """The value of index expression ``expr`` in ``[0, top]`` as i64 data. The kernel IR has no
    index -> data cast, so it is assembled from its bits by selects (log2(top) of them; callers
    use it once per row and count inner positions in i64 counters)."""
    total = None
    for bit in range(max(top, 1).bit_length()):
        on = k.compare("==", k.mod(k.floordiv(expr, 1 << bit), 2), _i(1))
        term = k.select(b.index(on), Const(1 << bit, I64), Const(0, I64))
        total = term if total is None else k.Binary("+", total, term)
    return b.let(total if total is not None else Const(0, I64))


def _i64(value: int) -> Const:
    return Const(value, I64)


def counted_loop(b: Block, extent: int, start: int, fill: Callable, count: bool,
                 vectorize: bool = False) -> None:
    """A loop over ``0..extent``; with ``count``, ``fill(block, var, c)`` also gets ``c``, an
    i64 local equal to ``start + var`` (an induction variable LLVM keeps in a register)."""
    counter = b.let(_i64(start), mutable=True) if count else None

    def body(inner: Block, v) -> None:
        fill(inner, v, counter)
        if counter is not None:
            inner.emit(k.Assign(counter.name, k.Binary("+", counter, _i64(1))))

    b.loop(extent, body, vectorize=vectorize)


# -- loop nests over output positions -------------------------------------------------------------
@dataclass
class Position:
    """Where a nest body runs: the plane, the output position per axis (index expressions) and,
    when asked for, the same as i64 data."""

    plane: object
    pos: list
    plane64: object = None
    pos64: list | None = None


def position_nests(kb: KernelBuilder, planes: int, segs: Sequence[Sequence[tuple]],
                   fill: Callable[[Block, Position], None], want_i64: bool = False,
                   vector_last: bool = True, parallel_axes: int | None = None) -> list[k.For]:
    """Top-level loops covering ``planes x prod(segment lengths)`` output positions.

    The first ``parallel_axes`` axes (default: 1, or 0 for a single axis, which then stays the
    vectorised inner loop) fold into the parallel index: one parallel loop per combination of
    their segments, over (plane, position...) tuples. The other axes are nested segment loops,
    the last one marked ``vectorize`` if ``vector_last``."""
    n = len(segs)
    split = (1 if n >= 2 else 0) if parallel_axes is None else parallel_axes
    nests = []

    def inner(b: Block, axis: int, at: Position) -> None:
        if axis == n:
            fill(b, at)
            return
        for start, length in segs[axis]:
            def body(blk: Block, v, c, start=start) -> None:
                pos = at.pos + [blk.index(k.add(_i(start), v))]
                pos64 = at.pos64 + [c] if want_i64 else None
                inner(blk, axis + 1, Position(at.plane, pos, at.plane64, pos64))

            counted_loop(b, length, start, body, want_i64,
                         vectorize=vector_last and axis == n - 1)

    for combo in itertools.product(*segs[:split]):
        shape = (planes, *(length for _, length in combo))

        def task(b: Block, o, combo=combo, shape=shape) -> None:
            parts = [b.index(e) for e in k.unflatten(o, shape)]
            pos = [b.index(k.add(_i(start), v)) for (start, _), v in zip(combo, parts[1:])]
            at = Position(parts[0], pos)
            if want_i64:
                at.plane64, at.pos64 = _unflatten_i64(b, as_i64(b, o, math.prod(shape) - 1),
                                                      shape, [start for start, _ in combo])
            inner(b, split, at)

        top = Block(kb)
        top.loop(math.prod(shape), task, parallel=True)
        nests += top.stmts
    return nests


def _unflatten_i64(b: Block, flat, shape: Sequence[int], starts: Sequence[int]):
    """(plane, [start + position...]) as i64 from the flat i64 task index over ``shape``."""
    coords = []
    for size in reversed(shape[1:]):
        rest = b.let(k.Binary("/", flat, _i64(size)))
        coords.append(k.Binary("-", flat, k.Binary("*", rest, _i64(size))))
        flat = rest
    pos = [b.let(k.Binary("+", c, _i64(s))) for c, s in zip(reversed(coords), starts)]
    return flat, pos


# -- taps -----------------------------------------------------------------------------------------
def reduce_taps(b: Block, kernel: Sequence[int], looped: int, combine: Callable,
                identity: Const, leaf: Callable[[Block, list], object]):
    """The fold of ``leaf(block, taps)`` over the window, innermost kernel axis first (a row's
    taps are combined, then the rows, as numpy reduces a window view). Axes before ``looped``
    are loops accumulating in a mutable local; the others are unrolled. ``leaf`` may return None
    for a tap that contributes nothing."""

    def level(blk: Block, axis: int, taps: list):
        if axis == len(kernel):
            return leaf(blk, taps)
        if axis < looped:
            acc = blk.let(identity, mutable=True)

            def body(inner: Block, t) -> None:
                v = level(inner, axis + 1, taps + [t])
                if v is not None:
                    inner.emit(k.Assign(acc.name, combine(acc, v)))

            blk.loop(kernel[axis], body)
            return acc
        value = None
        for t in range(kernel[axis]):
            v = level(blk, axis + 1, taps + [_i(t)])
            if v is not None:
                value = v if value is None else blk.let(combine(value, v))
        return value

    value = level(b, 0, [])
    return identity if value is None else value


def each_tap(b: Block, kernel: Sequence[int], looped: int,
             visit: Callable[[Block, list, list], None]) -> None:
    """``visit(block, taps, taps64)`` for every tap in row-major order (taps64: i64 data)."""

    def level(blk: Block, axis: int, taps: list, taps64: list) -> None:
        if axis == len(kernel):
            visit(blk, taps, taps64)
            return
        if axis < looped:
            counted_loop(blk, kernel[axis], 0,
                         lambda inner, t, c: level(inner, axis + 1, taps + [t], taps64 + [c]),
                         count=True)
            return
        for t in range(kernel[axis]):
            level(blk, axis + 1, taps + [_i(t)], taps64 + [_i64(t)])

    level(b, 0, [], [])


# -- MaxPool --------------------------------------------------------------------------------------
def _lowest(dtype: str) -> Const:
    if k.is_float(dtype):
        return Const(-math.inf, dtype)
    return Const(int(np.iinfo(k.numpy_dtype(dtype)).min), dtype)


def _check_covered(ctx: LowerContext, axes: Sequence[Axis]) -> None:
    """Integer MaxPool: every window needs a tap on the input (see the module docstring)."""
    for i, a in enumerate(axes):
        covered = np.zeros(a.out, bool)
        for t in range(a.kernel):
            lo, hi = a.inside(t)
            covered[lo:hi] = True
        if not covered.all():
            raise ctx.error(f"a window along spatial axis {i} lies wholly in the padding; its "
                            f"integer maximum is undefined (the reference casts -inf)")


@lowering("MaxPool")
def lower_max_pool(ctx: LowerContext) -> BoundKernel:
    x, y_t = ctx.in_types[0], ctx.out_types[0]
    spatial = x.shape[2:]
    _check_spatial(ctx, spatial)
    axes = window_axes(pool_window(ctx.opcall()), spatial)
    if not k.is_float(x.dtype):
        _check_covered(ctx, axes)
    kernel = [a.kernel for a in axes]
    looped = loop_axes(kernel)
    segs = segments(axes, looped)
    planes = x.shape[0] * x.shape[1]
    out = [a.out for a in axes]
    with_indices = len(ctx.node.outputs) > 1 and ctx.node.outputs[1] is not None
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (planes, *spatial))
    dst = kb.output(ctx.node.outputs[0], y_t.dtype, (planes, *out))
    idx = kb.output(ctx.node.outputs[1], I64, (planes, *out)) if with_indices else None
    # f16 is compared in f32 (exact); integers with Indices in f64, as the reference does
    work = "f32" if x.dtype == "f16" else "f64" if with_indices and not k.is_float(x.dtype) \
        else x.dtype
    lowest = _lowest(work)
    tap_steps = [a.dilation * step for a, step in zip(axes, _storage_steps(ctx, spatial))]

    def tap_value(blk: Block, at: Position, taps: list):
        coords = [a.coord(o, t) for a, o, t in zip(axes, at.pos, taps)]
        v = window_load(blk, src, x.dtype, (at.plane,), coords, spatial, lowest)
        return None if v is None else blk.let(v)

    def fill(b: Block, at: Position) -> None:
        if idx is None:
            best = reduce_taps(b, kernel, looped, k.maximum, lowest,
                               lambda blk, taps: tap_value(blk, at, taps))
        else:
            best = _argmax(b, at, kernel, looped, lowest, tap_value, tap_steps)
            b.emit(k.Store(idx, (at.plane, *at.pos), _flat_index(ctx, b, at, axes, best[1])))
            best = best[0]
        b.emit(k.Store(dst, (at.plane, *at.pos), k.cast(best, y_t.dtype)))

    return kb.build(position_nests(kb, planes, segs, fill, want_i64=idx is not None))


def _argmax(b: Block, at: Position, kernel, looped: int, lowest: Const, tap_value,
            tap_steps: list[int]):
    """(maximum, i64 offset of its tap) scanning taps in row-major order as ``np.argmax``: a tap
    replaces the best if greater, or NaN while the best is not. Starting from (-inf, tap 0) is
    the same as starting from tap 0 itself."""
    best = b.let(lowest, mutable=True)
    where = b.let(_i64(0), mutable=True)

    def visit(blk: Block, taps: list, taps64: list) -> None:
        v = tap_value(blk, at, taps)
        if v is None:  # padding: -inf never replaces the best
            return
        nan_first = k.logical_and(k.compare("!=", v, v), k.compare("==", best, best))
        take = blk.let(k.Binary("|", k.compare(">", v, best), nan_first))
        blk.emit(k.Assign(where.name, k.select(take, _tap_offset(taps64, tap_steps), where)))
        blk.emit(k.Assign(best.name, k.select(take, v, best)))

    each_tap(b, kernel, looped, visit)
    return best, where


def _tap_offset(taps64: list, steps: list[int]):
    """i64 offset of a tap from the window's first tap in X's flat index (``steps``: dilation
    times the storage step of each axis)."""
    total = None
    for t, step in zip(taps64, steps):
        term = t if step == 1 else k.Binary("*", t, _i64(step))
        total = term if total is None else k.Binary("+", total, term)
    return total if total is not None else _i64(0)


def _flat_index(ctx: LowerContext, b: Block, at: Position, axes, offset):
    """ONNX Indices: plane * prod(spatial) + sum of coordinate * storage step (row-major, or
    column-major over the spatial axes with storage_order=1) of the first tap, plus ``offset``."""
    spatial = [a.size for a in axes]
    total = k.Binary("*", at.plane64, _i64(math.prod(spatial)))
    for a, o64, step in zip(axes, at.pos64, _storage_steps(ctx, spatial)):
        first = k.Binary("-", k.Binary("*", o64, _i64(a.stride)), _i64(a.pad))
        total = k.Binary("+", total, k.Binary("*", first, _i64(step)))
    return k.Binary("+", total, offset)


def _storage_steps(ctx: LowerContext, spatial: Sequence[int]) -> list[int]:
    n = len(spatial)
    if ctx.attrs["storage_order"] == 1:
        return [math.prod(spatial[:i]) for i in range(n)]
    return [math.prod(spatial[i + 1:]) for i in range(n)]


# -- AveragePool ----------------------------------------------------------------------------------
def _add(a, b):
    return k.Binary("+", a, b)


@lowering("AveragePool")
def lower_average_pool(ctx: LowerContext) -> BoundKernel:
    x, y_t = ctx.in_types[0], ctx.out_types[0]
    spatial = x.shape[2:]
    _check_spatial(ctx, spatial)
    win = pool_window(ctx.opcall())
    axes = window_axes(win, spatial)
    ends = win.pads[len(axes):]
    kernel = [a.kernel for a in axes]
    looped = loop_axes(kernel)
    planes = x.shape[0] * x.shape[1]
    acc_dtype = "f32" if x.dtype == "f16" else x.dtype  # the reference's accumulator
    include_pad = ctx.attrs["count_include_pad"] == 1
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (planes, *spatial))
    dst = kb.output(ctx.node.outputs[0], y_t.dtype, (planes, *[a.out for a in axes]))
    zero = Const(0.0, acc_dtype)

    def fill(b: Block, at: Position) -> None:
        def leaf(blk: Block, taps: list):
            coords = [a.coord(o, t) for a, o, t in zip(axes, at.pos, taps)]
            v = window_load(blk, src, x.dtype, (at.plane,), coords, spatial, zero)
            return zero if v is None else blk.let(v)  # padding adds 0, as in the reference

        total = reduce_taps(b, kernel, looped, _add, Const(-0.0, acc_dtype), leaf)
        count = _window_count(b, at, axes, ends, include_pad, acc_dtype)
        b.emit(k.Store(dst, (at.plane, *at.pos), k.cast(k.Binary("/", total, count), y_t.dtype)))

    return kb.build(position_nests(kb, planes, segments(axes, looped), fill))


def _window_count(b: Block, at: Position, axes: Sequence[Axis], ends: Sequence[int],
                  include_pad: bool, dtype: str):
    """The divisor: the product over axes of the taps counted (on the input, or on the padded
    extent with count_include_pad; never past it, where ceil mode reaches). Exact in floats."""
    constant, factors = 1, []
    for a, o, end in zip(axes, at.pos, ends):
        lo, hi = (-a.pad, a.size + end) if include_pad else (0, a.size)
        known, dynamic = 0, []
        for t in range(a.kernel):
            c = a.coord(o, _i(t))
            cond = b.index(k.logical_and(k.compare(">=", c, _i(lo)), k.compare("<", c, _i(hi))))
            if cond == Const(1, k.BOOL):
                known += 1
            elif cond != Const(0, k.BOOL):
                dynamic.append(cond)
        if not dynamic:
            constant *= known
            continue
        factor = Const(float(known), dtype)
        for cond in dynamic:
            factor = _add(factor, k.select(cond, Const(1.0, dtype), Const(0.0, dtype)))
        factors.append(b.let(factor))
    count = Const(float(constant), dtype)
    for f in factors:
        count = k.Binary("*", count, f)
    return b.let(count) if factors else count


# -- LRN ------------------------------------------------------------------------------------------
@lowering("LRN")
def lower_lrn(ctx: LowerContext) -> BoundKernel:
    """Viewed [N, C, S]: the channel window is a 1-D window (stride 1, begin pad
    (size-1)//2) whose segments are top-level loops over (n, channel); the inner loop runs
    along the contiguous spatial positions."""
    x = ctx.in_types[0]
    if x.dtype not in ("f32", "f64"):
        raise ctx.error(f"dtype {x.dtype} is not lowered (f32 and f64 are)")
    batch, channels = x.shape[:2]
    inner = math.prod(x.shape[2:])
    size = ctx.attrs["size"]
    axis = Axis(channels, size, 1, 1, (size - 1) // 2, channels)
    looped = loop_axes([size])
    segs = segments([axis], looped) + [[(0, inner)]]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (batch, channels, inner))
    dst = kb.output(ctx.node.outputs[0], x.dtype, (batch, channels, inner))

    def fill(b: Block, at: Position) -> None:
        c, s = at.pos

        def leaf(blk: Block, taps: list):
            v = window_load(blk, src, x.dtype, (at.plane,), [axis.coord(c, taps[0])],
                            [channels], Const(0.0, x.dtype), tail=(s,))
            return None if v is None else blk.let(k.Binary("*", v, v))  # padding adds +0

        total = reduce_taps(b, [size], looped, _add, Const(-0.0, x.dtype), leaf)
        value = b.let(Load(src, (at.plane, c, s), x.dtype))
        scale = _add(_c(ctx.attrs["bias"], value),
                     k.Binary("*", _c(ctx.attrs["alpha"] / size, value), total))
        power = _power(b, b.let(scale), ctx.attrs["beta"])
        b.emit(k.Store(dst, (at.plane, c, s), k.Binary("/", value, power)))

    return kb.build(position_nests(kb, batch, segs, fill))


def _power(b: Block, scale, beta: float):
    """``scale ** beta``. The usual beta 0.75 (AlexNet's, LRN's default) is
    ``sqrt(s) * sqrt(sqrt(s))``: < 2 ulp, the same special values, and it vectorises, where
    the C library's ``pow`` runs one element at a time (2x slower than numpy's SIMD power)."""
    if beta == 0.75:
        root = b.let(k.Unary("sqrt", scale))
        return k.Binary("*", root, k.Unary("sqrt", root))
    return k.Binary("pow", scale, _c(beta, scale))


# -- Im2Col ---------------------------------------------------------------------------------------
@lowering("Im2Col")
def lower_im2col(ctx: LowerContext) -> BoundKernel:
    """COLS viewed [N*C, *kernel, *out] (rows are (channel, tap) pairs, so the groups need no
    index work). The loops run over output *positions* as pooling's do: parallel over
    (plane, position along the first spatial axis), one loop per segment of that axis, then
    nested segment loops over the other leading axes; inside, every tap writes its row of
    output columns. Within a segment each tap's guard on the leading axes folds to a
    constant, and the columns of a row split where the tap of the last axis enters and leaves
    the input, so an interior row is a plain vectorised copy (a memcpy at unit stride) and a
    border is a run of zeros: no select or clamp remains unless the window is too large to
    unroll (``_im2col_plan``; border rows then select). A thread's share is a contiguous
    range of output rows; one task (plane, row) reads a few neighbouring input rows and writes
    one row of every tap. Against the former lowering (one parallel loop per tap over
    (channel, tap) rows, guarding the leading axes per element): 3.4x faster in the digits CNN
    training step (batch 64, 8x8 images, 2 threads), 1.0-1.8x on VGG-16 layers (1 thread),
    where it runs at or below the time of a numpy copy of its output."""
    x, out_t = ctx.in_types[0], ctx.out_types[0]
    spatial = x.shape[2:]
    _check_spatial(ctx, spatial)
    axes = window_axes(im2col_window(ctx.opcall()), spatial)
    kernel, out = [a.kernel for a in axes], [a.out for a in axes]
    planes = x.shape[0] * x.shape[1]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (planes, *spatial))
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, (planes, *kernel, *out))
    zero = Const(0.0, x.dtype)
    lead, last = axes[:-1], axes[-1]
    column_runs = [_column_runs(last, tap) for tap in range(last.kernel)]
    # a strided copy vectorises into shuffles, which cost LLVM more time per loop
    looped, segs = _im2col_plan(lead, sum(len(r) for r in column_runs) * last.stride)

    def row(b: Block, at: Position, taps: list) -> None:
        coords = [a.coord(o, t) for a, o, t in zip(lead, at.pos, taps)]
        for tap, runs in enumerate(column_runs):
            for start, length, live in runs:
                def column(blk: Block, v, start=start, live=live, tap=tap) -> None:
                    o = blk.index(k.add(_i(start), v))
                    value = window_load(blk, src, x.dtype, (at.plane,),
                                        coords + [last.coord(o, _i(tap))], spatial,
                                        zero) if live else None
                    blk.emit(k.Store(dst, (at.plane, *taps, _i(tap), *at.pos, o),
                                     zero if value is None else value))

                b.loop(length, column, vectorize=True)

    def fill(b: Block, at: Position, taps: tuple = ()) -> None:
        axis = len(taps)
        if axis == len(lead):
            row(b, at, list(taps))
        elif axis < looped:
            b.loop(kernel[axis], lambda blk, t: fill(blk, at, (*taps, t)))
        else:
            for t in range(kernel[axis]):
                fill(b, at, (*taps, _i(t)))

    return kb.build(position_nests(kb, planes, segs, fill, vector_last=False,
                                   parallel_axes=min(1, len(lead))))


def _im2col_plan(lead: Sequence[Axis], runs: int) -> tuple[int, list]:
    """(kernel axes looped, segments of the leading axes). The leading taps unroll over fine
    segments while that emits at most ``IM2COL_UNROLL_RUNS`` column loops (``runs`` per row,
    weighted; a 3x3 window with pad 1 has 45); larger windows loop over their leading taps
    on coarse segments, where the interior rows still fold every guard and only the border
    rows select. Unrolling an 11x11 window over its fine segments took 7.5 s of LLVM time."""
    fine = [a.fine_segments() for a in lead]
    taps = math.prod(a.kernel for a in lead)
    if math.prod(len(f) for f in fine) * taps * runs <= IM2COL_UNROLL_RUNS:
        return 0, fine
    return len(lead), [a.coarse_segments() for a in lead]


def _column_runs(axis: Axis, tap: int) -> list[tuple[int, int, bool]]:
    """(start, length, live) runs of output columns for ``tap``: zeros where it lies off the
    input, a copy where on."""
    lo, hi = axis.inside(tap)
    return [(s, e - s, live) for s, e, live in ((0, lo, False), (lo, hi, True),
                                                 (hi, axis.out, False)) if e > s]


# -- Winograd -------------------------------------------------------------------------------------
def dense_map(b: Block, matrix: np.ndarray, values: Sequence, dtype: str) -> list:
    """``out[i] = sum_j matrix[i, j] * values[j]`` as straight-line code: no multiply for
    coefficients +-1, and for coefficients 0 the reference's ``0 * x`` becomes ``x - x`` (+0, or
    NaN for an infinite or NaN x, as ``0 * x`` is), summed once per distinct zero pattern."""
    differences: dict[int, object] = {}
    poisons: dict[tuple, object] = {}

    def poison(zeros: tuple):
        if zeros not in poisons:
            total = None
            for j in zeros:
                if j not in differences:
                    differences[j] = b.let(k.Binary("-", values[j], values[j]))
                total = differences[j] if total is None else _add(total, differences[j])
            poisons[zeros] = b.let(total) if len(zeros) > 1 else total
        return poisons[zeros]

    out = []
    for row in np.asarray(matrix):
        total = None
        for coefficient, v in zip(row.tolist(), values):
            if coefficient == 0:
                continue
            if total is None:
                total = v if coefficient == 1 else k.Unary("neg", v) if coefficient == -1 \
                    else k.Binary("*", v, Const(coefficient, dtype))
            elif coefficient in (1, -1):
                total = k.Binary("+" if coefficient == 1 else "-", total, v)
            else:
                total = _add(total, k.Binary("*", v, Const(coefficient, dtype)))
        zeros = tuple(j for j, c in enumerate(row.tolist()) if c == 0)
        if zeros:
            total = poison(zeros) if total is None else _add(total, poison(zeros))
        out.append(b.let(total))
    return out


def along_rows(b: Block, matrix: np.ndarray, tile: list[list], dtype: str) -> list[list]:
    """``tile @ matrix^T``: ``matrix`` applied to each row (the last axis)."""
    return [dense_map(b, matrix, r, dtype) for r in tile]


def along_columns(b: Block, matrix: np.ndarray, tile: list[list], dtype: str) -> list[list]:
    """``matrix @ tile``: ``matrix`` applied to each column (the first axis)."""
    columns = [dense_map(b, matrix, [r[j] for r in tile], dtype) for j in range(len(tile[0]))]
    return [list(r) for r in zip(*columns)]


@dataclass(frozen=True)
class WinogradLayout:
    """The tile-array layouts of V and M (``graphc/ops/winograd.py``), viewed with the batch
    and the tile grid unfolded: fold_batch=1 ``[G, a*a, N, th, tw, ch]``, fold_batch=0
    ``[N, G, a*a, th, tw, ch]`` (the same memory as the op's types)."""

    batch: int
    group: int
    alpha: int
    tiles: tuple
    channels: int   # per group
    fold: bool

    @property
    def shape(self) -> tuple:
        a2, (th, tw) = self.alpha * self.alpha, self.tiles
        if self.fold:
            return (self.group, a2, self.batch, th, tw, self.channels)
        return (self.batch, self.group, a2, th, tw, self.channels)

    def index(self, n, g, e: int, i, j, c) -> tuple:
        if self.fold:
            return (g, _i(e), n, i, j, c)
        return (n, g, _i(e), i, j, c)


def _winograd_dtype(ctx: LowerContext, dtype: str) -> str:
    if dtype not in ("f32", "f64"):
        raise ctx.error(f"dtype {dtype} is not lowered (f32 and f64 are)")
    return dtype


def _tile_nests(kb: KernelBuilder, batch: int, group: int, channels: int,
                axes: Sequence[Axis], tile: Callable) -> list[k.For]:
    """Parallel loops over (image, group, tile row, tile column), one per combination of tile
    segments (so every border decision folds); the channels run innermost, vectorised: the
    channel-last side (V or M) is then contiguous, the NCHW side strided (gathered or
    scattered). Measured on AVX-512 this beats vectorising along tile columns by 5x (input) and
    2.5x (output), whose channel-last side becomes a scatter or gather of every element."""
    segs = [ax.fine_segments() for ax in axes]

    def fill(b: Block, at: Position) -> None:
        n, g = (b.index(e) for e in k.unflatten(at.plane, (batch, group)))
        b.loop(channels, lambda blk, c: tile(blk, n, g, c, *at.pos), vectorize=True)

    return position_nests(kb, batch * group, segs, fill, vector_last=False, parallel_axes=2)


@lowering("WinogradInputTransform")
def lower_winograd_input(ctx: LowerContext) -> BoundKernel:
    x = ctx.in_types[0]
    dtype = _winograd_dtype(ctx, x.dtype)
    bt = transform_matrices(ctx.opcall(), k.numpy_dtype(dtype))[2]
    m, group, fold = ctx.attrs["m"], ctx.attrs["group"], bool(ctx.attrs["fold_batch"])
    a = m + WINOGRAD_FILTER - 1
    th, tw = ctx.attrs["tiles"]
    top, left = ctx.attrs["pads"][:2]
    batch, channels, height, width = x.shape
    cg = channels // group
    layout = WinogradLayout(batch, group, a, (th, tw), cg, fold)
    axes = [Axis(height, a, m, 1, top, th), Axis(width, a, m, 1, left, tw)]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], dtype, (batch, group, cg, height, width))
    dst = kb.output(ctx.node.outputs[0], dtype, layout.shape)
    zero = Const(0.0, dtype)

    def tile(b: Block, n, g, c, i, j) -> None:
        d = [[window_load(b, src, dtype, (n, g, c), [axes[0].coord(i, _i(r)),
                                                     axes[1].coord(j, _i(q))],
                          (height, width), zero) or zero for q in range(a)] for r in range(a)]
        d = [[b.let(v) if not isinstance(v, Const) else v for v in r] for r in d]
        v = along_columns(b, bt, along_rows(b, bt, d, dtype), dtype)  # B^T (d B)
        for xi in range(a):
            for nu in range(a):
                b.emit(k.Store(dst, layout.index(n, g, xi * a + nu, i, j, c), v[xi][nu]))

    return kb.build(_tile_nests(kb, batch, group, cg, axes, tile))


@lowering("WinogradOutput")
def lower_winograd_output(ctx: LowerContext) -> BoundKernel:
    mt, y_t = ctx.in_types[0], ctx.out_types[0]
    dtype = _winograd_dtype(ctx, mt.dtype)
    at_matrix = transform_matrices(ctx.opcall(), k.numpy_dtype(dtype))[0]
    m, group, fold = ctx.attrs["m"], ctx.attrs["group"], bool(ctx.attrs["fold_batch"])
    a = m + WINOGRAD_FILTER - 1
    th, tw = ctx.attrs["tiles"]
    batch, channels, height, width = y_t.shape
    kg = channels // group
    layout = WinogradLayout(batch, group, a, (th, tw), kg, fold)
    axes = [Axis(height, m, m, 1, 0, th), Axis(width, m, m, 1, 0, tw)]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], dtype, layout.shape)
    bias = kb.input(ctx.node.inputs[1], dtype, (group, kg)) if ctx.has_input(1) else None
    residual = (kb.input(ctx.node.inputs[2], dtype, (batch, group, kg, height, width))
                if ctx.has_input(2) else None)
    dst = kb.output(ctx.node.outputs[0], dtype, (batch, group, kg, height, width))

    def tile(b: Block, n, g, c, i, j) -> None:
        mm = [[b.let(Load(src, layout.index(n, g, xi * a + nu, i, j, c), dtype))
               for nu in range(a)] for xi in range(a)]
        y = along_rows(b, at_matrix, along_columns(b, at_matrix, mm, dtype), dtype)  # A^T M A
        shift = b.let(Load(bias, (g, c), dtype)) if bias is not None else None
        for u in range(m):
            for v in range(m):
                row, col = (b.index(ax.coord(o, _i(t))) for ax, o, t in zip(axes, (i, j), (u, v)))
                ok = inside(b, [row, col], (height, width))
                if ok == Const(0, k.BOOL):
                    continue  # cropped: past the output's bottom or right edge
                assert ok == Const(1, k.BOOL), "tile segments decide every output position"
                where = (n, g, c, row, col)
                add = Load(residual, where, dtype) if residual is not None else None
                b.emit(k.Store(dst, where, _epilogue(ctx, b, y[u][v], shift, add)))

    return kb.build(_tile_nests(kb, batch, group, kg, axes, tile))


def _epilogue(ctx: LowerContext, b: Block, y, bias, residual):
    """activation(y + bias + residual) in the order of ``ops/epilogue.apply_epilogue``, the
    activation through its elementwise op's scalar rule."""
    if bias is not None:
        y = b.let(_add(y, bias))
    if residual is not None:
        y = b.let(_add(y, residual))
    name = ctx.attrs["activation"]
    if not name:
        return y
    act = ACTIVATIONS[name]
    params = list(ctx.attrs["activation_params"])
    attrs = registry.get(act.op).full_attrs(dict(zip(act.attrs, params[:len(act.attrs)])))
    extra = [_c(p, y) for p in params[len(act.attrs):]]
    return apply_scalar(act.op, Scalar(b, ctx.error, attrs), [y, *extra])


@lowering("WinogradFilterTransform")
def lower_winograd_filter(ctx: LowerContext) -> BoundKernel:
    """U = G w G^T per filter: a parallel loop over (group, input channel), the output
    channels (contiguous in U) innermost."""
    w = ctx.in_types[0]
    dtype = _winograd_dtype(ctx, w.dtype)
    g_matrix = transform_matrices(ctx.opcall(), k.numpy_dtype(dtype))[1]
    m, group = ctx.attrs["m"], ctx.attrs["group"]
    a = m + WINOGRAD_FILTER - 1
    filters, cg = w.shape[:2]
    kg = filters // group
    r = WINOGRAD_FILTER
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], dtype, (group, kg, cg, r, r))
    dst = kb.output(ctx.node.outputs[0], dtype, (group, a * a, cg, kg))

    def task(b: Block, o) -> None:
        g, c = (b.index(e) for e in k.unflatten(o, (group, cg)))

        def one(blk: Block, f) -> None:
            wt = [[blk.let(Load(src, (g, f, c, _i(p), _i(q)), dtype)) for q in range(r)]
                  for p in range(r)]
            u = along_columns(blk, g_matrix, along_rows(blk, g_matrix, wt, dtype), dtype)
            for xi in range(a):
                for nu in range(a):
                    blk.emit(k.Store(dst, (g, _i(xi * a + nu), c, f), u[xi][nu]))

        b.loop(kg, one, vectorize=True)

    top = Block(kb)
    top.loop(group * cg, task, parallel=True)
    return kb.build(top.stmts)
