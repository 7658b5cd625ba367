"""The priors' part of the local volume: the Gaussian prior's log mass along a ray, its caps, and the uniform prior.

Along a unit direction w, a Gaussian prior N(m, diag(s²)) gives f(w) = |S^{D−1}| e^c ∫_0^ρ t^{D−1} e^{−a t²/2 + b t} dt
and the uniform prior f(w) = V_D ρ^D (:mod:`hfvolume.volume.priors`); the tests check closed-form values of both.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hfvolume import GaussianPrior, UniformPrior, estimate_log_volume
from hfvolume.volume.numerics import log_unit_ball_volume


def run(fn, anchor, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("batched", True)
    kw.setdefault("batch_size", 16)
    return estimate_log_volume(fn, anchor, **kw)


def test_direction_orthogonal_to_offset_gets_exactly_the_norm_term():
    d, sigma = 500, 0.3
    anchor = torch.zeros(d, dtype=torch.float64)
    anchor[0] = 2.0
    prior = GaussianPrior(sigma=sigma).resolve(anchor)
    w = torch.zeros(1, d, dtype=torch.float64)
    w[0, 1] = 1.0
    rays = prior.rays(w)
    val = rays.log_mass(np.array([1.0]), np.array([True]))[0]
    assert val == pytest.approx(-(2.0**2) / (2 * sigma**2), abs=1e-9)


def test_uniform_prior_cap_flags_unbounded_and_lower_bound():
    anchor = torch.ones(5, dtype=torch.float64)
    res = run(lambda th: torch.zeros(th.shape[0], dtype=th.dtype), anchor, cutoff=0.1,
              prior=UniformPrior(max_radius=10.0), n_directions=4)
    assert res.n_unbounded == 4 and res.is_lower_bound
    assert res.log_volume == pytest.approx(log_unit_ball_volume(5) + 5 * math.log(10.0))


def test_gaussian_rays_cap_floor_bounds_the_caps_and_batches_concatenate():
    from hfvolume.volume.priors import concatenate_rays, resolve_prior

    anchor = torch.randn(40, generator=torch.Generator().manual_seed(0))
    prior = resolve_prior(GaussianPrior(sigma=0.5), anchor, default_max_radius=1e3)
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    w /= w.norm(dim=1, keepdim=True)
    whole, parts = prior.rays(w), [prior.rays(w[:2]), prior.rays(w[2:])]
    assert (whole.cap_floor < whole.cap).all()
    np.testing.assert_array_equal(whole.cap_at(np.array([4, 1])), whole.cap[[4, 1]])
    joined = concatenate_rays(parts)
    radii, capped = np.linspace(0.1, 2.0, 6), np.array([False] * 5 + [True])
    np.testing.assert_array_equal(joined.log_mass(radii, capped), whole.log_mass(radii, capped))
    uniform = resolve_prior(UniformPrior(), anchor, default_max_radius=1e3).rays(w)
    with pytest.raises(TypeError, match="different priors"):
        concatenate_rays([whole, uniform])
    with pytest.raises(ValueError, match="at least one"):
        concatenate_rays([])
