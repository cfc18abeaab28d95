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
from graphc.ops.winograd import transform_matrices

from .llvm.gemm import (
    _IR_OF_CTYPE,
    EPILOGUE_PARAMS,
    KERNEL_ARGTYPES,
    VEC,
    VF,
    VI64,
    VMASK,
    VOID,
    EpilogueSpec,
    GemmBlocking,
    Sgemm,
    VectorMath,
    _define,
    _Emitter,
    _i64,
    _intrinsic,
    _vconst,
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


# -- WinogradConv: input transform, batched GEMM and output transform, block by block ------------
WINOGRAD_BLOCK_FLOATS = 160 * 1024  # V + M floats of one block: with the packing, within L2


def winograd_block_tiles(a2: int, c: int, k: int, tiles: int) -> int:
    """Tiles per block: V and M of a block (a2 * tiles * (c + k) floats) about
    ``WINOGRAD_BLOCK_FLOATS``; a multiple of 16 (one vector of tiles), at least one."""
    fit = WINOGRAD_BLOCK_FLOATS // (a2 * (c + k)) // VEC * VEC
    return max(VEC, min(-(-tiles // VEC) * VEC, fit))


@dataclass(frozen=True)
class WinogradGeometry:
    """The numbers the fused kernel is specialised on (all compile-time)."""

    m: int
    c: int
    k: int
    height: int
    width: int
    out_h: int
    out_w: int
    tiles: tuple        # (th, tw) per image
    images: int
    pads: tuple         # (top, left)
    block: int          # tiles per block

    @property
    def alpha(self) -> int:
        return self.m + 2

    @property
    def total_tiles(self) -> int:
        return self.images * self.tiles[0] * self.tiles[1]

    @property
    def v_floats(self) -> int:
        return self.alpha ** 2 * self.block * self.c

    @property
    def scratch_floats(self) -> int:
        """Per thread: V then M of one block, each rounded up to 16 floats (64 bytes)."""
        m_floats = self.alpha ** 2 * self.block * self.k
        return -(-self.v_floats // VEC) * VEC + -(-m_floats // VEC) * VEC


@lowering("WinogradConv")
def lower_winograd_conv(ctx: LowerContext) -> BoundFunction:
    """Blocks of ``winograd_block_tiles`` tiles (of the folded N * th * tw tile axis) are dealt
    out round-robin to the threads; per block a thread transforms the input into its scratch
    V^T [a*a, C, block], runs the a*a GEMMs U[e]^T @ V^T[e] -> M^T [a*a, K, block]
    single-threaded (the SGEMM kernel with tid 0 of 1; a constant U is transposed at compile
    time), and transforms M^T into the output with the epilogue. Tiles lie along the
    scratch's rows, so both transforms run 16 tiles to a vector: their NCHW side is a gather
    or scatter within a few rows of one channel plane, their scratch side contiguous. V and M
    stay in the thread's L2 between the stages (the staged ops send both through memory: 58 MB
    each way for VGG-16's 64->64@224)."""
    _check_f32(ctx)
    attrs, node = ctx.attrs, ctx.node
    images, c, height, width = ctx.in_types[0].shape
    a2, _, k = ctx.in_types[1].shape
    th, tw = attrs["tiles"]
    geo = WinogradGeometry(attrs["m"], c, k, height, width, *attrs["out_shape"][2:], (th, tw),
                           images, tuple(attrs["pads"][:2]),
                           winograd_block_tiles(a2, c, k, images * th * tw))
    at, _, bt = transform_matrices(ctx.opcall(), np.float32)
    activation, params = _epilogue(ctx)
    values = {"x": node.inputs[0], "u": node.inputs[1], "y": node.outputs[0]}
    extra, transposed = {}, True
    if ctx.in_values[1] is not None:  # U^T [a*a, K, C] once now, so A packs by row copies
        values["u"] = f"{node.name}/u_transposed"
        extra[values["u"]] = np.ascontiguousarray(
            np.asarray(ctx.in_values[1], np.float32).transpose(0, 2, 1))
        transposed = False
    roles = ["x", "u", "y"]
    for i, role in ((2, "bias"), (3, "z")):
        if ctx.has_input(i):
            values[role] = node.inputs[i]
            roles.append(role)
    threads = available_cores()
    scratch = f"graphc/winograd_scratch_{geo.scratch_floats}_x{threads}"
    extra[scratch] = aligned_floats(geo.scratch_floats * threads)
    constants = _constants(ctx, params, extra)
    names = [values[r] for r in roles] + [constants["params"], constants["workspace"], scratch]
    arrays = {constants[key]: constants[f"{key}_array"] for key in ("params", "workspace")}
    arrays.update(extra)
    gemm = compile_kernel(BLOCKING, EpilogueSpec(trans_a=transposed)).address

    def emit(module: ir.Module, symbol: str) -> ir.Function:
        kernel = _WinogradConvEmitter(module, symbol, geo, bt, at, activation, roles)
        return kernel.entry(gemm, transposed, threads)

    text = (f"Winograd F({geo.m}x{geo.m},3x3) fused: {geo.total_tiles} tiles in blocks of "
            f"{geo.block}, {a2} GEMMs {geo.block}x{c}x{k} per block (sgemm called by address)")
    return BoundFunction(ctx.name, emit, tuple(names), arrays, text)


VPF = ir.VectorType(PF, VEC)       # <16 x float*>: the addresses of a gather or scatter


class _WinogradConvEmitter:
    """The fused kernel's LLVM code: an entry that walks this thread's blocks, and the two
    transforms as internal functions over a block's tiles. The transforms run 16 consecutive
    tiles at a time in ``<16 x float>`` vectors, one channel after another: the scratch side
    (V^T, M^T: tiles contiguous) is one masked vector access, the NCHW side (X, Y, Z) a masked
    gather or scatter whose lanes are switched off for tiles past the block, taps on the
    padding (gathers read zero) and cropped outputs (scatters skip them)."""

    def __init__(self, module: ir.Module, symbol: str, geo: WinogradGeometry, bt, at,
                 activation: str, roles: Sequence[str]):
        self.module, self.symbol, self.geo = module, symbol, geo
        self.bt, self.at = np.asarray(bt), np.asarray(at)
        self.activation, self.roles = activation, list(roles)

    # the pieces of vector code both transforms use
    @staticmethod
    def _vi(value: int) -> ir.Constant:
        return ir.Constant(VI64, [value] * VEC)

    def _addresses(self, em: _Emitter, plane, offsets):
        """<16 x float*>: lane l addresses ``plane + offsets[l]`` (offsets: <16 x i64>)."""
        b = em.b
        base = em.splat(b.ptrtoint(plane, I64), VI64)
        return b.inttoptr(b.add(base, b.mul(offsets, self._vi(4))), VPF)

    def _gather(self, em: _Emitter, addresses, mask):
        fn = _intrinsic(self.module, "llvm.masked.gather.v16f32.v16p0", VF,
                        [VPF, I32, VMASK, VF])
        return em.b.call(fn, [addresses, ir.Constant(I32, 4), mask, _vconst(0.0)])

    def _scatter(self, em: _Emitter, value, addresses, mask) -> None:
        fn = _intrinsic(self.module, "llvm.masked.scatter.v16f32.v16p0", VOID,
                        [VF, VPF, I32, VMASK])
        em.b.call(fn, [value, addresses, ir.Constant(I32, 4), mask])

    @staticmethod
    def _dense_map(em: _Emitter, matrix: np.ndarray, values: Sequence) -> list:
        """``out[i] = sum_j matrix[i, j] * values[j]`` on vectors, with the NaN rule of
        ``lower_window.dense_map``: a zero coefficient adds ``x - x`` (+0, or NaN when x is
        infinite or NaN, as the reference's ``0 * x``)."""
        b = em.b
        differences: dict[int, object] = {}
        out = []
        for row in matrix.tolist():
            total = None
            for coefficient, v in zip(row, values):
                if coefficient == 0:
                    if id(v) not in differences:
                        differences[id(v)] = b.fsub(v, v)
                    term = differences[id(v)]
                elif coefficient == 1:
                    term = v
                elif coefficient == -1:
                    term = b.fneg(v)
                else:
                    term = b.fmul(v, _vconst(coefficient))
                total = term if total is None else b.fadd(total, term)
            out.append(total)
        return out

    def _tiles(self, em: _Emitter, t, t1):
        """(lanes t + l < t1, image, tile row, tile column) of the 16 tiles from t, as vectors;
        lanes past t1 get tile 0's position (in range, and masked off)."""
        b, (th, tw) = em.b, self.geo.tiles
        flat = b.add(em.splat(t, VI64), ir.Constant(VI64, list(range(VEC))))
        live = b.icmp_signed("<", flat, em.splat(t1, VI64))
        flat = b.select(live, flat, self._vi(0))
        image = b.udiv(flat, self._vi(th * tw))
        rest = b.urem(flat, self._vi(th * tw))
        return live, image, b.udiv(rest, self._vi(tw)), b.urem(rest, self._vi(tw))

    def _coords(self, em: _Emitter, tile, shift: int, size: int):
        """(coordinate clamped into range, inside [0, size)) of ``tile * m + shift``."""
        b = em.b
        coord = b.add(b.mul(tile, self._vi(self.geo.m)), self._vi(shift))
        inside = b.and_(b.icmp_signed(">=", coord, self._vi(0)),
                        b.icmp_signed("<", coord, self._vi(size)))
        return b.select(inside, coord, self._vi(0)), inside

    # the transforms
    def input_transform(self) -> ir.Function:
        """V^T[e, c, t - t0] = (B^T d B)[e] for the tiles t0 <= t < t1 of X."""
        geo, a = self.geo, self.geo.alpha
        fn = _define(self.module, f"{self.symbol}.input", VOID,
                     [("x", PF), ("v", PF), ("t0", I64), ("t1", I64)])
        x, v, t0, t1 = fn.args
        em = _Emitter(self.module, fn)
        b = em.b
        hw = geo.height * geo.width
        with em.loop(t0, t1, _i64(VEC), "t") as t:
            live, image, i, j = self._tiles(em, t, t1)
            rows = [self._coords(em, i, r - geo.pads[0], geo.height) for r in range(a)]
            cols = [self._coords(em, j, q - geo.pads[1], geo.width) for q in range(a)]
            start = b.mul(image, self._vi(geo.c * hw))
            offsets = [[b.add(start, b.add(b.mul(r, self._vi(geo.width)), q)) for q, _ in cols]
                       for r, _ in rows]
            masks = [[b.and_(live, b.and_(ok_r, ok_q)) for _, ok_q in cols] for _, ok_r in rows]
            at = b.sub(t, t0)
            with em.loop(_i64(0), _i64(geo.c), _i64(1), "c") as c:
                plane = em.gep(x, em.mul(c, _i64(hw)))
                d = [[self._gather(em, self._addresses(em, plane, offsets[r][q]), masks[r][q])
                      for q in range(a)] for r in range(a)]
                rows_t = [self._dense_map(em, self.bt, row) for row in d]          # d B
                vt = [self._dense_map(em, self.bt, [row[nu] for row in rows_t])   # B^T (d B)
                      for nu in range(a)]
                row_at = em.add(em.mul(c, _i64(geo.block)), at)
                for xi in range(a):
                    for nu in range(a):
                        where = em.add(row_at, _i64((xi * a + nu) * geo.c * geo.block))
                        em.masked_store(vt[nu][xi], em.gep(v, where), live)
        b.ret_void()
        return fn

    def output_transform(self) -> ir.Function:
        """Y[n, k, i*m + u, j*m + v] = act((A^T M A)[u, v] + bias[k] + Z[...]) for the tiles
        t0 <= t < t1 (M^T[e, k, t - t0]); positions past the output's edge are not stored."""
        geo, a, m = self.geo, self.geo.alpha, self.geo.m
        epilogue_roles = [r for r in self.roles if r in ("bias", "z")]
        fn = _define(self.module, f"{self.symbol}.output", VOID,
                     [("mt", PF), ("y", PF)] + [(r, PF) for r in epilogue_roles]
                     + [("params", PF), ("t0", I64), ("t1", I64)])
        mt, y, *epilogue_ptrs, params, t0, t1 = fn.args
        ptr = dict(zip(epilogue_roles, epilogue_ptrs))
        em = _Emitter(self.module, fn)
        b = em.b
        act_params = [em.splat(b.load(em.gep(params, _i64(i)), align=4))
                      for i in range(len(EPILOGUE_PARAMS.get(self.activation, ())))]
        hw = geo.out_h * geo.out_w
        with em.loop(t0, t1, _i64(VEC), "t") as t:
            live, image, i, j = self._tiles(em, t, t1)
            rows = [self._coords(em, i, u, geo.out_h) for u in range(m)]
            cols = [self._coords(em, j, v, geo.out_w) for v in range(m)]
            start = b.mul(image, self._vi(geo.k * hw))
            offsets = [[b.add(start, b.add(b.mul(r, self._vi(geo.out_w)), q)) for q, _ in cols]
                       for r, _ in rows]
            masks = [[b.and_(live, b.and_(ok_r, ok_q)) for _, ok_q in cols] for _, ok_r in rows]
            at = b.sub(t, t0)
            with em.loop(_i64(0), _i64(geo.k), _i64(1), "k") as k:
                row_at = em.add(em.mul(k, _i64(geo.block)), at)
                mm = [[em.masked_load(em.gep(mt, em.add(row_at, _i64((xi * a + nu) * geo.k
                                                                   * geo.block))), live)
                       for nu in range(a)] for xi in range(a)]
                cols_t = [self._dense_map(em, self.at, [row[nu] for row in mm])  # A^T M
                          for nu in range(a)]
                out = [self._dense_map(em, self.at, [col[u] for col in cols_t])  # (A^T M) A
                       for u in range(m)]
                bias = (em.splat(b.load(em.gep(ptr["bias"], k), align=4))
                        if "bias" in ptr else None)
                plane_at = em.mul(k, _i64(hw))
                for u in range(m):
                    for v in range(m):
                        self._store_output(em, out[u][v], bias, ptr, em.gep(y, plane_at),
                                           plane_at, offsets[u][v], masks[u][v], act_params)
        b.ret_void()
        return fn

    def _store_output(self, em: _Emitter, value, bias, ptr, plane, plane_at, offsets, mask,
                      act_params) -> None:
        """activation(value + bias + residual), in ``ops/epilogue.apply_epilogue``'s order,
        scattered to the 16 tiles' output positions."""
        b = em.b
        if bias is not None:
            value = b.fadd(value, bias)
        if "z" in ptr:
            z_plane = em.gep(ptr["z"], plane_at)
            value = b.fadd(value, self._gather(em, self._addresses(em, z_plane, offsets), mask))
        value = VectorMath(em).activation(self.activation, value, act_params)
        self._scatter(em, value, self._addresses(em, plane, offsets), mask)

    # the entry
    def entry(self, gemm_address: int, trans_a: bool, slots: int) -> ir.Function:
        """``void symbol(x, u, y, [bias], [z], params, workspace, scratch, tid, n_threads)``:
        threads ``tid < min(n_threads, slots)`` take blocks tid, tid + workers, ..."""
        geo = self.geo
        a2 = geo.alpha ** 2
        n_ptrs = len(self.roles) + 3
        fnty = ir.FunctionType(VOID, [PF] * n_ptrs + [I32, I32])
        fn = ir.Function(self.module, fnty, self.symbol)
        fn.linkage = "internal"
        inputs, outputs = self.input_transform(), self.output_transform()
        ptr = dict(zip(self.roles, fn.args))
        params, workspace, scratch = fn.args[len(self.roles):n_ptrs]
        em = _Emitter(self.module, fn)
        b = em.b
        tid, n_threads = b.sext(fn.args[-2], I64), b.sext(fn.args[-1], I64)
        workers = em.min(em.max(n_threads, _i64(1)), _i64(slots))
        blocks = -(-geo.total_tiles // geo.block)
        m_offset = -(-geo.v_floats // VEC) * VEC
        target = b.inttoptr(_i64(gemm_address), _kernel_pointer_type())
        null = ir.Constant(PF, None)
        epilogue = [ptr[r] for r in self.roles if r in ("bias", "z")]
        # A = U^T[e]: stored [K, C] (a compile-time transpose), or U[e] itself read transposed
        lda = geo.k if trans_a else geo.c
        with b.if_then(b.icmp_signed("<", tid, workers)):
            ws = em.gep(workspace, em.mul(tid, _i64(BLOCKING.workspace_floats)))
            v = em.gep(scratch, em.mul(tid, _i64(geo.scratch_floats)))
            mt = em.gep(v, _i64(m_offset))
            with em.loop(tid, _i64(blocks), workers, "block") as block:
                t0 = em.mul(block, _i64(geo.block))
                t1 = em.min(em.add(t0, _i64(geo.block)), _i64(geo.total_tiles))
                b.call(inputs, [ptr["x"], v, t0, t1])
                b.call(target, [
                    _i64(a2), _i64(geo.k), b.sub(t1, t0), _i64(geo.c),
                    ptr["u"], _i64(lda), _i64(geo.c * geo.k),
                    v, _i64(geo.block), _i64(geo.c * geo.block),
                    mt, _i64(geo.block), _i64(geo.k * geo.block),
                    null, null, _i64(0), _i64(0), params, ws, _i64(0), _i64(1)])
                b.call(outputs, [mt, ptr["y"], *epilogue, params, t0, t1])
        b.ret_void()
        return fn
