"""Kernel IR -> LLVM IR (built with ``llvmlite.ir``): one C-ABI function per kernel.

ABI: ``void @symbol(T0* b0, ..., Tn* bn, i32 thread_id, i32 n_threads)`` -- one typed pointer
per ``Kernel.params`` entry (bool buffers are ``i8*`` holding 0/1, as numpy stores them), then
the caller's thread id and thread count (what ``backends/llvm/runtime.py`` passes). Thread ``t``
runs ``kernel_ir.thread_range(extent, t, n)`` of every top-level parallel loop and thread 0 alone
runs the other top-level loops; an id outside ``0..n-1`` runs nothing.

Code shape. Loops are plain counted loops over ``i64`` indices (``nsw`` arithmetic, ``inbounds``
addressing), pointers are ``noalias`` except the kernel's ``inplace`` pairs, and the math
functions are inline, branch-free f32 code, so LLVM's O3 loop vectoriser vectorises contiguous
inner loops, transcendental functions included (AVX-512 on the development machine: 16 lanes).

Numerics (what the kernel IR leaves to the target):

* ``+ - * /``, ``sqrt``, comparisons, ``max``/``min`` (``llvm.maximum``/``llvm.minimum``:
  NaN-propagating) and casts are exact IEEE operations -- no fast-math flags, no contraction;
* ``Accumulate add`` on floats carries the ``reassoc`` flag and nothing else: the vectoriser may
  keep partial sums (the kernel IR allows reordering a reduction); no ``nnan``/``ninf``, so NaN
  and infinities propagate as in numpy;
* f32 ``exp``, ``expm1``, ``log``, ``log1p``, ``tanh``, ``erf``: polynomial approximations
  fitted for this file (least squares on Chebyshev nodes, coefficients rounded to f32, evaluated
  with ``llvm.fma``) after the classic range reductions (Cody-Waite for exp; exponent/mantissa
  split for log). Largest errors against float64 over dense samples of each function's whole
  f32 range (``tests/test_llvm_codegen.py`` checks these bounds): exp 0.97 ulp, log 0.82,
  expm1 1.65, tanh 1.26, erf 1.10, log1p 2.25; special values (NaN, +-inf, +-0, subnormal
  inputs and results, overflow and underflow) as C99;
* f64 transcendental functions and ``pow`` call the C library (``exp``, ``log``, ..., ``powf``,
  ``pow``), which MCJIT resolves in the process; such loops stay scalar;
* f16 values are loaded and stored as ``half``; math on them is done in f32 and rounded
  (round to nearest even, as numpy); casts between f16 and other types are exact, see
  ``_cast_f16``;
* ``IndexOf`` widens integer data to i64 and clamps it with integer min/max (no branch).
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from graphc.errors import GraphcError

from .. import kernel_ir as k
from ..kernel_ir import INDEX, Kernel

I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
_FLOAT_TYPES = {"f16": F16, "f32": F32, "f64": F64}
_SUFFIX = {"f16": "f16", "f32": "f32", "f64": "f64"}


class KernelArgumentError(GraphcError):
    """Arrays passed to a compiled kernel do not match its parameters."""


class KernelCodegenError(GraphcError):
    """A kernel uses something this code generator does not implement."""


def llvm_type(dtype: str, memory: bool = False) -> ir.Type:
    """The LLVM type of a kernel-IR dtype (``memory``: as stored in a buffer)."""
    if dtype in _FLOAT_TYPES:
        return _FLOAT_TYPES[dtype]
    if dtype == k.BOOL:
        return I8 if memory else I1
    return ir.IntType(k.BITS[dtype])


# -- fitted polynomial coefficients (ascending powers; see the module docstring) ------------------
LOG2E = 1.4426950216293335      # f32(1 / ln 2)
LN2_HI = 0.693359375            # ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits, so
LN2_LO = -0.00021219444170128554  # k * LN2_HI is exact for |k| < 2^15
# exp(r) = 1 + r + r^2 * EXP(r) on [-ln2/2, ln2/2]
EXP = (0.5, 0.1666666716337204, 0.04166646674275398, 0.008333372883498669,
       0.0013933581067249179, 0.00019849518139380962)
# log(1 + f) = f - f^2/2 + f^3 * LOG(f) on [sqrt(1/2) - 1, sqrt(2) - 1]
LOG = (0.3333333134651184, -0.2500000298023224, 0.20000715553760529, -0.16667377948760986,
       0.1424865573644638, -0.12434924393892288, 0.11699074506759644, -0.11421497166156769,
       0.06862342357635498)
# tanh(x) = x + x^3 * TANH(x^2) for |x| < 0.625
TANH = (-0.333333283662796, 0.13332757353782654, -0.05384935066103935, 0.020990874618291855,
        -0.006088718771934509)
# erf(x) = x + x * ERF_SMALL(x^2) for |x| < 0.875
ERF_SMALL = (0.12837915122509003, -0.3761255443096161, 0.11282510310411453,
             -0.026793451979756355, 0.005035122390836477, -0.0006218503112904727)
# log(erfc(t)) = ERFC_LOG(t) for 0.875 <= t <= 4 (erf(t) rounds to 1 beyond)
ERFC_LOG = (0.00029666503542102873, -1.1301409006118774, -0.6319798827171326,
            -0.10993916541337967, 0.026343179866671562, -0.0047328658401966095,
            0.0005912453634664416, -4.541504313237965e-05, 1.6054320894909324e-06)
# expm1(x) = x + x^2 * EXPM1(x) for |x| < 0.5
EXPM1 = (0.5, 0.1666666716337204, 0.0416666641831398, 0.008333182893693447,
         0.0013889104593545198, 0.00019961886573582888, 2.4824432330206037e-05)
_LIBM = {"exp": "exp", "expm1": "expm1", "log": "log", "log1p": "log1p", "tanh": "tanh",
         "erf": "erf"}


# -- intrinsics and the math library --------------------------------------------------------------
def intrinsic(module: ir.Module, name: str, ret: ir.Type, args: Sequence[ir.Type]) -> ir.Function:
    """Declare (once) ``name`` -- a full intrinsic name such as ``llvm.maximum.f32``."""
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    return module.declare_intrinsic(name, fnty=ir.FunctionType(ret, list(args)))


def _libm(module: ir.Module, name: str, ty: ir.Type, arity: int = 1) -> ir.Function:
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    fn = ir.Function(module, ir.FunctionType(ty, [ty] * arity), name)
    fn.attributes.add("nounwind")
    return fn


class _F32:
    """Helpers for writing f32 math with one builder."""

    def __init__(self, b: ir.IRBuilder):
        self.b = b
        self.m = b.module

    @staticmethod
    def c(value: float) -> ir.Constant:
        return ir.Constant(F32, float(np.float32(value)))

    def call(self, base: str, *args):
        fn = intrinsic(self.m, f"llvm.{base}.f32", F32, [F32] * len(args))
        return self.b.call(fn, list(args))

    def fma(self, a, b, c):
        return self.call("fma", a, b, c)

    def horner(self, coefficients: Sequence[float], t):
        r = self.c(coefficients[-1])
        for a in reversed(coefficients[:-1]):
            r = self.fma(r, t, self.c(a))
        return r

    def isnan(self, x):
        return self.b.fcmp_unordered("uno", x, x)

    def pow2(self, n):
        """2**n as f32 for an i32 ``n`` in [-126, 127] (built from the exponent bits)."""
        bits = self.b.shl(self.b.add(n, I32(127)), I32(23))
        return self.b.bitcast(bits, F32)


class MathLibrary:
    """Scalar math functions of one module: inline f32 definitions, libm for f64."""

    def __init__(self, module: ir.Module):
        self.module = module

    def apply(self, b: ir.IRBuilder, op: str, dtype: str, x):
        if dtype == "f64":
            return b.call(_libm(self.module, _LIBM[op], F64), [x])
        if dtype == "f16":
            return b.fptrunc(self.apply(b, op, "f32", b.fpext(x, F32)), F16)
        return b.call(self.function(op), [x])

    def pow(self, b: ir.IRBuilder, dtype: str, x, y):
        if dtype == "f16":
            r = self.pow(b, "f32", b.fpext(x, F32), b.fpext(y, F32))
            return b.fptrunc(r, F16)
        name, ty = ("powf", F32) if dtype == "f32" else ("pow", F64)
        return b.call(_libm(self.module, name, ty, 2), [x, y])

    def function(self, op: str) -> ir.Function:
        name = f"graphc.{op}.f32"
        existing = self.module.globals.get(name)
        if existing is not None:
            return existing
        fn = ir.Function(self.module, ir.FunctionType(F32, [F32]), name)
        fn.linkage = "internal"
        fn.attributes.add("alwaysinline")
        fn.attributes.add("nounwind")
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        b.ret(getattr(self, f"_{op}")(_F32(b), fn.args[0]))
        return fn

    def _inline(self, f: _F32, op: str, x):
        return f.b.call(self.function(op), [x])

    def _exp(self, f: _F32, x):
        b = f.b
        # clamp so that k fits the two-step scaling; NaN becomes a finite lane, fixed at the end
        xc = f.call("maxnum", f.call("minnum", x, f.c(89.0)), f.c(-104.0))
        kf = f.call("rint", b.fmul(xc, f.c(LOG2E)))
        r = f.fma(kf, f.c(-LN2_HI), xc)
        r = f.fma(kf, f.c(-LN2_LO), r)
        y = b.fadd(f.fma(f.horner(EXP, r), b.fmul(r, r), r), f.c(1.0))
        ki = b.fptosi(kf, I32)
        half = b.ashr(ki, I32(1))  # 2^k as 2^(k/2) * 2^(k - k/2): both factors are normal
        scaled = b.fmul(b.fmul(y, f.pow2(half)), f.pow2(b.sub(ki, half)))
        return b.select(f.isnan(x), x, scaled)

    def _log(self, f: _F32, x):
        b = f.b
        tiny = b.fcmp_ordered("<", x, f.c(1.1754943508222875e-38))  # subnormal, zero, negative
        xs = b.select(tiny, b.fmul(x, f.c(8388608.0)), x)
        bits = b.bitcast(xs, I32)
        e = b.sub(b.lshr(bits, I32(23)), I32(127))
        m = b.bitcast(b.or_(b.and_(bits, I32(0x7FFFFF)), I32(0x3F800000)), F32)  # [1, 2)
        big = b.fcmp_ordered(">", m, f.c(1.4142135381698608))
        m = b.select(big, b.fmul(m, f.c(0.5)), m)  # [sqrt(1/2), sqrt(2))
        e = b.add(e, b.zext(big, I32))
        e = b.sub(e, b.select(tiny, I32(23), I32(0)))
        fr = b.fsub(m, f.c(1.0))
        ff = b.fmul(fr, fr)
        y = b.fmul(b.fmul(f.horner(LOG, fr), fr), ff)
        ef = b.sitofp(e, F32)
        y = f.fma(ef, f.c(LN2_LO), y)
        y = f.fma(ff, f.c(-0.5), y)
        r = f.fma(ef, f.c(LN2_HI), b.fadd(fr, y))
        r = b.select(b.fcmp_ordered("==", x, f.c(np.inf)), x, r)
        r = b.select(b.fcmp_ordered("==", x, f.c(0.0)), f.c(-np.inf), r)
        r = b.select(b.fcmp_ordered("<", x, f.c(0.0)), f.c(np.nan), r)
        return b.select(f.isnan(x), x, r)

    def _log1p(self, f: _F32, x):
        """log(u) * (x / (u - 1)) with u = 1 + x: the quotient corrects u's rounding."""
        b = f.b
        u = b.fadd(f.c(1.0), x)
        d = b.fsub(u, f.c(1.0))
        r = b.fmul(self._inline(f, "log", u), b.fdiv(x, d))
        r = b.select(b.fcmp_ordered("==", d, f.c(0.0)), x, r)
        return b.select(b.fcmp_ordered("==", u, f.c(np.inf)), u, r)

    def _expm1(self, f: _F32, x):
        b = f.b
        near = b.fcmp_ordered("<", f.call("fabs", x), f.c(0.5))
        poly = f.fma(f.horner(EXPM1, x), b.fmul(x, x), x)
        r = b.select(near, poly, b.fsub(self._inline(f, "exp", x), f.c(1.0)))
        return b.select(b.fcmp_ordered("==", x, f.c(0.0)), x, r)  # keeps the sign of -0

    def _tanh(self, f: _F32, x):
        b = f.b
        a = f.call("fabs", x)
        s = b.fmul(x, x)
        poly = f.fma(f.horner(TANH, s), b.fmul(s, x), x)
        e = self._inline(f, "exp", b.fadd(a, a))
        far = b.fsub(f.c(1.0), b.fdiv(f.c(2.0), b.fadd(e, f.c(1.0))))
        r = b.select(b.fcmp_ordered("<", a, f.c(0.625)), poly, far)
        return f.call("copysign", r, x)  # tanh is odd: also gives tanh(-0) = -0

    def _erf(self, f: _F32, x):
        b = f.b
        a = f.call("fabs", x)
        near = f.fma(x, f.horner(ERF_SMALL, b.fmul(x, x)), x)
        t = f.call("minnum", a, f.c(4.0))
        far = b.fsub(f.c(1.0), self._inline(f, "exp", f.horner(ERFC_LOG, t)))
        far = f.call("copysign", far, x)
        r = b.select(b.fcmp_ordered("<", a, f.c(0.875)), near, far)
        return b.select(f.isnan(x), x, r)


# -- kernels --------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """A mutable local: its stack slot and dtype."""

    pointer: ir.Value
    dtype: str


class _KernelEmitter:
    def __init__(self, module: ir.Module, kernel: Kernel, symbol: str):
        self.kernel = kernel
        self.module = module
        self.symbol = symbol
        self.math = MathLibrary(module)
        ptypes = [llvm_type(p.dtype, memory=True).as_pointer() for p in kernel.params]
        self.fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [*ptypes, I32, I32]),
                              symbol)
        self.fn.attributes.add("nounwind")
        shared = {name for pair in kernel.inplace for name in pair}
        self.buffers: dict[str, tuple[k.Buffer, ir.Value]] = {}
        for p, arg in zip(kernel.params, self.fn.args):
            arg.name = p.name
            if p.name not in shared:  # in-place pairs may be the same memory
                arg.add_attribute("noalias")
            self.buffers[p.name] = (p, arg)
        self.thread_id, self.n_threads = self.fn.args[-2:]
        self.thread_id.name, self.n_threads.name = "thread_id", "n_threads"
        self.tables = {t.name: self._table(t) for t in kernel.tables}
        self.entry = ir.IRBuilder(self.fn.append_basic_block("entry"))  # allocas only
        self.b = ir.IRBuilder(self.fn.append_basic_block("start"))
        self.env: dict[str, object] = {}
        self.ranges: dict[str, tuple] = {}

    def _table(self, table: k.Table) -> ir.GlobalVariable:
        ty = ir.ArrayType(I64, len(table.values))
        g = ir.GlobalVariable(self.module, ty, f"{self.symbol}.{table.name}")
        g.linkage = "internal"
        g.global_constant = True
        g.initializer = ir.Constant(ty, [int(v) for v in table.values])
        return g

    def emit(self) -> ir.Function:
        first = self.b.block
        for stmt in self.kernel.body:
            lo, hi = self._thread_bounds(stmt)
            self._loop(stmt, lo, hi)
        self.b.ret_void()
        self.entry.branch(first)
        return self.fn

    # -- threads ---------------------------------------------------------------------------------
    def _thread_bounds(self, loop: k.For) -> tuple:
        b = self.b
        tid, n = b.sext(self.thread_id, I64), b.sext(self.n_threads, I64)
        valid = b.and_(b.icmp_signed(">=", tid, I64(0)), b.icmp_signed("<", tid, n))
        extent = I64(loop.extent)
        if not loop.parallel:
            return I64(0), b.select(b.and_(valid, b.icmp_signed("==", tid, I64(0))), extent,
                                    I64(0))
        n_safe = b.select(valid, n, I64(1))  # no division by a bad count, even unselected
        tid_safe = b.select(valid, tid, I64(0))
        lo = b.udiv(b.mul(extent, tid_safe), n_safe)
        hi = b.udiv(b.mul(extent, b.add(tid_safe, I64(1))), n_safe)
        return b.select(valid, lo, I64(0)), b.select(valid, hi, I64(0))

    # -- statements ------------------------------------------------------------------------------
    def _block(self, body) -> None:
        for s in body:
            if isinstance(s, k.For):
                self._loop(s, I64(0), I64(s.extent))
            elif isinstance(s, k.Let):
                self._let(s)
            elif isinstance(s, k.Assign):
                slot = self.env[s.name]
                self.b.store(self.value(s.value), slot.pointer)
            elif isinstance(s, k.Accumulate):
                self._accumulate(s)
            elif isinstance(s, k.Store):
                self._store(s)
            else:
                raise KernelCodegenError(f"kernel '{self.kernel.name}': unknown statement {s!r}")

    def _loop(self, s: k.For, lo, hi) -> None:
        b = self.b
        pre = b.block
        head = self.fn.append_basic_block(f"{s.var}.head")
        body = self.fn.append_basic_block(f"{s.var}.body")
        done = self.fn.append_basic_block(f"{s.var}.done")
        b.branch(head)
        b.position_at_end(head)
        var = b.phi(I64, name=s.var)
        var.add_incoming(lo, pre)
        b.cbranch(b.icmp_signed("<", var, hi), body, done)
        b.position_at_end(body)
        saved_env, saved_ranges = dict(self.env), dict(self.ranges)
        self.env[s.var] = var
        self.ranges[s.var] = (0, max(s.extent - 1, 0))
        self._block(s.body)
        self.env, self.ranges = saved_env, saved_ranges
        nxt = b.add(var, I64(1), flags=["nuw", "nsw"])
        var.add_incoming(nxt, b.block)
        b.branch(head)
        b.position_at_end(done)

    def _let(self, s: k.Let) -> None:
        value = self.value(s.value)
        if not s.mutable:
            self.env[s.name] = value
            if s.value.dtype == INDEX and s.name not in self.ranges:
                self.ranges[s.name] = k.interval(s.value, self.ranges, self._table_values())
            return
        slot = self.entry.alloca(llvm_type(s.value.dtype), name=s.name)
        self.b.store(value, slot)
        self.env[s.name] = _Slot(slot, s.value.dtype)

    def _accumulate(self, s: k.Accumulate) -> None:
        slot = self.env[s.name]
        current = self.b.load(slot.pointer)
        v = self.value(s.value)
        if s.op == "add":
            if k.is_float(slot.dtype):
                new = self.b.fadd(current, v, flags=["reassoc"])  # the IR allows reordering
            else:
                new = self.b.add(current, v)
        else:
            new = self._max_min(s.op, slot.dtype, current, v)
        self.b.store(new, slot.pointer)

    def _store(self, s: k.Store) -> None:
        buf, _ = self.buffers[s.buffer]
        value = self.value(s.value)
        if buf.dtype == k.BOOL:
            value = self.b.zext(value, I8)
        self.b.store(value, self._address(s.buffer, s.indices))

    def _address(self, name: str, indices) -> ir.Value:
        buf, ptr = self.buffers[name]
        offset = None
        for i, stride in zip(indices, buf.element_strides):
            term = self._index_mul(self.value(i), stride)
            offset = term if offset is None else self.b.add(offset, term, flags=["nsw"])
        return self.b.gep(ptr, [offset if offset is not None else I64(0)], inbounds=True)

    def _index_mul(self, v, stride: int):
        if stride == 1:
            return v
        return self.b.mul(v, I64(stride), flags=["nsw"])

    def _table_values(self) -> dict:
        return {t.name: t.values for t in self.kernel.tables}

    # -- expressions -----------------------------------------------------------------------------
    def value(self, e) -> ir.Value:
        if isinstance(e, k.Const):
            return self._const(e)
        if isinstance(e, (k.Var, k.Local)):
            bound = self.env[e.name]
            return self.b.load(bound.pointer) if isinstance(bound, _Slot) else bound
        if isinstance(e, k.Load):
            buf, _ = self.buffers[e.buffer]
            v = self.b.load(self._address(e.buffer, e.indices))
            return self.b.icmp_unsigned("!=", v, I8(0)) if buf.dtype == k.BOOL else v
        if isinstance(e, k.Lookup):
            ptr = self.b.gep(self.tables[e.table], [I32(0), self.value(e.index)], inbounds=True)
            return self.b.load(ptr)
        if isinstance(e, k.Cast):
            return self._cast(self.value(e.x), e.x.dtype, e.dtype)
        if isinstance(e, k.IndexOf):
            return self._index_of(e)
        if isinstance(e, k.Select):
            return self.b.select(self.value(e.cond), self.value(e.a), self.value(e.b))
        if isinstance(e, k.Unary):
            return self._unary(e.op, e.x.dtype, self.value(e.x), e.x)
        if isinstance(e, k.Compare):
            return self._compare(e.op, e.a.dtype, self.value(e.a), self.value(e.b))
        if isinstance(e, k.Binary):
            return self._binary(e)
        raise KernelCodegenError(f"kernel '{self.kernel.name}': unknown expression {e!r}")

    def _index_of(self, e: k.IndexOf) -> ir.Value:
        """Integer data widened to i64 (sign- or zero-extended) and clamped into [lo, hi]."""
        x = self._cast(self.value(e.x), e.x.dtype, "i64") if e.x.dtype != "u64" else None
        if x is None:  # u64 beyond i64's range: clamp while still unsigned
            raw = self.value(e.x)
            big = self.b.icmp_unsigned(">", raw, I64(e.hi))
            return self.b.select(big, I64(e.hi), self._max_min("max", INDEX, raw, I64(e.lo)))
        return self._max_min("min", INDEX, self._max_min("max", INDEX, x, I64(e.lo)), I64(e.hi))

    @staticmethod
    def _const(c: k.Const) -> ir.Constant:
        return ir.Constant(llvm_type(c.dtype), c.value)

    def _unary(self, op: str, dtype: str, x, node) -> ir.Value:
        b = self.b
        if op == "not":
            return b.xor(x, I1(1))
        if k.is_float(dtype):
            suffix = _SUFFIX[dtype]
            ty = llvm_type(dtype)
            if op == "neg":
                return b.fneg(x)
            if op in ("abs", "sqrt"):
                return b.call(intrinsic(self.module, f"llvm.{'fabs' if op == 'abs' else op}."
                                        f"{suffix}", ty, [ty]), [x])
            return self.math.apply(b, op, dtype, x)
        zero = ir.Constant(x.type, 0)
        flags = ["nsw"] if dtype == INDEX else []
        if op == "neg":
            return b.sub(zero, x, flags=flags)
        if op == "abs":
            if not k.is_signed(dtype):
                return x
            return b.select(b.icmp_signed("<", x, zero), b.sub(zero, x, flags=flags), x)
        raise KernelCodegenError(f"{op} of {dtype}")

    def _compare(self, op: str, dtype: str, a, b_) -> ir.Value:
        b = self.b
        if k.is_float(dtype):
            if op == "!=":
                return b.fcmp_unordered("!=", a, b_)
            return b.fcmp_ordered(op, a, b_)
        if k.is_signed(dtype):
            return b.icmp_signed(op, a, b_)
        return b.icmp_unsigned(op, a, b_)

    def _binary(self, e: k.Binary) -> ir.Value:
        dtype = e.a.dtype
        if dtype == INDEX:
            return self._index_binary(e)
        a, c = self.value(e.a), self.value(e.b)
        b = self.b
        if e.op in ("max", "min"):
            return self._max_min(e.op, dtype, a, c)
        if e.op == "&":
            return b.and_(a, c)
        if e.op == "|":
            return b.or_(a, c)
        if k.is_float(dtype):
            if e.op == "pow":
                return self.math.pow(b, dtype, a, c)
            return {"+": b.fadd, "-": b.fsub, "*": b.fmul, "/": b.fdiv}[e.op](a, c)
        if e.op == "/":
            return self._int_divide(dtype, a, c)
        return {"+": b.add, "-": b.sub, "*": b.mul}[e.op](a, c)

    def _max_min(self, op: str, dtype: str, a, c) -> ir.Value:
        if k.is_float(dtype):
            name = f"llvm.{'maximum' if op == 'max' else 'minimum'}.{_SUFFIX[dtype]}"
            ty = llvm_type(dtype)
            return self.b.call(intrinsic(self.module, name, ty, [ty, ty]), [a, c])
        signed = k.is_signed(dtype)
        cmp = self.b.icmp_signed if signed else self.b.icmp_unsigned
        return self.b.select(cmp(">" if op == "max" else "<", a, c), a, c)

    def _int_divide(self, dtype: str, a, c) -> ir.Value:
        """Truncating division; x / 0 = 0 and MIN / -1 = MIN (no trap, no undefined result)."""
        b = self.b
        zero = ir.Constant(a.type, 0)
        by_zero = b.icmp_unsigned("==", c, zero)
        if not k.is_signed(dtype):
            q = b.udiv(a, b.select(by_zero, ir.Constant(a.type, 1), c))
            return b.select(by_zero, zero, q)
        minus_one = b.icmp_signed("==", c, ir.Constant(a.type, -1))
        safe = b.select(b.or_(by_zero, minus_one), ir.Constant(a.type, 1), c)
        q = b.select(minus_one, b.sub(zero, a), b.sdiv(a, safe))  # -MIN wraps to MIN
        return b.select(by_zero, zero, q)

    def _index_binary(self, e: k.Binary) -> ir.Value:
        b = self.b
        a, c = self.value(e.a), self.value(e.b)
        if e.op in ("+", "-", "*"):
            fn = {"+": b.add, "-": b.sub, "*": b.mul}[e.op]
            return fn(a, c, flags=["nsw"])
        if e.op in ("max", "min"):
            return self._max_min(e.op, INDEX, a, c)
        lo = k.interval(e.a, self.ranges, self._table_values())[0]
        if lo >= 0:  # non-negative: the unsigned forms, which LLVM turns into shifts/multiplies
            return b.udiv(a, c) if e.op == "//" else b.urem(a, c)
        q, r = b.sdiv(a, c), b.srem(a, c)
        negative = b.icmp_signed("<", r, I64(0))
        if e.op == "//":
            return b.sub(q, b.zext(negative, I64))
        return b.add(r, b.select(negative, c, I64(0)))

    def _cast(self, x, src: str, dst: str) -> ir.Value:
        b = self.b
        if src == dst:
            return x
        if "f16" in (src, dst) and not {src, dst} <= {"f16", "f32"}:
            return self._cast_f16(x, src, dst)
        ty = llvm_type(dst)
        if dst == k.BOOL:
            if k.is_float(src):
                return b.fcmp_unordered("!=", x, ir.Constant(x.type, 0.0))  # NaN is true
            return b.icmp_unsigned("!=", x, ir.Constant(x.type, 0))
        if src == k.BOOL:
            return b.uitofp(x, ty) if k.is_float(dst) else b.zext(x, ty)
        if k.is_float(src) and k.is_float(dst):
            return b.fpext(x, ty) if k.BITS[dst] > k.BITS[src] else b.fptrunc(x, ty)
        if k.is_float(src):
            kind = "fptosi" if k.is_signed(dst) else "fptoui"
            name = f"llvm.{kind}.sat.i{k.BITS[dst]}.{_SUFFIX[src]}"
            return b.call(intrinsic(self.module, name, ty, [x.type]), [x])
        if k.is_float(dst):
            return b.sitofp(x, ty) if k.is_signed(src) else b.uitofp(x, ty)
        if k.BITS[dst] < k.BITS[src]:
            return b.trunc(x, ty)
        if k.BITS[dst] == k.BITS[src]:
            return x
        return b.sext(x, ty) if k.is_signed(src) else b.zext(x, ty)


    def _cast_f16(self, x, src: str, dst: str) -> ir.Value:
        """Casts between f16 and a type other than f32 go through f32, which needs no
        compiler-rt call and is exact: every f16 is an f32, an integer or bool rounds to f32
        exactly where f16 can hold it (|v| < 2^24; beyond, both roundings overflow to inf).
        Only f64 -> f16 could round twice; it rounds to f32 *to odd* first (truncate, then set
        the last bit if inexact), after which the f32 -> f16 rounding is the correct one (f32
        keeps more than 11 + 2 bits)."""
        if src == "f16":
            return self._cast(self.b.fpext(x, F32), "f32", dst)
        if src != "f64":
            return self.b.fptrunc(self._cast(x, src, "f32"), F16)
        b = self.b
        nearest = b.fptrunc(x, F32)
        exact = b.fcmp_ordered("==", b.fpext(nearest, F64), x)
        fabs64 = intrinsic(self.module, "llvm.fabs.f64", F64, [F64])
        too_far = b.fcmp_ordered(">", b.call(fabs64, [b.fpext(nearest, F64)]), b.call(fabs64, [x]))
        bits = b.bitcast(nearest, I32)
        toward_zero = b.select(too_far, b.sub(bits, I32(1)), bits)  # one ulp back, same sign
        odd = b.bitcast(b.or_(toward_zero, I32(1)), F32)
        keep = b.or_(exact, b.fcmp_unordered("uno", x, x))  # exact values and NaN as they are
        return b.fptrunc(b.select(keep, nearest, odd), F16)


def emit_kernel(module: ir.Module, kernel: Kernel, symbol: str | None = None) -> ir.Function:
    """Add ``kernel`` (verified first) to ``module`` as function ``symbol`` (default: its
    name)."""
    k.verify(kernel)
    symbol = symbol or kernel.name
    if symbol in module.globals:
        raise KernelCodegenError(f"module already defines '{symbol}'")
    return _KernelEmitter(module, kernel, symbol).emit()


def kernel_module(kernels: Sequence[Kernel], name: str,
                  symbols: Sequence[str] | None = None) -> ir.Module:
    """A module holding every kernel (functions named by ``symbols`` or the kernel names)."""
    module = ir.Module(name=name)
    for i, kernel in enumerate(kernels):
        emit_kernel(module, kernel, symbols[i] if symbols else None)
    return module


# -- calling compiled kernels from Python ---------------------------------------------------------
def ctypes_signature(kernel: Kernel):
    """The ctypes function type of a kernel: one ``void*`` per buffer, then two ``int32``."""
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * len(kernel.params)), ctypes.c_int32,
                            ctypes.c_int32)


def call_arguments(kernel: Kernel, arrays: Sequence[np.ndarray]) -> list[int]:
    """Buffer addresses for ``arrays`` (one per parameter, in order) after checking each one's
    dtype, element count and layout against its parameter."""
    if len(arrays) != len(kernel.params):
        raise KernelArgumentError(f"kernel '{kernel.name}' takes {len(kernel.params)} buffers "
                                  f"({', '.join(p.name for p in kernel.params)}), got "
                                  f"{len(arrays)}")
    addresses = []
    for p, a in zip(kernel.params, arrays):
        if not isinstance(a, np.ndarray) or a.dtype != k.numpy_dtype(p.dtype):
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise KernelArgumentError(f"kernel '{kernel.name}': buffer '{p.name}' needs a "
                                      f"{p.dtype} array, got {got}")
        if a.size != p.numel:
            raise KernelArgumentError(f"kernel '{kernel.name}': buffer '{p.name}' needs "
                                      f"{p.numel} elements {p.shape}, got shape {a.shape}")
        if p.strides is None and not a.flags.c_contiguous:
            raise KernelArgumentError(f"kernel '{kernel.name}': buffer '{p.name}' must be "
                                      f"C-contiguous")
        if p.strides is not None and (a.shape != p.shape or tuple(
                s // a.itemsize for s in a.strides) != tuple(p.strides)):
            raise KernelArgumentError(f"kernel '{kernel.name}': buffer '{p.name}' needs shape "
                                      f"{p.shape} with element strides {p.strides}")
        if p.output and not a.flags.writeable:
            raise KernelArgumentError(f"kernel '{kernel.name}': output '{p.name}' is read-only")
        addresses.append(a.ctypes.data)
    return addresses


_SYMBOLS = itertools.count()


@dataclass
class CompiledKernel:
    """A JIT-compiled kernel callable on numpy arrays (for tests, tools and benchmarks; graphs
    run through the runtime's single entry instead)."""

    kernel: Kernel
    symbol: str
    address: int
    compiled: object = field(repr=False)  # backends.llvm.target.CompiledModule

    def __post_init__(self):
        self._fn = ctypes_signature(self.kernel)(self.address)

    def __call__(self, arrays: Sequence[np.ndarray], thread_id: int = 0,
                 n_threads: int = 1) -> None:
        """One call: the share of thread ``thread_id`` of ``n_threads``."""
        self._fn(*call_arguments(self.kernel, arrays), thread_id, n_threads)

    def run(self, arrays: Sequence[np.ndarray], n_threads: int = 1) -> None:
        """All ``n_threads`` shares, concurrently (ctypes releases the GIL during each call)."""
        addresses = call_arguments(self.kernel, arrays)
        workers = [threading.Thread(target=self._fn, args=(*addresses, t, n_threads))
                   for t in range(1, n_threads)]
        for w in workers:
            w.start()
        self._fn(*addresses, 0, n_threads)
        for w in workers:
            w.join()

    @property
    def llvm_ir(self) -> str:
        """The optimised LLVM IR of the kernel's module."""
        return self.compiled.optimised_ir

    @property
    def assembly(self) -> str:
        return self.compiled.assembly


def compile_kernels(kernels: Sequence[Kernel], target=None) -> list[CompiledKernel]:
    """JIT ``kernels`` in one module on the host target; symbols get a process-unique prefix."""
    from .target import host_target

    target = target or host_target()
    serial = next(_SYMBOLS)
    symbols = [f"graphc_kernel{serial}_{i}_{kern.name}" for i, kern in enumerate(kernels)]
    module = kernel_module(kernels, f"graphc_kernels_{serial}", symbols)
    compiled = target.compile(module)
    return [CompiledKernel(kern, s, compiled.address(s), compiled)
            for kern, s in zip(kernels, symbols)]
