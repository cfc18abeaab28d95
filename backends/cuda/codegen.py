"""Kernel IR -> CUDA kernel source (Python text for ``numba.cuda.jit``) -> a launchable kernel.

The CPU and CUDA targets share one loop-level plan: ``backends/lower*.py`` turn graph nodes into
``backends/kernel_ir.py`` kernels, and this module renders the very same kernels as CUDA kernels
(``--emit cuda`` prints this text). The rendering is plain text so that it can be read, diffed
and cached: ``compile_source`` execs it into a namespace holding the helpers of ``PRELUDE`` and
hands the function to ``cuda.jit``; compiled kernels are cached per digest of their text, so
identical kernels of different nodes (every ReLU of one shape) compile once.

Threads. The kernel IR splits every top-level ``parallel`` loop among threads, and its lowerings
guarantee that iterations write disjoint elements and that top-level loops are independent (one
call per thread in any interleaving computes the result). On the GPU each such loop becomes a
*grid-stride loop*: thread ``t`` of ``T`` runs iterations ``t, t + T, ...`` (consecutive threads
take consecutive iterations, which coalesces the contiguous innermost accesses); a top-level loop
that is not parallel runs on thread 0; inner loops stay loops. One launch runs the whole kernel,
sized by the largest parallel extent (``launch_shape``).

Buffers are 1-D device arrays of their dtype (views into the model's arena, the constants, or
the caller's arrays); a load or store of ``b[i, j]`` addresses element ``i * s0 + j * s1`` with
the buffer's static element strides, so no shape is passed at run time.

Semantics (the kernel IR's, ``backends/kernel_ir.py``): every value is computed in its own dtype
-- numba would widen ``int32 + int32`` to int64 and a Python literal to float64, so every
arithmetic result on data is wrapped in its numpy scalar type (``np.float32(a + b)``, free on
the GPU), which also makes integers wrap; integer ``/`` truncates toward zero with 0 for a zero
divisor and MIN for MIN / -1, float -> integer casts saturate (NaN gives 0), ``max``/``min``
propagate NaN (helpers in ``PRELUDE``); ``//`` and ``%`` on indices are Python's floor division,
as the IR defines them. No fast-math and no contraction into FMA. Transcendental functions are
CUDA's libdevice (``expf``, ``logf``, ``tanhf``, ``erff``, ``expm1f``, ``log1pf``, ``powf``:
at most 2 ulp, 4 for ``powf``, per the CUDA programming guide; ``sqrtf`` is correctly rounded);
on the simulator they are numpy's (which, unlike Python's ``math``, return inf/NaN instead of
raising). ``IndexOf`` (run-time integer data as an index) is an int64 widening clamped with
``imin``/``imax``.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphc.errors import GraphcError

from .. import kernel_ir as k
from ..kernel_ir import BOOL, INDEX, Kernel
from .device import is_simulator


class CudaCodegenError(GraphcError):
    """A kernel uses something this code generator does not render (names the kernel)."""


# -- the helpers every generated kernel may call --------------------------------------------------
_NP_NAME = {"f16": "np.float16", "f32": "np.float32", "f64": "np.float64", "i8": "np.int8",
            "i16": "np.int16", "i32": "np.int32", "i64": "np.int64", "u8": "np.uint8",
            "u16": "np.uint16", "u32": "np.uint32", "u64": "np.uint64"}
_MATH = ("sqrt", "exp", "expm1", "log", "log1p", "tanh", "erf", "pow")


def _prelude() -> str:
    lines = [
        "# helpers of the generated kernels: the kernel IR's semantics (backends/kernel_ir.py)",
        "# m_exp, m_log, ... are math.* on a GPU (libdevice), numpy's on the simulator",
        "@cuda.jit(device=True)",
        "def fmax(a, b):  # NaN-propagating",
        "    if a != a or b != b:",
        "        return a + b",
        "    return a if a >= b else b",
        "",
        "@cuda.jit(device=True)",
        "def fmin(a, b):  # NaN-propagating",
        "    if a != a or b != b:",
        "        return a + b",
        "    return a if a <= b else b",
        "",
        "@cuda.jit(device=True)",
        "def imax(a, b):",
        "    return a if a >= b else b",
        "",
        "@cuda.jit(device=True)",
        "def imin(a, b):",
        "    return a if a <= b else b",
    ]
    for dtype in k.INT_DTYPES:
        lines += [""] + _int_divide(dtype) + [""] + _saturate(dtype)
    return "\n".join(lines) + "\n"


def _int_divide(dtype: str) -> list[str]:
    t = _NP_NAME[dtype]
    if not k.is_signed(dtype):
        return ["@cuda.jit(device=True)", f"def idiv_{dtype}(a, b):",
                f"    return {t}(0) if b == 0 else {t}(a // b)"]
    return ["@cuda.jit(device=True)", f"def idiv_{dtype}(a, b):  # truncating; x / 0 == 0",
            "    if b == 0:", f"        return {t}(0)",
            "    if b == -1:", f"        return {t}(-a)  # wraps: MIN / -1 == MIN",
            "    q = a // b", "    if q < 0 and q * b != a:", "        q += 1",
            f"    return {t}(q)"]


def _saturate(dtype: str) -> list[str]:
    t, bits = _NP_NAME[dtype], k.BITS[dtype]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if k.is_signed(dtype) else (0, 2 ** bits)
    return ["@cuda.jit(device=True)", f"def sat_{dtype}(x):  # float -> {dtype}, NaN -> 0",
            "    if x != x:", f"        return {t}(0)",
            f"    if x >= {float(hi)!r}:", f"        return {t}({hi - 1})",
            f"    if x <= {float(lo) - 1.0!r}:", f"        return {t}({lo})",
            f"    return {t}(x)"]


PRELUDE = _prelude()


# -- rendering ------------------------------------------------------------------------------------
RESERVED = frozenset({"cuda", "np", "math", "kernel", "start", "step", "range", "fmax", "fmin",
                      "imax", "imin", "abs", "True", "False", "None"})


def np_name(dtype: str) -> str:
    if dtype not in _NP_NAME:
        raise CudaCodegenError(f"no numpy scalar type for dtype {dtype!r}")
    return _NP_NAME[dtype]


def render_const(c: k.Const) -> str:
    if c.dtype == BOOL:
        return "True" if c.value else "False"
    if c.dtype == INDEX:
        return str(c.value) if c.value >= 0 else f"({c.value})"
    if k.is_float(c.dtype):
        v = float(c.value)
        text = "math.nan" if math.isnan(v) else (
            ("math.inf" if v > 0 else "-math.inf") if math.isinf(v) else repr(v))
        return f"{np_name(c.dtype)}({text})"
    return f"{np_name(c.dtype)}({c.value})"


class Emitter:
    """Renders kernel-IR statements and expressions as Python lines (one instance per kernel).

    IR names are scoped; Python's are function-wide and numba wants one type per variable, so
    every declaration gets a name no other declaration of the function uses."""

    def __init__(self, kernel_name: str, buffers: dict[str, str], strides: dict[str, tuple],
                 tables: dict[str, str]):
        self.kernel_name = kernel_name
        self.buffers = buffers      # IR buffer name -> Python name
        self.strides = strides      # IR buffer name -> element strides
        self.tables = tables        # IR table name -> Python name
        self.used = set(RESERVED) | set(buffers.values()) | set(tables.values())
        self.lines: list[str] = []

    def error(self, message: str) -> CudaCodegenError:
        return CudaCodegenError(f"kernel '{self.kernel_name}': {message}")

    def declare(self, name: str, scope: dict) -> str:
        base = name if name.isidentifier() and not keyword.iskeyword(name) else "v"
        py, n = base, 1
        while py in self.used or keyword.iskeyword(py):
            py, n = f"{base}_{n}", n + 1
        self.used.add(py)
        scope[name] = py
        return py

    # statements
    def block(self, body: Sequence, scope: dict, depth: int) -> None:
        scope = dict(scope)
        start = len(self.lines)
        for s in body:
            self.stmt(s, scope, depth)
        if len(self.lines) == start:
            self.line(depth, "pass")

    def line(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def stmt(self, s, scope: dict, depth: int) -> None:
        if isinstance(s, k.For):
            var = self.declare(s.var, scope)
            self.line(depth, f"for {var} in range({s.extent}):")
            self.block(s.body, {**scope, s.var: var}, depth + 1)
        elif isinstance(s, k.Let):
            value = self.expr(s.value, scope)
            self.line(depth, f"{self.declare(s.name, scope)} = {value}")
        elif isinstance(s, k.Assign):
            self.line(depth, f"{scope[s.name]} = {self.expr(s.value, scope)}")
        elif isinstance(s, k.Accumulate):
            self.line(depth, f"{scope[s.name]} = {self.accumulate(s, scope)}")
        elif isinstance(s, k.Store):
            where = self.address(s.buffer, s.indices, scope)
            self.line(depth, f"{self.buffers[s.buffer]}[{where}] = {self.expr(s.value, scope)}")
        else:
            raise self.error(f"unknown statement {s!r}")

    def accumulate(self, s: k.Accumulate, scope: dict) -> str:
        acc, value = scope[s.name], self.expr(s.value, scope)
        dtype = s.value.dtype
        if s.op == "add":
            return self.wrap(f"({acc} + {value})", dtype)
        fn = ("fmax" if s.op == "max" else "fmin") if k.is_float(dtype) else (
            "imax" if s.op == "max" else "imin")
        return f"{fn}({acc}, {value})"

    def address(self, buffer: str, indices: Sequence, scope: dict) -> str:
        flat = k.Const(0, INDEX)
        for i, stride in zip(indices, self.strides[buffer]):
            flat = k.add(flat, k.mul(i, k.Const(stride, INDEX)))
        return _unwrap(self.expr(flat, scope))

    # expressions
    def wrap(self, text: str, dtype: str) -> str:
        """``text`` computed in ``dtype`` (numba widens small ints and mixes in float64)."""
        return text if dtype in (INDEX, BOOL) else f"{np_name(dtype)}{text}" if text.startswith(
            "(") else f"{np_name(dtype)}({text})"

    def expr(self, e, scope: dict) -> str:
        if isinstance(e, k.Const):
            return render_const(e)
        if isinstance(e, (k.Var, k.Local)):
            if e.name not in scope:
                raise self.error(f"'{e.name}' is used outside its scope")
            return scope[e.name]
        if isinstance(e, k.Load):
            return f"{self.buffers[e.buffer]}[{self.address(e.buffer, e.indices, scope)}]"
        if isinstance(e, k.Lookup):
            return f"{self.tables[e.table]}[{self.expr(e.index, scope)}]"
        if isinstance(e, k.IndexOf):
            return self.index_of(e, scope)
        if isinstance(e, k.Unary):
            return self.unary(e, scope)
        if isinstance(e, k.Binary):
            return self.binary(e, scope)
        if isinstance(e, k.Compare):
            return f"({self.expr(e.a, scope)} {e.op} {self.expr(e.b, scope)})"
        if isinstance(e, k.Select):
            return (f"({self.expr(e.a, scope)} if {self.expr(e.cond, scope)} else "
                    f"{self.expr(e.b, scope)})")
        if isinstance(e, k.Cast):
            return self.cast(e, scope)
        raise self.error(f"unknown expression {e!r}")

    def unary(self, e: k.Unary, scope: dict) -> str:
        x, dtype = self.expr(e.x, scope), e.dtype
        if e.op == "not":
            return f"(not {x})"
        if e.op == "neg":
            return self.wrap(f"(-{x})", dtype)
        if e.op == "abs":
            return self.wrap(f"(abs({x}))", dtype)
        if e.op in _MATH:
            return self.wrap(f"(m_{e.op}({x}))", dtype)
        raise self.error(f"unknown unary op {e.op!r}")

    def binary(self, e: k.Binary, scope: dict) -> str:
        a, b, dtype, op = self.expr(e.a, scope), self.expr(e.b, scope), e.dtype, e.op
        if op in ("max", "min"):
            fn = ("fmax" if op == "max" else "fmin") if k.is_float(dtype) else (
                "imax" if op == "max" else "imin")
            return f"{fn}({a}, {b})"
        if op == "pow":
            return self.wrap(f"(m_pow({a}, {b}))", dtype)
        if op == "/" and k.is_int(dtype):
            return f"idiv_{dtype}({a}, {b})"
        if op in ("&", "|", "//", "%") or dtype == INDEX:
            return f"({a} {op} {b})"
        if op in ("+", "-", "*", "/"):
            return self.wrap(f"({a} {op} {b})", dtype)
        raise self.error(f"unknown binary op {op!r}")

    def index_of(self, e: k.IndexOf, scope: dict) -> str:
        """Integer data as an int64 index clamped into [lo, hi] (a u64 above hi is compared
        while still unsigned: widening it to int64 would wrap it negative)."""
        x, i64 = self.expr(e.x, scope), np_name("i64")
        clamped = f"imin(imax({i64}({x}), {i64}({e.lo})), {i64}({e.hi}))"
        if e.x.dtype == "u64":
            return f"({i64}({e.hi}) if {x} > {np_name('u64')}({e.hi}) else {clamped})"
        return clamped

    def cast(self, e: k.Cast, scope: dict) -> str:
        src, dst, x = e.x.dtype, e.dtype, self.expr(e.x, scope)
        if dst == BOOL:
            return f"({x} != {render_const(k.Const(0, src))})" if src != BOOL else x
        if k.is_int(dst) and k.is_float(src):
            return f"sat_{dst}({x})"
        return f"{np_name(dst)}({x})"


def _unwrap(text: str) -> str:
    """``text`` without one pair of parentheses around all of it (for subscripts)."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and i < len(text) - 1:
            return text  # the first "(" closes before the end: "(a) + (b)"
    return text[1:-1]


# -- a whole kernel -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CudaKernel:
    """One kernel as CUDA source: ``source`` defines ``kernel(params...)`` (and its tables);
    ``extent`` is the largest top-level parallel extent (the threads worth launching)."""

    name: str
    source: str
    params: tuple
    extent: int

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    def __str__(self) -> str:
        return self.source


def buffer_names(kernel: Kernel) -> dict[str, str]:
    return {p.name: f"p_{p.name}" for p in kernel.params}


def kernel_source(kernel: Kernel) -> CudaKernel:
    """The CUDA source of ``kernel`` (see the module docstring for the mapping)."""
    buffers = buffer_names(kernel)
    tables = {t.name: f"tbl_{t.name}" for t in kernel.tables}
    em = Emitter(kernel.name, buffers, {p.name: p.element_strides for p in kernel.params},
                 tables)
    head = [f"# kernel {kernel.name}" + (f": {kernel.doc}" if kernel.doc else "")]
    for t in kernel.tables:
        head.append(f"{tables[t.name]} = np.array({list(t.values)!r}, dtype=np.int64)")
    head.append(f"def kernel({', '.join(buffers[p.name] for p in kernel.params)}):")
    em.line(1, "start = cuda.grid(1)")
    em.line(1, "step = cuda.gridsize(1)")
    extent = 1
    for loop in kernel.body:
        if not isinstance(loop, k.For):
            raise em.error("top-level statements must be loops")
        var = em.declare(loop.var, {})
        if loop.parallel:
            extent = max(extent, loop.extent)
            em.line(1, f"for {var} in range(start, {loop.extent}, step):")
            em.block(loop.body, {loop.var: var}, 2)
        else:
            em.line(1, "if start == 0:")
            em.line(2, f"for {var} in range({loop.extent}):")
            em.block(loop.body, {loop.var: var}, 3)
    return CudaKernel(kernel.name, "\n".join(head + em.lines) + "\n", kernel.params, extent)


# -- compiling and launching ----------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Threads per block and the most blocks a grid-stride kernel is launched with."""

    threads: int = 256
    max_blocks: int = 4096


DEVICE_LAUNCH = LaunchConfig(256, 4096)
SIMULATOR_LAUNCH = LaunchConfig(8, 2)  # the simulator runs one Python thread per CUDA thread


def launch_shape(extent: int, config: LaunchConfig) -> tuple[int, int]:
    """(blocks, threads per block) for a grid-stride kernel over ``extent`` iterations."""
    threads = max(1, min(config.threads, extent))
    blocks = max(1, min(config.max_blocks, -(-extent // threads)))
    return blocks, threads


_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()
_NAMESPACES: dict[bool, dict] = {}


def _math_bindings(simulator: bool) -> dict:
    if simulator:  # numpy's functions return inf/NaN where Python's math raises
        return {"m_sqrt": np.sqrt, "m_exp": np.exp, "m_expm1": np.expm1, "m_log": np.log,
                "m_log1p": np.log1p, "m_tanh": np.tanh, "m_erf": np.vectorize(math.erf),
                "m_pow": np.power}
    return {f"m_{name}": getattr(math, name) for name in _MATH}


def prelude_namespace(cuda) -> dict:
    """The globals every generated source is executed in (``PRELUDE`` compiled once)."""
    simulator = is_simulator(cuda)
    with _LOCK:
        if simulator not in _NAMESPACES:
            ns = {"cuda": cuda, "np": np, "math": math, **_math_bindings(simulator)}
            exec(compile(PRELUDE, "<graphc-cuda-prelude>", "exec"), ns)  # noqa: S102 -- ours
            _NAMESPACES[simulator] = ns
        return _NAMESPACES[simulator]


def compile_source(cuda, source: str, entry: str = "kernel", **jit_options):
    """``cuda.jit`` of function ``entry`` defined by ``source`` (cached per text digest)."""
    key = (is_simulator(cuda), hashlib.sha1(source.encode()).hexdigest(), entry,
           tuple(sorted(jit_options.items())))
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    ns = dict(prelude_namespace(cuda))
    exec(compile(source, f"<graphc-cuda-{key[1][:12]}>", "exec"), ns)  # noqa: S102 -- generated
    kernel = cuda.jit(**jit_options)(ns[entry])
    with _LOCK:
        return _CACHE.setdefault(key, kernel)
