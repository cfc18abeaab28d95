"""Direct Conv / FusedConv and ConvTranspose kernels (backends/lower_conv.py) against the
interpreter on random inputs: 1-D/2-D/3-D, odd sizes, strides, pads, dilations, groups,
batch 1 and 3, fused epilogues."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from backends.lower import LoweringError
from graphc import ops

RNG = np.random.default_rng(7)


def _random(shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _compare(g, feeds, rtol=1e-5, atol=1e-5, **compile_args):
    model = graphc.compile(g, target="cpu", threads=2, **compile_args)
    got = model.run(feeds)
    want = graphc.interpret(g, feeds)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    return model


CONV_CASES = [
    # (x shape, w shape, attrs)
    ((1, 3, 9, 11), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((3, 4, 10, 7), (6, 2, 3, 2), {"group": 2, "strides": [2, 3], "dilations": [2, 1],
                                   "pads": [2, 0, 1, 1]}),
    ((3, 6, 7, 7), (6, 1, 3, 3), {"group": 6, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 4, 13), (7, 4, 5), {"strides": [3], "dilations": [2], "pads": [3, 1]}),
    ((3, 2, 11), (4, 1, 3), {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2]}),
    ((1, 2, 5, 6, 7), (3, 2, 2, 3, 3), {"strides": [1, 2, 1], "pads": [0, 1, 1, 1, 0, 1]}),
    ((3, 2, 4, 5, 3), (2, 1, 3, 3, 3), {"group": 2, "auto_pad": "SAME_LOWER"}),
    ((1, 2, 12, 12), (3, 2, 9, 9), {"pads": [4, 4, 4, 4]}),  # 81 taps: a looped kernel axis
    ((1, 3, 6, 5), (2, 3, 1, 1), {}),
]


@pytest.mark.parametrize("xs,ws,attrs", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_direct_conv_matches_the_interpreter(xs, ws, attrs):
    g = graphc.Graph("conv")
    x = g.input("x", xs)
    g.output(ops.conv(x, _random(ws), _random(ws[0]), **attrs))
    model = _compare(g, {"x": _random(xs)}, conv="direct")
    assert any(n.op in ("Conv", "FusedConv") for n in model.graph)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "clip"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_conv_epilogue_bias_residual_activation(activation, batch):
    g = graphc.Graph("fused")
    x = g.input("x", (batch, 4, 7, 9))
    z = g.input("z", (batch, 6, 7, 9))
    y = ops.conv(x, _random((6, 4, 3, 3)), _random(6), pads=[1, 1, 1, 1]) + z
    y = {"relu": ops.relu, "sigmoid": ops.sigmoid,
         "clip": lambda v: ops.clip(v, np.float32(-0.5), np.float32(0.7))}[activation](y)
    g.output(y)
    model = _compare(g, {"x": _random((batch, 4, 7, 9)), "z": _random((batch, 6, 7, 9))},
                     conv="direct")
    assert any(n.op == "FusedConv" for n in model.graph)


def test_direct_conv_without_bias_in_f64_and_symbolic_batch():
    g = graphc.Graph("f64")
    x = g.input("x", (None, 3, 8, 5), dtype="f64")
    g.output(ops.conv(x, _random((4, 3, 2, 3), np.float64), strides=[2, 1]))
    model = graphc.compile(g, target="cpu", conv="direct", threads=2)
    for batch in (1, 3):
        feeds = {"x": _random((batch, 3, 8, 5), np.float64)}
        np.testing.assert_allclose(model.run(feeds)[0], graphc.interpret(g, feeds)[0],
                                   rtol=1e-12, atol=1e-12)


def test_f16_conv_is_a_named_lowering_error():
    g = graphc.Graph("half")
    x = g.input("x", (1, 2, 5, 5), dtype="f16")
    g.output(ops.conv(x, _random((2, 2, 3, 3), np.float16), name="half_conv"))
    with pytest.raises(LoweringError, match="half_conv"):
        graphc.compile(g, target="cpu", conv="direct").run({"x": _random((1, 2, 5, 5),
                                                                         np.float16)})


TRANSPOSE_CASES = [
    ((2, 3, 5, 4), (3, 2, 3, 3), {}),
    ((1, 4, 5), (4, 3, 3), {"group": 2, "strides": [2], "dilations": [2], "pads": [1, 0],
                            "output_padding": [1]}),
    ((1, 2, 3, 4, 3), (2, 3, 2, 3, 3), {"strides": [3, 2, 1]}),
    ((3, 2, 4, 5), (2, 2, 4, 4), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 2, 3, 3), (2, 1, 3, 3), {"output_shape": [10, 8], "strides": [3, 2]}),
    ((1, 2, 3, 3), (2, 1, 3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ((3, 4, 6, 5), (4, 1, 2, 3), {"group": 4, "strides": [1, 3], "dilations": [3, 1]}),
]


@pytest.mark.parametrize("xs,ws,attrs", TRANSPOSE_CASES,
                         ids=[str(i) for i in range(len(TRANSPOSE_CASES))])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_matches_the_interpreter(xs, ws, attrs, bias):
    g = graphc.Graph("deconv")
    x = g.input("x", xs)
    operands = [x, _random(ws)] + ([_random(ws[1] * attrs.get("group", 1))] if bias else [])
    g.output(ops.conv_transpose(*operands, **attrs))
    _compare(g, {"x": _random(xs)})
