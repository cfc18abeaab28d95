"""CPU lowering of the gradient-only ops (backends/lower_grad.py) against the interpreter.

MaxPoolGrad has two kernels: one scan of the element's own window where windows do not overlap
(dilation 1, stride >= kernel) and the general gather over every candidate window. Inputs use
few distinct values, so windows hold ties (the first maximum must win, as MaxPool's argmax),
and NaNs in some cases.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops

POOLS = [  # (spatial, attributes): non-overlapping first, then overlapping/dilated
    ((8, 8), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ((7, 9), {"kernel_shape": [2, 2], "strides": [2, 2]}),             # odd: the tail has no window
    ((7, 7), {"kernel_shape": [2, 3], "strides": [3, 3]}),             # stride > kernel: gaps
    ((7, 6), {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 0, 0, 1]}),
    ((9, 9), {"kernel_shape": [3, 3], "strides": [3, 3], "ceil_mode": 1}),
    ((10,), {"kernel_shape": [3], "strides": [4], "pads": [1, 1]}),   # 1-D
    ((7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),  # overlapping
    ((8, 8), {"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [2, 2]}),   # dilated
]


def max_pool_grad_graph(batch, channels, spatial, attrs):
    shape = (batch, channels, *spatial)
    scratch = graphc.Graph("shape_of_dy")
    dy_shape = tuple(ops.apply("MaxPool", [scratch.input("x", shape)], **attrs).shape)
    g = graphc.Graph("max_pool_grad")
    dy, x = g.input("dy", dy_shape), g.input("x", shape)
    g.output(ops.apply("MaxPoolGrad", [dy, x], **attrs))
    return g, dy_shape


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("spatial,attrs", POOLS)
def test_max_pool_grad_matches_the_interpreter(batch, spatial, attrs):
    g, dy_shape = max_pool_grad_graph(batch, 3, spatial, attrs)
    rng = np.random.default_rng(batch)
    x = rng.integers(-2, 3, (batch, 3, *spatial)).astype(np.float32)  # ties in most windows
    feeds = {"dy": rng.standard_normal(dy_shape).astype(np.float32), "x": x}
    model = graphc.compile(g, target="cpu", cache=False)
    (want,) = graphc.interpret(g, feeds)
    (got,) = model.run(feeds)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spatial,attrs", [POOLS[1], POOLS[6]])
def test_max_pool_grad_with_nans_matches_the_interpreter(spatial, attrs):
    """A NaN wins its window (the first NaN, as MaxPool), so its element takes dY."""
    g, dy_shape = max_pool_grad_graph(2, 2, spatial, attrs)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, *spatial)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan
    feeds = {"dy": rng.standard_normal(dy_shape).astype(np.float32), "x": x}
    model = graphc.compile(g, target="cpu", cache=False)
    (want,) = graphc.interpret(g, feeds)
    (got,) = model.run(feeds)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
