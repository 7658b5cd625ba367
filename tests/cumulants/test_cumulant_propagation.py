"""Propagation against Monte Carlo, identities between the methods, FLOP counts, determinism, input handling."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hfvolume.cumulants import (
    Affine,
    GaussianInput,
    monte_carlo,
    monte_carlo_tails,
    propagate,
    tail_probability,
)

F64 = torch.float64


def he_net(n: int, depth: int, seed: int, act: str = "relu", bias: float = 0.1) -> list[Affine]:
    """The paper's random MLP: weights N(0, w_var/fan_in), w_var = 1 on the first layer and 2 after (He)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(depth + 1):
        w = torch.randn(n, n, generator=g, dtype=F64) * math.sqrt((1.0 if i == 0 else 2.0) / n)
        b = bias * torch.randn(n, generator=g, dtype=F64) if bias else None
        layers.append(Affine(w, b, act if i < depth else None))
    return layers


# Under exactness each z-score (estimate − MC)/SE is N(0, 1): max |z| over 32 outputs exceeds 6 with probability
# ≈ 32 · 2e-9. The sample sizes keep each method's own O(n^{-k/2}) bias (k = 1, 2, 3) below one standard error at
# n = 32, depth ≤ 3, so the band tests agreement rather than the truncation.
SAMPLES = {"mean_field": 256, "gaussian": 512, "kprop": 4096}


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("method", ["mean_field", "gaussian", "kprop"])
def test_agrees_with_monte_carlo_within_six_standard_errors(method, depth, act):
    layers = he_net(32, depth, seed=depth, act=act)
    est = propagate(layers, None, method)
    mc = monte_carlo(layers, None, SAMPLES[method], seed=11)
    z = (est.mean - mc.mean) / mc.stderr
    assert float(z.abs().max()) < 6.0


def test_error_shrinks_with_the_budget():
    layers = he_net(32, 3, seed=3)
    truth = monte_carlo(layers, None, 2**17, seed=5)
    noise = float((truth.var / truth.n_samples).mean())
    mse = {m: float(((propagate(layers, None, m).mean - truth.mean) ** 2).mean()) - noise
           for m in ("mean_field", "gaussian", "kprop")}
    assert mse["kprop"] < mse["gaussian"] < mse["mean_field"]


def test_kprop_first_nonlinearity_equals_gaussian_with_two_wick_orders():
    # At the first nonlinearity z is exactly Gaussian (K3 = K4 = 0): kprop's covariance update is the Mehler
    # series to second order, and its means are the Gaussian ones.
    layers = he_net(12, 1, seed=1)
    kp = propagate(layers, None, "kprop", return_layers=True)
    ga = propagate(layers, None, "gaussian", wick_order=2, return_layers=True)
    torch.testing.assert_close(kp.layers[0].act_mean, ga.layers[0].act_mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(kp.cov, ga.cov, rtol=1e-12, atol=1e-14)


def test_isotropic_mean_field_uses_the_mean_activation_variance():
    layers = he_net(10, 2, seed=2, bias=0.0)
    res = propagate(layers, None, "mean_field", variance="isotropic", return_layers=True)
    for prev, layer, mom in zip(res.layers, layers[1:], res.layers[1:]):
        expected = prev.act_var.mean() * (layer.weight**2).sum(1)
        torch.testing.assert_close(mom.pre_var, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("method", ["gaussian", "kprop"])
def test_analytic_matmul_flops_match_torch_counter(method):
    # torch's counter sees matrix–matrix products only; the analytic count adds the matrix–vector products of the
    # means (2 · out · in per layer).
    layers = he_net(16, 3, seed=4)
    with FlopCounterMode(display=False) as counter:
        res = propagate(layers, None, method)
    matvec = sum(2 * layer.out_features * layer.in_features for layer in layers)
    assert res.flops.matmul - matvec == counter.get_total_flops()


def test_flops_scale_as_documented():
    small, big = he_net(32, 4, 0), he_net(64, 4, 0)
    for method, power in (("mean_field", 2), ("gaussian", 3)):
        ratio = propagate(big, None, method).flops.matmul / propagate(small, None, method).flops.matmul
        assert ratio == pytest.approx(2**power, rel=0.05)


@pytest.mark.parametrize("method", ["mean_field", "gaussian", "kprop"])
def test_propagation_is_deterministic(method):
    layers = he_net(24, 3, seed=6)
    a, b = propagate(layers, None, method), propagate(layers, None, method)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    assert a.flops == b.flops


def test_monte_carlo_depends_only_on_seed():
    layers = he_net(8, 2, seed=7)
    a, b = monte_carlo(layers, None, 3000, seed=1, batch_size=1000), monte_carlo(layers, None, 3000, seed=1,
                                                                                 batch_size=1000)
    c = monte_carlo(layers, None, 3000, seed=2, batch_size=1000)
    assert torch.equal(a.mean, b.mean) and not torch.equal(a.mean, c.mean)
    assert a.flops.total == 3000 * (sum(2 * 64 + 8 + 8 for _ in layers) + 2 * 8)


def test_monte_carlo_with_full_input_covariance_matches_its_moments():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    inp = GaussianInput(mean=torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64), cov=a @ a.T)
    layer = Affine(torch.eye(4, dtype=F64), None, None)
    res = monte_carlo([layer], inp, 2**16, seed=3, dtype=F64)
    z = (res.mean - inp.mean) / res.stderr
    assert float(z.abs().max()) < 6.0  # four z-scores, each N(0, 1)
    # Sample variance of a Gaussian: relative standard error √(2/(N − 1)).
    assert float(((res.var / torch.diagonal(inp.cov)) - 1).abs().max()) < 6 * math.sqrt(2 / (2**16 - 1))


def test_tail_probability_monte_carlo_and_kprop_agree():
    layers = he_net(32, 2, seed=8)
    mc = tail_probability(layers, 1.0, layer=1, method="monte_carlo", n_samples=2**14, seed=4)
    kp = tail_probability(layers, 1.0, layer=1, method="kprop")
    assert kp.n_clamped == 0 and mc.stderr is not None
    # kprop's tail error at n = 32 is far below the MC standard error at 2^14 samples (≈ 3e-3 at p ≈ 0.2).
    assert float(((kp.probability - mc.probability) / mc.stderr.clamp_min(1e-12)).abs().max()) < 6.0


def test_monte_carlo_tails_counts_all_thresholds_in_one_pass():
    layers = he_net(8, 1, seed=9)
    p, se, flops = monte_carlo_tails(layers, None, torch.tensor([0.0, 1.0, 2.0]), layer=0, n_samples=5000)
    assert p.shape == (3, 8) and bool((p[0] >= p[1]).all() and (p[1] >= p[2]).all())
    single = tail_probability(layers, 1.0, layer=0, method="monte_carlo", n_samples=5000)
    assert torch.equal(single.probability, p[1])


def test_kprop_tail_clamps_and_counts_negative_estimates():
    from hfvolume.cumulants import edgeworth_tail

    raw = edgeworth_tail(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64), 6.0,
                         third=torch.tensor([-3.0, 0.0], dtype=F64))
    assert float(raw[0]) < 0 < float(raw[1])


def test_input_validation():
    layers = he_net(4, 1, seed=0)
    with pytest.raises(ValueError, match="method"):
        propagate(layers, None, "exactly")
    with pytest.raises(ValueError, match="wick_order"):
        propagate(layers, None, "gaussian", wick_order=0)
    with pytest.raises(ValueError, match="3 dimensions"):
        propagate(layers, GaussianInput.standard(3))
    with pytest.raises(ValueError, match="layer"):
        tail_probability(layers, 0.0, layer=5)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianInput(mean=torch.zeros(2))
    with pytest.raises(ValueError, match="n_samples"):
        monte_carlo(layers, None, 0)


def test_from_data_matches_the_sample_moments_for_any_batching():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 2, 3, generator=g, dtype=F64) * 5 + 100
    flat = x.reshape(300, 6)
    one = GaussianInput.from_data([x])
    many = GaussianInput.from_data([(x[i : i + 7],) for i in range(0, 300, 7)])
    torch.testing.assert_close(one.mean, flat.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(one.cov, torch.cov(flat.T), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(many.cov, one.cov, rtol=1e-10, atol=1e-12)
    labels = torch.zeros(300, dtype=torch.long)
    keyed = GaussianInput.from_data([{"pixel_values": flat[:100], "labels": labels[:100]},
                                     {"pixel_values": flat[100:], "labels": labels[100:]}])
    torch.testing.assert_close(keyed.mean, one.mean, rtol=1e-13, atol=0)
