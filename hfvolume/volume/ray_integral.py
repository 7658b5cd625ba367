"""The 1-D ray integral of the Gaussian-prior local volume, in log space, with a self-checked quadrature.

Along a unit direction w from the anchor θ0, a Gaussian prior N(m, diag(s²)) times the polar Jacobian t^{D−1} is
e^c · t^{D−1} exp(−a t²/2 + b t) (see :mod:`hfvolume.volume.priors` for a, b, c), so the prior mass of the ray's
segment [0, ρ) needs

    I(n, a, b, x1) = ∫_0^{x1} t^n exp(−a t²/2 + b t) dt,    n = D − 1 ≥ 0,  a > 0,  b real,  0 < x1 ≤ ∞

(Scherlis & Belrose 2025, arXiv 2501.18812: the Gaussian prior's radial integral). Its log-integrand
g(t) = n log t − a t²/2 + b t is concave with maximum at t* = (b + √(b² + 4an)) / (2a). Two regimes:

* endpoint (x1 ≤ t*): g still rises at x1, so the mass sits in a sliver just under x1 whose width is
  ≈ 1/g'(x1) when that is smaller than the local Gaussian width 1/√(a + n/x1²);
* saturated (x1 > t*): the peak is inside the interval; once x1 is a few widths past t* the integral no longer
  depends on x1 (``saturation_radius`` gives a rigorous point where the remaining tail is < e^{log_tol}).

Both regimes are handled by one scheme: expand around t_m = min(t*, x1), integrate exp(g(t) − g(t_m)) with
composite Gauss–Legendre over a window that concavity bounds prove holds all but e^{−45} of the mass, and
add back g(t_m), evaluated in extended precision where the platform has it. Every value is checked by
recomputing at twice the resolution; a value that fails the check is refined and, failing that, raises
``RayIntegralError``. No large-D approximation is used, so the same code is exact to quadrature accuracy for
n = 0 and for n = 1e9. Results are in nats, float64; no global RNG state is touched.
"""
from __future__ import annotations

import functools

import numpy as np

from hfvolume.volume.checks import check_number
from hfvolume.volume.numerics import ArrayLike, first_index

# Resolution of the ray-integral quadrature. Module-level (and read at call time) so tests can starve the
# quadrature and check that the self-check refuses to return an unverified value.
RAY_GL_NODES: int = 20  # Gauss–Legendre nodes per panel
RAY_BASE_PANELS: int = 4  # panels per side at the coarsest level; the check compares it with 2x
RAY_MAX_PANELS: int = 1024  # refinement stops here; still failing -> RayIntegralError
RAY_CHECK_RTOL: float = 1e-10  # two resolutions must agree to this relative error (= nats in log space)
# Depth (nats below the integrand's maximum) at which the quadrature window is cut. By the concavity bound in
# _RayPlan, the discarded mass is < e^{-45}/(1 - e^{-45}) ~ 3e-20 of the kept mass on each side.
RAY_WINDOW_DROP: float = 45.0

_LD = np.longdouble  # 80-bit extended on x86-64 Linux; plain float64 elsewhere (error model still holds)
_CHUNK = 4096  # bounds the (elements x nodes) work arrays
# For n > 0 both sides are integrated in w = log(t/t_m) (removes the branch point of t^n at 0 for non-integer
# n); windows longer than this in w fall back to the linear variable (keeps e^{±w} far from over/underflow).
_MAX_LOG_WINDOW = 600.0


class RayIntegralError(ArithmeticError):
    """The ray integral failed its own accuracy check (two quadrature resolutions disagree)."""



def _validate(names: tuple[str, ...], values: tuple[ArrayLike, ...]) -> tuple[list[np.ndarray], tuple[int, ...]]:
    """Broadcast to float64 and reject invalid entries, naming the first bad index and all its values."""
    arrs = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in values))
    shape = arrs[0].shape
    d = dict(zip(names, arrs))
    problems: list[tuple[np.ndarray, str]] = []
    for k, v in d.items():
        problems.append((np.isnan(v), f"{k} is NaN"))
    if "n" in d:
        problems.append((~(d["n"] >= 0) | ~np.isfinite(d["n"]), "n must be finite and >= 0"))
    if "a" in d:
        problems.append((~(d["a"] > 0) | ~np.isfinite(d["a"]), "a must be finite and > 0"))
    if "b" in d:
        problems.append((~np.isfinite(d["b"]), "b must be finite"))
    if "x1" in d:
        problems.append((~(d["x1"] > 0), "x1 must be > 0 (may be +inf)"))
    if "t" in d:
        problems.append((~(d["t"] > 0) | ~np.isfinite(d["t"]), "t must be finite and > 0"))
    bad_any = np.zeros(shape, dtype=bool)
    for m, _ in problems:
        bad_any |= m
    if bad_any.any():
        i = first_index(bad_any)
        why = next(msg for m, msg in problems if m[i])
        vals = ", ".join(f"{k}={float(v[i])!r}" for k, v in d.items())
        raise ValueError(f"invalid ray-integral input at index {i}: {why} ({vals})")
    return [v.reshape(-1).copy() for v in arrs], shape


def _peak(n: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # hypot avoids overflow of b² + 4an; the b < 0 branch is the rationalised form (no cancellation of
    # b + sqrt(b² + 4an) when b is large and negative).
    disc = np.hypot(b, 2.0 * np.sqrt(a) * np.sqrt(n))
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = 0.5 * ((b + disc) / a)
        neg = 2.0 * n / (disc - b)
    t = np.where(b >= 0, pos, neg)
    return np.where((n == 0) & (b <= 0), 0.0, t)


def ray_peak(n: ArrayLike, a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Maximiser t* of g(t) = n log t − a t²/2 + b t on t ≥ 0 (same units as t), broadcast shape, float64.

    t* = (b + √(b² + 4an)) / (2a) for b ≥ 0 and the equivalent 2n / (√(b² + 4an) − b) for b < 0;
    t* = 0 when n = 0 and b ≤ 0. Raises ValueError for a ≤ 0, n < 0 or NaN, naming the first bad index.
    """
    (n_, a_, b_), shape = _validate(("n", "a", "b"), (n, a, b))
    return _peak(n_, a_, b_).reshape(shape)


def _g_ld(n: np.ndarray, a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """g(t) = n log t − a t²/2 + b t in extended precision (the inputs are exact in it).

    The terms reach 1e10 while the answer must be good to 1e-6 nats; evaluating them in 80-bit arithmetic
    keeps the rounding (~1e-19 relative) far below that, so only the final rounding to float64 remains.
    """
    nl, al, bl, tl = (v.astype(_LD) for v in (n, a, b, t))
    with np.errstate(divide="ignore", invalid="ignore"):
        nlogt = np.where(nl == 0, _LD(0), nl * np.log(tl))
    return nlogt - al * tl * tl / _LD(2) + bl * tl


def _psi_root(c: np.ndarray, side: int) -> np.ndarray:
    """Solve w − expm1(w) = −c for w (w < 0 if side < 0, w > 0 if side > 0); c > 0, may be +inf.

    n·(w − expm1(w)) = n·(log(1+u) − u) with w = log1p(u) is the t^n-vs-linear part of g − g(t_m); its
    root gives the window edge where that part alone has dropped by c·n nats. f(w) = w − expm1(w) + c is
    concave, so Newton started on the far side of the root converges monotonically without overshoot,
    which keeps the window edge on the safe (wider) side at every iteration.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if side < 0:
            w = np.maximum(-c - 1.0, -2.0 * np.sqrt(2.0 * c))
            w = np.where(w - np.expm1(w) + c > 0, -c - 1.0, w)  # f(-c-1) = -e^{-c-1} < 0 always
        else:
            # f(sqrt(2c)) <= 0 since e^w >= 1 + w + w²/2, and f(log(2(1+c))) <= 0 since 1 + c >= log(2(1+c)).
            w = np.minimum(np.sqrt(2.0 * c), np.log(2.0) + np.log1p(c))
        finite = np.isfinite(w)
        w = np.where(finite, w, 0.0)
        for _ in range(60):
            f = w - np.expm1(w) + c
            fp = -np.expm1(w)
            step = np.where(fp != 0, f / fp, 0.0)
            w_new = w - step
            if side < 0:
                w_new = np.minimum(np.maximum(w_new, w), 0.0)
            else:
                w_new = np.maximum(np.minimum(w_new, w), 0.0)
            # The edge only has to be good to far better than a quadrature node spacing; stopping at a
            # relative 1e-13 avoids ulp-level creeping once Newton has converged.
            done = np.all((np.abs(w_new - w) <= 1e-13 * np.maximum(1.0, np.abs(w))) | ~finite)
            w = w_new
            if done:
                break
    return np.where(finite, w, -np.inf if side < 0 else np.inf)


@functools.lru_cache(maxsize=32)
def _reference_rule(panels: int, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss–Legendre on [0, 1]: positions (panels*nodes,) and weights summing to 1."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    left = np.arange(panels, dtype=np.float64)[:, None]
    pos = (left + 0.5 * (x[None, :] + 1.0)) / panels
    wts = np.broadcast_to(0.5 * w[None, :] / panels, pos.shape)
    return pos.reshape(-1).copy(), wts.reshape(-1).copy()


class _RayPlan:
    """Per-element expansion point, shape parameters and quadrature windows (flat float64 arrays).

    Write t = t_m + T·u with the scale T = t_m (or, when t_m = t* = 0, T = the local width). The shifted
    log-integrand is then a sum of three terms, each ≤ 0 on the side where it is used, so nothing large cancels:

        h(u) = g(t_m + T u) − g(t_m) = n·(log1p(u) − u) − A u²/2 + s u,    A = a T²,  s = T·g'(t_m),

    with s = 0 at an interior peak (this uses b = a t* − n/t*), s = (t* − x1)(n/t* + a x1) > 0 at an endpoint
    x1 < t* (no cancellation beyond t* − x1 itself, and no overflow even for x1 ≪ t*), and s = b T ≤ 0 with
    the ψ term absent when t_m = 0 (n = 0, b ≤ 0). All quantities are dimensionless.
    """

    def __init__(self, n: np.ndarray, a: np.ndarray, b: np.ndarray, x1: np.ndarray) -> None:
        self.n, self.a, self.b, self.x1 = n, a, b, x1
        t_star = _peak(n, a, b)
        self.t_star = t_star
        endpoint = x1 <= t_star
        self.t_m = t_m = np.where(endpoint, x1, t_star)
        at_zero = t_m == 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            width0 = np.minimum(1.0 / np.sqrt(a), np.where(b != 0, 1.0 / np.abs(b), np.inf))
            self.T = T = np.where(at_zero, width0, t_m)
            self.A = A = a * T * T
            slope = np.where(endpoint, (t_star - x1) * (n / np.where(t_star > 0, t_star, 1.0) + a * x1), 0.0)
            self.s = s = np.where(at_zero, b * T, slope)
        self.anchor = np.where(at_zero, _LD(0), _g_ld(n, a, b, t_m))

        L = float(RAY_WINDOW_DROP)
        pos_n = n > 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            c = np.where(pos_n, L / n, np.inf)
            gauss = np.sqrt(2.0 * L / A)

            # Left side u ∈ [u_L, 0] (t from t_m + T u_L to t_m). Each candidate is a point where one of the
            # three (≤ 0, monotone) terms of h alone reaches −L, so h ≤ −L there; the candidate nearest 0 is used,
            # where each term is ≥ −L and so h ≥ −3L. For concave h, h(u_L) ≤ −L bounds the discarded tail by
            # e^{−L}/(1 − e^{−L}) of the kept mass (tail ≤ e^{h}/h', kept ≥ chord bound).
            has_left = ~at_zero
            u_l = -np.minimum(gauss, 1.0)
            u_l = np.where(s > 0, np.maximum(u_l, -L / s), u_l)
            w_l = np.maximum(_psi_root(c, -1), np.log1p(u_l))
            # For small n the t^n factor decays slowly towards 0 and the bound above can be very deep. A second,
            # cruder certificate: on [−u_1, 0] (same candidates at drop 1) every term is ≥ −1, so the left mass
            # is ≥ u_1 T e^{−3}; since h ≤ 0, the mass on [0, t_c] is ≤ t_c. Cutting at t_c = u_1 T e^{−3−L}
            # therefore also discards < e^{−L} of the kept mass.
            u_1 = np.minimum(np.sqrt(2.0 / A), 1.0)
            u_1 = np.where(s > 0, np.minimum(u_1, 1.0 / s), u_1)
            u_1 = np.where(pos_n, np.minimum(u_1, -np.expm1(_psi_root(np.where(pos_n, 1.0 / n, np.inf), -1))), u_1)
            w_l = np.maximum(w_l, np.log(u_1) - 3.0 - L)
            # Quadrature variable. For n > 0 use w = log(t/t_m) = log1p(u) (Jacobian t = t_m e^w): t^n becomes
            # e^{n w}, smooth for any real n, whereas in u a non-integer power has a branch point at u = −1 that
            # ruins Gauss–Legendre convergence whenever the window is not small compared with t_m. When the window
            # is narrow, w ≈ u and nothing is lost. n = 0 uses u; the integrand is then entire.
            self.left_log = has_left & pos_n & (w_l > -_MAX_LOG_WINDOW)
            u_l_lin = np.where(pos_n, np.expm1(np.maximum(w_l, -_MAX_LOG_WINDOW)), u_l)
            self.left_lo = np.where(self.left_log, w_l, np.where(has_left, np.maximum(u_l_lin, -1.0), 0.0))
            self.has_left = has_left

            # Right side u ∈ [0, u_R], only when the peak lies strictly inside (0, x1). Same candidates.
            has_right = ~endpoint
            u_r = np.minimum((x1 - t_m) / T, gauss)
            u_r = np.where(s < 0, np.minimum(u_r, L / np.abs(s)), u_r)
            u_r = np.where(pos_n, np.minimum(u_r, np.expm1(_psi_root(c, +1))), u_r)
            u_r = np.where(has_right, u_r, 0.0)
            v_r = np.log1p(u_r)
            # The e^{v} Jacobian reaches e^{v_r}; keep it far from float64 overflow.
            self.right_log = has_right & pos_n & (v_r < _MAX_LOG_WINDOW)
            self.right_hi = np.where(self.right_log, v_r, u_r)
            self.has_right = has_right

    def _log_segment(self, j: np.ndarray, lo: np.ndarray, hi: np.ndarray, log_var: bool, panels: int) -> np.ndarray:
        """log ∫_lo^hi of exp(h) dt in variable u (or w = log1p(u)), composite GL, for elements j."""
        r, wr = _reference_rule(int(panels), int(RAY_GL_NODES))
        n = self.n[j, None]
        A = self.A[j, None]
        s = self.s[j, None]
        lo = lo[:, None]
        width = hi[:, None] - lo
        x = lo + width * r[None, :]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            if log_var:
                u = np.expm1(x)
                psi = x - u  # log1p(u) − u, with log1p(u) = x exactly
            else:
                u = x
                psi = np.log1p(u) - u
            h = np.where(n > 0, n * psi, 0.0) - 0.5 * A * u * u + s * u
            if log_var:
                h = h + x  # dt = T e^w dw
            out = np.log(np.sum(wr[None, :] * np.exp(h), axis=1) * width[:, 0])
        return out + np.log(self.T[j])

    def h_at(self, tau: np.ndarray) -> np.ndarray:
        """h = g(t_m + τ) − g(t_m) for every element (τ of shape (N,)), cancellation-free form."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            u = tau / self.T
            psi = np.log1p(u) - u
            return np.where(self.n > 0, self.n * psi, 0.0) - 0.5 * self.A * u * u + self.s * u

    def log_sum(self, idx: np.ndarray, panels: int) -> np.ndarray:
        """log ∫ exp(g(t) − g(t_m)) dt over the window, for elements idx, at `panels` GL panels per side."""
        out_l = np.full(idx.size, -np.inf)
        out_r = np.full(idx.size, -np.inf)
        zeros = np.zeros(idx.size)
        for side_out, has, is_log, lo, hi in (
            (out_l, self.has_left[idx], self.left_log[idx], self.left_lo[idx], zeros),
            (out_r, self.has_right[idx], self.right_log[idx], zeros, self.right_hi[idx]),
        ):
            for log_var in (True, False):
                sel = has & (is_log == log_var)
                if sel.any():
                    side_out[sel] = self._log_segment(idx[sel], lo[sel], hi[sel], log_var, panels)
        with np.errstate(invalid="ignore"):
            return np.logaddexp(out_l, out_r)


def _ray_core(n: np.ndarray, a: np.ndarray, b: np.ndarray, x1: np.ndarray, shape: tuple[int, ...],
              offset: int) -> tuple[np.ndarray, np.ndarray, _RayPlan]:
    """(anchor g(t_m) in extended precision, verified log ∫ e^{h}, plan) for flat validated inputs."""
    plan = _RayPlan(n, a, b, x1)
    idx = np.arange(n.size)
    panels = max(int(RAY_BASE_PANELS), 1)
    coarse = plan.log_sum(idx, panels)
    panels *= 2
    fine = plan.log_sum(idx, panels)
    rtol = float(RAY_CHECK_RTOL)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(fine - coarse) <= rtol) | ~np.isfinite(fine)
    while bad.any() and 2 * panels <= int(RAY_MAX_PANELS):
        panels *= 2
        j = idx[bad]
        finer = plan.log_sum(j, panels)
        with np.errstate(invalid="ignore"):
            ok = (np.abs(finer - fine[j]) <= rtol) & np.isfinite(finer)
        fine[j] = finer
        bad[j[ok]] = False
    if bad.any():
        k = int(idx[bad][0])
        i = np.unravel_index(offset + k, shape) if shape else ()
        raise RayIntegralError(
            f"ray integral failed its accuracy check at index {tuple(int(v) for v in i)} "
            f"(n={float(n[k])!r}, a={float(a[k])!r}, b={float(b[k])!r}, x1={float(x1[k])!r}): quadrature at "
            f"{panels} panels x {RAY_GL_NODES} nodes did not agree with half the resolution to {rtol:g}"
        )
    return plan.anchor, fine, plan


def log_ray_integral(n: ArrayLike, a: ArrayLike, b: ArrayLike, x1: ArrayLike) -> np.ndarray:
    """log I(n, a, b, x1) = log ∫_0^{x1} t^n exp(−a t²/2 + b t) dt in nats, float64: the Gaussian prior's radial
    integral along one ray (module docstring).

    Args broadcast together: n ≥ 0 (D − 1; need not be an integer), a > 0, real b, 0 < x1 ≤ +inf.
    Returns an array of the broadcast shape (0-d for scalar inputs).

    Method: with t_m = min(t*, x1), log I = g(t_m) + log ∫ exp(g(t) − g(t_m)) dt, the second term by
    composite Gauss–Legendre over a concavity-certified window (see _RayPlan), the first in extended
    precision. Accuracy: the quadrature is accepted only when two resolutions agree to RAY_CHECK_RTOL
    (relative, i.e. nats), after refining up to RAY_MAX_PANELS; otherwise RayIntegralError names the element.
    The remaining error is the float64 rounding of the result (half an ulp of |log I|, ~1e-6 at |log I| ~ 1e10)
    plus ~1e-19·(|n log t_m| + a t_m²/2 + |b t_m|) from the anchor (1e-16· that without extended precision).

    Raises ValueError for NaN, n < 0, a ≤ 0, non-finite b or x1 ≤ 0, naming the first bad index.
    """
    (n_, a_, b_, x_), shape = _validate(("n", "a", "b", "x1"), (n, a, b, x1))
    out = np.empty(n_.size, dtype=np.float64)
    for s in range(0, n_.size, _CHUNK):
        sl = slice(s, s + _CHUNK)
        anchor, log_sum, _ = _ray_core(n_[sl], a_[sl], b_[sl], x_[sl], shape, s)
        out[sl] = (anchor + log_sum.astype(_LD)).astype(np.float64)
    if not np.all(np.isfinite(out)):
        k = int(np.flatnonzero(~np.isfinite(out))[0])
        i = tuple(int(v) for v in np.unravel_index(k, shape)) if shape else ()
        raise RayIntegralError(
            f"ray integral overflows float64 at index {i} "
            f"(n={float(n_[k])!r}, a={float(a_[k])!r}, b={float(b_[k])!r}, x1={float(x_[k])!r})"
        )
    return out.reshape(shape)


def _neg_slope_log(n: np.ndarray, a: np.ndarray, b: np.ndarray, t_star: np.ndarray, tau: np.ndarray) -> np.ndarray:
    # log(−g'(t*+τ)) for τ > 0. −g'(t) = (t − t*)(n/(t t*) + a) using b = a t* − n/t*: no cancellation of the
    # large terms a t and n/t near the peak. With t* = 0 (n = 0, b ≤ 0), −g'(t) = a t − b directly.
    t = t_star + tau
    with np.errstate(divide="ignore", invalid="ignore"):
        interior = np.log(tau) + np.log(n / (t * np.where(t_star > 0, t_star, 1.0)) + a)
        at_zero = np.log(a * t - b)
    return np.where(t_star > 0, interior, at_zero)


def log_ray_tail_bound(n: ArrayLike, a: ArrayLike, b: ArrayLike, t: ArrayLike) -> np.ndarray:
    """Upper bound (log, nats) on the tail ∫_t^∞ s^n exp(−a s²/2 + b s) ds, valid for t > t*.

    Since g is concave, g(s) ≤ g(t) + g'(t)(s − t) with g'(t) < 0 past the peak, so the tail is at most
    e^{g(t)} / (−g'(t)); returns g(t) − log(−g'(t)). Broadcast shape, float64.
    Raises ValueError (naming the index) for t ≤ t* or invalid n, a, b.
    """
    (n_, a_, b_, t_), shape = _validate(("n", "a", "b", "t"), (n, a, b, t))
    t_star = _peak(n_, a_, b_)
    bad = ~(t_ > t_star)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        i = tuple(int(v) for v in np.unravel_index(k, shape)) if shape else ()
        raise ValueError(f"log_ray_tail_bound needs t > t*; at index {i} t={float(t_[k])!r} <= t*={float(t_star[k])!r}")
    g = _g_ld(n_, a_, b_, t_)
    out = (g - _neg_slope_log(n_, a_, b_, t_star, t_ - t_star).astype(_LD)).astype(np.float64)
    return out.reshape(shape)


def saturation_radius(n: ArrayLike, a: ArrayLike, b: ArrayLike, *, log_tol: float = -40.0) -> np.ndarray:
    """A radius t_sat ≥ t* beyond which the ray integral has at most e^{log_tol} of its total mass.

    Guarantees (up to float64 rounding of t_sat) log_ray_tail_bound(t_sat) ≤ log I(n, a, b, ∞) + log_tol,
    hence ∫_{t_sat}^∞ ≤ e^{log_tol} · ∫_0^∞. The bound F(t) = g(t) − log(−g'(t)) is strictly decreasing for
    t > t* (g falls, −g' rises), so its crossing is bracketed by doubling/halving τ = t − t* from the local
    width to a factor of 2 and located to 1e-6 relative by Illinois false position in log τ, always returning the
    bracket end on the safe side (how close t_sat is to the crossing changes nothing but the search's cap).
    Same units as t; broadcast shape, float64. Raises ValueError for invalid inputs or log_tol ≥ 0.
    """
    log_tol = check_number("log_tol", log_tol)
    if not log_tol < 0:
        raise ValueError(f"log_tol must be a finite negative number, got {log_tol!r}")
    (n_, a_, b_), shape = _validate(("n", "a", "b"), (n, a, b))
    out = np.empty(n_.size, dtype=np.float64)
    for s in range(0, n_.size, _CHUNK):
        sl = slice(s, s + _CHUNK)
        out[sl] = _saturation_flat(n_[sl], a_[sl], b_[sl], float(log_tol), shape, s)
    return out.reshape(shape)


def _saturation_flat(n: np.ndarray, a: np.ndarray, b: np.ndarray, log_tol: float, shape: tuple[int, ...],
                     offset: int) -> np.ndarray:
    x1 = np.full(n.size, np.inf)
    _, log_sum, plan = _ray_core(n, a, b, x1, shape, offset)
    t_star = plan.t_star
    # Work relative to g(t*): target for h(τ) − log(−g'(t* + τ)) is log ∫e^h + log_tol (all O(100) numbers).
    target = log_sum + log_tol

    def phi(tau: np.ndarray) -> np.ndarray:
        return plan.h_at(tau) - _neg_slope_log(n, a, b, t_star, tau) - target

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        curv = a + np.where(t_star > 0, n / np.where(t_star > 0, t_star, 1.0) ** 2, 0.0)
        scale = 1.0 / np.sqrt(curv)
        scale = np.where((t_star == 0) & (b < 0), np.minimum(scale, 1.0 / np.abs(b)), scale)
    lo = scale.copy()
    hi = scale.copy()
    # φ(0+) > 0 always (φ → +∞ for t* > 0; for t* = 0 it is ≥ −log_tol since I(∞) ≤ 1/|b|), and φ → −∞.
    # Double hi until φ(hi) ≤ 0, halve lo until φ(lo) > 0; each side moves the other's end along, so the bracket
    # ends up one factor of 2 wide.
    f_hi = phi(hi)
    f_lo = f_hi.copy()
    for _ in range(2100):
        up = ~(f_hi <= 0)
        if not up.any():
            break
        lo, f_lo = np.where(up, hi, lo), np.where(up, f_hi, f_lo)
        hi = np.where(up, hi * 2.0, hi)
        f_hi = np.where(up, phi(hi), f_hi)
    for _ in range(2100):
        down = ~(f_lo > 0)
        if not down.any():
            break
        hi, f_hi = np.where(down, lo, hi), np.where(down, f_lo, f_hi)
        lo = np.where(down, lo * 0.5, lo)
        f_lo = np.where(down, phi(lo), f_lo)
    ok = (f_hi <= 0) & (f_lo > 0)
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        i = tuple(int(v) for v in np.unravel_index(offset + k, shape)) if shape else ()
        raise RayIntegralError(f"saturation_radius could not bracket the tail bound at index {i} "
                               f"(n={float(n[k])!r}, a={float(a[k])!r}, b={float(b[k])!r})")
    # Illinois false position in log τ (φ is smooth and decreasing there): superlinear, a few evaluations of φ
    # instead of ~40 halvings. The bracket [lo: φ > 0, hi: φ ≤ 0] is kept throughout,
    # so the answer stays on the safe side; a step that leaves the bracket's interior becomes a bisection.
    x_lo, x_hi = np.log(lo), np.log(hi)
    kept = np.zeros(n.size)  # +1: hi was replaced last, −1: lo was; the side kept twice has its f halved
    for _ in range(200):
        active = x_hi - x_lo > 1e-6  # t_sat within 1e-6 relative of the crossing: precision that changes nothing
        if not active.any():
            break
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        inside = np.isfinite(x) & (x > x_lo) & (x < x_hi)
        x = np.where(inside, x, 0.5 * (x_lo + x_hi))
        f = phi(np.exp(x))
        neg = (f <= 0) & active
        pos = ~(f <= 0) & active
        f_lo = np.where(neg & (kept == 1), 0.5 * f_lo, f_lo)
        f_hi = np.where(pos & (kept == -1), 0.5 * f_hi, f_hi)
        x_hi, f_hi = np.where(neg, x, x_hi), np.where(neg, f, f_hi)
        x_lo, f_lo = np.where(pos, x, x_lo), np.where(pos, f, f_lo)
        kept = np.where(neg, 1.0, np.where(pos, -1.0, kept))
    hi = np.exp(x_hi)
    # Round up so that the float64 t_sat is never on the unsafe side of t* + hi.
    return np.nextafter(t_star + hi, np.inf)


__all__ = [
    "RAY_BASE_PANELS",
    "RAY_CHECK_RTOL",
    "RAY_GL_NODES",
    "RAY_MAX_PANELS",
    "RAY_WINDOW_DROP",
    "RayIntegralError",
    "log_ray_integral",
    "log_ray_tail_bound",
    "ray_peak",
    "saturation_radius",
]
