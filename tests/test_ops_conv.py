"""Conv and ConvTranspose: references against onnxruntime and against direct loop oracles.

The oracles here are written independently of ``graphc/ops/convolution.py``: Conv sums one shifted
slice per kernel tap (no im2col), ConvTranspose scatters input pixel by input pixel, both in
float64 with the padding worked out from the ONNX spec formulas below. ``build_node`` is shared
with the pooling and normalization tests.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import graphc
from graphc.flops import node_flops
from graphc.types import TensorType

from .oracle import run_graphc, run_ort


# -- shape rules only (also used by test_ops_pool / test_ops_normalization) ----------------------
def build_node(op, types, attrs=None, name="node", n_outputs=1):
    """Add one node on inputs of the given TensorTypes (shape rules only, nothing runs)."""
    g = graphc.Graph()
    names = [g.add_input(f"x{i}", t) for i, t in enumerate(types)]
    outs = g.add_node(op, names, attrs or {}, outputs=[f"y{i}" for i in range(n_outputs)],
                      name=name)
    return g, [g.type_of(o) for o in outs]


# -- independent oracles --------------------------------------------------------------------------
def spec_conv_pads(spatial, kernel, strides, dilations, auto_pad, pads):
    """Explicit pads per the ONNX Conv spec (SAME: output = ceil(size / stride))."""
    n = len(spatial)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad == "NOTSET":
        return list(pads) if pads else [0] * (2 * n)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = (size + s - 1) // s
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        lower_half = total // 2
        begins.append(lower_half if auto_pad == "SAME_UPPER" else total - lower_half)
        ends.append(total - lower_half if auto_pad == "SAME_UPPER" else lower_half)
    return begins + ends


def naive_conv(x, w, b, strides, pads, dilations, group):
    """Sum over kernel taps of (shifted, strided input slice) x (tap weights), in float64."""
    n = x.ndim - 2
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[n + i])
                                                          for i in range(n)])
    kernel = w.shape[2:]
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(n)]
    y = np.zeros((x.shape[0], w.shape[0], *out))
    cg, mg = x.shape[1] // group, w.shape[0] // group
    for g in range(group):
        for tap in np.ndindex(*kernel):
            window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                           for t, d, o, s in zip(tap, dilations, out, strides))
            patch = xp[(slice(None), slice(g * cg, (g + 1) * cg)) + window]
            taps = w[(slice(g * mg, (g + 1) * mg), slice(None)) + tap].astype(np.float64)
            y[:, g * mg:(g + 1) * mg] += np.einsum("nc...,mc->nm...", patch, taps)
    if b is not None:
        y += b.reshape((1, -1) + (1,) * n)
    return y


def spec_transpose_pads(spatial, kernel, strides, dilations, attrs):
    """(pads, output size) of ConvTranspose per the ONNX spec text."""
    n = len(spatial)
    op = attrs.get("output_padding", [0] * n)
    full = [s * (i - 1) + p + (k - 1) * d + 1
            for i, s, p, k, d in zip(spatial, strides, op, kernel, dilations)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" not in attrs and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        pads = list(attrs.get("pads", [0] * (2 * n)))
        return pads, [f - pads[i] - pads[n + i] for i, f in enumerate(full)]
    target = list(attrs.get("output_shape") or [i * s for i, s in zip(spatial, strides)])
    begins, ends = [], []
    for f, t in zip(full, target):
        total = f - t
        if total < 0:  # a larger output extends at the end (ONNX reference, onnxruntime)
            begins.append(0)
            ends.append(total)
        elif auto_pad == "SAME_UPPER":
            begins.append(total // 2)
            ends.append(total - total // 2)
        else:
            begins.append(total - total // 2)
            ends.append(total // 2)
    return begins + ends, target


def naive_conv_transpose(x, w, b, strides, dilations, group, pads, out):
    """Scatter every input pixel times every tap to ``pixel * stride + tap * dilation``."""
    n = x.ndim - 2
    kernel = w.shape[2:]
    cg, mg = x.shape[1] // group, w.shape[1]
    size = [max(s * (i - 1) + d * (k - 1) + 1, p + o) for s, i, d, k, p, o
            in zip(strides, x.shape[2:], dilations, kernel, pads[:n], out)]
    y = np.zeros((x.shape[0], mg * group, *size))
    for pixel in np.ndindex(*x.shape[2:]):
        for tap in np.ndindex(*kernel):
            pos = tuple(i * s + t * d for i, s, t, d in zip(pixel, strides, tap, dilations))
            for g in range(group):
                xs = x[(slice(None), slice(g * cg, (g + 1) * cg)) + pixel].astype(np.float64)
                ws = w[(slice(g * cg, (g + 1) * cg), slice(None)) + tap].astype(np.float64)
                y[(slice(None), slice(g * mg, (g + 1) * mg)) + pos] += xs @ ws
    y = y[(Ellipsis,) + tuple(slice(p, p + o) for p, o in zip(pads[:n], out))]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n)
    return y


# -- Conv ----------------------------------------------------------------------------------------
CONV_CASES = [
    # x shape, w shape, attrs
    ((1, 3, 7, 9), (4, 3, 3, 3), {}),
    ((2, 3, 7, 9), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((3, 4, 11, 10), (6, 2, 3, 2), {"group": 2, "strides": [2, 1], "pads": [1, 0, 2, 1],
                                    "dilations": [1, 2]}),
    ((2, 5, 9, 8), (5, 1, 3, 3), {"group": 5, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((1, 4, 9, 8), (8, 1, 3, 3), {"group": 4}),  # depthwise with channel multiplier 2
    ((2, 3, 10), (5, 3, 4), {"auto_pad": "SAME_UPPER", "strides": [3]}),
    ((2, 3, 10), (5, 3, 4), {"auto_pad": "SAME_LOWER", "strides": [3]}),
    ((1, 3, 10, 7), (2, 3, 4, 2), {"auto_pad": "SAME_UPPER", "dilations": [2, 1]}),
    ((1, 3, 10, 7), (2, 3, 3, 2), {"auto_pad": "VALID", "strides": [2, 2]}),
    ((2, 4, 5, 6, 7), (4, 2, 3, 2, 3), {"group": 2, "pads": [1, 0, 1, 1, 0, 1],
                                         "strides": [1, 2, 2]}),
    ((1, 2, 6, 6), (3, 2, 1, 1), {"kernel_shape": [1, 1]}),
    ((1, 2, 7, 7), (3, 2, 3, 3), {"kernel_shape": [3, 3], "strides": [3, 3]}),
]


def _conv_inputs(rng, x_shape, w_shape, bias=True, dtype=np.float32):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    return x, w, b


def _naive_from_attrs(x, w, b, attrs):
    n = x.ndim - 2
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    pads = spec_conv_pads(x.shape[2:], w.shape[2:], strides, dilations,
                          attrs.get("auto_pad", "NOTSET"), attrs.get("pads"))
    return naive_conv(x, w, b, strides, pads, dilations, attrs.get("group", 1))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape,w_shape,attrs", CONV_CASES)
def test_conv_matches_oracles(rng, x_shape, w_shape, attrs, bias):
    x, w, b = _conv_inputs(rng, x_shape, w_shape, bias)
    (got,) = run_graphc("Conv", [x, w, b], attrs)
    want = _naive_from_attrs(x, w, b, attrs)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if "dilations" in attrs and attrs.get("auto_pad", "").startswith("SAME"):
        return  # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER"
    np.testing.assert_allclose(got, run_ort("Conv", [x, w, b], attrs)[0], rtol=1e-4, atol=1e-4)


def test_conv_float64_stays_float64(rng):
    x, w, b = _conv_inputs(rng, (2, 3, 6, 5), (4, 3, 2, 2), dtype=np.float64)
    (got,) = run_graphc("Conv", [x, w, b], {"pads": [0, 1, 1, 0]})
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, naive_conv(x, w, b, [1, 1], [0, 1, 1, 0], [1, 1], 1),
                               rtol=1e-12, atol=1e-12)


def test_conv_valid_ignores_pads(rng):
    """The spec forbids pads with auto_pad; graphc tolerates exporters that write both."""
    x, w, b = _conv_inputs(rng, (1, 3, 10, 7), (2, 3, 3, 2))
    (got,) = run_graphc("Conv", [x, w, b], {"auto_pad": "VALID", "pads": [2, 2, 2, 2]})
    np.testing.assert_allclose(got, naive_conv(x, w, b, [1, 1], [0] * 4, [1, 1], 1),
                               rtol=1e-4, atol=1e-4)


def test_conv_nan_propagates_only_through_its_windows(rng):
    x, w, _ = _conv_inputs(rng, (1, 2, 8, 8), (3, 2, 3, 3), bias=False)
    x[0, 1, 0, 0] = np.nan
    (got,) = run_graphc("Conv", [x, w], {"pads": [1, 1, 1, 1]})
    assert np.isnan(got[:, :, :2, :2]).all()
    assert np.isfinite(got[:, :, 2:, :]).all() and np.isfinite(got[:, :, :, 2:]).all()


def test_conv_symbolic_batch_passes_through(rng):
    g = graphc.Graph()
    x = g.input("x", (None, 3, 9, 9))
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    (y,) = g.add_node("Conv", [x.name, g.add_constant(w)], {"strides": [2, 2]}, outputs=["y"])
    g.set_outputs([y])
    assert g.type_of(y) == TensorType(("N", 4, 4, 4), "f32")
    for batch in (1, 3):
        feed = rng.standard_normal((batch, 3, 9, 9)).astype(np.float32)
        (got,) = graphc.interpret(g, {"x": feed})
        np.testing.assert_allclose(got, naive_conv(feed, w, None, [2, 2], [0] * 4, [1, 1], 1),
                                   rtol=1e-4, atol=1e-4)


def test_conv_symbolic_spatial_dims():
    w = TensorType((4, 3, 3, 3), "f32")
    same = {"pads": [1, 1, 1, 1]}
    _, (y,) = build_node("Conv", [TensorType(("N", 3, "H", "W"), "f32"), w], same)
    assert y.shape == ("N", 4, "H", "W")
    _, (y,) = build_node("Conv", [TensorType(("N", 3, "H", 8), "f32"), w],
                         {"auto_pad": "SAME_LOWER"})
    assert y.shape == ("N", 4, "H", 8)
    with pytest.raises(graphc.GraphcError, match="'myconv'.*'H' must be static"):
        build_node("Conv", [TensorType(("N", 3, "H", 8), "f32"), w], {}, name="myconv")
    with pytest.raises(graphc.GraphcError, match="'myconv'.*'H' must be static"):
        build_node("Conv", [TensorType(("N", 3, "H", 8), "f32"), w],
                   {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, name="myconv")


CONV_ERRORS = [
    ([(1, 3, 8, 8), (4, 2, 3, 3)], {}, "3 channels but W expects 2"),
    ([(1, 4, 8, 8), (4, 1, 3, 3)], {"group": 2}, "4 channels but W expects 2"),
    ([(1, 3, 8, 8), (5, 1, 3, 3)], {"group": 3}, "not divisible by group=3"),
    ([(1, 3, 8, 8), (4, 3, 3)], {}, "W must have the rank of X"),
    ([(3, 8), (4, 3)], {}, "rank >= 3"),
    ([(1, 3, 8, 8), (4, 3, 3, 3)], {"kernel_shape": [2, 2]}, "does not match W"),
    ([(1, 3, 8, 8), (4, 3, 3, 3), (3,)], {}, r"B must have shape \(4,\)"),
    ([(1, 3, 2, 8), (4, 3, 3, 3)], {}, "does not fit spatial axis 0"),
    ([(1, 3, 8, 8), (4, 3, 3, 3)], {"strides": [1, 1, 1]}, "strides has 3 values"),
    ([(1, 3, 8, 8), (4, 3, 3, 3)], {"dilations": [0, 1]}, "dilations must be positive"),
    ([(1, 3, 8, 8), (4, 3, 3, 3)], {"pads": [1, 1]}, "pads has 2 values"),
    ([(1, 3, 8, 8), (4, 3, 3, 3)], {"pads": [1, -1, 1, 1]}, "negative pads"),
]


@pytest.mark.parametrize("shapes,attrs,message", CONV_ERRORS)
def test_conv_shape_errors_name_the_node(shapes, attrs, message):
    types = [TensorType(s, "f32") for s in shapes]
    with pytest.raises(graphc.GraphcError, match=f"Conv node 'myconv'.*{message}"):
        build_node("Conv", types, attrs, name="myconv")


def test_conv_rejects_bad_dtypes_and_attributes():
    with pytest.raises(graphc.GraphcError, match="'myconv'.*float"):
        build_node("Conv", [TensorType((1, 3, 8, 8), "i64"), TensorType((4, 3, 3, 3), "i64")],
                   name="myconv")
    with pytest.raises(graphc.GraphcError, match="'myconv'.*dtype"):
        build_node("Conv", [TensorType((1, 3, 8, 8), "f32"), TensorType((4, 3, 3, 3), "f64")],
                   name="myconv")
    f32 = [TensorType((1, 3, 8, 8), "f32"), TensorType((4, 3, 3, 3), "f32")]
    with pytest.raises(graphc.GraphcError, match="'myconv'.*auto_pad"):
        build_node("Conv", f32, {"auto_pad": "SAME"}, name="myconv")
    with pytest.raises(graphc.GraphcError, match="'myconv'.*group"):
        build_node("Conv", f32, {"group": 0}, name="myconv")


def test_conv_flops_direct_count():
    g, _ = build_node("Conv", [TensorType((2, 4, 9, 9), "f32"), TensorType((6, 2, 3, 3), "f32")],
                      {"group": 2, "pads": [1, 1, 1, 1]})
    # 2 * N * M * OH * OW * C/group * KH * KW
    assert node_flops(g, g.node("node")) == 2 * 2 * 6 * 9 * 9 * 2 * 3 * 3


def test_conv_vgg_layer_is_fast(rng):
    """The im2col reference must run VGG-sized layers in well under a second."""
    x = rng.standard_normal((1, 64, 224, 224), dtype=np.float32)
    w = rng.standard_normal((64, 64, 3, 3), dtype=np.float32) * np.float32(0.05)
    run_graphc("Conv", [x, w], {"pads": [1, 1, 1, 1]})  # warm up allocations
    start = time.perf_counter()
    (got,) = run_graphc("Conv", [x, w], {"pads": [1, 1, 1, 1]})
    elapsed = time.perf_counter() - start
    assert got.shape == (1, 64, 224, 224)
    assert elapsed < 2.0, f"1x64x224x224 3x3 conv took {elapsed:.2f} s"
    want = naive_conv(x[:, :, :6, :6], w, None, [1, 1], [1, 1, 0, 0], [1, 1], 1)
    np.testing.assert_allclose(got[:, :, :5, :5], want[:, :, :5, :5], rtol=1e-4, atol=1e-4)


# -- ConvTranspose -------------------------------------------------------------------------------
TRANSPOSE_CASES = [
    # x shape, w shape, attrs, onnxruntime agrees with the spec here
    ((1, 2, 3, 3), (2, 3, 3, 3), {}, True),
    ((2, 4, 5, 4), (4, 3, 3, 3), {"group": 2, "strides": [2, 3], "pads": [1, 0, 2, 1],
                                  "dilations": [1, 2], "output_padding": [1, 0]}, True),
    ((1, 3, 7), (3, 2, 4), {"strides": [2], "output_shape": [17]}, True),  # total -1
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [7, 9]}, True),  # total 2
    ((1, 2, 3, 3), (2, 1, 3, 3), {"strides": [3, 2], "output_shape": [10, 8]}, True),
    ((1, 2, 5, 4, 3), (2, 2, 3, 2, 2), {"strides": [1, 2, 1], "pads": [1, 0, 0, 0, 1, 1]},
     True),
    ((2, 3, 4, 4), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER"}, True),  # total 2, even
    ((1, 4, 4, 5), (4, 1, 3, 3), {"group": 4, "strides": [2, 2], "output_padding": [1, 1]},
     True),
    ((1, 2, 4, 4), (2, 3, 3, 3), {"kernel_shape": [3, 3], "auto_pad": "VALID"}, True),
    # odd total padding: onnxruntime puts the extra pixel on the other side than the spec
    ((1, 2, 3, 4), (2, 3, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, False),
    ((1, 2, 3, 4), (2, 3, 3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, False),
    ((1, 2, 4, 5), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [8, 10]}, False),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape,w_shape,attrs,ort_agrees", TRANSPOSE_CASES)
def test_conv_transpose_matches_oracles(rng, x_shape, w_shape, attrs, ort_agrees, bias):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    group = attrs.get("group", 1)
    b = rng.standard_normal(w_shape[1] * group).astype(np.float32) if bias else None
    (got,) = run_graphc("ConvTranspose", [x, w, b], attrs)
    n = x.ndim - 2
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    pads, out = spec_transpose_pads(x.shape[2:], w.shape[2:], strides, dilations, attrs)
    want = naive_conv_transpose(x, w, b, strides, dilations, group, pads, out)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if ort_agrees:
        np.testing.assert_allclose(got, run_ort("ConvTranspose", [x, w, b], attrs)[0],
                                   rtol=1e-4, atol=1e-4)


def test_conv_transpose_is_the_gradient_of_conv(rng):
    """<conv(x, w), y> == <x, conv_transpose(y, w)> for matching strides/pads/dilations."""
    attrs = {"strides": [2, 3], "pads": [1, 2, 0, 1], "dilations": [2, 1], "group": 2}
    x = rng.standard_normal((2, 4, 11, 13))
    w = rng.standard_normal((6, 2, 3, 4))
    (y,) = run_graphc("Conv", [x, w], attrs)
    dy = rng.standard_normal(y.shape)
    extra = [11 - ((y.shape[2] - 1) * 2 + 2 * 2 + 1 - 1), 13 - ((y.shape[3] - 1) * 3 + 4 - 3)]
    (dx,) = run_graphc("ConvTranspose", [dy, w], dict(attrs, output_padding=extra))
    assert dx.shape == x.shape
    np.testing.assert_allclose(np.vdot(y, dy), np.vdot(x, dx), rtol=1e-10)


def test_conv_transpose_symbolic_batch_and_flops():
    g, (y,) = build_node("ConvTranspose", [TensorType(("N", 4, 5, 5), "f32"),
                                           TensorType((4, 3, 3, 3), "f32")],
                         {"strides": [2, 2], "group": 2})
    assert y == TensorType(("N", 6, 11, 11), "f32")
    g, _ = build_node("ConvTranspose", [TensorType((2, 4, 5, 5), "f32"),
                                        TensorType((4, 3, 3, 3), "f32")], {"group": 2})
    # 2 * N * C * H * W * M/group * KH * KW
    assert node_flops(g, g.node("node")) == 2 * 2 * 4 * 5 * 5 * 3 * 3 * 3


TRANSPOSE_ERRORS = [
    ([(1, 3, 4, 4), (4, 3, 3, 3)], {}, "3 channels but W expects 4"),
    ([(1, 3, 4, 4), (3, 2, 3, 3)], {"group": 2}, "not divisible by group=2"),
    ([(1, 4, 4, 4), (4, 2, 3, 3), (3,)], {"group": 2}, r"B must have shape \(4,\)"),
    ([(1, 3, 4, 4), (3, 2, 3, 3)], {"output_padding": [2, 0], "strides": [2, 2]},
     "output_padding"),
    ([(1, 3, 4, 4), (3, 2, 3, 3)], {"output_shape": [9]}, "output_shape has 1 values"),
    ([(1, 3, 4, 4), (3, 2, 3, 3)], {"pads": [3, 0, 3, 0]}, "empty output"),
    ([(1, 3, 4, 4), (3, 2, 3, 3)], {"kernel_shape": [3, 2]}, "does not match W"),
    ([(1, 3, "H", 4), (3, 2, 3, 3)], {}, "'H' of X must be static"),
]


@pytest.mark.parametrize("shapes,attrs,message", TRANSPOSE_ERRORS)
def test_conv_transpose_shape_errors_name_the_node(shapes, attrs, message):
    types = [TensorType(s, "f32") for s in shapes]
    with pytest.raises(graphc.GraphcError, match=f"ConvTranspose node 'up'.*{message}"):
        build_node("ConvTranspose", types, attrs, name="up")
