"""Pareto-k̂: how heavy the upper tail of the importance weights is, and whether the estimate can be trusted.

The log-volume estimate is a log-mean-exp of ``[S]`` per-direction log estimates ``est_s`` (nats); each
``est_s = log f(w_s) + log(importance weight)``, so the numbers whose upper tail decides the reliability of the
mean are the weights ``r_s = exp(est_s)``. Following Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed
Importance Sampling" (JMLR 25(72), 2024; arXiv:1507.02646), the tail is summarised by the shape k of a
generalized Pareto distribution (GPD)

    F(x) = 1 − (1 + k x / σ)^(−1/k),    x = r − u > 0 (exceedance over a threshold u),

fitted to the largest weights. If the weights' tail has shape k, their moments of order < 1/k exist: k < 1/2
means a finite variance (a standard error from the spread of the weights means something), 1/2 ≤ k < 1 a
finite mean but infinite variance, and k ≥ 1 a tail so heavy that at the sample size in hand the draws behave
as if the mean were infinite. With heavy tails the sample mean is usually *below* the true mean, often far below:
much of the mass sits in rare huge weights that a finite sample tends to miss.

Recipe (the paper's §3 and Appendix H, as its reference implementation does it):

* tail length M = ⌈min(S/5, 3√S)⌉ (``pareto_tail_length``; independent draws, so the relative efficiency is 1);
* threshold u = the (M+1)-th largest weight; the GPD is fitted to the exceedances r − u of the M largest;
* fit: Zhang & Stephens (2009, §4), an empirical-Bayes posterior mean of θ = −k/σ over a fixed grid of
  ``ZS_GRID_MIN_POINTS + ⌊√M⌋`` values, then k̂ = mean(log(1 − θ̂ x)) (their k is our −k);
* a weakly informative prior pulls k̂ towards 1/2 with the weight of ``PRIOR_PSEUDO_DRAWS`` = 10 draws:
  k̂ ← (M k̂ + 10 · 0.5)/(M + 10). The paper adds it to stabilise k̂ for small M; both reference
  implementations (R ``loo``/``posterior``, Python ``arviz-stats``) apply it by default, and so does this module,
  so that the thresholds below mean what the paper means by them.

Interpretation (the paper's §3.2.3 eq. 11 and §3.2.4 eq. 13), with k_S = min(1 − 1/log10 S, 0.7):

* k̂ < k_S: ``"good"``;
* k_S ≤ k̂ < 0.7 (only possible for S < 10^(10/3) ≈ 2154): ``"unreliable_sample_size"``: about
  S_min = 10^(1/(1 − max(k̂, 0))) draws are needed;
* k̂ ≥ 0.7: ``"unreliable"``: bias dominates and more draws do not help in practice; a better proposal does;
* fewer than ``MIN_TAIL_DRAWS`` = 5 tail draws (S ≤ 20, or ties): ``"too_few_samples"``, k̂ = NaN.

The paper's thresholds are stated for the Pareto-*smoothed* estimate. The plain log-mean-exp is worse for the
same tail; in particular for k̂ ≥ 1/2 its spread-based error bars are not valid (``variance_finite`` says so).

Everything is computed in log space (the exceedances and the Zhang–Stephens grid are handled through their
logarithms), so weights spread over thousands of nats neither overflow nor lose the tail. Only numpy and math.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

__all__ = [
    "KHAT_FINITE_VARIANCE",
    "KHAT_UNRELIABLE",
    "MIN_TAIL_DRAWS",
    "PRIOR_KHAT",
    "PRIOR_PSEUDO_DRAWS",
    "ZS_GRID_MIN_POINTS",
    "ZS_PRIOR_SCALE",
    "ParetoDiagnostic",
    "Reliability",
    "pareto_khat",
    "pareto_khat_threshold",
    "pareto_min_sample_size",
    "pareto_tail_length",
]

Reliability = Literal["good", "unreliable_sample_size", "unreliable", "too_few_samples"]

# Above this k̂ the Pareto-smoothed estimate's bias dominates whatever S is (the paper's §3.2.4); it also caps k_S.
KHAT_UNRELIABLE: Final[float] = 0.7
# Below this the weights have a finite variance, so an error bar from their spread is meaningful.
KHAT_FINITE_VARIANCE: Final[float] = 0.5
# Fewer exceedances than this and the reference implementations refuse to fit.
MIN_TAIL_DRAWS: Final[int] = 5
# Weakly informative prior on k: PRIOR_PSEUDO_DRAWS pseudo-exceedances with shape PRIOR_KHAT.
PRIOR_KHAT: Final[float] = 0.5
PRIOR_PSEUDO_DRAWS: Final[int] = 10
# Zhang & Stephens (2009, §4) grid: ZS_GRID_MIN_POINTS + ⌊√M⌋ points (they suggest 20; the PSIS reference code
# uses 30) spaced by their prior with scale ZS_PRIOR_SCALE = 3 around 1/x_(M).
ZS_GRID_MIN_POINTS: Final[int] = 30
ZS_PRIOR_SCALE: Final[float] = 3.0

_LOG10_FLOAT_MAX = math.log10(sys.float_info.max)


@dataclass(frozen=True)
class ParetoDiagnostic:
    """Pareto-k̂ reliability diagnostic of ``[n]`` log importance weights (Vehtari et al. 2024).

    khat: shape k̂ of the GPD fitted to the upper tail of the weights (with the weakly informative prior);
        ``-inf`` when the top ``M + 1`` weights are all equal (no upper tail: the weights are bounded there),
        NaN when there are too few tail draws to fit.
    n: S, the number of weights (−inf log weights, i.e. zero weights, included: they are draws too).
    tail_length: number of exceedances the GPD was fitted to: the M = ⌈min(S/5, 3√S)⌉ largest weights, minus
        any that equal the threshold (a tie is not an exceedance).
    threshold: k_S = min(1 − 1/log10 S, 0.7) (eq. 13); −inf for S = 1.
    min_sample_size: S_min = 10^(1/(1 − max(k̂, 0))) (eq. 11) needed for a reliable estimate at this k̂; +inf
        for k̂ ≥ 1, NaN when k̂ is NaN.
    variance_finite: k̂ < 1/2, i.e. the weights have a finite variance and a spread-based standard error of
        their mean (the bootstrap ±) is meaningful.
    reliability: ``"good"``, ``"unreliable_sample_size"``, ``"unreliable"`` or ``"too_few_samples"``.
    message: one sentence for logs and model cards.
    """

    khat: float
    n: int
    tail_length: int
    threshold: float
    min_sample_size: float
    variance_finite: bool
    reliability: Reliability
    message: str


# ----------------------------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------------------------


def _check_count(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass, but a count of True is a bug upstream.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def pareto_tail_length(n: int) -> int:
    """M = ⌈min(S/5, 3√S)⌉, the number of largest weights the GPD is fitted to (Vehtari et al. 2024, App. H).

    ``n`` is S ≥ 1. Integer arithmetic, so the switch at S = 225 (where S/5 = 3√S) is exact. This is the rounding
    of the paper's R ``loo::psis``; ``posterior`` and ``arviz-stats`` round down instead, which agrees whenever
    min(S/5, 3√S) is an integer (e.g. S = 100, 400, 900, 2500). Raises TypeError/ValueError naming the value
    for a non-int or S < 1.
    """
    s = _check_count("n", n, 1)
    fifth = -(-s // 5)
    root = math.isqrt(9 * s)  # ⌈3√S⌉ = ⌈√(9S)⌉
    three_root = root if root * root == 9 * s else root + 1
    return min(fifth, three_root)


def pareto_khat_threshold(n: int) -> float:
    """k_S = min(1 − 1/log10 S, 0.7), the sample-size-dependent k̂ threshold (Vehtari et al. 2024, eq. 13).

    Below k_S the estimate from S draws has a small probability of a large error. ``n`` is S ≥ 1; S = 1 gives
    −inf (no k̂ is acceptable from one draw), S ≤ 10 a threshold ≤ 0. Raises TypeError/ValueError naming the value.
    """
    s = _check_count("n", n, 1)
    if s == 1:
        return -math.inf
    return min(1.0 - 1.0 / math.log10(s), KHAT_UNRELIABLE)


def pareto_min_sample_size(khat: float) -> float:
    """S_min = 10^(1/(1 − max(k̂, 0))), the draws needed for a reliable estimate at k̂ (Vehtari et al. 2024, eq. 11).

    It inverts k_S = 1 − 1/log10 S; a bounded tail (k̂ ≤ 0) needs at least 10. Returns +inf for k̂ ≥ 1 (no
    sample size suffices) and NaN for NaN (k̂ not estimated). Raises TypeError for a non-number.
    """
    if isinstance(khat, (bool, np.bool_)) or not isinstance(khat, (int, float, np.integer, np.floating)):
        raise TypeError(f"khat must be a real number, got {khat!r} ({type(khat).__name__})")
    k = float(khat)
    if math.isnan(k):
        return math.nan
    if k >= 1.0:
        return math.inf
    exponent = 1.0 / (1.0 - max(k, 0.0))
    # k̂ within ~3e-3 of 1 asks for more than float64 can count: that is +inf for every practical purpose.
    return math.inf if exponent > _LOG10_FLOAT_MAX else 10.0**exponent


# ----------------------------------------------------------------------------------------------------------------
# Generalized Pareto fit (Zhang & Stephens 2009) in log space
# ----------------------------------------------------------------------------------------------------------------


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 − e^x) for x < 0 (Mächler 2012: expm1 near 0, log1p far from it); 0 at −inf."""
    with np.errstate(divide="ignore"):
        near = x > -math.log(2.0)
        return np.where(near, np.log(-np.expm1(np.where(near, x, -1.0))), np.log1p(-np.exp(np.where(near, -1.0, x))))


def _log1p_scaled(d: np.ndarray, log_r: np.ndarray) -> np.ndarray:
    """``[G, m]`` log(1 + d_j r_i) with r_i = e^{log_r_i}, for d_j r_i > −1 and any size of r_i.

    For d_j > 0 this is logaddexp(0, log d_j + log r_i): no overflow however large r_i is. Rows with d_j ≤ 0 use
    log1p(d_j r_i) directly; the caller guarantees that r_i is then moderate (``_zs_shape``: r_i ≤ 1/c_min).
    """
    out = np.empty((d.size, log_r.size), dtype=np.float64)
    pos = d > 0
    if pos.any():
        out[pos] = np.logaddexp(0.0, np.log(d[pos])[:, None] + log_r[None, :])
    if (~pos).any():
        out[~pos] = np.log1p(d[~pos][:, None] * np.exp(log_r)[None, :])
    return out


def _zs_shape(log_x: np.ndarray) -> float:
    """Zhang–Stephens estimate of the GPD shape k (heavy tail: k > 0) from ``[m]`` ascending log exceedances.

    Zhang & Stephens (2009, §4) average θ = −k/σ over the grid θ_j = 1/x_(m) − c_j/x*, with
    c_j = (√(G/(j − 1/2)) − 1)/3 > 0, j = 1..G, and x* the first quartile x_(⌊m/4 + 1/2⌋), weighting each θ_j by
    its profile likelihood exp(l(θ_j)), l(θ) = m [log(−θ/k(θ)) − k(θ) − 1], k(θ) = mean log(1 − θ x_i); then
    k̂ = k(θ̂). Writing r_i = x_i/x* and y* = x*/x_(m) ≤ 1 gives −θ_j x_i = d_j r_i with d_j = c_j − y*, and
    −θ_j = d_j/x*: everything depends on the data only through log r_i (differences of logs, never overflowing)
    and y*. The constant −log x* in l is dropped (it cancels in the weights). At d_j = 0 (θ_j = 0) the ratio
    −θ/k(θ) takes its limit 1/mean(x), i.e. d/k → 1/mean(r).
    """
    m = log_x.size
    g = ZS_GRID_MIN_POINTS + math.isqrt(m)
    j = np.arange(1, g + 1, dtype=np.float64)
    c = (np.sqrt(g / (j - 0.5)) - 1.0) / ZS_PRIOR_SCALE
    q = int(m / 4 + 0.5) - 1  # 0-based index of x_(⌊m/4 + 1/2⌋); m ≥ MIN_TAIL_DRAWS keeps it ≥ 0
    log_r = log_x - log_x[q]
    # y* ≤ c_j ⇔ d_j ≥ 0; when y* > c_j every r_i ≤ 1/y* < 1/c_j is moderate (the _log1p_scaled precondition), and
    # d_j r_i ≥ d_j / y* = c_j / y* − 1 > −1 keeps every logarithm finite.
    d = c - math.exp(log_x[q] - log_x[-1])
    k = _log1p_scaled(d, log_r).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(d / k)
    # d_j and k_j share their sign (log1p keeps it); they vanish together only at θ_j = 0 or on underflow.
    limit = -(np.logaddexp.reduce(log_r) - math.log(m))
    log_ratio = np.where((d != 0) & (k != 0), log_ratio, limit)
    profile = m * (log_ratio - k - 1.0)
    w = np.exp(profile - profile.max())
    d_hat = float(np.sum(w * d) / np.sum(w))
    return float(_log1p_scaled(np.array([d_hat]), log_r).mean())


# ----------------------------------------------------------------------------------------------------------------
# Diagnostic
# ----------------------------------------------------------------------------------------------------------------


def _as_log_weights(log_weights: Any) -> np.ndarray:
    try:
        lw = np.asarray(log_weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"log_weights must be a 1-D array of real numbers, got {type(log_weights).__name__}") from err
    if lw.ndim != 1 or lw.size == 0:
        raise ValueError(f"log_weights must be a non-empty 1-D array, got shape {lw.shape}")
    bad = np.isnan(lw) | np.isposinf(lw)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"log_weights[{i}] = {float(lw[i])!r}: log weights must be finite or -inf (a zero weight)")
    return lw


def _verdict(khat: float, n: int, threshold: float, min_ss: float, tail: int, nominal: int) -> tuple[Reliability, str]:
    """The paper's interpretation bands (§3.2.3–3.2.4) as a machine-friendly verdict and one sentence."""
    if math.isnan(khat):
        why = (f"S = {n} weights give a tail of M = {nominal} (S >= 21 gives 5)" if nominal < MIN_TAIL_DRAWS else
               f"only {tail} of the {nominal} largest of S = {n} weights exceed the tail threshold")
        return "too_few_samples", (
            f"{why}, but k̂ needs at least {MIN_TAIL_DRAWS} tail draws: the estimate's reliability is unknown"
        )
    if khat == -math.inf:
        return "good", f"the {nominal + 1} largest of S = {n} weights are equal: no upper tail (k̂ = -inf)"
    head = f"k̂ = {khat:.2f}"
    if khat >= 1.0:
        return "unreliable", (
            f"{head} >= 1: the weights behave as if they had no finite mean at S = {n}; the estimate is unreliable "
            "and likely far too low"
        )
    if khat >= KHAT_UNRELIABLE:
        return "unreliable", (
            f"{head} > {KHAT_UNRELIABLE}: the estimate is unreliable and likely far too low; more draws will not "
            "fix it in practice, a proposal closer to the target will"
        )
    if khat >= threshold:
        return "unreliable_sample_size", (
            f"{head} >= k_S = {threshold:.2f} for S = {n}: too few draws for this tail; the estimate is unreliable "
            f"and likely too low, about {math.ceil(min_ss)} draws are needed"
        )
    note = "" if khat < KHAT_FINITE_VARIANCE else (
        f", but k̂ >= {KHAT_FINITE_VARIANCE} means the weights have infinite variance, so an error bar from "
        "their spread understates the real uncertainty"
    )
    return "good", f"{head} < k_S = {threshold:.2f} for S = {n}: the tail of the weights is light enough{note}"


def pareto_khat(log_weights: np.ndarray, *, tail_length: int | None = None) -> ParetoDiagnostic:
    """Pareto-k̂ diagnostic of ``[S]`` log importance weights (nats), e.g. the per-direction log estimates.

    Fits a generalized Pareto distribution to the exceedances of the M largest weights e^{lw} over the (M+1)-th
    largest (Vehtari et al. 2024, §3 and App. H; fit of Zhang & Stephens 2009 plus the paper's weakly informative
    prior), and interprets k̂ with the paper's thresholds (§3.2.3–3.2.4); see the module docstring.

    log_weights: ``[S]`` log weights; −inf entries are zero weights and stay in the bulk (they count in S).
    tail_length: M, keyword-only override of ``pareto_tail_length(S)`` (an int with 1 ≤ M < S), e.g. to
        reproduce an implementation that rounds M differently.

    Invariant under adding a constant to every log weight (only differences enter) and under reordering.
    Raises ValueError naming the index of a NaN or +inf entry, for an empty or non-1-D input, or a bad
    tail_length; TypeError for non-numeric input.
    """
    lw = _as_log_weights(log_weights)
    n = lw.size
    m = pareto_tail_length(n) if tail_length is None else _check_count("tail_length", tail_length, 1)
    if tail_length is not None and m >= n:
        raise ValueError(f"tail_length must be < the number of weights {n}, got {tail_length!r}")
    threshold = pareto_khat_threshold(n)
    khat, fitted = math.nan, 0
    if m >= MIN_TAIL_DRAWS:
        top = np.sort(lw)[n - m - 1 :]  # threshold u, then the M largest (ascending)
        if top[-1] == top[0]:
            khat = -math.inf
        else:
            # Centring on the maximum first makes the result exactly shift-invariant whenever the shift is exact.
            top = top - top[-1]
            cut, tail = top[0], top[1:]
            tail = tail[tail > cut]  # a tie with the threshold is not an exceedance of it
            fitted = int(tail.size)
            if fitted >= MIN_TAIL_DRAWS:
                log_x = tail + _log1mexp(cut - tail)  # log(e^tail − e^cut), exact even when e^cut underflows
                k_zs = _zs_shape(log_x)
                khat = (fitted * k_zs + PRIOR_PSEUDO_DRAWS * PRIOR_KHAT) / (fitted + PRIOR_PSEUDO_DRAWS)
    min_ss = pareto_min_sample_size(khat)
    reliability, message = _verdict(khat, n, threshold, min_ss, fitted, m)
    return ParetoDiagnostic(
        khat=float(khat),
        n=n,
        tail_length=fitted,
        threshold=threshold,
        min_sample_size=min_ss,
        variance_finite=bool(khat < KHAT_FINITE_VARIANCE),
        reliability=reliability,
        message=message,
    )
