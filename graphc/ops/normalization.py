"""Normalization and regularization: BatchNormalization, LRN and Dropout.

BatchNormalization follows opset 15 (``training_mode`` attribute, optional running statistics
outputs); Dropout follows opset 13 (``ratio`` and ``training_mode`` as optional inputs). The
import rules rewrite older opsets (``spatial``/``is_test`` attributes, several BatchNormalization
outputs meaning training, Dropout's ``ratio`` attribute) into these forms.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..types import TensorType
from .gradients import vjp
from .registry import ImportContext, OpCall, OpDef, float_, int_, register

FLOAT_DTYPES = ("f16", "f32", "f64")


def _float_operand(call: OpCall, index: int, what: str) -> TensorType:
    t = call.in_types[index]
    if t.dtype not in FLOAT_DTYPES:
        raise call.error(f"{what} must be a float tensor, got {t}")
    return t


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 statistics are computed in float32 (as the ONNX spec asks), others as given."""
    return np.promote_types(dtype, np.float32)


# -- BatchNormalization --------------------------------------------------------------------------
BN_PARAMS = ("scale", "B", "input_mean", "input_var")


def infer_batch_norm(call: OpCall) -> list[TensorType]:
    x = _float_operand(call, 0, "X")
    if x.rank < 2:
        raise call.error(f"X must have rank >= 2 (N, C, ...), got {x}")
    channels = x.shape[1]
    for i, what in enumerate(BN_PARAMS, start=1):
        t = _float_operand(call, i, what)
        if t.rank != 1 or (isinstance(t.shape[0], int) and isinstance(channels, int)
                           and t.shape[0] != channels):
            raise call.error(f"{what} must have shape ({channels},) like X's channels, got {t}")
    y = TensorType(x.shape, x.dtype)
    if not call["training_mode"]:
        return [y]  # the running statistics are outputs of training mode only
    mean, var = call.in_types[3], call.in_types[4]
    return [y, mean, var][:max(1, call.n_outputs)]


def _per_channel(v: np.ndarray, ndim: int, dtype) -> np.ndarray:
    return v.astype(dtype, copy=False).reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_reference(call: OpCall, x, scale, b, mean, var):
    """Y = (X - mean) / sqrt(var + epsilon) * scale + B, per channel (axis 1).

    In training mode mean/var are the batch's (population variance) and the running
    statistics are updated with ``momentum``.
    """
    dtype = _compute_dtype(x.dtype)
    xc = x.astype(dtype, copy=False)
    if call["training_mode"]:
        axes = (0,) + tuple(range(2, x.ndim))
        used_mean, used_var = xc.mean(axis=axes), xc.var(axis=axes)
    else:
        used_mean, used_var = mean, var
    normalized = ((xc - _per_channel(used_mean, x.ndim, dtype))
                  / np.sqrt(_per_channel(used_var, x.ndim, dtype) + call["epsilon"]))
    y = normalized * _per_channel(scale, x.ndim, dtype) + _per_channel(b, x.ndim, dtype)
    y = y.astype(x.dtype, copy=False)
    if not call["training_mode"] or call.n_outputs < 2:
        return y
    momentum = call["momentum"]
    running_mean = mean * momentum + used_mean.astype(mean.dtype) * (1 - momentum)
    running_var = var * momentum + used_var.astype(var.dtype) * (1 - momentum)
    return y, running_mean.astype(mean.dtype), running_var.astype(var.dtype)


def _import_batch_norm(ctx: ImportContext) -> bool | None:
    """Opsets 6-13: drop ``spatial``/``is_test``/``consumed_inputs``; more than one output means
    training. Their outputs ``saved_mean``/``saved_var`` (the batch statistics) come from a
    second node with momentum 0, whose running statistics are then exactly the batch's."""
    spatial = ctx.attrs.pop("spatial", 1)
    ctx.attrs.pop("is_test", None)
    ctx.attrs.pop("consumed_inputs", None)
    if spatial != 1:
        raise ctx.error("BatchNormalization with spatial=0 (per-activation statistics) is not "
                        "supported; flatten X to (N, C*D1*...) first")
    if ctx.opset >= 14 or all(o is None for o in ctx.outputs[1:]):
        return None
    ctx.attrs["training_mode"] = 1
    saved = list(ctx.outputs[3:5])
    if all(o is None for o in saved):
        del ctx.outputs[3:]
        return None
    main = list(ctx.outputs[:3])
    while main and main[-1] is None:
        main.pop()
    ctx.emit("BatchNormalization", ctx.inputs, dict(ctx.attrs), outputs=main)
    batch_stats = dict(ctx.attrs, momentum=0.0)
    ctx.emit("BatchNormalization", ctx.inputs, batch_stats, outputs=[None] + saved)
    return True


def batch_norm_flops(call: OpCall, out_types) -> int:
    """Subtract, divide, multiply, add per element (training adds ~3 for the statistics)."""
    x = call.in_types[0]
    if not x.is_static:
        return 0
    return x.numel * (7 if call["training_mode"] else 4)


register(OpDef(
    name="BatchNormalization", inputs=("X",) + BN_PARAMS,
    outputs=("Y", "running_mean?", "running_var?"),
    attrs={"epsilon": float_(1e-5), "momentum": float_(0.9),
           "training_mode": int_(0, choices=(0, 1))},
    infer=infer_batch_norm, reference=batch_norm_reference,
    # A per-channel affine map in inference; training-mode nodes hold a reduction and must be
    # decomposed before a fusion pass relies on this kind.
    kind="broadcast", flops=batch_norm_flops, onnx_import=_import_batch_norm,
    doc="Normalize X per channel with running (inference) or batch (training) statistics."))


# -- LRN -----------------------------------------------------------------------------------------
def infer_lrn(call: OpCall) -> list[TensorType]:
    x = _float_operand(call, 0, "X")
    if x.rank < 2:
        raise call.error(f"X must have rank >= 2 (N, C, ...), got {x}")
    return [x]


def lrn_reference(call: OpCall, x: np.ndarray) -> np.ndarray:
    """Y = X / (bias + alpha / size * sum of X^2 over the size channels around c) ^ beta."""
    size = call["size"]
    before = (size - 1) // 2  # floor((size-1)/2) channels before c, ceil((size-1)/2) after
    widths = [(0, 0), (before, size - 1 - before)] + [(0, 0)] * (x.ndim - 2)
    squares = np.pad(np.square(x), widths)
    square_sum = sliding_window_view(squares, size, axis=1).sum(axis=-1)
    scale = call["bias"] + (call["alpha"] / size) * square_sum
    return (x / scale ** call["beta"]).astype(x.dtype, copy=False)


def lrn_flops(call: OpCall, out_types) -> int:
    """Square, size-1 window additions, scale, bias, power and divide per element."""
    x = call.in_types[0]
    return x.numel * (call["size"] + 4) if x.is_static else 0


register(OpDef(
    name="LRN", inputs=("X",), outputs=("Y",),
    attrs={"alpha": float_(1e-4), "beta": float_(0.75), "bias": float_(1.0),
           "size": int_(check=lambda v: None if v >= 1 else f"must be >= 1, got {v}")},
    infer=infer_lrn, reference=lrn_reference, kind="out-fusable", flops=lrn_flops,
    doc="Local response normalization across channels (AlexNet)."))


# -- Dropout -------------------------------------------------------------------------------------
def _scalar_operand(call: OpCall, index: int, what: str, dtypes: tuple) -> None:
    if not call.has_input(index):
        return
    t = call.in_types[index]
    if t.dtype not in dtypes or t.rank != 0:
        raise call.error(f"{what} must be a scalar of type {'/'.join(dtypes)}, got {t}")


def infer_dropout(call: OpCall) -> list[TensorType]:
    x = _float_operand(call, 0, "data")
    _scalar_operand(call, 1, "ratio", FLOAT_DTYPES)
    _scalar_operand(call, 2, "training_mode", ("bool",))
    ratio = call.in_values[1] if len(call.in_values) > 1 else None
    if ratio is not None and not 0 <= float(ratio) < 1:
        raise call.error(f"ratio must be in [0, 1), got {float(ratio)}")
    return [x, x.with_dtype("bool")][:max(1, call.n_outputs)]


def dropout_reference(call: OpCall, data, ratio=None, training_mode=None):
    """Identity (mask all true) unless training_mode; then zero each element with probability
    ``ratio`` and scale the rest by 1 / (1 - ratio).

    The mask comes from ``numpy.random.RandomState(seed)`` (seed 0 when absent), so a graph
    gives the same result on every run; this is also the generator ONNX's own test data used.
    """
    training = training_mode is not None and bool(training_mode)
    ratio = np.asarray(0.5 if ratio is None else ratio)
    if not training or float(ratio) == 0:
        y, mask = data, np.ones(data.shape, dtype=bool)
    else:
        seed = call["seed"] if call["seed"] is not None else 0
        rng = np.random.RandomState(seed % 2 ** 32)
        mask = rng.uniform(0.0, 1.0, data.shape) >= ratio
        y = (mask * data * (1 / (1 - ratio))).astype(data.dtype, copy=False)
    return (y, mask) if call.n_outputs > 1 else y


def _import_dropout(ctx: ImportContext) -> None:
    """Opsets 7-11 give ``ratio`` as an attribute (opset 6 also ``is_test``): make it input 1."""
    ctx.attrs.pop("is_test", None)
    ctx.attrs.pop("consumed_inputs", None)
    ctx.attr_to_input("ratio", 1, dtype=np.float32)


def dropout_flops(call: OpCall, out_types) -> int:
    """Zero in inference (identity); a compare and a multiply per element when training."""
    mode = call.in_values[2] if len(call.in_values) > 2 else None
    x = call.in_types[0]
    if mode is None or not bool(mode) or not x.is_static:
        return 0
    return 2 * x.numel


register(OpDef(
    name="Dropout", inputs=("data", "ratio?", "training_mode?"), outputs=("output", "mask?"),
    attrs={"seed": int_(None)},
    infer=infer_dropout, reference=dropout_reference, kind="elementwise", flops=dropout_flops,
    onnx_import=_import_dropout,
    doc="Identity in inference; random zeroing with 1/(1-ratio) scaling when training_mode."))


# -- gradient (vjp) rules (see graphc.autodiff) -------------------------------------------------
def _channel_view(ctx, v, rank: int):
    """A per-channel (C,) vector as (1, C, 1, ...), to broadcast along axis 1."""
    return ctx.reshape(v, [1, v.shape[0]] + [1] * (rank - 2))


@vjp("BatchNormalization")
def _batch_norm_grad(ctx, node, grads):
    """Training mode (batch statistics): with xhat = (x - mean) * invstd,
    dX = scale * invstd * (dY - mean(dY) - xhat * mean(dY * xhat)), dscale = sum(dY * xhat),
    dB = sum(dY) (means and sums over every axis but the channels). Inference mode: the
    running statistics are inputs, so dX = dY * scale * invstd and they get gradients too."""
    g = grads[0]
    if g is None or any(o is not None for o in grads[1:]):
        raise ctx.error("has no gradient w.r.t. its running statistics outputs")
    x = ctx.input(0)
    rank = x.type.rank
    axes = [0] + list(range(2, rank))
    eps = ctx.attrs["epsilon"]
    training = ctx.attrs["training_mode"]
    if training:
        mean = ctx.op("ReduceMean", x, ctx.ints(axes), keepdims=1)
        centered = x - mean
        var = ctx.op("ReduceMean", centered * centered, ctx.ints(axes), keepdims=1)
    else:
        mean = _channel_view(ctx, ctx.input(3), rank)
        centered = x - mean
        var = _channel_view(ctx, ctx.input(4), rank)
    invstd = ctx.op("Reciprocal", ctx.op("Sqrt", var + eps))
    xhat = centered * invstd
    scale = _channel_view(ctx, ctx.input(1), rank)
    out = [None] * 5
    if ctx.needs(0):
        if training:
            mean_g = ctx.op("ReduceMean", g, ctx.ints(axes), keepdims=1)
            mean_gx = ctx.op("ReduceMean", g * xhat, ctx.ints(axes), keepdims=1)
            out[0] = scale * invstd * (g - mean_g - xhat * mean_gx)
        else:
            out[0] = g * (scale * invstd)
    if ctx.needs(1):
        out[1] = ctx.reduce_sum(g * xhat, axes, keepdims=False)
    if ctx.needs(2):
        out[2] = ctx.reduce_sum(g, axes, keepdims=False)
    for i in (3, 4):
        if ctx.needs(i) and training:  # batch statistics replace them: no effect on Y
            out[i] = ctx.constant(np.zeros(ctx.in_type(i).shape), x)
    if not training and ctx.needs(3):  # dY/dmean = -scale * invstd
        out[3] = ctx.reduce_sum(-(g * scale * invstd), axes, keepdims=False)
    if not training and ctx.needs(4):  # dY/dvar = -(x - mean) scale invstd^3 / 2
        cube = invstd * invstd * invstd
        out[4] = ctx.reduce_sum(g * centered * scale * cube * -0.5, axes, keepdims=False)
    return out


@vjp("Dropout")
def _dropout_grad(ctx, node, grads):
    """Training: dX = dY * mask / (1 - ratio), with the forward's mask (a second Dropout node
    with the same seed and inputs where the forward does not output it: the seeded mask is the
    same). Inference: the identity."""
    g = grads[0]
    if len(grads) > 1 and grads[1] is not None:
        raise ctx.error("has no gradient w.r.t. its mask output")
    mode = ctx.const(2)
    if not ctx.has_input(2) or (mode is not None and not bool(mode)):
        return [g]
    if mode is None:
        raise ctx.error("has a run-time training_mode; differentiating it needs a constant")
    ratio = float(ctx.const_input(1, "ratio")) if ctx.has_input(1) else 0.5
    if ratio == 0:
        return [g]
    if len(node.outputs) > 1 and node.outputs[1] is not None:
        mask = ctx.output(1)
    else:
        outputs = ctx.graph.add_node("Dropout", node.inputs, node.attrs,
                                     outputs=[None, ctx.graph.fresh_name(f"{node.name}_mask")])
        mask = ctx.graph.value(outputs[1])
    codes = {"f16": 10, "f32": 1, "f64": 11}
    keep = ctx.op("Cast", mask, to=codes[g.dtype])
    return [g * keep * (1.0 / (1.0 - ratio))]


def _channel_window_sum(ctx, v, before: int, after: int):
    """sum of v over channels c - before .. c + after (zeros past the ends)."""
    channels = v.shape[1]
    rank = v.type.rank
    pads = [0] * (2 * rank)
    pads[1], pads[rank + 1] = before, after
    padded = ctx.op("Pad", v, ctx.ints(pads)) if before or after else v
    terms = [ctx.op("Slice", padded, ctx.ints([j]), ctx.ints([j + channels]), ctx.ints([1]))
             if before or after else padded for j in range(before + after + 1)]
    return terms[0] if len(terms) == 1 else ctx.op("Sum", *terms)


@vjp("LRN")
def _lrn_grad(ctx, node, grads):
    """y_c = x_c s_c^-b, s_c = bias + a/n sum_{window(c)} x^2:
    dx_k = g_k s_k^-b - 2ab/n x_k sum_{c: k in window(c)} g_c x_c s_c^(-b-1); the channels c
    whose window holds k form the mirrored window (before and after swapped)."""
    g = grads[0]
    x = ctx.input(0)
    size, alpha, beta = ctx.attrs["size"], ctx.attrs["alpha"], ctx.attrs["beta"]
    if not isinstance(x.shape[1], int):
        raise ctx.error(f"needs a static channel count, got {x.type}")
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    s = _channel_window_sum(ctx, x * x, before, after) * (alpha / size) + ctx.attrs["bias"]
    direct = g * ctx.op("Pow", s, ctx.scalar(-beta, x))
    inner = g * x * ctx.op("Pow", s, ctx.scalar(-beta - 1.0, x))
    spread = _channel_window_sum(ctx, inner, after, before)
    return [direct - x * spread * (2.0 * alpha * beta / size)]
