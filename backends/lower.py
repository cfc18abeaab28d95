"""Lowering: a graphc node -> kernel(s) of the loop-level kernel IR (``backends/kernel_ir.py``).

``lower_node(graph, node)`` returns ``BoundKernel``s: a ``Kernel`` plus the graph value bound to
each of its parameters. Each op's lowering is one function registered in ``LOWERINGS`` by
``@lowering("Op", ...)`` (the registry's ``lower=`` field may point at these later); elementwise
ops register a *scalar* rule in ``SCALAR_RULES`` that both their own kernel and
``FusedElementwise`` bodies use, so a fused body computes what its ops compute.

Covered: every elementwise/broadcast op (unary math and activations, binary arithmetic with numpy
broadcasting, Pow (integer Pow too), Clip, PRelu, Sum/Mean/Max/Min, Cast, Identity,
BatchNormalization and Dropout, training mode included), ``FusedElementwise``, the injective
ops (Transpose, Concat, Split, Slice, Pad in all four modes, Gather with constant or run-time
indices, and Reshape/Flatten/Squeeze/Unsqueeze as copies) and the reductions (ReduceSum, ReduceMean,
Softmax, LogSoftmax, GlobalAveragePool, GlobalMaxPool); Conv/FusedConv/ConvTranspose live in
``lower_conv.py``, the windowed ops in ``lower_window.py``, Gemm/MatMul in ``lower_gemm.py``.

Invariants:

* semantics are those of the op's numpy reference (``graphc.interpret``): the same operations in
  the same order with the same constants (``x * alpha`` rounds ``alpha`` to x's dtype as
  ``x.dtype.type(alpha)`` does), so data movement and the arithmetic-only ops are bit-exact and
  NaN propagates; only transcendental functions and the order of reduction sums differ (the
  target states their error bounds);
* shapes must be static (symbolic dims may be bound with ``dims=``); compute ops take f32, f64
  and the integer dtypes their op allows; f16 is accepted by data-movement ops only
  (``UnsupportedOpError`` otherwise), except that elementwise ops widen f16 to f32 and round
  the result back (``map_kernel``);
* buffers are contiguous row-major views of their values; dims are coalesced where the access
  pattern allows (a ``[3,64,7,7] + [64,1,1]`` add runs over ``[3,64,49]`` views), so a
  parameter's shape may differ from its value's but never its dtype or element count;
* elementwise kernels declare every operand of the result's exact type as an ``inplace``
  candidate (the memory planner may hand them the same buffer);
* the outermost loop of each nest is ``parallel`` over output elements (one output element is
  written by exactly one iteration) and the innermost loop over contiguous memory is marked
  ``vectorize``;
* reductions accumulate in a scalar when the input's innermost dim is reduced, and in whole
  output rows (the output buffer is the accumulator, split into column tiles when there are few
  rows) when it is kept; Softmax over a non-last axis keeps its running max and sum in output
  rows 0 and 1 until the last pass, so no kernel needs scratch memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphc.errors import FeedError, GraphcError, ShapeError, UnsupportedOpError
from graphc.ir import Graph, Node
from graphc.ops import fused_expression as fx
from graphc.ops import registry
from graphc.ops.reduce import reduced_axes
from graphc.ops.rules import normalize_axis
from graphc.ops.shapes import _clamp_slice, _pad_widths, _slice_params, _transpose_perm
from graphc.types import TensorType

from . import kernel_ir as k
from .kernel_ir import INDEX, Const, Kernel, Load, Var

COMPUTE_DTYPES = ("f32", "f64") + k.INT_DTYPES
FLOATS = ("f32", "f64")


@dataclass(frozen=True)
class RunCheck:
    """An error a kernel records at run time instead of reading out of bounds: the kernel writes
    ``[count, first]`` into the i64 array ``slot`` (a compile-time array of the lowering) on every
    run; after the run, a non-zero count raises ``FeedError(message.format(count=, first=))``.
    Plain data, so that a specialisation loaded from the code cache still checks it."""

    slot: str
    message: str

    def raise_if_recorded(self, recorded: np.ndarray) -> None:
        if recorded[0]:
            raise FeedError(self.message.format(count=int(recorded[0]), first=int(recorded[1])))


@dataclass(frozen=True)
class BoundKernel:
    """A kernel and the graph value bound to each parameter (in ``kernel.params`` order).

    ``scratch``: arrays made at lowering time that some parameters are bound to by name instead
    of a graph value (e.g. an error slot); the compiled model keeps one copy per specialisation.
    ``run_check``: an error the kernel may record in one of them during a run."""

    kernel: Kernel
    values: tuple
    scratch: Mapping = field(default_factory=dict)
    run_check: RunCheck | None = None

    def __str__(self) -> str:
        binding = ", ".join(f"{p.name}=%{v}" for p, v in zip(self.kernel.params, self.values))
        return f"{self.kernel}\n// bound: {binding}"


@dataclass(frozen=True)
class BoundFunction:
    """A lowering that is generated LLVM code rather than kernel IR (e.g. the packed SGEMM).

    ``emit(module, symbol)`` adds ``void symbol(T* ..., i32 thread_id, i32 n_threads)`` to
    ``module``; its pointer parameters are bound, in order, to ``values``: graph values, or names
    of ``constants`` -- arrays prepared at compile time (packed weights), which the compiled model
    keeps alive. ``text`` describes the call for ``emit="kernel"`` dumps.
    """

    name: str
    emit: Callable
    values: tuple
    constants: Mapping = field(default_factory=dict)
    text: str = ""
    run_check: RunCheck | None = None  # an error the kernel may record during a run

    def __str__(self) -> str:
        binding = ", ".join(f"%{v}" for v in self.values)
        return f"// {self.name}: {self.text}\n// bound: {binding}"


class LoweringError(UnsupportedOpError):
    """A node the kernel lowering cannot express (the message names the node and why)."""


# -- context and builders -------------------------------------------------------------------------
@dataclass
class LowerContext:
    """What a lowering sees of one node: full attributes, static input/output types and the
    values of constant inputs."""

    graph: Graph
    node: Node
    attrs: dict
    in_types: list
    out_types: list
    in_values: list
    name: str

    def error(self, message: str) -> LoweringError:
        return LoweringError(f"{self.node.op} node '{self.node.name}': {message}")

    def shape_error(self, message: str) -> ShapeError:
        return ShapeError(f"{self.node.op} node '{self.node.name}': {message}")

    def const_input(self, i: int, what: str) -> np.ndarray:
        value = self.in_values[i] if i < len(self.in_values) else None
        if value is None:
            raise self.error(f"input {i} ({what}) must be a constant to lower this node")
        return value

    def has_input(self, i: int) -> bool:
        return i < len(self.node.inputs) and self.node.inputs[i] is not None

    def opcall(self) -> registry.OpCall:
        return registry.OpCall(self.node.op, self.node.name, self.attrs, tuple(self.in_types),
                               tuple(self.in_values), len(self.node.outputs))


class KernelBuilder:
    """Collects parameters, tables and fresh names while a lowering builds one kernel."""

    def __init__(self, ctx: LowerContext):
        self.ctx = ctx
        self.params: list[k.Buffer] = []
        self.values: list[str] = []
        self.tables: list[k.Table] = []
        self._by_value: dict[tuple, str] = {}
        self._counters: dict[str, int] = {}

    def fresh(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0)
        self._counters[prefix] = n + 1
        return f"{prefix}{n}"

    def _param_name(self, value: str) -> str:
        base = re.sub(r"\W", "_", value) or "v"
        if base[0].isdigit():
            base = "v" + base
        taken = {p.name for p in self.params} | {t.name for t in self.tables}
        name, i = base, 1
        while name in taken or re.fullmatch(r"(t|i|acc|T)\d+", name):
            name, i = f"{base}_{i}", i + 1
        return name

    def input(self, value: str, dtype: str, shape: Sequence[int]) -> str:
        """The parameter viewing graph value ``value`` with ``shape`` (one per value and view)."""
        key = (value, tuple(shape))
        if key not in self._by_value:
            name = self._param_name(value)
            self.params.append(k.Buffer(name, dtype, tuple(shape)))
            self.values.append(value)
            self._by_value[key] = name
        return self._by_value[key]

    def output(self, value: str, dtype: str, shape: Sequence[int]) -> str:
        name = self._param_name(value)
        self.params.append(k.Buffer(name, dtype, tuple(shape), output=True))
        self.values.append(value)
        return name

    def table(self, values: Sequence[int]) -> str:
        name = self.fresh("T")
        self.tables.append(k.Table(name, tuple(int(v) for v in values)))
        return name

    def build(self, body: Sequence, inplace: Sequence = ()) -> BoundKernel:
        node = self.ctx.node
        kernel = Kernel(self.ctx.name, tuple(self.params), tuple(body), tuple(self.tables),
                        tuple(inplace), doc=f"{node.op} node '{node.name}'")
        return BoundKernel(k.verify(kernel), tuple(self.values))


class Block:
    """A statement list under construction; ``let`` binds a scalar and returns its ``Local``."""

    def __init__(self, kb: KernelBuilder, ranges: Mapping | None = None):
        self.kb = kb
        self.stmts: list = []
        self.ranges = dict(ranges or {})

    def let(self, value, mutable: bool = False):
        if not mutable and isinstance(value, (Const, Var, k.Local)):
            return value
        name = self.kb.fresh("acc" if mutable else "t")
        self.stmts.append(k.Let(name, value, mutable))
        return k.Local(name, value.dtype)

    def index(self, expr):
        """An index expression simplified with the ranges of the enclosing loops."""
        return k.simplify(expr, self.ranges, {t.name: t.values for t in self.kb.tables})

    def emit(self, stmt) -> None:
        self.stmts.append(stmt)

    def loop(self, extent: int, fill: Callable[[Block, Var], None], vectorize: bool = False,
             parallel: bool = False) -> None:
        var = self.kb.fresh("i")
        inner = Block(self.kb, {**self.ranges, var: (0, max(extent - 1, 0))})
        fill(inner, Var(var))
        self.stmts.append(k.For(var, extent, tuple(inner.stmts), parallel, vectorize))


def nest(kb: KernelBuilder, shape: Sequence[int], fill: Callable[[Block, list], None]) -> k.For:
    """A parallel loop nest over ``shape`` (rank >= 1): the leading dims collapse into one
    parallel loop (balanced thread split whatever the batch), the last dim is the vectorised
    inner loop. ``fill(block, indices)`` writes the body for the element at ``indices``."""
    top = Block(kb)
    if len(shape) == 1:
        top.loop(shape[0], lambda b, v: fill(b, [v]), vectorize=True, parallel=True)
        return top.stmts[0]
    outer = math.prod(shape[:-1])

    def outer_body(b: Block, o: Var) -> None:
        lead = [b.index(i) for i in k.unflatten(o, shape[:-1])]
        b.loop(shape[-1], lambda inner, v: fill(inner, lead + [v]), vectorize=True)

    top.loop(outer, outer_body, parallel=True)
    return top.stmts[0]


# -- the table of lowerings -----------------------------------------------------------------------
Lowering = Callable[[LowerContext], list]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*ops: str) -> Callable[[Lowering], Lowering]:
    def wrap(fn: Lowering) -> Lowering:
        for op in ops:
            assert op not in LOWERINGS, f"lowering of {op} registered twice"
            LOWERINGS[op] = fn
        return fn

    return wrap


def can_lower(op: str) -> bool:
    return op in LOWERINGS


def lower_node(graph: Graph, node: Node, dims: Mapping[str, int] | None = None,
               name: str | None = None) -> list[BoundKernel]:
    """Kernels computing ``node`` (run in order); symbolic dims are bound by ``dims``."""
    fn = LOWERINGS.get(node.op)
    if fn is None:
        raise LoweringError(f"{node.op} node '{node.name}': no kernel lowering for op "
                            f"{node.op} (lowered ops: {', '.join(sorted(LOWERINGS))})")
    ctx = LowerContext(
        graph, node, node.opdef.full_attrs(node.attrs),
        [_static(graph.type_of(v), dims, node, f"input {i}") if v is not None else None
         for i, v in enumerate(node.inputs)],
        [_static(t, dims, node, f"output {i}") if t is not None else None
         for i, t in enumerate(node.types)],
        [graph.constant_value(v) for v in node.inputs],
        name or _kernel_name(node.name))
    result = fn(ctx)
    return result if isinstance(result, list) else [result]


def _kernel_name(node_name: str) -> str:
    name = re.sub(r"\W", "_", node_name) or "kernel"
    return name if not name[0].isdigit() else "k" + name


def _static(t: TensorType, dims, node: Node, what: str) -> TensorType:
    shape = []
    for d in t.shape:
        if isinstance(d, str):
            if not dims or d not in dims:
                raise ShapeError(f"{node.op} node '{node.name}': {what} has symbolic dim '{d}' "
                                 f"({t}); kernels need static shapes (bind it with dims=)")
            d = int(dims[d])
        shape.append(d)
    return TensorType(tuple(shape), t.dtype)


# -- scalar rules of the elementwise ops ----------------------------------------------------------
@dataclass
class Scalar:
    """What a scalar rule gets: the op it computes, its full attributes, the block to bind
    intermediates in and how to report errors."""

    block: Block
    error: Callable[[str], GraphcError]
    attrs: dict = field(default_factory=dict)
    op: str = ""

    def let(self, value):
        return self.block.let(value)


ScalarRule = Callable[[Scalar, list], object]
SCALAR_RULES: dict[str, ScalarRule] = {}


def scalar_rule(*ops: str, dtypes: tuple = COMPUTE_DTYPES):
    """Register the scalar rule of elementwise ``ops``; operands must have one of ``dtypes``."""

    def wrap(fn: ScalarRule) -> ScalarRule:
        def checked(s: Scalar, args: list):
            for a in args:
                if a is not None and a.dtype not in dtypes:
                    raise s.error(f"operand dtype {a.dtype} is not lowered "
                                  f"(supported: {', '.join(dtypes)})")
            return fn(s, args)

        for op in ops:
            SCALAR_RULES[op] = checked
        return checked

    return wrap


def _c(value, like) -> Const:
    """``value`` as a constant of ``like``'s dtype, converted as the references do: a Python
    number as ``np.asarray(v, dtype)`` (= ``dtype.type(v)``), an array element by ``astype``."""
    dtype = k.numpy_dtype(like.dtype)
    if isinstance(value, (int, float)):
        return Const(np.asarray(value, dtype=dtype).item(), like.dtype)
    return Const(np.asarray(value).astype(dtype).item(), like.dtype)


_BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}


@scalar_rule(*_BINARY)
def _binary(s: Scalar, args):
    return k.Binary(_BINARY[s.op], *args)


@scalar_rule("Sum", "Mean", dtypes=FLOATS)
def _sum_mean(s: Scalar, args):
    acc = args[0]
    for a in args[1:]:
        acc = k.Binary("+", acc, a)
    if s.op == "Mean":
        return k.Binary("/", acc, _c(len(args), acc))
    return acc


@scalar_rule("Max", "Min")
def _max_min(s: Scalar, args):
    op = "max" if s.op == "Max" else "min"
    acc = args[0]
    for a in args[1:]:
        acc = k.Binary(op, acc, a)
    return acc


@scalar_rule("Pow", dtypes=FLOATS + k.INT_DTYPES)
def _pow(s: Scalar, args):
    x, y = args
    if not k.is_float(x.dtype) and y is not None:
        return _int_pow(s, x, y)
    if y is None:  # the constant exponent 2: x * x, as exact as numpy's correctly rounded pow
        return k.Binary("*", x, x)
    if not k.is_float(y.dtype):  # numpy: x ** y.astype(x.dtype)
        return k.Binary("pow", x, k.cast(y, x.dtype))
    wide = "f64" if "f64" in (x.dtype, y.dtype) else x.dtype  # f32 ** f64 computes in f64
    return k.cast(k.Binary("pow", k.cast(x, wide), k.cast(y, wide)), x.dtype)


def _int_pow(s: Scalar, x, y):
    """The reference's integer Pow: a float exponent, or a negative one, computes in f64 and
    truncates back (float -> integer casts saturate here); otherwise ``x ** y.astype(x.dtype)``
    with wrapping products. That is square-and-multiply over every bit of the exponent's
    two's-complement pattern (multiplication mod 2^n does not care about the order), unrolled
    with selects -- the kernel IR has no data-dependent loops."""
    as_float = k.cast(k.Binary("pow", k.cast(x, "f64"), k.cast(y, "f64")), x.dtype)
    if k.is_float(y.dtype):
        return as_float
    bits = k.BITS[x.dtype]
    pattern = s.let(k.cast(k.cast(y, x.dtype), "u" + x.dtype[1:]))
    result, base = _c(1, x), x
    for bit in range(bits):
        shifted = k.Binary("/", pattern, _c(1 << bit, pattern))
        half = k.Binary("/", pattern, _c(1 << (bit + 1), pattern)) if bit + 1 < bits else None
        odd = shifted if half is None else k.Binary("-", shifted, k.Binary("*", half,
                                                                           _c(2, pattern)))
        result = s.let(k.Select(k.Compare("!=", odd, _c(0, pattern)),
                                k.Binary("*", result, base), result))
        if bit + 1 < bits:
            base = s.let(k.Binary("*", base, base))
    if not k.is_signed(y.dtype):
        return result
    return k.Select(k.Compare("<", y, _c(0, y)), as_float, result)


@scalar_rule("Relu", dtypes=FLOATS + k.SIGNED_DTYPES)
def _relu(s: Scalar, args):
    (x,) = args
    return k.Binary("max", x, _c(0, x))


@scalar_rule("LeakyRelu", dtypes=FLOATS)
def _leaky_relu(s: Scalar, args):
    (x,) = args
    return k.Select(k.Compare(">=", x, _c(0, x)), x, k.Binary("*", x, _c(s.attrs["alpha"], x)))


@scalar_rule("PRelu", dtypes=FLOATS + ("i32", "i64", "u32", "u64"))
def _prelu(s: Scalar, args):
    x, slope = args
    return k.Select(k.Compare(">=", x, _c(0, x)), x, k.Binary("*", x, slope))


@scalar_rule("Sigmoid", dtypes=FLOATS)
def _sigmoid(s: Scalar, args):
    (x,) = args  # the reference's overflow-free form: exp of -|x| only
    e = s.let(k.Unary("exp", k.Unary("neg", k.Unary("abs", x))))
    r = s.let(k.Binary("/", _c(1, x), k.Binary("+", _c(1, x), e)))
    return k.Select(k.Compare(">=", x, _c(0, x)), r, k.Binary("*", e, r))


@scalar_rule("HardSigmoid", dtypes=FLOATS)
def _hard_sigmoid(s: Scalar, args):
    (x,) = args
    y = k.Binary("+", k.Binary("*", x, _c(s.attrs["alpha"], x)), _c(s.attrs["beta"], x))
    return k.Binary("min", k.Binary("max", y, _c(0, x)), _c(1, x))


def _unary(op: str) -> ScalarRule:
    def rule(s: Scalar, args):
        return k.Unary(op, args[0])

    return rule


for _op, _fn in (("Tanh", "tanh"), ("Exp", "exp"), ("Log", "log"), ("Sqrt", "sqrt")):
    scalar_rule(_op, dtypes=FLOATS)(_unary(_fn))
scalar_rule("Abs")(_unary("abs"))
scalar_rule("Neg", dtypes=FLOATS + k.SIGNED_DTYPES)(_unary("neg"))


@scalar_rule("Erf")
def _erf(s: Scalar, args):
    (x,) = args
    if k.is_float(x.dtype):
        return k.Unary("erf", x)
    return k.cast(k.Unary("erf", k.cast(x, "f64")), x.dtype)  # numpy: erf in float64, truncated


@scalar_rule("Reciprocal", dtypes=FLOATS)
def _reciprocal(s: Scalar, args):
    (x,) = args
    return k.Binary("/", _c(1, x), x)


def _expm1_min0(s: Scalar, x):
    """expm1(min(x, 0)) * alpha: the reference's overflow-free negative branch."""
    return k.Binary("*", k.Unary("expm1", k.Binary("min", x, _c(0, x))), _c(s.attrs["alpha"], x))


@scalar_rule("Elu", dtypes=FLOATS)
def _elu(s: Scalar, args):
    (x,) = args
    return k.Select(k.Compare(">=", x, _c(0, x)), x, _expm1_min0(s, x))


@scalar_rule("Selu", dtypes=FLOATS)
def _selu(s: Scalar, args):
    (x,) = args
    picked = k.Select(k.Compare(">", x, _c(0, x)), x, _expm1_min0(s, x))
    return k.Binary("*", picked, _c(s.attrs["gamma"], x))


@scalar_rule("Softplus", dtypes=FLOATS)
def _softplus(s: Scalar, args):
    (x,) = args  # max(x, 0) + log1p(exp(-|x|)): no overflow
    tail = k.Unary("log1p", k.Unary("exp", k.Unary("neg", k.Unary("abs", x))))
    return k.Binary("+", k.Binary("max", x, _c(0, x)), tail)


@scalar_rule("Gelu", dtypes=FLOATS)
def _gelu(s: Scalar, args):
    (x,) = args  # the reference computes in float64; here in x's dtype (see the tolerances)
    half_x = s.let(k.Binary("*", _c(0.5, x), x))
    if s.attrs["approximate"] == "tanh":
        cube = k.Binary("*", k.Binary("*", x, x), x)
        inner = k.Binary("*", _c(math.sqrt(2 / math.pi), x),
                         k.Binary("+", x, k.Binary("*", _c(0.044715, x), cube)))
        return k.Binary("*", half_x, k.Binary("+", _c(1, x), k.Unary("tanh", inner)))
    phi = k.Unary("erf", k.Binary("*", x, _c(1 / math.sqrt(2), x)))
    return k.Binary("*", half_x, k.Binary("+", _c(1, x), phi))


@scalar_rule("HardSwish", dtypes=FLOATS)
def _hard_swish(s: Scalar, args):
    (x,) = args
    y = k.Binary("+", k.Binary("*", x, _c(1 / 6, x)), _c(0.5, x))
    return k.Binary("*", x, k.Binary("min", k.Binary("max", y, _c(0, x)), _c(1, x)))


@scalar_rule("Clip")
def _clip(s: Scalar, args):
    x, lo, hi = (list(args) + [None, None])[:3]
    y = x
    if lo is not None:
        y = k.Binary("max", y, lo)
    if hi is not None:
        y = k.Binary("min", y, hi)
    return y


@scalar_rule("Identity", dtypes=k.BUFFER_DTYPES)
def _identity_rule(s: Scalar, args):
    return args[0]


def apply_scalar(op: str, s: Scalar, args: list):
    rule = SCALAR_RULES.get(op)
    if rule is None:
        raise s.error(f"op {op} has no scalar rule")
    return rule(dataclasses.replace(s, op=op), args)


# -- elementwise kernels --------------------------------------------------------------------------
def coalesce(out_shape: Sequence[int], shapes: Sequence[Sequence[int]],
             ctx: LowerContext | None = None) -> tuple[tuple, list[tuple]]:
    """Broadcast views: drop size-1 output dims and merge neighbours that every operand reads the
    same way (all full or all broadcast). Returns the output view and each operand's view."""
    rank = len(out_shape)
    padded = []
    for s in shapes:
        if len(s) > rank:
            raise ShapeError(f"operand shape {tuple(s)} has more dims than the result "
                             f"{tuple(out_shape)}")
        padded.append((1,) * (rank - len(s)) + tuple(s))
    groups: list[tuple[int, tuple]] = []
    for d, size in enumerate(out_shape):
        for p in padded:
            if p[d] not in (1, size):
                message = f"operand shape {p} does not broadcast to {tuple(out_shape)}"
                raise ctx.shape_error(message) if ctx else ShapeError(message)
        if size == 1:
            continue
        full = tuple(p[d] == size for p in padded)
        if groups and groups[-1][1] == full:
            groups[-1] = (groups[-1][0] * size, full)
        else:
            groups.append((size, full))
    if not groups:
        return (1,), [(1,)] * len(shapes)
    out = tuple(size for size, _ in groups)
    views = [tuple(size if full[i] else 1 for size, full in groups) for i in range(len(shapes))]
    return out, views


def _operand_index(view: Sequence[int], out_view: Sequence[int], indices: list) -> tuple:
    return tuple(i if v == o else Const(0, INDEX) for v, o, i in zip(view, out_view, indices))


def _check_compute_dtypes(ctx: LowerContext, types: Sequence[TensorType]) -> None:
    for t in types:
        if t is not None and t.dtype == "f16":
            raise ctx.error("f16 compute is not lowered (f16 is supported by data-movement "
                            "ops only)")


def map_kernel(ctx: LowerContext, operands: Sequence[int],
               compute: Callable[[Scalar, list], object],
               shapes: Sequence[tuple] | None = None) -> BoundKernel:
    """out[i] = compute(operand_0[i'], ...) with numpy broadcasting of the given input slots
    (``shapes``: how each operand broadcasts, if not by its own shape -- same element count).

    f16 operands are widened to f32 as they are loaded and an f16 result is rounded (to
    nearest even) as it is stored: numpy computes float16 ufuncs in float32 the same way, so
    one-operation ops (Add, Max, Sqrt, ...) are bit-exact; multi-step rules round once at the
    end where numpy rounds after each step (at most an ulp of f16 apart)."""
    out_t = ctx.out_types[0]
    in_types = [ctx.in_types[i] for i in operands]
    widen = ctx.node.op not in _COPY_OPS and any(
        t.dtype == "f16" for t in [*in_types, out_t])
    shapes = shapes or [t.shape for t in in_types]
    out_view, views = coalesce(out_t.shape, shapes, ctx)
    kb = KernelBuilder(ctx)
    names = [kb.input(ctx.node.inputs[i], t.dtype, v)
             for i, t, v in zip(operands, in_types, views)]
    out = kb.output(ctx.node.outputs[0], out_t.dtype, out_view)

    def fill(b: Block, idx: list) -> None:
        args = [b.let(Load(n, _operand_index(v, out_view, idx), t.dtype))
                for n, v, t in zip(names, views, in_types)]
        if widen:
            args = [b.let(_widen(a)) for a in args]
        value = compute(Scalar(b, ctx.error, dict(ctx.attrs)), args)
        if widen and out_t.dtype == "f16":
            value = k.cast(value, "f16")
        if value.dtype != out_t.dtype:
            raise ctx.error(f"computes {value.dtype}, the result type is {out_t}")
        b.emit(k.Store(out, tuple(idx), value))

    inplace = sorted({(n, out) for n, t in zip(names, in_types) if t == out_t})
    return kb.build([nest(kb, out_view, fill)], inplace)


def _widen(value):
    """An f16 operand as f32 (exact); other dtypes as they are."""
    return k.cast(value, "f32") if value.dtype == "f16" else value


_COPY_OPS = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
_SIMPLE = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Relu", "LeakyRelu",
           "PRelu", "Sigmoid", "HardSigmoid", "Tanh", "Exp", "Log", "Sqrt", "Abs", "Neg", "Erf",
           "Reciprocal", "Elu", "Selu", "Softplus", "Gelu", "HardSwish", "Identity")


@lowering(*_SIMPLE)
def lower_elementwise(ctx: LowerContext) -> BoundKernel:
    slots = [i for i, v in enumerate(ctx.node.inputs) if v is not None]
    return map_kernel(ctx, slots, lambda s, args: apply_scalar(ctx.node.op, s, args))


@lowering("Pow")
def lower_pow(ctx: LowerContext) -> BoundKernel:
    exponent = ctx.in_values[1]
    if exponent is not None and exponent.size and np.all(exponent == 2):
        # a constant exponent 2 (x still broadcasts to the result's shape): x * x
        return map_kernel(ctx, [0], lambda s, args: apply_scalar("Pow", s, [args[0], None]))
    return map_kernel(ctx, [0, 1], lambda s, args: apply_scalar("Pow", s, args))


@lowering("Clip")
def lower_clip(ctx: LowerContext) -> BoundKernel:
    """Constant bounds become literals; run-time bounds are one-element buffers."""
    runtime = [i for i in (1, 2) if ctx.has_input(i) and ctx.in_values[i] is None]

    def compute(s: Scalar, args: list):
        x, loaded = args[0], dict(zip(runtime, args[1:]))
        bounds = []
        for i in (1, 2):
            if i in loaded:
                bounds.append(loaded[i])
            elif ctx.has_input(i):
                bounds.append(_c(ctx.in_values[i].reshape(()), x))
            else:
                bounds.append(None)
        return apply_scalar("Clip", s, [x, *bounds])

    return map_kernel(ctx, [0, *runtime], compute)


@lowering("Cast")
def lower_cast(ctx: LowerContext) -> BoundKernel:
    target = ctx.out_types[0].dtype
    if ctx.in_types[0].dtype == "f16" or target == "f16":  # one rounding, straight from the
        return _direct_cast(ctx, target)                   # source (see codegen's _cast_f16)
    return map_kernel(ctx, [0], lambda s, args: k.cast(args[0], target))


def _direct_cast(ctx: LowerContext, target: str) -> BoundKernel:
    x = ctx.in_types[0]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (x.numel,))
    dst = kb.output(ctx.node.outputs[0], target, (x.numel,))
    return kb.build([nest(kb, (x.numel,), lambda b, idx: b.emit(
        k.Store(dst, tuple(idx), k.cast(Load(src, tuple(idx), x.dtype), target))))])


@lowering("BatchNormalization")
def lower_batch_norm(ctx: LowerContext) -> BoundKernel:
    """Inference form, as the reference: (x - mean) / sqrt(var + epsilon) * scale + B with the
    per-channel operands broadcast along axis 1 (training mode: ``_batch_norm_training``)."""
    if ctx.attrs["training_mode"]:
        return _batch_norm_training(ctx)
    x = ctx.in_types[0]
    channel = (x.shape[1],) + (1,) * (x.rank - 2) if x.rank >= 2 else (x.numel,)

    def compute(s: Scalar, args: list):
        v, scale, b, mean, var = args
        eps = _c(ctx.attrs["epsilon"], v)
        normalized = k.Binary("/", k.Binary("-", v, mean),
                              k.Unary("sqrt", k.Binary("+", var, eps)))
        return k.Binary("+", k.Binary("*", normalized, scale), b)

    if any(ctx.in_types[i].numel != channel[0] for i in range(1, 5)):
        raise ctx.shape_error(f"scale, B, mean and var must hold one value per channel of {x}")
    if any(t.dtype != x.dtype for t in ctx.in_types[1:5]):
        raise ctx.error("scale, B, mean and var must have X's dtype to be lowered")
    return map_kernel(ctx, [0, 1, 2, 3, 4], compute, [x.shape] + [channel] * 4)


def _batch_norm_training(ctx: LowerContext) -> BoundKernel:
    """Batch statistics as the reference computes them (``x.mean``, then ``x.var`` as the mean
    of ``(x - mean)**2``, in f32 for f16 data), the normalisation, and the running statistics
    ``input_mean * momentum + mean * (1 - momentum)`` when the node has those outputs.

    One parallel task per channel runs three passes over the channel's (batch, spatial)
    elements -- sum, squared deviations, normalise -- so the statistics live in scalars and no
    kernel needs scratch memory for them. The sums accumulate in f64 (numpy sums pairwise in
    the data's dtype; both are close to the exact sum, so they agree to rounding)."""
    x = ctx.in_types[0]
    if x.rank < 2:
        raise ctx.shape_error(f"X must have rank >= 2 (N, C, ...), got {x}")
    work = "f32" if x.dtype == "f16" else x.dtype
    batch, channels, inner = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    count = batch * inner
    if count == 0:
        raise ctx.shape_error(f"batch statistics of an empty batch ({x}) are undefined")
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (batch, channels, inner))
    params = [kb.input(ctx.node.inputs[i], ctx.in_types[i].dtype, (channels,))
              for i in range(1, 5)]
    dst = kb.output(ctx.node.outputs[0], x.dtype, (batch, channels, inner))
    running = [kb.output(ctx.node.outputs[i], ctx.out_types[i].dtype, (channels,))
               if len(ctx.node.outputs) > i and ctx.node.outputs[i] is not None else None
               for i in (1, 2)]

    def channel(b: Block, c: Var) -> None:
        def value(blk: Block, n, i):
            return blk.let(_widen(Load(src, (n, c, i), x.dtype)))

        def over_elements(fill: Callable[[Block, object, object], None]) -> None:
            b.loop(batch, lambda nb, n: nb.loop(inner, lambda ib, i: fill(ib, n, i),
                                                vectorize=True))

        def batch_mean(term) -> object:
            acc = b.let(Const(-0.0, "f64"), mutable=True)
            over_elements(lambda blk, n, i: blk.emit(k.Accumulate(
                acc.name, "add", k.cast(term(blk, n, i), "f64"))))
            return b.let(k.Binary("/", k.cast(acc, work), Const(count, work)))

        mean = batch_mean(value)
        var = batch_mean(lambda blk, n, i: blk.let(k.Binary("*", *[k.Binary(
            "-", value(blk, n, i), mean)] * 2)))
        scale, shift = (b.let(k.cast(Load(params[j], (c,), ctx.in_types[j + 1].dtype), work))
                        for j in (0, 1))
        denom = b.let(k.Unary("sqrt", k.Binary("+", var, _c(ctx.attrs["epsilon"], var))))
        over_elements(lambda blk, n, i: blk.emit(k.Store(dst, (n, c, i), k.cast(k.Binary(
            "+", k.Binary("*", k.Binary("/", k.Binary("-", value(blk, n, i), mean), denom),
                          scale), shift), x.dtype))))
        for out, stat, j in zip(running, (mean, var), (2, 3)):
            if out is not None:
                b.emit(k.Store(out, (c,), _running_stat(ctx, Load(
                    params[j], (c,), ctx.in_types[j + 1].dtype), stat)))

    top = Block(kb)
    top.loop(channels, channel, parallel=True)
    return kb.build(top.stmts)


def _running_stat(ctx: LowerContext, old, batch_stat):
    """``old * momentum + batch_stat.astype(old.dtype) * (1 - momentum)`` in old's dtype (f16
    computes in f32 and rounds after each operation, as numpy does)."""
    dtype = old.dtype
    wide = _widen(old)
    new = k.cast(k.cast(batch_stat, dtype), wide.dtype)
    momentum = ctx.attrs["momentum"]

    def rounded(v):
        return k.cast(k.cast(v, "f16"), "f32") if dtype == "f16" else v

    kept = rounded(k.Binary("*", wide, k.cast(_c(momentum, old), wide.dtype)))
    added = rounded(k.Binary("*", new, k.cast(_c(1 - momentum, old), wide.dtype)))
    return k.cast(k.Binary("+", kept, added), dtype)


@lowering("Dropout")
def lower_dropout(ctx: LowerContext) -> BoundKernel:
    """Inference (no training_mode, or a constant false one, or ratio 0): the identity, and an
    all-true mask if the node has that output. Training: ``_dropout_training``."""
    mode = ctx.in_values[2] if ctx.has_input(2) else np.asarray(False)
    ratio = ctx.in_values[1] if ctx.has_input(1) else np.asarray(0.5)
    if mode is None:
        raise ctx.error("a run-time training_mode is not lowered (make it a constant)")
    if bool(mode) and (ratio is None or float(ratio) != 0):
        return _dropout_training(ctx, ratio)
    x, out_t = ctx.in_types[0], ctx.out_types[0]
    kb = KernelBuilder(ctx)
    n = x.numel
    src = kb.input(ctx.node.inputs[0], x.dtype, (n,))
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, (n,))
    mask = (kb.output(ctx.node.outputs[1], k.BOOL, (n,))
            if len(ctx.node.outputs) > 1 and ctx.node.outputs[1] is not None else None)

    def fill(b: Block, idx: list) -> None:
        b.emit(k.Store(dst, tuple(idx), Load(src, tuple(idx), x.dtype)))
        if mask is not None:
            b.emit(k.Store(mask, tuple(idx), Const(1, k.BOOL)))

    return kb.build([nest(kb, (n,), fill)])


def _dropout_training(ctx: LowerContext, ratio) -> BoundKernel:
    """Training mode with a constant ratio. The reference draws its mask from
    ``numpy.random.RandomState(seed)`` (seed 0 when absent): with a static shape and a fixed
    seed the mask is a compile-time constant, so it is computed here *by the reference itself*
    (same function, same generator: bit-identical) and baked into the kernel as a table. The
    kernel then computes ``(mask * x * (1 / (1 - ratio))).astype(x.dtype)`` in the dtypes
    numpy promotes to, and stores the mask output."""
    if ratio is None:
        return _dropout_run_time_ratio(ctx)
    x, out_t = ctx.in_types[0], ctx.out_types[0]
    call = registry.OpCall(ctx.node.op, ctx.node.name, ctx.attrs, tuple(ctx.in_types),
                           tuple(ctx.in_values), 2)
    _, mask = ctx.node.opdef.reference(call, np.zeros(x.shape, k.numpy_dtype(x.dtype)),
                                       np.asarray(ratio), np.asarray(True))
    factor = 1 / (1 - np.asarray(ratio))
    wide = np.result_type(k.numpy_dtype(x.dtype), factor)
    wide = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}.get(wide, "f64")
    compute = "f32" if wide == "f16" else wide
    n = x.numel
    kb = KernelBuilder(ctx)
    table = kb.table(np.asarray(mask, np.int64).ravel().tolist() or [0])
    src = kb.input(ctx.node.inputs[0], x.dtype, (n,))
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, (n,))
    mask_out = (kb.output(ctx.node.outputs[1], k.BOOL, (n,))
                if len(ctx.node.outputs) > 1 and ctx.node.outputs[1] is not None else None)
    scale = Const(float(np.asarray(factor, k.numpy_dtype(wide))), compute)

    def fill(b: Block, idx: list) -> None:
        keep = b.let(k.Compare("==", k.Lookup(table, idx[0]), Const(1, INDEX)))
        v = _widen(Load(src, tuple(idx), x.dtype))
        masked = k.Binary("*", v, k.Select(keep, Const(1.0, v.dtype), Const(0.0, v.dtype)))
        y = k.Binary("*", k.cast(masked, compute), scale)
        if wide == "f16":
            y = k.cast(y, "f16")
        b.emit(k.Store(dst, tuple(idx), k.cast(y, out_t.dtype)))
        if mask_out is not None:
            b.emit(k.Store(mask_out, tuple(idx), keep))

    return kb.build([nest(kb, (n,), fill)])


def _dropout_run_time_ratio(ctx: LowerContext) -> BoundKernel:
    """Training mode, the ratio a run-time input. The reference keeps element i when
    ``u[i] >= ratio`` for ``u = RandomState(seed).uniform(0, 1, shape)`` (float64): with a static
    shape and a fixed seed, u is a compile-time array (drawn here by the same generator), a
    scratch input of the kernel; the comparison, ``1 / (1 - ratio)`` (in the ratio's dtype, as
    numpy computes it) and the scaling happen at run time. A ratio of 0 keeps everything
    unscaled, as the reference does."""
    x, ratio_t, out_t = ctx.in_types[0], ctx.in_types[1], ctx.out_types[0]
    if ratio_t.dtype not in ("f16", "f32", "f64"):
        raise ctx.error(f"ratio must be a float scalar, got {ratio_t}")
    seed = ctx.attrs.get("seed")
    draws = np.random.RandomState((0 if seed is None else seed) % 2 ** 32).uniform(
        0.0, 1.0, x.shape).ravel()
    wide = np.result_type(k.numpy_dtype(x.dtype), k.numpy_dtype(ratio_t.dtype))
    wide = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}.get(wide, "f64")
    compute = "f32" if wide == "f16" else wide
    n = x.numel
    kb = KernelBuilder(ctx)
    draws_name = f"{ctx.node.name}:dropout_draws"
    src = kb.input(ctx.node.inputs[0], x.dtype, (n,))
    ratio = kb.input(ctx.node.inputs[1], ratio_t.dtype, (1,))
    u = kb.input(draws_name, "f64", (max(n, 1),))
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, (n,))
    mask_out = (kb.output(ctx.node.outputs[1], k.BOOL, (n,))
                if len(ctx.node.outputs) > 1 and ctx.node.outputs[1] is not None else None)

    def in_ratio_dtype(value):  # numpy rounds f16 arithmetic to f16 after each operation
        return k.cast(value, "f16") if ratio_t.dtype == "f16" else value

    def fill(b: Block, idx: list) -> None:
        r = b.let(Load(ratio, (Const(0, INDEX),), ratio_t.dtype))
        rw = _widen(r)
        one = Const(1.0, rw.dtype)
        factor = in_ratio_dtype(k.Binary("/", one, _widen(in_ratio_dtype(
            k.Binary("-", one, rw)))))
        training = b.let(k.Compare("!=", rw, Const(0.0, rw.dtype)))
        drawn = k.Compare(">=", Load(u, tuple(idx), "f64"), k.cast(r, "f64"))
        keep = b.let(k.Select(training, drawn, Const(1, k.BOOL)))
        v = _widen(Load(src, tuple(idx), x.dtype))
        masked = k.Binary("*", v, k.Select(keep, Const(1.0, v.dtype), Const(0.0, v.dtype)))
        y = k.Binary("*", k.cast(masked, compute), k.cast(_widen(factor), compute))
        if wide == "f16":
            y = k.cast(y, "f16")
        y = k.Select(training, k.cast(y, out_t.dtype), Load(src, tuple(idx), x.dtype))
        b.emit(k.Store(dst, tuple(idx), k.cast(y, out_t.dtype)))
        if mask_out is not None:
            b.emit(k.Store(mask_out, tuple(idx), keep))

    bound = kb.build([nest(kb, (n,), fill)] if n else [])
    return dataclasses.replace(bound, scratch={draws_name: draws if n else np.zeros(1)})


@lowering("FusedElementwise")
def lower_fused(ctx: LowerContext) -> BoundKernel:
    """The body's tree, each operation through its op's scalar rule (literals take the dtype of
    their first non-literal sibling, as ``fused_expression`` defines)."""
    try:
        tree = fx.parse_expr(ctx.attrs["expr"])
    except fx.ExprError as exc:
        raise ctx.error(f"attribute 'expr': {exc}") from None

    types = [t for t in [*ctx.in_types, *ctx.out_types] if t is not None]
    narrow = all(t.dtype == "f16" for t in types)  # round after each op, as numpy does

    def compute(s: Scalar, args: list):
        return _fused_value(ctx, tree, s.block, args, narrow)

    return map_kernel(ctx, list(range(len(ctx.node.inputs))), compute)


def _fused_value(ctx: LowerContext, expr, block: Block, args: list, narrow: bool = False):
    if isinstance(expr, fx.Input):
        return args[expr.index]
    value = _fused_op(ctx, expr, block, args, narrow)
    if narrow and value.dtype == "f32":
        value = block.let(k.cast(k.cast(value, "f16"), "f32"))
    return value


def _fused_op(ctx: LowerContext, expr, block: Block, args: list, narrow: bool):
    operands = [None if isinstance(a, fx.Literal) else _fused_value(ctx, a, block, args, narrow)
                for a in expr.args]
    sibling = next(o for o in operands if o is not None)
    for i, a in enumerate(expr.args):
        if isinstance(a, fx.Literal):
            try:
                operands[i] = _c(a.value, sibling)
            except (OverflowError, ValueError) as exc:
                raise ctx.error(f"literal {a.value!r} does not fit {sibling.dtype}: "
                                f"{exc}") from None
    fn = fx.FUNCTIONS[expr.func]
    attrs = registry.get(fn.op).full_attrs(
        {**dict(fn.fixed), **dict(zip(fn.params, expr.params, strict=True))})
    scalar = Scalar(block, lambda m: ctx.error(f"in {fx.to_text(expr)!r}: {m}"), attrs)
    return apply_scalar(fn.op, scalar, operands)


# -- data movement --------------------------------------------------------------------------------
def _copy_nest(kb: KernelBuilder, dst: str, src: str, dtype: str, shape: Sequence[int],
               dst_index: Callable[[Block, list], tuple],
               src_index: Callable[[Block, list], tuple]) -> k.For:
    def fill(b: Block, idx: list) -> None:
        value = Load(src, tuple(b.index(i) for i in src_index(b, idx)), dtype)
        b.emit(k.Store(dst, tuple(b.index(i) for i in dst_index(b, idx)), value))

    return nest(kb, shape, fill)


@lowering(*(op for op in _COPY_OPS if op != "Identity"))
def lower_copy(ctx: LowerContext) -> BoundKernel:
    """Reshape-like ops: the bytes do not change; a flat copy (the memory planner normally makes
    these views, so this kernel only runs where a copy is needed)."""
    x, out_t = ctx.in_types[0], ctx.out_types[0]
    n = x.numel
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (n,))
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, (n,))
    ident = lambda b, idx: tuple(idx)
    return kb.build([_copy_nest(kb, dst, src, x.dtype, (n,), ident, ident)])


@lowering("Transpose")
def lower_transpose(ctx: LowerContext) -> BoundKernel:
    x = ctx.in_types[0]
    perm = _transpose_perm(ctx.opcall(), x.rank)
    # drop size-1 axes, then merge output neighbours that are neighbours in the input too
    kept = [p for p in perm if x.shape[p] != 1]
    groups: list[list[int]] = []
    for p in kept:
        if groups and groups[-1][-1] + 1 == p:
            groups[-1].append(p)
        else:
            groups.append([p])
    if not groups:
        groups = [[]]
    size = [math.prod(x.shape[a] for a in g) for g in groups]
    in_order = sorted(range(len(groups)), key=lambda g: groups[g][0] if groups[g] else 0)
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, tuple(size[g] for g in in_order))
    dst = kb.output(ctx.node.outputs[0], x.dtype, tuple(size))
    body = _copy_nest(kb, dst, src, x.dtype, tuple(size), lambda b, idx: tuple(idx),
                      lambda b, idx: tuple(idx[g] for g in in_order))
    return kb.build([body])


def _around_axis(shape: Sequence[int], axis: int) -> tuple[int, int, int]:
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


@lowering("Concat")
def lower_concat(ctx: LowerContext) -> BoundKernel:
    """One nest per input: out viewed [A, total*B], input k viewed [A, L_k*B] at column
    offset off_k*B (A = dims before the axis, B = dims after it)."""
    out_t = ctx.out_types[0]
    axis = normalize_axis(ctx.attrs["axis"], out_t.rank, ctx.opcall())
    outer, total, inner = _around_axis(out_t.shape, axis)
    kb = KernelBuilder(ctx)
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, (outer, total * inner))
    body, offset = [], 0
    for value, t in zip(ctx.node.inputs, ctx.in_types):
        length = t.shape[axis] * inner
        src = kb.input(value, t.dtype, (outer, length))
        body.append(_slab_copy(kb, (dst, src), t.dtype, outer, length, offset, to_dst=True))
        offset += length
    return kb.build(body)


def _slab_copy(kb: KernelBuilder, names: tuple, dtype: str, outer: int, length: int,
               offset: int, to_dst: bool) -> k.For:
    """Copy an [outer, length] slab between the wide buffer (column ``offset``) and a narrow
    one; ``to_dst``: narrow -> wide (Concat), else wide -> narrow (Split)."""
    wide, narrow = names
    shape = (length,) if outer == 1 else (outer, length)

    def at(idx: list, shift: int) -> tuple:
        row = Const(0, INDEX) if outer == 1 else idx[0]
        return row, k.add(idx[-1], Const(shift, INDEX))

    dst, src = (wide, narrow) if to_dst else (narrow, wide)
    return _copy_nest(kb, dst, src, dtype, shape,
                      lambda b, idx: at(idx, offset if to_dst else 0),
                      lambda b, idx: at(idx, 0 if to_dst else offset))


@lowering("Split")
def lower_split(ctx: LowerContext) -> BoundKernel:
    x = ctx.in_types[0]
    axis = normalize_axis(ctx.attrs["axis"], x.rank, ctx.opcall())
    outer, total, inner = _around_axis(x.shape, axis)
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, (outer, total * inner))
    body, offset = [], 0
    for value, t in zip(ctx.node.outputs, ctx.out_types):
        if value is None:
            continue
        length = t.shape[axis] * inner
        dst = kb.output(value, t.dtype, (outer, length))
        body.append(_slab_copy(kb, (src, dst), t.dtype, outer, length, offset, to_dst=False))
        offset += length
    return kb.build(body)


@lowering("Slice")
def lower_slice(ctx: LowerContext) -> BoundKernel:
    x, out_t = ctx.in_types[0], ctx.out_types[0]
    ints = [None if not ctx.has_input(i) else [int(v) for v in ctx.const_input(i, w).ravel()]
            for i, w in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))]
    # (out length, input length, start, step) per axis, then merge a unit-step axis with the
    # whole axes after it (their flattened positions stay affine)
    axes = [[n, n, 0, 1] for n in x.shape]
    for axis, start, end, step in _slice_params(ctx.opcall(), x.rank, *ints):
        start, _, length = _clamp_slice(x.shape[axis], start, end, step)
        axes[axis] = [length, x.shape[axis], start, step]
    merged: list[list[int]] = []
    for a in axes:
        whole = a[0] == a[1] and a[2] == 0 and a[3] == 1
        if merged and whole and merged[-1][3] == 1:
            last = merged[-1]
            merged[-1] = [last[0] * a[0], last[1] * a[1], last[2] * a[1], 1]
        else:
            merged.append(list(a))
    merged = merged or [[1, 1, 0, 1]]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, tuple(m[1] for m in merged))
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, tuple(m[0] for m in merged))
    src_index = lambda b, idx: tuple(
        k.add(Const(m[2], INDEX), k.mul(i, Const(m[3], INDEX))) for m, i in zip(merged, idx))
    body = _copy_nest(kb, dst, src, x.dtype, tuple(m[0] for m in merged),
                      lambda b, idx: tuple(idx), src_index)
    return kb.build([body])


@lowering("Pad")
def lower_pad(ctx: LowerContext) -> BoundKernel:
    """Each output index maps to a source index per axis (negative pads crop first); constant
    mode selects the fill outside the source and loads from a clamped (always valid) index."""
    x, out_t, mode = ctx.in_types[0], ctx.out_types[0], ctx.attrs["mode"]
    pads = [int(v) for v in ctx.const_input(1, "pads").ravel()]
    axes_in = ([int(v) for v in ctx.const_input(3, "axes").ravel()] if ctx.has_input(3)
               else None)
    widths = _pad_widths(ctx.opcall(), x.rank, pads, axes_in)
    # per axis: (out size, source size, begin growth, crop offset); identity axes merge
    axes = []
    for dim, (b, e) in zip(x.shape, widths):
        kept = dim + min(b, 0) + min(e, 0)
        a = [kept + max(b, 0) + max(e, 0), dim, max(b, 0), -min(b, 0), kept]
        if axes and a[0] == a[1] and a[2] == a[3] == 0 and axes[-1][0] == axes[-1][1] and \
                axes[-1][2] == axes[-1][3] == 0:
            axes[-1] = [axes[-1][0] * a[0], axes[-1][1] * a[1], 0, 0, axes[-1][4] * a[4]]
        else:
            axes.append(a)
    axes = axes or [[1, 1, 0, 0, 1]]
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, tuple(a[1] for a in axes))
    fill_value = _pad_fill(ctx, kb, x.dtype) if mode == "constant" else None
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, tuple(a[0] for a in axes))
    empty_source = any(a[4] == 0 for a in axes)

    def fill(b: Block, idx: list) -> None:
        inside, where = Const(1, k.BOOL), []
        for (size, _, grow, crop, kept), i in zip(axes, idx):
            if size == kept and grow == 0:  # an axis that is only cropped (or untouched)
                where.append(b.index(k.add(i, Const(crop, INDEX))))
                continue
            j = k.sub(i, Const(grow, INDEX))  # position in the cropped source
            if mode == "constant":
                inside = k.logical_and(inside, k.logical_and(
                    k.compare(">=", j, Const(0, INDEX)), k.compare("<", j, Const(kept, INDEX))))
            where.append(b.index(k.add(_pad_source(mode, j, kept), Const(crop, INDEX))))
        if mode == "constant":
            value = fill_value(b) if empty_source else k.select(
                b.index(inside), Load(src, tuple(where), x.dtype), fill_value(b))
        else:
            value = Load(src, tuple(where), x.dtype)
        b.emit(k.Store(dst, tuple(idx), value))

    return kb.build([nest(kb, tuple(a[0] for a in axes), fill)])


def _pad_source(mode: str, j, kept: int):
    """Source index in [0, kept) of cropped position ``j`` for one axis."""
    last = Const(kept - 1, INDEX)
    if mode in ("constant", "edge"):
        return k.minimum(k.maximum(j, Const(0, INDEX)), last)
    if mode == "wrap":
        return k.mod(j, kept)
    if kept == 1:  # reflect: the shape rule allows no growth here
        return Const(0, INDEX)
    # reflect once about both ends: the 2(kept-1)-periodic triangle wave
    m = k.mod(j, 2 * (kept - 1))
    return k.sub(last, k.Unary("abs", k.sub(last, m)))


def _pad_fill(ctx: LowerContext, kb: KernelBuilder, dtype: str) -> Callable[[Block], object]:
    like = Const(0, dtype)
    if not ctx.has_input(2):
        return lambda b: like
    value = ctx.in_values[2]
    if value is not None:
        flat = np.asarray(value).ravel()
        if flat.size != 1:
            raise ctx.shape_error(f"constant_value must hold one element, got {flat.size}")
        fill = _c(flat[0], like)
        return lambda b: fill
    t = ctx.in_types[2]
    if t.numel != 1:
        raise ctx.shape_error(f"constant_value must hold one element, got {t}")
    name = kb.input(ctx.node.inputs[2], t.dtype, (1,))
    return lambda b: k.cast(Load(name, (Const(0, INDEX),), t.dtype), dtype)


@lowering("Gather")
def lower_gather(ctx: LowerContext) -> BoundKernel:
    """out[a, j, b] = data[a, T[j], b] with the constant indices T (negative ones normalised)."""
    data, out_t = ctx.in_types[0], ctx.out_types[0]
    axis = normalize_axis(ctx.attrs["axis"], data.rank, ctx.opcall())
    if ctx.in_values[1] is None:
        return _gather_runtime(ctx, axis)
    indices = np.asarray(ctx.const_input(1, "indices")).astype(np.int64).ravel()
    outer, dim, inner = _around_axis(data.shape, axis)
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        raise ctx.shape_error(f"indices out of range [{-dim}, {dim - 1}]: min {indices.min()}, "
                              f"max {indices.max()}")
    indices = np.where(indices < 0, indices + dim, indices)
    kb = KernelBuilder(ctx)
    table = kb.table(indices.tolist() or [0])  # an empty gather has no iterations
    src = kb.input(ctx.node.inputs[0], data.dtype, (outer, dim, inner))
    shape = (outer, indices.size, inner)
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, shape)
    body = _copy_nest(kb, dst, src, data.dtype, shape, lambda b, idx: tuple(idx),
                      lambda b, idx: (idx[0], k.Lookup(table, idx[1]), idx[2]))
    return kb.build([body])


def _gather_runtime(ctx: LowerContext, axis: int) -> BoundKernel:
    """Run-time indices: out[a, j, b] = data[a, wrap(idx[j]), b] where a negative index counts
    from the end. The index is data, so it enters the address through ``IndexOf``, clamped into
    the axis: a bad index can never read outside ``data``. A second, serial top-level loop
    scans the indices and writes ``[count, first bad index]`` to an error slot, a scratch array
    the compiled model keeps; its ``RunCheck`` turns a non-zero count into a ``FeedError``
    naming this node after the run."""
    data, idx_t, out_t = ctx.in_types[0], ctx.in_types[1], ctx.out_types[0]
    if idx_t.dtype not in ("i32", "i64"):
        raise ctx.error(f"indices must be i32 or i64, got {idx_t.dtype}")
    outer, dim, inner = _around_axis(data.shape, axis)
    count = idx_t.numel
    if dim == 0 and count and outer * inner:
        raise ctx.shape_error(f"gathers {count} indices from an empty axis {axis} of {data}")
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], data.dtype, (outer, dim, inner))
    indices = kb.input(ctx.node.inputs[1], idx_t.dtype, (count,))
    slot_value = f"{ctx.node.name}:index_errors"
    slot = kb.output(slot_value, "i64", (2,))
    shape = (outer, count, inner)
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, shape)

    def wrapped(b: Block, j):
        v = b.let(Load(indices, (j,), idx_t.dtype))
        return b.let(k.Select(k.Compare("<", v, _c(0, v)), k.Binary("+", v, _c(dim, v)), v))

    def fill(b: Block, idx: list) -> None:
        row = k.IndexOf(wrapped(b, idx[1]), 0, max(dim - 1, 0))
        b.emit(k.Store(dst, tuple(idx), Load(src, (idx[0], row, idx[2]), data.dtype)))

    body = [nest(kb, shape, fill)] if math.prod(shape) else []
    body.append(_index_check(kb, indices, idx_t.dtype, count, dim, slot))
    errors = np.zeros(2, np.int64)
    check = RunCheck(slot_value, f"Gather node '{ctx.node.name}': {{count}} indices out of "
                     f"range [{-dim}, {dim - 1}] for axis {axis} of data {data}, the first is "
                     "{first}")
    return dataclasses.replace(kb.build(body), scratch={slot_value: errors}, run_check=check)


def _index_check(kb: KernelBuilder, indices: str, dtype: str, count: int, dim: int,
                 slot: str) -> k.For:
    """One serial task: slot = [number of indices outside [-dim, dim), the first of them]."""
    top = Block(kb)

    def scan(b: Block, _) -> None:
        bad = b.let(Const(0, "i64"), mutable=True)
        first = b.let(Const(0, "i64"), mutable=True)

        def visit(blk: Block, j) -> None:
            v = blk.let(k.cast(Load(indices, (j,), dtype), "i64"))
            out = blk.let(k.Binary("|", k.Compare("<", v, Const(-dim, "i64")),
                                   k.Compare(">=", v, Const(dim, "i64"))))
            new = k.Binary("&", out, k.Compare("==", bad, Const(0, "i64")))
            blk.emit(k.Assign(first.name, k.Select(new, v, first)))
            blk.emit(k.Accumulate(bad.name, "add", k.Select(out, Const(1, "i64"),
                                                             Const(0, "i64"))))

        if count:
            b.loop(count, visit)
        b.emit(k.Store(slot, (Const(0, INDEX),), bad))
        b.emit(k.Store(slot, (Const(1, INDEX),), first))

    top.loop(1, scan)
    return top.stmts[0]


# -- reductions -------------------------------------------------------------------------------
COLUMN_TILE = 64      # columns per parallel task when the rows alone give too few tasks
MIN_ROW_TASKS = 4     # ... i.e. when there are fewer rows than this


def _identity(op: str, dtype: str) -> Const:
    """The start value of an accumulation: -0.0 for float sums (-0 + x is exactly x)."""
    if op == "add":
        return Const(-0.0 if k.is_float(dtype) else 0, dtype)
    if k.is_float(dtype):
        return Const(-math.inf if op == "max" else math.inf, dtype)
    info = np.iinfo(k.numpy_dtype(dtype))
    return Const(info.min if op == "max" else info.max, dtype)


def _combine(op: str, a, b):
    return k.Binary({"add": "+", "max": "max", "min": "min"}[op], a, b)


def _runs(shape: Sequence[int], reduced: Sequence[int]) -> list[list]:
    """[size, is_reduced] runs of the dims of ``shape`` (size-1 dims dropped, neighbours of one
    kind merged): the coalesced view a reduction iterates over."""
    groups: list[list] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        red = d in reduced
        if groups and groups[-1][1] == red:
            groups[-1][0] *= size
        else:
            groups.append([size, red])
    return groups


def column_tiles(rows: int, cols: int) -> list[tuple[int, int, int]]:
    """(first column, width, tiles) of each nest that splits ``rows x cols`` work into parallel
    tasks: whole rows when there are enough of them, else ``COLUMN_TILE``-wide column tiles
    (and a narrower tail nest for the columns left over)."""
    if rows >= MIN_ROW_TASKS or cols <= COLUMN_TILE:
        return [(0, cols, 1)]
    n, rest = divmod(cols, COLUMN_TILE)
    return [(0, COLUMN_TILE, n)] + ([(n * COLUMN_TILE, rest, 1)] if rest else [])


def tiled_nests(kb: KernelBuilder, rows: int, cols: int,
                fill: Callable[[Block, object, Callable], None]) -> list:
    """Parallel nests over (row, column tile): ``fill(block, row, columns)`` writes one task,
    where ``columns(block, body)`` emits a vectorised loop ``body(inner, column)`` over the
    task's columns."""
    nests = []
    for first, width, tiles in column_tiles(rows, cols):
        def task(b: Block, o: Var, first=first, width=width, tiles=tiles) -> None:
            row = b.index(k.floordiv(o, tiles))
            base = b.index(k.add(Const(first, INDEX), k.mul(k.mod(o, tiles),
                                                             Const(width, INDEX))))

            def columns(blk: Block, body: Callable[[Block, object], None]) -> None:
                blk.loop(width, lambda inner, c: body(inner, inner.index(k.add(base, c))),
                         vectorize=True)

            fill(b, row, columns)

        top = Block(kb)
        top.loop(rows * tiles, task, parallel=True)
        nests += top.stmts
    return nests


def reduce_kernel(ctx: LowerContext, reduced: Sequence[int], op: str,
                  finish: Callable[[object, int], object] | None) -> BoundKernel:
    """out[kept] = finish(op-accumulation of x over the reduced dims, count) (None: the
    accumulation itself).

    Two loop structures over the coalesced input: when the input's last dim is reduced (or
    nothing is), one parallel loop over output elements accumulates a scalar over contiguous
    memory; when the last dim is kept, each task accumulates a whole output row (the output
    buffer is the accumulator), so the inner loop runs along contiguous columns."""
    x, out_t = ctx.in_types[0], ctx.out_types[0]
    _check_compute_dtypes(ctx, [x])
    count = math.prod(x.shape[a] for a in reduced)
    groups = _runs(x.shape, reduced)
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, tuple(g[0] for g in groups) or (1,))
    if groups and not groups[-1][1] and any(g[1] for g in groups):
        return _row_reduce(ctx, kb, src, groups, op, finish, count)
    kept = [g[0] for g in groups if not g[1]] or [1]
    dst = kb.output(ctx.node.outputs[0], out_t.dtype, (math.prod(kept),))
    red_sizes = [g[0] for g in groups if g[1]]

    def element(b: Block, o: Var) -> None:
        kept_idx = iter([b.index(i) for i in k.unflatten(o, kept)])
        acc = b.let(_identity(op, x.dtype), mutable=True)

        def level(blk: Block, depth: int, red_idx: list) -> None:
            if depth == len(red_sizes):
                r = iter(red_idx)
                at = tuple(next(r) if g[1] else next(kept_idx) for g in groups)
                blk.emit(k.Accumulate(acc.name, op, Load(src, at or (Const(0, INDEX),),
                                                         x.dtype)))
                return
            blk.loop(red_sizes[depth], lambda inner, v: level(inner, depth + 1, red_idx + [v]),
                     vectorize=depth == len(red_sizes) - 1)

        level(b, 0, [])
        b.emit(k.Store(dst, (o,), finish(acc, count) if finish else acc))

    top = Block(kb)
    top.loop(math.prod(kept), element, parallel=True, vectorize=not red_sizes)
    return kb.build(top.stmts)


def _row_reduce(ctx: LowerContext, kb: KernelBuilder, src: str, groups: list, op: str,
                finish, count: int) -> BoundKernel:
    x = ctx.in_types[0]
    kept = [g[0] for g in groups if not g[1]]
    lead, cols = kept[:-1], kept[-1]
    rows = math.prod(lead)
    dst = kb.output(ctx.node.outputs[0], ctx.out_types[0].dtype, (rows, cols))
    red_sizes = [g[0] for g in groups if g[1]]

    def fill(b: Block, row, columns) -> None:
        lead_idx = [b.index(i) for i in k.unflatten(row, lead)]
        columns(b, lambda blk, c: blk.emit(k.Store(dst, (row, c), _identity(op, x.dtype))))

        def level(blk: Block, depth: int, red_idx: list) -> None:
            if depth < len(red_sizes):
                blk.loop(red_sizes[depth], lambda inner, v: level(inner, depth + 1,
                                                                  red_idx + [v]))
                return

            def update(inner: Block, c) -> None:
                r, kk = iter(red_idx), iter(lead_idx + [c])
                at = tuple(next(r) if g[1] else next(kk) for g in groups)
                total = _combine(op, Load(dst, (row, c), x.dtype), Load(src, at, x.dtype))
                inner.emit(k.Store(dst, (row, c), total))

            columns(blk, update)

        level(b, 0, [])
        if finish is not None:
            columns(b, lambda blk, c: blk.emit(k.Store(
                dst, (row, c), finish(Load(dst, (row, c), x.dtype), count))))

    return kb.build(tiled_nests(kb, rows, cols, fill))


def _mean(acc, count: int):
    return k.Binary("/", acc, _c(count, acc))


@lowering("ReduceSum", "ReduceMean")
def lower_reduce(ctx: LowerContext) -> BoundKernel:
    x = ctx.in_types[0]
    axes_value = None
    if ctx.has_input(1):
        axes_value = ctx.const_input(1, "axes") if ctx.in_types[1].numel else np.zeros(0, np.int64)
    axes = reduced_axes(ctx.opcall(), axes_value, x.rank)
    if axes is None:  # noop_with_empty_axes: a copy
        axes = ()
    return reduce_kernel(ctx, axes, "add", _mean if ctx.node.op == "ReduceMean" else None)


@lowering("GlobalAveragePool", "GlobalMaxPool")
def lower_global_pool(ctx: LowerContext) -> BoundKernel:
    x = ctx.in_types[0]
    spatial = tuple(range(2, x.rank))
    if ctx.node.op == "GlobalAveragePool":
        return reduce_kernel(ctx, spatial, "add", _mean)
    if math.prod(x.shape[2:]) == 0:
        raise ctx.shape_error(f"the maximum over an empty spatial extent ({x}) is undefined")
    return reduce_kernel(ctx, spatial, "max", None)


@lowering("Softmax", "LogSoftmax")
def lower_softmax(ctx: LowerContext) -> BoundKernel:
    """Numerically stable, as the reference: z = x - max(x); softmax = exp(z) / sum(exp(z)),
    log-softmax = z - log(sum(exp(z))), over the axis viewed as [outer, axis, inner]."""
    x = ctx.in_types[0]
    _check_compute_dtypes(ctx, [x])
    if x.dtype not in FLOATS:
        raise ctx.error(f"dtype {x.dtype} is not lowered")
    if x.rank == 0:
        raise ctx.shape_error("a scalar has no axis to normalise over")
    axis = normalize_axis(ctx.attrs["axis"], x.rank, ctx.opcall())
    view = _around_axis(x.shape, axis)
    kb = KernelBuilder(ctx)
    src = kb.input(ctx.node.inputs[0], x.dtype, view)
    dst = kb.output(ctx.node.outputs[0], x.dtype, view)
    log = ctx.node.op == "LogSoftmax"
    if view[2] > 1 and view[1] >= 2:
        return kb.build(_softmax_rows(kb, src, dst, x.dtype, view, log))
    return kb.build(_softmax_positions(kb, src, dst, x.dtype, view, log))


def _softmax_positions(kb: KernelBuilder, src: str, dst: str, dtype: str, view: tuple,
                       log: bool) -> list:
    """One parallel loop over the (outer, inner) positions; three passes along the axis with
    scalar accumulators (contiguous when the axis is the last dim)."""
    outer, length, inner = view

    def position(b: Block, o: Var) -> None:
        a, c = b.index(k.floordiv(o, inner)), b.index(k.mod(o, inner))
        at = lambda r: (a, r, c)
        top = b.let(_identity("max", dtype), mutable=True)
        b.loop(length, lambda blk, r: blk.emit(
            k.Accumulate(top.name, "max", Load(src, at(r), dtype))), vectorize=True)
        total = b.let(_identity("add", dtype), mutable=True)

        def exp_pass(blk: Block, r: Var) -> None:
            e = blk.let(k.Unary("exp", k.Binary("-", Load(src, at(r), dtype), top)))
            if not log:
                blk.emit(k.Store(dst, at(r), e))
            blk.emit(k.Accumulate(total.name, "add", e))

        b.loop(length, exp_pass, vectorize=True)
        if log:
            log_total = b.let(k.Unary("log", total))
            b.loop(length, lambda blk, r: blk.emit(k.Store(dst, at(r), k.Binary(
                "-", k.Binary("-", Load(src, at(r), dtype), top), log_total))), vectorize=True)
        else:
            b.loop(length, lambda blk, r: blk.emit(k.Store(dst, at(r), k.Binary(
                "/", Load(dst, at(r), dtype), total))), vectorize=True)

    top_block = Block(kb)
    top_block.loop(outer * inner, position, parallel=True)
    return top_block.stmts


def _softmax_rows(kb: KernelBuilder, src: str, dst: str, dtype: str, view: tuple,
                  log: bool) -> list:
    """Axis not last: vectorise along the contiguous inner positions. Rows 0 and 1 (along the
    axis) of the output hold the running max and the sum of exps (its log for LogSoftmax)
    until the last pass, which writes rows 2.. first and rows 0 and 1 last."""
    outer, length, inner = view
    zero, one, two = Const(0, INDEX), Const(1, INDEX), Const(2, INDEX)

    def fill(b: Block, a, columns) -> None:
        def x(r, c):
            return Load(src, (a, r, c), dtype)

        def y(r, c):
            return Load(dst, (a, r, c), dtype)

        def store(blk: Block, r, c, value) -> None:
            blk.emit(k.Store(dst, (a, r, c), value))

        def final(value, top, total):
            z = k.Binary("-", value, top)
            return k.Binary("-", z, total) if log else k.Binary("/", k.Unary("exp", z), total)

        def max_row(blk: Block, r) -> None:  # row 0 = max(row 0, x[r + 1])
            columns(blk, lambda cb, c: store(cb, zero, c, k.Binary(
                "max", y(zero, c), x(k.add(r, one), c))))

        def sum_row(blk: Block, r) -> None:  # row 1 += exp(x[r] - max)
            columns(blk, lambda cb, c: store(cb, one, c, k.Binary(
                "+", y(one, c), k.Unary("exp", k.Binary("-", x(r, c), y(zero, c))))))

        def rest_row(blk: Block, r) -> None:  # rows 2..
            row = k.add(r, two)
            columns(blk, lambda cb, c: store(cb, row, c, final(x(row, c), y(zero, c),
                                                                y(one, c))))

        def first_rows(blk: Block, c) -> None:
            top, total = blk.let(y(zero, c)), blk.let(y(one, c))
            first = blk.let(final(x(zero, c), top, total))
            store(blk, one, c, final(x(one, c), top, total))
            store(blk, zero, c, first)

        columns(b, lambda cb, c: store(cb, zero, c, x(zero, c)))
        b.loop(length - 1, max_row)
        columns(b, lambda cb, c: store(cb, one, c, _identity("add", dtype)))
        b.loop(length, sum_row)
        if log:
            columns(b, lambda cb, c: store(cb, one, c, k.Unary("log", y(one, c))))
        b.loop(length - 2, rest_row)
        columns(b, first_rows)

    return tiled_nests(kb, outer, inner, fill)


# the per-family lowering modules register into LOWERINGS on import
from . import lower_conv, lower_gemm, lower_grad, lower_window  # noqa: F401
