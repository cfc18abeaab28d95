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
    VI32,
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
    scratch's rows, so both transforms run 16 tiles to a vector, walking the block in
    segments of at most 16 tiles within one tile row: the NCHW side of a segment is then a
    few contiguous runs per image row (masked loads or stores, and shuffles that deal the
    columns out to tiles), the scratch side one masked vector access. V and M stay in the
    thread's L2 between the stages (the staged ops send both through memory: 58 MB each way
    for VGG-16's 64->64@224). When a block is exactly NR (32) tiles, as there, each V^T[e]
    ([C, 32] row-major) is byte for byte the pre-packed B layout of the SGEMM kernel (one
    micro-panel: element (c, t) at c * NR + t), so the kernel's pre-packed variant reads it
    in place instead of copying it into its workspace (a partial last block leaves columns
    past N unread garbage, which only feeds C lanes that are never stored)."""
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
    # a block of exactly NR tiles: V^T[e] (rows of NR floats) already is one packed B panel
    prepacked = geo.block == BLOCKING.nr
    gemm = compile_kernel(BLOCKING, EpilogueSpec(prepacked_b=prepacked,
                                                 trans_a=transposed)).address

    def emit(module: ir.Module, symbol: str) -> ir.Function:
        kernel = _WinogradConvEmitter(module, symbol, geo, bt, at, activation, roles)
        return kernel.entry(gemm, transposed, threads)

    text = (f"Winograd F({geo.m}x{geo.m},3x3) fused: {geo.total_tiles} tiles in blocks of "
            f"{geo.block}, {a2} GEMMs {geo.block}x{c}x{k} per block (sgemm called by address)")
    return BoundFunction(ctx.name, emit, tuple(names), arrays, text)


PREFETCH_PLANES = 1  # the input transform prefetches X this many channels ahead


def _shuffle(b: ir.IRBuilder, first, second, lanes: Sequence[int]):
    """shufflevector of two <16 x float>; a lane of -1 is don't-care (llvmlite has no undef
    mask lanes, so it keeps the first operand's lane: any value serves a two-input permute)."""
    mask = ir.Constant(VI32, [lane if source < 0 else source
                              for lane, source in enumerate(lanes)])
    return b.shuffle_vector(first, second, mask)


class _WinogradConvEmitter:
    """The fused kernel's LLVM code: an entry that walks this thread's blocks, and the two
    transforms as internal functions over a block's tiles. The transforms run a segment of up
    to 16 side-by-side tiles of one tile row at a time in ``<16 x float>`` vectors (lane l:
    tile j + l), one channel after another. The scratch side (V^T, M^T: tiles contiguous) is
    one masked vector access. On the NCHW side the segment's tiles read, for each image row,
    one contiguous run of 16(m + 1) floats: m + 1 masked loads (lanes on the padding or past
    the image read zero), from which a tree of two-input shuffles picks d[r][q] (lane l:
    column (j + l)m + q - pad); the output transform interleaves out[u][0..m-1] back into
    the m contiguous chunks of an output row, masked where they pass the image's edge or
    the segment. This replaced 16-lane gathers and scatters (one per tap, slow on x86): for
    VGG-16's 64->64@224 in F(4x4) it took the layer from about 21 to about 10 ms on one
    thread (36 gathers became 30 masked loads and 96 shuffles per 16 tile-channels)."""

    def __init__(self, module: ir.Module, symbol: str, geo: WinogradGeometry, bt, at,
                 activation: str, roles: Sequence[str]):
        self.module, self.symbol, self.geo = module, symbol, geo
        self.bt, self.at = np.asarray(bt), np.asarray(at)
        self.activation, self.roles = activation, list(roles)

    # the pieces of vector code both transforms use
    @staticmethod
    def _vi(value: int) -> ir.Constant:
        return ir.Constant(VI64, [value] * VEC)

    @staticmethod
    def _dense_map(em: _Emitter, matrix: np.ndarray, values: Sequence) -> list:
        """``out[i] = sum_j matrix[i, j] * values[j]`` on vectors, with the NaN rule of
        ``lower_window.dense_map``: a zero coefficient adds ``x - x`` (+0, or NaN when x is
        infinite or NaN, as the reference's ``0 * x``). A coefficient other than 0 and +-1
        after the first term is one fused multiply-add (rounded once: within the accuracy
        bounds of tests/test_winograd_accuracy.py, and fewer instructions)."""
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
                elif total is not None:   # one fused multiply-add (rounds once, not twice)
                    total = em.fma(v, _vconst(coefficient), total)
                    continue
                else:
                    term = b.fmul(v, _vconst(coefficient))
                total = term if total is None else b.fadd(total, term)
            out.append(total)
        return out

    # the input side: tile-row segments, their image rows read contiguously
    @contextmanager
    def _row_segments(self, em: _Emitter, t0, t1):
        """Walk the tiles t0 <= t < t1 in segments of at most 16 that stay inside one tile
        row: yields (t, count, image, tile row, first tile column) as i64 scalars. Because a
        segment's tiles sit side by side, each image row they read is one contiguous run."""
        b, (th, tw) = em.b, self.geo.tiles
        pre = b.block
        head = b.append_basic_block("seg.head")
        body = b.append_basic_block("seg.body")
        done = b.append_basic_block("seg.done")
        b.branch(head)
        b.position_at_end(head)
        t = b.phi(I64, name="seg.t")
        t.add_incoming(t0, pre)
        b.cbranch(b.icmp_signed("<", t, t1), body, done)
        b.position_at_end(body)
        image = b.udiv(t, _i64(th * tw))
        rest = b.urem(t, _i64(th * tw))
        i, j = b.udiv(rest, _i64(tw)), b.urem(rest, _i64(tw))
        count = em.min(em.min(_i64(VEC), b.sub(t1, t)), b.sub(_i64(tw), j))
        yield t, count, image, i, j
        t.add_incoming(em.add(t, count), b.block)
        b.branch(head)
        b.position_at_end(done)

    def _row_chunks(self, em: _Emitter, i, j):
        """For each of the a image rows under a segment: (offset of its first column within
        a channel plane, the m + 1 lane masks of the 16-float chunks from there). Chunk k,
        lane l holds column j*m - pad + 16k + l; lanes off the image (padding, rows past
        the edge) are masked off and read as zero."""
        geo, b = self.geo, em.b
        col0 = b.sub(em.mul(j, _i64(geo.m)), _i64(geo.pads[1]))
        rows = []
        for r in range(geo.alpha):
            row = b.add(em.mul(i, _i64(geo.m)), _i64(r - geo.pads[0]))
            row_ok = b.and_(b.icmp_signed(">=", row, _i64(0)),
                            b.icmp_signed("<", row, _i64(geo.height)))
            start = b.add(em.mul(b.select(row_ok, row, _i64(0)), _i64(geo.width)), col0)
            masks = []
            for k in range(geo.m + 1):
                cols = b.add(em.splat(b.add(col0, _i64(VEC * k)), VI64),
                             ir.Constant(VI64, list(range(VEC))))
                inside = b.and_(b.icmp_signed(">=", cols, self._vi(0)),
                                b.icmp_signed("<", cols, self._vi(geo.width)))
                masks.append(b.and_(inside, em.splat(row_ok, VMASK)))
            rows.append((start, masks))
        return rows

    @staticmethod
    def _pick_lanes(em: _Emitter, chunks: Sequence, sources: Sequence[int]):
        """The vector whose lane l is element sources[l] of the chunks laid end to end,
        built as a tree of two-input shuffles (each one vpermt2ps or a blend): pairs of
        chunks first, then merges of the partial vectors (lanes nobody provides: don't-care)."""
        b = em.b
        anything = -1

        def build(lo: int, hi: int):
            """(vector or None, lanes it provides) for chunks lo..hi-1."""
            wanted = [l for l, src in enumerate(sources) if lo * VEC <= src < hi * VEC]
            if not wanted:
                return None, []
            if hi - lo <= 2:
                second = chunks[lo + 1] if hi - lo == 2 else chunks[lo]
                mask = [anything] * VEC
                for lane in wanted:
                    mask[lane] = sources[lane] - lo * VEC
                return _shuffle(b, chunks[lo], second, mask), wanted
            mid = lo + 2 * -(-(hi - lo) // 4)     # whole pairs on the left
            left, left_lanes = build(lo, mid)
            right, right_lanes = build(mid, hi)
            if left is None or right is None:
                return (left, left_lanes) if right is None else (right, right_lanes)
            mask = [anything] * VEC
            for lane in left_lanes:
                mask[lane] = lane
            for lane in right_lanes:
                mask[lane] = VEC + lane
            return _shuffle(b, left, right, mask), left_lanes + right_lanes

        return build(0, len(chunks))[0]

    def _prefetch_ahead(self, em: _Emitter, first, plane_floats: int) -> None:
        """Fetch this row's run PREFETCH_PLANES channel planes ahead: the channel loop jumps a
        whole plane per step, a stride the hardware prefetchers do not follow (prefetches
        never fault, so runs past the end of X are harmless)."""
        ahead = em.b.gep(first, [_i64(PREFETCH_PLANES * plane_floats)])
        for line in range(self.geo.m + 2):   # the run's 16(m + 1) floats span m + 2 lines
            em.prefetch(em.b.gep(ahead, [_i64(min(VEC * line, VEC * (self.geo.m + 1) - 1))]),
                        write=False)

    # the transforms
    def input_transform(self) -> ir.Function:
        """V^T[e, c, t - t0] = (B^T d B)[e] for the tiles t0 <= t < t1 of X, one tile-row
        segment of up to 16 tiles at a time: per channel and image row, m + 1 masked
        contiguous loads, from which shuffles pick d[r][q] (lane l: column (j + l)*m + q - pad)."""
        geo, a, m = self.geo, self.geo.alpha, self.geo.m
        fn = _define(self.module, f"{self.symbol}.input", VOID,
                     [("x", PF), ("v", PF), ("t0", I64), ("t1", I64)])
        x, v, t0, t1 = fn.args
        em = _Emitter(self.module, fn)
        b = em.b
        hw = geo.height * geo.width
        with self._row_segments(em, t0, t1) as (t, count, image, i, j):
            live = em.lane_mask(count, 0)
            rows = self._row_chunks(em, i, j)
            image_x = b.gep(x, [em.mul(image, _i64(geo.c * hw))])
            at = b.sub(t, t0)
            with em.loop(_i64(0), _i64(geo.c), _i64(1), "c") as c:
                plane = b.gep(image_x, [em.mul(c, _i64(hw))])
                d = []
                for start, masks in rows:
                    first = b.gep(plane, [start])     # may lie left of the plane: not inbounds
                    self._prefetch_ahead(em, first, hw)
                    chunks = [em.masked_load(b.gep(first, [_i64(VEC * k)]), mask)
                              for k, mask in enumerate(masks)]
                    d.append([self._pick_lanes(em, chunks, [m * lane + q for lane in range(VEC)])
                              for q in range(a)])
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
        t0 <= t < t1 (M^T[e, k, t - t0]), one tile-row segment at a time: shuffles interleave
        out[u][0..m-1] (lane l: tile j + l) into the m contiguous 16-float chunks of output row
        i*m + u, which get the epilogue and a masked store (positions past the output's edge
        or the segment are not stored)."""
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
        # chunk c, lane p of an output row holds out[u][v] of tile l: 16c + p = m*l + v
        sources = [[(p % m) * VEC + p // m for p in range(c * VEC, (c + 1) * VEC)]
                   for c in range(m)]
        with self._row_segments(em, t0, t1) as (t, count, image, i, j):
            live = em.lane_mask(count, 0)
            rows = self._output_rows(em, count, i, j)
            image_at = em.mul(image, _i64(geo.k * hw))
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
                plane_at = em.add(image_at, em.mul(k, _i64(hw)))
                for u, (start, masks) in enumerate(rows):
                    for c, mask in enumerate(masks):
                        value = self._pick_lanes(em, out[u], sources[c])
                        where = b.add(plane_at, b.add(start, _i64(c * VEC)))
                        self._store_output(em, value, bias, ptr, y, where, mask, act_params)
        b.ret_void()
        return fn

    def _output_rows(self, em: _Emitter, count, i, j):
        """For each of the m output rows of a segment: (offset of its first column within a
        channel plane, the m lane masks of its 16-float chunks): columns inside the output
        and the segment's count tiles, rows inside the output."""
        geo, b, m = self.geo, em.b, self.geo.m
        col0 = em.mul(j, _i64(m))
        width = em.min(_i64(geo.out_w), b.add(col0, em.mul(count, _i64(m))))
        rows = []
        for u in range(m):
            row = b.add(em.mul(i, _i64(m)), _i64(u))
            row_ok = b.icmp_signed("<", row, _i64(geo.out_h))
            start = b.add(em.mul(b.select(row_ok, row, _i64(0)), _i64(geo.out_w)), col0)
            masks = []
            for c in range(m):
                cols = b.add(em.splat(b.add(col0, _i64(VEC * c)), VI64),
                             ir.Constant(VI64, list(range(VEC))))
                inside = b.icmp_signed("<", cols, em.splat(width, VI64))
                masks.append(b.and_(inside, em.splat(row_ok, VMASK)))
            rows.append((start, masks))
        return rows

    def _store_output(self, em: _Emitter, value, bias, ptr, y, where, mask, act_params) -> None:
        """activation(value + bias + residual), in ``ops/epilogue.apply_epilogue``'s order,
        stored to the 16 contiguous output positions from ``y + where`` that ``mask`` keeps."""
        b = em.b
        if bias is not None:
            value = b.fadd(value, bias)
        if "z" in ptr:
            value = b.fadd(value, em.masked_load(b.gep(ptr["z"], [where]), mask))
        value = VectorMath(em).activation(self.activation, value, act_params)
        em.masked_store(value, b.gep(y, [where]), mask)

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
