"""The windowed ops' lowerings (``backends/lower_window.py``) JIT-compiled by the LLVM backend
and compared with ``graphc.interpret`` of the same one-node graph.

The harness is ``tests/test_llvm_codegen.py``'s: every case runs with 1, 2 and 3 thread shares
(outputs pre-filled with NaN/0x5A sentinels, so a skipped or doubly written share shows) and
with 2 concurrent threads. Inputs hold NaN, +inf and -inf unless a test says otherwise.
Tolerances:

* exact (NaN == NaN): MaxPool and its Indices, Im2Col (data movement and max);
* AveragePool: |got - want| <= 1e-6 * max|want| (numpy sums 8+ taps pairwise, the kernels in
  order; windows of fewer taps per axis are checked bit-exact too), NaN and infinities exact;
* LRN: rtol 1e-6 (f32; numpy's SIMD ``power`` vs the C library's ``powf`` or, for beta 0.75,
  two square roots), 1e-12 (f64);
* Winograd transforms: |got - want| <= 1e-5 * max|want| (the order of the additions in the
  straight-line transforms differs from the references' BLAS products), NaN and infinities
  exact; activations with exp/tanh inside add their few-ulp error, far below that.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from backends import lower_window
from backends.llvm.codegen import compile_kernels
from backends.lower import LoweringError
from graphc.errors import GraphcError
from graphc.ops.epilogue import ACTIVATIONS
from tests.test_llvm_codegen import Case, check, data, exact


def _specials_exact(got, want) -> None:
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    infinite = np.isinf(want)
    np.testing.assert_array_equal(got[infinite], want[infinite])
    assert not np.isinf(got[~infinite]).any()


def scaled(rel: float):
    """|got - want| <= rel * max |want| over the finite values; NaN and infinities exact."""

    def compare(got, want) -> None:
        _specials_exact(got, want)
        finite = np.isfinite(want)
        if not finite.any():
            return
        w = want[finite].astype(np.float64)
        np.testing.assert_allclose(got[finite].astype(np.float64), w, rtol=0,
                                   atol=rel * max(np.abs(w).max(), 1e-30))

    return compare


def rtol(value: float):
    def compare(got, want) -> None:
        _specials_exact(got, want)
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=value)

    return compare


# -- MaxPool --------------------------------------------------------------------------------------
POOL_2D = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 2], "pads": [2, 0, 1, 1]},
    {"kernel_shape": [3, 3], "dilations": [2, 1], "pads": [1, 2, 2, 0], "strides": [1, 3]},
    {"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [3, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [3, 4], "strides": [2, 3], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [4, 3], "strides": [3, 2], "auto_pad": "SAME_LOWER"},
    {"kernel_shape": [2, 3], "strides": [1, 2], "auto_pad": "VALID", "pads": [1, 1, 1, 1]},
    {"kernel_shape": [1, 1]},
]
SHAPES_2D = [(1, 3, 7, 9), (3, 2, 8, 8), (2, 1, 11, 13), (1, 2, 5, 4)]


@pytest.mark.parametrize("attrs", POOL_2D, ids=lambda a: str(a))
def test_max_pool_2d(attrs):
    check([("MaxPool", [data(*s)], attrs) for s in SHAPES_2D], exact)


def test_max_pool_1d_3d_and_dtypes():
    one_d = [{"kernel_shape": [3], "strides": [2], "pads": [1, 2]},
             {"kernel_shape": [4], "dilations": [2], "ceil_mode": 1, "strides": [3]},
             {"kernel_shape": [2], "auto_pad": "SAME_UPPER", "strides": [2]}]
    three_d = {"kernel_shape": [2, 3, 2], "strides": [2, 1, 2], "pads": [1, 1, 0, 0, 1, 1]}
    cases = [("MaxPool", [data(s, 3, n)], a) for a in one_d for s, n in ((1, 17), (3, 8))]
    cases += [("MaxPool", [data(1, 2, 5, 6, 7)], three_d),
              ("MaxPool", [data(2, 1, 3, 4, 5)], {"kernel_shape": [3, 3, 3],
                                                   "pads": [1] * 6, "ceil_mode": 1,
                                                   "strides": [2, 2, 2]})]
    attrs = POOL_2D[1]
    cases += [("MaxPool", [data(2, 3, 7, 6, dtype=dt)], attrs)
              for dt in (np.float64, np.float16, np.int8, np.uint8)]
    check(cases, exact)


@pytest.mark.parametrize("order", [0, 1])
def test_max_pool_indices(order):
    cases = [("MaxPool", [data(*s)], {**a, "storage_order": order}, (), 2)
             for a in (POOL_2D[1], POOL_2D[3], POOL_2D[5], POOL_2D[7]) for s in SHAPES_2D[:3]]
    cases += [("MaxPool", [data(3, 2, 13)], {"kernel_shape": [3], "strides": [2],
                                              "pads": [1, 1], "storage_order": order}, (), 2),
              ("MaxPool", [data(1, 2, 4, 5, 6)], {"kernel_shape": [2, 2, 3], "pads": [1] * 6,
                                                   "storage_order": order}, (), 2)]
    cases += [("MaxPool", [data(2, 3, 7, 6, dtype=dt)], {**POOL_2D[1], "storage_order": order},
               (), 2) for dt in (np.float64, np.float16, np.int8, np.uint8)]
    check(cases, exact)


def test_max_pool_indices_ties_and_specials():
    """First maximum wins, a NaN beats everything and the first NaN wins; an all -inf window
    (padding included) reports its first tap, a padded one."""
    x = np.array([[[[1, 1, 2, 2], [np.nan, 0, np.nan, 5], [-np.inf, -np.inf, 7, 7],
                    [-np.inf, -np.inf, 7, np.nan]]]], np.float32)
    cases = [("MaxPool", [x], {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1],
                               "storage_order": s}, (), 2) for s in (0, 1)]
    cases.append(("MaxPool", [np.zeros((1, 1, 3, 3), np.float32)],
                  {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (), 2))
    check(cases, exact)


def test_window_wholly_in_padding():
    """Float MaxPool gives -inf (Indices: the padded first tap); AveragePool divides 0 by 0."""
    attrs = {"kernel_shape": [2, 2], "pads": [2, 2, 2, 2], "strides": [3, 3]}
    check([("MaxPool", [data(2, 2, 4, 5)], attrs), ("MaxPool", [data(1, 2, 4, 5)], attrs, (), 2),
           ("MaxPool", [data(1, 1, 5)], {"kernel_shape": [2], "dilations": [4],
                                         "pads": [1, 0]})], exact)
    check([("AveragePool", [data(2, 2, 4, 5)], attrs)], exact)


def _int8_lows(*shape):
    """int8 data full of the lowest value: a padded tap compared as -128 instead of -inf would
    steal the Indices."""
    return np.random.default_rng(7).choice(np.array([-128, -127, 3], np.int8), shape,
                                           p=[0.8, 0.1, 0.1])


def test_integer_max_pool_of_pure_padding_is_rejected():
    case = ("MaxPool", [data(1, 1, 4, 4, dtype=np.int8)],
            {"kernel_shape": [2, 2], "pads": [2, 0, 0, 0]})
    with pytest.raises(LoweringError, match="wholly in the padding"):
        Case(*case)


def test_large_kernels_loop_over_taps():
    """Kernels beyond UNROLL_TAPS loop over their leading axes (coarse, guarded borders)."""
    assert lower_window.loop_axes([9, 9]) == 1 and lower_window.loop_axes([70]) == 1
    cases = [("MaxPool", [data(2, 2, 12, 11)], {"kernel_shape": [9, 9], "pads": [4, 3, 2, 4]}),
             ("MaxPool", [data(1, 2, 12, 11)], {"kernel_shape": [9, 9], "pads": [4, 3, 2, 4],
                                                 "storage_order": 1}, (), 2),
             ("MaxPool", [data(2, 1, 80)], {"kernel_shape": [70], "pads": [3, 5],
                                            "strides": [4]}, (), 2),
             ("MaxPool", [_int8_lows(1, 2, 12, 11)], {"kernel_shape": [9, 9],
                                                      "pads": [4, 3, 2, 4]}, (), 2)]
    check(cases, exact)
    check([("AveragePool", [data(2, 2, 12, 11)], {"kernel_shape": [9, 9], "pads": [4, 3, 2, 4],
                                                   "count_include_pad": inc})
           for inc in (0, 1)], scaled(1e-6))


def test_coarse_borders(monkeypatch):
    """Over the unrolling budget, border runs of several positions select against the fill
    with clamped loads."""
    monkeypatch.setattr(lower_window, "UNROLL_BUDGET", 0)
    wide = {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]}
    cases = [("MaxPool", [data(2, 3, 7, 9)], wide),
             ("MaxPool", [data(2, 3, 7, 9)], {"kernel_shape": [5, 4], "pads": [2, 3, 1, 2],
                                              "strides": [1, 2], "ceil_mode": 1}),
             ("MaxPool", [data(1, 2, 7, 9)], {**wide, "storage_order": 1}, (), 2),
             ("MaxPool", [_int8_lows(2, 2, 7, 9)], {**wide, "storage_order": 1}, (), 2),
             ("AveragePool", [data(2, 3, 7, 9)], {**wide, "count_include_pad": 1}),
             ("AveragePool", [data(2, 3, 7, 9)], {"kernel_shape": [4, 4], "pads": [2, 1, 2, 1],
                                                  "strides": [1, 2], "ceil_mode": 1}),
             ("LRN", [data(2, 7, 3)], {"size": 5})]
    assert all("select(" in str(b.kernel) for c in cases for b in Case(*c).bound)
    check(cases[:4], exact)
    check(cases[4:6], scaled(1e-6))
    check(cases[6:], rtol(1e-6))


def test_fine_segments_leave_no_guards():
    """Border positions get their own loops, so no tap needs a select or a clamp."""
    for attrs in POOL_2D:
        (bound,) = Case("MaxPool", [data(2, 3, 9, 10)], attrs).bound
        text = str(bound.kernel)
        assert "select(" not in text and "max(i" not in text, attrs


# -- AveragePool ----------------------------------------------------------------------------------
@pytest.mark.parametrize("include_pad", [0, 1])
def test_average_pool(include_pad):
    cases = [("AveragePool", [data(*s)], {**a, "count_include_pad": include_pad})
             for a in POOL_2D for s in SHAPES_2D[:3]]
    cases += [("AveragePool", [data(2, 3, 17)], {"kernel_shape": [4], "strides": [3],
                                                  "pads": [2, 1], "ceil_mode": 1,
                                                  "count_include_pad": include_pad}),
              ("AveragePool", [data(1, 2, 5, 6, 7)], {"kernel_shape": [2, 3, 2],
                                                       "pads": [1, 1, 0, 0, 1, 1],
                                                       "count_include_pad": include_pad})]
    cases += [("AveragePool", [data(2, 3, 7, 6, dtype=dt)],
               {**POOL_2D[5], "count_include_pad": include_pad})
              for dt in (np.float64, np.float16)]
    check(cases, scaled(1e-6))


def test_average_pool_small_windows_match_numpy_exactly():
    """Up to 7 taps per axis numpy sums a row after another, in the kernels' order."""
    x = data(2, 3, 9, 8, specials=False)
    check([("AveragePool", [x], {**a, "count_include_pad": inc})
           for a in POOL_2D[:6] for inc in (0, 1)], exact)


# -- LRN ------------------------------------------------------------------------------------------
def test_lrn():
    cases = [("LRN", [data(*s)], {"size": size, "alpha": 2e-3, "beta": 0.75, "bias": 1.5})
             for s in ((2, 7, 5, 3), (1, 1, 4), (3, 9), (1, 4, 2, 2, 3)) for size in (1, 3, 4, 5)]
    cases.append(("LRN", [data(2, 5, 6)], {"size": 11}))  # the window covers every channel
    cases += [("LRN", [data(2, 7, 5)], {"size": 3, "beta": beta}) for beta in (0.6, 1.0)]
    cases.append(("LRN", [np.array([[0, -0.0, 1e-20, 1e30, np.inf, -np.inf, np.nan]] * 2,
                                    np.float32)], {"size": 1, "bias": 0.0}))
    check(cases, rtol(1e-6))
    check([("LRN", [data(2, 6, 7, dtype=np.float64)], {"size": 3, "beta": 0.6})], rtol(1e-12))


def test_lrn_rejects_f16():
    with pytest.raises(LoweringError, match="f16"):
        Case("LRN", [data(1, 3, 4, dtype=np.float16)], {"size": 3})


# -- Im2Col ---------------------------------------------------------------------------------------
IM2COL = [
    ((1, 3, 7, 9), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ((3, 4, 8, 7), {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 1, 2, 0],
                    "group": 2}),
    ((2, 6, 9, 9), {"kernel_shape": [3, 3], "dilations": [2, 3], "pads": [2, 2, 2, 2],
                    "group": 3}),
    ((1, 2, 5, 5), {"kernel_shape": [1, 1], "strides": [2, 2]}),
    ((1, 1, 4, 5), {"kernel_shape": [4, 5], "pads": [3, 4, 3, 4], "strides": [3, 2]}),
    ((2, 3, 17), {"kernel_shape": [5], "strides": [2], "pads": [2, 3]}),
    ((1, 4, 4, 5, 6), {"kernel_shape": [2, 3, 2], "pads": [1, 0, 1, 0, 1, 1], "group": 2}),
]


def test_im2col():
    cases = [("Im2Col", [data(*s)], a) for s, a in IM2COL]
    cases += [("Im2Col", [data(2, 2, 6, 5, dtype=dt)], IM2COL[1][1] | {"group": 1})
              for dt in (np.float64, np.float16)]
    check(cases, exact)


# geometries of the row-wise lowering: odd sizes, asymmetric pads, strides, dilations, groups,
# batch 1 and 3, windows larger than the input, and windows too large to unroll (looped taps)
IM2COL_ROWS = [
    ((3, 2, 7, 9), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ((1, 3, 8, 8), {"kernel_shape": [3, 3], "pads": [2, 0, 1, 3], "strides": [2, 3]}),
    ((3, 4, 11, 6), {"kernel_shape": [2, 3], "dilations": [3, 2], "pads": [1, 2, 0, 1],
                     "group": 4}),
    ((1, 6, 5, 13), {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2], "group": 2}),
    ((3, 1, 3, 4), {"kernel_shape": [5, 6], "pads": [3, 3, 2, 4]}),
    ((1, 2, 9, 9), {"kernel_shape": [11, 11], "pads": [5, 5, 5, 5]}),
    ((1, 1, 23, 21), {"kernel_shape": [11, 11], "strides": [4, 4]}),
    ((3, 2, 5, 4, 7), {"kernel_shape": [3, 2, 3], "pads": [1, 0, 1, 1, 1, 1],
                       "strides": [1, 2, 1], "dilations": [2, 1, 1]}),
    ((1, 3, 4, 4, 5), {"kernel_shape": [5, 5, 5], "pads": [2, 2, 2, 2, 2, 2]}),
    ((3, 2, 1), {"kernel_shape": [3], "pads": [1, 1]}),
    ((1, 3, 31), {"kernel_shape": [7], "strides": [3], "dilations": [2], "pads": [4, 5]}),
]


@pytest.mark.parametrize("shape, attrs", IM2COL_ROWS)
def test_im2col_geometries(shape, attrs):
    check([("Im2Col", [data(*shape)], attrs)], exact)


def _parallel_loops(kernel) -> list:
    return [s for s in kernel.body if s.parallel]


def test_im2col_splits_threads_by_output_rows_and_folds_guards():
    """A 3x3 window with pad 1 is parallel over (plane, output row), one loop per segment of
    the rows, and every border guard folds: no select or clamp is left."""
    case = Case("Im2Col", [data(3, 4, 10, 12)], IM2COL[0][1])
    kernel = case.bound[0].kernel
    assert sum(loop.extent for loop in _parallel_loops(kernel)) == 3 * 4 * 10
    assert len(kernel.body) == 3  # top border row, interior rows, bottom border row
    assert "select(" not in str(kernel) and "max(" not in str(kernel)


def test_im2col_large_window_loops_its_leading_taps():
    """An 11x11 window loops over its leading taps (bounded code) and selects only on the
    border rows: the interior rows' segment is select-free."""
    case = Case("Im2Col", [data(1, 2, 30, 30)], {"kernel_shape": [11, 11],
                                                 "pads": [5, 5, 5, 5]})
    loops = _parallel_loops(case.bound[0].kernel)
    assert len(loops) == 3
    assert "select(" in lower_window.k.format_kernel(
        lower_window.k.Kernel("top", (), (loops[0],)))
    assert "select(" not in lower_window.k.format_kernel(
        lower_window.k.Kernel("interior", (), (loops[1],)))
    # 3 segments x (a loop over the leading tap + at most 3 column runs per tap of the last
    # axis); unrolled over the fine segments it would be 11 x 11 x 21 loops
    assert str(case.bound[0].kernel).count("for ") <= 3 * (2 + 3 * 11)


# -- Winograd -------------------------------------------------------------------------------------
def _tiles(out_h: int, out_w: int, m: int) -> list[int]:
    return [math.ceil(out_h / m), math.ceil(out_w / m)]


def _input_case(shape, m, pads, group=1, fold=1, dtype=np.float32, specials=True):
    _, _, h, w = shape
    out_h, out_w = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    attrs = {"m": m, "pads": list(pads), "tiles": _tiles(out_h, out_w, m), "group": group,
             "fold_batch": fold}
    return ("WinogradInputTransform", [data(*shape, dtype=dtype, specials=specials)], attrs)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_input_transform(m):
    cases = [_input_case(s, m, p, g, f)
             for s, p, g in (((1, 3, 7, 9), (1, 1, 1, 1), 1), ((3, 4, 8, 8), (0, 0, 0, 0), 2),
                             ((2, 6, 11, 6), (2, 0, 1, 1), 3), ((1, 2, 3, 3), (1, 1, 1, 1), 1))
             for f in (0, 1)]
    check(cases, scaled(1e-5))
    check([_input_case((2, 5, 9, 7), m, (1, 1, 1, 1), 1, f, specials=False) for f in (0, 1)]
          + [_input_case((1, 3, 6, 5), m, (1, 2, 0, 1), 1, 1, np.float64)], scaled(1e-5))


def _output_case(n, k, out_h, out_w, m, group=1, fold=1, bias=False, residual=False,
                 activation="", params=(), dtype=np.float32, specials=True):
    a = m + 2
    th, tw = _tiles(out_h, out_w, m)
    lead = () if fold else (n,)
    tiles = n * th * tw if fold else th * tw
    shape = lead + ((group,) if group > 1 else ()) + (a * a, tiles, k // group)
    inputs = [data(*shape, dtype=dtype, specials=specials)]
    inputs.append(data(k, dtype=dtype) if bias else None)
    if residual:
        inputs.append(data(n, k, out_h, out_w, dtype=dtype, specials=specials))
    attrs = {"m": m, "tiles": [th, tw], "group": group, "fold_batch": fold,
             "out_shape": [n if fold else -1, k, out_h, out_w], "activation": activation,
             "activation_params": list(params)}
    return ("WinogradOutput", inputs, attrs)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_output(m):
    cases = [_output_case(n, k, oh, ow, m, g, f, bias=b, residual=r)
             for n, k, oh, ow, g, b, r in ((1, 3, 7, 9, 1, False, False),
                                           (3, 4, 8, 8, 2, True, True),
                                           (2, 6, 5, 6, 3, True, False),
                                           (1, 2, 1, 1, 1, False, True))
             for f in (0, 1)]
    check(cases, scaled(1e-5))
    check([_output_case(2, 5, 9, 7, m, 1, f, True, True, specials=False) for f in (0, 1)]
          + [_output_case(1, 4, 6, 5, m, 2, 1, True, True, dtype=np.float64)], scaled(1e-5))


ACTIVATION_PARAMS = {"leaky_relu": (0.1,), "clip": (-0.5, 1.5), "elu": (0.7,),
                     "selu": (1.67, 1.05), "hard_sigmoid": (0.2, 0.5)}


def test_winograd_output_activations():
    cases = [_output_case(1, 4, 7, 6, m, 1, 1, True, True, name, ACTIVATION_PARAMS.get(name, ()),
                          specials=False)
             for name in ACTIVATIONS for m in (2, 4)]
    cases.append(_output_case(2, 4, 5, 5, 2, 2, 0, True, True, "relu"))  # with NaN, +-inf
    check(cases, scaled(1e-5))


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_filter_transform(m):
    cases = [("WinogradFilterTransform", [data(k, c, 3, 3, dtype=dt)], {"m": m, "group": g})
             for k, c, g, dt in ((4, 3, 1, np.float32), (6, 2, 3, np.float32),
                                 (1, 1, 1, np.float32), (5, 3, 1, np.float64))]
    check(cases, scaled(1e-5))


def test_winograd_classic_points_and_nan_spread():
    """The F4 matrices of other points are baked in the same way; a NaN or inf anywhere in a
    tile spreads as through the references' dense products."""
    points = [0.0, 1.0, -1.0, 2.0, -2.0]
    x = data(1, 2, 8, 8, specials=False)
    x[0, 0, 3, 5], x[0, 1, 0, 0], x[0, 1, 6, 2] = np.nan, np.inf, -np.inf
    name, _, attrs = _input_case((1, 2, 8, 8), 4, (1, 1, 1, 1))
    out = _output_case(1, 2, 8, 8, 4, specials=False)
    out[1][0].reshape(-1)[[5, 77, 130]] = (np.inf, np.nan, -np.inf)
    check([(name, [x], attrs), (name, [x], {**attrs, "points": points}),
           (out[0], out[1], {**out[2], "points": points}), out,
           ("WinogradFilterTransform", [data(3, 2, 3, 3)], {"m": 4, "points": points})],
          scaled(1e-5))


# -- code shape -----------------------------------------------------------------------------------
def test_inner_loops_vectorise():
    """The innermost loops become vector code (any width the host has), or a memcpy/memset
    where LLVM sees a plain copy (Im2Col with unit stride)."""
    cases = [Case("MaxPool", [data(1, 4, 16, 32)], POOL_2D[0]),
             Case("AveragePool", [data(1, 4, 16, 32)], POOL_2D[1]),
             Case(*_input_case((1, 32, 16, 16), 4, (1, 1, 1, 1))),
             Case(*_output_case(1, 32, 16, 16, 4, bias=True, activation="relu")),
             Case("Im2Col", [data(1, 4, 16, 32)], IM2COL[0][1]),
             Case("Im2Col", [data(1, 4, 16, 32)], IM2COL[1][1])]
    for case in cases:
        (compiled,) = compile_kernels([case.bound[0].kernel])
        assert re.search(r"<\d+ x float>|llvm\.memcpy", compiled.llvm_ir), case.label


def test_errors_are_graphc_errors():
    with pytest.raises(GraphcError, match="empty spatial axis"):
        Case("MaxPool", [np.zeros((1, 1, 0, 3), np.float32)],
             {"kernel_shape": [1, 1], "pads": [1, 1, 1, 1]})
