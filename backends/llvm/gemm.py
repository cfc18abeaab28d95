"""Generated SGEMM: cache-blocked, packed, register-tiled, with a fused epilogue (LLVM JIT).

``C = activation(A @ B + bias + residual)`` in float32; A[M,K], B[K,N], C[M,N] and the residual
R[M,N] are row-major with leading dimensions (``lda`` ...) in elements; M, N, K and the batch are
run-time arguments. The code is built with ``llvmlite.ir`` from a ``GemmBlocking`` (tile and
block sizes, compile-time) and an ``EpilogueSpec`` (pre-packed B, bias per row or column,
residual, activation: compile-time), then verified, optimised at O3 for the host CPU and JIT'd
by ``backends.llvm.target``.

Algorithm (Goto / BLIS loop nest)::

    for jc in N step NC:                 this thread's columns
      for pc in K step KC:               (runs once when K == 0, so the epilogue still runs)
        pack B[pc:+kc, jc:+nc] into NR-wide micro-panels   (or point into a pre-packed B)
        for ic in M step MC:             this thread's rows
          pack A[ic:+mc, pc:+kc] (a row copy, kept in L2)
          for jr in nc step NR:          one B micro-panel (kc x NR) streams from L1/L2
            for ir in mc step MR:        micro-kernel: an r x NR tile of C (r = MR, or what is
                                         left at the M edge) in r*NR/16 <16 x float> registers,
                                         kc rank-1 updates by llvm.fma with A broadcast
              C tile = acc (first K block) or C tile + acc (later ones); on the last K block
              C tile = activation(acc + C + bias + residual), all before the one store

Small M (a GEMV, M = 1..3 rows in a tile): r*NR/16 accumulators are too few to hide the FMA
latency, so such tiles rotate their unrolled k steps over ``FMA_CHAINS // (r*NR/16)``
independent accumulator sets (summed after the loop) and prefetch B ``PREFETCH_B`` floats
ahead: they stream the packed B from L3 at the core's bandwidth. The chains depend only on r,
so results stay bit-identical across thread splits and packings.

Transposed operands (``EpilogueSpec.trans_a`` / ``trans_b``): A stored [K, M] or B stored
[N, K] (row strides lda / ldb) is read by its own packing routine into the same packed
layouts, so the micro-kernel is unchanged; the packing is O(MK + KN) against O(MNK) work.

Packed layouts (floats). An A block is its rows copied ``a_stride = kc + 16`` apart (the padding
keeps the MR rows the micro-kernel reads at once out of the same L1 sets); there is no transpose
because the micro-kernel broadcasts A[r, k] from row r. A B block: micro-panel q (columns
q*NR...) starts at q*NR*kc and holds element (k, c) at k*NR + c; columns past N are zeros. Edge
tiles: an r-row tile has its own code (r = 1..MR, picked by a switch), and columns past N are
masked off by AVX-512 masked loads/stores. A pre-packed B (``pack_b``) holds K x Npad floats,
Npad = ceil(N / NR) * NR: the KC block starting at row pc is a B block at offset pc * Npad, so the
kernel reads micro-panel q of that block at pc * Npad + q * NR * kc without any copy.

Exported C ABI (all integers are int64, pointers are float*):

* ``<kernel>(batch, M, N, K, A, lda, stride_a, B, ldb, stride_b, C, ldc, stride_c, bias,
  R, ldr, stride_r, params, workspace, tid, n_threads)``: batch item ``b`` uses
  ``A + b*stride_a`` etc. (a stride of 0 shares an operand across the batch). For a pre-packed
  kernel, B is a ``pack_b`` result, ``ldb`` is ignored and ``stride_b`` is the distance between
  packed items. ``bias`` (M or N floats, shared by the batch) and ``R`` are read only when the
  spec has them (they may be null otherwise); ``params`` holds the activation's parameters
  (``EPILOGUE_PARAMS``). ``workspace`` is ``GemmBlocking.workspace_floats`` floats, private to
  the calling thread.
* ``<pack_b>(K, N, B, ldb, packed, tid, n_threads)``: packs B (K x N) for the pre-packed kernel.

Threads: ``tid`` in [0, n_threads) computes a disjoint part of C, so n_threads callers (e.g.
Python threads through ctypes, which releases the GIL) compute all of C with no lock. With
batch >= n_threads the batch items are dealt out round-robin; otherwise the threads sharing a
batch item split its C into bands of MR rows or NR columns: along M when B is pre-packed or
M >= N (each thread then packs all of B itself; splitting along N would make each pack all of
A), else along N, falling back to the other dimension when one has fewer bands than threads.
``pack_b`` splits its column panels the same way. The ``Sgemm`` wrapper runs its threads from a
``WorkerPool`` whose workers wait for jobs in generated spin-then-sleep code; the compiled
graphs' runtime (backends/llvm/runtime.py) runs its entry function on the same machinery.

Invariants the caller keeps (the ``Sgemm`` wrapper checks them): C does not overlap A, B or R;
every row stride is >= the row length; the workspace is not shared between concurrent calls.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from graphc.errors import InvalidAttributeError, ShapeError
from graphc.ops.epilogue import ACTIVATIONS

from .target import CompiledModule, host_target

VEC = 16                      # floats per <16 x float> (one AVX-512 register)
F32 = ir.FloatType()
I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VF = ir.VectorType(F32, VEC)
VI32 = ir.VectorType(I32, VEC)
VI64 = ir.VectorType(I64, VEC)
VMASK = ir.VectorType(I1, VEC)
PF = F32.as_pointer()
PVF = VF.as_pointer()
VOID = ir.VoidType()

# activation name -> names of its run-time parameters in ``params`` (graphc/ops/epilogue.py order)
EPILOGUE_PARAMS = {name: (*act.attrs, *act.inputs) for name, act in ACTIVATIONS.items()}
BIAS_KINDS = ("", "row", "col")
# below this many flops the wrapper runs one thread: waking a pool thread costs about 50 us here,
# which is what a 2-core split of a ~2^24-flop GEMM saves
PARALLEL_MIN_FLOPS = 1 << 21
# independent FMA accumulators the k loop keeps at least (latency 4 x 2 FMA ports): a tile with
# fewer vectors than this rotates over several accumulator sets
FMA_CHAINS = 8
# those tiles are bound by streaming B from L3 (M = 1: a GEMV): prefetch this many floats ahead
PREFETCH_B = 1024
TWO_PHASE_MIN_B = 1 << 18    # floats of B: below this, packing B twice costs less than a join


# -- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmBlocking:
    """Register tile (mr x nr) and cache blocks (mc x kc of A in L2, kc x nr of B in L1, kc x nc
    of B shared by a thread's row blocks); ``unroll`` is the micro-kernel's k unroll."""

    mr: int = 8
    nr: int = 32
    kc: int = 512
    mc: int = 128
    nc: int = 1024
    unroll: int = 4
    prefetch_rows: int = 8     # packing prefetches the source row this far ahead (0: none)

    def __post_init__(self):
        checks = (
            (self.nr % VEC == 0 and self.nr > 0, f"nr={self.nr} must be a multiple of {VEC}"),
            (0 < self.mr and self.mr * self.nr // VEC <= 28,
             f"an mr x nr = {self.mr} x {self.nr} tile needs more than 28 vector registers"),
            (self.mc % self.mr == 0 and self.mc > 0, f"mc={self.mc} must be a multiple of mr"),
            (self.nc % self.nr == 0 and self.nc > 0, f"nc={self.nc} must be a multiple of nr"),
            (self.kc > 0 and self.unroll > 0, "kc and unroll must be positive"),
        )
        for ok, message in checks:
            if not ok:
                raise InvalidAttributeError(f"GemmBlocking: {message}")

    @property
    def nv(self) -> int:
        return self.nr // VEC

    @property
    def workspace_floats(self) -> int:
        """Per-thread scratch: the packed A block, then the packed B block (64-byte aligned)."""
        return self.a_block_floats + self.kc * self.nc

    @property
    def a_stride(self) -> int:
        """Floats between rows of a packed A panel: kc + 16, so that the MR rows the
        micro-kernel reads together do not share L1 sets when kc is a multiple of 1024."""
        return self.kc + 16

    @property
    def a_block_floats(self) -> int:
        return self.mc * self.a_stride

    def packed_b_floats(self, k: int, n: int) -> int:
        return k * -(-n // self.nr) * self.nr

    @property
    def tag(self) -> str:
        return (f"{self.mr}x{self.nr}_k{self.kc}_m{self.mc}_n{self.nc}_u{self.unroll}"
                f"_p{self.prefetch_rows}")


@dataclass(frozen=True)
class EpilogueSpec:
    """What the generated kernel fuses (compile-time): ``activation(acc + bias + residual)``."""

    prepacked_b: bool = False
    bias: str = ""                # "", "row" (M floats) or "col" (N floats)
    residual: bool = False
    activation: str = ""          # "" or a name of graphc.ops.epilogue.ACTIVATIONS
    trans_a: bool = False         # A is stored transposed, [K, M] with row stride lda
    trans_b: bool = False         # B is stored transposed, [N, K] with row stride ldb

    def __post_init__(self):
        if self.bias not in BIAS_KINDS:
            raise InvalidAttributeError(f"bias kind '{self.bias}' is not one of {BIAS_KINDS}")
        if self.activation and self.activation not in ACTIVATIONS:
            raise InvalidAttributeError(
                f"activation '{self.activation}' is not one of {', '.join(ACTIVATIONS)}")
        if self.prepacked_b and self.trans_b:
            raise InvalidAttributeError("a pre-packed B has no stored layout to transpose")

    @property
    def tag(self) -> str:
        parts = ["pp" if self.prepacked_b else "",
                 f"b{self.bias}" if self.bias else "",
                 "res" if self.residual else "",
                 self.activation,
                 "ta" if self.trans_a else "",
                 "tb" if self.trans_b else ""]
        return "_".join(p for p in parts if p) or "plain"


# -- IR building helpers -------------------------------------------------------------------------
def _i64(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def _vconst(value: float) -> ir.Constant:
    return ir.Constant(VF, [float(np.float32(value))] * VEC)


def _intrinsic(module: ir.Module, name: str, ret, args) -> ir.Function:
    existing = module.globals.get(name)
    return existing if existing is not None else ir.Function(module, ir.FunctionType(ret, args),
                                                             name)


class _Emitter:
    """An IRBuilder plus the vector, memory and loop idioms the kernels are written in."""

    def __init__(self, module: ir.Module, function: ir.Function):
        self.module = module
        self.b = ir.IRBuilder(function.append_basic_block("entry"))

    # arithmetic on i64 indices (nsw: indices never wrap, which lets LLVM strength-reduce)
    def add(self, x, y, name=""):
        return self.b.add(x, y, name=name, flags=["nsw"])

    def mul(self, x, y, name=""):
        return self.b.mul(x, y, name=name, flags=["nsw"])

    def min(self, x, y, name=""):
        return self.b.select(self.b.icmp_signed("<", x, y), x, y, name=name)

    def max(self, x, y, name=""):
        return self.b.select(self.b.icmp_signed(">", x, y), x, y, name=name)

    def ceil_div(self, x, d: int):
        return self.b.sdiv(self.add(x, _i64(d - 1)), _i64(d))

    def gep(self, ptr, index, name=""):
        return self.b.gep(ptr, [index], inbounds=True, name=name)

    # vectors
    def splat(self, scalar, vtype=VF):
        one = self.b.insert_element(ir.Constant(vtype, None), scalar, ir.Constant(I32, 0))
        return self.b.shuffle_vector(one, ir.Constant(vtype, None),
                                     ir.Constant(VI32, [0] * VEC))

    def load_vector(self, ptr):
        return self.b.load(self.b.bitcast(ptr, PVF), align=4)

    def store_vector(self, value, ptr):
        self.b.store(value, self.b.bitcast(ptr, PVF), align=4)

    def lane_mask(self, count, first_lane: int):
        """Lanes first_lane + i < count (i = 0..15): the valid columns of a partial vector."""
        lanes = ir.Constant(VI64, [first_lane + i for i in range(VEC)])
        return self.b.icmp_signed("<", lanes, self.splat(count, VI64))

    def masked_load(self, ptr, mask):
        # the i32-alignment form: accepted by every LLVM that llvmlite has shipped
        fn = _intrinsic(self.module, "llvm.masked.load.v16f32.p0", VF, [PVF, I32, VMASK, VF])
        return self.b.call(fn, [self.b.bitcast(ptr, PVF), ir.Constant(I32, 4), mask,
                                ir.Constant(VF, [0.0] * VEC)])

    def masked_store(self, value, ptr, mask):
        fn = _intrinsic(self.module, "llvm.masked.store.v16f32.p0", VOID, [VF, PVF, I32, VMASK])
        self.b.call(fn, [value, self.b.bitcast(ptr, PVF), ir.Constant(I32, 4), mask])

    def prefetch(self, ptr, write: bool):
        """llvm.prefetch into L1 (never faults, so addresses past the end are harmless)."""
        fn = _intrinsic(self.module, "llvm.prefetch.p0", VOID, [PF, I32, I32, I32])
        self.b.call(fn, [ptr, ir.Constant(I32, int(write)), ir.Constant(I32, 3),
                         ir.Constant(I32, 1)])

    def fma(self, x, y, z):
        fn = _intrinsic(self.module, "llvm.fma.v16f32", VF, [VF, VF, VF])
        return self.b.call(fn, [x, y, z])

    def vcall(self, name, *args):
        fn = _intrinsic(self.module, f"llvm.{name}.v16f32", VF, [VF] * len(args))
        return self.b.call(fn, list(args))

    # loops
    @contextmanager
    def loop(self, start, stop, step, name: str, at_least_once: bool = False):
        """``for i in range(start, stop, step)``; ``at_least_once`` makes it a do-while."""
        b = self.b
        pre = b.block
        head = b.append_basic_block(f"{name}.head")
        body = b.append_basic_block(f"{name}.body")
        done = b.append_basic_block(f"{name}.done")
        b.branch(body if at_least_once else head)
        b.position_at_end(head)
        i = b.phi(I64, name=name)
        b.cbranch(b.icmp_signed("<", i, stop), body, done)
        b.position_at_end(body)
        index = b.phi(I64, name=f"{name}.i")
        index.add_incoming(i, head)
        if at_least_once:
            index.add_incoming(start, pre)
        else:
            i.add_incoming(start, pre)
        yield index
        i.add_incoming(self.add(index, step, name=f"{name}.next"), b.block)
        b.branch(head)
        b.position_at_end(done)


def _define(module: ir.Module, name: str, ret, args: Sequence[tuple[str, ir.Type]],
            internal: bool = True) -> ir.Function:
    fn = ir.Function(module, ir.FunctionType(ret, [t for _, t in args]), name)
    for arg, (arg_name, _) in zip(fn.args, args):
        arg.name = arg_name
        if isinstance(arg.type, ir.PointerType):
            arg.add_attribute("noalias")
    if internal:
        fn.linkage = "internal"
    fn.attributes.add("nounwind")
    return fn


# -- vector math for the epilogue ----------------------------------------------------------------
class VectorMath:
    """<16 x float> elementwise functions in straight-line IR (no libm calls).

    Maximum and minimum are written as compare + select so that a NaN operand propagates, as
    numpy's ``maximum``/``minimum`` do (``llvm.maxnum`` would drop it). ``exp``/``expm1`` are
    only needed for arguments <= 0 here (sigmoid, tanh, elu, selu, softplus all rewrite to that
    range), which keeps the 2^n scaling free of overflow; their polynomial is the degree-7 Taylor
    series of expm1 on |r| <= ln2/2 (truncation error < 2e-8 relative).
    """

    LN2_HI = 0.693145751953125          # ln 2 split so that n * LN2_HI is exact for |n| < 2^11
    LN2_LO = 1.428606765330187045e-06
    LOG2E = 1.4426950408889634

    def __init__(self, em: _Emitter):
        self.em = em
        self.b = em.b

    def max(self, x, y):
        return self.b.select(self.b.fcmp_ordered("<", x, y), y, x)

    def min(self, x, y):
        return self.b.select(self.b.fcmp_ordered(">", x, y), y, x)

    def abs(self, x):
        return self.em.vcall("fabs", x)

    def _reduce(self, x):
        """x = n ln2 + r, |r| <= ln2/2: returns (n as <16 x i32>, r, expm1(r))."""
        b, em = self.b, self.em
        n = em.vcall("roundeven", b.fmul(x, _vconst(self.LOG2E)))
        n = b.select(b.fcmp_unordered("uno", n, n), _vconst(0.0), n)  # no fptosi of NaN
        r = em.fma(b.fneg(n), _vconst(self.LN2_HI), x)
        r = em.fma(b.fneg(n), _vconst(self.LN2_LO), r)
        poly = _vconst(1 / 5040)
        for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2):
            poly = em.fma(poly, r, _vconst(c))
        q = em.fma(b.fmul(r, r), poly, r)
        return b.fptosi(n, VI32), r, q

    def _pow2(self, n):
        """2^n for n in [-126, 127] as floats, by building the exponent field."""
        b = self.b
        biased = b.add(n, ir.Constant(VI32, [127] * VEC))
        return b.bitcast(b.shl(biased, ir.Constant(VI32, [23] * VEC)), VF)

    def exp_nonpositive(self, x):
        """exp(x) for x <= 0 (down to the float32 subnormals; exp(-104) rounds to 0)."""
        b = self.b
        x = self.max(x, _vconst(-104.0))
        n, _, q = self._reduce(x)
        half = b.ashr(n, ir.Constant(VI32, [1] * VEC))  # 2^n = 2^half * 2^(n-half): no underflow
        scaled = b.fmul(b.fadd(q, _vconst(1.0)), self._pow2(half))
        return b.fmul(scaled, self._pow2(b.sub(n, half)))

    def expm1_nonpositive(self, x):
        """exp(x) - 1 for x <= 0, accurate near 0: 2^n expm1(r) + (2^n - 1)."""
        b = self.b
        x = self.max(x, _vconst(-88.0))  # expm1(-88) == -1 in float32
        n, _, q = self._reduce(x)
        scale = self._pow2(n)
        return b.fadd(b.fmul(scale, q), b.fsub(scale, _vconst(1.0)))

    def log1p_unit(self, u):
        """log(1 + u) for u in [0, 1], from atanh: log1p(u) = 2 atanh(u / (2 + u)) and, for
        u > sqrt 2 - 1, ln 2 + 2 atanh((u - 1) / (u + 3)); |s| <= 0.172 in both."""
        b, em = self.b, self.em
        big = b.fcmp_ordered(">", u, _vconst(0.41421356))
        s_small = b.fdiv(u, b.fadd(u, _vconst(2.0)))
        s_big = b.fdiv(b.fsub(u, _vconst(1.0)), b.fadd(u, _vconst(3.0)))
        s = b.select(big, s_big, s_small)
        s2 = b.fmul(s, s)
        poly = _vconst(1 / 9)
        for c in (1 / 7, 1 / 5, 1 / 3, 1.0):
            poly = em.fma(poly, s2, _vconst(c))
        atanh2 = b.fmul(b.fmul(s, _vconst(2.0)), poly)
        return b.fadd(b.select(big, _vconst(0.6931471805599453), _vconst(0.0)), atanh2)

    # activations, one per graphc.ops.epilogue.ACTIVATIONS entry, matching the numpy references
    def relu(self, x):
        return self.max(x, _vconst(0.0))

    def leaky_relu(self, x, alpha):
        b = self.b
        return b.select(b.fcmp_ordered(">=", x, _vconst(0.0)), x, b.fmul(x, alpha))

    def clip(self, x, lo, hi):
        return self.min(self.max(x, lo), hi)

    def sigmoid(self, x):
        """1 / (1 + e), e = exp(-|x|); e / (1 + e) for x < 0: no overflow for any x."""
        b = self.b
        e = self.exp_nonpositive(b.fneg(self.abs(x)))
        r = b.fdiv(_vconst(1.0), b.fadd(_vconst(1.0), e))
        return b.select(b.fcmp_ordered(">=", x, _vconst(0.0)), r, b.fmul(e, r))

    def tanh(self, x):
        """sign(x) * -t / (t + 2), t = expm1(-2|x|): no cancellation near 0, -> 1 for large |x|."""
        b = self.b
        t = self.expm1_nonpositive(b.fmul(self.abs(x), _vconst(-2.0)))
        y = b.fdiv(b.fneg(t), b.fadd(t, _vconst(2.0)))
        fn = _intrinsic(self.em.module, "llvm.copysign.v16f32", VF, [VF, VF])
        return b.call(fn, [y, x])

    def elu(self, x, alpha):
        b = self.b
        neg = b.fmul(self.expm1_nonpositive(self.min(x, _vconst(0.0))), alpha)
        return b.select(b.fcmp_ordered(">=", x, _vconst(0.0)), x, neg)

    def selu(self, x, alpha, gamma):
        b = self.b
        neg = b.fmul(self.expm1_nonpositive(self.min(x, _vconst(0.0))), alpha)
        return b.fmul(b.select(b.fcmp_ordered(">", x, _vconst(0.0)), x, neg), gamma)

    def hard_sigmoid(self, x, alpha, beta):
        b = self.b
        return self.min(self.max(b.fadd(b.fmul(x, alpha), beta), _vconst(0.0)), _vconst(1.0))

    def hard_swish(self, x):
        b = self.b
        gate = b.fadd(b.fmul(x, _vconst(1 / 6)), _vconst(0.5))
        return b.fmul(x, self.min(self.max(gate, _vconst(0.0)), _vconst(1.0)))

    def softplus(self, x):
        """max(x, 0) + log1p(exp(-|x|)), which cannot overflow."""
        b = self.b
        e = self.exp_nonpositive(b.fneg(self.abs(x)))
        return b.fadd(self.max(x, _vconst(0.0)), self.log1p_unit(e))

    def activation(self, name: str, x, params: Sequence):
        """``name`` applied to vector ``x``; ``params`` are splatted vectors in
        ``EPILOGUE_PARAMS[name]`` order."""
        if not name:
            return x
        return getattr(self, name)(x, *params)


# -- the kernel generator ------------------------------------------------------------------------
class _SgemmGenerator:
    """Builds one module: the internal packing, micro- and macro-kernels and one exported entry."""

    def __init__(self, blocking: GemmBlocking, spec: EpilogueSpec, module: ir.Module,
                 prefix: str):
        self.k = blocking
        self.spec = spec
        self.module = module
        self.prefix = prefix

    def _fn(self, suffix, args, internal=True):
        fn = _define(self.module, f"{self.prefix}.{suffix}" if internal else self.prefix, VOID,
                     args, internal)
        return fn, _Emitter(self.module, fn)

    # packing
    def pack_a(self) -> ir.Function:
        """A[mc, kc] (row stride lda) -> rows ``a_stride`` apart, so that the MR-row
        micro-panel p starts at p * MR * a_stride: a copy of each row, no transpose (the
        micro-kernel broadcasts A[r, k] from row r). An edge panel's missing rows are never
        read: its tile has only as many rows as the panel."""
        stride = self.k.a_stride
        fn, em = self._fn("pack_a", [("mc", I64), ("kc", I64), ("a", PF), ("lda", I64),
                                      ("ap", PF)])
        mc, kc, a, lda, ap = fn.args
        with em.loop(_i64(0), mc, _i64(1), "i") as i:
            dst = em.gep(ap, em.mul(i, _i64(stride)))
            src = em.gep(a, em.mul(i, lda))
            # rows are lda apart: fetch a row a few rows ahead while this one is copied
            ahead = em.b.gep(src, [em.mul(lda, _i64(self.k.prefetch_rows))])
            with em.loop(_i64(0), kc, _i64(VEC), "k") as k:
                mask = em.lane_mask(em.b.sub(kc, k), 0)
                if self.k.prefetch_rows:
                    em.prefetch(em.b.gep(ahead, [k]), write=False)
                em.masked_store(em.masked_load(em.gep(src, k), mask), em.gep(dst, k), mask)
        em.b.ret_void()
        return fn

    def pack_b(self) -> ir.Function:
        """B[kc, nc] (row stride ldb) -> NR-wide micro-panels; columns past nc become zeros."""
        nr, nv = self.k.nr, self.k.nv
        fn, em = self._fn("pack_b", [("kc", I64), ("nc", I64), ("bm", PF), ("ldb", I64),
                                      ("bp", PF)])
        kc, nc, bm, ldb, bp = fn.args
        b = em.b
        with em.loop(_i64(0), nc, _i64(nr), "j0") as j0:
            cols = b.sub(nc, j0, name="cols")
            masks = [em.lane_mask(cols, v * VEC) for v in range(nv)]
            panel = em.gep(bp, em.mul(j0, kc), name="panel")
            src0 = em.gep(bm, j0)
            with em.loop(_i64(0), kc, _i64(1), "k") as k:
                src = em.gep(src0, em.mul(k, ldb))
                dst = em.gep(panel, em.mul(k, _i64(nr)))
                # rows are ldb apart: fetch a few rows ahead, the hardware misses the stride
                ahead = b.gep(src, [em.mul(ldb, _i64(self.k.prefetch_rows))])
                for line in range(-(-nr * 4 // 64) if self.k.prefetch_rows else 0):
                    em.prefetch(b.gep(ahead, [_i64(16 * line)]), write=False)
                for v in range(nv):
                    value = em.masked_load(em.gep(src, _i64(v * VEC)), masks[v])
                    em.store_vector(value, em.gep(dst, _i64(v * VEC)))
        b.ret_void()
        return fn

    def pack_a_transposed(self) -> ir.Function:
        """The ``pack_a`` layout from a transposed A (At[kc, mc], row stride lda): row k of At
        is read contiguously and scattered down column k of the packed rows."""
        stride = self.k.a_stride
        fn, em = self._fn("pack_a_t", [("mc", I64), ("kc", I64), ("at", PF), ("lda", I64),
                                        ("ap", PF)])
        mc, kc, at, lda, ap = fn.args
        b = em.b
        with em.loop(_i64(0), kc, _i64(1), "k") as k:
            src = em.gep(at, em.mul(k, lda))
            dst = em.gep(ap, k)
            with em.loop(_i64(0), mc, _i64(1), "i") as i:
                value = b.load(em.gep(src, i), align=4)
                b.store(value, em.gep(dst, em.mul(i, _i64(stride))), align=4)
        b.ret_void()
        return fn

    def pack_b_transposed(self) -> ir.Function:
        """The ``pack_b`` layout from a transposed B (Bt[nc, kc], row stride ldb): each column
        of a micro-panel is a contiguous row of Bt; columns past nc become zeros."""
        nr = self.k.nr
        fn, em = self._fn("pack_b_t", [("kc", I64), ("nc", I64), ("bt", PF), ("ldb", I64),
                                        ("bp", PF)])
        kc, nc, bt, ldb, bp = fn.args
        b = em.b
        with em.loop(_i64(0), nc, _i64(nr), "j0") as j0:
            panel = em.gep(bp, em.mul(j0, kc), name="panel")
            with em.loop(_i64(0), _i64(nr), _i64(1), "c") as c:
                inside = b.icmp_signed("<", em.add(j0, c), nc)
                # a column past nc reads row 0 (valid memory) and stores zero
                src = em.gep(bt, b.select(inside, em.mul(em.add(j0, c), ldb), _i64(0)))
                dst = em.gep(panel, c)
                with em.loop(_i64(0), kc, _i64(1), "k") as k:
                    value = b.select(inside, b.load(em.gep(src, k), align=4),
                                     ir.Constant(F32, 0.0))
                    b.store(value, em.gep(dst, em.mul(k, _i64(nr))), align=4)
        b.ret_void()
        return fn

    # the micro-kernel
    def tile(self, rows: int) -> ir.Function:
        """One rows x NR tile (rows <= MR, a compile-time count, so an edge tile spends no
        FMAs on rows past M): kc rank-1 updates into registers, then the write-back."""
        fn, em = self._fn(f"tile{rows}", [
            ("kc", I64), ("ap", PF), ("bp", PF), ("c", PF), ("ldc", I64), ("nr", I64),
            ("first", I1), ("last", I1), ("bias", PF), ("res", PF), ("ldr", I64),
            ("params", PF)])
        kc, ap, bp, c, ldc, nr, first, last, bias, res, ldr, params = fn.args
        self._prefetch_c(em, c, ldc, rows)
        acc = self._k_loop(em, kc, ap, bp, rows)
        b = em.b
        plain = b.append_basic_block("writeback.partial_sum")
        final = b.append_basic_block("writeback.epilogue")
        b.cbranch(last, final, plain)
        b.position_at_end(plain)
        self._write_back(em, acc, c, ldc, nr, first, None)
        b.ret_void()
        b.position_at_end(final)
        self._write_back(em, acc, c, ldc, nr, first, (bias, res, ldr, params))
        b.ret_void()
        return fn

    def _prefetch_c(self, em: _Emitter, c, ldc, rows: int):
        """Start fetching the C tile (for writing) before the k loop, so that the write-back
        does not wait on it; prefetches never fault, so columns past the edge are harmless."""
        lines = -(-self.k.nr * 4 // 64)
        for r in range(rows):
            row = em.b.gep(c, [em.b.mul(_i64(r), ldc)])
            for line in range(lines):
                em.prefetch(em.b.gep(row, [_i64(line * 16)]), write=True)

    def _k_loop(self, em: _Emitter, kc, ap, bp, rows: int):
        """acc[r][v] = sum_k A[r, k] * B[k, 16v:16v+16] as rows*NV vector phis; unrolled.

        A tile of few rows (M = 1..3: a GEMV) has too few accumulators to hide the FMA latency
        (each k step would wait on the previous one), so its unrolled steps rotate over
        ``chains`` independent accumulator sets that are summed once after the loop."""
        nv, unroll = self.k.nv, self.k.unroll
        b = em.b
        zero = _vconst(0.0)
        chains = max(1, min(unroll, FMA_CHAINS // (rows * nv)))
        acc = [[[zero] * nv for _ in range(rows)] for _ in range(chains)]
        main_end = b.mul(b.sdiv(kc, _i64(unroll)), _i64(unroll), name="k_main_end")
        acc = self._k_loop_part(em, "kmain", _i64(0), main_end, unroll, acc, ap, bp)
        acc[:1] = self._k_loop_part(em, "krem", main_end, kc, 1, acc[:1], ap, bp)
        total = acc[0]
        for chain in acc[1:]:
            total = [[b.fadd(x, y) for x, y in zip(row, other)]
                     for row, other in zip(total, chain)]
        return total

    def _k_loop_part(self, em, name, start, stop, unroll, acc, ap, bp):
        """``acc[chain][r][v]``: step u of each unrolled iteration updates chain u % chains."""
        chains, mr, nv, nr = len(acc), len(acc[0]), self.k.nv, self.k.nr
        b = em.b
        pre = b.block
        head = b.append_basic_block(f"{name}.head")
        body = b.append_basic_block(f"{name}.body")
        done = b.append_basic_block(f"{name}.done")
        b.branch(head)
        b.position_at_end(head)
        k = b.phi(I64, name=f"{name}.k")
        k.add_incoming(start, pre)
        phis = [[[b.phi(VF, name=f"acc{c}_{r}_{v}") for v in range(nv)] for r in range(mr)]
                for c in range(chains)]
        for c in range(chains):
            for r in range(mr):
                for v in range(nv):
                    phis[c][r][v].add_incoming(acc[c][r][v], pre)
        b.cbranch(b.icmp_signed("<", k, stop), body, done)
        b.position_at_end(body)
        cur = [[row[:] for row in chain] for chain in phis]
        for u in range(unroll):
            chain = cur[u % chains]
            step = em.add(k, _i64(u)) if u else k
            brow = em.gep(bp, em.mul(step, _i64(nr)))
            bvec = [em.load_vector(em.gep(brow, _i64(v * VEC))) for v in range(nv)]
            if PREFETCH_B and chains > 1:
                for line in range(-(-nr * 4 // 64)):
                    em.prefetch(em.gep(brow, _i64(PREFETCH_B + 16 * line)), write=False)
            acol = em.gep(ap, step)
            for r in range(mr):
                a = em.splat(b.load(em.gep(acol, _i64(r * self.k.a_stride)), align=4))
                for v in range(nv):
                    chain[r][v] = em.fma(a, bvec[v], chain[r][v])
        k.add_incoming(em.add(k, _i64(unroll)), b.block)
        for c in range(chains):
            for r in range(mr):
                for v in range(nv):
                    phis[c][r][v].add_incoming(cur[c][r][v], b.block)
        b.branch(head)
        b.position_at_end(done)
        return phis

    def _write_back(self, em: _Emitter, acc, c, ldc, nr, first, epilogue):
        """Each row of the tile: y = acc (+ C unless first); on the last K block also
        + bias + residual and the activation; one masked store per vector."""
        b = em.b
        spec = self.spec
        masks = [em.lane_mask(nr, v * VEC) for v in range(self.k.nv)]
        # the first K block must not read C (it may hold anything): an all-false mask reads
        # nothing and yields zeros, with no branch
        later = em.splat(b.not_(first), VMASK)
        read_masks = [b.and_(mask, later) for mask in masks]
        col_bias = act_params = None
        if epilogue is not None:
            bias, _, _, params = epilogue
            if spec.bias == "col":
                col_bias = [em.masked_load(em.gep(bias, _i64(v * VEC)), masks[v])
                            for v in range(self.k.nv)]
            act_params = [em.splat(b.load(em.gep(params, _i64(i)), align=4))
                          for i in range(len(EPILOGUE_PARAMS.get(spec.activation, ())))]
        for r, row in enumerate(acc):
            crow = em.gep(c, em.mul(_i64(r), ldc))
            for v, mask in enumerate(masks):
                ptr = em.gep(crow, _i64(v * VEC))
                y = b.fadd(row[v], em.masked_load(ptr, read_masks[v]))
                if epilogue is not None:
                    y = self._epilogue(em, y, r, v, mask, epilogue, col_bias, act_params)
                em.masked_store(y, ptr, mask)

    def _epilogue(self, em, y, r, v, mask, epilogue, col_bias, act_params):
        b = em.b
        bias, res, ldr, _ = epilogue
        if self.spec.bias == "row":
            y = b.fadd(y, em.splat(b.load(em.gep(bias, _i64(r)), align=4)))
        elif self.spec.bias == "col":
            y = b.fadd(y, col_bias[v])
        if self.spec.residual:
            rptr = em.gep(res, em.add(em.mul(_i64(r), ldr), _i64(v * VEC)))
            y = b.fadd(y, em.masked_load(rptr, mask))
        return VectorMath(em).activation(self.spec.activation, y, act_params)

    # the blocked loops; bias and residual pointers may be null when the spec lacks them,
    # so they are only offset (an inbounds GEP) when they are used
    def _bias_at(self, em: _Emitter, bias, row, col):
        if not self.spec.bias:
            return bias
        return em.gep(bias, row if self.spec.bias == "row" else col)

    def _residual_at(self, em: _Emitter, res, ldr, row, col):
        return em.gep(res, em.add(em.mul(row, ldr), col)) if self.spec.residual else res

    def macro(self, tiles: Sequence[ir.Function]) -> ir.Function:
        """All tiles of one packed (mc x kc) A block times one packed (kc x nc) B block;
        ``tiles[r - 1]`` computes an r-row tile."""
        k = self.k
        fn, em = self._fn("macro", [
            ("mc", I64), ("nc", I64), ("kc", I64), ("ap", PF), ("bp", PF), ("c", PF),
            ("ldc", I64), ("first", I1), ("last", I1), ("bias", PF), ("res", PF),
            ("ldr", I64), ("params", PF)])
        mc, nc, kc, ap, bp, c, ldc, first, last, bias, res, ldr, params = fn.args
        b = em.b
        with em.loop(_i64(0), nc, _i64(k.nr), "jr") as jr:
            nr = em.min(_i64(k.nr), b.sub(nc, jr), name="nr")
            bpanel = em.gep(bp, em.mul(jr, kc))
            with em.loop(_i64(0), mc, _i64(k.mr), "ir") as ir_:
                mr = em.min(_i64(k.mr), b.sub(mc, ir_), name="mr")
                args = [kc, em.gep(ap, em.mul(ir_, _i64(k.a_stride))), bpanel,
                        em.gep(c, em.add(em.mul(ir_, ldc), jr)), ldc, nr, first, last,
                        self._bias_at(em, bias, ir_, jr),
                        self._residual_at(em, res, ldr, ir_, jr), ldr, params]
                self._call_tile(em, tiles, mr, args)
        b.ret_void()
        return fn

    @staticmethod
    def _call_tile(em: _Emitter, tiles, mr, args) -> None:
        """switch (mr): the full tile is the default case, edge tiles the others."""
        b = em.b
        done = b.append_basic_block("tile.done")
        cases = []
        for rows, tile in enumerate(tiles, start=1):
            block = b.append_basic_block(f"tile{rows}.call")
            cases.append((rows, block))
            with b.goto_block(block):
                b.call(tile, args)
                b.branch(done)
        switch = b.switch(mr, cases[-1][1])
        for rows, block in cases[:-1]:
            switch.add_case(_i64(rows), block)
        b.position_at_end(done)

    def rect(self, pack_a, pack_b, macro) -> ir.Function:
        """C[m0:m1, n0:n1] of one GEMM (n0 a multiple of NR): the jc / pc / ic block loops."""
        k, spec = self.k, self.spec
        fn, em = self._fn("rect", [
            ("m0", I64), ("m1", I64), ("n0", I64), ("n1", I64), ("n", I64), ("kdim", I64),
            ("a", PF), ("lda", I64), ("bm", PF), ("ldb", I64), ("c", PF), ("ldc", I64),
            ("bias", PF), ("res", PF), ("ldr", I64), ("params", PF), ("ws", PF)])
        m0, m1, n0, n1, n, kdim, a, lda, bm, ldb, c, ldc, bias, res, ldr, params, ws = fn.args
        b = em.b
        ws_a = ws
        ws_b = em.gep(ws, _i64(k.a_block_floats))
        n_pad = em.mul(em.ceil_div(n, k.nr), _i64(k.nr), name="n_pad")
        with em.loop(n0, n1, _i64(k.nc), "jc") as jc:
            nc = em.min(_i64(k.nc), b.sub(n1, jc), name="nc")
            with em.loop(_i64(0), kdim, _i64(k.kc), "pc", at_least_once=True) as pc:
                kc = em.min(_i64(k.kc), b.sub(kdim, pc), name="kc")
                if spec.prepacked_b:
                    bblock = em.gep(bm, em.add(em.mul(pc, n_pad), em.mul(jc, kc)))
                else:
                    b_at = (em.add(em.mul(jc, ldb), pc) if spec.trans_b
                            else em.add(em.mul(pc, ldb), jc))
                    b.call(pack_b, [kc, nc, em.gep(bm, b_at), ldb, ws_b])
                    bblock = ws_b
                first = b.icmp_signed("==", pc, _i64(0), name="first")
                last = b.icmp_signed(">=", em.add(pc, kc), kdim, name="last")
                with em.loop(m0, m1, _i64(k.mc), "ic") as ic:
                    mc = em.min(_i64(k.mc), b.sub(m1, ic), name="mc")
                    a_at = (em.add(em.mul(pc, lda), ic) if spec.trans_a
                            else em.add(em.mul(ic, lda), pc))
                    b.call(pack_a, [mc, kc, em.gep(a, a_at), lda, ws_a])
                    b.call(macro, [mc, nc, kc, ws_a, bblock,
                                   em.gep(c, em.add(em.mul(ic, ldc), jc)), ldc, first, last,
                                   self._bias_at(em, bias, ic, jc),
                                   self._residual_at(em, res, ldr, ic, jc), ldr, params])
        b.ret_void()
        return fn

    def share(self, rect) -> ir.Function:
        """One GEMM split among `count` threads: this thread's band of rows or columns."""
        k, spec = self.k, self.spec
        fn, em = self._fn("share", [
            ("m", I64), ("n", I64), ("kdim", I64), ("a", PF), ("lda", I64), ("bm", PF),
            ("ldb", I64), ("c", PF), ("ldc", I64), ("bias", PF), ("res", PF), ("ldr", I64),
            ("params", PF), ("ws", PF), ("index", I64), ("count", I64)])
        m, n, kdim, a, lda, bm, ldb, c, ldc, bias, res, ldr, params, ws, index, count = fn.args
        b = em.b
        m_bands, n_bands = em.ceil_div(m, k.mr), em.ceil_div(n, k.nr)
        m_ok = b.or_(b.icmp_signed(">=", m_bands, count), b.icmp_signed(">=", m_bands, n_bands))
        n_lacks = b.and_(b.icmp_signed("<", n_bands, count),
                         b.icmp_signed(">", m_bands, n_bands))
        # a pre-packed B costs nothing to share, so split M; else duplicate the smaller packing
        prefer_m = ir.Constant(I1, 1) if spec.prepacked_b else b.icmp_signed(">=", m, n)
        split_m = b.select(prefer_m, m_ok, n_lacks, name="split_m")
        bands = b.select(split_m, m_bands, n_bands)
        width = b.select(split_m, _i64(k.mr), _i64(k.nr))
        first = b.sdiv(em.mul(index, bands), count)
        stop = b.sdiv(em.mul(em.add(index, _i64(1)), bands), count)
        start = em.mul(first, width)
        end_m = em.min(em.mul(stop, width), m)
        end_n = em.min(em.mul(stop, width), n)
        m0 = b.select(split_m, start, _i64(0))
        m1 = b.select(split_m, end_m, m)
        n0 = b.select(split_m, _i64(0), start)
        n1 = b.select(split_m, n, end_n)
        nonempty = b.and_(b.icmp_signed("<", m0, m1), b.icmp_signed("<", n0, n1))
        with b.if_then(nonempty):
            b.call(rect, [m0, m1, n0, n1, n, kdim, a, lda, bm, ldb, c, ldc, bias, res, ldr,
                          params, ws])
        b.ret_void()
        return fn

    def entry(self, share) -> ir.Function:
        """The exported batched entry point (see the module docstring for its ABI)."""
        fn, em = self._fn("entry", [
            ("batch", I64), ("m", I64), ("n", I64), ("kdim", I64),
            ("a", PF), ("lda", I64), ("stride_a", I64),
            ("bm", PF), ("ldb", I64), ("stride_b", I64),
            ("c", PF), ("ldc", I64), ("stride_c", I64),
            ("bias", PF), ("res", PF), ("ldr", I64), ("stride_r", I64),
            ("params", PF), ("ws", PF), ("tid", I64), ("n_threads", I64)], internal=False)
        (batch, m, n, kdim, a, lda, sa, bm, ldb, sb, c, ldc, sc, bias, res, ldr, sr, params,
         ws, tid, n_threads) = fn.args
        b = em.b
        n_threads = em.max(n_threads, _i64(1), name="threads")  # never divide by 0
        many = b.icmp_signed(">=", batch, n_threads, name="items_per_thread")
        # batch >= threads: items tid, tid + T, ...; else item tid % batch, shared by
        # the threads t with t % batch == item (sub-index t // batch)
        divisor = b.select(b.icmp_signed(">", batch, _i64(0)), batch, _i64(1))
        few_item = b.srem(tid, divisor)
        item0 = b.select(many, tid, few_item, name="item0")
        step = b.select(many, n_threads, batch, name="item_step")
        sharers = b.sdiv(em.add(b.sub(b.sub(n_threads, _i64(1)), few_item), divisor), divisor)
        index = b.select(many, _i64(0), b.sdiv(tid, divisor))
        count = b.select(many, _i64(1), sharers, name="sharers")
        active = b.icmp_signed("<", tid, n_threads)
        stop = b.select(active, batch, _i64(0))
        with em.loop(item0, stop, step, "item") as item:
            b.call(share, [m, n, kdim, em.gep(a, em.mul(item, sa)), lda,
                           em.gep(bm, em.mul(item, sb)), ldb, em.gep(c, em.mul(item, sc)), ldc,
                           bias, self._residual_at(em, res, sr, item, _i64(0)), ldr, params,
                           ws, index, count])
        b.ret_void()
        return fn

    def build(self) -> ir.Function:
        pack_a = self.pack_a_transposed() if self.spec.trans_a else self.pack_a()
        pack_b = self.pack_b_transposed() if self.spec.trans_b else self.pack_b()
        tiles = [self.tile(rows) for rows in range(1, self.k.mr + 1)]
        rect = self.rect(pack_a, pack_b, self.macro(tiles))
        return self.entry(self.share(rect))

    def build_pack_entry(self) -> ir.Function:
        """Exported ``(K, N, B, ldb, packed, tid, n_threads)``: B -> the pre-packed layout; the
        threads split the NR-wide column panels."""
        k = self.k
        pack_b = self.pack_b()
        fn, em = self._fn("entry", [("kdim", I64), ("n", I64), ("bm", PF), ("ldb", I64),
                                    ("packed", PF), ("tid", I64), ("n_threads", I64)],
                          internal=False)
        kdim, n, bm, ldb, packed, tid, n_threads = fn.args
        b = em.b
        n_threads = em.max(n_threads, _i64(1), name="threads")  # never divide by 0
        panels = em.ceil_div(n, k.nr)
        n_pad = em.mul(panels, _i64(k.nr))
        j0 = em.mul(b.sdiv(em.mul(tid, panels), n_threads), _i64(k.nr))
        j1 = em.min(em.mul(b.sdiv(em.mul(em.add(tid, _i64(1)), panels), n_threads),
                           _i64(k.nr)), n)
        with b.if_then(b.icmp_signed("<", j0, j1)), \
                em.loop(_i64(0), kdim, _i64(k.kc), "pc") as pc:
            kc = em.min(_i64(k.kc), b.sub(kdim, pc), name="kc")
            src = em.gep(bm, em.add(em.mul(pc, ldb), j0))
            dst = em.gep(packed, em.add(em.mul(pc, n_pad), em.mul(j0, kc)))
            b.call(pack_b, [kc, b.sub(j1, j0), src, ldb, dst])
        b.ret_void()
        return fn


# -- compilation ---------------------------------------------------------------------------------
_I64_T, _PTR_T = ctypes.c_int64, ctypes.c_void_p
KERNEL_ARGTYPES = ((_I64_T,) * 4 + (_PTR_T, _I64_T, _I64_T) * 3
                   + (_PTR_T, _PTR_T, _I64_T, _I64_T, _PTR_T, _PTR_T, _I64_T, _I64_T))
PACK_ARGTYPES = (_I64_T, _I64_T, _PTR_T, _I64_T, _PTR_T, _I64_T, _I64_T)


@dataclass(frozen=True)
class GemmKernel:
    """A JIT'd exported function: its symbol, compiled module and ctypes callable."""

    symbol: str
    blocking: GemmBlocking
    spec: EpilogueSpec | None          # None for the pack_b entry
    module: CompiledModule
    function: object                   # ctypes CFUNCTYPE instance (releases the GIL)

    @property
    def address(self) -> int:
        return self.module.address(self.symbol)

    @property
    def llvm_ir(self) -> str:
        """The optimised LLVM IR that was JIT'd."""
        return self.module.optimised_ir

    @property
    def assembly(self) -> str:
        return self.module.assembly


_KERNELS: dict[tuple, GemmKernel] = {}
_KERNELS_LOCK = threading.Lock()


def kernel_symbol(blocking: GemmBlocking, spec: EpilogueSpec | None) -> str:
    what = "pack_b" if spec is None else spec.tag
    return f"graphc_sgemm_{what}_{blocking.tag}"


def generate_module(blocking: GemmBlocking, spec: EpilogueSpec | None) -> ir.Module:
    """The llvmlite module of one kernel (``spec``) or of the pack_b entry (``spec=None``)."""
    symbol = kernel_symbol(blocking, spec)
    module = ir.Module(name=symbol)
    generator = _SgemmGenerator(blocking, spec or EpilogueSpec(), module, symbol)
    if spec is None:
        generator.build_pack_entry()
    else:
        generator.build()
    return module


def compile_kernel(blocking: GemmBlocking = GemmBlocking(),
                   spec: EpilogueSpec | None = EpilogueSpec()) -> GemmKernel:
    """Generate, optimise and JIT a kernel (``spec=None``: the pack_b entry); cached, so each
    (blocking, spec) is compiled once per process."""
    key = (blocking, spec)
    with _KERNELS_LOCK:
        kernel = _KERNELS.get(key)
        if kernel is None:
            symbol = kernel_symbol(blocking, spec)
            compiled = host_target().compile(generate_module(blocking, spec))
            argtypes = PACK_ARGTYPES if spec is None else KERNEL_ARGTYPES
            function = compiled.ctypes_function(symbol, None, *argtypes)
            kernel = _KERNELS[key] = GemmKernel(symbol, blocking, spec, compiled, function)
    return kernel


# -- the worker pool -----------------------------------------------------------------------------
# Waking a blocked thread costs ~25 us each way here (futex + VM scheduling), as much as the
# whole of a 256^3 GEMM on two cores. So the wrapper's workers wait for jobs in generated native
# code: each spins (GIL released, `pause` between polls, `sched_yield` every YIELD_EVERY polls)
# on a shared generation counter for ``spin_s`` after its last job, then sleeps on that
# counter's futex, still in native code: a new job wakes it with no Python (and no GIL) on the
# wake-up path. The job is a table of int64 words the calling thread fills in before publishing
# the next generation with a seq_cst store; workers read it after a seq_cst load, and count their
# completion with an atomic add that the caller waits for the same way (spin, then futex).
# A sleeper announces itself in a counter next to the word it sleeps on before its last check,
# and a writer wakes the futex only when that counter is non-zero (Dekker: both sides store,
# then load, seq_cst), so a run that finds everyone spinning makes no system call.
# Sleeping rather than spinning matters when other processes crowd the cores: a sleeping waiter
# frees its core, and the kernel moves the thread it waits for there.
# The same pool runs a compiled graph's entry (``KIND_ENTRY``, backends/llvm/runtime.py), whose
# C signature is ``void entry(void* table, i32 tid, i32 n_threads, void* barrier)``. An entry
# shares its work out dynamically (threads claim chunks), so the caller need not wait for a
# worker that has not started: ``close_job`` marks the job closed, and a worker joins a job
# only if, after counting itself in ``JOB_ACTIVE``, it finds the job still open (Dekker again);
# the caller then waits only for the workers that did join.
JOB_GENERATION, JOB_SLEEPERS, JOB_CLOSED = 0, 1, 2  # the job counter, sleeping workers, the
JOB_DONE, JOB_DONE_SLEEPERS = 8, 9                  # last closed job; on another cache line
JOB_ACTIVE, JOB_ACTIVE_SLEEPERS = 10, 11            # (written by every worker): completions and
                                                    # the workers inside a job
JOB_KIND, JOB_FUNCTION, JOB_THREADS, JOB_ARGS = 16, 17, 18, 19
JOB_WORKSPACES = JOB_ARGS + 18           # one workspace pointer per thread id
KIND_EXIT, KIND_KERNEL, KIND_PACK, KIND_ENTRY = -1, 0, 1, 2
YIELD_EVERY = 1024                       # polls between sched_yield calls (a power of 2)
_I32_T = ctypes.c_int32
ENTRY_ARGTYPES = (_PTR_T, _I32_T, _I32_T, _PTR_T)
_IR_OF_CTYPE = {_I64_T: I64, _PTR_T: PF, _I32_T: I32}


def generate_worker_module() -> ir.Module:
    """``graphc_worker_loop(job, tid, spin_ticks, seen) -> -1`` (returns when told to exit),
    ``graphc_wait_count(job, target, spin_ticks) -> done`` (waits until done >= target),
    ``graphc_close_job(job, generation, spin_ticks)``, ``graphc_publish(job, generation)``
    and ``graphc_cycle_counter()``."""
    module = ir.Module(name="graphc_workers")
    p64 = I64.as_pointer()
    _worker_loop(module, p64)
    _wait_count(module, p64)
    _close_job(module, p64)
    _publish(module, p64)
    ticks = _define(module, "graphc_cycle_counter", I64, [], False)
    em = _Emitter(module, ticks)
    em.b.ret(em.b.call(_intrinsic(module, "llvm.readcyclecounter", I64, []), []))
    return module


def _spin_until(em: _Emitter, ready, spin_ticks, name: str):
    """Emit ``while not ready(): pause`` for at most spin_ticks cycles, with a sched_yield every
    YIELD_EVERY polls (the thread this one waits for may need the core); returns (block where
    ready() held, its value; block reached on time-out)."""
    from .target import libc_function

    b, module = em.b, em.module
    clock = _intrinsic(module, "llvm.readcyclecounter", I64, [])
    pause = _intrinsic(module, "llvm.x86.sse2.pause", VOID, [])
    start, before = b.call(clock, []), b.block
    poll = b.append_basic_block(f"{name}.poll")
    wait = b.append_basic_block(f"{name}.wait")
    hit = b.append_basic_block(f"{name}.ready")
    timeout = b.append_basic_block(f"{name}.timeout")
    b.branch(poll)
    b.position_at_end(poll)
    polls = b.phi(I64, name=f"{name}.polls")
    polls.add_incoming(_i64(0), before)
    ok, value = ready()
    b.cbranch(ok, hit, wait)
    b.position_at_end(wait)
    b.call(pause, [])
    polled = b.add(polls, _i64(1))
    with b.if_then(b.icmp_unsigned("==", b.and_(polled, _i64(YIELD_EVERY - 1)), _i64(0))):
        b.call(libc_function(module, "sched_yield"), [])
    polls.add_incoming(polled, b.block)
    late = b.icmp_signed(">", b.sub(b.call(clock, []), start), spin_ticks)
    b.cbranch(late, timeout, poll)
    return hit, value, timeout


def _wait_until(em: _Emitter, ready, word, sleepers, spin_ticks, name: str):
    """Emit a wait until ``ready()`` (which loads ``word``, seq_cst, and returns (ok, the value
    loaded)) holds: spin for spin_ticks cycles, then sleep on ``word``'s futex (its low 32 bits),
    counted in ``sleepers`` so that writers of ``word`` know to wake it. Returns the value that
    satisfied ready(), with the builder after the wait."""
    from .target import emit_futex_wait

    b = em.b
    hit, value, timeout = _spin_until(em, ready, spin_ticks, name)
    check, nap, awake, done = (b.append_basic_block(f"{name}.{part}")
                               for part in ("check", "nap", "awake", "done"))
    b.position_at_end(timeout)
    b.atomic_rmw("add", sleepers, _i64(1), "seq_cst")  # before the last check (see above)
    b.branch(check)
    b.position_at_end(check)
    ok, seen = ready()
    b.cbranch(ok, awake, nap)
    b.position_at_end(nap)
    emit_futex_wait(b, b.bitcast(word, I32.as_pointer()), b.trunc(seen, I32))
    b.branch(check)
    b.position_at_end(awake)
    b.atomic_rmw("sub", sleepers, _i64(1), "seq_cst")
    b.branch(done)
    b.position_at_end(hit)
    b.branch(done)
    b.position_at_end(done)
    result = b.phi(I64, name=f"{name}.value")
    result.add_incoming(value, hit)
    result.add_incoming(seen, awake)
    return result


def _store_and_wake(b: ir.IRBuilder, word, sleepers, store) -> None:
    """``store()`` (a seq_cst write of ``word``), then wake ``word``'s sleepers if any."""
    from .target import emit_futex_wake_all

    store()
    with b.if_then(b.icmp_signed("!=", b.load_atomic(sleepers, "seq_cst", 8), _i64(0))):
        emit_futex_wake_all(b, b.bitcast(word, I32.as_pointer()))


def _worker_loop(module: ir.Module, p64) -> None:
    fn = _define(module, "graphc_worker_loop", I64, [("job", p64), ("tid", I64),
                                                     ("spin_ticks", I64), ("seen", I64)], False)
    job, tid, spin_ticks, seen0 = fn.args
    em = _Emitter(module, fn)
    b = em.b
    entry = b.block
    top = b.append_basic_block("wait_for_job")
    b.branch(top)
    b.position_at_end(top)
    seen = b.phi(I64, name="seen")
    seen.add_incoming(seen0, entry)

    def word(index):
        return em.gep(job, index if isinstance(index, ir.Value) else _i64(index))

    def new_generation():
        gen = b.load_atomic(word(JOB_GENERATION), "seq_cst", 8)
        return b.icmp_signed("!=", gen, seen), gen

    gen = _wait_until(em, new_generation, word(JOB_GENERATION), word(JOB_SLEEPERS), spin_ticks,
                      "job")
    b.atomic_rmw("add", word(JOB_ACTIVE), _i64(1), "seq_cst")
    join, leave = b.append_basic_block("join"), b.append_basic_block("leave")
    closed = b.load_atomic(word(JOB_CLOSED), "seq_cst", 8)
    b.cbranch(b.icmp_signed(">=", closed, gen), leave, join)  # the caller has moved on
    b.position_at_end(join)
    kind = b.load(word(JOB_KIND))
    exit_block, dispatch = b.append_basic_block("exit"), b.append_basic_block("dispatch")
    b.cbranch(b.icmp_signed("<", kind, _i64(0)), exit_block, dispatch)
    b.position_at_end(exit_block)
    b.ret(_i64(-1))
    b.position_at_end(dispatch)
    target, n_threads = b.load(word(JOB_FUNCTION)), b.load(word(JOB_THREADS))
    args = [b.load(word(JOB_ARGS + i)) for i in range(18)]
    workspace = b.inttoptr(b.load(word(em.add(tid, _i64(JOB_WORKSPACES)))), PF)
    tid32, threads32 = b.trunc(tid, I32), b.trunc(n_threads, I32)
    calls = {KIND_KERNEL: (KERNEL_ARGTYPES, args, [workspace, tid, n_threads]),
             KIND_PACK: (PACK_ARGTYPES, args[:5], [tid, n_threads]),
             KIND_ENTRY: (ENTRY_ARGTYPES, [args[0], None, None, args[1]], [tid32, threads32])}
    done = b.append_basic_block("job_done")
    switch = b.switch(kind, done)
    for value, (types, words, tail) in calls.items():
        block = b.append_basic_block(f"kind{value}")
        switch.add_case(_i64(value), block)
        with b.goto_block(block):
            _call_by_address(b, target, types, words, tail)
            b.branch(done)
    b.position_at_end(done)
    _store_and_wake(b, word(JOB_DONE), word(JOB_DONE_SLEEPERS),
                    lambda: b.atomic_rmw("add", word(JOB_DONE), _i64(1), "seq_cst"))
    b.branch(leave)
    b.position_at_end(leave)
    _store_and_wake(b, word(JOB_ACTIVE), word(JOB_ACTIVE_SLEEPERS),
                    lambda: b.atomic_rmw("sub", word(JOB_ACTIVE), _i64(1), "seq_cst"))
    seen.add_incoming(gen, b.block)
    b.branch(top)


def _call_by_address(b: ir.IRBuilder, address, ctypes_args, words, tail) -> None:
    """Call the function at ``address`` whose C signature is ``ctypes_args``: the arguments
    come from ``words`` (int64, cast to pointers where needed) where a word is not None, else
    from ``tail`` in order; what is left of ``tail`` follows."""
    types = [_IR_OF_CTYPE[t] for t in ctypes_args]
    tail = list(tail)
    args = [tail.pop(0) if w is None else b.inttoptr(w, t) if isinstance(t, ir.PointerType)
            else w for w, t in zip(words, types)]
    args += tail
    fnty = ir.FunctionType(VOID, types)
    b.call(b.inttoptr(address, fnty.as_pointer()), args)


def _wait_count(module: ir.Module, p64) -> None:
    fn = _define(module, "graphc_wait_count", I64, [("job", p64), ("target", I64),
                                                    ("spin_ticks", I64)], False)
    job, target, spin_ticks = fn.args
    em = _Emitter(module, fn)
    b = em.b
    counter = em.gep(job, _i64(JOB_DONE))

    def reached():
        value = b.load_atomic(counter, "seq_cst", 8)
        return b.icmp_signed(">=", value, target), value

    b.ret(_wait_until(em, reached, counter, em.gep(job, _i64(JOB_DONE_SLEEPERS)), spin_ticks,
                      "count"))


def _close_job(module: ir.Module, p64) -> None:
    """Mark job ``generation`` closed, then wait until no worker is inside it."""
    fn = _define(module, "graphc_close_job", VOID, [("job", p64), ("generation", I64),
                                                    ("spin_ticks", I64)], False)
    job, generation, spin_ticks = fn.args
    em = _Emitter(module, fn)
    b = em.b
    b.store_atomic(generation, em.gep(job, _i64(JOB_CLOSED)), "seq_cst", 8)
    active = em.gep(job, _i64(JOB_ACTIVE))

    def empty():
        value = b.load_atomic(active, "seq_cst", 8)
        return b.icmp_signed("==", value, _i64(0)), value

    _wait_until(em, empty, active, em.gep(job, _i64(JOB_ACTIVE_SLEEPERS)), spin_ticks, "close")
    b.ret_void()


def _publish(module: ir.Module, p64) -> None:
    fn = _define(module, "graphc_publish", VOID, [("job", p64), ("generation", I64)], False)
    job, generation = fn.args
    em = _Emitter(module, fn)
    slot = em.gep(job, _i64(JOB_GENERATION))
    _store_and_wake(em.b, slot, em.gep(job, _i64(JOB_SLEEPERS)),
                    lambda: em.b.store_atomic(generation, slot, "seq_cst", 8))
    em.b.ret_void()


_WORKER_FUNCTIONS: dict[str, object] = {}
_WORKER_LOCK = threading.Lock()


def _worker_functions() -> dict[str, object]:
    """The worker module, JIT'd once per process, and the TSC ticks per second."""
    with _WORKER_LOCK:
        if not _WORKER_FUNCTIONS:
            c = host_target().compile(generate_worker_module())
            i64 = ctypes.c_int64
            fns = {"loop": c.ctypes_function("graphc_worker_loop", i64, _PTR_T, i64, i64, i64),
                   "wait": c.ctypes_function("graphc_wait_count", i64, _PTR_T, i64, i64),
                   "close": c.ctypes_function("graphc_close_job", None, _PTR_T, i64, i64),
                   "publish": c.ctypes_function("graphc_publish", None, _PTR_T, i64),
                   "ticks": c.ctypes_function("graphc_cycle_counter", i64),
                   "module": c}
            fns["ticks_per_s"] = _ticks_per_second(fns["ticks"])
            _WORKER_FUNCTIONS.update(fns)
    return _WORKER_FUNCTIONS


def _ticks_per_second(ticks) -> float:
    t0, c0 = time.perf_counter(), ticks()
    time.sleep(0.002)
    return (ticks() - c0) / (time.perf_counter() - t0)


class WorkerPool:
    """``threads - 1`` Python threads that run kernel, pack or graph-entry jobs for thread ids
    1...; the caller runs thread id 0 itself (see the section comment above). Each thread
    spends its whole life in ``graphc_worker_loop`` (native code, GIL released) and returns to
    Python only when ``close`` tells it to exit.

    ``run`` is ``start`` + the caller's own call + ``finish``; callers that make their own call
    (the graph runtime) use ``start`` and ``finish``. One job at a time: callers serialise."""

    def __init__(self, threads: int, workspaces: Sequence[np.ndarray] = (),
                 spin_s: float = 2e-4, name: str = "graphc-sgemm"):
        self.threads = threads
        self._fns = _worker_functions()
        self._spin = int(spin_s * self._fns["ticks_per_s"])
        self._job = _aligned_empty(2 * (JOB_WORKSPACES + threads)).view(np.int64)
        self._job[:] = 0
        self._job[JOB_WORKSPACES:JOB_WORKSPACES + len(workspaces)] = [
            w.ctypes.data for w in workspaces]
        self._address = self._job.ctypes.data
        self._generation = 0
        self._threads = [threading.Thread(target=self._serve, args=(tid,), daemon=True,
                                          name=f"{name}-{tid}")
                         for tid in range(1, threads)]
        for thread in self._threads:
            thread.start()

    def _serve(self, tid: int) -> None:
        self._fns["loop"](self._address, tid, self._spin, 0)  # returns when told to exit

    def run(self, kind: int, function, address: int, args: Sequence[int], threads: int):
        """Run ``function(*args, [workspace,] tid, threads)`` for tid < threads (tid 0 here);
        workers with tid >= threads take part with nothing to do."""
        self.start(kind, address, args, threads)
        tail = (int(self._job[JOB_WORKSPACES]),) if kind == KIND_KERNEL else ()
        try:
            function(*args, *tail, 0, threads)
        finally:  # never leave workers running on a job the caller has given up on
            self.finish()

    def start(self, kind: int, address: int, args: Sequence[int], threads: int) -> None:
        """Publish a job: workers 1 .. self.threads-1 start on it (spinning ones at once)."""
        job = self._job
        job[JOB_KIND], job[JOB_FUNCTION], job[JOB_THREADS] = kind, address, threads
        job[JOB_ARGS:JOB_ARGS + len(args)] = args
        job[JOB_DONE] = 0
        self._publish()

    def finish(self) -> None:
        """Wait (in native code: spin, then sleep) until every worker has finished the job
        ``start`` published."""
        self._fns["wait"](self._address, self.threads - 1, self._spin)

    def close_job(self) -> None:
        """End the job ``start`` published without waiting for workers that have not joined
        it yet (they will skip it); wait for those inside it. For jobs whose work the
        participants share out themselves (a graph entry), not for per-thread-id jobs."""
        self._fns["close"](self._address, self._generation, self._spin)

    def _publish(self) -> None:
        self._generation += 1
        self._fns["publish"](self._address, self._generation)

    def close(self) -> None:
        if self._threads:
            self._job[JOB_KIND] = KIND_EXIT
            self._publish()
            for thread in self._threads:
                thread.join()
            self._threads = []


# -- the Python wrapper --------------------------------------------------------------------------
def _aligned_empty(floats: int) -> np.ndarray:
    """A float32 array of ``floats`` elements whose data is 64-byte aligned."""
    raw = np.empty(floats + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + floats]


@dataclass(frozen=True)
class PackedB:
    """B packed once for the pre-packed kernels (``Sgemm.pack_b``): for each batch item
    ``k * ceil(n / nr) * nr`` floats in ``data``; ``batch`` is None for a single matrix."""

    data: np.ndarray
    k: int
    n: int
    batch: int | None
    blocking: GemmBlocking

    @property
    def item_floats(self) -> int:
        return self.blocking.packed_b_floats(self.k, self.n)


def _matrix_strides(x: np.ndarray, what: str) -> tuple[np.ndarray, int, int]:
    """(array with unit column stride, row stride, batch stride) in elements; copies only when
    the columns are not contiguous or a stride is negative or unaligned."""
    if x.dtype != np.float32:
        raise ShapeError(f"sgemm: {what} has dtype {x.dtype}, expected float32")
    strides = x.strides
    if (x.shape[-1] > 1 and strides[-1] != 4) or any(s < 0 or s % 4 for s in strides):
        x = np.ascontiguousarray(x)
        strides = x.strides
    row = strides[-2] // 4 if x.shape[-2] > 1 else x.shape[-1]
    batch = strides[0] // 4 if x.ndim == 3 and x.shape[0] > 1 else 0
    return x, row, batch


def _is_transposed_view(x: np.ndarray) -> bool:
    """A 2-D float32 view with unit row stride and column stride >= its rows (``y.T`` of a
    row-major y): the kernel reads it in place with ``trans_a`` / ``trans_b``."""
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.float32:
        return False
    rows, cols = x.shape
    row_step, col_step = x.strides
    return (rows > 1 and cols > 1 and row_step == 4 and col_step % 4 == 0
            and col_step >= 4 * rows)


class Sgemm:
    """Calls the generated SGEMM from Python: ``Sgemm(threads=2)(a, b, bias=..., ...)``.

    Compiled kernels are cached per (blocking, epilogue spec) for the process; each call runs
    ``threads`` workers (the calling thread is worker 0, the others are pool threads),
    each calling the kernel with its thread id and its own workspace (``WorkerPool``); a GEMM of
    fewer than ``min_parallel_flops`` runs on the calling thread alone. When the threads share
    one GEMM (batch < threads) and B is not pre-packed, the threads first pack B together into
    a scratch buffer and then run the pre-packed kernel, so that no thread packs all of B. Calls
    on one ``Sgemm`` are serialised by a lock, because the workspaces are the object's.
    """

    def __init__(self, threads: int = 1, blocking: GemmBlocking | None = None,
                 min_parallel_flops: int = PARALLEL_MIN_FLOPS):
        if not isinstance(threads, int) or threads < 1:
            raise InvalidAttributeError(f"Sgemm: threads must be a positive int, got {threads!r}")
        self.threads = threads
        self.min_parallel_flops = min_parallel_flops
        self.blocking = blocking or GemmBlocking()
        self._workspaces = [_aligned_empty(self.blocking.workspace_floats)
                            for _ in range(threads)]
        self._pool = WorkerPool(threads, self._workspaces) if threads > 1 else None
        if self._pool is not None:
            weakref.finalize(self, self._pool.close)
        self._lock = threading.Lock()
        self._packed_scratch = np.empty(0, np.float32)  # B packed per call (see __call__)
        self._kernels: dict[EpilogueSpec, GemmKernel] = {}

    def kernel(self, spec: EpilogueSpec = EpilogueSpec()) -> GemmKernel:
        kernel = self._kernels.get(spec)
        if kernel is None:
            kernel = self._kernels[spec] = compile_kernel(self.blocking, spec)
        return kernel

    def _run(self, kernel: GemmKernel, args: Sequence[int], threads: int) -> None:
        """Run ``kernel`` for thread ids 0 .. threads-1 (0 on the calling thread)."""
        kind = KIND_PACK if kernel.spec is None else KIND_KERNEL
        if threads > 1:
            self._pool.run(kind, kernel.function, kernel.address, args, threads)
        else:
            tail = (self._workspaces[0].ctypes.data,) if kind == KIND_KERNEL else ()
            kernel.function(*args, *tail, 0, 1)

    def pack_b(self, b: np.ndarray) -> PackedB:
        """Pack B ([K, N] or [batch, K, N]) once, for repeated multiplication by it."""
        if not isinstance(b, np.ndarray) or b.ndim not in (2, 3):
            raise ShapeError(f"sgemm: B must be a 2-D or 3-D array, got "
                             f"{getattr(b, 'shape', type(b).__name__)}")
        b, ldb, stride_b = _matrix_strides(b, "B")
        k, n = b.shape[-2:]
        items = b.shape[0] if b.ndim == 3 else 1
        data = _aligned_empty(max(items * self.blocking.packed_b_floats(k, n), 1))
        with self._lock:
            self._pack_items(b, ldb, stride_b, k, n, items, data)
        return PackedB(data, k, n, items if b.ndim == 3 else None, self.blocking)

    def _pack_items(self, b, ldb, stride_b, k, n, items, data) -> None:
        """Pack ``items`` matrices of B into ``data``, the threads splitting each one."""
        kernel = compile_kernel(self.blocking, None)
        size = self.blocking.packed_b_floats(k, n)
        threads = self.threads if 64 * k * n >= self.min_parallel_flops else 1
        for item in range(items):
            src = b.ctypes.data + 4 * item * stride_b
            self._run(kernel, (k, n, src, ldb, data.ctypes.data + 4 * item * size), threads)

    def _scratch(self, floats: int) -> np.ndarray:
        if self._packed_scratch.size < floats:
            self._packed_scratch = _aligned_empty(floats)
        return self._packed_scratch[:floats]

    def __call__(self, a: np.ndarray, b: np.ndarray | PackedB, out: np.ndarray | None = None,
                 *, bias: np.ndarray | None = None, bias_axis: int = -1,
                 residual: np.ndarray | None = None, activation: str = "",
                 activation_params: Sequence[float] = ()) -> np.ndarray:
        """``activation(a @ b + bias + residual)`` into ``out`` (allocated if None).

        ``a`` is [M, K] or [batch, M, K]; ``b`` is [K, N], [batch, K, N] or a ``PackedB``
        (a 2-D B is shared by every batch item). A 2-D ``a`` or ``b`` that is a transposed
        view (``x.T``) is read in place, transposed by the packing, not copied. ``bias`` is
        1-D along the output's last axis
        (``bias_axis=-1``, N floats) or its row axis (``bias_axis=-2``, M floats);
        ``residual`` has the output's shape. Inputs must be float32."""
        trans_a, trans_b = _is_transposed_view(a), _is_transposed_view(b)
        a, lda, stride_a = (a, a.strides[1] // 4, 0) if trans_a else self._check_a(a)
        batch = a.shape[0] if a.ndim == 3 else None
        m, k = a.shape[-2:]
        if trans_b and b.shape[0] != k:
            raise ShapeError(f"sgemm: A is {k} wide but B has {b.shape[0]} rows")
        b_data, ldb, stride_b, n, prepacked = ((b, b.strides[1] // 4, 0, b.shape[1], False)
                                               if trans_b else self._check_b(b, k, batch))
        out_shape = (m, n) if batch is None else (batch, m, n)
        bias_kind, bias = self._check_bias(bias, bias_axis, m, n)
        out, ldc, stride_c = self._check_out(out, out_shape, a, b_data, bias)
        residual, ldr, stride_r = self._check_residual(residual, out_shape, out)
        params = self._check_params(activation, activation_params)
        items = batch or 1
        flops = 2 * items * m * n * max(k, 1)
        threads = self.threads if flops >= self.min_parallel_flops else 1
        with self._lock:
            if not prepacked and not trans_b and items < threads <= m // self.blocking.mr \
                    and k * n >= TWO_PHASE_MIN_B:
                # threads sharing one GEMM would each pack all of B: pack it once, together
                b_items = b_data.shape[0] if b_data.ndim == 3 else 1
                packed = self._scratch(b_items * self.blocking.packed_b_floats(k, n))
                self._pack_items(b_data, ldb, stride_b, k, n, b_items, packed)
                b_data, ldb, prepacked = packed, 0, True
                stride_b = self.blocking.packed_b_floats(k, n) if b_items > 1 else 0
            spec = EpilogueSpec(prepacked, bias_kind, residual is not None, activation,
                                trans_a, trans_b)
            args = (items, m, n, k, a.ctypes.data, lda, stride_a, b_data.ctypes.data, ldb,
                    stride_b, out.ctypes.data, ldc, stride_c, _pointer(bias),
                    _pointer(residual), ldr, stride_r, params.ctypes.data)
            self._run(self.kernel(spec), args, threads)
        return out

    # argument checks: every user error is a GraphcError naming the operand
    @staticmethod
    def _check_a(a):
        if not isinstance(a, np.ndarray) or a.ndim not in (2, 3):
            raise ShapeError(f"sgemm: A must be a 2-D or 3-D array, got "
                             f"{getattr(a, 'shape', type(a).__name__)}")
        return _matrix_strides(a, "A")

    def _check_b(self, b, k, batch):
        if isinstance(b, PackedB):
            if b.blocking != self.blocking:
                raise ShapeError("sgemm: B was packed for another blocking")
            if b.k != k:
                raise ShapeError(f"sgemm: A has K={k} but the packed B has K={b.k}")
            if b.batch is not None and b.batch != batch:
                raise ShapeError(f"sgemm: packed B has batch {b.batch}, A has {batch}")
            stride = b.item_floats if b.batch is not None else 0
            return b.data, 0, stride, b.n, True
        if not isinstance(b, np.ndarray) or b.ndim not in (2, 3):
            raise ShapeError(f"sgemm: B must be a 2-D or 3-D array or a PackedB, got "
                             f"{getattr(b, 'shape', type(b).__name__)}")
        if b.shape[-2] != k:
            raise ShapeError(f"sgemm: A is {k} wide but B has {b.shape[-2]} rows")
        if b.ndim == 3 and b.shape[0] != batch:
            raise ShapeError(f"sgemm: B has batch {b.shape[0]}, A has {batch}")
        b, ldb, stride_b = _matrix_strides(b, "B")  # b may be a copy: returned to keep it alive
        return b, ldb, stride_b, b.shape[-1], False

    @staticmethod
    def _check_out(out, shape, *inputs):
        if out is None:
            return np.empty(shape, np.float32), shape[-1], shape[-2] * shape[-1]
        if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32:
            raise ShapeError(f"sgemm: out must be a float32 array of shape {shape}, got "
                             f"{getattr(out, 'dtype', '?')}{getattr(out, 'shape', '')}")
        if not out.flags.writeable:
            raise ShapeError("sgemm: out is read-only")
        checked, ldc, stride_c = _matrix_strides(out, "out")
        m, n = shape[-2:]
        if checked is not out or ldc < n or (len(shape) == 3 and shape[0] > 1
                                             and stride_c < (m - 1) * ldc + n):
            raise ShapeError("sgemm: out needs unit column stride and rows (and batch items) "
                             "that do not overlap")
        if any(x is not None and np.may_share_memory(out, x) for x in inputs):
            raise ShapeError("sgemm: out overlaps an input")
        return out, ldc, stride_c

    @staticmethod
    def _check_bias(bias, axis, m, n):
        if bias is None:
            return "", None
        if axis not in (-1, -2):
            raise InvalidAttributeError(f"sgemm: bias_axis must be -1 (columns) or -2 (rows), "
                                        f"got {axis}")
        kind, length = ("col", n) if axis == -1 else ("row", m)
        if not isinstance(bias, np.ndarray) or bias.shape != (length,):
            raise ShapeError(f"sgemm: a {kind} bias must have shape ({length},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype != np.float32:
            raise ShapeError(f"sgemm: bias has dtype {bias.dtype}, expected float32")
        return kind, np.ascontiguousarray(bias)

    @staticmethod
    def _check_residual(residual, shape, out):
        if residual is None:
            return None, 0, 0
        if not isinstance(residual, np.ndarray) or residual.shape != shape:
            raise ShapeError(f"sgemm: residual must have the output shape {shape}, got "
                             f"{getattr(residual, 'shape', type(residual).__name__)}")
        if np.may_share_memory(residual, out):
            # C holds partial sums between K blocks, so an aliased residual would be clobbered
            residual = residual.copy()
        return _matrix_strides(residual, "residual")

    @staticmethod
    def _check_params(activation, params):
        if activation and activation not in ACTIVATIONS:
            raise InvalidAttributeError(
                f"sgemm: activation '{activation}' is not one of {', '.join(ACTIVATIONS)}")
        wanted = EPILOGUE_PARAMS.get(activation, ())
        if len(params) != len(wanted):
            raise InvalidAttributeError(
                f"sgemm: activation '{activation}' takes {len(wanted)} parameters "
                f"({', '.join(wanted) or 'none'}), got {len(params)}")
        return np.array(list(params) or [0.0], np.float32)


def _pointer(x: np.ndarray | None) -> int:
    return 0 if x is None else x.ctypes.data
