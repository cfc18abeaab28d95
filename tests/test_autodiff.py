"""graphc.grad: the API (errors, ordering, accumulation), and gradient graphs as ordinary graphs
(print/parse, passes, target "reference" and "cpu", symbolic batch). Rule-by-rule correctness is
tests/test_gradcheck.py; here every result is compared with the interpreter or with finite
differences of the forward graph."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops
from graphc.autodiff import GradientError
from tests.test_gradcheck import numeric_grad

RTOL, ATOL = 1e-3, 1e-5


def mlp(batch=None, dtype="f64", seed=0):
    rng = np.random.default_rng(seed)
    np_dtype = np.float64 if dtype == "f64" else np.float32
    g = graphc.Graph("mlp")
    x = g.input("x", (batch, 6), dtype)
    t = g.input("t", (batch, 3), dtype)
    w1 = g.param(rng.standard_normal((6, 5)).astype(np_dtype) * 0.5, "w1")
    b1 = g.param(rng.standard_normal(5).astype(np_dtype) * 0.1, "b1")
    w2 = g.param(rng.standard_normal((5, 3)).astype(np_dtype) * 0.5, "w2")
    h = ops.relu(ops.gemm(x, w1, b1))
    logits = ops.matmul(h, w2, name="logits")
    loss = ops.reduce_mean(ops.reduce_sum(-(t * ops.log_softmax(logits)), np.array([1]),
                                          keepdims=0), name="loss")
    g.output(logits, loss)
    return g


def feeds(batch, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, batch)
    return {"x": rng.standard_normal((batch, 6)).astype(dtype),
            "t": np.eye(3, dtype=dtype)[labels]}


# -- API ----------------------------------------------------------------------------------------
def test_outputs_are_forward_outputs_then_gradients_in_wrt_order():
    g = mlp()
    before = str(g)
    gg = graphc.grad(g, "loss", ["w2", "x", "b1"])
    assert str(g) == before, "grad must not modify its input graph"
    assert gg.outputs[:2] == g.outputs
    assert [gg.type_of(v) for v in gg.outputs[2:]] == [g.type_of(v) for v in ("w2", "x", "b1")]
    f = feeds(4)
    out = graphc.interpret(gg, f)
    np.testing.assert_allclose(out[1], graphc.interpret(g, f)[1])
    fwd = g.copy()
    fwd.set_outputs(["loss"])
    np.testing.assert_allclose(out[3], numeric_grad(fwd, f, "x"), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 5])
def test_parameter_gradients_match_finite_differences(batch):
    g = mlp()
    gg = graphc.grad(g, "loss", ["w1", "b1", "w2"])
    f = feeds(batch)
    grads = graphc.interpret(gg, f)[2:]
    for name, got in zip(["w1", "b1", "w2"], grads):
        want = _param_numeric_grad(g, f, name)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)


def _param_numeric_grad(g, f, name):
    """Finite differences of the loss (output 1) w.r.t. the Param ``name``."""
    return _numeric_by_replacing(g, f, name, g.constant_value(name))


def _numeric_by_replacing(g, f, name, value):
    out = np.zeros_like(value)
    eps = 1e-6
    for index in np.ndindex(value.shape):
        losses = []
        for sign in (1, -1):
            shifted = value.copy()
            shifted[index] += sign * eps
            h = g.copy()
            node = h.node(name)
            h.replace_node(name, attrs={**node.attrs, "value": shifted})
            losses.append(graphc.interpret(h, f)[1].item())
        out[index] = (losses[0] - losses[1]) / (2 * eps)
    return out


def test_repeated_uses_accumulate():
    g = graphc.Graph("square")
    x = g.input("x", (3, 4), "f64")
    y = x * x                                 # the same value twice in one node
    z = ops.exp(x) + y * x                   # and x used by three nodes
    g.output(ops.reduce_sum(z, keepdims=0, name="s"))
    gg = graphc.grad(g, "s", ["x"])
    xv = np.random.default_rng(3).standard_normal((3, 4))
    (_, dx) = graphc.interpret(gg, {"x": xv})
    np.testing.assert_allclose(dx, np.exp(xv) + 3 * xv ** 2, rtol=1e-12)


def test_unreached_wrt_is_zeros_constant():
    g = graphc.Graph("g")
    x = g.input("x", (2, 3), "f64")
    u = g.input("u", (4,), "f64")
    g.output(ops.reduce_sum(x, keepdims=0, name="s"), u)
    gg = graphc.grad(g, "s", ["u", "x"])
    out = graphc.interpret(gg, {"x": np.ones((2, 3)), "u": np.ones(4)})
    assert gg.producer(gg.outputs[2]).op == "Constant"
    np.testing.assert_array_equal(out[2], np.zeros(4))
    np.testing.assert_array_equal(out[3], np.ones((2, 3)))


@pytest.mark.parametrize("of, wrt, message", [
    ("nope", ["w1"], "of='nope' is not a value"),
    ("logits", ["w1"], "must have exactly one element"),
    ("loss", ["w9"], "wrt name 'w9' is not a value"),
    ("loss", [], "wrt is empty"),
    ("loss", ["w1", "w1"], "names 'w1' twice"),
])
def test_api_errors_name_the_culprit(of, wrt, message):
    with pytest.raises(GradientError, match=message):
        graphc.grad(mlp(), of, wrt)


def test_non_differentiable_nodes_are_named():
    g = graphc.Graph("g")
    x = g.input("x", (3, 4), "f64")
    rounded = ops.cast(ops.cast(x, to=7, name="to_int"), to=11, name="back")
    g.output(ops.reduce_sum(rounded * x, keepdims=0, name="s"))
    with pytest.raises(GradientError, match="Cast node 'back' input 0 .* integer"):
        graphc.grad(g, "s", ["x"])
    h = graphc.Graph("h")
    x = h.input("x", (3, 4), "f64")
    idx = h.input("i", (2,), "i64")
    h.output(ops.reduce_sum(ops.gather(x, idx), keepdims=0, name="s"))
    with pytest.raises(GradientError, match="wrt 'i' has type i64"):
        graphc.grad(h, "s", ["i"])


def test_op_without_rule_is_named():
    registry = graphc.ops.registry
    saved = registry.get("Softplus").grad
    registry.get("Softplus").grad = None
    try:
        g = graphc.Graph("g")
        x = g.input("x", (3,), "f64")
        g.output(ops.reduce_sum(ops.softplus(x, name="sp"), keepdims=0, name="s"))
        with pytest.raises(GradientError, match="Softplus node 'sp' has no gradient rule"):
            graphc.grad(g, "s", ["x"])
    finally:
        registry.get("Softplus").grad = saved


# -- gradient graphs are ordinary graphs ----------------------------------------------------------
def test_gradient_graph_prints_parses_and_verifies():
    gg = graphc.grad(mlp(), "loss", ["w1", "b1", "w2"])
    graphc.verify(gg)
    text = str(gg)
    assert "Step(" in text and "grad_w1" in text
    again = graphc.Graph.parse(text, gg.constant_arrays())
    assert str(again) == text
    f = feeds(3)
    for a, b in zip(graphc.interpret(again, f), graphc.interpret(gg, f)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 4])
def test_symbolic_batch_runs_for_any_batch(batch):
    g = mlp(batch=None)
    gg = graphc.grad(g, "loss", ["w1", "b1", "w2", "x"])
    assert gg.type_of(gg.outputs[-1]).shape == ("N", 6)
    static = mlp(batch=batch)
    gs = graphc.grad(static, "loss", ["w1", "b1", "w2", "x"])
    f = feeds(batch)
    for a, b in zip(graphc.interpret(gg, f), graphc.interpret(gs, f)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def small_cnn(batch, dtype="f64", seed=0):
    rng = np.random.default_rng(seed)
    np_dtype = np.float64 if dtype == "f64" else np.float32
    g = graphc.Graph("cnn")
    x = g.input("x", (batch, 2, 8, 8), dtype)
    t = g.input("t", (batch, 3), dtype)
    w1 = g.param((rng.standard_normal((4, 2, 3, 3)) * 0.4).astype(np_dtype), "w1")
    b1 = g.param((rng.standard_normal(4) * 0.1).astype(np_dtype), "b1")
    w2 = g.param((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np_dtype), "w2")
    w3 = g.param((rng.standard_normal((64, 3)) * 0.2).astype(np_dtype), "w3")
    h = ops.relu(ops.conv(x, w1, b1, pads=[1, 1, 1, 1]))
    h = ops.relu(ops.conv(h, w2, pads=[1, 1, 1, 1]))
    h = ops.max_pool(h, kernel_shape=[2, 2], strides=[2, 2])
    logits = ops.matmul(ops.flatten(h), w3)
    loss = ops.reduce_mean(ops.reduce_sum(-(t * ops.log_softmax(logits)), np.array([1]),
                                          keepdims=0), name="loss")
    g.output(loss)
    return g


def cnn_feeds(batch, dtype=np.float64, seed=2):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 2, 8, 8)).astype(dtype),
            "t": np.eye(3, dtype=dtype)[rng.integers(0, 3, batch)]}


@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_gradients_match_finite_differences_of_the_input(batch):
    g = small_cnn(batch)
    gg = graphc.grad(g, "loss", ["x", "w1"])
    f = cnn_feeds(batch)
    dx, dw1 = graphc.interpret(gg, f)[1:]
    np.testing.assert_allclose(dx, numeric_grad(g, f, "x"), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dw1, _numeric_by_replacing_loss0(g, f, "w1"), rtol=RTOL,
                               atol=ATOL)


def _numeric_by_replacing_loss0(g, f, name):
    value = g.constant_value(name)
    out = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        losses = []
        for sign in (1, -1):
            shifted = value.copy()
            shifted[index] += sign * 1e-6
            h = g.copy()
            h.replace_node(name, attrs={**h.node(name).attrs, "value": shifted})
            losses.append(graphc.interpret(h, f)[0].item())
        out[index] = (losses[0] - losses[1]) / (2e-6)
    return out


@pytest.mark.parametrize("make, make_feeds", [(mlp, feeds), (small_cnn, cnn_feeds)])
def test_reference_target_with_default_passes(make, make_feeds):
    g = make(3) if make is small_cnn else make()
    wrt = ["w1", "b1", "w2"]
    gg = graphc.grad(g, "loss", wrt)
    model = graphc.compile(gg, target="reference", training=True)
    f = make_feeds(3)
    for got, want in zip(model.run(f), graphc.interpret(gg, f)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    if make is small_cnn:  # the conv gradients were lowered like forward convs
        assert "Conv" not in model.graph.op_histogram()


@pytest.mark.parametrize("make, make_feeds, batch", [(mlp, feeds, 1), (mlp, feeds, 7),
                                                     (small_cnn, cnn_feeds, 2)])
def test_cpu_target_float32(make, make_feeds, batch):
    import backends.lower_grad  # noqa: F401  (registers the gradient ops' lowerings)

    g = make(batch, dtype="f32") if make is small_cnn else make(None, dtype="f32")
    gg = graphc.grad(g, "loss", ["w1", "b1", "w2"])
    model = graphc.compile(gg, target="cpu", training=True, threads=2)
    f = make_feeds(batch, np.float32)
    for got, want in zip(model.run(f), graphc.interpret(gg, f)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_symbolic_batch_cnn_matches_static_batch():
    # with a symbolic batch, dW is Im2Col(X) times dY summed over the batch instead of a Conv
    gg = graphc.grad(small_cnn(None), "loss", ["w1", "b1", "w2", "x"])
    gs = graphc.grad(small_cnn(2), "loss", ["w1", "b1", "w2", "x"])
    assert "Im2Col" in gg.op_histogram() and "Im2Col" not in gs.op_histogram()
    f = cnn_feeds(2)
    for a, b in zip(graphc.interpret(gg, f), graphc.interpret(gs, f)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("axis,indices", [(0, [[2, 0], [2, -1]]), (1, [4, 0, 4, -5, 1])])
def test_gather_gradient_on_the_cpu_matches_the_interpreter(axis, indices):
    """GatherGrad (a scatter-add; repeated and negative indices accumulate) lowers to a kernel."""
    rng = np.random.default_rng(7)
    g = graphc.Graph("gather_grad")
    data = g.input("data", (3, 5, 2))
    idx = g.input("idx", np.shape(indices), dtype="i64")
    picked = ops.gather(data, idx, axis=axis)
    weights = rng.standard_normal(picked.shape).astype(np.float32)
    g.output(ops.reduce_sum(picked * weights, keepdims=0))
    grads = graphc.grad(g, of=g.outputs[0], wrt=["data"])
    feeds = {"data": rng.standard_normal((3, 5, 2)).astype(np.float32),
             "idx": np.array(indices, np.int64)}
    model = graphc.compile(grads, target="cpu", cache=False)
    assert any(n.op == "GatherGrad" for n in model.graph)
    for got, want in zip(model.run(feeds), graphc.interpret(grads, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
