"""Exact prior mass of a quadratic behaviour region: a closed-form oracle with a real network's geometry.

Near a trained network θ0 the KL behaviour is, to second order, Δ_G(θ0 + x) = ½ xᵀ G x with G the Hessian of the
mean KL at θ0 (for KL it equals the Gauss–Newton matrix, see ``hfvolume.models.gauss_newton``). The local volume
of Scherlis & Belrose (arXiv 2501.18812: the prior mass of the region {Δ ≤ ε} around θ0) of this quadratic
model has a one-dimensional answer. With the Gaussian prior θ ~ N(m, σ² I), write x = θ − θ0 in G's eigenbasis
(eigenvalues λ_j > 0, orthonormal eigenvectors u_j, j = 1…k; G's null space does not constrain x) and put

    a_j = λ_j σ²,    d_j = u_jᵀ (m − θ0) / σ,    Q = Σ_j a_j (z_j + d_j)²,   z ~ N(0, I_k).

Then Δ_G(θ) = Q/2 and log P(Δ_G ≤ ε) = log P(Q ≤ 2ε): the lower tail of a weighted non-central χ², whose
cumulant generating function is

    K(s) = Σ_j [ −½ log(1 − 2 a_j s) + a_j d_j² s / (1 − 2 a_j s) ],    s < 1 / (2 max_j a_j).

The saddlepoint ŝ solves K'(ŝ) = q (ŝ < 0 below the mean Σ a_j (1 + d_j²)), and the Lugannani–Rice formula
(Lugannani & Rice 1980; Butler, *Saddlepoint Approximations with Applications*, 2007, ch. 1)

    ŵ = sgn(ŝ) √(2 (ŝ q − K(ŝ))),   û = ŝ √K''(ŝ),   P(Q ≤ q) ≈ Φ(ŵ) + φ(ŵ) (1/ŵ − 1/û)

is evaluated in log space. Everything is written in the per-term variable u_j = 2 a_j ŝ / (1 − 2 a_j ŝ) ∈ (−1, ∞),
in which 2(ŝq − K(ŝ)), ŝ² K''(ŝ) and their difference û² − ŵ² are sums of non-negative or cancellation-free terms,
so 1/ŵ − 1/û = (û² − ŵ²) / (ŵ û (ŵ + û)) is accurate down to ŝ → 0, where it tends to κ3 / (6 κ2^{3/2}).

Accuracy. For equal weights and d = 0 (Q = a χ²_k, exact answer the regularized incomplete gamma function) the
error of log P is below the Stirling remainder log Γ(k/2) − log Γ̂(k/2) < 1/(6k) nats, Γ̂(α) = √(2π) α^{α−½} e^{−α}:
the approximation overestimates P in the lower tail and its log error grows towards that remainder as q → 0
(checked by the tests against mpmath for k = 1…1000 and P from 1e-300 to 0.5; the relative error of log P is then
at most 4e-2 at k = 1 and 5e-7 at k = 1000). Unequal weights behave like fewer terms (one dominant weight: like
k = 1), non-centrality makes the law more normal; against Imhof's exact integral for k ≤ 5 and random weights no
error above 0.12 nats was seen. For a trained network's G (thousands of terms) the error is a small fraction of a
nat, below the Monte Carlo checks' resolution.

Two Monte Carlo checks are provided, both unbiased for P (not for log P): exponential tilting of the prior at the
saddlepoint, in the k eigen-coordinates (:func:`tilted_log_prob_weighted_chi2_below_mc`) or in the full D-space
with any behaviour (:func:`tilted_log_prior_mass_mc`). The tilted prior is N(μ_s, Σ_s) in x = θ − θ0 with
Σ_s = (I/σ² − 2ŝG)⁻¹ and μ_s = Σ_s (m − θ0)/σ²; its importance weights p/q are ≤ exp(K(ŝ) − ŝ q) on the region.

Only torch (float64) and math are used; randomness comes from private ``torch.Generator`` objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, "list[float]", "tuple[float, ...]"]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SERIES_BELOW = 0.1  # |u| below which log1p(u) − u + u²/2 is summed as a series (cancellation otherwise)
_SERIES_TERMS = 18  # |u|^18 / 21 < 1e-19 relative at |u| = 0.1
_LIMIT_BELOW = 1e-80  # max|u_j| below which 1/ŵ − 1/û is its ŝ → 0 limit (u³ would underflow)
_NEWTON_MAX_ITERATIONS = 400
# Absolute tolerance on the solver's variable (log-scale, so a relative accuracy of s or of 1 − 2 a_max s) and on
# log K' − log q; K' is a float64 sum, so |h| cannot be trusted much below this.
_ROOT_TOL = 1e-13
_EPS = float(torch.finfo(torch.float64).eps)


# ---------------------------------------------------------------------------------------------- validation
def _as_vector(x: ArrayLike, name: str, *, allow_empty: bool = False) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a 1-D array of numbers, got {type(x).__name__}") from err
    if t.ndim != 1 or (t.numel() == 0 and not allow_empty):
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; entry {int((~torch.isfinite(t)).nonzero()[0])} is not")
    return t


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def _chi2_inputs(a: ArrayLike, d2: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a_t, d2_t = _as_vector(a, "a"), _as_vector(d2, "d2")
    if a_t.shape != d2_t.shape:
        raise ValueError(f"a and d2 must have the same shape, got {tuple(a_t.shape)} and {tuple(d2_t.shape)}")
    if bool((a_t <= 0).any()):
        raise ValueError(f"weights a must be positive; a[{int((a_t <= 0).nonzero()[0])}] is not")
    if bool((d2_t < 0).any()):
        raise ValueError(f"non-centralities d2 must be ≥ 0; d2[{int((d2_t < 0).nonzero()[0])}] is not")
    return a_t, d2_t


# ---------------------------------------------------------------------------------------------- the CGF
@dataclass(frozen=True)
class _Terms:
    """Per-term state at a point s of the CGF's domain, each `[k]`: r_j = 1/(1 − 2 a_j s), u_j = 2 a_j s r_j =
    r_j − 1 and log r_j, each formed without cancellation (r_j → 0 in the far lower tail, 1 − 2 a_j s → 0 near
    the pole)."""

    u: torch.Tensor
    r: torch.Tensor
    log_r: torch.Tensor


def _terms_of_s(a: torch.Tensor, s: float) -> _Terms:
    """Terms at s; accurate for s ≤ 0 and for s not close to the pole (the solver's upper branch avoids it)."""
    y = 2.0 * a * s
    r = 1.0 / (1.0 - y)
    return _Terms(y * r, r, -torch.log1p(-y))


def _log1p_minus_u_plus_half_u2(t: _Terms) -> torch.Tensor:
    """g(u) = log(1 + u) − u + u²/2 = u³/3 − u⁴/4 + …, `[k]`, summed as a series for small |u| (cancellation)."""
    u = t.u
    small = u.abs() < _SERIES_BELOW
    us = torch.where(small, u, torch.zeros_like(u))
    series = torch.zeros_like(u)
    for m in range(_SERIES_TERMS - 1, -1, -1):  # Horner on Σ_m (−u)^m / (m + 3)
        series = 1.0 / (m + 3) - us * series
    series = series * us**3
    return torch.where(small, series, t.log_r - u + 0.5 * u * u)


def _derivatives(a: torch.Tensor, d2: torch.Tensor, t: _Terms) -> tuple[float, float]:
    """K'(s) = Σ a r (1 + d² r) and K''(s) = Σ 2a² r² (1 + 2 d² r)."""
    r = t.r
    k1 = torch.sum(a * r * (1.0 + d2 * r))
    k2 = torch.sum(2.0 * a * a * r * r * (1.0 + 2.0 * d2 * r))
    return float(k1), float(k2)


def weighted_chi2_cgf(a: ArrayLike, d2: ArrayLike, s: float) -> tuple[float, float, float]:
    """K(s), K'(s), K''(s) of Q = Σ_j a_j (z_j + d_j)², z ~ N(0, I) (float64).

    Args:
        a: `[k]` positive weights a_j (for the prior mass of ½xᵀGx: λ_j σ²).
        d2: `[k]` non-centralities d_j² ≥ 0.
        s: the argument, s < 1 / (2 max a).

    Returns:
        (K, K', K'') with K(s) = Σ [−½ log(1 − 2a_j s) + a_j d_j² s / (1 − 2a_j s)] (nats), K' in the units of Q.
    """
    a_t, d2_t = _chi2_inputs(a, d2)
    if isinstance(s, bool) or not isinstance(s, (int, float, np.floating, np.integer)) or not math.isfinite(s):
        raise ValueError(f"s must be a finite number, got {s!r}")
    if 2.0 * float(a_t.max()) * s >= 1.0:
        raise ValueError(f"s = {s!r} is outside the CGF's domain s < 1/(2 max a) = {0.5 / float(a_t.max())!r}")
    t = _terms_of_s(a_t, float(s))
    k0 = 0.5 * float(torch.sum(t.log_r + d2_t * t.u))
    k1, k2 = _derivatives(a_t, d2_t, t)
    return k0, k1, k2


# ---------------------------------------------------------------------------------------------- saddlepoint
def _bracketed_newton(fun: Callable[[float], tuple[float, float]], lo: float, hi: float) -> float:
    """Root of an increasing h on [lo, hi] (h(lo) ≤ 0 ≤ h(hi)): Newton steps, bisection when a step leaves the
    bracket. ``fun(v)`` returns (h(v), h'(v))."""
    v = hi
    for _ in range(_NEWTON_MAX_ITERATIONS):
        h, dh = fun(v)
        if h == 0.0 or abs(h) <= _ROOT_TOL:
            return v
        if h > 0:
            hi = v
        else:
            lo = v
        step = v - h / dh if dh > 0 and math.isfinite(dh) else math.nan
        if not lo < step < hi:
            step = 0.5 * (lo + hi)
        if abs(step - v) <= _ROOT_TOL or hi - lo <= _ROOT_TOL:
            return step
        v = step
    raise RuntimeError(f"saddlepoint search did not converge in {_NEWTON_MAX_ITERATIONS} steps (bracket {lo}, {hi})")


def _saddlepoint(a: torch.Tensor, d2: torch.Tensor, q: float) -> tuple[float, _Terms]:
    """(ŝ, terms at ŝ) with K'(ŝ) = q. Solved for Q / max(a) (the terms do not change; ŝ scales), so that ŝ stays
    representable for any q."""
    scale = float(a.max())
    s, terms = _saddlepoint_unit(a / scale, d2, q / scale)
    return s / scale, terms


def _saddlepoint_unit(a: torch.Tensor, d2: torch.Tensor, q: float) -> tuple[float, _Terms]:
    """Below the mean the unknown is v = log(−s); above it, v = −log(1 − 2 a_max s), which keeps 1 − 2a_j s exact
    near the pole. In both, log K' is close to linear in v far from the mean, so Newton converges in a few steps."""
    mean = float(torch.sum(a * (1.0 + d2)))
    a_max = float(a.max())
    log_q = math.log(q) if q > 0 else -math.inf
    if not math.isfinite(log_q):
        raise ValueError(f"q / max(a) = {q!r} is too small (or too large) to represent the saddlepoint")
    if q == mean:
        return 0.0, _terms_of_s(a, 0.0)
    if q < mean:

        def lower(v: float) -> tuple[float, float]:
            s = -math.exp(v)
            k1, k2 = _derivatives(a, d2, _terms_of_s(a, s))
            return log_q - math.log(k1), -s * k2 / k1  # log q − log K': increasing in v

        # K'(s) ≤ k/(2|s|) + Σ d²/(4 a s²) gives a point with K' ≤ q; K'(s) ≥ mean/(1 + 2 a_max |s|)² one with K' > q.
        hi = math.log(a.numel()) - log_q
        pos = d2 > 0
        if bool(pos.any()):
            log_b = 0.5 * (float(torch.logsumexp(torch.log(d2[pos]) - torch.log(a[pos]), 0)) - math.log(2.0 * q))
            hi = float(np.logaddexp(hi, log_b))
        lo = math.log(0.5 * math.expm1(0.5 * math.log1p((mean - q) / q)) / (2.0 * a_max))
        s = -math.exp(_bracketed_newton(lower, lo, hi))
        return s, _terms_of_s(a, s)

    ratio = a / a_max

    def terms_upper(v: float) -> _Terms:
        one_minus_w = -ratio * math.expm1(-v)  # 2 a_j s
        w = (1.0 - ratio) + ratio * math.exp(-v)  # 1 − 2 a_j s, exact for the largest weight
        return _Terms(one_minus_w / w, 1.0 / w, -torch.log1p(-one_minus_w))

    def upper(v: float) -> tuple[float, float]:
        k1, k2 = _derivatives(a, d2, terms_upper(v))
        return math.log(k1) - log_q, k2 / k1 * math.exp(-v) / (2.0 * a_max)

    v = _bracketed_newton(upper, 0.0, math.log(q / a_max))  # a_max/(1 − 2a_max s) alone reaches q at the top
    return -math.expm1(-v) / (2.0 * a_max), terms_upper(v)


def solve_saddlepoint(a: ArrayLike, d2: ArrayLike, q: float) -> float:
    """The saddlepoint ŝ with K'(ŝ) = q for Q = Σ a_j (z_j + d_j)² (see :func:`weighted_chi2_cgf`).

    ŝ < 0 for q below the mean Σ a_j (1 + d_j²), ŝ = 0 at it, 0 < ŝ < 1/(2 max a) above it. Solved by Newton's
    method with a maintained bracket, in a variable where log K' is close to linear (log(−s) below the mean,
    −log(1 − 2 max(a) s) above), to a relative accuracy of about 1e-13 in ŝ (and in 1 − 2 max(a) ŝ).

    Args:
        a: `[k]` positive weights; d2: `[k]` non-negative non-centralities; q: positive threshold (units of Q).

    Raises:
        ValueError: invalid inputs, or q / max(a) so small that ŝ overflows a float64.
        RuntimeError: the iteration did not converge (not expected for finite inputs).
    """
    a_t, d2_t = _chi2_inputs(a, d2)
    return _saddlepoint(a_t, d2_t, _positive_float(q, "q"))[0]


def _lr_terms(a: torch.Tensor, d2: torch.Tensor, s: float, t: _Terms) -> tuple[float, float, float]:
    """(ŵ, û, 1/ŵ − 1/û) at the saddlepoint, without cancellation: per term, 2(ŝq − K) = u²/2 − g(u) + d²u²,
    ŝ²K'' = u²/2 + d²u²(1 + u) and their difference g(u) + d²u³."""
    u = t.u
    g = _log1p_minus_u_plus_half_u2(t)
    w2 = float(torch.sum(0.5 * u * u - g + d2 * u * u))
    u2 = float(torch.sum(0.5 * u * u + d2 * u * u * t.r))
    gap = float(torch.sum(g + d2 * u**3))
    sign = 1.0 if s > 0 else -1.0
    w_hat, u_hat = sign * math.sqrt(max(w2, 0.0)), sign * math.sqrt(u2)
    if s == 0.0 or float(u.abs().max()) < _LIMIT_BELOW or w_hat == 0.0:
        kappa2 = float(torch.sum(2.0 * a * a * (1.0 + 2.0 * d2)))
        kappa3 = float(torch.sum(8.0 * a**3 * (1.0 + 3.0 * d2)))
        return 0.0, 0.0, kappa3 / (6.0 * kappa2**1.5)
    return w_hat, u_hat, gap / (w_hat * u_hat * (w_hat + u_hat))


def _log_ndtr(x: float) -> float:
    return float(torch.special.log_ndtr(torch.tensor(x, dtype=torch.float64)))


def _erfcx(x: float) -> float:
    return float(torch.special.erfcx(torch.tensor(x, dtype=torch.float64)))


def _lugannani_rice_log(w_hat: float, u_hat: float, corr: float) -> float:
    """log [Φ(ŵ) + φ(ŵ)(1/ŵ − 1/û)], with Φ(x) = ½ erfcx(−x/√2) e^{−x²/2} so the e^{−ŵ²/2} factor stays in log
    space. Where the formula would leave (0, 1) (never observed, in tests or in 45,000 random cases; conceivable for
    extreme skew), Barndorff-Nielsen's r* = ŵ + log(û/ŵ)/ŵ, P ≈ Φ(r*), of the same error order, is used instead."""
    if w_hat == 0.0:
        # Each term's standardized skewness κ3/κ2^{3/2} is ≤ 2√2 and a sum's is no larger: P ∈ (0.31, 0.69).
        return math.log(0.5 + _INV_SQRT_2PI * corr)
    if w_hat < 0:
        bracket = 0.5 * _erfcx(-w_hat / _SQRT2) + _INV_SQRT_2PI * corr
        if bracket > 0:
            return -0.5 * w_hat * w_hat + math.log(bracket)
    else:
        bracket = 0.5 * _erfcx(w_hat / _SQRT2) - _INV_SQRT_2PI * corr  # upper tail = e^{−ŵ²/2} · bracket
        if bracket > 0:
            log_tail = -0.5 * w_hat * w_hat + math.log(bracket)
            if log_tail < 0:
                return math.log1p(-math.exp(log_tail))
    return _log_ndtr(w_hat + math.log(u_hat / w_hat) / w_hat)


def log_prob_weighted_chi2_below(a: ArrayLike, d2: ArrayLike, q: float) -> float:
    """log P(Σ_j a_j (z_j + d_j)² ≤ q), z ~ N(0, I_k), by the Lugannani–Rice saddlepoint formula (nats, ≤ 0).

    Args:
        a: `[k]` positive weights a_j.
        d2: `[k]` non-centralities d_j² ≥ 0.
        q: positive threshold.

    Returns:
        The log probability in nats. Accuracy: see the module docstring (for equal central weights the relative
        error of log P is O(1/k)); the error shrinks as the weights become more numerous and more even.
    """
    a_t, d2_t = _chi2_inputs(a, d2)
    s, terms = _saddlepoint(a_t, d2_t, _positive_float(q, "q"))
    return min(_lugannani_rice_log(*_lr_terms(a_t, d2_t, s, terms)), 0.0)


# ---------------------------------------------------------------------------------------------- tilted MC
@dataclass(frozen=True, eq=False)
class TiltedEstimate:
    """An importance-sampling estimate of a log probability (nats) from the saddlepoint-tilted prior.

    Attributes:
        log_mass: log of the mean importance weight, log P̂ (nats); −inf when no sample fell in the region.
        standard_error: delta-method standard error of ``log_mass`` (nats): the relative standard error of P̂.
        n_samples: number of samples drawn.
        n_inside: samples inside the region (the others have weight 0).
        ess: effective sample size (Σw)² / Σw² of the weights.
        tilt: the tilt ŝ used (the saddlepoint unless overridden).
        log_weights: `[n_samples]` per-sample log weights (nats; −inf outside the region).
    """

    log_mass: float
    standard_error: float
    n_samples: int
    n_inside: int
    ess: float
    tilt: float
    log_weights: torch.Tensor = field(repr=False)


def _summarize(log_w: torch.Tensor, tilt: float) -> TiltedEstimate:
    n = log_w.numel()
    inside = int(torch.isfinite(log_w).sum())
    if inside == 0:
        return TiltedEstimate(-math.inf, math.inf, n, 0, 0.0, tilt, log_w)
    lse1, lse2 = float(torch.logsumexp(log_w, 0)), float(torch.logsumexp(2.0 * log_w, 0))
    ratio = math.exp(lse2 + math.log(n) - 2.0 * lse1)  # mean(w²) / mean(w)² ≥ 1
    se = math.sqrt(max(ratio - 1.0, 0.0) / (n - 1)) if n > 1 else math.inf
    return TiltedEstimate(lse1 - math.log(n), se, n, inside, math.exp(2.0 * lse1 - lse2), tilt, log_w)


def _tilt_variance(a: torch.Tensor, tilt: float) -> torch.Tensor:
    """`[k]` variances v_j = 1/(1 − 2 a_j ŝ) of y_j = z_j + d_j under the prior tilted by exp(ŝ Q) (means d_j v_j)."""
    if not math.isfinite(tilt) or 2.0 * float(a.max()) * tilt >= 1.0:
        raise ValueError(f"tilt {tilt!r} is outside the CGF's domain s < 1/(2 max a) = {0.5 / float(a.max())!r}")
    return 1.0 / (1.0 - 2.0 * a * tilt)


def _log_ratio(y: torch.Tensor, d: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """`[n]` log p(y)/q(y) of the prior N(d, I) against the tilted N(d·var, diag var), from the two densities
    (algebraically K(ŝ) − ŝ Q, written independently of the CGF code)."""
    prior = -0.5 * (y - d) ** 2
    proposal = -0.5 * (y - d * var) ** 2 / var - 0.5 * torch.log(var)
    return torch.sum(prior - proposal, dim=-1)


def tilted_log_prob_weighted_chi2_below_mc(
    a: ArrayLike, d2: ArrayLike, q: float, *, n_samples: int = 256, seed: int = 0, tilt: float | None = None
) -> TiltedEstimate:
    """Unbiased importance-sampling estimate of P(Σ a_j (z_j + d_j)² ≤ q), sampling y = z + d from the
    prior tilted by exp(ŝ Q) (independent Gaussians N(d_j v_j, v_j), v_j = 1/(1 − 2 a_j ŝ)), weight p/q · 1{Q ≤ q}.

    The sign of each d_j is irrelevant to the law of Q; d_j = +√d2_j is used. Memory: `[n_samples, k]` float64.

    Args:
        a, d2: `[k]` weights and non-centralities; q: positive threshold.
        n_samples: number of samples; seed: seed of the private generator; tilt: ŝ (default: the saddlepoint).
    """
    a_t, d2_t = _chi2_inputs(a, d2)
    q = _positive_float(q, "q")
    n_samples = _check_count(n_samples, "n_samples", minimum=2)
    s = _saddlepoint(a_t, d2_t, q)[0] if tilt is None else float(tilt)
    var = _tilt_variance(a_t, s)
    d = torch.sqrt(d2_t)
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(n_samples, a_t.numel(), generator=gen, dtype=torch.float64)
    y = d * var + torch.sqrt(var) * z
    log_w = _log_ratio(y, d, var)
    log_w = torch.where(torch.sum(a_t * y * y, dim=-1) <= q, log_w, torch.full_like(log_w, -math.inf))
    return _summarize(log_w, s)


def _check_count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------------------- the region
def _as_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite entries")
    return x


def _rank_cut(eigenvalues: torch.Tensor, size: int, rank_rtol: float | None) -> torch.Tensor:
    """Indices of eigenvalues above the noise floor of a symmetric eigensolver, rtol · λ_max with rtol = size · eps
    by default (eigh's absolute error is ~ eps · λ_max, so anything below that is numerically zero)."""
    rtol = size * _EPS if rank_rtol is None else _positive_float(rank_rtol, "rank_rtol")
    top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    if top <= 0:
        return torch.zeros(0, dtype=torch.long)
    keep = (eigenvalues > rtol * top).nonzero().reshape(-1)
    return keep.flip(0)  # largest first


@dataclass(frozen=True, eq=False)
class QuadraticRegion:
    """The quadratic behaviour Δ_G(θ) = ½ (θ − θ0)ᵀ G (θ − θ0), G = U diag(λ) Uᵀ, and its exact prior mass.

    Attributes:
        eigenvalues: `[k]` positive eigenvalues λ_j of G (behaviour units per squared parameter unit), float64.
        eigenvectors: `[D, k]` orthonormal eigenvectors u_j (columns), float64.
        anchor: `[D]` the anchor θ0, float64.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    anchor: torch.Tensor

    def __post_init__(self) -> None:
        lam = _as_vector(self.eigenvalues, "eigenvalues", allow_empty=True)
        vecs = _as_matrix(self.eigenvectors, "eigenvectors")
        anchor = _as_vector(self.anchor, "anchor")
        if vecs.shape != (anchor.numel(), lam.numel()):
            raise ValueError(
                f"eigenvectors must have shape [D, k] = [{anchor.numel()}, {lam.numel()}], got {tuple(vecs.shape)}"
            )
        if bool((lam <= 0).any()):
            raise ValueError(f"eigenvalues must be positive; eigenvalues[{int((lam <= 0).nonzero()[0])}] is not")
        norms = torch.linalg.vector_norm(vecs, dim=0)
        if lam.numel() and float((norms - 1.0).abs().max()) > 1e-6:
            raise ValueError(f"eigenvector columns must have unit norm; column norms span {norms.aminmax()}")
        object.__setattr__(self, "eigenvalues", lam)
        object.__setattr__(self, "eigenvectors", vecs)
        object.__setattr__(self, "anchor", anchor)

    @property
    def dim(self) -> int:
        """D, the number of parameters."""
        return self.anchor.numel()

    @property
    def rank(self) -> int:
        """k, the number of retained eigenvalues."""
        return self.eigenvalues.numel()

    @classmethod
    def from_factor(
        cls, factor: torch.Tensor, anchor: torch.Tensor, *, rank_rtol: float | None = None
    ) -> "QuadraticRegion":
        """G = Aᵀ A from a factor A `[r, D]`, through the `[r, r]` Gram matrix A Aᵀ = V diag(λ) Vᵀ (never D × D):
        u_j = Aᵀ v_j / √λ_j. Eigenvalues ≤ rank_rtol · λ_max are dropped (default r·eps, eigh's noise floor);
        eigenvectors of eigenvalues near that floor carry errors ~ eps λ_max / λ_j, harmless to the prior mass
        because their weights a_j = λ_j σ² are as small. Cost: two r²D products and one r³ eigendecomposition;
        memory: A, the Gram matrix and U, i.e. (rD + r² + kD) float64."""
        a_mat = _as_matrix(factor, "factor")
        anchor_v = _as_vector(anchor, "anchor")
        if a_mat.shape[1] != anchor_v.numel():
            raise ValueError(f"factor has {a_mat.shape[1]} columns but the anchor has {anchor_v.numel()} entries")
        lam, vecs = torch.linalg.eigh(a_mat @ a_mat.T)
        keep = _rank_cut(lam, max(a_mat.shape), rank_rtol)
        lam, vecs = lam[keep], vecs[:, keep]
        u = (a_mat.T @ vecs) / torch.sqrt(lam)
        return cls(lam, u, anchor_v)

    @classmethod
    def from_matrix(
        cls, matrix: torch.Tensor, anchor: torch.Tensor, *, rank_rtol: float | None = None
    ) -> "QuadraticRegion":
        """From a dense symmetric positive semi-definite G `[D, D]` (small D: a D³ eigendecomposition)."""
        g = _as_matrix(matrix, "matrix")
        if g.shape[0] != g.shape[1] or not torch.allclose(g, g.T, rtol=1e-10, atol=1e-12 * float(g.abs().max())):
            raise ValueError(f"matrix must be square and symmetric, got shape {tuple(g.shape)}")
        lam, vecs = torch.linalg.eigh(0.5 * (g + g.T))
        keep = _rank_cut(lam, g.shape[0], rank_rtol)
        return cls(lam[keep], vecs[:, keep], anchor)

    def delta(self, points: torch.Tensor) -> torch.Tensor:
        """Δ_G at `[B, D]` (or `[D]`) points: `[B]` (or `[]`) values ½ Σ_j λ_j (u_jᵀ(θ − θ0))², float64; usable as
        a batched behaviour of the estimator."""
        pts = points.detach().to(device="cpu", dtype=torch.float64)
        if pts.shape[-1] != self.dim:
            raise ValueError(f"points must have {self.dim} columns, got shape {tuple(points.shape)}")
        coords = (pts - self.anchor) @ self.eigenvectors
        return 0.5 * torch.sum(self.eigenvalues * coords * coords, dim=-1)

    def chi2_parameters(
        self, *, mean: Union[float, torch.Tensor] = 0.0, sigma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, d2): `[k]` weights a_j = λ_j σ² and non-centralities d_j² = (u_jᵀ(m − θ0)/σ)² of the prior
        N(m, σ² I) (m: a number, broadcast, or a `[D]` tensor)."""
        sigma = _positive_float(sigma, "sigma")
        offset = self._prior_offset(mean)
        d = (offset @ self.eigenvectors) / sigma
        return self.eigenvalues * sigma**2, d * d

    def _prior_offset(self, mean: Union[float, torch.Tensor]) -> torch.Tensor:
        if isinstance(mean, torch.Tensor):
            m = mean.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            if m.numel() == 1:
                m = m.expand(self.dim)
            if m.numel() != self.dim:
                raise ValueError(f"mean must be a number or have {self.dim} entries, got {m.numel()}")
        elif isinstance(mean, (int, float, np.floating, np.integer)) and not isinstance(mean, bool):
            m = torch.full((self.dim,), float(mean), dtype=torch.float64)
        else:
            raise TypeError(f"mean must be a number or a tensor, got {type(mean).__name__}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError("mean has non-finite entries")
        return m - self.anchor

    def log_prior_mass(self, *, mean: Union[float, torch.Tensor] = 0.0, sigma: float, cutoff: float) -> float:
        """log P_{θ ~ N(m, σ² I)}(Δ_G(θ) ≤ ε) = log P(Σ_j a_j (z_j + d_j)² ≤ 2ε) (nats), by the saddlepoint formula
        (:func:`log_prob_weighted_chi2_below`). A rank-0 region (G = 0) has mass 1, log 0."""
        cutoff = _positive_float(cutoff, "cutoff")
        a, d2 = self.chi2_parameters(mean=mean, sigma=sigma)
        if self.rank == 0:
            return 0.0
        return log_prob_weighted_chi2_below(a, d2, 2.0 * cutoff)

    def saddlepoint(self, *, mean: Union[float, torch.Tensor] = 0.0, sigma: float, cutoff: float) -> float:
        """ŝ with K'(ŝ) = 2ε for this prior: the tilt of the curvature-matched proposal N(μ_s, Σ_s)."""
        a, d2 = self.chi2_parameters(mean=mean, sigma=sigma)
        return solve_saddlepoint(a, d2, 2.0 * _positive_float(cutoff, "cutoff"))


def tilted_log_prior_mass_mc(
    region: QuadraticRegion,
    *,
    mean: Union[float, torch.Tensor] = 0.0,
    sigma: float,
    cutoff: float,
    n_samples: int = 256,
    seed: int = 0,
    behavior: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tilt: float | None = None,
    batch_size: int = 64,
) -> TiltedEstimate:
    """Unbiased importance-sampling estimate of P_{θ ~ N(m, σ² I)}(Δ(θ) ≤ ε) with points θ drawn in the full
    D-space from the prior tilted by exp(ŝ · 2Δ_G(θ)), i.e. θ − θ0 ~ N(μ_s, Σ_s), Σ_s = (I/σ² − 2ŝG)⁻¹,
    μ_s = Σ_s (m − θ0)/σ² (only the k eigen-coordinates differ from the prior; G's null space keeps the prior).

    The weight p(θ)/q(θ) depends only on the eigen-coordinates and is written from the two Gaussian densities;
    membership is decided by ``behavior`` evaluated at the sampled points (default: ``region.delta``, which checks
    the saddlepoint answer; a real behaviour, e.g. the network's KL, gives an unbiased estimate of the true region's
    prior mass with this curvature-matched proposal). The weight is e^{K(ŝ) − ŝQ}, Q = 2Δ_G(θ): bounded by
    e^{K(ŝ) − 2ŝε} where Δ_G ≤ ε, but unbounded where a behaviour admits points with Δ_G > ε, and then of finite
    variance only if |ŝ| < 1/(2 max a) — typically not at the saddlepoint. With a behaviour whose region reaches
    beyond the quadratic one, check ``ess`` (or pass a milder ``tilt``).

    Args:
        region: the quadratic model; mean, sigma: the prior N(m, σ² I); cutoff: ε (behaviour units).
        n_samples: number of points; seed: seed of the private generator (points do not depend on batch_size).
        behavior: batched `[B, D] → [B]` Δ; tilt: ŝ (default: the saddlepoint of the quadratic model).
        batch_size: points per behaviour call. Memory: batch_size · (2D + k) float64 plus the behaviour's own.
    """
    cutoff = _positive_float(cutoff, "cutoff")
    n_samples = _check_count(n_samples, "n_samples", minimum=2)
    batch_size = _check_count(batch_size, "batch_size", minimum=1)
    fn = region.delta if behavior is None else behavior
    a, d2 = region.chi2_parameters(mean=mean, sigma=sigma)
    offset = region._prior_offset(mean)
    d = (offset @ region.eigenvectors) / sigma
    if region.rank == 0:
        s, var = 0.0, torch.ones(0, dtype=torch.float64)
    else:
        s = _saddlepoint(a, d2, 2.0 * cutoff)[0] if tilt is None else float(tilt)
        var = _tilt_variance(a, s)
    gen = torch.Generator().manual_seed(int(seed))
    log_w = torch.empty(n_samples, dtype=torch.float64)
    for start in range(0, n_samples, batch_size):
        stop = min(start + batch_size, n_samples)
        # One row at a time from the generator, so sample i is the same whatever the batch size.
        z = torch.stack([torch.randn(region.dim, generator=gen, dtype=torch.float64) for _ in range(start, stop)])
        c = z @ region.eigenvectors
        y = d * var + torch.sqrt(var) * c  # tilted eigen-coordinates; the prior's would be c + d
        points = region.anchor + offset + sigma * (z + (y - c - d) @ region.eigenvectors.T)
        values = torch.as_tensor(fn(points)).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if values.numel() != stop - start:
            raise ValueError(f"behavior returned {values.numel()} values for {stop - start} points")
        inside = values <= cutoff  # NaN counts as outside
        log_w[start:stop] = torch.where(inside, _log_ratio(y, d, var), torch.full_like(values, -math.inf))
    return _summarize(log_w, s)


__all__ = [
    "QuadraticRegion",
    "TiltedEstimate",
    "log_prob_weighted_chi2_below",
    "solve_saddlepoint",
    "tilted_log_prior_mass_mc",
    "tilted_log_prob_weighted_chi2_below_mc",
    "weighted_chi2_cgf",
]
