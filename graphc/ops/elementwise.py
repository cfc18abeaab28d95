"""Elementwise ops: broadcasting arithmetic (Add ... Pow, variadic Sum/Mean/Max/Min), activations
(Relu, Sigmoid, Gelu, ...), unary math (Exp, Log, Erf, ...) and Clip.

Semantics are those of the newest ONNX opset (<= 21) of each op. Binary and variadic ops use
numpy's (ONNX's "multidirectional") broadcasting; PRelu's slope broadcasts one way, to X's shape.
Every reference returns exactly its input's dtype (numpy promotion is undone where it happens)
and lets NaN propagate.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..types import FLOAT_DTYPES, INT_DTYPES, TensorType
from .gradients import vjp
from .registry import ImportContext, OpCall, OpDef, float_, register, string
from .rules import broadcast, broadcast_dims, elementwise_flops

# ONNX type constraints, by short dtype name.
NUMERIC = FLOAT_DTYPES + INT_DTYPES
SIGNED = FLOAT_DTYPES + ("i8", "i16", "i32", "i64")
POW_BASE = FLOAT_DTYPES + ("i32", "i64")


# -- shared shape rules ------------------------------------------------------------------------
def check_dtypes(call: OpCall, allowed: tuple, what: str = "") -> None:
    """Raise naming the node if a present input's dtype is outside ONNX's constraint."""
    for i, t in enumerate(call.in_types):
        if t is not None and t.dtype not in allowed:
            kinds = "float" if allowed == FLOAT_DTYPES else what or ", ".join(allowed)
            raise call.error(f"input {i} has dtype {t.dtype}; {call.op} takes {kinds} tensors")


def check_unidirectional(call: OpCall, src: TensorType, dst: tuple, what: str) -> None:
    """``src`` must broadcast to ``dst`` without changing it (ONNX unidirectional broadcast)."""
    if src.rank > len(dst):
        raise call.error(f"{what} {src} has more dims than the target shape {tuple(dst)}")
    for have, want in zip(reversed(src.shape), reversed(dst)):
        # symbolic dims cannot be compared statically; the run-time broadcast checks them
        if have != 1 and have != want and isinstance(have, int) and isinstance(want, int):
            raise call.error(f"{what} {src} does not broadcast to shape {tuple(dst)}")


def unary_type(allowed: tuple, what: str = ""):
    """Shape rule of a one-input op: the input's type, once its dtype is checked."""

    def rule(call: OpCall) -> list[TensorType]:
        check_dtypes(call, allowed, what)
        return [call.in_types[0]]

    rule.__name__ = "unary_type"
    return rule


def broadcast_type(allowed: tuple, what: str = ""):
    """Shape rule of a broadcasting op whose inputs share one dtype."""

    def rule(call: OpCall) -> list[TensorType]:
        check_dtypes(call, allowed, what)
        return broadcast(call)

    rule.__name__ = "broadcast_type"
    return rule


def variadic_flops(call: OpCall, out_types) -> int:
    """One operation per output element for each input after the first."""
    return elementwise_flops(call, out_types) * max(1, len(call.in_types) - 1)


def _register(name: str, inputs: tuple, infer, reference, kind: str, doc: str,
              attrs: dict | None = None, flops=elementwise_flops, onnx_import=None,
              outputs: tuple = ("Y",)) -> None:
    register(OpDef(name=name, inputs=inputs, outputs=outputs, attrs=attrs or {}, infer=infer,
                   reference=reference, kind=kind, flops=flops, onnx_import=onnx_import, doc=doc))


def ufunc_ref(ufunc: np.ufunc):
    """The reference of an op that is exactly one numpy ufunc applied to its inputs."""

    def reference(call: OpCall, *xs: np.ndarray) -> np.ndarray:
        return ufunc(*xs)

    reference.__name__ = f"{ufunc.__name__}_ref"
    return reference


# -- binary arithmetic -------------------------------------------------------------------------
def trunc_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division rounding toward zero, as C (and ONNX, onnxruntime) define it.

    numpy's ``//`` floors, so quotients of operands with opposite signs and a nonzero remainder
    are one too small. Division by zero (undefined in ONNX) gives 0.
    """
    q = np.floor_divide(a, b)
    inexact = (a - q * b) != 0
    if a.dtype.kind == "i":
        fix = inexact & ((a < 0) != (b < 0)) & (b != 0)
        q = q + fix.astype(q.dtype)
    return q


def div_ref(call: OpCall, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":
        return trunc_divide(a, b)
    return np.divide(a, b)


def pow_type(call: OpCall) -> list[TensorType]:
    """Base and exponent may differ in dtype; the result has the base's dtype."""
    base, exponent = call.in_types
    if base.dtype not in POW_BASE:
        raise call.error(f"base has dtype {base.dtype}; Pow takes {', '.join(POW_BASE)} bases")
    if exponent.dtype not in NUMERIC:
        raise call.error(f"exponent has dtype {exponent.dtype}; Pow takes numeric exponents")
    return [TensorType(broadcast_dims(base.shape, exponent.shape, call), base.dtype)]


def pow_ref(call: OpCall, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if x.dtype.kind in "iu" and y.dtype.kind in "iu" and not np.any(y < 0):
        return np.power(x, y.astype(x.dtype))
    if x.dtype.kind in "iu":
        # fractional or negative exponents: compute in float64, truncate back (as onnxruntime)
        return np.power(x.astype(np.float64), y.astype(np.float64)).astype(x.dtype)
    if y.dtype.kind in "iu":
        return np.power(x, y.astype(x.dtype))
    return np.power(x, y).astype(x.dtype, copy=False)  # f32 ** f64 promotes; undo it


_BINARY = (("Add", ufunc_ref(np.add), "A + B"), ("Sub", ufunc_ref(np.subtract), "A - B"),
           ("Mul", ufunc_ref(np.multiply), "A * B"),
           ("Div", div_ref, "A / B; integer division truncates toward zero"))
for _name, _ref, _doc in _BINARY:
    _register(_name, ("A", "B"), broadcast_type(NUMERIC, "numeric"), _ref, "broadcast",
              f"{_doc} (numpy broadcasting)", outputs=("C",))

_register("Pow", ("X", "Y"), pow_type, pow_ref, "broadcast",
          "X ** Y (numpy broadcasting); the result has X's dtype", outputs=("Z",))


# -- variadic ----------------------------------------------------------------------------------
def _fold(ufunc, arrays) -> np.ndarray:
    out = functools.reduce(ufunc, arrays[1:], arrays[0])
    return np.array(out, copy=True) if len(arrays) == 1 else out  # never alias the input


def sum_ref(call: OpCall, *xs: np.ndarray) -> np.ndarray:
    return _fold(np.add, xs)


def mean_ref(call: OpCall, *xs: np.ndarray) -> np.ndarray:
    return _fold(np.add, xs) / xs[0].dtype.type(len(xs))


def max_ref(call: OpCall, *xs: np.ndarray) -> np.ndarray:
    return _fold(np.maximum, xs)  # np.maximum propagates NaN, as ONNX's Max does


def min_ref(call: OpCall, *xs: np.ndarray) -> np.ndarray:
    return _fold(np.minimum, xs)


_VARIADIC = (("Sum", sum_ref, FLOAT_DTYPES, "elementwise sum of the inputs"),
             ("Mean", mean_ref, FLOAT_DTYPES, "elementwise mean of the inputs"),
             ("Max", max_ref, NUMERIC, "elementwise maximum of the inputs"),
             ("Min", min_ref, NUMERIC, "elementwise minimum of the inputs"))
for _name, _ref, _types, _doc in _VARIADIC:
    _register(_name, ("data_0*",), broadcast_type(_types, "numeric"), _ref, "broadcast",
              f"{_doc} (numpy broadcasting)", flops=variadic_flops, outputs=(_name.lower(),))


# -- activations -------------------------------------------------------------------------------
def relu_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    return np.maximum(x, x.dtype.type(0))


def leaky_relu_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, x, x * x.dtype.type(call["alpha"]))


def prelu_type(call: OpCall) -> list[TensorType]:
    x, slope = call.in_types
    check_dtypes(call, FLOAT_DTYPES + ("i32", "i64", "u32", "u64"))
    if slope.dtype != x.dtype:
        raise call.error(f"slope dtype {slope.dtype} differs from X's {x.dtype}")
    check_unidirectional(call, slope, x.shape, "slope")
    return [x]


def prelu_ref(call: OpCall, x: np.ndarray, slope: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, x, x * slope)


def sigmoid_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow: exp is only taken of -|x|, so it lies in (0, 1]."""
    e = np.exp(-np.abs(x))
    r = 1 / (1 + e)
    return np.where(x >= 0, r, e * r)


def hard_sigmoid_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    t = x.dtype.type
    y = x * t(call["alpha"]) + t(call["beta"])
    return np.minimum(np.maximum(y, t(0)), t(1))


def elu_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    # expm1 of min(x, 0): exact near 0 and no overflow in the branch np.where discards
    neg = np.expm1(np.minimum(x, x.dtype.type(0))) * x.dtype.type(call["alpha"])
    return np.where(x >= 0, x, neg)


def selu_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    t = x.dtype.type
    neg = np.expm1(np.minimum(x, t(0))) * t(call["alpha"])
    return np.where(x > 0, x, neg) * t(call["gamma"])


def softplus_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), which cannot overflow."""
    return np.maximum(x, x.dtype.type(0)) + np.log1p(np.exp(-np.abs(x)))


_ERF = np.frompyfunc(math.erf, 1, 1)


def erf_f64(x: np.ndarray) -> np.ndarray:
    """math.erf over an array (no scipy), in float64."""
    return np.asarray(_ERF(np.asarray(x, dtype=np.float64)), dtype=np.float64)


def erf_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    return erf_f64(x).astype(x.dtype)


def gelu_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    if call["approximate"] == "tanh":
        inner = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)
        y = 0.5 * x64 * (1 + np.tanh(inner))
    else:
        y = 0.5 * x64 * (1 + erf_f64(x64 / math.sqrt(2)))
    return y.astype(x.dtype)


def hard_swish_ref(call: OpCall, x: np.ndarray) -> np.ndarray:
    t = x.dtype.type
    return x * np.minimum(np.maximum(x * t(1 / 6) + t(0.5), t(0)), t(1))


_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875
_FLOAT = unary_type(FLOAT_DTYPES)

_register("Relu", ("X",), unary_type(SIGNED, "float or signed integer"), relu_ref,
          "elementwise", "max(x, 0)")
_register("LeakyRelu", ("X",), _FLOAT, leaky_relu_ref, "elementwise",
          "x if x >= 0 else alpha * x", attrs={"alpha": float_(0.01)})
_register("PRelu", ("X", "slope"), prelu_type, prelu_ref, "broadcast",
          "x if x >= 0 else slope * x; slope broadcasts to X's shape")
_register("Sigmoid", ("X",), _FLOAT, sigmoid_ref, "elementwise", "1 / (1 + exp(-x))")
_register("HardSigmoid", ("X",), _FLOAT, hard_sigmoid_ref, "elementwise",
          "max(0, min(1, alpha * x + beta))", attrs={"alpha": float_(0.2), "beta": float_(0.5)})
_register("Tanh", ("input",), _FLOAT, ufunc_ref(np.tanh), "elementwise", "tanh(x)",
          outputs=("output",))
_register("Elu", ("X",), _FLOAT, elu_ref, "elementwise",
          "x if x >= 0 else alpha * (exp(x) - 1)", attrs={"alpha": float_(1.0)})
_register("Selu", ("X",), _FLOAT, selu_ref, "elementwise",
          "gamma * (x if x > 0 else alpha * (exp(x) - 1))",
          attrs={"alpha": float_(_SELU_ALPHA), "gamma": float_(_SELU_GAMMA)})
_register("Softplus", ("X",), _FLOAT, softplus_ref, "elementwise", "log(1 + exp(x))")
_register("Gelu", ("X",), _FLOAT, gelu_ref, "elementwise",
          "x * Phi(x) (approximate='none'), or its tanh approximation (approximate='tanh')",
          attrs={"approximate": string("none", choices=("none", "tanh"))})
_register("HardSwish", ("X",), _FLOAT, hard_swish_ref, "elementwise",
          "x * max(0, min(1, x / 6 + 1 / 2))")


# -- unary math ----------------------------------------------------------------------------------
_register("Erf", ("input",), unary_type(NUMERIC, "numeric"), erf_ref, "elementwise",
          "the error function", outputs=("output",))

# name, numpy ufunc, (input name, output name), shape rule, doc
_UNARY_UFUNCS = (
    ("Exp", np.exp, ("input", "output"), _FLOAT, "exp(x)"),
    ("Log", np.log, ("input", "output"), _FLOAT, "natural logarithm"),
    ("Sqrt", np.sqrt, ("X", "Y"), _FLOAT, "square root"),
    ("Abs", np.abs, ("X", "Y"), unary_type(NUMERIC, "numeric"), "|x|"),
    ("Neg", np.negative, ("X", "Y"), unary_type(SIGNED, "float or signed integer"), "-x"),
    ("Reciprocal", np.reciprocal, ("X", "Y"), _FLOAT, "1 / x"),
)
for _name, _ufunc, (_in, _out), _infer, _doc in _UNARY_UFUNCS:
    _register(_name, (_in,), _infer, ufunc_ref(_ufunc), "elementwise", _doc, outputs=(_out,))


# -- Clip ----------------------------------------------------------------------------------------
def clip_type(call: OpCall) -> list[TensorType]:
    x = call.in_types[0]
    check_dtypes(call, NUMERIC, "numeric")
    for i, what in ((1, "min"), (2, "max")):
        if not call.has_input(i):
            continue
        t = call.in_types[i]
        if t.dtype != x.dtype:
            raise call.error(f"{what} has dtype {t.dtype}, X has {x.dtype}")
        if any(d != 1 for d in t.shape):
            raise call.error(f"{what} must be a scalar, got {t}")
    return [x]


def clip_ref(call: OpCall, x: np.ndarray, lo=None, hi=None) -> np.ndarray:
    """min(max(x, lo), hi): when lo > hi every element becomes hi, as ONNX specifies."""
    y = x
    if lo is not None:
        y = np.maximum(y, lo.reshape(()))
    if hi is not None:
        y = np.minimum(y, hi.reshape(()))
    return np.array(y, copy=True) if y is x else y


def import_clip(ctx: ImportContext) -> None:
    """Clip < 11 has float attributes min/max; later opsets take them as scalar inputs.

    The bounds take the dtype of the input (Clip-6 is float-only).
    """
    dtype = ctx.type_of(ctx.inputs[0]).np_dtype
    for position, attr in ((1, "min"), (2, "max")):
        if attr in ctx.attrs:
            ctx.attr_to_input(attr, position, dtype=dtype)


_register("Clip", ("input", "min?", "max?"), clip_type, clip_ref, "broadcast",
          "min(max(x, min), max); absent bounds do not clip", onnx_import=import_clip,
          outputs=("output",))


# -- gradient (vjp) rules: rule(ctx, node, grad_outputs) -> one gradient per input --------------
# (see graphc.autodiff; the masks of piecewise derivatives are products of Step, 1 where x > 0)
_ONNX_FLOAT_CODES = {"f16": 10, "f32": 1, "f64": 11}


@vjp("Add")
def _add_grad(ctx, node, grads):
    (g,) = grads  # d(a + b) = da + db
    return [ctx.unbroadcast(g, 0) if ctx.needs(0) else None,
            ctx.unbroadcast(g, 1) if ctx.needs(1) else None]


@vjp("Sub")
def _sub_grad(ctx, node, grads):
    (g,) = grads  # d(a - b) = da - db
    return [ctx.unbroadcast(g, 0) if ctx.needs(0) else None,
            ctx.unbroadcast(-g, 1) if ctx.needs(1) else None]


@vjp("Mul")
def _mul_grad(ctx, node, grads):
    (g,) = grads  # d(a * b) = b da + a db
    a, b = ctx.input(0), ctx.input(1)
    return [ctx.unbroadcast(g * b, 0) if ctx.needs(0) else None,
            ctx.unbroadcast(g * a, 1) if ctx.needs(1) else None]


@vjp("Div")
def _div_grad(ctx, node, grads):
    (g,) = grads  # d(a / b) = da / b - (a / b) db / b
    g_over_b = g / ctx.input(1)
    return [ctx.unbroadcast(g_over_b, 0) if ctx.needs(0) else None,
            ctx.unbroadcast(-(g_over_b * ctx.output()), 1) if ctx.needs(1) else None]


def _as_float(ctx, v, like):
    """``v`` in ``like``'s float dtype (Pow's exponent may be an integer tensor)."""
    if v.dtype == like.dtype:
        return v
    return ctx.op("Cast", v, to=_ONNX_FLOAT_CODES[like.dtype])


@vjp("Pow")
def _pow_grad(ctx, node, grads):
    (g,) = grads  # d(x ** y) = y x ** (y - 1) dx + x ** y log(x) dy
    x, y = ctx.input(0), ctx.input(1)
    dx = dy = None
    if ctx.needs(0):
        yf = _as_float(ctx, y, x)
        dx = ctx.unbroadcast(g * yf * ctx.op("Pow", x, yf - 1.0), 0)
    if ctx.needs(1):
        dy = ctx.unbroadcast(g * ctx.output() * ctx.op("Log", x), 1)
    return [dx, dy]


def _variadic_grad(scale: float | None):
    def rule(ctx, node, grads):
        (g,) = grads  # every input gets the output's gradient (Mean: divided by their count)
        if scale is not None:
            g = g * (scale / len(node.inputs))
        return [ctx.unbroadcast(g, i) if ctx.needs(i) else None for i in range(len(node.inputs))]

    return rule


vjp("Sum")(_variadic_grad(None))
vjp("Mean")(_variadic_grad(1.0))


@vjp("Max", "Min")
def _extremum_grad(ctx, node, grads):
    (g,) = grads  # the gradient goes to the inputs equal to the result (all of them on ties)
    y = ctx.output()
    out = []
    for i in range(len(node.inputs)):
        if not ctx.needs(i):
            out.append(None)
            continue
        differs = ctx.step(ctx.op("Abs", y - ctx.input(i)))
        out.append(ctx.unbroadcast(g * (1.0 - differs), i))
    return out


@vjp("Neg")
def _neg_grad(ctx, node, grads):
    return [-grads[0]]


@vjp("Abs")
def _abs_grad(ctx, node, grads):
    x = ctx.input(0)  # d|x| = sign(x) dx
    return [grads[0] * (ctx.step(x) - ctx.step(-x))]


@vjp("Exp")
def _exp_grad(ctx, node, grads):
    return [grads[0] * ctx.output()]  # d exp(x) = exp(x) dx


@vjp("Log")
def _log_grad(ctx, node, grads):
    return [grads[0] / ctx.input(0)]  # d log(x) = dx / x


@vjp("Sqrt")
def _sqrt_grad(ctx, node, grads):
    return [grads[0] * 0.5 / ctx.output()]  # d sqrt(x) = dx / (2 sqrt(x))


@vjp("Reciprocal")
def _reciprocal_grad(ctx, node, grads):
    y = ctx.output()  # d (1/x) = -dx / x^2 = -y^2 dx
    return [-(grads[0] * y * y)]


@vjp("Relu")
def _relu_grad(ctx, node, grads):
    return [grads[0] * ctx.step(ctx.input(0))]


@vjp("LeakyRelu")
def _leaky_relu_grad(ctx, node, grads):
    alpha = ctx.attrs["alpha"]  # slope 1 for x > 0, alpha below
    return [grads[0] * (ctx.step(ctx.input(0)) * (1.0 - alpha) + alpha)]


@vjp("PRelu")
def _prelu_grad(ctx, node, grads):
    (g,) = grads  # dy = (x > 0 ? 1 : slope) dx + (x > 0 ? 0 : x) dslope
    x, slope = ctx.input(0), ctx.input(1)
    below = 1.0 - ctx.step(x)
    dx = g * (1.0 - below + below * slope) if ctx.needs(0) else None
    dslope = ctx.unbroadcast(g * x * below, 1) if ctx.needs(1) else None
    return [dx, dslope]


@vjp("Sigmoid")
def _sigmoid_grad(ctx, node, grads):
    y = ctx.output()  # s' = s (1 - s)
    return [grads[0] * y * (1.0 - y)]


@vjp("Tanh")
def _tanh_grad(ctx, node, grads):
    y = ctx.output()  # tanh' = 1 - tanh^2
    return [grads[0] * (1.0 - y * y)]


@vjp("Elu")
def _elu_grad(ctx, node, grads):
    # below 0: alpha exp(x) = y + alpha, so the derivative needs no second exp
    above = ctx.step(ctx.input(0))
    slope_below = ctx.output() + ctx.attrs["alpha"]
    return [grads[0] * (above + (1.0 - above) * slope_below)]


@vjp("Selu")
def _selu_grad(ctx, node, grads):
    # gamma above 0; below, gamma alpha exp(x) = y + gamma alpha
    gamma, alpha = ctx.attrs["gamma"], ctx.attrs["alpha"]
    above = ctx.step(ctx.input(0))
    slope_below = ctx.output() + gamma * alpha
    return [grads[0] * (above * gamma + (1.0 - above) * slope_below)]


@vjp("Softplus")
def _softplus_grad(ctx, node, grads):
    return [grads[0] * ctx.op("Sigmoid", ctx.input(0))]  # log(1 + e^x)' = sigmoid(x)


@vjp("HardSigmoid")
def _hard_sigmoid_grad(ctx, node, grads):
    y = ctx.output()  # alpha where 0 < alpha x + beta < 1, i.e. where 0 < y < 1
    inside = ctx.step(y) * ctx.step(1.0 - y)
    return [grads[0] * inside * ctx.attrs["alpha"]]


@vjp("HardSwish")
def _hard_swish_grad(ctx, node, grads):
    # y = x h(x), h = clip(x / 6 + 1/2, 0, 1): y' = h + x / 6 where -3 < x < 3
    x = ctx.input(0)
    h = ctx.op("HardSigmoid", x, alpha=1 / 6, beta=0.5)
    inside = ctx.step(h) * ctx.step(1.0 - h)
    return [grads[0] * (h + x * inside * (1 / 6))]


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


@vjp("Gelu")
def _gelu_grad(ctx, node, grads):
    x = ctx.input(0)
    if ctx.attrs["approximate"] == "tanh":
        # y = x (1 + tanh u) / 2, u = c (x + 0.044715 x^3):
        # y' = (1 + t) / 2 + x (1 - t^2) c (1 + 3 * 0.044715 x^2) / 2
        x2 = x * x
        t = ctx.op("Tanh", (x + x * x2 * 0.044715) * _SQRT_2_OVER_PI)
        du = (x2 * (3 * 0.044715) + 1.0) * _SQRT_2_OVER_PI
        slope = (t + 1.0) * 0.5 + x * (1.0 - t * t) * du * 0.5
    else:
        # y = x Phi(x): y' = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
        cdf = (ctx.op("Erf", x * (1 / math.sqrt(2))) + 1.0) * 0.5
        pdf = ctx.op("Exp", x * x * -0.5) * _INV_SQRT_2PI
        slope = cdf + x * pdf
    return [grads[0] * slope]


@vjp("Erf")
def _erf_grad(ctx, node, grads):
    x = ctx.input(0)  # erf'(x) = 2 / sqrt(pi) exp(-x^2)
    return [grads[0] * ctx.op("Exp", -(x * x)) * (2 / math.sqrt(math.pi))]


@vjp("Clip")
def _clip_grad(ctx, node, grads):
    # dx passes where lo < x < hi; the bounds get the gradient where they clip
    (g,) = grads
    x = ctx.input(0)
    above_lo = ctx.step(x - ctx.input(1)) if ctx.has_input(1) else None
    below_hi = ctx.step(ctx.input(2) - x) if ctx.has_input(2) else None
    dx = g
    for mask in (above_lo, below_hi):
        if mask is not None:
            dx = dx * mask
    dlo = ctx.unbroadcast(g * (1.0 - above_lo), 1) if ctx.needs(1) else None
    dhi = ctx.unbroadcast(g * (1.0 - below_hi), 2) if ctx.needs(2) else None
    return [dx if ctx.needs(0) else None, dlo, dhi]
