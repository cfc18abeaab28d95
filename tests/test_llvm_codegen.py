"""Lowered kernels JIT-compiled by the LLVM backend, run via ctypes on numpy buffers and compared
with ``graphc.interpret`` of the same one-node graph.

Every case runs with 1, 2 and 3 threads (each thread's share called in turn on outputs pre-filled
with a sentinel, so a share that is skipped or written twice shows) and once with 2 concurrent
threads. Tolerances:

* exact (``assert_array_equal``, NaN == NaN): data movement, casts, integer ops, and every float
  op made only of IEEE arithmetic, comparisons, max/min and sqrt (Add ... Div, Relu, Clip, PRelu,
  LeakyRelu, HardSigmoid, HardSwish, Sum/Mean/Max/Min, BatchNormalization, Pow with exponent 2);
* f32 ops with exp/log/tanh/erf inside: rtol 5e-7 (the kernels' own error is < 2.3 ulp, numpy's
  SIMD functions add about 1 ulp);
* Gelu (f32; the reference computes in f64): atol 1e-6, rtol 1e-6 (cancellation in 1 + erf(x)
  for x < -4 loses relative accuracy where the result is tiny);
* Pow (libm ``powf``/``pow`` against numpy's own): rtol 5e-7; f64 math: rtol 1e-12;
* float reductions, Softmax, LogSoftmax (the summation order differs): rtol 1e-5, atol 1e-6.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

import graphc
from backends import kernel_ir as k
from backends.llvm.codegen import (
    KernelArgumentError,
    KernelCodegenError,
    compile_kernels,
    emit_kernel,
)
from backends.lower import lower_node
from tests.test_kernel_ir import one_node

THREADS = (1, 2, 3)
RNG = np.random.default_rng(20240607)


def data(*shape, dtype=np.float32, scale=3.0, specials=True):
    """Random values of ``dtype``; floats get NaN, +inf and -inf sprinkled in."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        a = (RNG.standard_normal(shape) * scale).astype(dtype)
        if specials and a.size >= 8:
            flat = a.reshape(-1)
            flat[RNG.integers(0, a.size, 3)] = (np.nan, np.inf, -np.inf)
        return a
    if dtype.kind == "b":
        return RNG.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dtype)
    return RNG.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)


def ints(*values):
    return np.array(values, np.int64)


# -- the harness ----------------------------------------------------------------------------------
def _sentinel(shape, dtype) -> np.ndarray:
    a = np.empty(shape, dtype)
    a.reshape(-1).view(np.uint8).fill(0xFF if a.dtype.kind == "f" else 0x5A)  # NaN for floats
    return a


class Case:
    """One node lowered and compiled; ``run(n)`` executes it with ``n`` thread shares."""

    def __init__(self, op, inputs, attrs=None, consts=(), n_outputs=None):
        self.graph, self.node, self.feeds = one_node(op, inputs, attrs, consts, n_outputs)
        self.bound = lower_node(self.graph, self.node)
        self.label = f"{op}{[getattr(a, 'shape', None) for a in inputs]}{attrs or ''}"

    def run(self, compiled, n_threads: int, concurrent: bool = False) -> list[np.ndarray]:
        env = {**self.feeds, **self.graph.constant_arrays()}
        for bound, kernel in zip(self.bound, compiled):
            args = []
            for p, value in zip(bound.kernel.params, bound.values):
                if p.output:
                    env[value] = _sentinel(self.graph.type_of(value).shape,
                                           k.numpy_dtype(p.dtype))
                args.append(np.ascontiguousarray(env[value]).reshape(p.shape))
            if concurrent:
                kernel.run(args, n_threads)
            else:
                for t in range(n_threads):
                    kernel(args, t, n_threads)
        return [env[v] for v in self.graph.outputs]


def check(cases, compare, threads=THREADS) -> None:
    """Compile every case's kernels in one module, run them, compare with the interpreter."""
    cases = [Case(*c) if isinstance(c, tuple) else c for c in cases]
    kernels = [b.kernel for c in cases for b in c.bound]
    compiled = iter(compile_kernels(kernels))
    per_case = [[next(compiled) for _ in c.bound] for c in cases]
    for case, kernels_of_case in zip(cases, per_case):
        expected = graphc.interpret(case.graph, case.feeds)
        runs = [(n, case.run(kernels_of_case, n)) for n in threads]
        runs.append(("2 concurrent", case.run(kernels_of_case, 2, concurrent=True)))
        for n, got in runs:
            for g, want in zip(got, expected):
                assert g.dtype == want.dtype and g.shape == want.shape, case.label
                try:
                    compare(g, want)
                except AssertionError as exc:
                    raise AssertionError(f"{case.label} with {n} thread(s): {exc}") from None


def exact(got, want) -> None:
    if want.dtype == np.bool_:
        got, want = got.view(np.uint8), want.view(np.uint8)
    np.testing.assert_array_equal(got, want)


def close(rtol, atol=0.0):
    def compare(got, want) -> None:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        special = ~np.isfinite(want)
        np.testing.assert_array_equal(got[special & ~np.isnan(want)],
                                      want[special & ~np.isnan(want)])
        np.testing.assert_allclose(got[~special], want[~special], rtol=rtol, atol=atol)

    return compare


# -- elementwise ----------------------------------------------------------------------------------
BROADCAST_SHAPES = [((3, 5, 7), (5, 1)), ((1, 13), (13,)), ((3, 1, 4), (1, 6, 1)), ((), (4,)),
                    ((1,), (2, 3, 1, 4)), ((3, 64, 7, 7), (64, 1, 1))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_binary_arithmetic_broadcasts_exactly(op):
    cases = [(op, [data(*a), data(*b)]) for a, b in BROADCAST_SHAPES]
    cases += [(op, [data(3, 7, dtype=dt), data(7, dtype=dt)]) for dt in (np.int32, np.uint8)]
    check(cases, exact)


def test_integer_division_edge_cases():
    """Truncation toward zero, x / 0 = 0 and MIN / -1 = MIN, as the reference."""
    check([("Div", [np.array([-128, 7, -7, 5, 100, -9, 0], np.int8),
                    np.array([-1, 0, 2, -2, 0, 4, -3], np.int8)]),
           ("Div", [np.array([200, 7, 9, 0], np.uint8), np.array([0, 2, 4, 0], np.uint8)]),
           ("Div", [data(4, 9, dtype=np.int64), data(9, dtype=np.int64)])], exact)


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
def test_variadic_ops(op):
    cases = [(op, [data(3, 4), data(4), data(1, 4), data(3, 1)]), (op, [data(5)]),
             (op, [data(1, 2, 3), data(2, 1)])]
    if op in ("Max", "Min"):
        cases += [(op, [data(9, dtype=np.uint8), data(9, dtype=np.uint8)]),
                  (op, [data(2, 5, dtype=np.int64), data(5, dtype=np.int64)])]
    check(cases, exact)


EXACT_UNARY = [("Relu", {}), ("Abs", {}), ("Neg", {}), ("Reciprocal", {}), ("Sqrt", {}),
               ("HardSwish", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
               ("LeakyRelu", {"alpha": 0.07}), ("Identity", {})]


@pytest.mark.parametrize("op, attrs", EXACT_UNARY, ids=[op for op, _ in EXACT_UNARY])
def test_arithmetic_unary_ops_are_exact(op, attrs):
    cases = [(op, [data(*shape, dtype=dt)], attrs)
             for shape in [(1,), (2, 3, 5), (3, 17)] for dt in (np.float32, np.float64)]
    if op in ("Relu", "Abs", "Neg"):
        cases += [(op, [np.array([-128, 5, -3, 127, 0], np.int8)], attrs),
                  (op, [data(3, 11, dtype=np.int64)], attrs)]
    if op == "Identity":
        cases += [(op, [data(4, 3, dtype=dt)], attrs) for dt in (np.float16, np.bool_, np.int16)]
    check(cases, exact)


def test_prelu_and_clip():
    x = data(2, 3, 5)
    lo, hi = np.float32(-0.5), np.float32(0.5)
    check([("PRelu", [x, data(3, 1)]), ("PRelu", [x, data(5)]), ("PRelu", [data(7), data(1)]),
           ("PRelu", [data(3, 4, dtype=np.int32), data(4, dtype=np.int32)]),
           ("Clip", [x, lo, hi], {}, (1, 2)),  # constant bounds become literals
           ("Clip", [x, lo, hi]),  # run-time bounds are loaded
           ("Clip", [x, None, hi]), ("Clip", [x, lo]), ("Clip", [x]),
           ("Clip", [x, hi, lo], {}, (1, 2)),  # lo > hi: every element becomes hi
           ("Clip", [data(9, dtype=np.int16), np.int16(-5), np.int16(5)], {}, (1, 2)),
           ("Clip", [data(1, 7), np.array([np.nan], np.float32)], {}, (1,))], exact)


def test_pow():
    base = np.abs(data(3, 4))
    check([("Pow", [base, np.float32(2)], {}, (1,)), ("Pow", [data(5), np.float32(2)], {}, (1,)),
           ("Pow", [base, np.float32(2)])], exact)
    check([("Pow", [base, data(4)]), ("Pow", [base, ints(1, 2, 3, -1)], {}, (1,)),
           ("Pow", [data(7), ints(3)]), ("Pow", [np.float32(0.5) + base, np.float64(1.5)])],
          close(5e-7))
    check([("Pow", [np.abs(data(3, 4, dtype=np.float64)), data(4, dtype=np.float64)])],
          close(1e-12))


CASTS = [(np.float32, 11), (np.float64, 1), (np.int32, 1), (np.int64, 6), (np.int64, 2),
         (np.uint8, 7), (np.int8, 4), (np.bool_, 1), (np.bool_, 7), (np.int32, 9),
         (np.float32, 9), (np.float64, 13)]


def test_cast():
    cases = []
    for dtype, to in CASTS:
        x = data(3, 7, dtype=dtype, specials=to in (9, 11))
        if np.dtype(dtype).kind == "f" and to not in (9, 11, 1):
            x = np.abs(x).astype(dtype) * 10  # in range of the integer target
        cases.append(("Cast", [x], {"to": to}))
    cases.append(("Cast", [np.array([0.0, -0.0, np.nan, 1e-40], np.float32)], {"to": 9}))
    check(cases, exact)


TRANSCENDENTAL = [("Exp", {}), ("Log", {}), ("Tanh", {}), ("Erf", {}), ("Sigmoid", {}),
                  ("Softplus", {}), ("Elu", {"alpha": 0.7}), ("Selu", {})]


@pytest.mark.parametrize("op, attrs", TRANSCENDENTAL, ids=[op for op, _ in TRANSCENDENTAL])
def test_transcendental_ops(op, attrs):
    def x(*shape, dtype=np.float32):
        v = data(*shape, dtype=dtype, scale=6.0)
        return np.abs(v) if op == "Log" else v

    check([(op, [x(*s)], attrs) for s in [(1,), (3, 33), (2, 3, 5, 7)]], close(5e-7))
    check([(op, [x(5, 9, dtype=np.float64)], attrs)], close(1e-12))


def test_gelu_and_integer_erf():
    x = data(4, 257, scale=5.0)
    check([("Gelu", [x]), ("Gelu", [x], {"approximate": "tanh"})], close(1e-6, 1e-6))
    check([("Gelu", [data(3, 5, dtype=np.float64)]),
           ("Gelu", [data(3, 5, dtype=np.float64)], {"approximate": "tanh"})], close(1e-12, 1e-15))
    check([("Erf", [np.arange(-8, 9, dtype=np.int32)])], exact)


FUSED = [
    ("relu(x0 * x1 + x2)", [(3, 8, 5, 5), (8, 1, 1), (8, 1, 1)], True),
    ("clip(x0, -inf, 6.0) - x0 / 2.0", [(4, 9)], True),
    ("max(x0, x1, 0.5) * -x1", [(2, 3), (3,)], True),
    ("prelu(x0 + x1, x1) + mean(x0, x1, 2.0)", [(7,), (1,)], True),
    ("hard_swish(x0) * leaky_relu(x0, 0.2) + pow(x0, 2.0)", [(3, 11)], True),
    ("x0 * x0 - x0", [(13,)], True),
    ("sigmoid(x0) * tanh(x1) + exp(-abs(x0))", [(5, 6), (6,)], False),
    ("selu(x0, 1.5, 1.1) + elu(x1, 0.3) - softplus(x0 - x1)", [(2, 9), (2, 9)], False),
    ("log(abs(x0) + 1.0) + erf(x0 * 0.5)", [(31,)], False),
]


@pytest.mark.parametrize("expr, shapes, is_exact", FUSED, ids=[e for e, _, _ in FUSED])
def test_fused_elementwise(expr, shapes, is_exact):
    check([("FusedElementwise", [data(*s) for s in shapes], {"expr": expr})],
          exact if is_exact else close(1e-6, 1e-7))


def test_fused_elementwise_on_integers_and_f64():
    check([("FusedElementwise", [data(4, 6, dtype=np.int32), data(6, dtype=np.int32)],
            {"expr": "max(x0 * 3.0 - x1, 1.0) / 2.0"}),
           ("FusedElementwise", [data(4, 6, dtype=np.float64)],
            {"expr": "relu(x0 * 0.1) + clip(x0, -1.0, 1.0)"})], exact)


def test_batch_norm_and_dropout_inference():
    c = 6
    cases = []
    for shape in [(2, c, 5, 3), (3, c), (1, c, 7)]:
        stats = [data(c), data(c), data(c), np.abs(data(c, specials=False))]
        cases.append(("BatchNormalization", [data(*shape), *stats], {"epsilon": 1e-3},
                      (1, 2, 3, 4)))
        cases.append(("BatchNormalization", [data(*shape), *stats]))
    cases += [("Dropout", [data(3, 4)], {}, (), 2), ("Dropout", [data(3, 4)]),
              ("Dropout", [data(5), np.float32(0.3), np.array(False)], {}, (1, 2))]
    check(cases, exact)


# -- data movement --------------------------------------------------------------------------------
MOVE_DTYPES = (np.float32, np.float16, np.int64, np.bool_, np.uint8)


@pytest.mark.parametrize("dtype", MOVE_DTYPES, ids=[np.dtype(d).name for d in MOVE_DTYPES])
def test_transpose_concat_split(dtype):
    x = data(2, 3, 4, 5, dtype=dtype)
    check([("Transpose", [x], {"perm": (0, 2, 3, 1)}), ("Transpose", [x], {}),
           ("Transpose", [x], {"perm": (0, 1, 2, 3)}),
           ("Transpose", [data(3, 1, 5, dtype=dtype)], {"perm": (2, 1, 0)}),
           ("Transpose", [data(7, dtype=dtype)], {}),
           ("Concat", [data(2, 3, 4, dtype=dtype), data(2, 5, 4, dtype=dtype),
                       data(2, 1, 4, dtype=dtype)], {"axis": 1}),
           ("Concat", [data(3, 4, dtype=dtype), data(2, 4, dtype=dtype)], {"axis": 0}),
           ("Concat", [data(3, 4, dtype=dtype), data(3, 0, dtype=dtype)], {"axis": -1}),
           ("Split", [data(2, 7, 3, dtype=dtype), ints(2, 5)], {"axis": 1}, (1,), 2),
           ("Split", [data(6, 4, dtype=dtype)], {"axis": 0, "num_outputs": 4}, (), 4),
           ("Split", [data(3, 6, dtype=dtype)], {"axis": -1}, (), 3)], exact)


def test_concat_of_one_value_twice():
    g = graphc.Graph("g")
    x = g.input("x", (3, 2))
    y = graphc.ops.concat(x, x, axis=1)
    g.output(y)
    check([_GraphCase(g, {"x": data(3, 2)})], exact)


class _GraphCase(Case):
    """A prepared one-node graph (for shapes the ``one_node`` builder cannot express)."""

    def __init__(self, graph, feeds):
        self.graph, self.feeds = graph, feeds
        self.node = next(n for n in graph.nodes() if n.op not in ("Input", "Constant"))
        self.bound = lower_node(graph, self.node)
        self.label = str(graph)


SLICES = [((5, 6, 7), (1, -1), (4, 0), (0, 1), (2, -2)), ((5, 6, 7), (1,), (4,), (1,), None),
          ((5, 6), (10,), (20,), (0,), None), ((9,), (-1,), (-100,), None, (-3,)),
          ((4, 5), (0, 0), (4, 5), None, None), ((1, 8, 3), (2,), (7,), (-2,), (2,))]


def test_slice():
    cases = []
    for shape, starts, ends, axes, steps in SLICES:
        inputs = [data(*shape), ints(*starts), ints(*ends),
                  None if axes is None else ints(*axes), None if steps is None else ints(*steps)]
        cases.append(("Slice", inputs, {}, (1, 2, 3, 4)))
    check(cases, exact)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "wrap"])
def test_pad(mode):
    x = data(3, 4, 5)
    cases = [("Pad", [x, ints(0, 2, 1, 0, 1, 3)], {"mode": mode}, (1,)),
             ("Pad", [x, ints(0, -1, 2, 1, 2, -2)], {"mode": mode}, (1,)),  # crop and grow
             ("Pad", [data(1, 7), ints(0, 3, 0, 3)], {"mode": mode}, (1,)),
             ("Pad", [data(3, 4, dtype=np.int32), ints(1, 2), None, ints(1)], {"mode": mode},
              (1, 3))]
    if mode == "constant":
        cases += [("Pad", [data(3, 4), ints(1, 1, 1, 1), np.float32(2.5)], {}, (1, 2)),
                  ("Pad", [data(3, 4), ints(1, 1, 1, 1), np.float32(2.5)], {}, (1,)),
                  ("Pad", [data(3, 4), ints(0, -4, 0, 1)], {}, (1,)),  # nothing left to read
                  ("Pad", [data(2, 3, dtype=np.float16), ints(1, 0, 0, 2), np.float16(-1.5)],
                   {}, (1, 2))]
    if mode == "wrap":
        cases.append(("Pad", [data(3, 4), ints(0, 9, 0, 7)], {"mode": mode}, (1,)))
    check(cases, exact)


def test_gather_and_reshapes():
    check([("Gather", [data(5, 6, 3), np.array([[0, -1], [4, 2], [1, 1]])], {"axis": 1}, (1,)),
           ("Gather", [data(5, 6), np.array(3)], {"axis": 0}, (1,)),
           ("Gather", [data(4, 3, dtype=np.float16), np.array([2, 0], np.int32)], {"axis": -1},
            (1,)),
           ("Gather", [data(5, 2), np.zeros(0, np.int64)], {}, (1,)),
           ("Reshape", [data(3, 4), ints(4, 3)], {}, (1,)),
           ("Flatten", [data(3, 4, 2)], {"axis": 2}),
           ("Squeeze", [data(3, 1, 2), ints(1)], {}, (1,)),
           ("Unsqueeze", [data(3, 2, dtype=np.int8), ints(0)], {}, (1,))], exact)


# -- reductions -----------------------------------------------------------------------------------
REDUCTIONS = [((3, 4, 5), (1,), 1), ((3, 4, 5), (0, 2), 0), ((2, 3, 4, 5), (1, 3), 1),
              ((7,), None, 0), ((3, 1, 5), (1,), 0), ((4, 5), (-1,), 1), ((50, 200), (0,), 0),
              ((2, 130, 3), (0, 2), 1), ((1, 3, 1), (0, 2), 1)]


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
def test_reduce(op):
    cases = []
    for shape, axes, keep in REDUCTIONS:
        inputs = [data(*shape, specials=False)] + ([] if axes is None else [ints(*axes)])
        cases.append((op, inputs, {"keepdims": keep}, (1,)))
    nan_row = data(3, 5)
    nan_row[1, 2] = np.nan
    cases.append((op, [nan_row, ints(1)], {}, (1,)))
    check(cases, close(1e-5, 1e-6))
    check([(op, [data(3, 5, dtype=np.int32), ints(1)], {}, (1,)),
           (op, [data(6, 4, dtype=np.int64), ints(0)], {}, (1,)),
           (op, [data(3, 5), np.zeros(0, np.int64)], {"noop_with_empty_axes": 1}, (1,))], exact)


def test_global_pools():
    x = data(2, 3, 5, 5)
    x[0, 1, 2, 2] = np.nan
    check([("GlobalAveragePool", [x]), ("GlobalAveragePool", [data(3, 4, 9)]),
           ("GlobalAveragePool", [data(1, 2, 3, 2, 2)])], close(1e-5, 1e-6))
    check([("GlobalMaxPool", [x]), ("GlobalMaxPool", [data(1, 8, 13)]),
           ("GlobalMaxPool", [data(2, 3, 4, dtype=np.uint8)]),
           ("GlobalMaxPool", [np.full((1, 2, 3), -np.inf, np.float32)])], exact)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(op):
    x = data(3, 4, 5, scale=5.0)
    x[1, 2, 3] = np.nan  # NaN spreads over its row along the axis only
    rows = np.array([[1.0, np.inf, 2.0], [-np.inf, -np.inf, -np.inf], [80, 81, 79]], np.float32)
    cases = [(op, [x], {"axis": axis}) for axis in (-1, 1, 0)]
    cases += [(op, [rows], {"axis": 1}), (op, [data(1, 5, 150)], {"axis": 1}),  # column tiles
              (op, [data(2, 1, 3)], {"axis": 1}), (op, [data(9)], {}),
              (op, [data(3, 2, 7, dtype=np.float64)], {"axis": 1})]
    check(cases, close(1e-5, 1e-6))


# -- threads, calling convention, generated code --------------------------------------------------
def _compiled(op, inputs, attrs=None, consts=()):
    case = Case(op, inputs, attrs, consts)
    return case, compile_kernels([b.kernel for b in case.bound])


def test_one_thread_share_leaves_the_rest_untouched():
    case, (kernel,) = _compiled("Relu", [data(1000, specials=False)])
    x, y = case.feeds["in0"], _sentinel((1000,), np.float32)
    kernel([x, y], 0, 2)
    assert np.isnan(y[500:]).all() and not np.isnan(y[:500]).any()
    kernel([x, y], 5, 2)  # an id out of range runs nothing
    kernel([x, y], 0, 0)
    assert np.isnan(y[500:]).all()
    kernel([x, y], 1, 2)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_inplace_pair_may_share_memory():
    case, (kernel,) = _compiled("Add", [data(4, 9), data(9)])
    x, b = case.feeds["in0"].copy(), case.feeds["in1"]
    want = x + b
    kernel.run([x, b, x], 2)  # the output is the first operand's buffer
    np.testing.assert_array_equal(x, want)
    source = kernel.compiled.source_ir
    header = next(line for line in source.splitlines() if line.startswith("define"))
    assert header.count("noalias") == 1  # only the operand that cannot alias the result


def test_fast_math_flags_only_on_reduction_sums():
    _, (reduce_kernel,) = _compiled("ReduceSum", [data(8, 100), ints(1)], {}, (1,))
    _, (math_kernel,) = _compiled("FusedElementwise", [data(50)],
                                  {"expr": "gelu(x0) + tanh(x0) * softplus(x0) / x0"})
    flags = re.compile(r"\b(fast|nnan|ninf|nsz|arcp|contract|afn)\b")
    for kernel in (reduce_kernel, math_kernel):
        assert not flags.search(kernel.compiled.source_ir)
    assert "fadd reassoc" in reduce_kernel.compiled.source_ir
    assert "reassoc" not in math_kernel.compiled.source_ir


@pytest.mark.parametrize("op, inputs, attrs, consts", [
    ("Add", [data(64, 100), data(100)], {}, ()),
    ("Exp", [data(1000)], {}, ()),
    ("Erf", [data(1000)], {}, ()),
    ("ReduceSum", [data(16, 256), ints(1)], {}, (1,)),
    ("GlobalMaxPool", [data(2, 16, 10, 10)], {}, ()),
    ("Softmax", [data(16, 100)], {}, ()),
])
def test_contiguous_inner_loops_vectorise(op, inputs, attrs, consts):
    _, (kernel,) = _compiled(op, inputs, attrs, consts)
    assert re.search(r"<\d+ x float>", kernel.llvm_ir), "no vector loop"
    assert "call" not in "".join(line for line in kernel.llvm_ir.splitlines()
                                 if "@exp" in line or "@erf" in line)  # inline, not libm
    assert kernel.assembly.strip()


def test_strided_buffer_parameters():
    """A parameter with strides reads a non-contiguous numpy view in place."""
    i, j = k.Var("i0"), k.Var("i1")
    body = (k.For("i0", 4, (k.For("i1", 3, (k.Store("y", (i, j), k.Load("x", (i, j), "f64")),),
                                  vectorize=True),), parallel=True),)
    kernel = k.Kernel("strided", (k.Buffer("x", "f64", (4, 3), strides=(1, 4)),
                                  k.Buffer("y", "f64", (4, 3), output=True)), body)
    (compiled,) = compile_kernels([kernel])
    base = data(3, 4, dtype=np.float64)
    y = np.empty((4, 3))
    compiled.run([base.T, y], 2)
    np.testing.assert_array_equal(y, base.T)
    with pytest.raises(KernelArgumentError, match="element strides"):
        compiled([np.ascontiguousarray(base.T), y])


def test_call_arguments_are_checked():
    case, (kernel,) = _compiled("Relu", [data(2, 3)])
    x = case.feeds["in0"]
    bad = [([x], "takes 2 buffers"), ([x.astype(np.float64), np.empty(6, np.float32)],
                                      "needs a f32 array"),
           ([x, np.empty(5, np.float32)], "needs 6 elements"),
           ([np.asfortranarray(x), np.empty((2, 3), np.float32)], "C-contiguous")]
    readonly = np.empty(6, np.float32)
    readonly.flags.writeable = False
    bad.append(([x, readonly], "read-only"))
    for args, message in bad:
        with pytest.raises(KernelArgumentError, match=message):
            kernel(args)


def test_emit_kernel_checks_its_input():
    from llvmlite import ir

    kernel = Case("Relu", [data(3)]).bound[0].kernel
    module = ir.Module("m")
    emit_kernel(module, kernel, "f")
    with pytest.raises(KernelCodegenError, match="already defines 'f'"):
        emit_kernel(module, kernel, "f")
    broken = k.Kernel("broken", kernel.params, (k.Let("t", k.Const(1, "f32")),))
    with pytest.raises(k.KernelIRError):
        emit_kernel(module, broken)
    i = k.Var("i")
    params = (k.Buffer("x", "f64", (2,)), k.Buffer("y", "f16", (2,), output=True))
    store = k.Store("y", (i,), k.Cast(k.Load("x", (i,), "f64"), "f16"))
    casting = k.Kernel("cast16", params, (k.For("i", 2, (store,)),))
    emit_kernel(module, casting)  # f64 -> f16 rounds to odd f32 first: no compiler-rt call
    assert "__truncdfhf2" not in str(module)


def test_kernels_run_under_the_runtime_entry():
    """The runtime's single entry calls lowered kernels in order with barriers between them:
    Transpose -> Softmax (reads every thread's part of the transpose) -> ReduceSum."""
    from llvmlite import ir

    from backends.llvm import host_target
    from backends.llvm.runtime import KernelCall, ThreadedRunner, available_cores, build_entry

    g = graphc.Graph("chain")
    x = g.input("x", (6, 40))
    y = graphc.ops.reduce_sum(graphc.ops.softmax(graphc.ops.transpose(x), axis=0),
                              np.array([1]), keepdims=0)
    g.output(y)
    feeds = {"x": data(6, 40, specials=False)}
    env = dict(feeds)
    slots = {}
    module = ir.Module(name=f"chain_{next(_ENTRY_IDS)}")
    calls = []
    for node in g.nodes():
        if node.op in ("Input", "Constant"):
            continue
        (bound,) = lower_node(g, node)
        fn = emit_kernel(module, bound.kernel, f"{module.name}_{bound.kernel.name}")
        for value in bound.values:
            if value not in env:
                env[value] = np.empty(g.type_of(value).shape, np.float32)
            slots.setdefault(value, len(slots))
        calls.append(KernelCall(fn, tuple(slots[v] for v in bound.values)))
    entry = build_entry(module, calls, name=f"{module.name}_entry")
    address = host_target().compile(module).address(entry.name)
    table = np.array([env[v].ctypes.data for v in slots], dtype=np.uintp)
    for threads in sorted({1, min(2, available_cores())}):
        runner = ThreadedRunner(address, threads)
        for _ in range(3):
            env[y.name].fill(np.nan)
            runner.run(table)
            close(1e-5, 1e-6)(env[y.name], graphc.interpret(g, feeds)[0])
        runner.close()


_ENTRY_IDS = itertools.count()


# -- accuracy of the f32 math functions -----------------------------------------------------------
_ERF = np.frompyfunc(math.erf, 1, 1)
MATH = {  # op: (float64 reference, samples, max ulp measured over the samples)
    "exp": (np.exp, [np.linspace(-104, 89, 300_001)], 1.0),
    "log": (np.log, [np.geomspace(1e-45, 3e38, 200_001), np.linspace(0.5, 2, 100_001)], 1.0),
    "expm1": (np.expm1, [np.linspace(-20, 89, 200_001), np.linspace(-1, 1, 100_001)], 2.0),
    "log1p": (np.log1p, [-np.geomspace(1e-30, 1, 100_001)[:-1], np.geomspace(1e-30, 1e30, 200_001),
                         np.linspace(-0.9, 2, 100_001)], 2.5),
    "tanh": (np.tanh, [np.linspace(-12, 12, 200_001), np.geomspace(1e-30, 1, 50_001)], 1.5),
    "erf": (lambda x: _ERF(x).astype(np.float64),
            [np.linspace(-6, 6, 150_001), np.geomspace(1e-30, 1, 20_001)], 1.5),
}
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-38, 88.72, 88.73,
                    -87.5, -103.9, -104.5, 3.4e38, -3.4e38, 1.0, -1.0, 0.625, 0.875, 4.0],
                   np.float32)


def _unary_kernel(op: str, n: int) -> k.Kernel:
    i = k.Var("i")
    body = (k.For("i", n, (k.Store("y", (i,), k.Unary(op, k.Load("x", (i,), "f32"))),),
                  parallel=True, vectorize=True),)
    return k.Kernel(op, (k.Buffer("x", "f32", (n,)), k.Buffer("y", "f32", (n,), output=True)), body)


@pytest.mark.parametrize("op", sorted(MATH))
def test_f32_math_error_bounds(op):
    reference, parts, bound = MATH[op]
    x = np.concatenate([*parts, SPECIAL]).astype(np.float32)
    (kernel,) = compile_kernels([_unary_kernel(op, x.size)])
    y = np.empty_like(x)
    kernel.run([x, y], 2)
    with np.errstate(all="ignore"):
        want = reference(x.astype(np.float64))
        want32 = want.astype(np.float32)
    finite = np.isfinite(want32)
    ulp = np.abs(y[finite] - want[finite]) / np.spacing(np.abs(want32[finite])).astype(np.float64)
    assert ulp.max() <= bound, f"{op}: {ulp.max():.3f} ulp at x={x[finite][np.argmax(ulp)]!r}"
    np.testing.assert_array_equal(y[~finite], want32[~finite])  # NaN, inf, overflow
    zeros = (want32 == 0) & finite
    np.testing.assert_array_equal(np.signbit(y[zeros]), np.signbit(want32[zeros]))
