"""Ops that only gradient graphs need, and the ``vjp`` decorator that attaches a gradient rule to
an op's registry entry.

A gradient (vjp) rule is ``rule(ctx, node, grad_outputs) -> list`` (see ``graphc.autodiff``):
``ctx`` is a ``GradContext`` that emits ordinary registry ops into the gradient graph and looks
up the forward values; ``grad_outputs`` holds one ``Value`` (or None: no gradient reaches that
output) per output of ``node``; the rule returns one ``Value`` or None per input slot. The family
modules attach their rules with ``@vjp("Op")`` right after registering the op, so every op's
definition and its derivative sit side by side.

The ops here have no ONNX counterpart; each has a numpy reference (so gradient graphs run on the
interpreter), a shape rule, a kind and a FLOP count, like every other op:

* ``Step(X)``: the Heaviside step, 1 where X > 0 and 0 elsewhere (NaN gives 0), in X's dtype.
  Every piecewise derivative (Relu, LeakyRelu, Abs, Clip, Max/Min, HardSigmoid, ...) is a
  product of steps, so one mask op serves them all and fuses into elementwise arithmetic.
* ``BroadcastLike(input, like)``: ``input`` broadcast to ``like``'s shape (``like`` supplies only
  its shape, so symbolic dims such as the batch ``N`` work). The gradient of a reduction.
* ``MaxPoolGrad(dY, X)``: MaxPool's gradient w.r.t. X: each window's dY goes to the window's
  first maximum (MaxPool's ``argmax`` order), summed where windows overlap.
* ``GatherGrad(dY, indices, like)``: Gather's gradient w.r.t. its data: a scatter-add of dY into
  zeros shaped like ``like``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..types import FLOAT_DTYPES, TensorType
from .registry import OpCall, OpDef, get, int_, ints, register, string
from .rules import broadcast_dims, elementwise_flops, normalize_axis


def vjp(*ops: str) -> Callable:
    """Decorator: make ``rule`` the gradient (``OpDef.grad``) of each op in ``ops``."""

    def attach(rule: Callable) -> Callable:
        for name in ops:
            get(name).grad = rule
        return rule

    return attach


def _float_operand(call: OpCall, index: int, what: str) -> TensorType:
    t = call.in_types[index]
    if t.dtype not in FLOAT_DTYPES:
        raise call.error(f"{what} must be a float tensor, got {t}")
    return t


# -- Step -----------------------------------------------------------------------------------------
def _step_type(call: OpCall) -> list[TensorType]:
    return [_float_operand(call, 0, "X")]


def _step_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    return (x > 0).astype(x.dtype)


register(OpDef(
    name="Step", inputs=("X",), outputs=("Y",), infer=_step_type, reference=_step_ref,
    kind="elementwise", flops=elementwise_flops,
    doc="Heaviside step: 1 where x > 0, else 0 (NaN gives 0), in x's dtype."))


# -- BroadcastLike --------------------------------------------------------------------------------
def _broadcast_like_type(call: OpCall) -> list[TensorType]:
    src, like = call.in_types
    if src.rank > like.rank:
        raise call.error(f"input {src} has more dims than the target {like}")
    shape = broadcast_dims(src.shape, like.shape, call)
    if shape != like.shape:
        raise call.error(f"input {src} does not broadcast to the shape of {like}")
    return [like.with_dtype(src.dtype)]


def _broadcast_like_ref(call: OpCall, x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.array(np.broadcast_to(x, like.shape), copy=True)


register(OpDef(
    name="BroadcastLike", inputs=("input", "like"), outputs=("output",),
    infer=_broadcast_like_type, reference=_broadcast_like_ref, kind="broadcast",
    flops=lambda call, out_types: 0,
    doc="`input` broadcast (numpy rules, one way) to the shape of `like`; like's data is unused."))


# -- MaxPoolGrad ----------------------------------------------------------------------------------
def _max_pool_call(call: OpCall) -> OpCall:
    """The forward MaxPool as its shape rule sees it (X is input 1 of MaxPoolGrad)."""
    attrs = {k: v for k, v in call.attrs.items()}
    return OpCall("MaxPool", call.node, get("MaxPool").full_attrs(attrs), (call.in_types[1],),
                  (None,), 1)


def _max_pool_grad_type(call: OpCall) -> list[TensorType]:
    dy, x = call.in_types
    _float_operand(call, 1, "X")
    (y,) = get("MaxPool").infer(_max_pool_call(call))
    if dy != y:
        raise call.error(f"dY is {dy} but MaxPool of X {x} gives {y}")
    return [x]


def max_pool_grad_ref(call: OpCall, dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Scatter-add each dY into X's position of its window's maximum (MaxPool's Indices)."""
    forward = _max_pool_call(call)
    forward.in_types = (TensorType.of(x),)
    forward.n_outputs = 2
    forward.attrs = dict(forward.attrs, storage_order=0)
    _, indices = get("MaxPool").reference(forward, x)
    dx = np.zeros(x.size, dtype=x.dtype)
    np.add.at(dx, indices.ravel(), dy.ravel())
    return dx.reshape(x.shape)


def _max_pool_grad_flops(call: OpCall, out_types) -> int:
    dy = call.in_types[0]
    if not dy.is_static:
        return 0
    return dy.numel * (int(np.prod(call["kernel_shape"], dtype=np.int64)) + 1)


def _pool_attrs() -> dict:
    """MaxPool's attributes (spelled out: the family modules import this one, so it cannot
    import pool.py; a test checks that the two agree)."""
    return {"auto_pad": string("NOTSET", choices=("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")),
            "ceil_mode": int_(0, choices=(0, 1)), "dilations": ints(None),
            "kernel_shape": ints(), "pads": ints(None), "strides": ints(None),
            "storage_order": int_(0, choices=(0, 1))}


register(OpDef(
    name="MaxPoolGrad", inputs=("dY", "X"), outputs=("dX",), attrs=_pool_attrs(),
    infer=_max_pool_grad_type, reference=max_pool_grad_ref, kind="opaque",
    flops=_max_pool_grad_flops,
    doc="Gradient of MaxPool (same attributes) w.r.t. X: dY summed into each window's first "
        "maximum."))


# -- GatherGrad -----------------------------------------------------------------------------------
def _gather_grad_type(call: OpCall) -> list[TensorType]:
    dy, indices, like = call.in_types
    if indices.dtype not in ("i32", "i64"):
        raise call.error(f"indices must be int32 or int64, got {indices}")
    axis = normalize_axis(call["axis"], like.rank, call)
    want = like.shape[:axis] + indices.shape + like.shape[axis + 1:]
    if dy.shape != want or dy.dtype != like.dtype:
        raise call.error(f"dY is {dy}; Gather of {like} at indices {indices} gives "
                         f"{like.with_shape(want)}")
    return [like]


def gather_grad_ref(call: OpCall, dy: np.ndarray, indices: np.ndarray,
                    like: np.ndarray) -> np.ndarray:
    """dX = zeros like X, then dX[..., indices[j], ...] += dY[..., j, ...] along ``axis``."""
    axis = normalize_axis(call["axis"], like.ndim, call)
    dim = like.shape[axis]
    flat = np.where(indices < 0, indices + dim, indices).reshape(-1)
    # dY as (before, indices..., after) -> (before, len(flat), after)
    before = like.shape[:axis]
    dy3 = dy.reshape(before + (flat.size,) + like.shape[axis + 1:])
    dx = np.zeros(like.shape, dtype=like.dtype)
    moved_dx = np.moveaxis(dx, axis, 0)  # a view: writes land in dx
    np.add.at(moved_dx, flat, np.moveaxis(dy3, axis, 0))
    return dx


register(OpDef(
    name="GatherGrad", inputs=("dY", "indices", "like"), outputs=("dX",),
    attrs={"axis": int_(0)}, infer=_gather_grad_type, reference=gather_grad_ref,
    kind="opaque", flops=lambda call, out_types: 0,
    doc="Gradient of Gather w.r.t. its data: dY scatter-added along `axis` at `indices` into "
        "zeros shaped like `like`."))


# -- gradients of the gradient ops (second derivatives of graphs that use them) -----------------
@vjp("Step")
def _step_grad(ctx, node, grads):
    x = ctx.input(0)  # piecewise constant: zero away from 0
    return [ctx.broadcast_like(ctx.scalar(0.0, x), x)]


@vjp("BroadcastLike")
def _broadcast_like_grad(ctx, node, grads):
    return [ctx.unbroadcast(grads[0], 0), None]  # `like` only lends its shape
