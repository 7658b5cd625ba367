"""Closed-form oracles for the Wick coefficients, the closures and the tails (C1–C14 of the method's checks).

Values marked "known" are exact constants (1/√2π, ½, …) or were computed independently (adaptive quadrature at
30 digits). Tolerances are 1e-12 where both sides are closed forms in float64; the Gauss–Hermite checks use the
quadrature's own error at 100 nodes, and the truncation checks compare the truncation error itself.
"""
from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfvolume.cumulants import Activation, Affine, GaussianInput, edgeworth_tail, propagate, wick_coefficients
from hfvolume.cumulants.activations import _gauss_hermite, wick_table

F64 = torch.float64
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def relu_mean(mu: float, var: float) -> float:
    s = math.sqrt(var)
    a = mu / s
    return s * math.exp(-a * a / 2) * INV_SQRT_2PI + mu * 0.5 * math.erfc(-a / math.sqrt(2))


# ----------------------------------------------------------------------------------------------- C1, C2, C5


def test_c1_relu_mean_known_values():
    w = wick_coefficients("relu", t(0.0, 1.0), t(1.0, 2.0), 0)[0]
    assert abs(float(w[0]) - 0.3989422804014327) <= 1e-15
    assert abs(float(w[1]) - 1.1996412283742457) <= 1e-15


@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (1.0, 2.0), (-0.7, 0.3), (2.5, 0.5), (0.01, 1e-4), (-3.0, 4.0)])
def test_c1_relu_mean_closed_form(mu, var):
    w = float(wick_coefficients("relu", t(mu), t(var), 0)[0, 0])
    assert w == pytest.approx(relu_mean(mu, var), rel=1e-12, abs=1e-15)


def test_c2_relu_second_moment_and_variance():
    w2 = wick_coefficients("relu", t(0.0, 1.0), t(1.0, 2.0), 0, power=2)[0]
    assert abs(float(w2[0]) - 0.5) <= 1e-15
    assert abs(float(w2[1]) - 2.720141106187292) <= 1e-14
    layer = Affine(torch.eye(1, dtype=F64), None, "relu")
    res = propagate([layer], GaussianInput.standard(1), "mean_field")
    assert abs(float(res.var[0]) - 0.3408450569081046) <= 1e-15  # ½ − 1/(2π)


def test_c5_relu_hermite_coefficients_at_standard_normal():
    w = wick_coefficients("relu", t(0.0), t(1.0), 5)[:, 0]
    known = [INV_SQRT_2PI, 0.5, INV_SQRT_2PI, 0.0, -INV_SQRT_2PI, 0.0]
    torch.testing.assert_close(w, torch.tensor(known, dtype=F64), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------ C3, C4, C5b


def _pair_input(mu, sd, rho):
    cov = torch.tensor([[sd[0] ** 2, rho * sd[0] * sd[1]], [rho * sd[0] * sd[1], sd[1] ** 2]], dtype=F64)
    return GaussianInput(mean=torch.tensor(mu, dtype=F64), cov=cov)


def _relu_product(mu, sd, rho, wick_order):
    layer = Affine(torch.eye(2, dtype=F64), None, "relu")
    res = propagate([layer], _pair_input(mu, sd, rho), "gaussian", wick_order=wick_order)
    return float(res.cov[0, 1] + res.mean[0] * res.mean[1])


@pytest.mark.parametrize("rho,known", [(0.0, 0.15915494309189535), (0.5, 0.30449889052211465), (1.0, 0.5)])
def test_c3_arc_cosine_kernel(rho, known):
    assert abs(_relu_product((0.0, 0.0), (1.0, 1.0), rho, "exact") - known) <= 1e-15


@pytest.mark.parametrize("sd,rho", [((1.0, 2.0), 0.3), ((0.5, 1.5), -0.8), ((1.0, 1.0), 0.95)])
def test_c3_arc_cosine_unequal_scales(sd, rho):
    theta = math.acos(rho)
    known = sd[0] * sd[1] / (2 * math.pi) * (math.sin(theta) + (math.pi - theta) * math.cos(theta))
    assert _relu_product((0.0, 0.0), sd, rho, "exact") == pytest.approx(known, rel=1e-13)


def test_c4_mehler_series_truncation_errors():
    # Exact E[ReLU u ReLU v] at means (0.5, −0.3), sds (1, 1.2), ρ = 0.4 (30-digit quadrature); truncation errors
    # of the Wick series at K = 1, 2, 4, 8, 16 are properties of the series, so they must come out as computed.
    exact = 0.3859245690773058
    errors = {1: 1.2962e-2, 2: 1.0673e-4, 4: 1.1431e-5, 8: 1.2550e-7, 16: 2.18e-11}
    for k, err in errors.items():
        got = _relu_product((0.5, -0.3), (1.0, 1.2), 0.4, k) - exact
        assert abs(got) == pytest.approx(err, rel=2e-3 if k < 16 else 2e-2)


def test_c5_series_of_squared_coefficients_reaches_arc_cosine():
    c = wick_coefficients("relu", t(0.0), t(1.0), 30)[:, 0]
    exact = 0.30449889052211465
    for k_max, err in {2: 4.5e-4, 4: 3.5e-5, 8: 5.6e-7, 30: 6.8e-15}.items():
        s = sum(float(c[k]) ** 2 * 0.5**k / math.factorial(k) for k in range(k_max + 1))
        assert exact - s == pytest.approx(err, rel=0.05 if k_max < 30 else 0.5)


# ------------------------------------------------------------------------------------------------ C6, C7, C8


@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (0.7, 0.2), (-1.5, 3.0), (2.0, 0.01)])
def test_c6_gelu_mean_and_first_coefficient(mu, var):
    s = math.sqrt(1 + var)
    a = mu / s
    pdf, cdf = math.exp(-a * a / 2) * INV_SQRT_2PI, 0.5 * math.erfc(-a / math.sqrt(2))
    w = wick_coefficients("gelu", t(mu), t(var), 1)[:, 0]
    assert float(w[0]) == pytest.approx(mu * cdf + var / s * pdf, rel=1e-13, abs=1e-15)
    assert float(w[1]) == pytest.approx(cdf + mu * pdf / s**3, rel=1e-13, abs=1e-15)


def test_c6_gelu_known_values():
    w = wick_coefficients("gelu", t(0.0), t(1.0), 1)[:, 0]
    assert abs(float(w[0]) - 0.28209479177387814) <= 1e-15
    assert abs(float(w[1]) - 0.5) <= 1e-15


@pytest.mark.parametrize("mu,var", [(0.3, 0.64), (-1.0, 2.25)])
def test_c7_erf_identity_behind_the_gelu_closed_form(mu, var):
    # E[Φ(Z)] = ½(1 + E[erf(Z/√2)]) = Φ(μ/√(1 + σ²)) (the erf identity with a = 1/√2) enters E[GELU'(Z)];
    # check the closed form against direct quadrature of GELU'(z) = Φ(z) + z φ(z).
    ref = _mp_expect(lambda z: mp.ncdf(z) + z * mp.npdf(z), mu, math.sqrt(var), 0)
    assert float(wick_coefficients("gelu", t(mu), t(var), 1)[1, 0]) == pytest.approx(ref, rel=1e-13)


def _mp_expect(fn, mu: float, sigma: float, k: int) -> float:
    # σ^{-k} E[He_k(U) fn(μ + σU)] at 30 digits: Stein's form of E[fn^{(k)}(Z)].
    mp.mp.dps = 20

    def he(x):
        a, b = mp.mpf(1), x
        if k == 0:
            return a
        for j in range(1, k):
            a, b = b, x * b - j * a
        return b

    f = lambda u: he(u) * fn(mu + sigma * u) * mp.npdf(u)  # noqa: E731
    # Split at the kink and around the Gaussian's bulk so that the quadrature sees both.
    points = sorted({-12.0, 0.0, 12.0} | ({-mu / sigma} if abs(mu / sigma) < 12 else set()))
    return float(mp.quad(f, [-mp.inf, *points, mp.inf]) / mp.mpf(sigma) ** k)


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (0.5, 0.3), (-1.0, 0.8), (0.2, 0.02)])
def test_c8_tanh_by_gauss_hermite(mu, sigma):
    w = wick_table("tanh", t(mu), t(sigma**2), k_max=4, p_max=2)
    for p in (1, 2):
        for k in range(5):
            ref = _mp_expect(lambda x: mp.tanh(x) ** p, mu, sigma, k)
            # 100-node Gauss–Hermite on tanh (poles at ±iπ/2) is good to about 1e-7 at σ ≤ 1; the poles come
            # closer to the real axis in the standardised variable as σ grows, and the error with them.
            assert float(w[p - 1, k, 0]) == pytest.approx(ref, abs=1e-7)


@given(mu=st.floats(-3, 3), sigma=st.floats(0.05, 3), k=st.integers(0, 4), p=st.integers(1, 3),
       slope=st.sampled_from([0.0, 0.1]))
@settings(max_examples=12, deadline=None, derandomize=True)
def test_c8_kinked_closed_forms_match_quadrature(mu, sigma, k, p, slope):
    act = Activation("leaky_relu", slope) if slope else Activation("relu")
    got = float(wick_table(act, t(mu), t(sigma**2), k_max=k, p_max=p)[p - 1, k, 0])
    ref = _mp_expect(lambda x: (x if x > 0 else slope * x) ** p, mu, sigma, k)
    assert got == pytest.approx(ref, rel=1e-10, abs=1e-12 * max(1.0, abs(mu) + sigma) ** p / sigma**k)


def test_c8_gauss_hermite_is_not_used_for_relu():
    # Gauss–Hermite at 100 nodes misses ReLU's mean at N(0.3, 1) by ~1e-3; the closed form is exact.
    nodes, weights = _gauss_hermite(100)
    gh = float(torch.relu(0.3 + nodes) @ weights)
    exact = relu_mean(0.3, 1.0)
    assert abs(gh - exact) > 1e-4
    assert float(wick_coefficients("relu", t(0.3), t(1.0), 0)[0, 0]) == pytest.approx(exact, rel=1e-14)


# --------------------------------------------------------------------------------------------- C9, C10, C12


def _random_affine(out, inp, act, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=F64) / math.sqrt(inp)
    b = 0.2 * torch.randn(out, generator=g, dtype=F64) if bias else None
    return Affine(w, b, act)


def _input(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    return GaussianInput(mean=0.3 * torch.randn(n, generator=g, dtype=F64), cov=a @ a.T / n + 0.1 * torch.eye(n))


@pytest.mark.parametrize("method", ["mean_field", "gaussian", "kprop"])
def test_c9_linear_network_is_exact(method):
    layers = [_random_affine(7, 6, None, 1), _random_affine(5, 7, "identity", 2), _random_affine(4, 5, None, 3)]
    inp = _input(6, 0)
    w = layers[2].weight @ layers[1].weight @ layers[0].weight
    mean = layers[2].weight @ (layers[1].weight @ (layers[0].weight @ inp.mean + layers[0].bias) + layers[1].bias) \
        + layers[2].bias
    res = propagate(layers, inp, method)
    torch.testing.assert_close(res.mean, mean, rtol=1e-12, atol=1e-12)
    if method != "mean_field":  # mean field drops the correlations that a linear map creates, by design
        cov = w @ inp.cov @ w.T
        torch.testing.assert_close(res.var, torch.diagonal(cov), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.cov, cov, rtol=1e-12, atol=1e-12)
    if method == "kprop":
        assert float(res.third.abs().max()) == 0.0 and float(res.fourth.abs().max()) == 0.0


@pytest.mark.parametrize("method", ["mean_field", "gaussian", "kprop"])
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_c10_one_hidden_layer_mean_is_exact(method, act):
    first, second = _random_affine(9, 6, act, 4), _random_affine(3, 9, None, 5)
    inp = _input(6, 1)
    z_mean = first.weight @ inp.mean + first.bias
    z_var = torch.diagonal(first.weight @ inp.cov @ first.weight.T)
    exact = second.weight @ wick_coefficients(act, z_mean, z_var, 0)[0] + second.bias
    res = propagate([first, second], inp, method)
    torch.testing.assert_close(res.mean, exact, rtol=1e-12, atol=1e-12)


def test_c10_one_hidden_relu_layer_covariance_exact_with_arc_cosine_kernel():
    first, second = _random_affine(8, 5, "relu", 6, bias=False), _random_affine(3, 8, None, 7)
    inp = GaussianInput.standard(5)
    res = propagate([first, second], inp, "gaussian", wick_order="exact")
    c = first.weight @ first.weight.T
    sd = torch.sqrt(torch.diagonal(c))
    theta = torch.arccos((c / torch.outer(sd, sd)).clamp(-1, 1))
    second_moment = torch.outer(sd, sd) * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / (2 * math.pi)
    act_cov = second_moment - torch.outer(sd, sd) / (2 * math.pi)
    torch.testing.assert_close(res.cov, second.weight @ act_cov @ second.weight.T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["mean_field", "gaussian", "kprop"])
def test_c12_first_layer_tail_is_gaussian(method):
    from hfvolume.cumulants import tail_probability

    layer = _random_affine(6, 4, "relu", 8)
    inp = _input(4, 2)
    mu = layer.weight @ inp.mean + layer.bias
    sd = torch.sqrt(torch.diagonal(layer.weight @ inp.cov @ layer.weight.T))
    for b in (0.0, 1.0, 3.0):
        res = tail_probability([layer], b, layer=0, method=method, inp=inp)
        torch.testing.assert_close(res.probability, torch.special.ndtr((mu - b) / sd), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(res.log_probability, torch.special.log_ndtr((mu - b) / sd), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------- C13, C14


def test_c13_edgeworth_tail_of_chi_square():
    # χ²_100: mean k, variance 2k, κ3 = 8k; threshold 3 standard deviations above the mean.
    k = 100.0
    b = k + 3 * math.sqrt(2 * k)
    gauss = float(edgeworth_tail(t(k), t(2 * k), b)[0])
    corrected = float(edgeworth_tail(t(k), t(2 * k), b, third=t(8 * k))[0])
    assert gauss == pytest.approx(0.5 * math.erfc(3 / math.sqrt(2)), rel=1e-13)
    z = 3.0
    expected = gauss + math.exp(-z * z / 2) * INV_SQRT_2PI * 8 * k * (z * z - 1) / (6 * (2 * k) ** 1.5)
    assert corrected == pytest.approx(expected, rel=1e-13)
    assert corrected == pytest.approx(3.0213e-3, abs=5e-8)  # exact χ² tail: 3.4367e-3, Gaussian: 1.3499e-3


def test_c14_square_then_cube_is_exact_with_kprop():
    # x ~ N(0, 1): y = x² has cumulants (1, 2, 8, 48); E[y³] = E[x⁶] = 15 needs κ3 of y, which K = 3 carries.
    one = torch.ones(1, 1, dtype=F64)
    layers = [Affine(one, None, "square"), Affine(one, None, "cube"), Affine(one, None, None)]
    res = propagate(layers, GaussianInput.standard(1), "kprop", return_layers=True)
    assert abs(float(res.mean[0]) - 15.0) <= 1e-12
    assert abs(float(res.layers[1].pre_third[0]) - 8.0) <= 1e-12
    assert abs(float(res.layers[1].pre_fourth[0]) - 48.0) <= 1e-12
    assert abs(float(propagate(layers, GaussianInput.standard(1), "gaussian").mean[0]) - 7.0) <= 1e-12
