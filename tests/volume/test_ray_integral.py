"""Tests for hfvolume.volume.ray_integral: the Gaussian prior's 1-D ray integral against mpmath oracles.

Reference values come from mpmath at 50 significant digits: closed forms (regularised incomplete gamma for b = 0,
parabolic cylinder function for x1 = ∞) and adaptive quadrature of the log-shifted integrand otherwise.

Error model used for every ray-integral comparison (see ``_ray_tol``): the function promises the spec accuracy
(1e-6 nats absolute for n ≥ 999, 1e-9 relative ≡ 1e-9 nats for smaller n) on top of two float64 facts no
implementation can avoid: the result is a float64, so it can be off by up to an ulp of |log I| (≈ 2e-6 when
|log I| ≈ 1e10), and the anchor g(t_m) = n log t_m − a t_m²/2 + b t_m is a sum of terms of size S, rounded at the
working precision of its evaluation (extended precision where numpy has it).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfvolume.volume import ray_integral as nm

EPS = float(np.finfo(np.float64).eps)
EPS_LD = float(np.finfo(np.longdouble).eps)
DPS = 50

NS = [0, 1, 2, 10, 100, 999, 1e3, 1e4, 1e6, 1e8, 1e9 - 1]
RATIOS = [1e-8, 1e-4, 0.1, 0.5, 0.99, 1.0, 1.01, 2.0, 10.0, math.inf]
# b in units of sqrt(a·max(n, 1)); ±1e3 is the |b| ≫ sqrt(a n) regime (peak set by b, not by n).
BETAS = [-1e3, -30.0, -1.0, -0.1, 0.1, 1.0, 30.0, 1e3]

HYP = settings(max_examples=60, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------
# mpmath references
# ----------------------------------------------------------------------------------------------------------------


def mp_peak(n, a, b):
    if n == 0 and b <= 0:
        return mp.mpf(0)
    disc = mp.sqrt(b * b + 4 * a * n)
    return (b + disc) / (2 * a) if b >= 0 else 2 * n / (disc - b)


def mp_log_I_quad(n: float, a: float, b: float, x1: float, drop: int = 200) -> float:
    """log ∫_0^{x1} t^n e^{−a t²/2 + b t} dt by mpmath quadrature of exp(g − g(t_m)) at 50 digits.

    The interval is split at t_m = min(t*, x1) and at t_m ∓ w·2^k (w = local width: 1/sqrt(−g''(t_m)), or
    1/|g'(t_m)| when smaller) until g has dropped by `drop` nats, so every sub-interval holds a smooth piece of the
    integrand. Gauss–Legendre is used for integer n (entire integrand), tanh–sinh otherwise (branch point at 0).
    """
    with mp.workdps(DPS):
        n_, a_, b_ = mp.mpf(n), mp.mpf(a), mp.mpf(b)
        X = mp.inf if x1 == math.inf else mp.mpf(x1)
        tm = min(mp_peak(n_, a_, b_), X)

        def g(t):
            if t == 0:
                return mp.mpf(0) if n_ == 0 else -mp.inf
            return n_ * mp.log(t) - a_ * t * t / 2 + b_ * t

        gm = g(tm)
        kappa = a_ + (n_ / tm**2 if tm > 0 else 0)
        slope = (n_ / tm - a_ * tm + b_) if tm > 0 else b_
        w = 1 / mp.sqrt(kappa)
        if slope != 0:
            w = min(w, 1 / abs(slope))
        pts = [tm]
        k = mp.mpf(1)
        while tm > 0:
            p = tm - w * k
            if p <= 0:
                pts.insert(0, mp.mpf(0))
                break
            pts.insert(0, p)
            if g(p) - gm < -drop:
                break
            k *= 2
        k = mp.mpf(1)
        while tm < X:
            p = tm + w * k
            if p >= X:
                pts.append(X)
                break
            pts.append(p)
            if g(p) - gm < -drop:
                break
            k *= 2
        method = "gauss-legendre" if float(n).is_integer() else "tanh-sinh"
        total = mp.quad(lambda t: mp.exp(g(t) - gm), pts, method=method)
        return gm + mp.log(total)


def mp_log_I_b0(n: float, a: float, x1: float):
    """b = 0: I = ½ (2/a)^{s} Γ(s) P(s, a x1²/2), s = (n+1)/2 (P = regularised lower incomplete gamma)."""
    with mp.workdps(DPS):
        s = (mp.mpf(n) + 1) / 2
        a_ = mp.mpf(a)
        pre = -mp.log(2) + s * mp.log(2 / a_) + mp.loggamma(s)
        if x1 == math.inf:
            return pre
        x = a_ * mp.mpf(x1) ** 2 / 2
        # mpmath's lower-gamma series stalls near x ≈ s for huge s; the upper function is fast there.
        if x < s * mp.mpf("0.999"):
            return pre + mp.log(mp.gammainc(s, 0, x, regularized=True))
        # Chernoff bound for the Gamma(s) upper tail, Q(s, x) ≤ exp(s − x + s log(x/s)) for x > s: when it is
        # below e^{-80}, log P = log1p(−Q) is 0 to far beyond float64 (mpmath's series also stall there).
        if x > s and s - x + s * mp.log(x / s) < -80:
            return pre
        # Transition region |x − s| ≲ 13 sqrt(s): P = x^s e^{−x} / Γ(s+1) · 1F1(1; s+1; x), a positive series whose
        # terms x^k/((s+1)…(s+k)) fall off after k ~ (x − s) + O(sqrt(s)); mpmath just needs enough terms.
        return pre + s * mp.log(x) - x - mp.loggamma(s + 1) + mp.log(mp.hyp1f1(1, s + 1, x, maxterms=10**7))


def mp_log_I_inf(n: float, a: float, b: float):
    """x1 = ∞: Γ(n+1) a^{−(n+1)/2} e^{b²/(4a)} D_{−(n+1)}(−b/√a) (parabolic cylinder function)."""
    with mp.workdps(DPS):
        n_, a_, b_ = mp.mpf(n), mp.mpf(a), mp.mpf(b)
        return (mp.loggamma(n_ + 1) - (n_ + 1) / 2 * mp.log(a_) + b_ * b_ / (4 * a_)
                + mp.log(mp.pcfd(-(n_ + 1), -b_ / mp.sqrt(a_))))


def _params(n: float, a: float, beta: float, ratio: float) -> tuple[float, float, float]:
    """(a, b, x1) with b = beta·sqrt(a·max(n,1)) and x1 = ratio × the natural scale (t*, or the width if t* = 0)."""
    b = beta * math.sqrt(a * max(n, 1.0))
    ts = float(nm.ray_peak(n, a, b))
    t_ref = ts if ts > 0 else min(1 / math.sqrt(a), 1 / abs(b) if b else math.inf)
    return a, b, t_ref * ratio


def _scale_terms(n: float, a: float, b: float, x1: float) -> float:
    """S = |n log t_m| + a t_m²/2 + |b t_m|: the size of the terms summed in the anchor g(t_m)."""
    tm = min(float(nm.ray_peak(n, a, b)), x1)
    if tm == 0:
        return 0.0
    return abs(n * math.log(tm)) + a * tm * tm / 2 + abs(b * tm)


def _ray_tol(n: float, ref: float, S: float) -> float:
    spec = 1e-6 if n >= 999 else 1e-9
    return spec + 2 * float(np.spacing(abs(ref))) + 8 * EPS_LD * S


# ----------------------------------------------------------------------------------------------------------------
# Ray integral vs mpmath
# ----------------------------------------------------------------------------------------------------------------


def test_pcfd_formula_matches_quadrature():
    """The x1 = ∞ closed form used as an oracle below, checked against plain mpmath.quad at small n."""
    for n in [0, 1, 2, 5]:
        for a, b in [(1.0, 0.0), (2.0, 1.5), (0.5, -2.0)]:
            with mp.workdps(30):
                q = mp.quad(lambda t: t**n * mp.exp(-a * t * t / 2 + b * t), [0, 1, 5, mp.inf])
                assert abs(mp.log(q) - mp_log_I_inf(n, a, b)) < mp.mpf(10) ** -25


@pytest.mark.parametrize("n", NS)
def test_ray_integral_b0_incomplete_gamma(n):
    """Oracle (i): b = 0 against ½ (2/a)^{(n+1)/2} Γ((n+1)/2) P((n+1)/2, a x1²/2), every x1/t* ratio."""
    for a in (1.0, max(float(n), 1.0)):
        xs = [_params(n, a, 0.0, r)[2] for r in RATIOS]
        got = nm.log_ray_integral(n, a, 0.0, np.array(xs))
        for x1, v in zip(xs, got):
            ref = float(mp_log_I_b0(n, a, x1))
            assert abs(v - ref) <= _ray_tol(n, ref, _scale_terms(n, a, 0.0, x1)), (n, a, x1, v, ref)


@pytest.mark.parametrize("n", [0, 1, 2, 10, 100])
@pytest.mark.parametrize("beta", [-20.0, -3.0, -0.1, 0.0, 0.1, 3.0, 20.0])
def test_ray_integral_infinite_parabolic_cylinder(n, beta):
    """Oracle (ii): x1 = ∞ against the parabolic-cylinder closed form (mpmath.pcfd is only usable at small n)."""
    a = 2.0
    b = beta * math.sqrt(a * max(n, 1))
    v = float(nm.log_ray_integral(n, a, b, math.inf))
    ref = float(mp_log_I_inf(n, a, b))
    assert abs(v - ref) <= _ray_tol(n, ref, _scale_terms(n, a, b, math.inf)), (v, ref)


def _general_grid():
    # Every (n, x1/t*) pair, with two b values per pair cycled through BETAS so that every (n, b) and (b, x1/t*)
    # combination also appears; a alternates between t* ~ sqrt(n) (a = 1) and t* ~ 1 (a = n).
    cases = []
    for i, n in enumerate(NS):
        for j, r in enumerate(RATIOS):
            for k in range(2):
                beta = BETAS[(i + 3 * j + 4 * k) % len(BETAS)]
                a = 1.0 if (i + j + k) % 2 else max(float(n), 1.0)
                cases.append((n, a, beta, r))
    return cases


@pytest.fixture(scope="module")
def general_results():
    cases = _general_grid()
    rows = []
    for n, a, beta, r in cases:
        a, b, x1 = _params(n, a, beta, r)
        rows.append((n, a, b, x1, float(mp_log_I_quad(n, a, b, x1))))
    arr = np.array([row[:4] for row in rows])
    got = nm.log_ray_integral(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])  # one vectorised call
    return rows, got


def test_ray_integral_general_vs_quadrature(general_results):
    """Oracle (iii) / §5 oracle 6: general b, both regimes, n from 0 to 1e9 − 1, x1 from 1e-8 t* to ∞."""
    rows, got = general_results
    failures = []
    for (n, a, b, x1, ref), v in zip(rows, got):
        if not abs(v - ref) <= _ray_tol(n, ref, _scale_terms(n, a, b, x1)):
            failures.append((n, a, b, x1, v, ref, v - ref))
    assert not failures, failures[:5]


def test_ray_integral_vectorised_equals_scalar(general_results):
    rows, got = general_results
    for (n, a, b, x1, _), v in list(zip(rows, got))[::17]:
        assert float(nm.log_ray_integral(n, a, b, x1)) == v


@pytest.mark.parametrize(
    "n,a,b,x1",
    [(0.5, 1.0, 0.0, 1.0), (0.5, 1.0, -1e6, math.inf), (2.5, 1.0, 3.0, math.inf), (1e-3, 1.0, -5.0, math.inf),
     (3.7, 2.0, 1.0, 1e-8)],
)
def test_ray_integral_non_integer_small_n(n, a, b, x1):
    """n need not be an integer: the t^n branch point at 0 must not break the quadrature."""
    v = float(nm.log_ray_integral(n, a, b, x1))
    ref = float(mp_log_I_quad(n, a, b, x1))
    assert abs(v - ref) <= _ray_tol(n, ref, _scale_terms(n, a, b, x1)), (v, ref)


def test_ray_integral_extreme_closed_forms():
    """Cases with t* = 0 or far from the mass, against exact erfc forms for n = 0."""
    # n = 0, b < 0: I(∞) = sqrt(π/(2a)) e^{b²/(2a)} erfc(−b/sqrt(2a)).
    for a, b in [(1e-12, -1e10), (1e12, -1e-6), (1.0, -1e6), (1e12, 1e18), (1e-12, 1e-3)]:
        with mp.workdps(DPS):
            A, B = mp.mpf(a), mp.mpf(b)
            ref = float(mp.log(mp.sqrt(mp.pi / (2 * A))) + B * B / (2 * A) + mp.log(mp.erfc(-B / mp.sqrt(2 * A))))
        v = float(nm.log_ray_integral(0, a, b, math.inf))
        assert abs(v - ref) <= _ray_tol(0, ref, _scale_terms(0, a, b, math.inf)), (a, b, v, ref)


@pytest.mark.parametrize(
    "n,a,b,x1",
    [(1e9 - 1, 1.0, 0.0, 1e-300), (1e9 - 1, 1e12, -1e3 * math.sqrt(1e21), 3.162274494734772e-13),
     (1e9 - 1, 1e-12, 1e3 * math.sqrt(1e-3), math.inf), (0, 1e12, -1e-6, 1e-20), (0, 1e-12, 1e-3, 1e300),
     (1e-300, 1.0, 0.0, 2.0), (2.0, 1.0, -1e6, math.inf), (1e4, 1e-12, -1e3 * math.sqrt(1e-8), 1e9)],
)
def test_ray_integral_extreme_magnitudes_vs_quadrature(n, a, b, x1):
    """Far corners: x1 ≪ t* by 300 orders, |b| ≫ sqrt(a n), a at 1e±12, n ~ 0, x1 ≫ t*."""
    v = float(nm.log_ray_integral(n, a, b, x1))
    ref = float(mp_log_I_quad(n, a, b, x1))
    assert abs(v - ref) <= _ray_tol(n, ref, _scale_terms(n, a, b, x1)), (v, ref)


def test_ray_peak():
    # b ≪ 0: the rationalised form keeps full relative precision (b + sqrt(b² + 4an) would cancel to 0).
    for n, a, b in [(10.0, 1.0, -1e10), (1e9, 1e-12, -1e6), (3.0, 2.0, 0.5), (1e9 - 1, 1e12, 1e3)]:
        with mp.workdps(DPS):
            ref = float(mp_peak(mp.mpf(n), mp.mpf(a), mp.mpf(b)))
        assert float(nm.ray_peak(n, a, b)) == pytest.approx(ref, rel=4 * EPS)
    np.testing.assert_array_equal(nm.ray_peak(0, [1.0, 2.0], [-1.0, 0.0]), [0.0, 0.0])
    assert float(nm.ray_peak(0, 2.0, 3.0)) == 1.5


# ----------------------------------------------------------------------------------------------------------------
# Property tests at extreme magnitudes
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def ray_params(draw):
    if draw(st.booleans()):
        n = float(draw(st.sampled_from([0, 1, 2, 10, 999])))
    else:
        n = float(math.floor(10 ** draw(st.floats(0.0, 9.0))))
    a = 10 ** draw(st.floats(-12.0, 12.0))
    sign = draw(st.sampled_from([-1.0, 0.0, 1.0]))
    beta = sign * 10 ** draw(st.floats(-3.0, 3.0))
    b = beta * math.sqrt(a * max(n, 1.0))
    ts = float(nm.ray_peak(n, a, b))
    t_ref = ts if ts > 0 else min(1 / math.sqrt(a), 1 / abs(b) if b else math.inf)
    return n, a, b, t_ref


@HYP
@given(ray_params(), st.lists(st.floats(-8.0, 2.0), min_size=1, max_size=6))
def test_property_finite_monotone_and_bounded_by_infinity(p, log_ratios):
    n, a, b, t_ref = p
    x1 = np.array(sorted(t_ref * 10.0 ** np.array(log_ratios)) + [math.inf])
    v = nm.log_ray_integral(n, a, b, x1)
    assert np.all(np.isfinite(v))
    # I is non-decreasing in x1 exactly; numerically each value may be off by the error model (spec 1e-9 is
    # used as the slack: a violation larger than that would be a real defect, not rounding).
    slack = np.array([_ray_tol(0, float(vi), _scale_terms(n, a, b, xi)) for vi, xi in zip(v, x1)])
    assert np.all(np.diff(v) >= -(slack[1:] + slack[:-1])), (v, np.diff(v))
    assert np.all(v[:-1] <= v[-1] + slack[:-1] + slack[-1])


@HYP
@given(ray_params(), st.floats(-8.0, 2.0), st.booleans(), st.floats(-3.0, 3.0))
def test_property_scaling_identity(p, log_ratio, infinite, log_c):
    """t = c s:  I(n, a, b, x1) = c^{n+1} I(n, a c², b c, x1/c).

    Bound: 1e-6 (spec) + 2 ulp of the values + 16 eps·S', S' = S + (n+1)(1 + |log c|) + 1. The identity is exact
    only for exact inputs, but a c², b c and x1/c are each rounded (relative eps/2), and log I's sensitivities to
    log a, log b, log x1 are a E[t²]/2, |b| E[t] and x1 g'(x1)·(…) ≤ n + |b| x1, all O(S + n + 1); (n+1) log c adds
    its own rounding. These are input perturbations no implementation can undo, so they belong in the bound.
    """
    n, a, b, t_ref = p
    x1 = math.inf if infinite else t_ref * 10.0**log_ratio
    c = 10.0**log_c
    lhs = float(nm.log_ray_integral(n, a, b, x1))
    rhs = (n + 1) * math.log(c) + float(nm.log_ray_integral(n, a * c * c, b * c, x1 / c))
    S = _scale_terms(n, a, b, x1) + (n + 1) * (1 + abs(math.log(c))) + 1
    tol = 1e-6 + 2 * float(np.spacing(abs(lhs))) + 16 * EPS * S
    assert abs(lhs - rhs) <= tol, (lhs, rhs, lhs - rhs, tol)


@HYP
@given(ray_params())
def test_property_saturation_radius(p):
    n, a, b, _ = p
    t_sat = float(nm.saturation_radius(n, a, b))
    t_star = float(nm.ray_peak(n, a, b))
    assert t_sat > t_star
    log_inf = float(nm.log_ray_integral(n, a, b, math.inf))
    # Rigorous concavity certificate at t_sat, and t_sat is not needlessly far out: halfway back from t* the
    # certificate no longer holds (the bound is decreasing past t*, and t_sat is located to ~1e-6 relative).
    bound = float(nm.log_ray_tail_bound(n, a, b, t_sat))
    assert bound <= log_inf - 40.0 + 1e-9 + 2 * float(np.spacing(abs(log_inf)))
    half = t_star + 0.5 * (t_sat - t_star)
    if half > t_star:
        assert float(nm.log_ray_tail_bound(n, a, b, half)) > log_inf - 40.0
    # Integrating only to t_sat loses < e^{-40} of the mass: equal in log space up to e^{-40} plus numerics. Both
    # share the anchor g(t*); their log-sums use different windows, each verified to RAY_CHECK_RTOL by the
    # two-resolution check, and each result is rounded to float64.
    log_sat = float(nm.log_ray_integral(n, a, b, t_sat))
    slack = 2 * nm.RAY_CHECK_RTOL + 2 * float(np.spacing(abs(log_inf)))
    assert log_sat <= log_inf + slack
    assert log_inf - log_sat <= math.exp(-40.0) + slack


def test_saturation_radius_vectorised_and_tail_bound_vs_mpmath():
    n = np.array([0.0, 0.0, 3.0, 1e6])
    a = np.array([1.0, 1.0, 2.0, 1e6])
    b = np.array([-5.0, 2.0, 0.0, 0.0])
    t_sat = nm.saturation_radius(n, a, b, log_tol=-30.0)
    assert t_sat.shape == (4,)
    for i in range(4):
        with mp.workdps(DPS):
            N, A, B, T = (mp.mpf(float(v)) for v in (n[i], a[i], b[i], t_sat[i]))
            def g(t):
                return N * mp.log(t) - A * t * t / 2 + B * t

            tail = mp.quad(lambda t: mp.exp(g(t) - g(T)), [T, T + 1 / mp.sqrt(A), mp.inf])
            log_tail = float(g(T) + mp.log(tail))
        total = float(nm.log_ray_integral(n[i], a[i], b[i], math.inf))
        assert log_tail <= total - 30.0
        assert float(nm.log_ray_tail_bound(n[i], a[i], b[i], t_sat[i])) >= log_tail  # it is an upper bound


# ----------------------------------------------------------------------------------------------------------------
# Errors and shapes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,what",
    [(dict(a=[1.0, 0.0, 1.0]), "index \\(1,\\).*a must be"), (dict(a=[1.0, 1.0, -2.0]), "index \\(2,\\)"),
     (dict(x1=[1.0, 0.0, 1.0]), "index \\(1,\\).*x1"), (dict(n=[0.0, -1.0, 1.0]), "index \\(1,\\).*n must"),
     (dict(b=[0.0, np.nan, 0.0]), "index \\(1,\\).*b is NaN"), (dict(x1=[np.nan, 1.0, 1.0]), "index \\(0,\\)"),
     (dict(n=[np.inf, 1.0, 1.0]), "index \\(0,\\)"), (dict(b=[0.0, 0.0, np.inf]), "index \\(2,\\)")],
)
def test_ray_integral_rejects_bad_inputs(kw, what):
    args = dict(n=[1.0, 1.0, 1.0], a=[1.0, 1.0, 1.0], b=[0.0, 0.0, 0.0], x1=[1.0, 1.0, 1.0])
    args.update(kw)
    with pytest.raises(ValueError, match=what):
        nm.log_ray_integral(**args)


def test_ray_integral_shapes():
    v = nm.log_ray_integral(np.array([[1.0], [10.0], [100.0]]), 1.0, 0.0, np.array([0.5, 1.0, 2.0, math.inf]))
    assert v.shape == (3, 4) and v.dtype == np.float64
    assert nm.log_ray_integral(1, 1, 0, 1).shape == ()
    assert nm.saturation_radius(1, 1, 0).shape == ()
    with pytest.raises(ValueError, match=r"index \(1, 2\)"):
        nm.log_ray_integral(1.0, np.array([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0]]), 0.0, 1.0)


def test_tail_bound_and_saturation_errors():
    with pytest.raises(ValueError, match="t > t\\*"):
        nm.log_ray_tail_bound(4.0, 1.0, 0.0, 1.0)  # t* = 2
    with pytest.raises(ValueError, match="index \\(1,\\)"):
        nm.log_ray_tail_bound(4.0, 1.0, 0.0, [3.0, 2.0])
    with pytest.raises(ValueError, match="log_tol"):
        nm.saturation_radius(1.0, 1.0, 0.0, log_tol=0.0)
    with pytest.raises(ValueError, match="a must be"):
        nm.saturation_radius(1.0, -1.0, 0.0)


def test_ray_integral_error_raised_when_check_fails(monkeypatch):
    assert issubclass(nm.RayIntegralError, ArithmeticError)
    # A 1-node midpoint rule with at most 2 panels cannot resolve a bell-shaped integrand to 1e-10 and must
    # refuse; element (0, 0) has an integrand that is constant to 1e-16 on [0, 1e-8], so it passes and the error
    # must name the element that failed.
    monkeypatch.setattr(nm, "RAY_GL_NODES", 1)
    monkeypatch.setattr(nm, "RAY_BASE_PANELS", 1)
    monkeypatch.setattr(nm, "RAY_MAX_PANELS", 2)
    with pytest.raises(nm.RayIntegralError, match=r"index \(0, 1\) \(n=10\.0, a=1\.0, b=0\.5, x1=inf\)"):
        nm.log_ray_integral(np.array([[0.0, 10.0]]), 1.0, np.array([[0.0, 0.5]]), np.array([[1e-8, math.inf]]))


def test_ray_integral_refinement_recovers(monkeypatch):
    # Starting coarse (2-node panels) must refine until the check passes and then agree with the default.
    ref = nm.log_ray_integral(np.array([0.0, 10.0, 1e6]), 1.0, 0.5, np.array([math.inf, 3.0, 500.0]))
    monkeypatch.setattr(nm, "RAY_GL_NODES", 4)
    monkeypatch.setattr(nm, "RAY_BASE_PANELS", 1)
    got = nm.log_ray_integral(np.array([0.0, 10.0, 1e6]), 1.0, 0.5, np.array([math.inf, 3.0, 500.0]))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
