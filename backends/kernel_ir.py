"""The loop-level kernel IR shared by every code generator (LLVM CPU now, CUDA later).

A ``Kernel`` is one function over typed buffers: a sequence of loop nests whose bodies load
scalars, compute with them and store results. Lowering (``backends/lower.py``) turns graph nodes
into kernels; a target turns kernels into machine code (``backends/llvm/codegen.py``).

Vocabulary:

* ``Buffer``: a parameter -- name, dtype, static shape, strides in elements (row-major when not
  given) and whether it is an output. A buffer is a view of a graph value with the same dtype and
  element count; lowerings may coalesce dims (a contiguous reshape), so its shape can differ.
* ``Table``: a compile-time constant vector of indices (Gather's indices), read by ``Lookup``.
* ``IndexOf(x, lo, hi)``: integer *data* ``x`` (a run-time Gather index, say) as an index,
  clamped into ``[lo, hi]``. It is the one way data enters an index expression: its interval is
  ``[lo, hi]`` whatever ``x`` holds, so bounds stay provable and a bad value can never address
  memory outside its buffer (lowerings report such values through an output of their own).
* Expressions (``Expr``) are frozen trees, each with a ``dtype``: a graphc dtype (``f32``,
  ``i64``, ...), ``bool`` (results of comparisons), or ``index`` (64-bit signed loop indices).
  ``Var`` is a loop variable, ``Local`` a ``Let``-bound scalar, ``Load``/``Lookup`` read memory.
* Statements: ``For`` loops, ``Let`` (a scalar local; ``mutable`` ones may be updated by
  ``Assign`` or ``Accumulate``), ``Store``.

Semantics (every target must implement exactly these):

* integer arithmetic wraps (two's complement); ``/`` on integers truncates toward zero, gives 0
  for a zero divisor and ``MIN`` for ``MIN / -1`` (as graphc's numpy reference); ``//`` and ``%``
  are floor division and its remainder and take only index operands with a constant positive
  divisor;
* float arithmetic is IEEE binary32/64 with round-to-nearest, each operation rounded (no
  contraction into FMA unless a target states a tolerance); ``max``/``min`` propagate NaN;
  comparisons are false on NaN except ``!=``; transcendental functions (``exp``, ``expm1``,
  ``log``, ``log1p``, ``tanh``, ``erf``, ``pow``) are approximations whose error bound the target
  states; ``sqrt`` is correctly rounded;
* ``cast`` follows numpy's ``astype`` except that float -> integer conversions of NaN or values
  out of the target's range saturate (NaN gives 0), where numpy's result is platform-defined;
* ``Accumulate(acc, op, v)`` is ``acc = acc op v`` where the order of the accumulations made by
  one loop may be changed (a target may keep several partial accumulators and combine them:
  reassociation is allowed for ``add``, exact for ``max``/``min``).

Threads. A kernel runs as ``n`` calls ``kernel(buffers..., thread_id, n_threads)`` that may run
concurrently. Every top-level statement is a ``For``; a top-level loop with ``parallel=True`` is
split: thread ``t`` runs iterations ``thread_range(extent, t, n)`` (contiguous, balanced, together
exactly ``0..extent``); a top-level loop that is not parallel runs on thread 0 only. Lowerings
guarantee that iterations of a parallel loop write disjoint elements and read nothing another
iteration writes, and that different top-level loops touch disjoint output elements, so one call
per thread in any interleaving computes the whole result.

Aliasing. Buffers of one call never overlap, except the ``inplace`` pairs of a kernel: an input
and an output of identical type that may be the same memory. The verifier accepts such a pair
only when every load of the input and every store of the output sit in one loop body with the
same index expressions, the loads first (so element ``i`` is read before it is overwritten and
never read again).

Invariants (``verify``): names are identifiers and unique (parameters, tables; no loop variable
or local shadows another); every expression is well typed; locals and loop variables are used
only where defined; index expressions contain no ``Load`` (except inside ``IndexOf``) and every
``Load``/``Store``/``Lookup`` index lies within its buffer or table (checked by interval
arithmetic over the loop ranges); only outputs are stored to; ``parallel`` loops are top-level.
``format_kernel`` prints the same kernel as the same text, so dumps diff cleanly.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphc.errors import GraphcError, VerificationError

INDEX = "index"
BOOL = "bool"
FLOAT_DTYPES = ("f16", "f32", "f64")
SIGNED_DTYPES = ("i8", "i16", "i32", "i64")
UNSIGNED_DTYPES = ("u8", "u16", "u32", "u64")
INT_DTYPES = SIGNED_DTYPES + UNSIGNED_DTYPES
BUFFER_DTYPES = FLOAT_DTYPES + INT_DTYPES + (BOOL,)
DTYPES = BUFFER_DTYPES + (INDEX,)
BITS = {"f16": 16, "f32": 32, "f64": 64, "i8": 8, "i16": 16, "i32": 32, "i64": 64, "u8": 8,
        "u16": 16, "u32": 32, "u64": 64, BOOL: 1, INDEX: 64}

UNARY_OPS = ("neg", "abs", "not", "sqrt", "exp", "expm1", "log", "log1p", "tanh", "erf")
TRANSCENDENTAL = ("exp", "expm1", "log", "log1p", "tanh", "erf")
BINARY_OPS = ("+", "-", "*", "/", "//", "%", "max", "min", "pow", "&", "|")
COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
ACCUMULATE_OPS = ("add", "max", "min")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class KernelIRError(VerificationError):
    """A kernel breaks an invariant of the kernel IR; the message names the kernel."""


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def is_int(dtype: str) -> bool:
    """Integer data (not ``index``, not ``bool``)."""
    return dtype in INT_DTYPES


def is_signed(dtype: str) -> bool:
    return dtype in SIGNED_DTYPES or dtype == INDEX


def thread_range(extent: int, thread_id: int, n_threads: int) -> range:
    """The iterations of a top-level parallel loop that thread ``thread_id`` of ``n_threads``
    runs: ``[extent * t // n, extent * (t + 1) // n)`` -- balanced, contiguous, and together
    exactly ``range(extent)``. Threads with an id outside ``0..n-1`` run nothing."""
    if n_threads < 1 or not 0 <= thread_id < n_threads:
        return range(0)
    return range(extent * thread_id // n_threads, extent * (thread_id + 1) // n_threads)


# -- expressions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Const:
    value: int | float
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise KernelIRError(f"constant of unknown dtype {self.dtype!r}")
        if is_float(self.dtype):
            # stored as the value the target will use: rounded to the dtype
            value = float(np.asarray(self.value, dtype=_NP[self.dtype]))
        elif self.dtype == BOOL:
            value = int(bool(self.value))
        else:
            value = int(self.value)
        object.__setattr__(self, "value", value)

    def __eq__(self, other):  # 0.0 == -0.0 and nan != nan would make trees compare wrongly
        return (isinstance(other, Const) and self.dtype == other.dtype
                and _const_key(self.value) == _const_key(other.value))

    def __hash__(self):
        return hash((self.dtype, _const_key(self.value)))


def _const_key(value):
    return repr(float(value)) if isinstance(value, float) else value


@dataclass(frozen=True)
class Var:
    """A loop variable (dtype ``index``)."""

    name: str

    @property
    def dtype(self) -> str:
        return INDEX


@dataclass(frozen=True)
class Local:
    """A reference to a ``Let``-bound scalar."""

    name: str
    dtype: str


@dataclass(frozen=True)
class Load:
    buffer: str
    indices: tuple
    dtype: str


@dataclass(frozen=True)
class Lookup:
    """Entry ``index`` of constant table ``table`` (dtype ``index``)."""

    table: str
    index: object

    @property
    def dtype(self) -> str:
        return INDEX


@dataclass(frozen=True)
class IndexOf:
    """Integer data ``x`` as an index clamped into ``[lo, hi]`` (see the module docstring)."""

    x: object
    lo: int
    hi: int

    @property
    def dtype(self) -> str:
        return INDEX


@dataclass(frozen=True)
class Unary:
    op: str
    x: object

    @property
    def dtype(self) -> str:
        return self.x.dtype


@dataclass(frozen=True)
class Binary:
    op: str
    a: object
    b: object

    @property
    def dtype(self) -> str:
        return self.a.dtype


@dataclass(frozen=True)
class Compare:
    op: str
    a: object
    b: object

    @property
    def dtype(self) -> str:
        return BOOL


@dataclass(frozen=True)
class Select:
    cond: object
    a: object
    b: object

    @property
    def dtype(self) -> str:
        return self.a.dtype


@dataclass(frozen=True)
class Cast:
    x: object
    dtype: str


Expr = Const | Var | Local | Load | Lookup | IndexOf | Unary | Binary | Compare | Select | Cast


# -- statements -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class For:
    var: str
    extent: int
    body: tuple
    parallel: bool = False
    vectorize: bool = False


@dataclass(frozen=True)
class Let:
    name: str
    value: object
    mutable: bool = False


@dataclass(frozen=True)
class Assign:
    name: str
    value: object


@dataclass(frozen=True)
class Accumulate:
    name: str
    op: str
    value: object


@dataclass(frozen=True)
class Store:
    buffer: str
    indices: tuple
    value: object


Stmt = For | Let | Assign | Accumulate | Store


# -- kernels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Buffer:
    name: str
    dtype: str
    shape: tuple
    strides: tuple | None = field(default=None, kw_only=True)  # elements; None: row-major
    output: bool = field(default=False, kw_only=True)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_strides(self) -> tuple:
        return self.strides if self.strides is not None else contiguous_strides(self.shape)

    @property
    def span(self) -> int:
        """Elements from the first to one past the last reachable element (0 if empty)."""
        if self.numel == 0:
            return 0
        return 1 + sum((d - 1) * s for d, s in zip(self.shape, self.element_strides))


@dataclass(frozen=True)
class Table:
    name: str
    values: tuple


@dataclass(frozen=True)
class Kernel:
    name: str
    params: tuple
    body: tuple
    tables: tuple = ()
    inplace: tuple = ()  # (input name, output name) pairs that may share memory
    doc: str = field(default="", compare=False)

    def param(self, name: str) -> Buffer:
        for p in self.params:
            if p.name == name:
                return p
        raise KernelIRError(f"kernel '{self.name}' has no parameter '{name}'")

    @property
    def inputs(self) -> tuple:
        return tuple(p for p in self.params if not p.output)

    @property
    def outputs(self) -> tuple:
        return tuple(p for p in self.params if p.output)

    def __str__(self) -> str:
        return format_kernel(self)


def contiguous_strides(shape: Sequence[int]) -> tuple:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


_NP = {"f16": np.float16, "f32": np.float32, "f64": np.float64, "i8": np.int8,
       "i16": np.int16, "i32": np.int32, "i64": np.int64, "u8": np.uint8, "u16": np.uint16,
       "u32": np.uint32, "u64": np.uint64, BOOL: np.bool_, INDEX: np.int64}


def numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(_NP[dtype])


# -- constructors with local folding --------------------------------------------------------------
def const(value, dtype: str = INDEX) -> Const:
    return Const(value, dtype)


def _both_const(a, b) -> bool:
    return isinstance(a, Const) and isinstance(b, Const)


def add(a, b):
    if a.dtype == INDEX:
        if _both_const(a, b):
            return Const(a.value + b.value, INDEX)
        if a == Const(0, INDEX):
            return b
        if b == Const(0, INDEX):
            return a
    return Binary("+", a, b)


def sub(a, b):
    if a.dtype == INDEX:
        if _both_const(a, b):
            return Const(a.value - b.value, INDEX)
        if b == Const(0, INDEX):
            return a
    return Binary("-", a, b)


def mul(a, b):
    if a.dtype == INDEX:
        if _both_const(a, b):
            return Const(a.value * b.value, INDEX)
        for x, y in ((a, b), (b, a)):
            if x == Const(1, INDEX):
                return y
            if x == Const(0, INDEX):
                return x
    return Binary("*", a, b)


def floordiv(a, divisor: int):
    if divisor == 1:
        return a
    if isinstance(a, Const):
        return Const(a.value // divisor, INDEX)
    if isinstance(a, Binary) and a.op == "//":  # (x // p) // q == x // (p * q) for p, q > 0
        return floordiv(a.a, a.b.value * divisor)
    return Binary("//", a, Const(divisor, INDEX))


def mod(a, divisor: int):
    if divisor == 1:
        return Const(0, INDEX)
    if isinstance(a, Const):
        return Const(a.value % divisor, INDEX)
    return Binary("%", a, Const(divisor, INDEX))


def maximum(a, b):
    return Binary("max", a, b)


def minimum(a, b):
    return Binary("min", a, b)


def select(cond, a, b):
    if isinstance(cond, Const):
        return a if cond.value else b
    return Select(cond, a, b)


def logical_and(a, b):
    for x, y in ((a, b), (b, a)):
        if isinstance(x, Const):
            return y if x.value else x
    return Binary("&", a, b)


def compare(op: str, a, b):
    return Compare(op, a, b)


def cast(x, dtype: str):
    return x if x.dtype == dtype else Cast(x, dtype)


def flat_index(indices: Sequence, shape: Sequence[int]):
    """Row-major linear position of ``indices`` in ``shape`` (an index expression)."""
    out = Const(0, INDEX)
    for i, d in zip(indices, shape):
        out = add(mul(out, Const(d, INDEX)), i)
    return out


def unflatten(flat, shape: Sequence[int]) -> list:
    """Index expressions of each dim of ``shape`` for row-major linear position ``flat``."""
    out, inner = [], 1
    for d in reversed(shape):
        out.append(mod(floordiv(flat, inner), d) if d > 1 else Const(0, INDEX))
        inner *= d
    return list(reversed(out))


# -- interval arithmetic over index expressions ---------------------------------------------------
Interval = tuple  # (lo, hi), inclusive


def interval(expr, ranges: dict, tables: dict | None = None) -> Interval:
    """Bounds of an index (or bool) expression given each variable's range; KernelIRError if it
    reads memory other than tables."""
    if isinstance(expr, Const):
        return expr.value, expr.value
    if isinstance(expr, (Var, Local)):
        if expr.name not in ranges:
            raise KernelIRError(f"index expression uses '{expr.name}', which has no range here")
        return ranges[expr.name]
    if isinstance(expr, Lookup):
        values = (tables or {}).get(expr.table)
        if not values:
            raise KernelIRError(f"lookup in unknown or empty table '{expr.table}'")
        return min(values), max(values)
    if isinstance(expr, IndexOf):
        return expr.lo, expr.hi
    if isinstance(expr, Unary) and expr.op == "abs":
        lo, hi = interval(expr.x, ranges, tables)
        if lo >= 0:
            return lo, hi
        if hi <= 0:
            return -hi, -lo
        return 0, max(-lo, hi)
    if isinstance(expr, Unary) and expr.op == "neg":
        lo, hi = interval(expr.x, ranges, tables)
        return -hi, -lo
    if isinstance(expr, Binary):
        return _binary_interval(expr, ranges, tables)
    if isinstance(expr, Select):
        c = interval(expr.cond, ranges, tables)
        a, b = interval(expr.a, ranges, tables), interval(expr.b, ranges, tables)
        if c == (1, 1):
            return a
        if c == (0, 0):
            return b
        return min(a[0], b[0]), max(a[1], b[1])
    if isinstance(expr, Compare):
        return _compare_interval(expr, ranges, tables)
    raise KernelIRError(f"{type(expr).__name__} is not allowed in an index expression")


def _binary_interval(expr: Binary, ranges, tables) -> Interval:
    (alo, ahi), (blo, bhi) = interval(expr.a, ranges, tables), interval(expr.b, ranges, tables)
    op = expr.op
    if op == "+":
        return alo + blo, ahi + bhi
    if op == "-":
        return alo - bhi, ahi - blo
    if op == "*":
        products = (alo * blo, alo * bhi, ahi * blo, ahi * bhi)
        return min(products), max(products)
    if op == "//":
        return alo // blo, ahi // blo  # divisor is a positive constant (blo == bhi)
    if op == "%":
        if alo >= 0 and ahi < blo:
            return alo, ahi
        return 0, blo - 1
    if op == "max":
        return max(alo, blo), max(ahi, bhi)
    if op == "min":
        return min(alo, blo), min(ahi, bhi)
    if op == "&":
        return min(alo, blo), min(ahi, bhi)
    if op == "|":
        return max(alo, blo), max(ahi, bhi)
    raise KernelIRError(f"operator {op!r} is not allowed in an index expression")


def _compare_interval(expr: Compare, ranges, tables) -> Interval:
    (alo, ahi), (blo, bhi) = interval(expr.a, ranges, tables), interval(expr.b, ranges, tables)
    op = expr.op
    if op in (">", ">="):
        (alo, ahi), (blo, bhi), op = (blo, bhi), (alo, ahi), "<" if op == ">" else "<="
    if op == "<":
        return (1, 1) if ahi < blo else (0, 0) if alo >= bhi else (0, 1)
    if op == "<=":
        return (1, 1) if ahi <= blo else (0, 0) if alo > bhi else (0, 1)
    if op == "==":
        if alo == ahi == blo == bhi:
            return 1, 1
        return (0, 0) if ahi < blo or bhi < alo else (0, 1)
    if alo == ahi == blo == bhi:  # "!="
        return 0, 0
    return (1, 1) if ahi < blo or bhi < alo else (0, 1)


def simplify(expr, ranges: dict, tables: dict | None = None):
    """An equivalent index/bool expression with range facts applied: ``x % n`` -> ``x`` and
    ``x // n`` -> ``0`` when ``0 <= x < n``, decided comparisons and selects folded, and
    min/max of ordered operands resolved."""
    if not _is_index_like(expr):
        return expr
    if isinstance(expr, Const | Var | Local | Lookup | IndexOf):
        if isinstance(expr, IndexOf):
            return Const(expr.lo, INDEX) if expr.lo == expr.hi else expr
        if isinstance(expr, Lookup):
            return Lookup(expr.table, simplify(expr.index, ranges, tables))
        return expr
    lo, hi = interval(expr, ranges, tables)
    if lo == hi:
        return Const(lo, expr.dtype)
    if isinstance(expr, Unary):
        x = simplify(expr.x, ranges, tables)
        if expr.op == "abs" and interval(x, ranges, tables)[0] >= 0:
            return x
        return Unary(expr.op, x)
    if isinstance(expr, Select):
        return select(simplify(expr.cond, ranges, tables), simplify(expr.a, ranges, tables),
                      simplify(expr.b, ranges, tables))
    if isinstance(expr, Compare):
        return Compare(expr.op, simplify(expr.a, ranges, tables),
                       simplify(expr.b, ranges, tables))
    return _simplify_binary(expr, ranges, tables)


def _simplify_binary(expr: Binary, ranges, tables):
    a, b = simplify(expr.a, ranges, tables), simplify(expr.b, ranges, tables)
    (alo, ahi), (blo, bhi) = interval(a, ranges, tables), interval(b, ranges, tables)
    op = expr.op
    if op == "%" and alo >= 0 and ahi < blo:
        return a
    if op == "//" and alo >= 0 and ahi < blo:
        return Const(0, INDEX)
    if op == "max":
        return a if alo >= bhi else b if blo >= ahi else Binary("max", a, b)
    if op == "min":
        return a if ahi <= blo else b if bhi <= alo else Binary("min", a, b)
    if op == "&":
        return logical_and(a, b)
    builders = {"+": add, "-": sub, "*": mul}
    if op in builders:
        return builders[op](a, b)
    if op == "//":
        return floordiv(a, b.value)
    if op == "%":
        return mod(a, b.value)
    return Binary(op, a, b)


def _is_index_like(expr) -> bool:
    if expr.dtype == INDEX:
        return True
    if isinstance(expr, Compare):
        return expr.a.dtype == INDEX
    if isinstance(expr, Binary) and expr.op in ("&", "|") or isinstance(expr, Const):
        return expr.dtype == BOOL and all(_is_index_like(x) for x in children(expr))
    return False


def children(expr) -> tuple:
    if isinstance(expr, Load):
        return expr.indices
    if isinstance(expr, Lookup):
        return (expr.index,)
    if isinstance(expr, (Unary, Cast, IndexOf)):
        return (expr.x,)
    if isinstance(expr, (Binary, Compare)):
        return expr.a, expr.b
    if isinstance(expr, Select):
        return expr.cond, expr.a, expr.b
    return ()


def walk(expr) -> Iterable:
    """``expr`` and every subexpression, parents first."""
    yield expr
    for c in children(expr):
        yield from walk(c)


# -- printing -------------------------------------------------------------------------------------
_PRECEDENCE = {"|": 1, "&": 2, "<": 3, "<=": 3, ">": 3, ">=": 3, "==": 3, "!=": 3,
               "+": 4, "-": 4, "*": 5, "/": 5, "//": 5, "%": 5}
_ATOM = 7


def format_const(c: Const) -> str:
    if c.dtype == BOOL:
        return "true" if c.value else "false"
    if c.dtype == INDEX:
        return str(c.value)
    text = repr(float(c.value)) if is_float(c.dtype) else str(c.value)
    return text if c.dtype == "f32" else f"{text}:{c.dtype}"


def _precedence(expr) -> int:
    if isinstance(expr, (Binary, Compare)) and expr.op in _PRECEDENCE:
        return _PRECEDENCE[expr.op]
    if isinstance(expr, Unary) and expr.op in ("neg", "not"):
        return 6
    if isinstance(expr, Const) and format_const(expr).startswith("-"):
        return 6
    return _ATOM


def format_expr(expr) -> str:
    if isinstance(expr, Const):
        return format_const(expr)
    if isinstance(expr, (Var, Local)):
        return expr.name
    if isinstance(expr, Load):
        return f"{expr.buffer}[{', '.join(format_expr(i) for i in expr.indices)}]"
    if isinstance(expr, Lookup):
        return f"{expr.table}[{format_expr(expr.index)}]"
    if isinstance(expr, Unary):
        if expr.op in ("neg", "not"):
            inner = format_expr(expr.x)
            if _precedence(expr.x) < _ATOM:
                inner = f"({inner})"
            return ("-" if expr.op == "neg" else "!") + inner
        return f"{expr.op}({format_expr(expr.x)})"
    if isinstance(expr, Cast):
        return f"cast<{expr.dtype}>({format_expr(expr.x)})"
    if isinstance(expr, IndexOf):
        return f"index_of<{expr.lo}..{expr.hi}>({format_expr(expr.x)})"
    if isinstance(expr, Select):
        return f"select({format_expr(expr.cond)}, {format_expr(expr.a)}, {format_expr(expr.b)})"
    if expr.op not in _PRECEDENCE:
        return f"{expr.op}({format_expr(expr.a)}, {format_expr(expr.b)})"
    mine = _PRECEDENCE[expr.op]
    left, right = format_expr(expr.a), format_expr(expr.b)
    if _precedence(expr.a) < mine:
        left = f"({left})"
    if _precedence(expr.b) <= mine:
        right = f"({right})"
    return f"{left} {expr.op} {right}"


def _format_buffer(p: Buffer) -> str:
    text = f"{p.name}: {p.dtype}[{','.join(str(d) for d in p.shape)}]"
    if p.strides is not None and tuple(p.strides) != contiguous_strides(p.shape):
        text += f" strides({','.join(str(s) for s in p.strides)})"
    return text + (" out" if p.output else " in")


def _format_table(t: Table) -> str:
    values = list(t.values)
    if len(values) <= 16:
        body = ", ".join(str(v) for v in values)
    else:
        digest = hashlib.sha1(np.asarray(values, np.int64).tobytes()).hexdigest()[:8]
        body = ", ".join(str(v) for v in values[:8]) + f", ... #{digest}"
    return f"  table {t.name}: index[{len(values)}] = [{body}]"


def _format_stmt(s, indent: int, out: list) -> None:
    pad = "  " * indent
    if isinstance(s, For):
        kind = " ".join(k for k, on in (("parallel", s.parallel), ("vectorize", s.vectorize)) if on)
        out.append(f"{pad}{kind + ' ' if kind else ''}for {s.var} in 0..{s.extent} {{")
        for inner in s.body:
            _format_stmt(inner, indent + 1, out)
        out.append(f"{pad}}}")
    elif isinstance(s, Let):
        out.append(f"{pad}{'var' if s.mutable else 'let'} {s.name}: {s.value.dtype} = "
                   f"{format_expr(s.value)}")
    elif isinstance(s, Assign):
        out.append(f"{pad}{s.name} = {format_expr(s.value)}")
    elif isinstance(s, Accumulate):
        op = "+" if s.op == "add" else s.op
        out.append(f"{pad}{s.name} {op}= {format_expr(s.value)}")
    elif isinstance(s, Store):
        out.append(f"{pad}{s.buffer}[{', '.join(format_expr(i) for i in s.indices)}] = "
                   f"{format_expr(s.value)}")
    else:
        raise KernelIRError(f"unknown statement {s!r}")


def format_kernel(kernel: Kernel) -> str:
    """The kernel as stable, readable text (what ``--emit kernel`` prints)."""
    lines = []
    if kernel.doc:
        lines += [f"// {line}" for line in kernel.doc.splitlines()]
    params = ", ".join(_format_buffer(p) for p in kernel.params)
    inplace = "".join(f" inplace({o}<-{i})" for i, o in kernel.inplace)
    lines.append(f"kernel {kernel.name}({params}){inplace} {{")
    lines += [_format_table(t) for t in kernel.tables]
    for s in kernel.body:
        _format_stmt(s, 1, lines)
    lines.append("}")
    return "\n".join(lines)


# -- verification ---------------------------------------------------------------------------------
class _Verifier:
    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.buffers: dict[str, Buffer] = {}
        self.tables: dict[str, tuple] = {}
        self.mutable: set[str] = set()

    def error(self, message: str) -> KernelIRError:
        return KernelIRError(f"kernel '{self.kernel.name}': {message}")

    def run(self) -> None:
        k = self.kernel
        if not isinstance(k.name, str) or not _IDENT.fullmatch(k.name):
            raise self.error("name must be an identifier")
        for p in k.params:
            if not isinstance(p, Buffer):
                raise self.error(f"parameters must be Buffers, got {p!r}")
            self.check_buffer(p)
        for t in k.tables:
            self.check_name(t.name, "table")
            if not t.values or not all(isinstance(v, int) for v in t.values):
                raise self.error(f"table '{t.name}' must hold one or more Python ints")
            self.tables[t.name] = tuple(t.values)
        if not k.outputs:
            raise self.error("has no output buffer")
        if not k.body:
            raise self.error("has an empty body")
        for s in k.body:
            if not isinstance(s, For):
                raise self.error(f"top-level statements must be loops, got {type(s).__name__} "
                                 f"(threads split top-level loops)")
        self.block(k.body, scope={}, ranges={}, top=True, reachable=True)
        for pair in k.inplace:
            self.check_inplace(pair)

    def check_name(self, name: str, what: str) -> None:
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise self.error(f"{what} name {name!r} is not an identifier")
        if name in self.buffers or name in self.tables:
            raise self.error(f"{what} name '{name}' is used twice")

    def check_buffer(self, p: Buffer) -> None:
        self.check_name(p.name, "parameter")
        if p.dtype not in BUFFER_DTYPES:
            raise self.error(f"parameter '{p.name}' has dtype {p.dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in p.shape):
            raise self.error(f"parameter '{p.name}' needs a static non-negative shape, got "
                             f"{p.shape}")
        if p.strides is not None and (not isinstance(p.strides, tuple) or len(
                p.strides) != len(p.shape) or not all(isinstance(s, int) and s >= 0
                                                      for s in p.strides)):
            raise self.error(f"parameter '{p.name}' strides {p.strides} do not fit shape "
                             f"{p.shape}")
        self.buffers[p.name] = p

    # statements: scope maps names (loop variables, locals) to dtypes
    def block(self, body, scope: dict, ranges: dict, top: bool, reachable: bool) -> None:
        scope, ranges = dict(scope), dict(ranges)
        for s in body:
            if isinstance(s, For):
                self.loop(s, scope, ranges, top, reachable)
            elif isinstance(s, Let):
                self.let(s, scope, ranges, reachable)
            elif isinstance(s, (Assign, Accumulate)):
                self.update(s, scope, ranges, reachable)
            elif isinstance(s, Store):
                self.store(s, scope, ranges, reachable)
            else:
                raise self.error(f"unknown statement {s!r}")

    def declare(self, name: str, dtype: str, scope: dict) -> None:
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise self.error(f"local name {name!r} is not an identifier")
        if name in scope or name in self.buffers or name in self.tables:
            raise self.error(f"'{name}' shadows another name")
        scope[name] = dtype

    def loop(self, s: For, scope, ranges, top: bool, reachable: bool) -> None:
        if not isinstance(s.extent, int) or s.extent < 0:
            raise self.error(f"loop '{s.var}' has extent {s.extent!r}")
        if s.parallel and not top:
            raise self.error(f"parallel loop '{s.var}' is not top-level")
        inner = dict(scope)
        self.declare(s.var, INDEX, inner)
        inner_ranges = dict(ranges)
        inner_ranges[s.var] = (0, max(s.extent - 1, 0))
        self.block(s.body, inner, inner_ranges, top=False, reachable=reachable and s.extent > 0)

    def let(self, s: Let, scope, ranges, reachable: bool) -> None:
        dtype = self.expr(s.value, scope, ranges, reachable)
        if s.mutable and dtype == INDEX:
            raise self.error(f"mutable local '{s.name}' cannot have dtype index")
        self.declare(s.name, dtype, scope)
        if s.mutable:
            self.mutable.add(s.name)
        elif dtype in (INDEX, BOOL) and _is_index_like(s.value):
            ranges[s.name] = interval(s.value, ranges, self.tables) if reachable else (0, 0)

    def update(self, s, scope, ranges, reachable: bool) -> None:
        if s.name not in self.mutable or s.name not in scope:
            raise self.error(f"'{s.name}' is not a mutable local in scope")
        dtype = self.expr(s.value, scope, ranges, reachable)
        if dtype != scope[s.name]:
            raise self.error(f"'{s.name}' has dtype {scope[s.name]}, assigned {dtype}")
        if isinstance(s, Accumulate):
            if s.op not in ACCUMULATE_OPS:
                raise self.error(f"accumulate op {s.op!r} not one of {ACCUMULATE_OPS}")
            if dtype == BOOL:
                raise self.error(f"cannot accumulate bool '{s.name}'")

    def store(self, s: Store, scope, ranges, reachable: bool) -> None:
        buf = self.buffers.get(s.buffer)
        if buf is None:
            raise self.error(f"store to unknown buffer '{s.buffer}'")
        if not buf.output:
            raise self.error(f"store to input buffer '{s.buffer}'")
        self.indices(buf, s.indices, scope, ranges, reachable)
        dtype = self.expr(s.value, scope, ranges, reachable)
        if dtype != buf.dtype:
            raise self.error(f"store of {dtype} into {buf.dtype} buffer '{s.buffer}'")

    def indices(self, buf: Buffer, indices, scope, ranges, reachable: bool) -> None:
        if len(indices) != buf.rank:
            raise self.error(f"'{buf.name}' has rank {buf.rank}, indexed with {len(indices)}")
        for axis, (i, dim) in enumerate(zip(indices, buf.shape)):
            if self.expr(i, scope, ranges, reachable) != INDEX:
                raise self.error(f"index {format_expr(i)} of '{buf.name}' is not an index")
            if not reachable:
                continue
            lo, hi = interval(i, ranges, self.tables)
            if lo < 0 or hi >= dim:
                raise self.error(f"index {format_expr(i)} of '{buf.name}' (axis {axis}, size "
                                 f"{dim}) ranges over [{lo}, {hi}]")

    # expressions: returns the dtype after checking the tree
    def expr(self, e, scope: dict, ranges: dict, reachable: bool) -> str:
        if isinstance(e, Const):
            return e.dtype
        if isinstance(e, Var | Local):
            if e.name not in scope:
                raise self.error(f"'{e.name}' is used outside its scope")
            if isinstance(e, Local) and scope[e.name] != e.dtype:
                raise self.error(f"'{e.name}' has dtype {scope[e.name]}, referenced as {e.dtype}")
            if isinstance(e, Var) and scope[e.name] != INDEX:
                raise self.error(f"'{e.name}' is not a loop variable")
            return e.dtype
        if isinstance(e, Load):
            buf = self.buffers.get(e.buffer)
            if buf is None:
                raise self.error(f"load from unknown buffer '{e.buffer}'")
            if e.dtype != buf.dtype:
                raise self.error(f"load of {e.dtype} from {buf.dtype} buffer '{e.buffer}'")
            self.indices(buf, e.indices, scope, ranges, reachable)
            return e.dtype
        if isinstance(e, Lookup):
            table = self.tables.get(e.table)
            if table is None:
                raise self.error(f"lookup in unknown table '{e.table}'")
            if self.expr(e.index, scope, ranges, reachable) != INDEX:
                raise self.error(f"lookup index {format_expr(e.index)} is not an index")
            if reachable:
                lo, hi = interval(e.index, ranges, self.tables)
                if lo < 0 or hi >= len(table):
                    raise self.error(f"lookup {format_expr(e)} ranges over [{lo}, {hi}] of a "
                                     f"table of {len(table)}")
            return INDEX
        return self.operation(e, scope, ranges, reachable)

    def operation(self, e, scope, ranges, reachable: bool) -> str:
        kinds = [self.expr(c, scope, ranges, reachable) for c in children(e)]
        if isinstance(e, IndexOf):
            if not is_int(kinds[0]) or not (isinstance(e.lo, int) and isinstance(e.hi, int)
                                             and e.lo <= e.hi):
                raise self.error(f"index_of needs integer data and bounds lo <= hi: "
                                 f"{format_expr(e)}")
            return INDEX
        if isinstance(e, Cast):
            if e.dtype not in BUFFER_DTYPES or kinds[0] == INDEX:
                raise self.error(f"cast between {kinds[0]} and {e.dtype} in {format_expr(e)}")
            return e.dtype
        if isinstance(e, Select):
            if kinds[0] != BOOL or kinds[1] != kinds[2]:
                raise self.error(f"select needs a bool and two equal dtypes: {format_expr(e)}")
            return kinds[1]
        if isinstance(e, Unary):
            return self.unary(e, kinds[0])
        if isinstance(e, Binary | Compare):
            if kinds[0] != kinds[1]:
                raise self.error(f"operands of {e.op!r} differ in dtype ({kinds[0]} vs "
                                 f"{kinds[1]}): {format_expr(e)}")
            return self.binary(e, kinds[0])
        raise self.error(f"unknown expression {e!r}")

    def unary(self, e: Unary, dtype: str) -> str:
        ok = {"not": dtype == BOOL, "neg": dtype != BOOL, "abs": dtype != BOOL}
        if e.op not in UNARY_OPS or not ok.get(e.op, is_float(dtype)):
            raise self.error(f"{e.op} of {dtype} in {format_expr(e)}")
        return dtype

    def binary(self, e, dtype: str) -> str:
        op = e.op
        if isinstance(e, Compare):
            if op not in COMPARE_OPS or dtype == BOOL and op not in ("==", "!="):
                raise self.error(f"comparison {op!r} of {dtype} in {format_expr(e)}")
            return BOOL
        allowed = {"&": dtype == BOOL, "|": dtype == BOOL, "pow": is_float(dtype),
                   "/": dtype not in (BOOL, INDEX), "//": dtype == INDEX, "%": dtype == INDEX}
        if op not in BINARY_OPS or not allowed.get(op, dtype != BOOL):
            raise self.error(f"{op!r} of {dtype} in {format_expr(e)}")
        if op in ("//", "%") and not (isinstance(e.b, Const) and e.b.value > 0):
            raise self.error(f"{op!r} needs a constant positive divisor: {format_expr(e)}")
        return dtype

    def check_inplace(self, pair) -> None:
        src, dst = pair
        a, b = self.buffers.get(src), self.buffers.get(dst)
        if a is None or b is None or a.output or not b.output:
            raise self.error(f"inplace pair ({src}, {dst}) must name an input and an output")
        if (a.dtype, a.shape, a.element_strides) != (b.dtype, b.shape, b.element_strides):
            raise self.error(f"inplace pair ({src}, {dst}) differ in type")
        if not _reads_before_overwrite(self.kernel.body, src, dst):
            raise self.error(f"inplace pair ({src}, {dst}): '{src}' is read other than just "
                             f"before the store of the same element of '{dst}'")


def _reads_before_overwrite(body, src: str, dst: str) -> bool:
    """True if every access of ``src``/``dst`` sits in one straight-line loop body where all
    loads of ``src`` and stores of ``dst`` use one index tuple and every load precedes the
    first store (``dst`` is never loaded)."""
    sites = []

    def visit(block) -> None:
        here = []
        for s in block:
            if isinstance(s, For):
                visit(s.body)
                continue
            for e in _stmt_exprs(s):
                for sub in walk(e):
                    if isinstance(sub, Load) and sub.buffer in (src, dst):
                        here.append(("load", sub.buffer, sub.indices))
            if isinstance(s, Store) and s.buffer in (src, dst):
                here.append(("store", s.buffer, s.indices))
        if here:
            sites.append(here)

    visit(body)
    if len(sites) != 1:
        return False
    accesses = sites[0]
    if any(kind == "load" and buf == dst for kind, buf, _ in accesses):
        return False
    first_store = next((i for i, a in enumerate(accesses) if a[0] == "store"), len(accesses))
    if any(a[0] == "load" for a in accesses[first_store:]):
        return False
    return len({a[2] for a in accesses}) == 1


def _stmt_exprs(s) -> tuple:
    if isinstance(s, Store):
        return (*s.indices, s.value)
    if isinstance(s, (Let, Assign, Accumulate)):
        return (s.value,)
    return ()


def verify(kernel: Kernel) -> Kernel:
    """Check the invariants in the module docstring; returns the kernel, else KernelIRError."""
    if not isinstance(kernel, Kernel):
        raise GraphcError(f"expected a Kernel, got {type(kernel).__name__}")
    try:
        _Verifier(kernel).run()
    except RecursionError:
        raise KernelIRError(f"kernel '{kernel.name}': expression nested too deeply") from None
    except AttributeError as exc:  # a malformed tree (e.g. a non-expression operand)
        raise KernelIRError(f"kernel '{kernel.name}': malformed IR: {exc}") from None
    return kernel
