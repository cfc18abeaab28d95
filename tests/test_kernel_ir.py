"""The kernel IR and the lowering of nodes into it: printing, verification, interval arithmetic,
the thread split, and the structure and errors of lowerings (their numerics, JIT-compiled and run
against ``graphc.interpret``, are in ``test_llvm_codegen.py``)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import graphc
from backends import kernel_ir as k
from backends.kernel_ir import INDEX, Binary, Const, For, Kernel, Let, Load, Store, Var
from backends.lower import LOWERINGS, LoweringError, coalesce, column_tiles, lower_node
from graphc.errors import GraphcError, ShapeError, UnsupportedOpError, VerificationError
from graphc.ops import registry
from graphc.types import TensorType, dtype_name


# -- shared helper (also used by test_llvm_codegen.py) --------------------------------------------
def one_node(op, inputs, attrs=None, consts=(), n_outputs=None, names=None):
    """A graph of one ``op`` node. Input ``i`` is the graph input ``in{i}`` fed with
    ``inputs[i]``, or a Constant when ``i`` is in ``consts``; ``None`` is an absent optional input.
    Returns (graph, node, feeds)."""
    g = graphc.Graph("one")
    operands = []
    for i, a in enumerate(inputs):
        if a is None:
            operands.append(None)
        elif i in consts:
            operands.append(g.add_constant(np.asarray(a), f"c{i}"))
        else:
            a = np.asarray(a)
            name = names[i] if names else f"in{i}"
            operands.append(g.add_input(name, TensorType(a.shape, dtype_name(a.dtype))))
    outputs = [f"out{i}" for i in range(n_outputs)] if n_outputs else None
    results = g.add_node(op, operands, attrs or {}, outputs=outputs, name="node")
    g.set_outputs([r for r in results if r is not None])
    feeds = {g.inputs[j]: np.asarray(a) for j, a in enumerate(
        a for i, a in enumerate(inputs) if a is not None and i not in consts)}
    return g, g.node("node"), feeds


def _f32(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


# -- printing -------------------------------------------------------------------------------------
def _sample_kernel() -> Kernel:
    """Every construct of the IR once."""
    i, j = Var("i0"), Var("i1")
    x = Load("x", (i, k.Lookup("T0", j)), "f32")
    acc = k.Local("acc0", "f64")
    body = (
        For("i0", 3, (
            Let("acc0", Const(-0.0, "f64"), mutable=True),
            For("i1", 4, (
                Let("t0", k.Select(k.Compare("<", x, Const(0.5, "f32")),
                                   k.Unary("exp", k.Unary("neg", x)), Const(np.inf, "f32"))),
                k.Accumulate("acc0", "add", k.Cast(k.Local("t0", "f32"), "f64")),
                Store("m", (i, j), k.Compare("!=", k.Local("t0", "f32"), Const(np.nan, "f32"))),
            ), vectorize=True),
            k.Assign("acc0", Binary("max", acc, Const(1, "f64"))),
            Store("s", (Binary("//", Binary("+", i, Const(1, INDEX)), Const(2, INDEX)),
                        Binary("%", i, Const(2, INDEX))), k.Cast(acc, "i32")),
        ), parallel=True),
    )
    params = (k.Buffer("x", "f32", (3, 5), strides=(1, 3)),
              k.Buffer("m", "bool", (3, 4), output=True),
              k.Buffer("s", "i32", (2, 2), output=True))
    return Kernel("sample", params, body, (k.Table("T0", (4, 0, 2, 2)),), doc="a sample")


GOLDEN = """\
// a sample
kernel sample(x: f32[3,5] strides(1,3) in, m: bool[3,4] out, s: i32[2,2] out) {
  table T0: index[4] = [4, 0, 2, 2]
  parallel for i0 in 0..3 {
    var acc0: f64 = -0.0:f64
    vectorize for i1 in 0..4 {
      let t0: f32 = select(x[i0, T0[i1]] < 0.5, exp(-x[i0, T0[i1]]), inf)
      acc0 += cast<f64>(t0)
      m[i0, i1] = t0 != nan
    }
    acc0 = max(acc0, 1.0:f64)
    s[(i0 + 1) // 2, i0 % 2] = cast<i32>(acc0)
  }
}"""


def test_format_kernel_is_the_golden_text_and_verifies():
    kernel = k.verify(_sample_kernel())
    assert k.format_kernel(kernel) == GOLDEN
    assert str(kernel) == GOLDEN


def test_format_parenthesises_by_precedence():
    a, b, c = Var("a"), Var("b"), Var("c")
    assert k.format_expr(Binary("-", a, Binary("-", b, c))) == "a - (b - c)"
    assert k.format_expr(Binary("-", Binary("-", a, b), c)) == "a - b - c"
    assert k.format_expr(Binary("*", Binary("+", a, b), c)) == "(a + b) * c"
    assert k.format_expr(k.Unary("neg", Binary("+", a, b))) == "-(a + b)"
    assert k.format_expr(Binary("+", a, Const(-2, INDEX))) == "a + -2"
    assert k.format_expr(Const(3, "u8")) == "3:u8"
    assert k.format_expr(Const(True, "bool")) == "true"


def test_long_tables_print_a_digest():
    kernel = dataclasses.replace(_sample_kernel(), tables=(k.Table("T0", tuple(range(40))),))
    text = k.format_kernel(kernel)
    assert "table T0: index[40] = [0, 1, 2, 3, 4, 5, 6, 7, ... #" in text
    assert "39" not in text.splitlines()[2]


def test_constants_hold_the_value_the_target_uses():
    assert Const(0.1, "f32").value == float(np.float32(0.1))
    assert Const(0.1, "f64").value == 0.1
    assert Const(2.7, "i32").value == 2
    assert Const(0.0, "f32") != Const(-0.0, "f32")
    assert Const(np.nan, "f32") == Const(np.nan, "f32")
    with pytest.raises(k.KernelIRError, match="unknown dtype"):
        Const(1, "f8")


# -- verification ---------------------------------------------------------------------------------
def _base(body=None, params=None, tables=(), inplace=()) -> Kernel:
    """x: f32[4,6] in -> y: f32[4,6] out, y = 2x; ``body`` replaces the inner statements."""
    i, j = Var("i0"), Var("i1")
    inner = body if body is not None else (
        Let("t0", Load("x", (i, j), "f32")),
        Store("y", (i, j), Binary("*", k.Local("t0", "f32"), Const(2, "f32"))))
    params = params or (k.Buffer("x", "f32", (4, 6)), k.Buffer("y", "f32", (4, 6), output=True))
    return Kernel("base", params, (For("i0", 4, (For("i1", 6, tuple(inner)),), parallel=True),),
                  tables, inplace)


I, J = Var("i0"), Var("i1")
T0 = k.Local("t0", "f32")
LOAD = Let("t0", Load("x", (I, J), "f32"))


def _store(value, at=(I, J), buffer="y"):
    return Store(buffer, at, value)


BAD_KERNELS = {
    "store to an input": (_base([LOAD, _store(T0, buffer="x")]), "store to input buffer 'x'"),
    "index out of bounds": (_base([Let("t0", Load("x", (I, Binary("+", J, Const(1, INDEX))),
                                                  "f32")), _store(T0)]),
                            r"axis 1, size 6\) ranges over \[1, 6\]"),
    "negative index": (_base([_store(Const(1, "f32"), (Binary("-", I, Const(1, INDEX)), J))]),
                       r"ranges over \[-1, 2\]"),
    "unknown local": (_base([_store(k.Local("t9", "f32"))]), "'t9' is used outside its scope"),
    "rank mismatch": (_base([_store(Const(1, "f32"), (I,))]), "rank 2, indexed with 1"),
    "dtype mismatch": (_base([LOAD, _store(Binary("+", T0, Const(1, "f64")))]), "differ in dtype"),
    "store dtype": (_base([_store(Const(1, "f64"))]), "store of f64 into f32 buffer"),
    "data as index": (_base([LOAD, _store(Const(1, "f32"), (I, T0))]), "is not an index"),
    "float floor-div": (_base([LOAD, _store(Binary("//", T0, T0))]), "'//' of f32"),
    "zero divisor": (_base([_store(Const(1, "f32"), (Binary("%", I, Const(0, INDEX)), J))]),
                     "constant positive divisor"),
    "exp of an int": (_base([_store(k.Cast(k.Unary("exp", Const(1, "i32")), "f32"))]),
                      "exp of i32"),
    "assign immutable": (_base([LOAD, k.Assign("t0", T0), _store(T0)]),
                         "'t0' is not a mutable local"),
    "shadowing": (_base([For("i0", 2, (_store(Const(1, "f32")),))]), "'i0' shadows"),
    "nested parallel": (_base([For("i2", 2, (), parallel=True)]), "'i2' is not top-level"),
    "unknown buffer": (_base([_store(Const(1, "f32"), buffer="z")]), "unknown buffer 'z'"),
    "lookup out of range": (_base([_store(Const(1, "f32"), (I, k.Lookup("T0", J)))],
                                  tables=(k.Table("T0", (0, 1, 2)),)),
                            r"ranges over \[0, 5\] of a table of 3"),
    "lookup value out of range": (_base([_store(Const(1, "f32"), (I, k.Lookup("T0", I)))],
                                        tables=(k.Table("T0", (0, 1, 2, 6)),)),
                                  r"ranges over \[0, 6\]"),
    "inplace read elsewhere": (_base([Let("t0", Load("x", (I, Binary("-", Const(5, INDEX), J)),
                                                     "f32")), _store(T0)],
                                     inplace=(("x", "y"),)), "read other than just before"),
    "inplace type": (_base(params=(k.Buffer("x", "f32", (4, 6)),
                                   k.Buffer("y", "f32", (4, 6), strides=(1, 4), output=True)),
                           inplace=(("x", "y"),)), r"inplace pair \(x, y\) differ in type"),
    "bad strides": (_base(params=(k.Buffer("x", "f32", (4, 6), strides=(1,)),
                                  k.Buffer("y", "f32", (4, 6), output=True))),
                    "strides .* do not fit"),
    "duplicate names": (_base(params=(k.Buffer("y", "f32", (4, 6)),
                                      k.Buffer("y", "f32", (4, 6), output=True))),
                        "'y' is used twice"),
    "no output": (_base(params=(k.Buffer("x", "f32", (4, 6)), k.Buffer("y", "f32", (4, 6)))),
                  "has no output buffer"),
}


@pytest.mark.parametrize("case", sorted(BAD_KERNELS))
def test_verify_rejects(case):
    kernel, message = BAD_KERNELS[case]
    with pytest.raises(k.KernelIRError, match=message) as info:
        k.verify(kernel)
    assert "kernel 'base'" in str(info.value)
    assert isinstance(info.value, VerificationError) and isinstance(info.value, GraphcError)


def test_verify_rejects_structure():
    base = _base()
    with pytest.raises(k.KernelIRError, match="top-level statements must be loops"):
        k.verify(dataclasses.replace(base, body=(LOAD,)))
    with pytest.raises(k.KernelIRError, match="used outside its scope"):
        loop = base.body[0]
        after = Store("y", (Const(0, INDEX), Const(0, INDEX)), Load("x", (I, J), "f32"))
        k.verify(dataclasses.replace(base, body=(dataclasses.replace(
            loop, body=loop.body + (For("i5", 1, (after,)),)),)))
    with pytest.raises(k.KernelIRError, match="extent -1"):
        k.verify(dataclasses.replace(base, body=(For("i0", -1, ()),)))
    with pytest.raises(k.KernelIRError, match="must be an identifier"):
        k.verify(dataclasses.replace(base, name="bad name"))
    with pytest.raises(GraphcError, match="expected a Kernel"):
        k.verify("kernel")


def test_verify_skips_bounds_in_empty_loops():
    """Loops of extent 0 never run: an empty tensor's accesses are not out of bounds."""
    params = (k.Buffer("x", "f32", (0,)), k.Buffer("y", "f32", (0,), output=True))
    kernel = Kernel("empty", params, (For("i0", 0, (Store("y", (I,), Load("x", (I,), "f32")),)),))
    k.verify(kernel)


# -- intervals, simplification, index helpers -----------------------------------------------------
def _eval(expr, env):
    """A reference evaluator of index expressions (floor division, as the IR defines)."""
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, (Var, k.Local)):
        return env[expr.name]
    if isinstance(expr, k.Unary):
        v = _eval(expr.x, env)
        return abs(v) if expr.op == "abs" else -v
    if isinstance(expr, k.Select):
        return _eval(expr.a, env) if _eval(expr.cond, env) else _eval(expr.b, env)
    a, b = _eval(expr.a, env), _eval(expr.b, env)
    ops = {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else 0, "%": a % b if b else 0,
           "max": max(a, b), "min": min(a, b), "<": a < b, "<=": a <= b, ">": a > b,
           ">=": a >= b, "==": a == b, "!=": a != b, "&": a and b, "|": a or b}
    return int(ops[expr.op])


def _c(value: int) -> Const:
    return Const(value, INDEX)


_i = Var("i")
INDEX_EXPRS = [
    k.mod(k.floordiv(_i, 4), 3),
    k.floordiv(k.floordiv(_i, 4), 2),
    k.sub(_c(3), k.Unary("abs", k.sub(_c(3), k.mod(k.sub(_i, _c(2)), 6)))),  # reflect
    k.minimum(k.maximum(k.sub(_i, _c(3)), _c(0)), _c(4)),  # clamp
    k.select(k.compare("<", _i, _c(5)), _i, k.mul(_i, _c(-2))),
    k.add(k.mul(k.mod(_i, 5), _c(7)), k.floordiv(_i, 5)),
]


@pytest.mark.parametrize("n", [1, 7, 12])
@pytest.mark.parametrize("index", range(len(INDEX_EXPRS)))
def test_interval_bounds_and_simplify_preserves_values(index, n):
    expr = INDEX_EXPRS[index]
    ranges = {"i": (0, n - 1)}
    values = [_eval(expr, {"i": i}) for i in range(n)]
    lo, hi = k.interval(expr, ranges)
    assert lo <= min(values) and max(values) <= hi
    simple = k.simplify(expr, ranges)
    assert [_eval(simple, {"i": i}) for i in range(n)] == values


def test_simplify_uses_ranges():
    i = Var("i")
    small = {"i": (0, 7)}
    assert k.simplify(k.mod(i, 8), small) == i
    assert k.simplify(k.floordiv(i, 8), small) == Const(0, INDEX)
    assert k.simplify(k.compare("<", i, Const(8, INDEX)), small) == Const(1, "bool")
    assert k.simplify(k.minimum(i, Const(9, INDEX)), small) == i
    assert k.simplify(k.Unary("abs", i), small) == i
    assert k.floordiv(k.floordiv(i, 4), 2) == Binary("//", i, Const(8, INDEX))
    assert k.simplify(k.mod(i, 8), {"i": (0, 8)}) == Binary("%", i, Const(8, INDEX))


@pytest.mark.parametrize("shape", [(5,), (2, 3), (3, 1, 4), (2, 3, 2, 5)])
def test_unflatten_inverts_flat_index(shape):
    flat = Var("f")
    parts = k.unflatten(flat, shape)
    back = k.flat_index(parts, shape)
    for f in range(int(np.prod(shape))):
        assert tuple(_eval(p, {"f": f}) for p in parts) == np.unravel_index(f, shape)
        assert _eval(back, {"f": f}) == f


def test_interval_rejects_memory_reads():
    with pytest.raises(k.KernelIRError, match="Load is not allowed"):
        k.interval(Load("x", (Const(0, INDEX),), "f32"), {})


@pytest.mark.parametrize("extent", [0, 1, 2, 5, 7, 100, 101])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_thread_range_partitions_the_loop(extent, n):
    parts = [k.thread_range(extent, t, n) for t in range(n)]
    assert list(itertools.chain.from_iterable(parts)) == list(range(extent))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert list(k.thread_range(extent, n, n)) == [] == list(k.thread_range(extent, -1, n))
    assert list(k.thread_range(extent, 0, 0)) == []


# -- lowering: coverage and structure -------------------------------------------------------------
BRIEF_OPS = {"FusedElementwise", "Transpose", "Concat", "Slice", "Pad", "Gather", "Split",
             "Reshape", "Flatten", "Squeeze", "Unsqueeze", "ReduceSum", "ReduceMean", "Softmax",
             "LogSoftmax", "GlobalAveragePool", "GlobalMaxPool", "Cast", "Clip", "PRelu", "Pow",
             "Sum", "Mean", "Max", "Min"}


def test_every_elementwise_and_broadcast_op_is_lowered():
    wanted = {name for name, op in registry.all_ops().items()
              if op.kind in ("elementwise", "broadcast")} | BRIEF_OPS
    assert wanted - set(LOWERINGS) == set()


def test_broadcast_add_lowers_to_coalesced_views():
    g, node, _ = one_node("Add", [_f32(3, 64, 7, 7), _f32(64, 1, 1)])
    (bound,) = lower_node(g, node)
    assert bound.values == ("in0", "in1", "out0") or bound.values[:2] == ("in0", "in1")
    assert str(bound.kernel) == """\
// Add node 'node'
kernel node(in0: f32[3,64,49] in, in1: f32[1,64,1] in, node: f32[3,64,49] out) \
inplace(node<-in0) {
  parallel for i0 in 0..192 {
    vectorize for i1 in 0..49 {
      let t0: f32 = in0[i0 // 64, i0 % 64, i1]
      let t1: f32 = in1[0, i0 % 64, 0]
      node[i0 // 64, i0 % 64, i1] = t0 + t1
    }
  }
}"""


def test_lowering_is_deterministic():
    g, node, _ = one_node("FusedElementwise", [_f32(2, 5), _f32(5)],
                          {"expr": "sigmoid(x0 * x1 + 0.5) - x0"})
    texts = {str(b) for _ in range(3) for b in lower_node(g, node)}
    assert len(texts) == 1


@pytest.mark.parametrize("out, shapes, view, views", [
    ((3, 4), [(3, 4), (4,)], (3, 4), [(3, 4), (1, 4)]),
    ((2, 3, 4), [(2, 3, 4), (2, 3, 4)], (24,), [(24,), (24,)]),
    ((2, 3, 4), [(2, 3, 4), (1, 1, 1)], (24,), [(24,), (1,)]),
    ((1, 5, 1), [(1, 5, 1), (5, 1)], (5,), [(5,), (5,)]),
    ((), [(), ()], (1,), [(1,), (1,)]),
    ((2, 3, 4, 5), [(2, 3, 4, 5), (3, 1, 1)], (2, 3, 20), [(2, 3, 20), (1, 3, 1)]),
    ((4, 0), [(4, 0), (4, 1)], (4, 0), [(4, 0), (4, 1)]),
])
def test_coalesce(out, shapes, view, views):
    assert coalesce(out, shapes) == (view, views)


def test_coalesce_rejects_non_broadcasting_shapes():
    with pytest.raises(ShapeError, match="does not broadcast"):
        coalesce((3, 4), [(3, 4), (3,)])


@pytest.mark.parametrize("rows, cols, tiles", [
    (8, 1000, [(0, 1000, 1)]), (1, 64, [(0, 64, 1)]), (1, 200, [(0, 64, 3), (192, 8, 1)]),
    (2, 128, [(0, 64, 2)]),
])
def test_column_tiles_cover_every_column(rows, cols, tiles):
    assert column_tiles(rows, cols) == tiles
    covered = [c for first, width, n in tiles for c in range(first, first + width * n)]
    assert covered == list(range(cols))


def test_inplace_candidates_are_operands_of_the_result_type():
    g, node, _ = one_node("Mul", [_f32(3, 4), _f32(3, 4)])
    (bound,) = lower_node(g, node)
    assert bound.kernel.inplace == (("in0", "node"), ("in1", "node"))
    g, node, _ = one_node("Add", [_f32(4), _f32(3, 4)])
    assert lower_node(g, node)[0].kernel.inplace == (("in1", "node"),)
    g, node, _ = one_node("Transpose", [_f32(3, 4)])
    assert lower_node(g, node)[0].kernel.inplace == ()


def test_repeated_values_share_one_parameter_and_names_are_sanitised():
    g = graphc.Graph("g")
    x = g.add_input("conv1/out:0", TensorType((2, 3), "f32"))
    g.add_node("Mul", [x, x], outputs=["9y"])
    (bound,) = lower_node(g, g.node("9y"))
    assert [p.name for p in bound.kernel.params] == ["conv1_out_0", "v9y"]
    assert bound.values == ("conv1/out:0", "9y")
    assert bound.kernel.name == "k9y"


def test_fused_literals_take_the_dtype_of_their_sibling():
    x = np.ones((2, 3), np.float64)
    g, node, _ = one_node("FusedElementwise", [x], {"expr": "relu(x0 * 0.1 + 2.0)"})
    text = str(lower_node(g, node)[0].kernel)
    assert "max(t0 * 0.1:f64 + 2.0:f64, 0.0:f64)" in text


def test_symbolic_dims_need_bindings():
    g = graphc.Graph("g")
    x = g.input("x", (None, 4))
    y = graphc.ops.relu(x)
    g.output(y)
    node = g.producer(y.name)
    with pytest.raises(ShapeError, match="symbolic dim 'N'.*dims="):
        lower_node(g, node)
    (bound,) = lower_node(g, node, dims={"N": 3})
    assert bound.kernel.params[0].shape == (12,)


LOWERING_ERRORS = [
    ("Conv", [np.ones((1, 1, 4, 4), np.float16), np.ones((1, 1, 3, 3), np.float16)], {}, (1,),
     LoweringError, "dtype f16 is not lowered"),
    ("ReduceSum", [np.ones((2, 3), np.float16)], {}, (), UnsupportedOpError, "f16 compute"),
    ("GlobalMaxPool", [np.ones((1, 2, 0, 3), np.float32)], {}, (), ShapeError,
     "empty spatial extent"),
    ("Dropout", [_f32(3), np.float32(0.5), np.array(True)], {}, (1,), LoweringError,
     "run-time training_mode"),
    ("Softmax", [np.arange(4, dtype=np.float16)], {}, (), UnsupportedOpError, "f16"),
]


@pytest.mark.parametrize("op, inputs, attrs, consts, error, message", LOWERING_ERRORS,
                         ids=[case[0] for case in LOWERING_ERRORS])
def test_lowering_errors_name_the_node(op, inputs, attrs, consts, error, message):
    g, node, _ = one_node(op, inputs, attrs, consts)
    with pytest.raises(error, match=message) as info:
        lower_node(g, node)
    assert f"{op} node 'node'" in str(info.value)


def test_data_movement_accepts_f16_and_bool():
    for dtype in (np.float16, np.bool_):
        g, node, _ = one_node("Transpose", [np.zeros((2, 3), dtype)])
        assert lower_node(g, node)[0].kernel.params[0].dtype == dtype_name(dtype)


def test_reductions_pick_the_loop_structure_by_the_innermost_dim():
    axes = np.array([1], np.int64)
    g, node, _ = one_node("ReduceSum", [_f32(4, 5), axes], consts=(1,))
    text = str(lower_node(g, node)[0].kernel)
    assert "acc0 += in0[i0, i1]" in text  # contiguous: a scalar accumulator
    g, node, _ = one_node("ReduceSum", [_f32(5, 4, 3), axes], consts=(1,))
    text = str(lower_node(g, node)[0].kernel)
    assert "node[i0, i3] = node[i0, i3] + in0[i0, i2, i3]" in text  # rows accumulate in place
