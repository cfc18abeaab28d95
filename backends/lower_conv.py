"""Direct convolution kernels: Conv, FusedConv (with its epilogue) and ConvTranspose.

Registered into ``backends.lower.LOWERINGS`` (``lower.py`` imports this module at its end).
The graph keeps a Conv when the user asks ``conv="direct"`` and for the shapes the conv passes
leave alone (1-D and 3-D convs, ...); ConvTranspose is never rewritten by the passes.

Geometry. Views: X ``[N, G, C/G, *in]``, Y ``[N, G, M/G, *out]``, W ``[G, M/G, C/G, *kernel]``
for Conv and ``[G, C/G, M/G, *kernel]`` for ConvTranspose (its W is ``(C, M/G, ...)``). Every
spatial axis becomes one or more ``Line``\\ s: a run of output positions ``first + q * spacing``
(``q`` in ``0..count``) whose tap ``t`` reads input coordinate ``q * step + offset_t``.

* Conv: one line per axis, ``step = stride``, ``offset_t = t * dilation - pad_begin``.
* ConvTranspose in *gather* form, so that each output element is written by one iteration and
  threads never race: output ``o`` receives input ``i`` through tap ``t`` iff
  ``o + pad - t * dilation = i * stride``. Splitting the output positions by their residue
  ``r = o mod stride`` (``o = r + q * stride``) makes that divisibility a compile-time fact per
  (residue, tap): each residue class is a line with ``step = 1`` and only the taps that divide,
  ``offset_t = (r + pad - t * dilation) / stride``. No position computes a product it drops.

Borders without branches, as in ``lower_window``: each line is cut into segments where every
tap is either always on the input or always off it, so the guards fold and off-input taps are
dropped (``window_load``); past ``UNROLL_BUDGET`` tap bodies the borders are coarse and their
loads are clamped and selected against 0.

Loop shape (the fast path is the innermost loop): the top-level ``parallel`` loops run over
(batch, group, output-channel block, leading output positions), one loop per combination of the
leading lines' segments (and of their residues for ConvTranspose); this is the (batch, output
channel) split of the other kernels, with the output rows as tasks. Inside a task:

    Y[block rows] = 0                               (vectorised over the last output axis)
    for c in C/G:                                   (input channels of the group)
        for looped kernel axes (only when the taps exceed UNROLL_TAPS):
            w_j_t = W[g, m0 + j, c, t]                (hoisted weights of the block)
            for q in last line's segment:           (vectorised, contiguous output)
                x_t = X[n, g, c, coords(t)]           (each input tap loaded once ...)
                Y[m0 + j, q] += sum_t x_t * w_j_t     (... and used by BLOCK output channels)
    Y[block rows] = epilogue(Y[block rows])         (bias, residual, activation)

The output rows of the block are the accumulators, so no scratch memory is needed; X and W are
read-only and Y is ``noalias`` (the memory plan never runs these ops in place).

Semantics against the references (``graphc.interpret``): the same products summed in another
order (the references run one GEMM per group), so results agree to rounding (the tests use
``rtol`` 1e-5 for f32); the epilogue is applied as ``apply_epilogue`` orders it --
``activation((acc + B) + Z)`` -- with the elementwise ops' scalar rules. f32 and f64 are
lowered; f16 would need f32 accumulators that outlive the output row (a ``LoweringError``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphc.ops.convolution import conv_window, transpose_geometry

from . import kernel_ir as k

# a module reference, not names: lower_window may still be loading when this module is imported
# (lower.py imports the families at its end, and lower_window imports lower first)
from . import lower_window as window
from .kernel_ir import INDEX, Const, Load, Var
from .lower import Block, BoundKernel, KernelBuilder, LowerContext, lowering

BLOCK = 4                 # output channels sharing each input load
CONV_DTYPES = ("f32", "f64")


def _i(value: int) -> Const:
    return Const(value, INDEX)


@dataclass(frozen=True)
class Line:
    """Output positions ``first + q * spacing`` (``q`` in ``0..count``) of one spatial axis;
    tap ``(t, offset)`` reads input coordinate ``q * step + offset`` (see the docstring). A
    looped line runs its taps as a loop: offset ``t * dilation - pad`` for the loop's ``t``."""

    size: int
    count: int
    first: int
    spacing: int
    step: int
    taps: tuple
    looped: bool = False
    dilation: int = 1
    pad: int = 0

    def out(self, q):
        return k.add(_i(self.first), k.mul(q, _i(self.spacing)))

    def coord(self, q, tap):
        start = k.mul(q, _i(self.step))
        if isinstance(tap, Var):  # a looped tap
            return k.sub(k.add(start, k.mul(tap, _i(self.dilation))), _i(self.pad))
        offset = tap[1]
        return k.add(start, _i(offset)) if offset >= 0 else k.sub(start, _i(-offset))

    def inside(self, offset: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` whose coordinate ``q * step + offset`` is on the input."""
        lo = max(0, -(offset // self.step))
        hi = min(self.count, (self.size - 1 - offset) // self.step + 1)
        return lo, max(lo, hi)

    def fine_segments(self) -> list[tuple[int, int]]:
        cuts = {0, self.count}
        for _, offset in self.taps:
            cuts.update(min(max(c, 0), self.count) for c in self.inside(offset))
        cuts = sorted(cuts)
        return [(a, b - a) for a, b in itertools.pairwise(cuts) if b > a]

    def coarse_segments(self) -> list[tuple[int, int]]:
        if not self.taps:
            return [(0, self.count)]
        ranges = [self.inside(offset) for _, offset in self.taps]
        lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
        if lo >= hi:
            return [(0, self.count)]
        return [(a, b - a) for a, b in ((0, lo), (lo, hi), (hi, self.count)) if b > a]


@dataclass(frozen=True)
class ConvSpec:
    """Everything the nest builder needs besides the lines."""

    batch: int
    group: int
    channels: int                 # input channels per group
    maps: int                     # output channels per group
    src: str
    dst: str
    dtype: str
    in_sizes: tuple
    weight: Callable              # (g, m, c, taps) -> Load of W
    epilogue: Callable | None     # (block, value, (n, g, m, *out)) -> value, None: identity


def _segments(lines: Sequence[Line], block: int) -> list[list[tuple[int, int]]]:
    fine = [line.fine_segments() for line in lines]
    taps = math.prod(max(len(line.taps), 1) for line in lines)
    looped = any(line.looped for line in lines)
    if not looped and math.prod(len(f) for f in fine) * taps * block <= window.UNROLL_BUDGET:
        return fine
    return [line.coarse_segments() for line in lines]


def _channel_blocks(maps: int) -> list[tuple[int, int, int]]:
    """(first channel, blocks, width): BLOCK-wide blocks, then one block of the rest."""
    width = min(BLOCK, maps)
    full, rest = divmod(maps, width)
    return [(0, full, width)] + ([(full * width, 1, rest)] if rest else [])


def conv_nests(kb: KernelBuilder, spec: ConvSpec, lines: Sequence[Line]) -> list[k.For]:
    """The top-level loops computing the output positions of ``lines`` (one class)."""
    if any(line.count == 0 for line in lines):
        return []
    lead, last = lines[:-1], lines[-1]
    segs = _segments(lines, min(BLOCK, spec.maps))
    nests = []
    for first, blocks, width in _channel_blocks(spec.maps):
        for combo in itertools.product(*segs[:-1]):
            shape = (spec.batch, spec.group, blocks, *(length for _, length in combo))

            def task(b: Block, o, combo=combo, shape=shape, first=first, width=width) -> None:
                parts = [b.index(e) for e in k.unflatten(o, shape)]
                n, g, blk = parts[:3]
                qs = [b.index(k.add(_i(start), v)) for (start, _), v in zip(combo, parts[3:])]
                m0 = b.index(k.add(_i(first), k.mul(blk, _i(width))))
                _task_body(b, spec, lead, last, segs[-1], (n, g, m0, width), qs)

            top = Block(kb)
            top.loop(math.prod(shape), task, parallel=True)
            nests += top.stmts
    return nests


def _task_body(b: Block, spec: ConvSpec, lead: Sequence[Line], last: Line, last_segs,
               where: tuple, qs: list) -> None:
    n, g, m0, width = where
    lead_out = [b.index(line.out(q)) for line, q in zip(lead, qs)]
    zero = Const(0.0, spec.dtype)

    def out_index(blk: Block, j: int, q) -> tuple:
        return (n, g, blk.index(k.add(m0, _i(j))), *lead_out, blk.index(last.out(q)))

    def each_position(fill: Callable[[Block, object], None]) -> None:
        for start, length in last_segs:
            b.loop(length, lambda blk, v, start=start: fill(blk, blk.index(k.add(_i(start), v))),
                   vectorize=True)

    each_position(lambda blk, q: [blk.emit(k.Store(spec.dst, out_index(blk, j, q), zero))
                                  for j in range(width)])
    lines = [*lead, last]
    if all(line.taps for line in lines) and spec.channels:
        b.loop(spec.channels, lambda cb, c: _looped_taps(cb, spec, lines, last_segs, where, qs,
                                                         c, out_index))
    if spec.epilogue is not None:
        def finish(blk: Block, q) -> None:
            for j in range(width):
                at = out_index(blk, j, q)
                value = blk.let(Load(spec.dst, at, spec.dtype))
                blk.emit(k.Store(spec.dst, at, spec.epilogue(blk, value, at)))

        each_position(finish)


def _looped_taps(b: Block, spec: ConvSpec, lines: Sequence[Line], last_segs, where, qs, c,
                 out_index) -> None:
    """Loops over the looped kernel axes (leading ones), then the unrolled taps."""

    def level(blk: Block, axis: int, taps: list) -> None:
        if axis < len(lines) and lines[axis].looped:
            blk.loop(len(lines[axis].taps), lambda inner, t: level(inner, axis + 1, taps + [t]))
            return
        unrolled = itertools.product(*(line.taps for line in lines[axis:]))
        _accumulate(blk, spec, lines, last_segs, where, qs, c, taps,
                    [list(u) for u in unrolled], out_index)

    level(b, 0, [])


def _accumulate(b: Block, spec: ConvSpec, lines, last_segs, where, qs, c, looped: list,
                unrolled: list, out_index) -> None:
    n, g, m0, width = where

    def kernel_index(tail: list) -> list:
        return [t if isinstance(t, Var) else _i(t[0]) for t in looped + tail]

    weights = [[b.let(spec.weight(g, b.index(k.add(m0, _i(j))), c, kernel_index(tail)))
                for tail in unrolled] for j in range(width)]
    zero = Const(0.0, spec.dtype)
    for start, length in last_segs:
        def body(blk: Block, v, start=start) -> None:
            q = blk.index(k.add(_i(start), v))
            positions = [*qs, q]
            totals: list = [None] * width
            for i, tail in enumerate(unrolled):
                taps = looped + tail
                coords = [line.coord(p, t) for line, p, t in zip(lines, positions, taps)]
                x = window.window_load(blk, spec.src, spec.dtype, (n, g, c), coords,
                                       spec.in_sizes, zero)
                if x is None:
                    continue
                x = blk.let(x)
                for j in range(width):
                    term = k.Binary("*", x, weights[j][i])
                    totals[j] = term if totals[j] is None else k.Binary("+", totals[j], term)
            for j, total in enumerate(totals):
                if total is not None:
                    at = out_index(blk, j, q)
                    blk.emit(k.Store(spec.dst, at, k.Binary(
                        "+", Load(spec.dst, at, spec.dtype), total)))

        b.loop(length, body, vectorize=True)


# -- Conv / FusedConv -----------------------------------------------------------------------------
def _check_dtype(ctx: LowerContext) -> str:
    dtype = ctx.in_types[0].dtype
    if dtype not in CONV_DTYPES:
        raise ctx.error(f"dtype {dtype} is not lowered (direct convolution takes "
                        f"{', '.join(CONV_DTYPES)}; f16 needs f32 accumulators)")
    return dtype


def _epilogue_fn(ctx: LowerContext, kb: KernelBuilder, group: int, maps: int, out_view):
    """(block, value, index) -> activation((value + B) + Z) for FusedConv, value + B
    otherwise; None when there is nothing to apply."""
    dtype = ctx.out_types[0].dtype
    bias = kb.input(ctx.node.inputs[2], dtype, (group, maps)) if ctx.has_input(2) else None
    fused = ctx.node.op == "FusedConv"
    residual = (kb.input(ctx.node.inputs[3], dtype, out_view)
                if fused and ctx.has_input(3) else None)
    if bias is None and residual is None and not (fused and ctx.attrs["activation"]):
        return None

    def apply(b: Block, value, at: tuple):
        shift = Load(bias, (at[1], at[2]), dtype) if bias is not None else None
        if not fused:
            return k.Binary("+", value, shift)
        z = Load(residual, at, dtype) if residual is not None else None
        return window._epilogue(ctx, b, value, shift, z)

    return apply


@lowering("Conv", "FusedConv")
def lower_conv(ctx: LowerContext) -> BoundKernel:
    x, w_t, y_t = ctx.in_types[0], ctx.in_types[1], ctx.out_types[0]
    dtype = _check_dtype(ctx)
    group = ctx.attrs["group"]
    win = conv_window(ctx.opcall())
    spatial = x.shape[2:]
    if min(spatial, default=1) < 1:
        raise ctx.shape_error(f"empty spatial axis in {x}")
    batch, maps = x.shape[0], w_t.shape[0] // group
    channels = w_t.shape[1]
    kernel = w_t.shape[2:]
    looped_axes = _looped_axes(kernel)
    lines = [Line(size, out, 0, 1, stride, tuple((t, t * d - pad) for t in range(kk)),
                  looped=i < looped_axes, dilation=d, pad=pad)
             for i, (size, out, stride, d, pad, kk) in enumerate(zip(
                 spatial, win.out, win.strides, win.dilations, win.pads, kernel))]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], dtype, (batch, group, channels, *spatial))
    wts = kb.input(ctx.node.inputs[1], dtype, (group, maps, channels, *kernel))
    out_view = (batch, group, maps, *y_t.shape[2:])
    epilogue = _epilogue_fn(ctx, kb, group, maps, out_view)
    dst = kb.output(ctx.node.outputs[0], y_t.dtype, out_view)
    spec = ConvSpec(batch, group, channels, maps, src, dst, dtype, tuple(spatial),
                    lambda g, m, c, taps: Load(wts, (g, m, c, *taps), dtype), epilogue)
    return kb.build(conv_nests(kb, spec, lines))


def _looped_axes(kernel: Sequence[int]) -> int:
    """Leading kernel axes that run as loops: the trailing ones unroll within UNROLL_TAPS."""
    split, taps = len(kernel), 1
    while split > 0 and taps * kernel[split - 1] <= window.UNROLL_TAPS:
        split -= 1
        taps *= kernel[split]
    return split


# -- ConvTranspose --------------------------------------------------------------------------------
def transpose_lines(size: int, out: int, stride: int, dilation: int, pad: int,
                    kernel: int) -> list[Line]:
    """One line per residue ``r`` of the output positions modulo the stride (see the module
    docstring): positions ``r, r + stride, ...`` and the taps whose input index is whole."""
    lines = []
    for r in range(min(stride, out)):
        taps = tuple((t, (r + pad - t * dilation) // stride) for t in range(kernel)
                     if (r + pad - t * dilation) % stride == 0)
        lines.append(Line(size, len(range(r, out, stride)), r, stride, 1, taps))
    return lines


@lowering("ConvTranspose")
def lower_conv_transpose(ctx: LowerContext) -> BoundKernel:
    x, w_t, y_t = ctx.in_types[0], ctx.in_types[1], ctx.out_types[0]
    dtype = _check_dtype(ctx)
    group = ctx.attrs["group"]
    spatial, kernel = x.shape[2:], w_t.shape[2:]
    if min(spatial, default=1) < 1:
        raise ctx.shape_error(f"empty spatial axis in {x}")
    geo = transpose_geometry(ctx.opcall(), spatial, kernel)
    batch, channels, maps = x.shape[0], w_t.shape[0] // group, w_t.shape[1]
    n = len(spatial)
    per_axis = [transpose_lines(spatial[i], geo.out[i], geo.strides[i], geo.dilations[i],
                                geo.pads[i], kernel[i]) for i in range(n)]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], dtype, (batch, group, channels, *spatial))
    wts = kb.input(ctx.node.inputs[1], dtype, (group, channels, maps, *kernel))
    out_view = (batch, group, maps, *y_t.shape[2:])
    epilogue = _epilogue_fn(ctx, kb, group, maps, out_view)
    dst = kb.output(ctx.node.outputs[0], y_t.dtype, out_view)
    spec = ConvSpec(batch, group, channels, maps, src, dst, dtype, tuple(spatial),
                    lambda g, m, c, taps: Load(wts, (g, c, m, *taps), dtype), epilogue)
    nests = []
    for lines in itertools.product(*per_axis):
        nests += conv_nests(kb, spec, list(lines))
    return kb.build(nests)
