"""Tests for hfvolume.volume.numerics: unit-ball constants and the log-space helpers, against mpmath.

Reference values come from mpmath at 50 significant digits; tolerances are a few float64 ulp of the reference.
"""

from __future__ import annotations

import math
import re

import mpmath as mp
import numpy as np
import pytest

from hfvolume.volume import numerics as nm

EPS = float(np.finfo(np.float64).eps)
DPS = 50


# ----------------------------------------------------------------------------------------------------------------
# Ball / sphere constants
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 10, 10**6, 10**9, 10**12])
def test_log_unit_ball_volume_vs_mpmath(d):
    with mp.workdps(DPS):
        ref = float(mp.mpf(d) / 2 * mp.log(mp.pi) - mp.loggamma(mp.mpf(d) / 2 + 1))
        ref_s = float(mp.log(d) + mp.mpf(d) / 2 * mp.log(mp.pi) - mp.loggamma(mp.mpf(d) / 2 + 1))
    # Two terms of size ~|ref| each carry ~1 ulp (math.lgamma is good to a few ulp): a few eps relative.
    tol = 8 * EPS * max(1.0, abs(ref), d * math.log(d + 1))
    assert abs(nm.log_unit_ball_volume(d) - ref) <= tol
    assert abs(nm.log_sphere_area(d) - ref_s) <= tol


def test_unit_ball_known_values():
    assert nm.log_unit_ball_volume(1) == pytest.approx(math.log(2.0), abs=1e-15)
    assert nm.log_unit_ball_volume(2) == pytest.approx(math.log(math.pi), abs=1e-15)
    assert nm.log_unit_ball_volume(3) == pytest.approx(math.log(4 * math.pi / 3), abs=1e-15)
    assert nm.log_sphere_area(3) == pytest.approx(math.log(4 * math.pi), abs=1e-15)
    assert nm.log_unit_ball_volume(np.int64(3)) == nm.log_unit_ball_volume(3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, 1e6, True, "3", None])
def test_dimension_rejects_bad_values(bad):
    for fn in (nm.log_unit_ball_volume, nm.log_sphere_area):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            fn(bad)


# ----------------------------------------------------------------------------------------------------------------
# Log-space helpers
# ----------------------------------------------------------------------------------------------------------------

LOG1MEXP_X = [-1e-300, -1e-200, -1e-20, -1e-10, -1e-3, -0.5, -math.log(2) + 1e-12, -math.log(2),
              -math.log(2) - 1e-12, -1.0, -10.0, -37.0, -40.0, -700.0, -745.0, -1e4, -1e300]


def test_log1mexp_vs_mpmath():
    x = np.array(LOG1MEXP_X)
    got = nm.log1mexp(x)
    for xi, gi in zip(LOG1MEXP_X, got):
        with mp.workdps(DPS):
            ref = float(mp.log(-mp.expm1(mp.mpf(xi))))
        # A few ulp relative; below ~1e-308 in magnitude the float64 answer is 0 or subnormal.
        assert abs(gi - ref) <= 4 * EPS * abs(ref) + 1e-300, (xi, gi, ref)
    assert nm.log1mexp(0.0) == -math.inf
    assert nm.log1mexp(-math.inf) == 0.0
    assert isinstance(nm.log1mexp(-1.0), np.float64)


def test_log1mexp_rejects_positive_and_nan():
    with pytest.raises(ValueError, match=r"\(2,\)"):
        nm.log1mexp(np.array([-1.0, -2.0, 1e-300]))
    with pytest.raises(ValueError, match="NaN at index \\(1,\\)"):
        nm.log1mexp(np.array([-1.0, np.nan]))


@pytest.mark.parametrize(
    "a,b",
    [(0.0, -1.0), (1.0, 1.0 - 1e-15), (1e10, 1e10 - 1e-5), (-1e300, -1.1e300), (5.0, -math.inf), (3.0, 3.0),
     (-700.0, -700.5), (1000.0, -1000.0)],
)
def test_logsubexp_vs_mpmath(a, b):
    got = nm.logsubexp(a, b)
    with mp.workdps(DPS):
        A, B = mp.mpf(a), mp.mpf(b)
        ref = float(A + mp.log(-mp.expm1(B - A))) if a != b else -math.inf
    if ref == -math.inf:
        assert got == -math.inf
    else:
        # a + log1mexp(b − a): the subtraction b − a is exact-ish for close inputs; error ~ ulp(a) + ulp(result).
        assert abs(got - ref) <= 4 * EPS * (abs(ref) + abs(a)), (got, ref)


def test_logsubexp_special_and_errors():
    assert nm.logsubexp(-math.inf, -math.inf) == -math.inf
    assert nm.logsubexp(math.inf, 0.0) == math.inf
    np.testing.assert_array_equal(nm.logsubexp(np.array([1.0, 2.0]), 1.0),
                                  [-math.inf, 2.0 + math.log1p(-math.exp(-1.0))])
    with pytest.raises(ValueError, match=r"a\[\(1,\)\] = .*-1\.0.*b\[\(1,\)\] = .*0\.0"):
        nm.logsubexp(np.array([1.0, -1.0]), np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        nm.logsubexp(np.nan, 0.0)


LOG_ERFC_X = [-1e4, -30.0, -5.0, -1.0, -1e-10, 0.0, 1e-10, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 26.0, 27.0, 30.0,
              100.0, 1e3, 1e4]


def test_log_erfc_vs_mpmath():
    got = nm.log_erfc(np.array(LOG_ERFC_X))
    for xi, gi in zip(LOG_ERFC_X, got):
        with mp.workdps(DPS):
            ref = float(mp.log(mp.erfc(mp.mpf(xi))))
        # log erfcx(x) − x²: erfcx is good to a few ulp relative, which is a few eps absolute after the log,
        # and −x² adds an ulp of the result; hence a few eps absolute or relative, whichever is larger.
        assert abs(gi - ref) <= 8 * EPS * max(1.0, abs(ref)), (xi, gi, ref)
    assert nm.log_erfc(math.inf) == -math.inf
    assert nm.log_erfc(-math.inf) == pytest.approx(math.log(2.0), abs=1e-16)
    assert nm.log_erfc(np.zeros((2, 3))).shape == (2, 3)


def test_log_mean_exp():
    x = np.array([[0.0, 1.0, 2.0], [-math.inf, -math.inf, -math.inf], [-math.inf, 5.0, -math.inf]])
    got = nm.log_mean_exp(x, axis=-1)
    assert got[0] == pytest.approx(math.log((1 + math.e + math.e**2) / 3), abs=1e-15)
    assert got[1] == -math.inf
    assert got[2] == pytest.approx(5.0 - math.log(3.0), abs=1e-15)
    # axis=0 and magnitudes that would overflow exp in linear space.
    big = np.array([[1e6, -1e9], [1e6, -1e9 + math.log(3.0)]])
    np.testing.assert_allclose(nm.log_mean_exp(big, axis=0), [1e6, -1e9 + math.log(2.0)], rtol=0, atol=2e-7)
    assert nm.log_mean_exp([7.0]) == 7.0
    assert nm.log_mean_exp([math.inf, 0.0]) == math.inf
    assert isinstance(nm.log_mean_exp([1.0, 2.0]), np.float64)
    with pytest.raises(ValueError, match=r"NaN at index \(1, 0\)"):
        nm.log_mean_exp(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError):
        nm.log_mean_exp(np.zeros((2, 0)))
