"""Shared by the CUDA tests: compile for target cuda, run, compare with the interpreter."""

from __future__ import annotations

import numpy as np

import graphc
from backends.cuda import compile_graph


def random_input(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def check(graph, feeds, conv="auto", rtol=1e-5, atol=1e-5, **options):
    """Compile ``graph`` for CUDA, run it on ``feeds`` and compare every output with the
    interpreter on the unoptimised graph; returns the model."""
    model = compile_graph(graph, conv=conv, **options)
    got = model.run(feeds)
    want = graphc.interpret(graph, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    return model


def ops_of(model) -> set:
    return {n.op for n in model.graph.nodes()}
