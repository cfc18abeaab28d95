"""Lowering of the gradient-only ops (``graphc/ops/gradients.py``) to kernel IR.

Registered into ``backends.lower.LOWERINGS`` when imported (``backends/lower.py`` imports the
lowering families at its end): Step, BroadcastLike, MaxPoolGrad and GatherGrad.

* Step and BroadcastLike are elementwise maps (``lower.map_kernel``): Step selects 1 or 0 on
  ``x > 0`` (NaN gives 0, as the reference); BroadcastLike copies with numpy broadcasting.
* MaxPoolGrad is written in *gather* form, because the kernel IR has no scatter: each element
  of dX sums, over the windows that contain it, dY of the window when its first maximum is this
  element. Per element and candidate tap t, the window is ``o = (i + pad - t * dilation) /
  stride`` (valid when that divides and lies in range); the window's taps are scanned in
  row-major order exactly as MaxPool's argmax does (a tap wins if greater, or NaN while the best
  is not), tracking as a 0/1 flag whether the winner is tap t. All taps unroll (kernel^2 loads
  per element), which suits the small windows of CNNs; every load is clamped into range and
  selected against the fill, so no load leaves its buffer. The sum runs over candidate windows
  in reverse row-major order, unlike the reference's ``np.add.at``: overlapping windows may
  round differently (one ulp per overlap).
* GatherGrad (Gather's data gradient, a scatter-add at run-time indices) is in gather form too:
  dX[a, r, b] = sum over j of dY[a, j, b] where wrap(indices[j]) == r. Every element of dX scans
  all the indices, so the cost is |dX| * |indices| compares: fine for the class-score and small
  embedding gathers of the examples, quadratic for large embeddings (a scatter with atomics
  would need data-dependent stores, which the kernel IR does not have). Indices out of range
  match no row (the forward Gather has already reported them).
"""

from __future__ import annotations

import itertools

from graphc.ops import registry
from graphc.ops.pool import pool_window
from graphc.ops.rules import normalize_axis
from graphc.types import TensorType

from . import kernel_ir as k

# a module reference, not names: lower_window may still be loading when this module is imported
# (lower.py imports the families at its end, and lower_window imports lower first)
from . import lower_window as lw
from .kernel_ir import INDEX, Const, Load
from .lower import (
    Block,
    BoundKernel,
    KernelBuilder,
    LowerContext,
    Scalar,
    _around_axis,
    _c,
    lowering,
    map_kernel,
    nest,
    scalar_rule,
)

FLOATS = ("f32", "f64")


@scalar_rule("Step", dtypes=FLOATS)
def _step(s: Scalar, args):
    (x,) = args
    return k.Select(k.Compare(">", x, _c(0, x)), _c(1, x), _c(0, x))


@lowering("Step")
def lower_step(ctx: LowerContext) -> BoundKernel:
    return map_kernel(ctx, [0], _step)


@lowering("BroadcastLike")
def lower_broadcast_like(ctx: LowerContext) -> BoundKernel:
    return map_kernel(ctx, [0], lambda s, args: args[0])


# -- MaxPoolGrad -----------------------------------------------------------------------------------
def _i(value: int) -> Const:
    return Const(value, INDEX)


def _forward_window(ctx: LowerContext, x: TensorType):
    """The forward MaxPool's window over X (MaxPoolGrad carries MaxPool's attributes)."""
    call = registry.OpCall("MaxPool", ctx.node.name, ctx.attrs, (x,), (None,), 1)
    return pool_window(call)


@lowering("MaxPoolGrad")
def lower_max_pool_grad(ctx: LowerContext) -> BoundKernel:
    dy_t, x_t = ctx.in_types
    if x_t.dtype not in FLOATS:
        raise ctx.error(f"dtype {x_t.dtype} is not lowered (supported: f32, f64)")
    spatial = x_t.shape[2:]
    if min(spatial, default=1) < 1:
        raise ctx.shape_error(f"empty spatial axis in {tuple(spatial)}")
    axes = lw.window_axes(_forward_window(ctx, x_t), spatial)
    planes = x_t.shape[0] * x_t.shape[1]
    out = [a.out for a in axes]
    kb = KernelBuilder(ctx)
    dy = kb.input(ctx.node.inputs[0], dy_t.dtype, (planes, *out))
    x = kb.input(ctx.node.inputs[1], x_t.dtype, (planes, *spatial))
    dx = kb.output(ctx.node.outputs[0], x_t.dtype, (planes, *spatial))
    taps = list(itertools.product(*[range(a.kernel) for a in axes]))
    zero = Const(0.0, x_t.dtype)
    if all(a.dilation == 1 and a.stride >= a.kernel for a in axes):
        scan = _one_window_fill(axes, x, dy, dx, x_t.dtype, dy_t.dtype, taps, spatial)
        return kb.build([nest(kb, (planes, *spatial), scan)])

    def fill(b: Block, idx: list) -> None:
        plane, pos = idx[0], idx[1:]
        total = zero
        for tap in taps:
            window = _window_of(b, axes, pos, tap)
            if window is None:
                continue
            valid, o = window
            mine = _is_first_max(b, axes, x, x_t.dtype, plane, o, tap, taps, spatial)
            grad = b.let(Load(dy, (plane, *o), dy_t.dtype))
            term = k.select(valid, k.Binary("*", grad, mine), zero)
            total = b.let(term if total is zero else k.Binary("+", total, term))
        b.emit(k.Store(dx, tuple(idx), total))

    return kb.build([nest(kb, (planes, *spatial), fill)])


def _one_window_fill(axes, x: str, dy: str, dx: str, dtype: str, dy_dtype: str, taps,
                     spatial):
    """Loop body for windows that do not overlap (dilation 1, stride >= kernel): an input
    element lies in at most one window, ``o = (i + pad) // stride`` at tap ``(i + pad) %
    stride``, so it scans that one window (kernel^2 loads, not kernel^4) for the first maximum
    and takes dY there when the winner is itself."""
    zero = Const(0.0, dtype)

    def fill(b: Block, idx: list) -> None:
        plane, pos = idx[0], idx[1:]
        valid, window, own_tap = Const(1, k.BOOL), [], []
        for a, i in zip(axes, pos):
            num = b.index(k.add(i, _i(a.pad)))
            o = b.index(k.floordiv(num, a.stride))
            t = b.index(k.mod(num, a.stride))
            inside = k.logical_and(k.compare("<", t, _i(a.kernel)),
                                   k.compare("<", o, _i(a.out)))
            valid = b.index(k.logical_and(valid, inside))
            window.append(b.index(k.minimum(o, _i(a.out - 1))))  # in range for the loads
            own_tap.append(t)
        def is_own(tap):
            same = Const(1, k.BOOL)
            for t_own, t in zip(own_tap, tap):
                same = k.logical_and(same, k.compare("==", t_own, _i(t)))
            return b.index(same)

        mine = _winner_flag(b, axes, x, dtype, plane, window, taps, spatial, is_own,
                            Const(0, k.BOOL))
        grad = b.let(Load(dy, (plane, *window), dy_dtype))
        b.emit(k.Store(dx, tuple(idx), k.select(k.logical_and(valid, mine), grad, zero)))

    return fill


def _window_of(b: Block, axes, pos, tap):
    """(valid, window position) of the window whose tap ``tap`` reads input position ``pos``;
    None when no position of this loop can have one. The window index is clamped into range so
    that its loads stay in bounds when ``valid`` is false."""
    valid = Const(1, k.BOOL)
    window = []
    for a, i, t in zip(axes, pos, tap):
        shift = a.pad - t * a.dilation  # o * stride = i + pad - t * dilation
        num = b.index(k.add(i, _i(shift)) if shift >= 0 else k.sub(i, _i(-shift)))
        cond = k.logical_and(k.compare(">=", num, _i(0)),
                             k.compare("<", num, _i(a.out * a.stride - a.stride + 1)))
        if a.stride > 1:
            cond = k.logical_and(cond, k.compare("==", k.mod(k.maximum(num, _i(0)), a.stride),
                                                 _i(0)))
        cond = b.index(cond)
        if cond == Const(0, k.BOOL):
            return None
        valid = b.index(k.logical_and(valid, cond))
        o = k.floordiv(k.maximum(num, _i(0)), a.stride)
        window.append(b.index(k.minimum(o, _i(a.out - 1))))
    return valid, window


def _is_first_max(b: Block, axes, x: str, dtype: str, plane, o, tap, taps, spatial):
    """1 if tap ``tap`` is the first maximum of window ``o`` (MaxPool's argmax), else 0."""
    return _winner_flag(b, axes, x, dtype, plane, o, taps, spatial,
                        lambda other: Const(1.0 if other == tap else 0.0, dtype),
                        Const(0.0, dtype))


def _winner_flag(b: Block, axes, x: str, dtype: str, plane, window, taps, spatial, flag_of,
                 unset):
    """Scan the taps of ``window`` in MaxPool's argmax order -- a tap wins if it is greater, or
    NaN while the best so far is not -- and return ``flag_of(winning tap)`` (``unset`` when
    every tap lies in the padding, which never wins)."""
    lowest = lw._lowest(dtype)
    best, mine = lowest, unset
    for tap in taps:
        coords = [a.coord(w, _i(t)) for a, w, t in zip(axes, window, tap)]
        v = lw.window_load(b, x, dtype, (plane,), coords, spatial, lowest)
        if v is None:
            continue
        v = b.let(v)
        nan_first = k.logical_and(k.compare("!=", v, v), k.compare("==", best, best))
        take = b.let(k.Binary("|", k.compare(">", v, best), nan_first))
        mine = b.let(k.select(take, flag_of(tap), mine))
        best = b.let(k.select(take, v, best))
    return mine



# -- GatherGrad -----------------------------------------------------------------------------------
@lowering("GatherGrad")
def lower_gather_grad(ctx: LowerContext) -> BoundKernel:
    dy_t, idx_t, like_t = ctx.in_types
    if like_t.dtype not in FLOATS:
        raise ctx.error(f"dtype {like_t.dtype} is not lowered (supported: f32, f64)")
    axis = normalize_axis(ctx.attrs["axis"], like_t.rank, ctx.opcall())
    outer, dim, inner = _around_axis(like_t.shape, axis)
    count = idx_t.numel
    kb = KernelBuilder(ctx)
    dx = kb.output(ctx.node.outputs[0], like_t.dtype, (outer, dim, inner))
    zero = Const(0.0, like_t.dtype)
    if count == 0:
        return kb.build([nest(kb, (outer, dim, inner),
                              lambda b, idx: b.emit(k.Store(dx, tuple(idx), zero)))])
    dy = kb.input(ctx.node.inputs[0], dy_t.dtype, (outer, count, inner))
    indices = kb.input(ctx.node.inputs[1], idx_t.dtype, (count,))

    def fill(b: Block, idx: list) -> None:
        a, row, c = idx
        total = b.let(zero, mutable=True)

        def visit(blk: Block, j) -> None:
            v = blk.let(k.cast(Load(indices, (j,), idx_t.dtype), "i64"))
            wrapped = k.Select(k.Compare("<", v, Const(0, "i64")),
                               k.Binary("+", v, Const(dim, "i64")), v)
            # into the index domain, clamped so that an out-of-range index matches no row
            hit = k.Compare("==", k.IndexOf(wrapped, -1, dim), row)
            blk.emit(k.Accumulate(total.name, "add",
                                  k.Select(hit, Load(dy, (a, j, c), dy_t.dtype), zero)))

        b.loop(count, visit)
        b.emit(k.Store(dx, tuple(idx), total))

    return kb.build([nest(kb, (outer, dim, inner), fill)])
