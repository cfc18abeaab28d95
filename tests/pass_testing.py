"""Shared scaffolding of the pass tests: run passes through the manager, random feeds,
same-outputs checks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

import graphc
from passes import PassManager, PassOptions

SEED_BY_BATCH = "batch"  # assert_same_outputs(seed=SEED_BY_BATCH): batch b's feeds use seed b


def run_passes(graph: graphc.Graph, pipeline: str | Iterable[str],
               options: PassOptions | None = None) -> graphc.Graph:
    """``pipeline`` run on ``graph`` by the manager, which verifies the IR after each pass; the
    input graph must come out unchanged, printed form and all."""
    before = str(graph)
    out = PassManager(pipeline, options).run(graph)
    assert str(graph) == before
    return out


def random_feeds(graph: graphc.Graph, batch: int = 2,
                 seed: int | np.random.Generator = 0) -> dict:
    """Standard-normal arrays for every input of ``graph`` in its dtype, each symbolic dim bound
    to ``batch``. ``seed`` is an int or a Generator to draw from (whose state then moves on)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        t = graph.type_of(name)
        shape = [batch if isinstance(d, str) else d for d in t.shape]
        feeds[name] = rng.standard_normal(shape).astype(t.np_dtype)
    return feeds


def assert_same_outputs_on(before: graphc.Graph, after: graphc.Graph, feeds: Mapping,
                           rtol: float = 0.0, atol: float = 0.0, *, strict: bool = False) -> None:
    """The interpreter gives ``after`` the outputs it gives ``before`` on ``feeds``: bit for bit
    (NaN equal to NaN) when both tolerances are 0, else within them, ``before``'s outputs being
    the desired ones. ``strict`` also asks that each pair's dtype and shape agree."""
    for got, want in zip(graphc.interpret(after, feeds), graphc.interpret(before, feeds),
                         strict=True):
        if strict:
            assert got.dtype == want.dtype and got.shape == want.shape
        if rtol == 0 and atol == 0:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def assert_same_outputs(before: graphc.Graph, after: graphc.Graph,
                        batches: Iterable[int] = (1, 3), rtol: float = 0.0, atol: float = 0.0,
                        seed: int | np.random.Generator | str = 0, *,
                        strict: bool = False) -> None:
    """``assert_same_outputs_on`` once per batch size, on ``random_feeds`` of ``before``.

    ``seed``: an int seeds every batch's feeds afresh, a Generator is drawn from batch after
    batch, and ``SEED_BY_BATCH`` seeds batch ``b``'s feeds with ``b``.
    """
    for batch in batches:
        feeds = random_feeds(before, batch, batch if seed == SEED_BY_BATCH else seed)
        assert_same_outputs_on(before, after, feeds, rtol, atol, strict=strict)
