"""GEMM lowerings: ConvGemm, MatMul, Gemm and FusedGemm -> calls of the generated SGEMM.

Each node becomes a ``BoundFunction``: a small generated wrapper

    void f(float* a, float* b, float* c, [float* bias,] [float* r,] float* params,
           float* workspace, i32 thread_id, i32 n_threads)

that loops over the batch dims the SGEMM kernel cannot express with its one batch stride
(ConvGemm's groups, MatMul's outer broadcast dims) and calls the JIT'd kernel of
``backends/llvm/gemm.py`` by its address with the C ABI documented there. Every thread of the
compiled model calls the wrapper; the kernel splits each call's C among the threads by
``(thread_id, n_threads)``, so consecutive calls write disjoint parts of C and need no barrier.

A product is described by a ``GemmCall``: M, N, K, leading dims, and a list of batch dims, each
with its extent and the stride (in floats) of every operand along it. Dims of extent 1 are
dropped, neighbours that address memory as one dim are merged, a batch dim along which only A,
C and R advance contiguously (B shared) is folded into M (one larger GEMM), and the innermost
remaining dim becomes the kernel's batch when the bias does not move along it.

Compile-time work (kept alive by the compiled model as ``BoundFunction.constants``):

* a constant B is packed once with the kernel's ``pack_b`` (the pre-packed kernel then reads it
  without copying);
* Gemm's constant transposed operands are transposed here; a run-time transposed A or B is
  read in place by the kernel's transposed packing (``EpilogueSpec.trans_a`` / ``trans_b``;
  measured no slower than a separate transpose, and it needs no scratch or barrier);
  ``alpha`` is folded into a constant B (else A), ``beta`` into a constant C;
* a run-time C that needs ``beta`` or a broadcast, and a full [M, N] C together with Z (the
  kernel adds one [M, N] operand), go through a ``prepare_c`` step before the GEMM: the
  threads write ``beta * C (+ Z)`` into a compile-time scratch array, and the barrier after
  the step makes it whole before the GEMM reads it as its bias or residual;
* each node's activation parameters are a small array; the per-thread workspace
  (``GemmBlocking.workspace_floats`` floats per possible thread, ``available_cores()``
  threads) is ONE array shared by every GEMM of the model, since steps never overlap in time.

Invariants: float32 only; C never overlaps A, B or R -- ``memory_plan.inplace_operands`` gives
no in-place slot to these (``out-fusable``) ops; a plan made with ``inplace_with_residual``
would alias Y with Z, which this kernel does not allow (it keeps partial sums in C), so
``lower_node`` callers must not use that rule with these lowerings. Inputs the lowering cannot
express (alpha != 1 with both A and B run-time) raise ``LoweringError`` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
from llvmlite import ir

from graphc.ops.rules import broadcast_dims

from .llvm.gemm import (
    _IR_OF_CTYPE,
    EPILOGUE_PARAMS,
    KERNEL_ARGTYPES,
    EpilogueSpec,
    GemmBlocking,
    Sgemm,
    compile_kernel,
)
from .llvm.gemm import _aligned_empty as aligned_floats
from .llvm.runtime import available_cores
from .lower import BoundFunction, LowerContext, lowering

BLOCKING = GemmBlocking()
F32 = ir.FloatType()
PF = F32.as_pointer()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
ROLES = ("a", "b", "c", "bias", "r")   # operands that move along batch dims
_PACKER: list[Sgemm] = []              # one single-threaded Sgemm, made on first use


# -- the description of one lowered product -------------------------------------------------------
@dataclass(frozen=True)
class BatchDim:
    """One batch dim: its extent and each operand's stride (floats) along it."""

    extent: int
    strides: dict


@dataclass(frozen=True)
class GemmCall:
    """``activation(A @ B + bias + R)`` per batch item; pointers name graph values/constants."""

    spec: EpilogueSpec
    m: int
    n: int
    k: int
    ld: dict                                   # role -> leading dim (a, b, c, r)
    dims: tuple = ()                           # BatchDim, outermost first
    values: dict = field(default_factory=dict)  # role -> graph value or constant name

    def simplified(self) -> GemmCall:
        dims = _merge_dims([d for d in self.dims if d.extent != 1])
        call = replace(self, dims=tuple(dims))
        while call.dims and _foldable_into_m(call):
            inner = call.dims[-1]
            call = replace(call, m=call.m * inner.extent, dims=call.dims[:-1])
        return call

    def kernel_dim(self) -> BatchDim | None:
        """The innermost dim, if the kernel can take it as its batch (bias shared by items)."""
        if self.dims and self.dims[-1].strides.get("bias", 0) == 0:
            return self.dims[-1]
        return None

    def describe(self) -> str:
        dims = " x ".join(str(d.extent) for d in self.dims) or "1"
        return (f"sgemm[{self.spec.tag}] batch {dims} of M={self.m} N={self.n} K={self.k}, "
                f"kernel {compile_kernel(BLOCKING, self.spec).symbol} called by address")


def _merge_dims(dims: Sequence[BatchDim]) -> list[BatchDim]:
    """Merge neighbours (outer, inner) where every operand's outer stride is inner * extent."""
    merged: list[BatchDim] = []
    for d in dims:
        if merged:
            outer = merged[-1]
            if all(outer.strides.get(r, 0) == d.strides.get(r, 0) * d.extent for r in ROLES):
                merged[-1] = BatchDim(outer.extent * d.extent, d.strides)
                continue
        merged.append(d)
    return merged


def _foldable_into_m(call: GemmCall) -> bool:
    """The innermost dim is M's continuation: B (and a col bias) shared, A, C, R row-contiguous."""
    s = call.dims[-1].strides
    if s.get("b", 0) or s.get("bias", 0) or call.spec.bias == "row":
        return False
    return (s.get("a", 0) == call.m * call.ld["a"] and s.get("c", 0) == call.m * call.ld["c"]
            and (not call.spec.residual or s.get("r", 0) == call.m * call.ld["r"]))


# -- the generated wrapper ------------------------------------------------------------------------
def _kernel_pointer_type() -> ir.PointerType:
    types = [_IR_OF_CTYPE[t] for t in KERNEL_ARGTYPES]
    return ir.FunctionType(ir.VoidType(), types).as_pointer()


def gemm_function(ctx: LowerContext, call: GemmCall, constants: dict) -> BoundFunction:
    """The BoundFunction of ``call``: values a, b, c, [bias], [r], params, workspace."""
    call = call.simplified()
    spec = call.spec
    roles = ["a", "b", "c"] + (["bias"] if spec.bias else []) + (["r"] if spec.residual else [])
    values = [call.values[r] for r in roles] + [constants["params"], constants["workspace"]]
    arrays = {constants[key]: constants[f"{key}_array"] for key in ("params", "workspace")}
    arrays.update(constants.get("extra", {}))
    address = compile_kernel(BLOCKING, spec).address
    empty = call.m == 0 or call.n == 0 or any(d.extent == 0 for d in call.dims)

    def emit(module: ir.Module, symbol: str) -> ir.Function:
        fnty = ir.FunctionType(ir.VoidType(), [PF] * len(values) + [I32, I32])
        fn = ir.Function(module, fnty, symbol)
        fn.linkage = "internal"
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        if not empty:
            _emit_calls(b, call, dict(zip(roles, fn.args)), fn.args[len(roles)],
                        fn.args[len(roles) + 1], fn.args[-2], fn.args[-1], address)
        b.ret_void()
        return fn

    return BoundFunction(ctx.name, emit, tuple(values), arrays, call.describe())


def _emit_calls(b: ir.IRBuilder, call: GemmCall, ptrs: dict, params, workspace, tid, n_threads,
                address: int) -> None:
    tid64, threads64 = b.sext(tid, I64), b.sext(n_threads, I64)
    # each thread owns workspace_floats floats of the shared workspace
    ws = b.gep(workspace, [b.mul(tid64, I64(BLOCKING.workspace_floats))], inbounds=True)
    kernel_dim = call.kernel_dim()
    loops = list(call.dims[:-1] if kernel_dim is not None else call.dims)
    target = b.inttoptr(I64(address), _kernel_pointer_type())
    null = ir.Constant(PF, None)

    def body(offsets: dict) -> None:
        at = {r: (b.gep(p, [offsets[r]], inbounds=True) if offsets.get(r) is not None else p)
              for r, p in ptrs.items()}
        kd = kernel_dim.strides if kernel_dim is not None else {}
        batch = kernel_dim.extent if kernel_dim is not None else 1
        args = [I64(batch), I64(call.m), I64(call.n), I64(call.k),
                at["a"], I64(call.ld["a"]), I64(kd.get("a", 0)),
                at["b"], I64(call.ld["b"]), I64(kd.get("b", 0)),
                at["c"], I64(call.ld["c"]), I64(kd.get("c", 0)),
                at.get("bias", null), at.get("r", null), I64(call.ld.get("r", 0)),
                I64(kd.get("r", 0)), params, ws, tid64, threads64]
        b.call(target, args)

    _nest(b, loops, {}, body)


def _nest(b: ir.IRBuilder, loops: Sequence[BatchDim], offsets: dict, body) -> None:
    """``for i in range(extent)`` per loop dim (outermost first); offsets accumulate i*stride."""
    if not loops:
        body(offsets)
        return
    dim = loops[0]
    pre = b.block
    head = b.append_basic_block("batch.head")
    done = b.append_basic_block("batch.done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name="i")
    i.add_incoming(I64(0), pre)
    inner = dict(offsets)
    for role, stride in dim.strides.items():
        if stride:
            step = b.mul(i, I64(stride))
            inner[role] = b.add(offsets[role], step) if offsets.get(role) is not None else step
    _nest(b, loops[1:], inner, body)
    nxt = b.add(i, I64(1))
    i.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, I64(dim.extent)), head, done)
    b.position_at_end(done)


# -- shared pieces of the lowerings ---------------------------------------------------------------
def _check_f32(ctx: LowerContext) -> None:
    for i, t in enumerate(ctx.in_types + ctx.out_types):
        if t is not None and t.dtype != "f32":
            raise ctx.error(f"operand {i} has dtype {t.dtype}; the SGEMM lowering takes f32 only")


def _epilogue(ctx: LowerContext) -> tuple[str, np.ndarray]:
    name = ctx.attrs.get("activation", "")
    params = list(ctx.attrs.get("activation_params", ()))
    if len(params) != len(EPILOGUE_PARAMS.get(name, ())):
        raise ctx.shape_error(f"activation '{name}' got {len(params)} parameters")
    return name, np.array(params or [0.0], np.float32)


def _constants(ctx: LowerContext, params: np.ndarray, extra: dict) -> dict:
    threads = available_cores()
    floats = BLOCKING.workspace_floats * threads
    return {"params": f"{ctx.node.name}/sgemm_params", "params_array": params,
            # one name for every GEMM step: the compiled model keeps one array for all of them
            "workspace": f"graphc/sgemm_workspace_{BLOCKING.tag}_x{threads}",
            "workspace_array": aligned_floats(floats), "extra": extra}


def _pack(b: np.ndarray) -> tuple[np.ndarray, int]:
    """B ([..., K, N]) packed for the pre-packed kernel: (data, floats per batch item)."""
    if not _PACKER:
        _PACKER.append(Sgemm(threads=1, blocking=BLOCKING))
    k, n = b.shape[-2:]
    items = math.prod(b.shape[:-2])
    mats = np.ascontiguousarray(b, np.float32).reshape((items, k, n) if items != 1 else (k, n))
    packed = _PACKER[0].pack_b(mats)
    return packed.data, packed.item_floats


def _item_strides(batch: Sequence[int], out_batch: Sequence[int], item: int) -> list[int]:
    """Strides along the output's batch dims of an operand with batch dims ``batch`` (right-
    aligned, contiguous items of ``item`` floats); 0 along the dims it broadcasts."""
    padded = (1,) * (len(out_batch) - len(batch)) + tuple(batch)
    strides, step = [], item
    for size in reversed(padded):
        strides.append(0 if size == 1 else step)
        step *= size
    return strides[::-1]


# -- ConvGemm -------------------------------------------------------------------------------------
@lowering("ConvGemm")
def lower_conv_gemm(ctx: LowerContext) -> BoundFunction:
    """Per group g and image i: Y[i, g*Kg:(g+1)*Kg] = W2[g] @ COLS[i, g] (+ bias, R, act);
    the wrapper loops over the groups, the kernel's batch runs over the images."""
    _check_f32(ctx)
    groups, kg, rows = ctx.in_types[0].shape
    images, _, _, p = ctx.in_types[1].shape
    channels = groups * kg
    activation, params = _epilogue(ctx)
    has_bias, has_z = ctx.has_input(2), ctx.has_input(3)
    spec = EpilogueSpec(False, "row" if has_bias else "", has_z, activation)
    node = ctx.node
    values = {"a": node.inputs[0], "b": node.inputs[1], "c": node.outputs[0]}
    if has_bias:
        values["bias"] = node.inputs[2]
    if has_z:
        values["r"] = node.inputs[3]
    dims = (BatchDim(groups, {"a": kg * rows, "b": rows * p, "c": kg * p, "r": kg * p,
                              "bias": kg}),
            BatchDim(images, {"a": 0, "b": groups * rows * p, "c": channels * p,
                              "r": channels * p}))
    call = GemmCall(spec, kg, p, rows, {"a": rows, "b": p, "c": p, "r": p}, dims, values)
    return gemm_function(ctx, call, _constants(ctx, params, {}))


# -- MatMul ---------------------------------------------------------------------------------------
@lowering("MatMul")
def lower_matmul(ctx: LowerContext) -> BoundFunction:
    """numpy.matmul: 1-D operands as a row (A) or column (B), broadcast batch dims; a constant
    B is packed at compile time."""
    _check_f32(ctx)
    a_t, b_t = ctx.in_types[0], ctx.in_types[1]
    sa = (1,) + a_t.shape if a_t.rank == 1 else a_t.shape
    sb = b_t.shape + (1,) if b_t.rank == 1 else b_t.shape
    m, k = sa[-2:]
    n = sb[-1]
    out_batch = broadcast_dims(sa[:-2], sb[:-2], ctx.opcall())
    node = ctx.node
    values = {"a": node.inputs[0], "b": node.inputs[1], "c": node.outputs[0]}
    extra, b_item, prepacked = {}, k * n, False
    b_value = ctx.in_values[1]
    if b_value is not None:
        data, b_item = _pack(np.asarray(b_value).reshape(sb))
        values["b"] = f"{node.name}/packed_b"
        extra[values["b"]], prepacked = data, True
    strides = {"a": _item_strides(sa[:-2], out_batch, m * k),
               "b": _item_strides(sb[:-2], out_batch, b_item),
               "c": _item_strides(out_batch, out_batch, m * n)}
    dims = tuple(BatchDim(e, {r: strides[r][d] for r in strides})
                 for d, e in enumerate(out_batch))
    call = GemmCall(EpilogueSpec(prepacked), m, n, k, {"a": k, "b": n, "c": n}, dims, values)
    return gemm_function(ctx, call, _constants(ctx, _epilogue(ctx)[1], extra))


# -- Gemm and FusedGemm ---------------------------------------------------------------------------
@lowering("Gemm", "FusedGemm")
def lower_gemm(ctx: LowerContext) -> list[BoundFunction]:
    """activation(alpha * A' @ B' + beta * C + Z): a constant operand is transposed and scaled
    at compile time; a run-time transposed A or B is read transposed by the kernel's packing.
    C becomes a column bias, a row bias or the residual; a run-time C that needs scaling or
    broadcasting, or a full C together with Z, is first combined by a ``prepare_c`` step."""
    _check_f32(ctx)
    attrs, node = ctx.attrs, ctx.node
    m, n = ctx.out_types[0].shape
    a_value, b_value = _gemm_operand(ctx, 0, "transA"), _gemm_operand(ctx, 1, "transB")
    trans_a = bool(attrs["transA"]) and a_value is None
    trans_b = bool(attrs["transB"]) and b_value is None
    k = ctx.in_types[0].shape[0 if attrs["transA"] else 1]
    alpha = attrs["alpha"]
    if alpha != 1:
        if b_value is not None:
            b_value = b_value * np.float32(alpha)
        elif a_value is not None:
            a_value = a_value * np.float32(alpha)
        else:
            raise ctx.error(f"alpha={alpha} needs a constant A or B to fold it into")
    activation, params = _epilogue(ctx)
    values = {"a": node.inputs[0], "c": node.outputs[0]}
    extra: dict = {}
    if a_value is not None and a_value is not ctx.in_values[0]:
        values["a"] = f"{node.name}/a"
        extra[values["a"]] = np.ascontiguousarray(a_value, np.float32)
    if b_value is not None:
        data, _ = _pack(b_value)
        values["b"] = f"{node.name}/packed_b"
        extra[values["b"]] = data
    else:
        values["b"] = node.inputs[1]
    bias, residual, steps = _gemm_c(ctx, m, n, values, extra)
    spec = EpilogueSpec(b_value is not None, bias, residual, activation, trans_a, trans_b)
    lds = {"a": m if trans_a else k, "b": k if trans_b else n, "c": n, "r": n}
    call = GemmCall(spec, m, n, k, lds, (), values)
    return steps + [gemm_function(ctx, call, _constants(ctx, params, extra))]


def _gemm_operand(ctx: LowerContext, i: int, trans: str) -> np.ndarray | None:
    """The constant value of A (i=0) or B (i=1) as used (transposed if asked); None for a
    run-time operand (the kernel reads it in its stored layout)."""
    value = ctx.in_values[i]
    if value is None:
        return None
    value = np.asarray(value, np.float32)
    return np.ascontiguousarray(value.T) if ctx.attrs[trans] else value


def _gemm_c(ctx: LowerContext, m: int, n: int, values: dict,
            extra: dict) -> tuple[str, bool, list[BoundFunction]]:
    """Place beta * C and Z: (bias kind "col" | "row" | "", whether the kernel reads a
    residual, the steps to run before the GEMM); fills values["bias"] and values["r"]."""
    node = ctx.node
    z = node.inputs[3] if ctx.has_input(3) else None
    if z is not None:
        values["r"] = z
    if not ctx.has_input(2):
        return "", z is not None, []
    beta, shape = np.float32(ctx.attrs["beta"]), ctx.in_types[2].shape
    cm, cn = ((1, 1) + tuple(shape))[-2:]
    size = math.prod(shape)
    if cm == 1 and cn == n:
        kind, role, count = "col", "bias", n
    elif cm == m and cn == 1:
        kind, role, count = "row", "bias", m
    elif (cm, cn) == (m, n):
        kind, role, count = "", "r", m * n
    elif size == 1:            # a scalar-like C: spread over a column bias
        kind, role, count = "col", "bias", n
    else:
        raise ctx.error(f"C of shape {tuple(shape)} does not broadcast to ({m}, {n})")
    c_value = ctx.in_values[2]
    if role == "r" and z is not None:  # two [M, N] addends: R = beta * C + Z, in scratch
        c = _c_source(node, c_value, extra)
        return "", True, [_prepare_c(ctx, values, extra, role, (c, z), beta, 1, count)]
    if c_value is not None:    # folded now: beta, and the broadcast of a scalar-like C
        c_value = np.broadcast_to(np.asarray(c_value, np.float32).reshape(-1), (count,))
        values[role] = f"{node.name}/c"
        extra[values[role]] = np.ascontiguousarray(c_value * beta, np.float32)
        return kind, role == "r" or z is not None, []
    if beta == 1 and size == count:
        values[role] = node.inputs[2]
        return kind, role == "r" or z is not None, []
    stride = 1 if size == count else 0
    step = _prepare_c(ctx, values, extra, role, (node.inputs[2],), beta, stride, count)
    return kind, role == "r" or z is not None, [step]


def _c_source(node, c_value, extra: dict) -> str:
    """The name C is read under: the graph value, or a compile-time copy of a constant C."""
    if c_value is None:
        return node.inputs[2]
    name = f"{node.name}/c"
    extra[name] = np.ascontiguousarray(np.asarray(c_value, np.float32).reshape(-1))
    return name


def _prepare_c(ctx: LowerContext, values: dict, extra: dict, role: str, sources: tuple,
               beta: np.float32, c_stride: int, count: int) -> BoundFunction:
    """A step ``out[i] = beta * C[i * c_stride] (+ Z[i])`` for i < count, split among the
    threads, into a compile-time scratch array that the GEMM then reads as ``role``. The
    barrier after the step makes every thread's part visible to the GEMM's threads."""
    out = f"{ctx.node.name}/c_prepared"
    extra[out] = aligned_floats(count)
    values[role] = out
    arrays = {name: extra[name] for name in (*sources, out) if name in extra}

    def emit(module: ir.Module, symbol: str) -> ir.Function:
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PF] * (len(sources) + 1)
                                                 + [I32, I32]), symbol)
        fn.linkage = "internal"
        *ptrs, dst, tid, n_threads = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        chunk = b.sdiv(b.add(I64(count), b.sub(b.sext(n_threads, I64), I64(1))),
                       b.sext(n_threads, I64))
        lo = b.mul(b.sext(tid, I64), chunk)
        hi = b.add(lo, chunk)
        hi = b.select(b.icmp_signed("<", hi, I64(count)), hi, I64(count))
        with _counted_loop(b, lo, hi) as i:
            c = b.load(b.gep(ptrs[0], [b.mul(i, I64(c_stride))], inbounds=True))
            y = b.fmul(c, ir.Constant(F32, float(beta))) if beta != 1 else c
            if len(ptrs) > 1:
                y = b.fadd(y, b.load(b.gep(ptrs[1], [i], inbounds=True)))
            b.store(y, b.gep(dst, [i], inbounds=True))
        b.ret_void()
        return fn

    what = " + Z" if len(sources) > 1 else ""
    text = (f"prepare C: {count} floats = {float(beta):g} * C"
            f"{'[0]' if c_stride == 0 else ''}{what}")
    return BoundFunction(f"{ctx.name}_c", emit, (*sources, out), arrays, text)


@contextmanager
def _counted_loop(b: ir.IRBuilder, start, stop):
    """``for i in range(start, stop)`` (i64); the body is emitted inside the ``with``."""
    pre = b.block
    head, body, done = (b.append_basic_block(x) for x in ("loop.head", "loop.body", "loop.done"))
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name="i")
    i.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", i, stop), body, done)
    b.position_at_end(body)
    yield i
    i.add_incoming(b.add(i, I64(1)), b.block)
    b.branch(head)
    b.position_at_end(done)
