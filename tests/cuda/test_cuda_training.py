"""Training on target "cuda": ``fit``/``evaluate``/``predict`` run the step and evaluation
programs through the CUDA backend (the checked ``run(feeds, into=)`` path; the CPU's pointer
tables do not apply) and match target "reference" step for step. Also the kernel-IR ``IndexOf``
in generated CUDA (GatherGrad, the gradient of a Gather with run-time indices)."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from backends.cuda import compile_graph
from graphc import nn, ops, optim

pytestmark = pytest.mark.cuda


def tiny_mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 3), seed=3)


def digits_like(n=22, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n)


@pytest.mark.parametrize("optimizer", [lambda: optim.SGD(lr=0.2, momentum=0.9),
                                       lambda: optim.Adam(lr=0.05)], ids=["sgd", "adam"])
def test_fit_on_cuda_matches_reference_losses(optimizer):
    """A few steps (batch 8, a last batch of 6: two specialisations) with shuffling and a
    validation split: losses, accuracies and final weights as on target "reference"."""
    X, y = digits_like()
    results = {}
    for target in ("reference", "cuda"):
        model = tiny_mlp()
        history = model.fit(X, y, loss="cross_entropy", optimizer=optimizer(), epochs=2,
                            batch_size=8, validation_split=0.2, seed=4, target=target,
                            progress=False)
        results[target] = (history, model)
    ref, cuda = results["reference"], results["cuda"]
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(cuda[0][key], ref[0][key], rtol=1e-4)
    assert cuda[0]["accuracy"] == ref[0]["accuracy"]
    for name, array in ref[1].state_dict().items():
        np.testing.assert_allclose(cuda[1].state_dict()[name], array, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cuda[1].predict(X[:5], target="cuda"),
                               ref[1].predict(X[:5], target="reference"), rtol=1e-4, atol=1e-6)


def test_fit_on_cuda_with_mse_and_batch_one():
    X, y = digits_like(5, seed=1)
    targets = np.eye(3, dtype=np.float32)[y]
    losses = {}
    for target in ("reference", "cuda"):
        model = tiny_mlp()
        losses[target] = model.fit(X, targets, loss="mse", optimizer=optim.SGD(lr=0.1),
                                   epochs=1, batch_size=1, shuffle=False, target=target,
                                   progress=False)["loss"]
    np.testing.assert_allclose(losses["cuda"], losses["reference"], rtol=1e-4)


@pytest.mark.parametrize("dtype", ["i64", "i32"])
def test_gather_gradient_uses_index_of_and_matches_the_interpreter(dtype):
    """Repeated, negative and out-of-range indices: out-of-range ones match no row."""
    rng = np.random.default_rng(2)
    g = graphc.Graph("gather_grad")
    dy = g.input("dy", (2, 5, 3))
    idx = g.input("idx", (5,), dtype=dtype)
    like = g.input("like", (2, 4, 3))
    g.output(ops.apply("GatherGrad", [dy, idx, like], axis=1))
    feeds = {"dy": rng.standard_normal((2, 5, 3)).astype(np.float32),
             "idx": np.array([3, -1, 0, 3, 7], np.dtype(dtype.replace("i", "int"))),
             "like": np.zeros((2, 4, 3), np.float32)}
    model = compile_graph(g)
    assert "IndexOf" in model.emit("kernel") or "imax" in model.emit("cuda")
    (got,) = model.run(feeds)
    valid = dict(feeds, idx=np.where(feeds["idx"] > 3, 0, feeds["idx"]))
    (want,) = graphc.interpret(g, valid)
    want[:, 0] -= feeds["dy"][:, 4]  # index 7 is out of range: it adds to no row
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
