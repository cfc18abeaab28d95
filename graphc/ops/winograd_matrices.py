"""Winograd F(m, r) transform matrices from interpolation points (the Toom-Cook construction).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016, arXiv:1509.09308)
compute the correlation ``y = g * d`` of an ``r``-tap filter with an ``a = m + r - 1`` input tile
as ``y = A^T [(G g) . (B^T d)]``, and nest it for 2-D tiles::

    Y = A^T [(G g G^T) . (B^T d B)] A

The matrices come from a Toom-Cook algorithm for the *linear* convolution ``h = f g`` of
polynomials of degree ``m - 1`` and ``r - 1``: evaluate both at ``a`` points, multiply pointwise,
interpolate ``h``. Transposing that algorithm (Winograd's "transposition principle") gives the
correlation: ``A^T`` is the transposed evaluation matrix of ``f`` (its column for point ``p`` is
``[1, p, ..., p^(m-1)]``), ``G`` the evaluation matrix of ``g`` and ``B^T`` the transposed
interpolation matrix. With finite points ``p_0 .. p_(a-2)`` and the point at infinity (which
evaluates a polynomial to its leading coefficient):

* ``h(x) = sum_i h(p_i) N_i(x) / D_i + h_inf M(x)``, with ``N_i(x) = prod_(j != i) (x - p_j)``,
  ``D_i = prod_(j != i) (p_i - p_j)`` and ``M(x) = prod_j (x - p_j)``;
* row ``i`` of ``B^T`` holds the coefficients of ``N_i`` (row ``inf`` those of ``M``), and the
  ``1 / D_i`` factors go into ``G``, as Lavin & Gray place them: ``B^T`` and ``A^T`` stay integer
  for integer points and ``G`` (transformed once, at compile time) carries the fractions.

Each point's triple (row of ``G``, row of ``B^T``, column of ``A^T``) may be scaled by factors
whose product is 1 without changing the algorithm. Sign convention, which reproduces Lavin &
Gray's F(2x2, 3x3) table exactly: every row of ``G`` is positive at its first nonzero entry (the
sign of ``D_i`` moves into ``B^T``), and the point at infinity is the limit ``p -> -inf`` of a
finite point (its ``A^T`` column is ``(-1)^(m-1) e_(m-1)``, its ``B^T`` row ``(-1)^(a-1) M``).

Points (``POINTS``): F(2x2, 3x3) uses 0, 1, -1, inf (Lavin & Gray). F(4x4, 3x3) defaults to
0, -1, 1, 1/2, -2, inf, the set Barabasz, Khan & Gregg found most accurate ("Error analysis and
improving the accuracy of Winograd convolution for deep neural networks", ACM TOMS 2020,
arXiv:1803.10986); ``CLASSIC_F4_POINTS`` (0, +-1, +-2, inf, Lavin & Gray's) is kept to compare.

Everything is exact (``fractions.Fraction``); ``float_matrices`` rounds once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import cache

import numpy as np

R = 3  # filter taps: graphc's Winograd handles 3x3 kernels

# Finite interpolation points per output tile size m; the point at infinity is always added.
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(-1), Fraction(1), Fraction(1, 2), Fraction(-2)),
}
CLASSIC_F4_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2))

Matrix = tuple[tuple[Fraction, ...], ...]


@dataclass(frozen=True)
class WinogradMatrices:
    """Exact ``A^T`` (m x a), ``G`` (a x r) and ``B^T`` (a x a) of F(m, r)."""

    m: int
    r: int
    points: tuple[Fraction, ...]  # the finite points, in row order (infinity is the last row)
    AT: Matrix
    G: Matrix
    BT: Matrix

    @property
    def alpha(self) -> int:
        """Input tile size ``a = m + r - 1``."""
        return self.m + self.r - 1


def default_points(m: int) -> tuple[Fraction, ...]:
    try:
        return POINTS[m]
    except KeyError:
        raise ValueError(f"no default interpolation points for F({m}, {R}); "
                         f"known tile sizes: {sorted(POINTS)}") from None


def as_points(points) -> tuple[Fraction, ...]:
    """Exact points from numbers; floats convert exactly (0.5 -> 1/2)."""
    return tuple(Fraction(p) for p in points)


def _poly_from_roots(roots) -> list[Fraction]:
    """Coefficients (lowest degree first) of ``prod (x - root)``."""
    coeffs = [Fraction(1)]
    for root in roots:
        shifted = [Fraction(0)] + coeffs         # x * poly
        scaled = [-root * c for c in coeffs] + [Fraction(0)]
        coeffs = [s + t for s, t in zip(shifted, scaled)]
    return coeffs


def _prod(values) -> Fraction:
    out = Fraction(1)
    for v in values:
        out *= v
    return out


def _sign(x: Fraction) -> int:
    return 1 if x > 0 else -1


@cache
def toom_cook(m: int, points: tuple[Fraction, ...] | None = None, r: int = R
              ) -> WinogradMatrices:
    """The matrices of F(m, r) for the given finite points (default ``POINTS[m]``) and infinity.

    Needs ``m + r - 2`` distinct finite points.
    """
    points = default_points(m) if points is None else as_points(points)
    a = m + r - 1
    if len(points) != a - 1 or len(set(points)) != len(points):
        raise ValueError(f"F({m}, {r}) needs {a - 1} distinct finite points, got "
                         f"{[str(p) for p in points]}")
    at_cols, g_rows, bt_rows = [], [], []
    for i, p in enumerate(points):
        others = points[:i] + points[i + 1:]
        denominator = _prod(p - q for q in others)
        s = _sign(denominator)  # goes into B^T so that G's row starts positive
        at_cols.append([p ** k for k in range(m)])
        g_rows.append([p ** k / (s * denominator) for k in range(r)])
        bt_rows.append([s * c for c in _poly_from_roots(others)] + [Fraction(0)])
    # infinity as the limit p -> -inf: evaluations scale by (-1)^degree
    at_cols.append([Fraction(0)] * (m - 1) + [Fraction((-1) ** (m - 1))])
    g_rows.append([Fraction(0)] * (r - 1) + [Fraction((-1) ** (r - 1))])
    bt_rows.append([(-1) ** (a - 1) * c for c in _poly_from_roots(points)])
    at = tuple(tuple(col[k] for col in at_cols) for k in range(m))
    return WinogradMatrices(m, r, points, at, _freeze(g_rows), _freeze(bt_rows))


def _freeze(rows) -> Matrix:
    return tuple(tuple(row) for row in rows)


@cache
def float_matrices(m: int, points: tuple[float, ...] | None = None,
                   dtype: str = "float64") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T, G, B^T) as read-only arrays of ``dtype`` (each entry rounded once)."""
    exact = toom_cook(m, None if points is None else as_points(points))
    out = []
    for matrix in (exact.AT, exact.G, exact.BT):
        array = np.array([[float(v) for v in row] for row in matrix]).astype(dtype)
        array.flags.writeable = False  # cached and shared: nobody may modify it
        out.append(array)
    return tuple(out)


def point_label(points) -> str:
    """``0, -1, 1, 1/2, -2, inf`` for docs and reports."""
    return ", ".join([str(p) for p in as_points(points)] + ["inf"])
