"""GEMM lowerings (backends/lower_gemm.py) through CpuModel against graphc.interpret.

Tolerance: the float32 SGEMM sums in another order than numpy, so results are compared
elementwise with a K-scaled bound ``1e-5 * (K + 1) * (1 + |want|)`` on standard-normal inputs
(sum |a||b| is about 0.64 K): a lost or doubled K block, row, group or batch item is off by
about sqrt(K), far above it. Every case runs with threads 1 and 2.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import graphc
from backends.llvm.compiler import CpuModel
from backends.lower import BoundFunction, LoweringError, lower_node
from backends.memory_plan import plan_memory
from graphc import ops

PARAMS = {"leaky_relu": (0.1,), "clip": (-0.5, 0.7), "elu": (1.3,),
          "selu": (1.6732632, 1.050701), "hard_sigmoid": (0.2, 0.5)}
GEMM_OPS = ("ConvGemm", "MatMul", "Gemm", "FusedGemm")


def _rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def check(g: graphc.Graph, feeds: dict, k: int, threads=(1, 2)) -> CpuModel:
    """Run ``g`` on CpuModel with each thread count; |got - want| <= 1e-5 * (K + 1) * (1 + |want|)
    (inputs are standard normal, so sum |a||b| is about 0.64 K)."""
    want = graphc.interpret(g, feeds)
    model = None
    for t in threads:
        model = CpuModel(g, threads=t)
        got = model.run(feeds)
        for i, (x, w) in enumerate(zip(got, want)):
            assert x.shape == w.shape and x.dtype == w.dtype
            err = np.abs(x.astype(np.float64) - w)
            limit = 1e-5 * (k + 1) * (1 + np.abs(w))
            assert np.all(err <= limit), (f"output {i}, threads {t}: max err {err.max():.3g}, "
                                          f"worst ratio {(err / limit).max():.3g}")
    return model


def _lowered_ops(model: CpuModel) -> set:
    spec = next(iter(model._specs.values()))
    return {b.name for b in spec.kernels if isinstance(b, BoundFunction)}


# -- ConvGemm ---------------------------------------------------------------------------------
CONV_CASES = [  # groups, images, K/G, rows, P, bias, residual, activation, W2 constant
    (1, 1, 4, 9, 25, False, False, "", True),
    (1, 3, 5, 7, 13, True, False, "relu", True),
    (2, 1, 3, 11, 17, True, True, "leaky_relu", True),
    (2, 3, 1, 1, 1, False, True, "sigmoid", False),
    (3, 2, 9, 33, 40, True, True, "tanh", False),
    (1, 2, 17, 5, 70, True, False, "clip", True),
    (2, 2, 6, 20, 9, False, True, "elu", True),
    (1, 1, 10, 600, 37, True, False, "selu", True),       # K crosses the 512 block
    (4, 1, 2, 3, 33, True, True, "hard_sigmoid", False),
    (1, 3, 7, 8, 5, True, False, "hard_swish", True),
    (2, 1, 8, 18, 29, False, False, "softplus", True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"g{c[0]}n{c[1]}_{c[7] or 'none'}"
                                                  for c in CONV_CASES])
def test_conv_gemm_matches_the_interpreter(case):
    groups, images, kg, rows, p, bias, residual, activation, w_const = case
    rng = np.random.default_rng(hash(case) % 2**32)
    g = graphc.Graph("cg")
    cols = g.input("cols", (images, groups, rows, p))
    feeds = {"cols": _rand(rng, (images, groups, rows, p))}
    w2 = g.constant(_rand(rng, (groups, kg, rows))) if w_const else g.input(
        "w2", (groups, kg, rows))
    if not w_const:
        feeds["w2"] = _rand(rng, (groups, kg, rows))
    operands = [w2, cols, g.constant(_rand(rng, (groups * kg,))) if bias else None]
    if residual:
        operands.append(g.input("z", (images, groups * kg, p)))
        feeds["z"] = _rand(rng, (images, groups * kg, p))
    y = ops.apply("ConvGemm", tuple(operands), group=groups, out_spatial=[p],
                  activation=activation, activation_params=list(PARAMS.get(activation, ())))
    g.output(y)
    model = check(g, feeds, rows)
    assert _lowered_ops(model)


# -- MatMul -----------------------------------------------------------------------------------
MATMUL_CASES = [  # A shape, B shape, B constant
    ((5, 7), (7, 3), False),
    ((1, 1), (1, 1), True),
    ((13,), (13, 6), True),
    ((4, 13), (13,), False),
    ((3, 2, 5, 7), (7, 4), True),          # folded into one M = 30 GEMM
    ((3, 2, 5, 7), (7, 4), False),
    ((16, 13, 5), (16, 5, 11), True),      # Winograd F(2,3): [a*a, T, C] @ [a*a, C, K]
    ((36, 9, 19), (36, 19, 8), False),
    ((2, 16, 13, 5), (16, 5, 11), True),   # [N, a*a, T, C] @ [a*a, C, K]
    ((2, 1, 4, 3), (1, 3, 3, 5), True),    # both operands broadcast
    ((3, 4, 700), (700, 33), True),        # K crosses the 512 block
    ((1, 3, 1), (2, 1, 40), False),        # K = 1
]


@pytest.mark.parametrize("a_shape,b_shape,b_const", MATMUL_CASES)
def test_matmul_matches_the_interpreter(a_shape, b_shape, b_const):
    rng = np.random.default_rng(len(a_shape) * 7 + sum(b_shape))
    g = graphc.Graph("mm")
    a = g.input("a", a_shape)
    feeds = {"a": _rand(rng, a_shape)}
    if b_const:
        b = g.constant(_rand(rng, b_shape))
    else:
        b = g.input("b", b_shape)
        feeds["b"] = _rand(rng, b_shape)
    g.output(ops.matmul(a, b))
    check(g, feeds, a_shape[-1])


def test_matmul_of_other_dtypes_is_a_lowering_error():
    g = graphc.Graph("mm")
    g.output(ops.matmul(g.input("a", (3, 4), "f64"), g.input("b", (4, 2), "f64")))
    node = next(n for n in g if n.op == "MatMul")
    with pytest.raises(LoweringError, match="MatMul node .*f64"):
        lower_node(g, node)


# -- Gemm / FusedGemm -------------------------------------------------------------------------
GEMM_CASES = [  # M, K, N, transA, transB, alpha, beta, C shape, C constant, Z, activation
    (5, 7, 3, 0, 0, 1.0, 1.0, None, False, False, ""),
    (1, 9, 33, 0, 1, 1.0, 1.0, (33,), True, False, "relu"),
    (6, 4, 10, 1, 1, 0.5, 2.0, (1, 10), True, False, ""),
    (7, 3, 5, 0, 0, 1.0, 1.0, (7, 1), False, False, "sigmoid"),
    (7, 3, 5, 0, 1, 2.0, 1.0, (7, 5), False, False, ""),          # C as the residual
    (4, 600, 20, 0, 1, 1.0, 0.25, (), True, True, "clip"),         # scalar C, Z
    (3, 8, 1, 1, 0, -1.5, 1.0, (1,), True, True, "tanh"),
    (9, 17, 40, 0, 0, 1.0, 1.0, (40,), False, True, "leaky_relu"),
]


@pytest.mark.parametrize("case", GEMM_CASES, ids=range(len(GEMM_CASES)))
def test_gemm_matches_the_interpreter(case):
    m, k, n, ta, tb, alpha, beta, c_shape, c_const, z, activation = case
    rng = np.random.default_rng(m * 100 + k + n)
    g = graphc.Graph("gemm")
    a_shape = (k, m) if ta else (m, k)
    b_shape = (n, k) if tb else (k, n)
    feeds = {}
    a = g.constant(_rand(rng, a_shape)) if ta else g.input("a", a_shape)
    if not ta:
        feeds["a"] = _rand(rng, a_shape)
    b = g.constant(_rand(rng, b_shape)) if (tb or alpha != 1) else g.input("b", b_shape)
    if "b" in g.inputs:
        feeds["b"] = _rand(rng, b_shape)
    operands = [a, b]
    if c_shape is not None:
        if c_const:
            operands.append(g.constant(_rand(rng, c_shape)))
        else:
            operands.append(g.input("c_in", c_shape))
            feeds["c_in"] = _rand(rng, c_shape)
    else:
        operands.append(None)
    attrs = {"transA": ta, "transB": tb, "alpha": alpha, "beta": beta}
    if z or activation:
        if z:
            operands.append(g.input("z_in", (m, n)))
            feeds["z_in"] = _rand(rng, (m, n))
        y = ops.apply("FusedGemm", tuple(operands), activation=activation,
                      activation_params=list(PARAMS.get(activation, ())), **attrs)
    else:
        y = ops.apply("Gemm", tuple(o for o in operands if o is not None), **attrs)
    g.output(y)
    check(g, feeds, k)


RUNTIME_CASES = [  # M, K, N, transA, transB, beta, C shape, C constant, Z, activation
    (1, 5, 3, 1, 0, 1.0, None, False, False, ""),              # dW = X^T dY, batch 5
    (37, 3, 20, 1, 0, 1.0, (20,), False, False, "relu"),        # run-time column bias
    (2, 17, 33, 0, 1, 1.0, (33,), True, False, ""),             # dX = dY W^T
    (3, 600, 7, 1, 1, 0.5, (3, 1), False, False, ""),           # K crosses 512; beta, row C
    (13, 9, 40, 1, 1, 1.0, (13, 40), False, True, "tanh"),      # full C and Z
    (2, 7, 5, 0, 0, -2.0, (2, 5), True, True, ""),              # constant full C, beta, Z
    (3, 4, 6, 0, 1, 0.25, (), False, True, "sigmoid"),          # run-time scalar C
    (1, 70, 33, 1, 0, 2.0, (1, 33), False, False, ""),          # beta, run-time [1, N] C
    (2, 3, 9, 0, 0, 3.0, (2, 9), False, False, "relu"),         # beta, run-time full C
]


@pytest.mark.parametrize("case", RUNTIME_CASES, ids=range(len(RUNTIME_CASES)))
def test_gemm_of_run_time_operands_matches_the_interpreter(case):
    """Transposed run-time A and B (as autodiff's dW = X^T dY makes), beta with a run-time C,
    and a full C together with Z: all lowered, none a LoweringError."""
    m, k, n, ta, tb, beta, c_shape, c_const, z, activation = case
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    g = graphc.Graph("gemm")
    a_shape, b_shape = ((k, m) if ta else (m, k)), ((n, k) if tb else (k, n))
    feeds = {"a": _rand(rng, a_shape), "b": _rand(rng, b_shape)}
    operands = [g.input("a", a_shape), g.input("b", b_shape), None]
    if c_shape is not None and c_const:
        operands[2] = g.constant(_rand(rng, c_shape))
    elif c_shape is not None:
        operands[2] = g.input("c_in", c_shape)
        feeds["c_in"] = _rand(rng, c_shape)
    if z:
        operands.append(g.input("z_in", (m, n)))
        feeds["z_in"] = _rand(rng, (m, n))
    attrs = {"transA": ta, "transB": tb, "beta": beta}
    if z or activation:
        y = ops.apply("FusedGemm", tuple(operands), activation=activation,
                      activation_params=list(PARAMS.get(activation, ())), **attrs)
    else:
        y = ops.apply("Gemm", tuple(o for o in operands if o is not None), **attrs)
    g.output(y)
    check(g, feeds, k)


def test_run_time_alpha_is_a_lowering_error_naming_the_node():
    g = graphc.Graph("gemm")
    g.output(ops.apply("Gemm", (g.input("a", (3, 4)), g.input("b", (4, 5))), alpha=2.0,
                       name="fc"))
    with pytest.raises(LoweringError, match="node 'fc'.*alpha=2.0 needs a constant"):
        CpuModel(g, threads=1)


def test_prepared_c_shows_in_the_kernel_dump():
    g = graphc.Graph("gemm")
    a, b = g.input("a", (4, 3)), g.input("b", (4, 5))
    g.output(ops.apply("FusedGemm", (a, b, g.input("c", (3, 5)), g.input("z", (3, 5))),
                       transA=1, beta=0.5, name="fc"))
    spec = CpuModel(g, threads=1).specialise({})
    text = spec.kernel_text()
    assert "prepare C: 15 floats = 0.5 * C + Z" in text and "_ta" in text


# -- the memory plan never aliases a GEMM's output with an operand ------------------------------
def test_plan_never_puts_a_gemm_output_in_place_of_an_operand():
    rng = np.random.default_rng(3)
    g = graphc.Graph("chain")
    x = g.input("x", (8, 8))
    h = ops.relu(x)                                   # dies at the GEMM: in-place candidate
    y = ops.apply("FusedGemm", (h, g.constant(_rand(rng, (8, 8))), None, ops.exp(x)))
    g.output(ops.matmul(y, y))
    plan = plan_memory(g)
    gemm_nodes = {n.name for n in g if n.op in GEMM_OPS}
    assert not gemm_nodes & set(plan.inplace_nodes())
    check(g, {"x": _rand(rng, (8, 8))}, 8)


# -- a small CNN end to end -------------------------------------------------------------------
def _cnn(rng) -> graphc.Graph:
    g = graphc.Graph("cnn")
    x = g.input("x", (None, 3, 12, 12))
    h = ops.relu(ops.conv(x, g.constant(_rand(rng, (8, 3, 3, 3)) * 0.3),
                          g.constant(_rand(rng, (8,))), pads=[1, 1, 1, 1]))
    h = ops.relu(ops.conv(h, g.constant(_rand(rng, (8, 8, 3, 3)) * 0.2), pads=[1, 1, 1, 1]))
    h = ops.max_pool(h, kernel_shape=[2, 2], strides=[2, 2])
    h = ops.conv(h, g.constant(_rand(rng, (6, 8, 1, 1)) * 0.3),
                 g.constant(_rand(rng, (6,))))
    h = ops.flatten(h, axis=1)
    h = ops.relu(ops.gemm(h, g.constant(_rand(rng, (6 * 36, 16)) * 0.05),
                          g.constant(_rand(rng, (16,)))))
    g.output(ops.softmax(ops.gemm(h, g.constant(_rand(rng, (10, 16)) * 0.3), transB=1),
                         axis=-1))
    return g


@pytest.mark.parametrize("conv", ["im2col", "winograd-f2", "winograd-f4"])
def test_small_cnn_end_to_end(conv):
    rng = np.random.default_rng(11)
    g = _cnn(rng)
    optimised = graphc.compile(g, conv=conv).graph
    used = {n.op for n in optimised} & set(GEMM_OPS)
    assert used, optimised.op_histogram()
    for batch in (1, 3):
        feeds = {"x": _rand(rng, (batch, 3, 12, 12))}
        want = graphc.interpret(g, feeds)[0]
        for threads in (1, 2):
            got = CpuModel(optimised, threads=threads).run(feeds)[0]
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


# -- timing (printed; run with -s) -------------------------------------------------------------
def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.slow
def test_timing_vgg_conv_gemm_and_winograd_matmul():
    rng = np.random.default_rng(0)
    rows = []
    g = graphc.Graph("vgg")
    cols = g.input("cols", (1, 1, 576, 224 * 224))
    w2 = g.constant(_rand(rng, (1, 64, 576)))
    bias = g.constant(_rand(rng, (64,)))
    g.output(ops.apply("ConvGemm", (w2, cols, bias), out_spatial=[224, 224], activation="relu"))
    feeds = {"cols": _rand(rng, (1, 1, 576, 224 * 224))}
    rows.append(("ConvGemm 64x576 @ 576x50176 +bias relu", g, feeds, 2 * 64 * 576 * 50176))
    w = graphc.Graph("wino")
    a = w.input("a", (36, 784, 64))
    w.output(ops.matmul(a, w.constant(_rand(rng, (36, 64, 64)))))
    rows.append(("Winograd MatMul [36,784,64] @ [36,64,64]", w, {"a": _rand(rng, (36, 784, 64))},
                 2 * 36 * 784 * 64 * 64))
    print("\n| op | interpreter ms | CpuModel t=1 ms | t=2 ms | GFLOP/s t=2 |")
    for label, graph, feed, flops in rows:
        ref = _best_of(lambda graph=graph, feed=feed: graphc.interpret(graph, feed), 3)
        times = []
        for t in (1, 2):
            model = CpuModel(graph, threads=t)
            model.run(feed)
            times.append(_best_of(lambda model=model, feed=feed: model.run(feed), 5))
        print(f"| {label} | {ref * 1e3:.1f} | {times[0] * 1e3:.1f} | {times[1] * 1e3:.1f} | "
              f"{flops / times[1] / 1e9:.0f} |")
