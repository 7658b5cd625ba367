"""The quadratic-region oracle: weighted non-central χ² CGF, saddlepoint, Lugannani–Rice, tilted sampling.

Known answers: Q = a χ²_k (equal weights, d = 0) has P(Q ≤ q) = P(k/2, q/(2a)), the regularized lower incomplete
gamma function (computed with mpmath). For it, the Lugannani–Rice error is bounded by the Stirling remainder of
Γ(k/2): in the far lower tail the approximation tends to P · Γ(k/2)/Γ̂(k/2), Γ̂(α) = √(2π) α^{α−½} e^{−α}, and
0 < log Γ(α) − log Γ̂(α) < 1/(12α) = 1/(6k). Monte Carlo bands are k standard errors of the estimates.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfvolume.volume.quadratic import (
    QuadraticRegion,
    _lugannani_rice_log,
    log_prob_weighted_chi2_below,
    solve_saddlepoint,
    tilted_log_prior_mass_mc,
    tilted_log_prob_weighted_chi2_below_mc,
    weighted_chi2_cgf,
)

KS = (1, 2, 3, 5, 10, 30, 100, 300, 1000)
LOG_P_MIN, LOG_P_MAX = math.log(1e-300), math.log(0.5)
# Worst-case Lugannani–Rice error for k_eff ≥ 1 terms: the k = 1 Stirling remainder, log Γ(½) − log Γ̂(½) < 1/6.
LR_ERROR_ANY_K = 1.0 / 6.0


def _log_gamma_cdf(k: int, x: float) -> float:
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        return float(mpmath.log(mpmath.gammainc(mpmath.mpf(k) / 2, 0, mpmath.mpf(x) / 2, regularized=True)))


def _stirling_remainder(alpha: float) -> float:
    """log Γ(α) − log(√(2π) α^{α−½} e^{−α}), in (0, 1/(12α))."""
    return math.lgamma(alpha) - (0.5 * math.log(2 * math.pi) + (alpha - 0.5) * math.log(alpha) - alpha)


def _grid(k: int) -> list[tuple[float, float]]:
    """(x, exact log P(χ²_k ≤ x)) on a log grid of x whose probabilities span [1e-300, 0.5] (as far as x ≥ 1e-300
    is representable: k = 1 reaches 1e-150)."""
    lo = max(-600.0 / k + math.log10(k) - 1.0, -300.0)
    out = []
    top = math.log10(k) + 0.1
    for x in np.concatenate([np.logspace(lo, top, 40), np.logspace(top - 2.1, top, 20)]):
        e = _log_gamma_cdf(k, float(x))
        if LOG_P_MIN <= e <= LOG_P_MAX:
            out.append((float(x), e))
    return sorted(out, key=lambda pair: pair[1])


# ---------------------------------------------------------------------------------------------- known answers
def test_equal_weights_match_incomplete_gamma_within_the_stirling_band() -> None:
    worst_relative = {}
    for k in KS:
        grid = _grid(k)
        assert len(grid) >= 10 and grid[0][1] < -100 and grid[-1][1] > -3
        weight = 0.37  # Q = a χ²_k with a ≠ 1, so the scaling is exercised
        errors = []
        for x, exact in grid:
            lr = log_prob_weighted_chi2_below(torch.full((k,), weight), torch.zeros(k), weight * x)
            errors.append((lr - exact, exact))
        band = 1.0 / (6.0 * k)
        assert max(abs(e) for e, _ in errors) < band, k
        worst_relative[k] = max(abs(e / exact) for e, exact in errors)
    # Relative error of log P: the band over |log P| ≥ log 2, and it shrinks with k.
    for k in KS:
        assert worst_relative[k] < 1.0 / (6.0 * k * math.log(2.0))
    for small, large in zip(KS, KS[1:]):
        assert worst_relative[large] < worst_relative[small]


@pytest.mark.parametrize("k", [1, 2, 10, 100, 1000])
def test_lower_tail_error_grows_towards_the_stirling_remainder(k: int) -> None:
    # Below the mean the approximation overestimates P; as q → 0 its log error increases towards (and stays below)
    # log Γ(k/2) − log Γ̂(k/2), the far-tail limit, whatever k (slowly: the approach is logarithmic in q).
    remainder = _stirling_remainder(k / 2)
    errors = []
    for ratio in (1e-1, 1e-2, 1e-4, 1e-8, 1e-30, 1e-100):
        x = ratio * k
        errors.append(log_prob_weighted_chi2_below(torch.ones(k), torch.zeros(k), x) - _log_gamma_cdf(k, x))
    assert 0 < errors[0]
    assert all(e1 < e2 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < remainder < 1.0 / (6.0 * k)


def test_cgf_matches_autograd_of_an_independent_formula_and_the_moments() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.exp(torch.randn(7, generator=g, dtype=torch.float64))
    d2 = torch.rand(7, generator=g, dtype=torch.float64) * 3
    s_max = 0.5 / float(a.max())

    def k_of(s: torch.Tensor) -> torch.Tensor:
        return torch.sum(-0.5 * torch.log(1 - 2 * a * s) + a * d2 * s / (1 - 2 * a * s))

    for s in (-1e3, -2.0, -1e-3, 0.0, 0.3 * s_max, 0.99 * s_max):
        k0, k1, k2 = weighted_chi2_cgf(a, d2, s)
        st_ = torch.tensor(s, dtype=torch.float64)
        ref1 = torch.func.grad(k_of)(st_)
        ref2 = torch.func.grad(torch.func.grad(k_of))(st_)
        assert k0 == pytest.approx(float(k_of(st_)), rel=1e-12, abs=1e-300)
        assert k1 == pytest.approx(float(ref1), rel=1e-12)
        assert k2 == pytest.approx(float(ref2), rel=1e-12)
    _, mean, var = weighted_chi2_cgf(a, d2, 0.0)
    assert mean == pytest.approx(float(torch.sum(a * (1 + d2))), rel=1e-14)  # E Q
    assert var == pytest.approx(float(torch.sum(2 * a * a * (1 + 2 * d2))), rel=1e-14)  # Var Q


@pytest.mark.parametrize("ratio", [1e-12, 1e-6, 1e-2, 0.5, 1 - 1e-9, 1.0, 1 + 1e-9, 2.0, 1e3, 1e8])
def test_saddlepoint_solves_the_equation_everywhere(ratio: float) -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.exp(3 * torch.randn(50, generator=g, dtype=torch.float64))
    d2 = torch.rand(50, generator=g, dtype=torch.float64) ** 4 * 10
    mean = float(torch.sum(a * (1 + d2)))
    q = ratio * mean
    s = solve_saddlepoint(a, d2, q)
    assert (s < 0) == (ratio < 1) and (s > 0) == (ratio > 1)
    assert 2 * float(a.max()) * s < 1
    assert weighted_chi2_cgf(a, d2, s)[1] == pytest.approx(q, rel=1e-10)
    assert math.isfinite(log_prob_weighted_chi2_below(a, d2, q))


def test_at_the_mean_the_limit_formula_is_continuous() -> None:
    a = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    d2 = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64)
    mean = float(torch.sum(a * (1 + d2)))
    kappa2 = float(torch.sum(2 * a * a * (1 + 2 * d2)))
    kappa3 = float(torch.sum(8 * a**3 * (1 + 3 * d2)))
    at = log_prob_weighted_chi2_below(a, d2, mean)
    # d log P / dq at the mean is the density there over P; the saddlepoint density at the mean is
    # φ(0)/√κ2 · (1 + O(1/k)), so a step of 2·rel·mean moves log P by about that much — no jump at ŝ = 0.
    slope = 1.0 / (math.sqrt(2 * math.pi * kappa2) * math.exp(at))
    for rel in (1e-12, 1e-9, 1e-6):
        below = log_prob_weighted_chi2_below(a, d2, mean * (1 - rel))
        above = log_prob_weighted_chi2_below(a, d2, mean * (1 + rel))
        assert below <= at <= above
        assert above - below == pytest.approx(2 * rel * mean * slope, rel=0.5)
    # At the mean: ½ + κ3/(6√(2π) κ2^{3/2}) (Daniels' limit), > ½ for this right-skewed law.
    assert at == pytest.approx(math.log(0.5 + kappa3 / (6 * math.sqrt(2 * math.pi) * kappa2**1.5)), rel=1e-12)


def test_the_r_star_form_takes_over_where_the_formula_leaves_the_unit_interval() -> None:
    # A bracket ½erfcx(−ŵ/√2) + (1/ŵ − 1/û)/√(2π) ≤ 0 (not produced by any χ² tail seen) falls back to Φ(r*).
    w_hat, u_hat, corr = -1.0, -10.0, -5.0
    r_star = w_hat + math.log(u_hat / w_hat) / w_hat
    expected = float(torch.special.log_ndtr(torch.tensor(r_star, dtype=torch.float64)))
    assert _lugannani_rice_log(w_hat, u_hat, corr) == expected
    # In range, the formula itself: Φ(ŵ) + φ(ŵ)·corr.
    w_hat, corr = -2.0, 0.01
    direct = 0.5 * math.erfc(-w_hat / math.sqrt(2)) + math.exp(-0.5 * w_hat**2) / math.sqrt(2 * math.pi) * corr
    assert _lugannani_rice_log(w_hat, -2.1, corr) == pytest.approx(math.log(direct), rel=1e-14)


# ---------------------------------------------------------------------------------------------- Monte Carlo
def _brute_force(a: torch.Tensor, d2: torch.Tensor, q: float, n: int, seed: int) -> tuple[float, float]:
    """(log p̂, its delta-method standard error) from n plain prior samples."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, a.numel(), generator=g, dtype=torch.float64)
    p = float((torch.sum(a * (z + d2.sqrt()) ** 2, dim=1) <= q).double().mean())
    return math.log(p), math.sqrt((1 - p) / (n * p))


def test_small_k_against_brute_force_monte_carlo() -> None:
    g = torch.Generator().manual_seed(11)
    for case in range(10):
        k = 1 + case % 5
        a = torch.exp(torch.randn(k, generator=g, dtype=torch.float64))
        d2 = torch.rand(k, generator=g, dtype=torch.float64) * 4 * (torch.rand(k, generator=g) < 0.7)
        q = float(torch.sum(a * (1 + d2))) * (0.1 + 1.4 * float(torch.rand(1, generator=g)))
        log_p, se = _brute_force(a, d2, q, 200_000, seed=100 + case)
        assert log_p > math.log(1e-3)
        tilted = tilted_log_prob_weighted_chi2_below_mc(a, d2, q, n_samples=20_000, seed=case)
        # Both estimators are unbiased for P (the log's bias is O(SE²), negligible here): 4 combined SE.
        assert abs(tilted.log_mass - log_p) < 4 * math.hypot(se, tilted.standard_error), case
        # The saddlepoint value: 4 SE plus its own approximation error (≤ 1/6 nats for any k ≥ 1).
        lr = log_prob_weighted_chi2_below(a, d2, q)
        assert abs(lr - log_p) < 4 * se + LR_ERROR_ANY_K, case


@pytest.mark.parametrize("k, seed", [(2000, 0), (5000, 1)])
def test_thousands_of_terms_against_tilted_sampling(k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(-10, 2, generator=g))  # a wide spectrum, like G's
    d2 = (3 * torch.randn(k, generator=g, dtype=torch.float64)) ** 2
    q = 0.05 * float(torch.sum(a * (1 + d2)))
    lr = log_prob_weighted_chi2_below(a, d2, q)
    mc = tilted_log_prob_weighted_chi2_below_mc(a, d2, q, n_samples=256, seed=seed)
    assert lr < -100 and mc.n_inside > 50
    assert abs(mc.log_mass - lr) < 4 * mc.standard_error


# ---------------------------------------------------------------------------------------------- the region
def _random_region(d: int, k: int, seed: int) -> QuadraticRegion:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    lam = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(-3, 3, generator=g))
    return QuadraticRegion(lam, u, torch.randn(d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("r, d", [(5, 12), (20, 8)])
def test_factor_route_equals_dense_eigendecomposition(r: int, d: int) -> None:
    g = torch.Generator().manual_seed(r)
    factor = torch.randn(r, d, generator=g, dtype=torch.float64)
    anchor = torch.randn(d, generator=g, dtype=torch.float64)
    via_gram = QuadraticRegion.from_factor(factor, anchor)
    dense = QuadraticRegion.from_matrix(factor.T @ factor, anchor)
    assert via_gram.rank == dense.rank == min(r, d)
    torch.testing.assert_close(via_gram.eigenvalues, dense.eigenvalues, rtol=1e-12, atol=0)
    proj_a = via_gram.eigenvectors @ via_gram.eigenvectors.T
    proj_b = dense.eigenvectors @ dense.eigenvectors.T
    torch.testing.assert_close(proj_a, proj_b, rtol=0, atol=1e-12)
    gram = via_gram.eigenvectors.T @ via_gram.eigenvectors
    torch.testing.assert_close(gram, torch.eye(via_gram.rank, dtype=torch.float64), rtol=0, atol=1e-12)
    points = torch.randn(9, d, generator=g, dtype=torch.float64)
    expected = 0.5 * torch.sum(((points - anchor) @ factor.T) ** 2, dim=1)
    torch.testing.assert_close(via_gram.delta(points), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(dense.delta(points), expected, rtol=1e-12, atol=0)
    kw = {"mean": 0.1, "sigma": 0.3, "cutoff": 0.05}
    assert via_gram.log_prior_mass(**kw) == pytest.approx(dense.log_prior_mass(**kw), rel=1e-10)


def test_region_mass_is_the_chi2_tail_of_its_parameters() -> None:
    region = _random_region(40, 25, seed=2)
    mean = torch.linspace(-0.5, 0.5, 40, dtype=torch.float64)
    a, d2 = region.chi2_parameters(mean=mean, sigma=0.8)
    torch.testing.assert_close(a, region.eigenvalues * 0.64)
    d = ((mean - region.anchor) @ region.eigenvectors) / 0.8
    torch.testing.assert_close(d2, d * d)
    assert region.log_prior_mass(mean=mean, sigma=0.8, cutoff=0.3) == log_prob_weighted_chi2_below(a, d2, 0.6)
    empty = QuadraticRegion(torch.zeros(0), torch.zeros(40, 0), region.anchor)
    assert empty.log_prior_mass(sigma=1.0, cutoff=0.1) == 0.0


def test_tilted_sampling_in_parameter_space_checks_the_region_mass() -> None:
    region = _random_region(600, 400, seed=4)
    kw = {"mean": 0.0, "sigma": 0.5, "cutoff": 2.0}
    exact = region.log_prior_mass(**kw)
    mc = tilted_log_prior_mass_mc(region, **kw, n_samples=256, seed=0)
    assert exact < -50 and mc.n_inside > 50
    assert abs(mc.log_mass - exact) < 4 * mc.standard_error
    again = tilted_log_prior_mass_mc(region, **kw, n_samples=256, seed=0, batch_size=7)
    torch.testing.assert_close(again.log_weights, mc.log_weights, rtol=1e-12, atol=0)


def test_tilted_sampling_with_a_small_region_against_plain_prior_samples() -> None:
    region = _random_region(6, 3, seed=8)
    mean = torch.full((6,), 0.2, dtype=torch.float64)
    kw = {"mean": mean, "sigma": 0.7, "cutoff": 0.4}
    g = torch.Generator().manual_seed(9)
    n = 200_000
    theta = mean + 0.7 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    p = float((region.delta(theta) <= 0.4).double().mean())
    se = math.sqrt((1 - p) / (n * p))
    mc = tilted_log_prior_mass_mc(region, **kw, n_samples=20_000, seed=1, batch_size=5000)
    assert p > 1e-3
    assert abs(mc.log_mass - math.log(p)) < 4 * math.hypot(se, mc.standard_error)
    assert abs(region.log_prior_mass(**kw) - math.log(p)) < 4 * se + LR_ERROR_ANY_K


def test_tilted_sampling_takes_any_behaviour() -> None:
    region = _random_region(30, 10, seed=6)
    kw = {"sigma": 0.5, "cutoff": 0.2}
    outside = tilted_log_prior_mass_mc(region, **kw, behavior=lambda x: torch.full((x.shape[0],), math.inf))
    assert outside.log_mass == -math.inf and outside.n_inside == 0
    nan = tilted_log_prior_mass_mc(region, **kw, behavior=lambda x: torch.full((x.shape[0],), math.nan))
    assert nan.n_inside == 0
    # The weights p/q integrate to 1 under q: log E_q[w] = 0 within 4 SE. Off the quadratic region w = e^{K − ŝQ}
    # is unbounded, with finite variance only for |ŝ| < 1/(2 max a): a milder tilt than the saddlepoint's.
    a, _ = region.chi2_parameters(sigma=0.5)
    tilt = -0.2 / float(a.max())
    everything = tilted_log_prior_mass_mc(
        region, **kw, behavior=lambda x: torch.zeros(x.shape[0]), n_samples=4000, tilt=tilt
    )
    assert everything.tilt == tilt and everything.n_inside == 4000
    assert abs(everything.log_mass) < 4 * everything.standard_error


# ---------------------------------------------------------------------------------------------- properties
_weights = st.lists(st.floats(1e-4, 1e4), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(_weights, st.data(), st.floats(1e-4, 20.0))
def test_log_probability_is_invariant_to_permutations(a: list[float], data: st.DataObject, frac: float) -> None:
    d2 = data.draw(st.lists(st.floats(0.0, 25.0), min_size=len(a), max_size=len(a)))
    perm = data.draw(st.permutations(range(len(a))))
    at, dt = torch.tensor(a, dtype=torch.float64), torch.tensor(d2, dtype=torch.float64)
    q = frac * float(torch.sum(at * (1 + dt)))
    base = log_prob_weighted_chi2_below(at, dt, q)
    permuted = log_prob_weighted_chi2_below(at[list(perm)], dt[list(perm)], q)
    assert permuted == pytest.approx(base, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(_weights, st.data(), st.floats(1e-4, 20.0), st.floats(1e-6, 1.0))
def test_log_probability_is_monotone_in_q(a: list[float], data: st.DataObject, frac: float, step: float) -> None:
    d2 = data.draw(st.lists(st.floats(0.0, 25.0), min_size=len(a), max_size=len(a)))
    at, dt = torch.tensor(a, dtype=torch.float64), torch.tensor(d2, dtype=torch.float64)
    q = frac * float(torch.sum(at * (1 + dt)))
    lo, hi = log_prob_weighted_chi2_below(at, dt, q), log_prob_weighted_chi2_below(at, dt, q * (1 + step))
    assert lo <= hi + 1e-12 * abs(hi)
    assert lo <= 0.0


@settings(max_examples=40, deadline=None)
@given(_weights, st.floats(1e-4, 20.0), st.floats(1e-6, 1e6))
def test_scaling_q_and_the_weights_together_changes_nothing(a: list[float], frac: float, c: float) -> None:
    at = torch.tensor(a, dtype=torch.float64)
    dt = torch.linspace(0, 2, len(a), dtype=torch.float64)
    q = frac * float(torch.sum(at * (1 + dt)))
    base = log_prob_weighted_chi2_below(at, dt, q)
    assert log_prob_weighted_chi2_below(c * at, dt, c * q) == pytest.approx(base, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "a, d2, q, match",
    [
        ([1.0, -1.0], [0.0, 0.0], 1.0, "a\\[1\\]"),
        ([1.0, 1.0], [0.0, -0.5], 1.0, "d2\\[1\\]"),
        ([1.0], [0.0, 0.0], 1.0, "same shape"),
        ([1.0], [0.0], 0.0, "q must be positive"),
        ([1.0], [0.0], math.nan, "q must be positive"),
        ([math.inf], [0.0], 1.0, "a must be finite"),
        ([], [], 1.0, "non-empty"),
    ],
)
def test_invalid_inputs_are_rejected(a: list[float], d2: list[float], q: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        log_prob_weighted_chi2_below(a, d2, q)


def test_invalid_regions_are_rejected() -> None:
    u = torch.eye(4, dtype=torch.float64)[:, :2]
    with pytest.raises(ValueError, match="eigenvalues\\[1\\]"):
        QuadraticRegion(torch.tensor([1.0, 0.0]), u, torch.zeros(4))
    with pytest.raises(ValueError, match="shape \\[D, k\\]"):
        QuadraticRegion(torch.tensor([1.0, 2.0]), u, torch.zeros(5))
    with pytest.raises(ValueError, match="unit norm"):
        QuadraticRegion(torch.tensor([1.0, 2.0]), 2 * u, torch.zeros(4))
    region = QuadraticRegion(torch.tensor([1.0, 2.0]), u, torch.zeros(4))
    with pytest.raises(ValueError, match="sigma"):
        region.log_prior_mass(sigma=0.0, cutoff=1.0)
    with pytest.raises(ValueError, match="cutoff"):
        region.log_prior_mass(sigma=1.0, cutoff=-1.0)
    with pytest.raises(ValueError, match="4 entries"):
        region.log_prior_mass(mean=torch.zeros(3), sigma=1.0, cutoff=1.0)
    with pytest.raises(ValueError, match="columns"):
        region.delta(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="outside the CGF"):
        tilted_log_prob_weighted_chi2_below_mc([1.0], [0.0], 1.0, tilt=0.5)
