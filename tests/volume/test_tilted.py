"""The curvature-tilted proposal (:mod:`hfvolume.volume.tilted`): its projected-normal density on the sphere is
normalised and exact, its draws follow that density, and the estimator with it is unbiased on closed-form regions."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from problems import ThreadGroup, assert_same_estimate

from hfvolume import estimate_log_volume
from hfvolume.volume.curvature import LowRankCurvature
from hfvolume.volume.numerics import log_sphere_area
from hfvolume.volume.priors import GaussianPrior, UniformPrior
from hfvolume.volume.quadratic import solve_saddlepoint, tilted_log_prob_weighted_chi2_below_mc
from hfvolume.volume.tilted import (
    ChiSquareGroups,
    CurvatureProposal,
    FlooredModel,
    TiltedProposal,
    solve_group_saddlepoint,
)

F64 = torch.float64


def curvature(d: int, k: int, *, floor: float, seed: int = 0, low: float = -1.0, high: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))
    lam = torch.exp(torch.linspace(low, high, k, dtype=F64))
    return LowRankCurvature(lam, u, floor)


def dense(c: LowRankCurvature) -> torch.Tensor:
    u = c.basis
    return u @ torch.diag(c.eigenvalues) @ u.T + c.floor * (torch.eye(c.dim, dtype=F64) - u @ u.T)


def resolved(c: LowRankCurvature, *, theta0, sigma=0.8, mean=None, cutoff=0.3, **kw) -> TiltedProposal:
    prior = GaussianPrior(sigma=sigma, mean=mean).resolve(theta0)
    return CurvatureProposal(c, **kw).resolve(prior, cutoff=cutoff)


VARIANTS = {
    "scalar sigma, isotropic floor": dict(),
    "per-coordinate sigma": dict(per_coordinate=True),
    "diagonal floor": dict(shape=True),
    "stronger tilt": dict(tilt=3.0),
}


def variant(d: int, name: str, *, seed: int = 0) -> TiltedProposal:
    opts = VARIANTS[name]
    g = torch.Generator().manual_seed(100 + seed)
    theta0 = 0.7 * torch.randn(d, generator=g, dtype=F64)
    mean = 0.3 * torch.randn(d, generator=g, dtype=F64)
    sigma = torch.exp(0.3 * torch.randn(d, generator=g, dtype=F64)) if opts.get("per_coordinate") else 0.8
    shape = torch.exp(torch.randn(d, generator=g, dtype=F64)) if opts.get("shape") else None
    c = curvature(d, max(1, d // 3), floor=0.4, seed=seed)
    return resolved(c, theta0=theta0, sigma=sigma, mean=mean, tilt=opts.get("tilt", 1.0), floor_shape=shape)


# ------------------------------------------------------------------------------------------------ saddlepoint
@pytest.mark.parametrize("q", [1e-3, 0.5, 20.0, 3e3])
def test_group_saddlepoint_equals_the_expanded_one(q):
    rng = np.random.default_rng(0)
    a, n, d2 = np.exp(rng.uniform(-2, 2, 4)), np.array([1.0, 2.0, 1.0, 30.0]), rng.uniform(0, 3, 4)
    expanded_a = np.repeat(a, n.astype(int))
    expanded_d2 = np.repeat(d2 / n, n.astype(int))  # a group's law depends on its total non-centrality only
    s = solve_group_saddlepoint(ChiSquareGroups(a, n, d2), q)
    assert s == pytest.approx(solve_saddlepoint(expanded_a, expanded_d2, q), rel=1e-10)


def test_floor_raises_small_eigenvalues_and_shapes_the_complement():
    c = LowRankCurvature(torch.tensor([5.0, 1e-6], dtype=F64), torch.eye(6, 2, dtype=F64), 0.1)
    assert FlooredModel.of(c, None).eigenvalues.tolist() == [5.0, 0.1]
    shape = torch.tensor([1.0, 1.0, 2.0, 2.0, 4.0, 8.0], dtype=F64)
    m = FlooredModel.of(c, shape)
    # Rays orthogonal to U see λ₀ on average: tr((I − UUᵀ)Φ) / (D − k) = λ₀.
    assert float(m.floor[2:].mean()) == pytest.approx(0.1)
    assert m.eigenvalues.tolist() == pytest.approx([5.0, float(m.floor[1])])


# ------------------------------------------------------------------------------------------------ the density
@pytest.mark.parametrize("name", list(VARIANTS))
def test_density_integrates_to_one_on_the_circle(name):
    p = variant(2, name)
    phi = np.linspace(0.0, 2 * np.pi, 4001)[:-1]  # periodic trapezoid: spectrally accurate
    w = torch.tensor(np.stack([np.cos(phi), np.sin(phi)], 1))
    assert np.mean(np.exp(p.log_density(w))) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_density_integrates_to_one_on_the_sphere(name):
    p = variant(3, name)
    x, wx = np.polynomial.legendre.leggauss(120)  # cos(polar angle)
    phi = np.linspace(0.0, 2 * np.pi, 241)[:-1]
    cz, ph = np.meshgrid(x, phi, indexing="ij")
    sz = np.sqrt(1 - cz**2)
    w = torch.tensor(np.stack([sz * np.cos(ph), sz * np.sin(ph), cz], -1).reshape(-1, 3))
    q = np.exp(p.log_density(w)).reshape(cz.shape)
    # E_uniform[q] = (1 / 4π) ∫ q dΩ, dΩ = d(cos) dφ.
    integral = float(np.sum(wx[:, None] * q) * (2 * np.pi / phi.size)) / (4 * np.pi)
    assert integral == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_density_has_mean_one_under_uniform_directions_in_ten_dimensions(name):
    p = variant(10, name)
    u = torch.randn(50_000, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    q = np.exp(p.log_density(u / u.norm(dim=1, keepdim=True)))
    se = q.std() / math.sqrt(q.size)
    assert abs(q.mean() - 1.0) < 4 * se


@pytest.mark.parametrize("name", list(VARIANTS))
def test_log_density_matches_brute_force_quadrature_of_the_projected_normal(name):
    d = 5
    p = variant(d, name)
    # Dense P = G⁻¹(I + B diag(ν) Bᵀ)G⁻¹ and μ, read back from the stored form; the integral is done by brute force.
    g = p.scale * torch.ones(d, dtype=F64)
    prec = (torch.eye(d, dtype=F64) + p.basis @ torch.diag(p.nu) @ p.basis.T) / g[:, None] / g[None, :]
    cov = torch.linalg.inv(prec)
    mvn = torch.distributions.MultivariateNormal(p.mean, covariance_matrix=0.5 * (cov + cov.T))
    w = torch.randn(4, d, generator=torch.Generator().manual_seed(2), dtype=F64)
    w = w / w.norm(dim=1, keepdim=True)
    t = torch.linspace(1e-6, 40.0, 400_001, dtype=F64)
    for k in range(4):
        log_integrand = mvn.log_prob(t[:, None] * w[k]) + (d - 1) * torch.log(t)
        top = float(log_integrand.max())
        integral = float(torch.trapezoid(torch.exp(log_integrand - top), t))
        brute = log_sphere_area(d) + top + math.log(integral)
        assert float(p.log_density(w[k : k + 1])[0]) == pytest.approx(brute, abs=1e-7)


def test_prior_centred_at_the_anchor_without_curvature_is_the_uniform_distribution():
    d = 50
    flat = LowRankCurvature(torch.zeros(0, dtype=F64), torch.zeros(d, 0, dtype=F64), 0.0)
    theta0 = torch.randn(d, generator=torch.Generator().manual_seed(3), dtype=F64)
    p = resolved(flat, theta0=theta0, mean=theta0.clone())
    w, log_w = p.draw(list(range(5)), d, seed=0, dtype=F64, device="cpu")
    np.testing.assert_allclose(log_w, 0.0, atol=1e-9)
    np.testing.assert_allclose(w.norm(dim=1).numpy(), 1.0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ the draws
@pytest.mark.parametrize("name", ["scalar sigma, isotropic floor", "per-coordinate sigma", "diagonal floor"])
def test_draws_follow_the_density(name):
    """Kolmogorov–Smirnov on the angle of 4,000 draws in D = 2 against the CDF integrated from the density."""
    p = variant(2, name)
    w, _ = p.draw(list(range(4000)), 2, seed=5, dtype=F64, device="cpu")
    angles = np.sort(np.mod(np.arctan2(w[:, 1].numpy(), w[:, 0].numpy()), 2 * np.pi))
    grid = np.linspace(0.0, 2 * np.pi, 20001)
    q = np.exp(p.log_density(torch.tensor(np.stack([np.cos(grid), np.sin(grid)], 1))))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (q[1:] + q[:-1]) * np.diff(grid))]) / (2 * np.pi)
    model = np.interp(angles, grid, cdf)
    empirical = np.arange(1, angles.size + 1) / angles.size
    ks = max(np.max(empirical - model), np.max(model - (empirical - 1.0 / angles.size)))
    assert ks < 1.63 / math.sqrt(angles.size)  # the 1% critical value


def test_direction_i_depends_only_on_seed_and_index():
    p = variant(12, "diagonal floor")
    w_all, lw_all = p.draw(list(range(8)), 12, seed=4, dtype=torch.float32, device="cpu")
    w_two, lw_two = p.draw([6, 3], 12, seed=4, dtype=torch.float32, device="cpu")
    assert torch.equal(w_two, w_all[[6, 3]])
    np.testing.assert_array_equal(lw_two, lw_all[[6, 3]])


def test_mixture_bounds_the_weights_and_draws_isotropic_directions_exactly():
    d = 40
    c = curvature(d, 8, floor=0.2)
    theta0 = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=F64)
    p = resolved(c, theta0=theta0, mixture=0.25)
    _, log_w = p.draw(list(range(64)), d, seed=0, dtype=F64, device="cpu")
    assert np.all(log_w <= math.log(1 / 0.25) + 1e-12)
    everything = resolved(c, theta0=theta0, mixture=1.0)
    assert everything.is_isotropic
    w, log_w = everything.draw(list(range(4)), d, seed=0, dtype=F64, device="cpu")
    assert np.all(log_w == 0.0)


# ------------------------------------------------------------------------------------------------ the estimator
def quadratic_behavior(g: torch.Tensor, anchor: torch.Tensor):
    def fn(theta: torch.Tensor) -> torch.Tensor:
        x = theta - anchor
        return 0.5 * torch.einsum("kd,de,ke->k", x, g, x)

    return fn


@pytest.mark.parametrize("case", ["scalar sigma", "per-coordinate sigma", "diagonal floor"])
def test_estimator_with_tilted_proposal_matches_the_exact_prior_mass_of_an_ellipsoid(case):
    """Δ = ½xᵀĜx, a full-rank ellipsoid (with a diagonal floor Ĝ = Φ + U diag(λ − φ̄) Uᵀ), and an off-centre
    Gaussian prior: the estimate agrees with the prior mass of {Q ≤ 2ε} computed independently (tilted Monte Carlo
    in the whitened eigenbasis) within 4 standard errors."""
    d, cutoff = 40, 0.5
    gen = torch.Generator().manual_seed(11)
    theta0, mean = 0.5 * torch.randn(d, generator=gen, dtype=F64), 0.3 * torch.randn(d, generator=gen, dtype=F64)
    c = curvature(d, 10, floor=0.2, seed=1)
    sigma = torch.exp(0.2 * torch.randn(d, generator=gen, dtype=F64)) if case == "per-coordinate sigma" else 0.7
    shape = torch.exp(torch.randn(d, generator=gen, dtype=F64)) if case == "diagonal floor" else None
    m = FlooredModel.of(c, shape)  # the behaviour is the very model that is tilted
    phi = m.floor * torch.ones(d, dtype=F64)
    g = torch.diag(phi) + m.basis @ torch.diag(m.eigenvalues - m._floor_along()) @ m.basis.T
    s = sigma * torch.ones(d, dtype=F64)
    whitened = s[:, None] * g * s[None, :]
    a, v = torch.linalg.eigh(0.5 * (whitened + whitened.T))
    noncentral = (v.T @ ((mean - theta0) / s)) ** 2
    truth = tilted_log_prob_weighted_chi2_below_mc(a, noncentral, 2 * cutoff, n_samples=400_000, seed=0)
    prior = GaussianPrior(sigma=sigma, mean=mean)
    res = estimate_log_volume(quadratic_behavior(g, theta0), theta0, cutoff=cutoff, prior=prior, n_directions=200,
                              batched=True, batch_size=20, progress=False, rtol=1e-6, max_evaluations=200,
                              proposal=CurvatureProposal(c, floor_shape=shape))
    assert res.n_failed == 0
    se = math.hypot(res.log_volume_std, truth.standard_error)
    assert abs(res.log_volume - truth.log_mass) < 4 * se, (res.log_volume, truth.log_mass, se)
    assert res.ess > 50  # the exact tilt of an exact quadratic model: most directions count
    assert res.settings["proposal"]["name"] == "curvature-tilted"
    json.dumps(res.settings)


def test_results_do_not_depend_on_the_number_of_processes():
    d = 30
    gen = torch.Generator().manual_seed(2)
    theta0 = torch.randn(d, generator=gen, dtype=F64)
    c = curvature(d, 6, floor=0.3, seed=2)
    fn = quadratic_behavior(dense(c), theta0)
    kw = dict(cutoff=0.2, n_directions=9, batch_size=2, batched=True, progress=False, seed=3,
              proposal=CurvatureProposal(c, mixture=0.25, tilt=2.0))
    single = estimate_log_volume(fn, theta0, **kw).to_dict()
    for world_size in (2, 3):
        results = ThreadGroup(world_size).run(lambda s: estimate_log_volume(fn, theta0, sharding=s, **kw).to_dict())
        for rank, res in enumerate(results):
            assert not isinstance(res, BaseException), f"rank {rank}: {res!r}"
            assert_same_estimate(res, single)


def test_estimator_leaves_the_global_rng_alone():
    d = 20
    theta0 = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=F64)
    c = curvature(d, 4, floor=0.3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    estimate_log_volume(quadratic_behavior(dense(c), theta0), theta0, cutoff=0.2, n_directions=4, batched=True,
                        progress=False, proposal=CurvatureProposal(c))
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals_name_the_problem():
    d = 10
    theta0 = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=F64)
    c = curvature(d, 3, floor=0.1)
    fn = quadratic_behavior(dense(c), theta0)
    kw = dict(cutoff=0.2, n_directions=2, batched=True, progress=False)
    with pytest.raises(ValueError, match="cannot be combined with scales"):
        estimate_log_volume(fn, theta0, proposal=CurvatureProposal(c), scales=torch.ones(d), **kw)
    with pytest.raises(ValueError, match="cannot be combined with mixture"):
        estimate_log_volume(fn, theta0, proposal=CurvatureProposal(c), mixture=0.5, **kw)
    with pytest.raises(TypeError, match="resolve"):
        estimate_log_volume(fn, theta0, proposal="ggn", **kw)
    with pytest.raises(ValueError, match="prior='uniform'"):
        estimate_log_volume(fn, theta0, proposal=CurvatureProposal(c), prior=UniformPrior(), **kw)
    with pytest.raises(ValueError, match="D = 10 but the anchor has 11"):
        estimate_log_volume(fn, torch.ones(11, dtype=F64), proposal=CurvatureProposal(c), **kw)
    shard = SimpleNamespace(n_params=d, local_ranges=((0, d),), all_reduce_sum=lambda x: x)
    with pytest.raises(NotImplementedError, match="preconditioner='adam'"):
        CurvatureProposal(c).resolve(GaussianPrior().resolve(theta0), cutoff=0.2, coordinates=shard)
    with pytest.raises(ValueError, match="mixture"):
        CurvatureProposal(c, mixture=1.5)
    with pytest.raises(ValueError, match="tilt"):
        CurvatureProposal(c, tilt=0.0)
    with pytest.raises(ValueError, match="floor_shape"):
        CurvatureProposal(c, floor_shape=-torch.ones(d))
    with pytest.raises(TypeError, match="LowRankCurvature"):
        CurvatureProposal(dense(c))  # type: ignore[arg-type]
