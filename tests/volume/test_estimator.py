"""Closed-form oracles for estimate_log_volume: regions and priors whose local volume is known exactly.

Isotropic balls and ellipsoids under the uniform prior (log V_D + (D/2) log(2ε/k), and its anisotropic form), a ball
about the Gaussian prior's mean (the chi-square CDF), saturated rays (total mass 1), a low-dimensional problem
against prior sampling, invariances (scaling Δ and ε together, the proposal's scale, the batch size, permuted
coordinates), and the record each result keeps.

Where a per-direction value is exact up to the radius tolerance, the test removes that tolerance exactly: the
recorded Δ at the recorded radius is where the estimate was evaluated, so e.g. on a quadratic ray the estimate must
equal truth + (D/2)·log(Δ_i/ε). Statistical checks use bands of k standard errors computed from the samples.
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from hfvolume import GaussianPrior, estimate_log_volume
from hfvolume.volume.numerics import log_unit_ball_volume
from hfvolume.volume.results import VolumeResult

K_SE = 4.0  # band width in standard errors for Monte-Carlo comparisons


def quadratic(h: torch.Tensor, anchor: torch.Tensor):
    """Batched Δ = ½ Σ h_i (θ − θ0)_i², [K, D] → [K]."""
    def fn(theta):
        d = theta - anchor
        return 0.5 * (d * d * h).sum(-1)
    return fn


def run(fn, anchor, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("batched", True)
    kw.setdefault("batch_size", 16)
    return estimate_log_volume(fn, anchor, **kw)


# ------------------------------------------------------------------------- isotropic ball, uniform prior
@pytest.mark.parametrize("d", [1, 3, 50, 2000])
def test_isotropic_ball_uniform_prior(d):
    k, eps = 3.0, 1e-2
    anchor = torch.linspace(-1, 1, d, dtype=torch.float64)
    res = run(quadratic(torch.full((d,), k, dtype=torch.float64), anchor), anchor, cutoff=eps, prior="uniform",
              n_directions=20)
    truth = log_unit_ball_volume(d) + d / 2 * math.log(2 * eps / k)
    est = np.array(res.log_estimates)
    deltas = np.array(res.deltas)
    assert set(res.flags) == {"converged"}
    assert np.all(np.abs(deltas - eps) <= 1e-2 * eps)
    # Exact given the evaluated Δ: ρ_i = sqrt(2Δ_i/k).
    np.testing.assert_allclose(est - d / 2 * np.log(deltas / eps), truth, rtol=1e-12, atol=1e-9 * d)
    assert res.norm_term == 0.0


# --------------------------------------------------------------------- diagonal ellipsoid, uniform prior
def _ellipsoid(d, seed=0):
    g = np.random.default_rng(seed)
    h = torch.tensor(np.exp(g.uniform(-3, 3, size=d)), dtype=torch.float64)
    anchor = torch.tensor(g.normal(size=d), dtype=torch.float64)
    return h, anchor


@pytest.mark.parametrize("d", [2, 40, 1000])
def test_ellipsoid_zero_variance_with_exact_curvature_proposal(d):
    eps = 1e-2
    h, anchor = _ellipsoid(d)
    res = run(quadratic(h, anchor), anchor, cutoff=eps, prior="uniform", n_directions=16, scales=h.rsqrt())
    truth = log_unit_ball_volume(d) + d / 2 * math.log(2 * eps) - 0.5 * float(torch.log(h).sum())
    est = np.array(res.log_estimates) - d / 2 * np.log(np.array(res.deltas) / eps)
    np.testing.assert_allclose(est, truth, rtol=0, atol=1e-7 * d)


def test_ellipsoid_naive_samples_sit_am_gm_below():
    d, eps = 400, 1e-2
    h, anchor = _ellipsoid(d, seed=1)
    res = run(quadratic(h, anchor), anchor, cutoff=eps, prior="uniform", n_directions=40)
    truth = log_unit_ball_volume(d) + d / 2 * math.log(2 * eps) - 0.5 * float(torch.log(h).sum())
    est = np.array(res.log_estimates) - d / 2 * np.log(np.array(res.deltas) / eps)
    hn = h.numpy()
    am, gm = hn.mean(), math.exp(np.log(hn).mean())
    predicted = -(d / 2) * math.log(am / gm)
    # Spread of one sample: (D/2)·sd(log wᵀHw), with var(log wᵀHw) ≈ 2(Σh²/(Σh)² − 1/D) (delta method).
    sd_one = d / 2 * math.sqrt(2 * ((hn**2).sum() / hn.sum() ** 2 - 1 / d))
    assert abs(np.median(est - truth) - predicted) <= K_SE * sd_one
    assert predicted < -10 * sd_one  # the test has teeth: the AM/GM gap dwarfs the spread


# ------------------------------------------------------------------ ball about the Gaussian prior's mean
@pytest.mark.parametrize("d", [1, 2, 7, 100, 3000])
@pytest.mark.parametrize("r_over_typical", [0.3, 0.9, 1.1])
def test_gaussian_prior_ball_at_mean_gives_chi_square_cdf(d, r_over_typical):
    sigma = 0.7
    anchor = torch.full((d,), 0.25, dtype=torch.float64)
    radius = r_over_typical * sigma * math.sqrt(d)

    def fn(theta):
        diff = theta - anchor
        return (diff * diff).sum(-1)

    res = run(fn, anchor, cutoff=radius**2, prior=GaussianPrior(sigma=sigma, mean=anchor), n_directions=6,
              rtol=1e-3)
    for est, dlt, flag in zip(res.log_estimates, res.deltas, res.flags):
        if flag == "saturated":
            truth = 0.0
        else:
            truth = float(mpmath.log(mpmath.gammainc(d / 2, 0, dlt / (2 * sigma**2), regularized=True)))
        assert est == pytest.approx(truth, abs=1e-6 + 1e-9 * abs(truth))
    assert res.norm_term == 0.0


# ---------------------------------------------------------------------------------------- saturated rays
def test_saturated_rays_average_to_total_mass_one():
    sigma, n = 1.0, 3000
    anchor = torch.tensor([0.8, -0.3, 0.5], dtype=torch.float64)
    res = run(lambda th: torch.zeros(th.shape[0], dtype=th.dtype), anchor, cutoff=1e-2,
              prior=GaussianPrior(sigma=sigma), n_directions=n, batch_size=500)
    assert set(res.flags) == {"saturated"}
    x = np.exp(np.array(res.log_estimates))
    assert abs(x.mean() - 1.0) <= K_SE * x.std() / math.sqrt(n)
    assert res.norm_term == pytest.approx(-0.5 * float((anchor**2).sum()))


# --------------------------------------------------------------------------- low-dimensional brute force
LOW_D_ANCHOR = torch.tensor([0.8, -0.3, 0.5], dtype=torch.float64)
LOW_D_H = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)


@pytest.fixture(scope="module")
def low_d_truth():
    # Prior-sampling truth with a private generator: P[½ Σ h (θ − θ0)² ≤ ½], θ ~ N(0, I).
    g = torch.Generator().manual_seed(1234)
    inside = 0
    n = 4_000_000
    for _ in range(4):
        theta = torch.randn(n // 4, 3, generator=g, dtype=torch.float64)
        inside += int(((0.5 * ((theta - LOW_D_ANCHOR) ** 2 * LOW_D_H).sum(1)) <= 0.5).sum())
    p = inside / n
    return p, math.sqrt(p * (1 - p) / n)


def test_low_d_truth_matches_the_documented_value(low_d_truth):
    p, se = low_d_truth
    assert abs(math.log(p) - (-2.174)) <= 0.0005 + K_SE * se / p


@pytest.mark.parametrize(
    "scales, mixture",
    [
        (None, 0.0),
        (LOW_D_H.rsqrt(), 0.0),
        (torch.tensor([3.0, 0.2, 1.0], dtype=torch.float64), 0.0),
        (torch.tensor([3.0, 0.2, 1.0], dtype=torch.float64), 0.3),
    ],
    ids=["naive", "curvature", "other-unit-det", "mixture"],
)
def test_low_d_brute_force_is_matched_within_monte_carlo_error(low_d_truth, scales, mixture):
    p, se_truth = low_d_truth
    n = 4000
    res = run(quadratic(LOW_D_H, LOW_D_ANCHOR), LOW_D_ANCHOR, cutoff=0.5, prior=GaussianPrior(sigma=1.0),
              n_directions=n, scales=scales, mixture=mixture, rtol=1e-8, batch_size=1000, seed=7)
    x = np.exp(np.array(res.log_estimates))
    se = math.sqrt(x.var() / n + se_truth**2)
    assert abs(x.mean() - p) <= K_SE * se


# ------------------------------------------------------------------------------------------- invariances
def test_scaling_delta_and_cutoff_together_changes_nothing():
    h, anchor = _ellipsoid(30, seed=3)
    base = quadratic(h, anchor)
    a = run(base, anchor, cutoff=1e-2, n_directions=12)
    b = run(lambda th: 8.0 * base(th), anchor, cutoff=8e-2, n_directions=12)
    # log(8Δ) − log(8ε) equals log Δ − log ε only up to rounding, so steps may differ in the last ulp.
    assert a.flags == b.flags and a.evaluations == b.evaluations
    np.testing.assert_allclose(a.radii, b.radii, rtol=1e-12)
    np.testing.assert_allclose(a.log_estimates, b.log_estimates, rtol=1e-12)


def test_constant_scales_equal_naive_exactly():
    h, anchor = _ellipsoid(30, seed=4)
    a = run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=12)
    b = run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=12, scales=torch.full((30,), 3.7))
    assert a.log_estimates == b.log_estimates


def test_scaling_the_proposal_changes_nothing():
    h, anchor = _ellipsoid(30, seed=5)
    s = torch.tensor(np.random.default_rng(0).uniform(0.1, 3, 30))
    a = run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=12, scales=s)
    b = run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=12, scales=1024.0 * s)
    np.testing.assert_allclose(a.log_estimates, b.log_estimates, rtol=1e-9)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_same_seed_same_directions_for_any_batch_size(batch_size):
    h, anchor = _ellipsoid(25, seed=6)
    ref = run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=11, batch_size=7, seed=3)
    res = run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=11, batch_size=batch_size, seed=3)
    assert res.log_estimates == ref.log_estimates and res.radii == ref.radii and res.flags == ref.flags


def test_unbatched_fn_gives_the_same_results():
    h, anchor = _ellipsoid(25, seed=6)
    fn = quadratic(h, anchor)
    ref = run(fn, anchor, cutoff=1e-2, n_directions=6)
    res = run(lambda th: fn(th.unsqueeze(0))[0], anchor, cutoff=1e-2, n_directions=6, batched=False)
    assert res.log_estimates == ref.log_estimates


def test_permuting_coordinates_changes_nothing_in_distribution():
    d, n = 20, 1500
    h, anchor = _ellipsoid(d, seed=8)
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    mean = torch.linspace(-0.2, 0.3, d, dtype=torch.float64)
    p = torch.linspace(0.3, 1.5, d, dtype=torch.float64)
    kw = dict(cutoff=0.05, n_directions=n, batch_size=500)
    a = run(quadratic(h, anchor), anchor, prior=GaussianPrior(sigma=sigma, mean=mean), scales=p, **kw)
    b = run(quadratic(h[perm], anchor[perm]), anchor[perm], prior=GaussianPrior(sigma=sigma[perm], mean=mean[perm]),
            scales=p[perm], seed=99, **kw)
    la, lb = np.array(a.log_estimates), np.array(b.log_estimates)
    shift = max(la.max(), lb.max())
    xa, xb = np.exp(la - shift), np.exp(lb - shift)
    se = math.sqrt(xa.var() / n + xb.var() / n)
    assert abs(xa.mean() - xb.mean()) <= K_SE * se


# ---------------------------------------------------------------------------------------- cutoff scaling
def test_cutoff_scaling_on_exact_quadratic():
    d = 60
    h, anchor = _ellipsoid(d, seed=9)
    a = run(quadratic(h, anchor), anchor, cutoff=1e-3, prior="uniform", n_directions=10)
    b = run(quadratic(h, anchor), anchor, cutoff=1e-1, prior="uniform", n_directions=10)
    ea = np.array(a.log_estimates) - d / 2 * np.log(np.array(a.deltas))
    eb = np.array(b.log_estimates) - d / 2 * np.log(np.array(b.deltas))
    np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-9 * d)
    shift = np.array(b.log_estimates) - np.array(a.log_estimates)
    np.testing.assert_allclose(shift, d / 2 * math.log(100.0), atol=d / 2 * 2 * 1e-2)


# ------------------------------------------------------------------------------------- contract & record
def test_radius_is_an_evaluated_point_and_delta_matches_fn():
    d = 40
    h, anchor = _ellipsoid(d, seed=10)
    seen: list[torch.Tensor] = []

    def fn(theta):
        seen.append(theta.clone())
        diff = theta - anchor
        return 0.5 * (diff * diff * h).sum(-1) + 5.0 * ((diff * diff * h).sum(-1)) ** 2  # not quadratic

    res = run(fn, anchor, cutoff=1e-2, n_directions=8, batch_size=3)
    pts = torch.cat(seen)
    dist = torch.linalg.vector_norm(pts - anchor, dim=1)
    vals = fn(pts)
    for r, dlt in zip(res.radii, res.deltas):
        # Some evaluated point lies at exactly this distance and gave exactly this Δ.
        at_r = (dist - r).abs() <= 1e-12 * r
        assert bool((at_r & (vals == dlt)).any()), f"radius {r} with Δ {dlt} was never evaluated"
        assert abs(dlt - 1e-2) <= 1e-2 * 1e-2
    assert res.forward_passes == sum(res.evaluations) + 1


def test_directions_come_from_private_generators():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    h, anchor = _ellipsoid(10, seed=11)
    run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=5)
    assert torch.equal(torch.get_rng_state(), before)


def test_result_json_round_trip():
    h, anchor = _ellipsoid(10, seed=12)
    res = run(quadratic(h, anchor), anchor, cutoff=1e-2, n_directions=5)
    back = VolumeResult.from_json(res.to_json())
    assert back == res
    assert back.information_content_bits == pytest.approx(-res.log_volume / math.log(2))


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"cutoff": 0.0}, ValueError, "cutoff"),
        ({"cutoff": -1.0}, ValueError, "cutoff"),
        ({"cutoff": float("nan")}, ValueError, "cutoff"),
        ({"cutoff": 1e-2, "n_directions": 0}, ValueError, "n_directions"),
        ({"cutoff": 1e-2, "n_directions": 2.5}, TypeError, "n_directions"),
        ({"cutoff": 1e-2, "prior": "laplace"}, ValueError, "prior"),
        ({"cutoff": 1e-2, "rtol": 2.0}, ValueError, "rtol"),
        ({"cutoff": 1e-2, "radius_method": "newton"}, ValueError, "radius_method"),
        ({"cutoff": 1e-2, "scales": torch.ones(3)}, ValueError, "scales"),
        ({"cutoff": 1e-2, "scales": -torch.ones(4)}, ValueError, r"scales\[0\]"),
        ({"cutoff": 1e-2, "mixture": 1.5}, ValueError, "mixture"),
        ({"cutoff": 1e-2, "prior": GaussianPrior(sigma=torch.ones(3))}, ValueError, "sigma"),
    ],
)
def test_bad_input_is_rejected_with_a_named_error(kwargs, exc, match):
    anchor = torch.ones(4, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        estimate_log_volume(lambda th: (th - anchor).pow(2).sum(), anchor, progress=False, **kwargs)


def test_bad_anchor_and_fn():
    with pytest.raises(ValueError, match="anchor"):
        estimate_log_volume(lambda th: th.sum(), torch.ones(2, 2), cutoff=1.0, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        estimate_log_volume(lambda th: th.sum(), torch.tensor([1.0, float("nan")]), cutoff=1.0, progress=False)
    with pytest.raises(ValueError, match="not finite"):
        estimate_log_volume(lambda th: th.sum() * float("nan"), torch.ones(3), cutoff=1.0, progress=False)
    with pytest.raises(ValueError, match="sigma"):
        GaussianPrior(sigma=-1.0)

