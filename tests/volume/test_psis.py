"""Pareto-k̂ diagnostic (Vehtari, Simpson, Gelman, Yao & Gabry, JMLR 2024, arXiv:1507.02646).

Oracles: exact thresholds (eqs. 11, 13, App. H); a 40-digit mpmath evaluation of the Zhang & Stephens (2009) fit
written straight from their §4 in linear space (no log-space algebra), which the float64 log-space code must
match; generalized Pareto draws of known shape with bands from the estimator's sampling spread; values from
``arviz-stats`` hard-coded below; and exact (bitwise) invariances.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfvolume.volume.psis import (
    KHAT_FINITE_VARIANCE,
    KHAT_UNRELIABLE,
    MIN_TAIL_DRAWS,
    PRIOR_KHAT,
    PRIOR_PSEUDO_DRAWS,
    ParetoDiagnostic,
    pareto_khat,
    pareto_khat_threshold,
    pareto_min_sample_size,
    pareto_tail_length,
)

# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def gpd_log_quantiles(n: int, xi: float) -> np.ndarray:
    """log of the generalized Pareto (σ = 1, shape ξ) quantiles at (i − 1/2)/n: deterministic, no RNG."""
    p = (np.arange(1, n + 1) - 0.5) / n
    return np.log(np.expm1(-xi * np.log1p(-p)) / xi)


def gpd_log_draws(n: int, xi: float, seed: int) -> np.ndarray:
    """log of n generalized Pareto (σ = 1, shape ξ) draws by inversion; u = 0 gives −inf (a zero weight)."""
    u = np.random.default_rng(seed).random(n)
    with np.errstate(divide="ignore"):
        return np.log(np.expm1(-xi * np.log1p(-u)) / xi)


def lognormal_log_quantiles(n: int, s: float) -> np.ndarray:
    """log of the log-normal(0, s²) quantiles at (i − 1/2)/n, i.e. s Φ⁻¹((i − 1/2)/n)."""
    return np.array([s * NormalDist().inv_cdf((i - 0.5) / n) for i in range(1, n + 1)])


def mp_khat(log_weights: np.ndarray, m: int) -> float:
    """Reference k̂: Zhang & Stephens (2009, §4) on the exceedances e^{lw} − e^{u}, in 40-digit linear space.

    θ_j = 1/x_(n) + (1 − √(G/(j − 1/2)))/(3 x*), G = 30 + ⌊√n⌋, x* = x_(⌊n/4 + 1/2⌋); profile log-likelihood
    l(θ) = n (log(−θ/k(θ)) − k(θ) − 1), k(θ) = mean log(1 − θ x); θ̂ = Σ θ_j e^{l_j}/Σ e^{l_j}; k̂ = k(θ̂), then
    the paper's prior: (n k̂ + 10 · 0.5)/(n + 10). mpmath's exponent range makes e^{−10⁴} an ordinary number.
    """
    with mpmath.workdps(40):
        top = sorted(float(v) for v in log_weights)[-(m + 1) :]
        cut = mpmath.mpf(top[0])
        x = [mpmath.exp(mpmath.mpf(t)) - mpmath.exp(cut) for t in top[1:] if t > top[0]]
        n = len(x)
        g = 30 + math.isqrt(n)
        x_star = x[int(n / 4 + 0.5) - 1]
        thetas = [1 / x[-1] + (1 - mpmath.sqrt(mpmath.mpf(g) / (j - mpmath.mpf("0.5")))) / (3 * x_star)
                  for j in range(1, g + 1)]

        def k_of(theta: mpmath.mpf) -> mpmath.mpf:
            return mpmath.fsum(mpmath.log1p(-theta * xi) for xi in x) / n

        ks = [k_of(t) for t in thetas]
        prof = [n * (mpmath.log(-t / k) - k - 1) for t, k in zip(thetas, ks)]
        top_l = max(prof)
        w = [mpmath.exp(v - top_l) for v in prof]
        theta_hat = mpmath.fsum(wi * t for wi, t in zip(w, thetas)) / mpmath.fsum(w)
        k_hat = k_of(theta_hat)
        return float((n * k_hat + PRIOR_PSEUDO_DRAWS * PRIOR_KHAT) / (n + PRIOR_PSEUDO_DRAWS))


def same_diagnostic(a: ParetoDiagnostic, b: ParetoDiagnostic) -> bool:
    """Field-wise equality in which NaN equals NaN (dataclass == would say NaN != NaN)."""
    for name in ParetoDiagnostic.__dataclass_fields__:
        u, v = getattr(a, name), getattr(b, name)
        if isinstance(u, float) and math.isnan(u):
            if not (isinstance(v, float) and math.isnan(v)):
                return False
        elif u != v:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Thresholds (closed form)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    # ⌈min(S/5, 3√S)⌉: S/5 rules up to S = 225, 3√S beyond; 20 → 4 < 5 tail draws, 21 → 5.
    [(1, 1), (20, 4), (21, 5), (25, 5), (100, 20), (225, 45), (226, 46), (400, 60), (1000, 95), (4096, 192),
     (10**6, 3000)],
)
def test_tail_length(n: int, expected: int) -> None:
    assert pareto_tail_length(n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    # min(1 − 1/log10 S, 0.7): 0 at S = 10, 1/2 at S = 100, 2/3 at S = 1000, capped at 0.7 from S = 10^(10/3).
    [(1, -math.inf), (10, 0.0), (100, 0.5), (1000, 2.0 / 3.0), (2154, 1.0 - 1.0 / math.log10(2154)), (2155, 0.7),
     (10**4, 0.7)],
)
def test_khat_threshold(n: int, expected: float) -> None:
    assert pareto_khat_threshold(n) == pytest.approx(expected, rel=1e-15, abs=1e-15)


@pytest.mark.parametrize(
    ("khat", "expected"),
    # 10^(1/(1 − max(k, 0))): the inverse of k_S; 10 for a bounded tail, +inf from k = 1 on.
    [(-math.inf, 10.0), (-0.5, 10.0), (0.0, 10.0), (0.5, 100.0), (2.0 / 3.0, 1000.0), (0.75, 1e4), (0.999, math.inf),
     (1.0, math.inf), (3.0, math.inf)],
)
def test_min_sample_size(khat: float, expected: float) -> None:
    assert pareto_min_sample_size(khat) == pytest.approx(expected, rel=1e-12)


def test_min_sample_size_inverts_threshold() -> None:
    for n in (20, 100, 500, 2000):
        assert pareto_min_sample_size(pareto_khat_threshold(n)) == pytest.approx(n, rel=1e-12)
    assert math.isnan(pareto_min_sample_size(math.nan))


@pytest.mark.parametrize("bad", [0, -3])
def test_counts_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        pareto_tail_length(bad)
    with pytest.raises(ValueError, match=str(bad)):
        pareto_khat_threshold(bad)


@pytest.mark.parametrize("bad", [True, 10.0, "10", None])
def test_counts_must_be_ints(bad: object) -> None:
    with pytest.raises(TypeError, match="n must be an int"):
        pareto_tail_length(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n must be an int"):
        pareto_khat_threshold(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="khat"):
        pareto_min_sample_size("0.5")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Known shape: generalized Pareto draws
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xi", [0.3, 0.9])
def test_khat_of_pareto_draws_lands_in_band(xi: float) -> None:
    """k̂ of S = 1000 GPD(ξ) draws, 8 seeds, within 4 standard errors of its expectation.

    Band: given the (M+1)-th largest draw u, the M = 95 largest minus u are iid GPD(ξ, 1 + ξu) (threshold
    stability), so only the fit's spread on M draws matters. Zhang & Stephens' estimator is asymptotically
    efficient, with the GPD maximum-likelihood standard deviation (1 + ξ)/√M (valid for ξ > −1/2); the prior maps
    k ↦ (M k + 5)/(M + 10), so E k̂ ≈ (M ξ + 5)/(M + 10) and sd ≈ (1 + ξ)/√M · M/(M + 10). Each seed must lie
    within 4 sd, the mean of the 8 within 4 sd/√8.
    """
    n, seeds = 1000, range(8)
    m = pareto_tail_length(n)
    mean = (m * xi + PRIOR_PSEUDO_DRAWS * PRIOR_KHAT) / (m + PRIOR_PSEUDO_DRAWS)
    sd = (1.0 + xi) / math.sqrt(m) * m / (m + PRIOR_PSEUDO_DRAWS)
    khats = np.array([pareto_khat(gpd_log_draws(n, xi, seed)).khat for seed in seeds])
    assert np.all(np.abs(khats - mean) < 4.0 * sd), (khats, mean, sd)
    assert abs(khats.mean() - mean) < 4.0 * sd / math.sqrt(len(seeds)), (khats.mean(), mean, sd)


def test_light_and_heavy_tails_are_told_apart() -> None:
    """At S = 4096 (M = 192) the expected k̂ of ξ = 0.3 and 0.9 (0.310, 0.880) are 3.6 combined sds apart."""
    for seed in range(4):
        light = pareto_khat(gpd_log_draws(4096, 0.3, 100 + seed))
        heavy = pareto_khat(gpd_log_draws(4096, 0.9, 200 + seed))
        assert light.khat < heavy.khat
        # 0.3's band: mean 0.310, sd 0.089, so 0.7 is 4.4 sd away: the verdict is "good" at k_S = 0.7.
        assert light.reliability == "good"


# ----------------------------------------------------------------------------------------------------------------
# Oracles: mpmath (exact arithmetic of the same estimator) and arviz-stats
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log_weights", "label"),
    [
        (gpd_log_draws(1000, 0.3, 1), "gpd 0.3"),
        (gpd_log_draws(400, 0.9, 2), "gpd 0.9"),
        (lognormal_log_quantiles(300, 2.0), "lognormal"),
        (np.linspace(0.0, 1.0, 200), "bounded"),  # e^U: a bounded tail, k̂ < 0
        # 10⁴ nats over S = 100: the 20 tail weights are ~100 nats apart, so in linear space (float64) all but the
        # top few exceedances, x* among them, underflow to 0 relative to the largest.
        (np.random.default_rng(7).random(100) * 1e4, "spread 1e4"),
        (np.random.default_rng(8).random(1000) * 1e4, "spread 1e4, S = 1000"),
    ],
)
def test_matches_linear_space_reference(log_weights: np.ndarray, label: str) -> None:
    """float64 log-space k̂ equals the 40-digit linear-space Zhang–Stephens fit.

    Tolerance 1e-9 relative: the float64 path rounds each log weight difference (≤ 1e4 nats) to ~1e-12 absolute,
    and k̂ is an average of such logarithms, so its error is ~1e-12·max(1, |k̂|); 1e-9 leaves a margin of 1e3.
    """
    got = pareto_khat(log_weights)
    want = mp_khat(log_weights, pareto_tail_length(log_weights.size))
    assert math.isfinite(got.khat), label
    assert got.khat == pytest.approx(want, rel=1e-9, abs=1e-9), label


# k̂ from arviz-stats 0.8.0 (numpy 2.4.6, scipy 1.17.1) in a throwaway venv:
#     from arviz_stats.base.array import array_stats
#     array_stats.psislw(-log_weights, r_eff=1)[1]
# with log_weights built by the helpers above. arviz-stats takes M = ⌊min(S/5, 3√S)⌋, equal to this module's
# ⌈·⌉ at S = 100, 400, 900, 2500; at S = 1000 (⌊·⌋ = 94) tail_length=94 reproduces it. Tolerance 1e-12:
# float64 rounding of algebraically equal expressions, with a margin of 1e3.
ARVIZ_KHAT = [
    ("gpd", 100, 0.3, None, 0.37726986816579644),
    ("gpd", 100, 0.9, None, 0.7205967434897371),
    ("gpd", 100, 1.5, None, 1.064675269886348),
    ("gpd", 400, 0.3, None, 0.3356083205823177),
    ("gpd", 400, 0.9, None, 0.8183704168942144),
    ("gpd", 400, 1.5, None, 1.301267567305994),
    ("gpd", 900, 0.3, None, 0.32431847403705594),
    ("gpd", 900, 0.9, None, 0.8409727581046098),
    ("gpd", 900, 1.5, None, 1.3577961368109308),
    ("gpd", 2500, 0.3, None, 0.31537268486599646),
    ("gpd", 2500, 0.9, None, 0.8629530465386989),
    ("gpd", 2500, 1.5, None, 1.4104313465481852),
    ("lognormal", 900, 1.0, None, 0.2927757975717472),
    ("lognormal", 900, 3.0, None, 1.0557779341761124),
    ("lognormal", 1000, 1.0, 94, 0.2904924281456561),
    ("lognormal", 1000, 3.0, 94, 1.049379941573825),
]


@pytest.mark.parametrize(("family", "n", "shape", "tail_length", "expected"), ARVIZ_KHAT)
def test_matches_arviz_stats(family: str, n: int, shape: float, tail_length: int | None, expected: float) -> None:
    lw = gpd_log_quantiles(n, shape) if family == "gpd" else lognormal_log_quantiles(n, shape)
    assert pareto_khat(lw, tail_length=tail_length).khat == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Verdicts for constructed cases
# ----------------------------------------------------------------------------------------------------------------


def test_verdict_good() -> None:
    d = pareto_khat(gpd_log_quantiles(900, 0.3))  # k̂ = 0.324 (arviz value above) < k_S = 0.661
    assert d.reliability == "good" and d.variance_finite
    assert d.n == 900 and d.tail_length == 90 and d.threshold == pytest.approx(1 - 1 / math.log10(900))
    assert d.min_sample_size == pytest.approx(10 ** (1 / (1 - d.khat)))
    assert d.message.startswith("k̂ = 0.32 < k_S = 0.66")


def test_verdict_good_with_infinite_variance_is_flagged() -> None:
    d = pareto_khat(gpd_log_quantiles(2500, 0.6))
    assert KHAT_FINITE_VARIANCE <= d.khat < d.threshold == KHAT_UNRELIABLE
    assert d.reliability == "good" and not d.variance_finite
    assert "infinite variance" in d.message


def test_verdict_unreliable_sample_size() -> None:
    d = pareto_khat(gpd_log_quantiles(100, 0.6))  # k̂ ≈ 0.55: above k_S(100) = 0.5, below 0.7
    assert d.threshold <= d.khat < KHAT_UNRELIABLE
    assert d.reliability == "unreliable_sample_size"
    assert d.min_sample_size > 100
    assert f"about {math.ceil(d.min_sample_size)} draws" in d.message


def test_verdict_unreliable() -> None:
    d = pareto_khat(gpd_log_quantiles(900, 0.9))  # k̂ = 0.841
    assert d.reliability == "unreliable" and not d.variance_finite
    assert d.message.startswith("k̂ = 0.84 > 0.7: the estimate is unreliable and likely far too low")
    heavier = pareto_khat(gpd_log_quantiles(900, 1.5))  # k̂ = 1.358
    assert heavier.reliability == "unreliable" and heavier.min_sample_size == math.inf
    assert heavier.message.startswith("k̂ = 1.36 >= 1")


@pytest.mark.parametrize("n", [1, 2, 16, 20])
def test_too_few_draws(n: int) -> None:
    d = pareto_khat(np.arange(n, dtype=np.float64))
    assert pareto_tail_length(n) < MIN_TAIL_DRAWS
    assert math.isnan(d.khat) and math.isnan(d.min_sample_size)
    assert d.reliability == "too_few_samples" and d.tail_length == 0 and not d.variance_finite
    assert "needs at least 5 tail draws" in d.message


def test_too_few_exceedances_when_most_weights_are_zero() -> None:
    """Three nonzero weights among 100: the threshold is a zero weight and only 3 draws exceed it."""
    lw = np.full(100, -np.inf)
    lw[[5, 50, 95]] = [1.0, 2.0, 3.0]
    d = pareto_khat(lw)
    assert d.reliability == "too_few_samples" and d.tail_length == 3
    assert d.message.startswith("only 3 of the 20 largest")


@pytest.mark.parametrize("value", [0.0, -1234.5, -np.inf])
def test_equal_weights_have_no_tail(value: float) -> None:
    d = pareto_khat(np.full(50, value))
    assert d.khat == -math.inf and d.reliability == "good" and d.variance_finite
    assert d.tail_length == 0 and d.min_sample_size == 10.0


def test_ties_with_the_threshold_are_not_exceedances() -> None:
    """The 30 largest of 100 are a block of 25 equal weights and 5 distinct ones: M = 20, so u is in the block."""
    lw = np.concatenate([np.linspace(-5.0, -1.0, 70), np.zeros(25), [1.0, 2.0, 3.5, 4.0, 6.0]])
    d = pareto_khat(lw)
    assert d.tail_length == 5
    assert d.khat == pytest.approx(mp_khat(lw, 20), rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Zero weights, invariances, log-space robustness
# ----------------------------------------------------------------------------------------------------------------


def test_zero_weights_stay_in_the_bulk() -> None:
    """−inf entries below the threshold change nothing but S: the same as any smaller finite value there."""
    lw = gpd_log_quantiles(1000, 0.5)
    lw[:100] = -np.inf
    finite = lw.copy()
    finite[:100] = -1e6
    assert same_diagnostic(pareto_khat(lw), pareto_khat(finite))


def test_zero_weight_threshold_means_plain_weights() -> None:
    """With the threshold at a zero weight the exceedances are the weights themselves: identical to a threshold
    1e6 nats lower (e^{−1e6} vanishes exactly next to any weight)."""
    lw = np.full(200, -np.inf)
    lw[:30] = gpd_log_quantiles(30, 0.5)  # M = 40 > 30 nonzero weights
    low = lw.copy()
    low[30:] = -1e6
    got, ref = pareto_khat(lw), pareto_khat(low)
    assert got.tail_length == ref.tail_length == 30
    assert got.khat == ref.khat
    assert got.khat == pytest.approx(mp_khat(lw, 40), rel=1e-9)


def test_spread_over_ten_thousand_nats_is_finite_and_shift_invariant() -> None:
    # Multiples of 2^-20 below 2^14 in magnitude: adding 5000 or −20000 is exact in float64, so the centred
    # weights, and therefore k̂, must agree bit for bit.
    raw = np.random.default_rng(3).random(500) * 1e4
    lw = np.round(raw * 2.0**20) / 2.0**20
    d = pareto_khat(lw)
    assert math.isfinite(d.khat) and d.reliability == "unreliable"
    for shift in (5000.0, -20000.0):
        assert same_diagnostic(pareto_khat(lw + shift), d)
    assert d.khat == pytest.approx(mp_khat(lw, pareto_tail_length(lw.size)), rel=1e-9)


_dyadic = st.integers(min_value=-(2**22), max_value=2**22).map(lambda i: i / 2.0**10)
_dyadic_or_zero_weight = st.one_of(_dyadic, _dyadic, _dyadic, st.just(-math.inf))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(_dyadic_or_zero_weight, min_size=21, max_size=300),
    shift=st.integers(min_value=-(2**20), max_value=2**20),
)
def test_shift_invariance_is_exact(values: list[float], shift: int) -> None:
    # Log weights are multiples of 2^-10 below 2^12 and shifts integers below 2^20: every sum and the centring
    # are exact in float64, so the diagnostic must not change in a single bit.
    lw = np.array(values)
    assert same_diagnostic(pareto_khat(lw + float(shift)), pareto_khat(lw))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), values=st.lists(_dyadic_or_zero_weight, min_size=21, max_size=300))
def test_permutation_invariance_is_exact(data: st.DataObject, values: list[float]) -> None:
    permuted = data.draw(st.permutations(values))
    assert same_diagnostic(pareto_khat(np.array(permuted)), pareto_khat(np.array(values)))


_real = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.one_of(_real, _real, _real, st.just(-math.inf)), min_size=1, max_size=400))
def test_never_a_silent_nan_and_verdict_follows_bands(values: list[float]) -> None:
    lw = np.array(values)
    d = pareto_khat(lw)
    assert d.n == lw.size and 0 <= d.tail_length <= pareto_tail_length(lw.size)
    assert math.isnan(d.khat) == (d.reliability == "too_few_samples")
    assert d.variance_finite == (d.khat < KHAT_FINITE_VARIANCE)
    if not math.isnan(d.khat):
        band = ("unreliable" if d.khat >= KHAT_UNRELIABLE
                else "unreliable_sample_size" if d.khat >= d.threshold else "good")
        assert d.reliability == band
        assert d.tail_length >= MIN_TAIL_DRAWS or d.khat == -math.inf


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "index"), [(math.nan, 7), (math.inf, 3)])
def test_rejects_nan_and_plus_inf_naming_index(bad: float, index: int) -> None:
    lw = np.zeros(50)
    lw[index] = bad
    with pytest.raises(ValueError, match=rf"log_weights\[{index}\] = {bad!r}"):
        pareto_khat(lw)


@pytest.mark.parametrize("bad", [np.zeros((5, 5)), np.zeros(0), np.float64(1.0)])
def test_rejects_non_vectors(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="non-empty 1-D"):
        pareto_khat(bad)


def test_rejects_non_numbers() -> None:
    with pytest.raises(TypeError, match="real numbers"):
        pareto_khat(["a", "b"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("tail_length", "error"), [(0, ValueError), (100, ValueError), (True, TypeError),
                                                    (5.0, TypeError)])
def test_rejects_bad_tail_length(tail_length: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="tail_length"):
        pareto_khat(np.arange(100.0), tail_length=tail_length)  # type: ignore[arg-type]
