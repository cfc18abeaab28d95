"""Winograd matrices from interpolation points: exact identities and the published tables.

Everything here is exact (``fractions.Fraction``): the 1-D identity
``y = A^T [(G g) . (B^T d)]`` and its 2-D nesting must hold with no rounding at all for integer
filters and inputs, for every point set.
"""

from __future__ import annotations

from fractions import Fraction as F

import numpy as np
import pytest

from graphc.ops.winograd_matrices import (
    CLASSIC_F4_POINTS,
    POINTS,
    float_matrices,
    point_label,
    toom_cook,
)

# Lavin & Gray (arXiv:1509.09308), section 4.1 (F(2x2, 3x3)) and 4.2 (F(4x4, 3x3)).
LAVIN_F2 = {
    "AT": [[1, 1, 1, 0], [0, 1, -1, -1]],
    "G": [[1, 0, 0], [F(1, 2), F(1, 2), F(1, 2)], [F(1, 2), F(-1, 2), F(1, 2)], [0, 0, 1]],
    "BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
}
LAVIN_F4 = {
    "AT": [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    "G": [[F(1, 4), 0, 0], [F(-1, 6), F(-1, 6), F(-1, 6)], [F(-1, 6), F(1, 6), F(-1, 6)],
          [F(1, 24), F(1, 12), F(1, 6)], [F(1, 24), F(-1, 12), F(1, 6)], [0, 0, 1]],
    "BT": [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
           [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
}
# (m, finite points): the sets graphc uses, and other valid ones (the construction is general)
POINT_SETS = [(2, POINTS[2]), (4, POINTS[4]), (4, CLASSIC_F4_POINTS),
              (3, (F(0), F(1), F(-1), F(1, 2))), (2, (F(0), F(2), F(-1, 3))),
              (6, (F(0), F(1), F(-1), F(2), F(-2), F(1, 2), F(-1, 2)))]
SET_IDS = [f"F{m}:{point_label(p)}" for m, p in POINT_SETS]


def matmul(a, b):
    """Exact product of nested lists (no float anywhere)."""
    return [[sum((x * y for x, y in zip(row, col)), F(0)) for col in zip(*b)] for row in a]


def transpose(a):
    return [list(col) for col in zip(*a)]


def as_lists(matrix):
    return [[F(v) for v in row] for row in matrix]


def correlate_1d(g, d, m):
    return [sum((g[k] * d[i + k] for k in range(len(g))), F(0)) for i in range(m)]


def correlate_2d(g, d, m):
    r = len(g)
    return [[sum((g[u][v] * d[i + u][j + v] for u in range(r) for v in range(r)), F(0))
             for j in range(m)] for i in range(m)]


# -- the published tables ------------------------------------------------------------------------
def test_f2_reproduces_lavin_and_gray_exactly():
    t = toom_cook(2)
    for name, table in LAVIN_F2.items():
        assert as_lists(getattr(t, name)) == as_lists(table), name


def point_terms(at, g, bt):
    """Per point, the rank-1 term A^T[:, i] (x) G[i, :] (x) B^T[i, :] of the algorithm; two
    tables with equal terms differ only in how each point's factors are scaled."""
    at, g, bt = (np.array(as_lists(x), dtype=object) for x in (at, g, bt))
    return [np.multiply.outer(np.multiply.outer(at[:, i], g[i]), bt[i]) for i in range(len(g))]


def test_classic_f4_is_lavin_and_gray_up_to_signs_of_its_points():
    """Our sign convention (G's rows start positive, infinity as p -> -inf) matches the F2 table;
    Lavin & Gray's F4 table signs three of its six points the other way."""
    t = toom_cook(4, CLASSIC_F4_POINTS)
    ours = point_terms(t.AT, t.G, t.BT)
    theirs = point_terms(LAVIN_F4["AT"], LAVIN_F4["G"], LAVIN_F4["BT"])
    assert all((a == b).all() for a, b in zip(ours, theirs))
    assert as_lists(t.AT)[:3] == as_lists(LAVIN_F4["AT"])[:3]  # same points, same order
    assert as_lists(t.G) != as_lists(LAVIN_F4["G"])  # but not the same signs


def test_default_points():
    assert toom_cook(2).points == (0, 1, -1)
    # Barabasz, Khan & Gregg's most accurate F(4x4, 3x3) set
    assert toom_cook(4).points == (0, -1, 1, F(1, 2), -2)
    assert point_label(POINTS[4]) == "0, -1, 1, 1/2, -2, inf"


# -- exact identities ------------------------------------------------------------------------
@pytest.mark.parametrize("m,points", POINT_SETS, ids=SET_IDS)
def test_1d_identity_is_exact(m, points):
    t = toom_cook(m, points)
    rng = np.random.default_rng(m)
    for _ in range(20):
        g = [F(int(v)) for v in rng.integers(-9, 10, 3)]
        d = [F(int(v)) for v in rng.integers(-9, 10, t.alpha)]
        gg = matmul(as_lists(t.G), [[v] for v in g])
        bd = matmul(as_lists(t.BT), [[v] for v in d])
        y = matmul(as_lists(t.AT), [[p[0] * q[0]] for p, q in zip(gg, bd)])
        assert [row[0] for row in y] == correlate_1d(g, d, m)


@pytest.mark.parametrize("m,points", POINT_SETS, ids=SET_IDS)
def test_2d_nesting_is_exact(m, points):
    """Y = A^T [(G g G^T) . (B^T d B)] A equals the 2-D correlation of the tile."""
    t = toom_cook(m, points)
    at, g_mat, bt = as_lists(t.AT), as_lists(t.G), as_lists(t.BT)
    rng = np.random.default_rng(10 + m)
    for _ in range(5):
        g = [[F(int(v)) for v in row] for row in rng.integers(-9, 10, (3, 3))]
        d = [[F(int(v)) for v in row] for row in rng.integers(-9, 10, (t.alpha, t.alpha))]
        u = matmul(matmul(g_mat, g), transpose(g_mat))
        v = matmul(matmul(bt, d), transpose(bt))
        product = [[a * b for a, b in zip(ru, rv)] for ru, rv in zip(u, v)]
        y = matmul(matmul(at, product), transpose(at))
        assert y == correlate_2d(g, d, m)


def test_the_identity_catches_a_wrong_matrix():
    """The exact check can fail: one perturbed entry of B^T breaks it."""
    t = toom_cook(2)
    bt = as_lists(t.BT)
    bt[1][2] += 1
    g, d = [F(1), F(2), F(3)], [F(4), F(5), F(6), F(7)]
    gg = matmul(as_lists(t.G), [[v] for v in g])
    bd = matmul(bt, [[v] for v in d])
    y = matmul(as_lists(t.AT), [[p[0] * q[0]] for p, q in zip(gg, bd)])
    assert [row[0] for row in y] != correlate_1d(g, d, 2)


# -- float arrays and errors ---------------------------------------------------------------------
def test_float_matrices_round_once_and_are_read_only():
    at, g, bt = float_matrices(4, None, "float32")
    exact = toom_cook(4)
    assert at.dtype == g.dtype == bt.dtype == np.float32
    assert (at.shape, g.shape, bt.shape) == ((4, 6), (6, 3), (6, 6))
    np.testing.assert_array_equal(g, np.array([[float(v) for v in row] for row in exact.G],
                                              dtype=np.float32))
    with pytest.raises(ValueError):
        g[0, 0] = 2.0
    # floats convert exactly: 0.5 is the point 1/2
    assert float_matrices(4, (0.0, -1.0, 1.0, 0.5, -2.0))[1].tolist() == \
        float_matrices(4)[1].tolist()


@pytest.mark.parametrize("m,points,message", [
    (4, (0, 1, -1), "needs 5 distinct finite points"),
    (2, (0, 1, 1), "distinct"),
    (3, None, "no default interpolation points"),
])
def test_bad_point_sets_are_rejected(m, points, message):
    with pytest.raises(ValueError, match=message):
        toom_cook(m, points)
