"""Matrix products: Gemm (alpha * A' @ B' + beta * C, the fully connected layer of ONNX) and
MatMul (numpy ``matmul``: 1-D operands and broadcast batch dims).

Semantics are those of ONNX Gemm-13 and MatMul-13. Both require operands of one dtype and
return that dtype.
"""

from __future__ import annotations

import numpy as np

from ..types import FLOAT_DTYPES, TensorType
from .elementwise import check_dtypes, check_unidirectional
from .gradients import vjp
from .registry import OpCall, OpDef, float_, int_, register
from .rules import broadcast_dims

# ONNX's type constraint for Gemm and MatMul (bfloat16 aside).
MATMUL_DTYPES = FLOAT_DTYPES + ("i32", "i64", "u32", "u64")


def _same_dtype(call: OpCall) -> str:
    check_dtypes(call, MATMUL_DTYPES, "float or 32/64-bit integer")
    dtypes = {t.dtype for t in call.in_types if t is not None}
    if len(dtypes) > 1:
        raise call.error(f"operand dtypes differ: {', '.join(sorted(dtypes))}")
    return call.in_types[0].dtype


def _dims_agree(a, b) -> bool:
    """Equal, or not comparable statically (a symbolic dim)."""
    return a == b or isinstance(a, str) or isinstance(b, str)


# -- Gemm ----------------------------------------------------------------------------------------
def gemm_dims(call: OpCall) -> tuple:
    """(M, K, N) from A and B after the optional transpositions."""
    a, b = call.in_types[0], call.in_types[1]
    for name, t in (("A", a), ("B", b)):
        if t.rank != 2:
            raise call.error(f"{name} must be a matrix (rank 2), got {t}")
    m, k = reversed(a.shape) if call["transA"] else a.shape
    kb, n = reversed(b.shape) if call["transB"] else b.shape
    if not _dims_agree(k, kb):
        raise call.error(f"inner dims differ: A' is {m}x{k}, B' is {kb}x{n} "
                         f"(transA={call['transA']}, transB={call['transB']})")
    return m, k if isinstance(k, int) else kb, n


def gemm_type(call: OpCall) -> list[TensorType]:
    dtype = _same_dtype(call)
    m, _, n = gemm_dims(call)
    if call.has_input(2):
        check_unidirectional(call, call.in_types[2], (m, n), "C")
    return [TensorType((m, n), dtype)]


def gemm_ref(call: OpCall, a: np.ndarray, b: np.ndarray, c=None) -> np.ndarray:
    if call["transA"]:
        a = a.T
    if call["transB"]:
        b = b.T
    y = np.matmul(a, b)
    if call["alpha"] != 1:  # skipping exact factors keeps integer products exact
        y = y * call["alpha"]
    if c is not None:  # added even when beta == 0, so that NaN in C propagates
        y = y + (c if call["beta"] == 1 else c * call["beta"])
    return y.astype(a.dtype, copy=False)  # integer operands times a float factor promote


def gemm_flops(call: OpCall, out_types) -> int:
    m, k, n = gemm_dims(call)
    if not all(isinstance(d, int) for d in (m, k, n)):
        return 0
    return 2 * m * n * k


register(OpDef(
    name="Gemm", inputs=("A", "B", "C?"), outputs=("Y",),
    attrs={"alpha": float_(1.0), "beta": float_(1.0), "transA": int_(0, choices=(0, 1)),
           "transB": int_(0, choices=(0, 1))},
    infer=gemm_type, reference=gemm_ref, kind="out-fusable", flops=gemm_flops,
    doc="alpha * A' @ B' + beta * C, where A' = A.T if transA (B' likewise); C broadcasts to "
        "(M, N)"))


# -- MatMul --------------------------------------------------------------------------------------
def matmul_shape(call: OpCall) -> tuple[tuple, int]:
    """Output shape and the contracted length K (0 if symbolic), as numpy.matmul defines them."""
    a, b = call.in_types
    if a.rank == 0 or b.rank == 0:
        raise call.error(f"operands must have rank >= 1, got {a} and {b}")
    sa = (1,) + a.shape if a.rank == 1 else a.shape  # a vector is a row on the left ...
    sb = b.shape + (1,) if b.rank == 1 else b.shape  # ... and a column on the right
    if not _dims_agree(sa[-1], sb[-2]):
        raise call.error(f"inner dims differ: {a} @ {b} contracts {sa[-1]} with {sb[-2]}")
    batch = broadcast_dims(sa[:-2], sb[:-2], call)
    rows = () if a.rank == 1 else (sa[-2],)
    cols = () if b.rank == 1 else (sb[-1],)
    k = sa[-1] if isinstance(sa[-1], int) else sb[-2]
    return batch + rows + cols, k if isinstance(k, int) else 0


def matmul_type(call: OpCall) -> list[TensorType]:
    dtype = _same_dtype(call)
    return [TensorType(matmul_shape(call)[0], dtype)]


def matmul_ref(call: OpCall, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(a, b)


def matmul_flops(call: OpCall, out_types) -> int:
    out = out_types[0]
    if not out.is_static:
        return 0
    return 2 * out.numel * matmul_shape(call)[1]


register(OpDef(
    name="MatMul", inputs=("A", "B"), outputs=("Y",), infer=matmul_type, reference=matmul_ref,
    kind="out-fusable", flops=matmul_flops,
    doc="matrix product with numpy.matmul semantics (1-D operands, broadcast batch dims)"))


# -- gradient (vjp) rules (see graphc.autodiff) -------------------------------------------------
@vjp("Gemm")
def _gemm_grad(ctx, node, grads):
    """Y = alpha A' B' + beta C: dA' = alpha dY B'^T and dB' = alpha A'^T dY, written as Gemms
    whose trans flags undo A' = A^T / B' = B^T, so no Transpose node is needed."""
    (g,) = grads
    a, b = ctx.input(0), ctx.input(1)
    alpha, beta = ctx.attrs["alpha"], ctx.attrs["beta"]
    ta, tb = ctx.attrs["transA"], ctx.attrs["transB"]
    scale = {} if alpha == 1 else {"alpha": alpha}
    da = db = dc = None
    if ctx.needs(0):
        # transA=0: dA = dY B'^T;  transA=1: dA = (dY B'^T)^T = B' dY^T
        if not ta:
            da = ctx.op("Gemm", g, b, transB=1 - tb, **scale)
        else:
            da = ctx.op("Gemm", b, g, transA=tb, transB=1, **scale)
    if ctx.needs(1):
        # transB=0: dB = A'^T dY;  transB=1: dB = (A'^T dY)^T = dY^T A'
        if not tb:
            db = ctx.op("Gemm", a, g, transA=1 - ta, **scale)
        else:
            db = ctx.op("Gemm", g, a, transA=1, transB=ta, **scale)
    if ctx.needs(2):
        dc = ctx.unbroadcast(g if beta == 1 else g * beta, 2)
    return [da, db, dc]


def _swap_last(ctx, x):
    """x with its last two axes swapped."""
    perm = list(range(x.type.rank))
    perm[-2:] = perm[-1], perm[-2]
    return ctx.transpose(x, perm)


@vjp("MatMul")
def _matmul_grad(ctx, node, grads):
    """Y = A @ B: dA = dY @ B^T, dB = A^T @ dY, summed over broadcast batch dims. A vector
    operand is promoted to a matrix first (a row on the left, a column on the right), as
    numpy.matmul does, and the gradient reshaped back."""
    (g,) = grads
    a, b = ctx.input(0), ctx.input(1)
    a2 = ctx.op("Unsqueeze", a, ctx.ints([0])) if a.type.rank == 1 else a
    b2 = ctx.op("Unsqueeze", b, ctx.ints([1])) if b.type.rank == 1 else b
    if a.type.rank == 1:
        g = ctx.op("Unsqueeze", g, ctx.ints([g.type.rank - (b.type.rank > 1)]))
    if b.type.rank == 1:
        g = ctx.op("Unsqueeze", g, ctx.ints([g.type.rank]))
    da = db = None
    if ctx.needs(0):
        da = ctx.unbroadcast(ctx.op("MatMul", g, _swap_last(ctx, b2)), a2.type)
        da = ctx.reshape_like(da, 0)
    if ctx.needs(1):
        db = ctx.unbroadcast(ctx.op("MatMul", _swap_last(ctx, a2), g), b2.type)
        db = ctx.reshape_like(db, 1)
    return [da, db]
