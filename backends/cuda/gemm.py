"""GEMM-shaped nodes on the GPU: a generated, tiled shared-memory (batched) GEMM with the fused
epilogue ``activation(alpha * A @ B + beta * bias + R)``.

Every GEMM-shaped node -- ``Gemm``/``FusedGemm`` (transposes, alpha, a broadcast C, residual Z),
``MatMul`` (numpy.matmul: 1-D operands, broadcast batch dims; Winograd's batched product over
the (m+2)^2 transformed positions is one) and ``ConvGemm`` (per image and group, im2col's GEMM)
-- is described as one ``GemmProblem``: M, N, K, a list of batch extents, and for each operand
(A, B, C, bias, R) its element strides along rows, columns and every batch dim. Transposes,
broadcasts (stride 0), groups and batches are therefore only strides, baked into the generated
source as constants, so no operand is ever copied or packed: constants are used as uploaded.

Kernel (``gemm_source``): a block computes a ``bm x bn`` tile of C for one batch item
(``blockIdx.z``, grid-stride over the batch); per step of ``bk`` along K its threads stage the A
and B tiles in shared memory (each cooperative load walks the operand's contiguous direction
first, so global reads coalesce; out-of-range elements load 0, which handles partial tiles at
every edge), synchronise, and each thread accumulates an ``rm x rn`` micro-tile in registers
from rows ``ty + i * TY`` and columns ``tx + j * TX`` (consecutive threads -> consecutive
columns: conflict-free shared reads and coalesced stores). The epilogue runs on the registers
before the one store of C; its arithmetic is kernel IR built with the elementwise ops' own scalar
rules (``backends.lower.apply_scalar``) and rendered by ``codegen.Emitter``, so it is the CPU
backend's epilogue, not a copy.

Numerics: products are summed in tile order (not numpy's), so results match the interpreter to a
tolerance; on a GPU NVVM may contract ``a * b + c`` into FMA (its default). f32 and f64 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphc.ir import Graph, Node
from graphc.ops import registry
from graphc.ops.epilogue import ACTIVATIONS
from graphc.ops.rules import broadcast_dims
from graphc.types import TensorType

from .. import kernel_ir as k
from ..lower import Block, KernelBuilder, LowerContext, LoweringError, Scalar, _c, apply_scalar
from .codegen import Emitter, np_name

GEMM_OPS = frozenset({"Gemm", "FusedGemm", "MatMul", "ConvGemm"})
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class GemmTiling:
    """Block tile ``bm x bn``, K step ``bk``, per-thread micro-tile ``rm x rn``."""

    bm: int = 64
    bn: int = 64
    bk: int = 16
    rm: int = 4
    rn: int = 4

    def __post_init__(self):
        if self.bm % self.rm or self.bn % self.rn:
            raise LoweringError(f"GEMM tiling {self}: bm/bn must be multiples of rm/rn")

    @property
    def block(self) -> tuple[int, int]:
        """(threads along x = columns, threads along y = rows)."""
        return self.bn // self.rn, self.bm // self.rm


DEVICE_TILING = GemmTiling(64, 64, 16, 4, 4)
SIMULATOR_TILING = GemmTiling(8, 16, 16, 4, 8)  # 2x2 threads: the simulator runs each in Python


@dataclass(frozen=True)
class Operand:
    """Element ``(b..., r, c)`` of a matrix operand is at ``sum(b * batch) + r * row + c * col``
    in the flat buffer bound to graph value ``value``."""

    value: str
    batch: tuple
    row: int
    col: int


@dataclass(frozen=True)
class GemmProblem:
    """``C = activation(alpha * A @ B + beta * bias + R)`` for every batch item."""

    dtype: str
    m: int
    n: int
    k: int
    batch: tuple          # batch extents, outermost first
    a: Operand            # rows M, columns K
    b: Operand            # rows K, columns N
    c: Operand            # rows M, columns N (the output)
    bias: Operand | None = None
    residual: Operand | None = None
    alpha: float = 1.0
    beta: float = 1.0
    activation: str = ""
    activation_params: tuple = ()

    @property
    def items(self) -> int:
        return math.prod(self.batch)

    @property
    def operands(self) -> tuple[tuple[str, Operand], ...]:
        roles = (("a", self.a), ("b", self.b), ("c", self.c), ("bias", self.bias),
                 ("r", self.residual))
        return tuple((r, o) for r, o in roles if o is not None)

    def describe(self) -> str:
        batch = "x".join(str(e) for e in self.batch) or "1"
        extras = [f"alpha={self.alpha:g}"] if self.alpha != 1 else []
        extras += ["bias" + (f"*{self.beta:g}" if self.beta != 1 else "")] if self.bias else []
        extras += ["residual"] if self.residual else []
        extras += [self.activation] if self.activation else []
        return (f"gemm {self.dtype} batch {batch} of M={self.m} N={self.n} K={self.k}"
                + (f" + {', '.join(extras)}" if extras else ""))


# -- node -> problem ------------------------------------------------------------------------------
def context(graph: Graph, node: Node, dims: dict) -> LowerContext:
    """What a lowering sees of ``node`` with symbolic dims bound (as ``lower_node`` builds it)."""
    def static(t: TensorType | None):
        if t is None:
            return None
        return TensorType(tuple(dims.get(d, d) if isinstance(d, str) else d for d in t.shape),
                          t.dtype)

    return LowerContext(graph, node, node.opdef.full_attrs(node.attrs),
                        [static(graph.type_of(v)) if v is not None else None
                         for v in node.inputs],
                        [static(t) for t in node.types],
                        [graph.constant_value(v) for v in node.inputs], node.name)


def describe_gemm(ctx: LowerContext) -> GemmProblem:
    """The GemmProblem of a GEMM-shaped node (LoweringError naming the node otherwise)."""
    for i, t in enumerate(list(ctx.in_types) + list(ctx.out_types)):
        if t is not None and t.dtype not in ("f32", "f64"):
            raise ctx.error(f"operand {i} has dtype {t.dtype}; the CUDA GEMM takes f32 and f64")
        if t is not None and not t.is_static:
            raise ctx.shape_error(f"operand {i} has symbolic shape {t}; bind its dims")
    describe = {"ConvGemm": _conv_gemm, "MatMul": _matmul, "Gemm": _gemm, "FusedGemm": _gemm}
    if ctx.node.op not in describe:
        raise ctx.error("is not a GEMM-shaped op")
    return describe[ctx.node.op](ctx)


def _epilogue_attrs(ctx: LowerContext) -> dict:
    return {"activation": ctx.attrs.get("activation", ""),
            "activation_params": tuple(ctx.attrs.get("activation_params", ()))}


def _conv_gemm(ctx: LowerContext) -> GemmProblem:
    """Per image i and group g: Y[i, g*Kg:(g+1)*Kg] = W2[g] @ COLS[i, g] (+ B, Z, act)."""
    groups, kg, rows = ctx.in_types[0].shape
    images, _, _, p = ctx.in_types[1].shape
    node = ctx.node
    c_batch = (groups * kg * p, kg * p)
    bias = Operand(node.inputs[2], (0, kg), 1, 0) if ctx.has_input(2) else None
    residual = Operand(node.inputs[3], c_batch, p, 1) if ctx.has_input(3) else None
    return GemmProblem(ctx.in_types[0].dtype, kg, p, rows, (images, groups),
                       Operand(node.inputs[0], (0, kg * rows), rows, 1),
                       Operand(node.inputs[1], (groups * rows * p, rows * p), p, 1),
                       Operand(node.outputs[0], c_batch, p, 1), bias, residual,
                       **_epilogue_attrs(ctx))


def _item_strides(batch: tuple, out_batch: tuple, item: int) -> tuple:
    """Strides along ``out_batch`` of contiguous items of ``item`` elements with batch dims
    ``batch`` (right-aligned); 0 along the dims it broadcasts."""
    padded = (1,) * (len(out_batch) - len(batch)) + tuple(batch)
    strides, step = [], item
    for size in reversed(padded):
        strides.append(0 if size == 1 else step)
        step *= size
    return tuple(reversed(strides))


def _matmul(ctx: LowerContext) -> GemmProblem:
    """numpy.matmul: a 1-D A is a row, a 1-D B a column; batch dims broadcast."""
    a_t, b_t = ctx.in_types
    sa = (1,) + a_t.shape if a_t.rank == 1 else a_t.shape
    sb = b_t.shape + (1,) if b_t.rank == 1 else b_t.shape
    m, kk = sa[-2:]
    n = sb[-1]
    out_batch = tuple(broadcast_dims(sa[:-2], sb[:-2], ctx.opcall()))
    node = ctx.node
    return GemmProblem(a_t.dtype, m, n, kk, out_batch,
                       Operand(node.inputs[0], _item_strides(sa[:-2], out_batch, m * kk), kk, 1),
                       Operand(node.inputs[1], _item_strides(sb[:-2], out_batch, kk * n), n, 1),
                       Operand(node.outputs[0], _item_strides(out_batch, out_batch, m * n), n, 1))


def _gemm(ctx: LowerContext) -> GemmProblem:
    """alpha * A' @ B' + beta * C (+ Z, activation): transposes are strides, C broadcasts."""
    attrs, node = ctx.attrs, ctx.node
    m, n = ctx.out_types[0].shape
    a_shape = ctx.in_types[0].shape
    kk = a_shape[0] if attrs["transA"] else a_shape[1]
    a = Operand(node.inputs[0], (), 1, m) if attrs["transA"] else Operand(node.inputs[0], (),
                                                                           kk, 1)
    b = Operand(node.inputs[1], (), 1, kk) if attrs["transB"] else Operand(node.inputs[1], (),
                                                                           n, 1)
    bias = None
    if ctx.has_input(2):
        cm, cn = ((1, 1) + tuple(ctx.in_types[2].shape))[-2:]
        bias = Operand(node.inputs[2], (), cn if cm != 1 else 0, 1 if cn != 1 else 0)
    has_z = len(node.inputs) > 3 and node.inputs[3] is not None
    residual = Operand(node.inputs[3], (), n, 1) if has_z else None
    return GemmProblem(ctx.out_types[0].dtype, m, n, kk, (), a, b,
                       Operand(node.outputs[0], (), n, 1), bias, residual,
                       float(attrs["alpha"]), float(attrs["beta"]), **_epilogue_attrs(ctx))


# -- problem -> source ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CudaGemm:
    """A GEMM as CUDA source (``kernel(p_a, p_b, p_c[, p_bias][, p_r])``) and its launch."""

    name: str
    problem: GemmProblem
    source: str
    grid: tuple
    block: tuple

    @property
    def values(self) -> tuple:
        return tuple(o.value for _, o in self.problem.operands)

    @property
    def empty(self) -> bool:
        p = self.problem
        return p.m == 0 or p.n == 0 or p.items == 0


def epilogue_block(ctx: LowerContext, problem: GemmProblem) -> tuple[Block, object]:
    """The epilogue as kernel IR over locals ``acc`` (the product), ``bias_v`` and ``res_v``:
    the statements and the value to store, in ``apply_epilogue``'s order of operations."""
    block = Block(KernelBuilder(ctx))
    dtype = problem.dtype
    y = k.Local("acc", dtype)
    if problem.alpha != 1:
        y = block.let(k.Binary("*", y, _c(problem.alpha, y)))
    if problem.bias is not None:
        bias = k.Local("bias_v", dtype)
        if problem.beta != 1:
            bias = block.let(k.Binary("*", bias, _c(problem.beta, bias)))
        y = block.let(k.Binary("+", y, bias))
    if problem.residual is not None:
        y = block.let(k.Binary("+", y, k.Local("res_v", dtype)))
    if problem.activation:
        act = ACTIVATIONS[problem.activation]
        params = list(problem.activation_params)
        attrs = registry.get(act.op).full_attrs(dict(zip(act.attrs, params[:len(act.attrs)])))
        extra = [_c(p, y) for p in params[len(act.attrs):]]
        y = apply_scalar(act.op, Scalar(block, ctx.error, attrs), [y, *extra])
    return block, y


def _offset(op: Operand, problem: GemmProblem) -> str:
    """Python expression of the operand's offset for batch item ``z``."""
    terms, inner = [], 1
    for extent, stride in reversed(list(zip(problem.batch, op.batch))):
        if stride and extent > 1:
            index = "z" if inner == 1 else f"(z // {inner})"
            index = index if inner * extent == problem.items else f"({index} % {extent})"
            terms.append(f"{index} * {stride}")
        inner *= extent
    return " + ".join(reversed(terms)) or "0"


def _tile_load(role: str, op: Operand, at: tuple, limits: tuple, shape: tuple, dtype: str,
               threads: int) -> list[str]:
    """Lines staging the ``shape`` tile at (``at``) of operand ``role`` (a or b) into shared
    array ``s<role>``, zeros outside ``limits``; the element order follows the operand's
    contiguous direction (coalesced reads). A's tile is stored transposed ([k, m])."""
    tr, tc = shape
    col_fast = op.col == 1 or op.row != 1
    split = (f"r = e // {tc}", f"c = e % {tc}") if col_fast else (f"c = e // {tr}",
                                                                  f"r = e % {tr}")
    target = f"s{role}[c, r]" if role == "a" else f"s{role}[r, c]"
    return [f"for e in range(tid, {tr * tc}, {threads}):",
            f"    {split[0]}", f"    {split[1]}",
            f"    gr = {at[0]} + r", f"    gc = {at[1]} + c",
            f"    v = {np_name(dtype)}(0)",
            f"    if gr < {limits[0]} and gc < {limits[1]}:",
            f"        v = p_{role}[{role}0 + gr * {op.row} + gc * {op.col}]",
            f"    {target} = v"]


def gemm_source(ctx: LowerContext, problem: GemmProblem, tiling: GemmTiling) -> CudaGemm:
    """The CUDA source of ``problem`` with ``tiling`` (see the module docstring)."""
    t, p, dt = tiling, problem, problem.dtype
    tx, ty = t.block
    grid_y = -(-p.m // t.bm)
    if grid_y > MAX_GRID_Y:
        raise ctx.error(f"M={p.m} needs {grid_y} row tiles; the grid allows {MAX_GRID_Y}")
    roles = [r for r, _ in p.operands]
    ops = dict(p.operands)
    pad = 1 if t.bm % 32 == 0 else 0  # A's tile is stored transposed: avoid bank conflicts
    body = [f"# {ctx.node.op} node '{ctx.node.name}': {p.describe()}",
            f"# tiling {t.bm}x{t.bn}x{t.bk}, {t.rm}x{t.rn} per thread, {tx}x{ty} threads",
            f"def kernel({', '.join('p_' + r for r in roles)}):",
            f"    sa = cuda.shared.array(({t.bk}, {t.bm + pad}), {np_name(dt)})",
            f"    sb = cuda.shared.array(({t.bk}, {t.bn}), {np_name(dt)})",
            f"    accs = cuda.local.array(({t.rm}, {t.rn}), {np_name(dt)})",
            f"    ra = cuda.local.array({t.rm}, {np_name(dt)})",
            f"    rb = cuda.local.array({t.rn}, {np_name(dt)})",
            "    tx = cuda.threadIdx.x", "    ty = cuda.threadIdx.y",
            f"    tid = ty * {tx} + tx",
            f"    row0 = cuda.blockIdx.y * {t.bm}", f"    col0 = cuda.blockIdx.x * {t.bn}",
            f"    for z in range(cuda.blockIdx.z, {p.items}, cuda.gridDim.z):"]
    inner = [f"{r}0 = {_offset(ops[r], p)}" for r in roles]
    inner += [f"for i in range({t.rm}):", f"    for j in range({t.rn}):",
              f"        accs[i, j] = {np_name(dt)}(0)",
              f"for k0 in range(0, {p.k}, {t.bk}):"]
    loads = (_tile_load("a", p.a, ("row0", "k0"), (p.m, p.k), (t.bm, t.bk), dt, tx * ty)
             + _tile_load("b", p.b, ("k0", "col0"), (p.k, p.n), (t.bk, t.bn), dt, tx * ty))
    inner += ["    " + line for line in loads]
    inner += ["    cuda.syncthreads()", f"    for kk in range({t.bk}):",
              f"        for i in range({t.rm}):", f"            ra[i] = sa[kk, ty + i * {ty}]",
              f"        for j in range({t.rn}):", f"            rb[j] = sb[kk, tx + j * {tx}]",
              f"        for i in range({t.rm}):", f"            for j in range({t.rn}):",
              (f"                accs[i, j] = {np_name(dt)}(accs[i, j] + "
               f"{np_name(dt)}(ra[i] * rb[j]))"),
              "    cuda.syncthreads()"]
    inner += _epilogue_lines(ctx, p, t)
    body += ["        " + line for line in inner]
    source = "\n".join(body) + "\n"
    grid = (-(-p.n // t.bn), grid_y, max(1, min(p.items, MAX_GRID_Y)))
    return CudaGemm(ctx.node.name, p, source, grid, (tx, ty))


def _epilogue_lines(ctx: LowerContext, p: GemmProblem, t: GemmTiling) -> list[str]:
    tx, ty = t.block
    block, value = epilogue_block(ctx, p)
    em = Emitter(ctx.node.name, {}, {}, {})
    scope = {"acc": "acc", "bias_v": "bias_v", "res_v": "res_v"}
    em.used |= {"acc", "bias_v", "res_v", "z", "i", "j", "gm", "gn", "e", "r", "c", "v", "gr",
                "gc", "kk", "k0", "tx", "ty", "tid", "row0", "col0", "sa", "sb", "ra", "rb",
                "accs"} | {f"{r}0" for r, _ in p.operands}
    lines = [f"for i in range({t.rm}):", f"    gm = row0 + ty + i * {ty}",
             f"    for j in range({t.rn}):", f"        gn = col0 + tx + j * {tx}",
             f"        if gm < {p.m} and gn < {p.n}:", "            acc = accs[i, j]"]
    for role, local in (("bias", "bias_v"), ("r", "res_v")):
        op = dict(p.operands).get(role)
        if op is not None:
            lines.append(f"            {local} = p_{role}[{role}0 + gm * {op.row} + gn * {op.col}]")
    for s in block.stmts:  # one scope: the Lets stay visible to the stored value
        em.stmt(s, scope, 3)
    lines += em.lines
    lines.append(f"            p_c[c0 + gm * {p.c.row} + gn * {p.c.col}] = "
                 f"{em.expr(value, scope)}")
    return lines
