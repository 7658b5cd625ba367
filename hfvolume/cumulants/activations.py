"""Elementwise activations and their Wick coefficients under a Gaussian.

The nonlinear step of cumulant propagation (Wu, Lecomte, Winer, Robinson, Hilton, Christiano, arXiv 2605.05179,
§3) expands each activation around the Gaussian N(μ_i, v_i) that matches a unit's mean and variance. Everything it
needs from the activation φ is the table of *Wick coefficients*

    w(k, p) = E_{Z ~ N(μ, v)} [ ∂^k (φ(Z)^p) ],        k = 0, 1, …,  p = 1, 2, …

(for p = 1 these are the Hermite coefficients up to scale: E[φ(Z) He_k((Z − μ)/σ)] = σ^k w(k, 1), Stein's lemma).

* Kinked and polynomial activations (ReLU, LeakyReLU, Heaviside, identity, square, cube) use closed forms: a
  kink is invisible to Gauss–Hermite quadrature, whose error for ReLU stays near 1e-3 at 100 nodes.
* Smooth activations (tanh, sigmoid, GELU exact and tanh-approximated, SiLU) use 100-node Gauss–Hermite in float64:
  in the Stein form σ^{-k} E[He_k(U) φ(μ + σU)^p] when σ ≥ 0.05, and directly on the k-th derivative (taken by
  autograd) for smaller σ, where dividing by σ^k would amplify rounding. The mean and first Wick coefficient of
  exact GELU have closed forms and use them.
* Variances are clamped at 1e-10, as in the paper's code, so that no unit divides by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

VAR_FLOOR = 1e-10
GH_NODES = 100
_STEIN_MIN_SIGMA = 0.05

KINKED = ("relu", "leaky_relu", "heaviside")
POLYNOMIAL = {"identity": 1, "square": 2, "cube": 3}
SMOOTH = ("tanh", "sigmoid", "gelu", "gelu_tanh", "silu")
NAMES = KINKED + tuple(POLYNOMIAL) + SMOOTH


@dataclass(frozen=True)
class Activation:
    """An elementwise activation φ.

    name: one of ``relu``, ``leaky_relu`` (``slope`` a), ``heaviside`` (φ(z) = 1[z > 0], used for tail
    probabilities), ``identity``, ``square``, ``cube``, ``tanh``, ``sigmoid``, ``gelu`` (z Φ(z)), ``gelu_tanh``
    (the tanh approximation, GPT-2's ``gelu_new``), ``silu`` (z σ(z)).
    """

    name: str
    slope: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"unknown activation {self.name!r}: use one of {NAMES}")
        if not math.isfinite(self.slope):
            raise ValueError(f"activation slope must be finite, got {self.slope!r}")
        if self.name != "leaky_relu" and self.slope != 0.0:
            raise ValueError(f"slope is only meaningful for leaky_relu, got slope={self.slope!r} for {self.name!r}")

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    @property
    def is_smooth(self) -> bool:
        return self.name in SMOOTH

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) elementwise, any shape and dtype (the Monte Carlo forward pass)."""
        name = self.name
        if name == "relu":
            return torch.relu(x)
        if name == "leaky_relu":
            return torch.nn.functional.leaky_relu(x, self.slope)
        if name == "heaviside":
            return (x > 0).to(x.dtype)
        if name in POLYNOMIAL:
            return x ** POLYNOMIAL[name]
        if name == "tanh":
            return torch.tanh(x)
        if name == "sigmoid":
            return torch.sigmoid(x)
        if name == "gelu":
            return torch.nn.functional.gelu(x)
        if name == "gelu_tanh":
            return torch.nn.functional.gelu(x, approximate="tanh")
        return torch.nn.functional.silu(x)


def as_activation(act: Activation | str | None) -> Activation:
    """``None`` → identity, a name → :class:`Activation`, an :class:`Activation` unchanged."""
    if act is None:
        return Activation("identity")
    if isinstance(act, Activation):
        return act
    if isinstance(act, str):
        return Activation(act)
    raise TypeError(f"activation must be an Activation, a name or None, got {type(act).__name__}")


def _smooth_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # Written with elementary ops so that autograd can take four or more derivatives.
    c = math.sqrt(2.0 / math.pi)
    return {
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
        "gelu_tanh": lambda z: 0.5 * z * (1.0 + torch.tanh(c * (z + 0.044715 * z**3))),
        "silu": lambda z: z * torch.sigmoid(z),
    }[name]


# --------------------------------------------------------------------------------------------- Gaussian helpers


def norm_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def norm_cdf(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def hermite_e(k: int, x: torch.Tensor) -> torch.Tensor:
    """Probabilists' Hermite polynomial He_k(x) by the three-term recurrence He_{k+1} = x He_k − k He_{k−1}."""
    prev, cur = torch.ones_like(x), x
    if k == 0:
        return prev
    for j in range(1, k):
        prev, cur = cur, x * cur - j * prev
    return cur


@lru_cache(maxsize=4)
def _gauss_hermite(n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
    weights = weights / math.sqrt(2.0 * math.pi)  # normalised to the standard normal density
    return torch.tensor(nodes, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)


def _standard_moment(i: int) -> float:
    """E[U^i] for U ~ N(0, 1): (i − 1)!! for even i, 0 for odd i."""
    return 0.0 if i % 2 else float(math.prod(range(i - 1, 0, -2)))


def _truncated_moments(alpha: torch.Tensor, m_max: int) -> list[torch.Tensor]:
    """T_m(α) = E[U^m 1{U > −α}], m = 0..m_max, by T_m = (m − 1) T_{m−2} + (−α)^{m−1} φ(α)."""
    pdf = norm_pdf(alpha)
    out = [norm_cdf(alpha), pdf]
    for m in range(2, m_max + 1):
        out.append((m - 1) * out[m - 2] + (-alpha) ** (m - 1) * pdf)
    return out[: m_max + 1]


def _power_moment(mean: torch.Tensor, sigma: torch.Tensor, m: int, truncated: bool) -> torch.Tensor:
    """E[Z^m] (or E[Z^m 1{Z > 0}] if truncated) for Z ~ N(mean, σ²), by the binomial expansion in U."""
    if truncated:
        t = _truncated_moments(mean / sigma, m)
    out = torch.zeros_like(mean)
    for i in range(m + 1):
        ui = t[i] if truncated else _standard_moment(i)
        out = out + math.comb(m, i) * mean ** (m - i) * sigma**i * ui
    return out


def _poly_wick(mean: torch.Tensor, sigma: torch.Tensor, degree: int, k: int, truncated: bool) -> torch.Tensor:
    """E[∂^k (Z^degree 1{Z>0})] (truncated) or E[∂^k Z^degree] for Z ~ N(mean, σ²), closed form.

    For k ≤ degree the derivative is degree!/(degree−k)! Z^{degree−k} (times 1{Z>0}); for k > degree the truncated
    power has a delta term: ∂^k (Z^p 1{Z>0}) = p! δ^{(k−p−1)}(Z), whose expectation is
    p! (−1)^{k−p−1} σ^{−(k−p)} He_{k−p−1}(α) φ(α), α = mean/σ.
    """
    if k <= degree:
        return math.perm(degree, k) * _power_moment(mean, sigma, degree - k, truncated)
    if not truncated:
        return torch.zeros_like(mean)
    j = k - degree - 1
    alpha = mean / sigma
    return math.factorial(degree) * (-1) ** j * sigma ** (-(j + 1)) * hermite_e(j, alpha) * norm_pdf(alpha)


def _heaviside_wick(mean: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """E[∂^k 1{Z > 0}] = Φ(α) for k = 0, else (−1)^{k−1} σ^{−k} He_{k−1}(α) φ(α), α = mean/σ."""
    alpha = mean / sigma
    if k == 0:
        return norm_cdf(alpha)
    return (-1) ** (k - 1) * sigma ** (-k) * hermite_e(k - 1, alpha) * norm_pdf(alpha)


# ----------------------------------------------------------------------------------------------- Wick tables


def _kinked_table(act: Activation, mean: torch.Tensor, sigma: torch.Tensor, k_max: int, p_max: int) -> torch.Tensor:
    out = torch.empty(p_max, k_max + 1, mean.shape[0], dtype=torch.float64)
    for p in range(1, p_max + 1):
        for k in range(k_max + 1):
            if act.name == "heaviside":
                out[p - 1, k] = _heaviside_wick(mean, sigma, k)
            elif act.name in POLYNOMIAL:
                out[p - 1, k] = _poly_wick(mean, sigma, POLYNOMIAL[act.name] * p, k, truncated=False)
            else:
                relu_part = _poly_wick(mean, sigma, p, k, truncated=True)
                if act.name == "relu" or act.slope == 0.0:
                    out[p - 1, k] = relu_part
                else:
                    # LeakyReLU^p = a^p Z^p + (1 − a^p) ReLU(Z)^p (check z > 0 and z < 0 separately).
                    ap = act.slope**p
                    out[p - 1, k] = ap * _poly_wick(mean, sigma, p, k, truncated=False) + (1.0 - ap) * relu_part
    return out


def _smooth_table(act: Activation, mean: torch.Tensor, sigma: torch.Tensor, k_max: int, p_max: int) -> torch.Tensor:
    nodes, weights = _gauss_hermite(GH_NODES)
    fn = _smooth_fn(act.name)
    u = nodes[None, :]
    z = mean[:, None] + sigma[:, None] * u
    out = torch.empty(p_max, k_max + 1, mean.shape[0], dtype=torch.float64)
    he = [hermite_e(k, nodes) * weights for k in range(k_max + 1)]
    small = sigma < _STEIN_MIN_SIGMA
    for p in range(1, p_max + 1):
        g = fn(z) ** p
        for k in range(k_max + 1):
            out[p - 1, k] = (g @ he[k]) / sigma**k
    if bool(small.any()):
        # Direct form E[(φ^p)^{(k)}(Z)] for units where σ^{-k} would amplify rounding.
        zs = z[small].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            for p in range(1, p_max + 1):
                d = fn(zs) ** p
                for k in range(k_max + 1):
                    out[p - 1, k, small] = d.detach() @ weights
                    if k < k_max:
                        d = torch.autograd.grad(d.sum(), zs, create_graph=True)[0]
    if act.name == "gelu":
        # Closed forms: E[Z Φ(Z)] = μ Φ(μ/s) + σ²/s φ(μ/s), E[GELU'(Z)] = Φ(μ/s) + μ φ(μ/s)/s³, s = √(1 + σ²).
        s = torch.sqrt(1.0 + sigma**2)
        a = mean / s
        out[0, 0] = mean * norm_cdf(a) + sigma**2 / s * norm_pdf(a)
        if k_max >= 1:
            out[0, 1] = norm_cdf(a) + mean * norm_pdf(a) / s**3
    return out


def wick_table(act: Activation | str | None, mean: torch.Tensor, var: torch.Tensor, *, k_max: int,
               p_max: int = 1) -> torch.Tensor:
    """Wick coefficients w(k, p) = E_{Z~N(mean, var)}[∂^k φ(Z)^p] for every unit.

    mean, var: ``[n]`` (var clamped at 1e-10). Returns ``[p_max, k_max + 1, n]`` float64 with ``[p − 1, k]`` =
    w(k, p) (arXiv 2605.05179 §3, the nonlinear step's one-dimensional expectations).
    """
    act = as_activation(act)
    if not isinstance(k_max, int) or k_max < 0:
        raise ValueError(f"k_max must be a non-negative int, got {k_max!r}")
    if not isinstance(p_max, int) or p_max < 1:
        raise ValueError(f"p_max must be a positive int, got {p_max!r}")
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    var = torch.as_tensor(var, dtype=torch.float64).reshape(-1)
    if mean.shape != var.shape:
        raise ValueError(f"mean and var must have the same shape, got {tuple(mean.shape)} and {tuple(var.shape)}")
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError("mean and var must be finite (a non-finite moment reached the activation)")
    sigma = torch.sqrt(var.clamp_min(VAR_FLOOR))
    if act.is_smooth:
        return _smooth_table(act, mean, sigma, k_max, p_max)
    return _kinked_table(act, mean, sigma, k_max, p_max)


def wick_coefficients(act: Activation | str | None, mean: torch.Tensor, var: torch.Tensor, k_max: int, *,
                      power: int = 1) -> torch.Tensor:
    """``[k_max + 1, n]``: E[∂^k φ(Z)^power] for k = 0..k_max, Z ~ N(mean_i, var_i) per unit.

    For power = 1 and k = 0 this is E[φ(Z)], for k = 1 E[φ'(Z)] (Stein: Cov(Z, φ(Z)) = var · E[φ'(Z)]).
    """
    return wick_table(act, mean, var, k_max=k_max, p_max=power)[power - 1]


def gaussian_pair_covariance(act: Activation, mean: torch.Tensor, var: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Exact Cov[φ(u), φ(v)] for jointly Gaussian zero-mean (u, v): ``[n, n]`` off-diagonal entries.

    For ReLU this is the arc-cosine kernel (Cho & Saul 2009): E[ReLU u ReLU v] = σ_u σ_v (sin θ + (π − θ) cos θ)/(2π),
    cos θ = ρ, minus E[ReLU u] E[ReLU v] = σ_u σ_v/(2π); LeakyReLU adds the linear parts through Stein's lemma
    (E[u ReLU v] = Cov(u, v)/2 at zero means); the identity is exact for any mean. Other activations raise.
    """
    if act.name == "identity":
        return cov.clone()
    if act.name not in ("relu", "leaky_relu"):
        raise ValueError(f"wick_order='exact' has a closed form only for relu, leaky_relu and identity, "
                         f"not {act.name!r}")
    if bool((mean.abs() > 0).any()):
        worst = float(mean.abs().max())
        raise ValueError(f"wick_order='exact' needs zero-mean pre-activations for {act.name}; max |mean| = {worst:.3g}")
    sd = torch.sqrt(var.clamp_min(VAR_FLOOR))
    outer = sd[:, None] * sd[None, :]
    rho = (cov / outer).clamp(-1.0, 1.0)
    theta = torch.arccos(rho)
    second = outer * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / (2 * math.pi)
    relu_relu = second - outer / (2 * math.pi)  # minus E[ReLU u] E[ReLU v] = σ_u σ_v / (2π)
    if act.name == "relu":
        return relu_relu
    a = act.slope
    return a * a * cov + a * (1 - a) * cov + (1 - a) ** 2 * relu_relu


__all__ = [
    "Activation",
    "GH_NODES",
    "NAMES",
    "VAR_FLOOR",
    "as_activation",
    "gaussian_pair_covariance",
    "hermite_e",
    "wick_coefficients",
    "wick_table",
]
