"""Expected outputs and tail probabilities P(z_i > b) of one pre-activation layer.

A tail probability is the mean of a Heaviside unit appended after the layer, H(z_i − b) (arXiv 2605.05179 §6,
rare events). Under the Gaussian closures it is Φ((μ_i − b)/σ_i). Under "kprop" the Heaviside's Wick
coefficients pick up the third and fourth cumulants — the first Edgeworth corrections:

    P(z_i > b) ≈ Φ(α) + κ3/(6σ³) He_2(α) φ(α) − κ4/(24σ⁴) He_3(α) φ(α),     α = (μ_i − b)/σ_i,

(E[∂^k H(Z − b)] = (−1)^{k−1} σ^{−k} He_{k−1}(α) φ(α), Stein's lemma). Deep in the tail the corrections can
overshoot below 0: such estimates are clamped to 0, counted in ``n_clamped``, and get log-probability −inf.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from torch import nn

from hfvolume.cumulants.activations import VAR_FLOOR, Activation, wick_table
from hfvolume.cumulants.flops import CLOSED_FORM_COST, FlopCount
from hfvolume.cumulants.gaussian import GaussianInput
from hfvolume.cumulants.layers import Affine, check_layers, mlp_layers
from hfvolume.cumulants.montecarlo import monte_carlo, monte_carlo_tails
from hfvolume.cumulants.propagate import METHODS, propagate
from hfvolume.cumulants.results import TailProbability

_HEAVISIDE = Activation("heaviside")


def as_layers(model: nn.Module | Sequence[Affine]) -> list[Affine]:
    """An ``nn.Module`` through :func:`mlp_layers`; a list of :class:`Affine` as is."""
    if isinstance(model, nn.Module):
        return mlp_layers(model)
    return check_layers(list(model))


def edgeworth_tail(mean: torch.Tensor, var: torch.Tensor, threshold: torch.Tensor | float, *,
                   third: torch.Tensor | None = None, fourth: torch.Tensor | None = None) -> torch.Tensor:
    """Unclamped P(z > threshold) per unit: Φ(α) plus, if given, the κ3 and κ4 Edgeworth terms (module docstring).

    mean, var, third, fourth: ``[n]`` (cumulants of z_i); threshold: scalar or ``[n]``. Returns ``[n]`` float64.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64)
    b = torch.as_tensor(threshold, dtype=torch.float64).expand_as(mean)
    k_max = 0 if third is None and fourth is None else 4
    w = wick_table(_HEAVISIDE, mean - b, var, k_max=k_max, p_max=1)[0]
    p = w[0].clone()
    if third is not None:
        p = p + third * w[3] / 6.0
    if fourth is not None:
        p = p + fourth * w[4] / 24.0
    return p


def log_edgeworth_tail(mean: torch.Tensor, var: torch.Tensor, threshold: torch.Tensor, *,
                       third: torch.Tensor | None = None, fourth: torch.Tensor | None = None) -> torch.Tensor:
    """log P(z > threshold) ``[n]`` in log space: log Φ(α) + log1p(c), with the Edgeworth terms relative to Φ(α),
    c = (κ3/(6σ³) He_2(α) − κ4/(24σ⁴) He_3(α)) φ(α)/Φ(α), and φ/Φ = exp(log φ − log Φ) so that nothing underflows
    deep in the tail; −inf where c ≤ −1 (the estimate is clamped to 0)."""
    sigma = torch.sqrt(var.clamp_min(VAR_FLOOR))
    alpha = (mean - threshold) / sigma
    log_cdf = torch.special.log_ndtr(alpha)
    if third is None and fourth is None:
        return log_cdf
    ratio = torch.exp(-0.5 * alpha * alpha - 0.5 * math.log(2 * math.pi) - log_cdf)
    c = torch.zeros_like(alpha)
    if third is not None:
        c = c + third / (6.0 * sigma**3) * (alpha * alpha - 1.0)
    if fourth is not None:
        c = c - fourth / (24.0 * sigma**4) * (alpha**3 - 3.0 * alpha)
    c = c * ratio
    return torch.where(c > -1.0, log_cdf + torch.log1p(c.clamp_min(-1.0 + 1e-300)), torch.full_like(c, -math.inf))


def _resolve_layer(layers: list[Affine], layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must be an int in [{-len(layers)}, {len(layers) - 1}], got {layer!r}")
    return layer % len(layers)


def _threshold(threshold: float | torch.Tensor, n: int) -> torch.Tensor:
    b = torch.as_tensor(threshold, dtype=torch.float64)
    if b.ndim > 1 or (b.ndim == 1 and b.shape[0] != n):
        raise ValueError(f"threshold must be a scalar or have shape ({n},), got {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return b.expand(n).clone()


def tail_probability(model: nn.Module | Sequence[Affine], threshold: float | torch.Tensor, *, layer: int = -1,
                     method: str = "gaussian", inp: GaussianInput | None = None, wick_order: int | str = 1,
                     variance: str = "diagonal", n_samples: int = 65536, seed: int = 0,
                     batch_size: int = 8192) -> TailProbability:
    """P(z_{layer, i} > threshold) for every unit i of pre-activation ``layer`` (0-based over the affine layers;
    −1 the output), x ~ ``inp`` (default N(0, I)).

    method: ``"mean_field"``, ``"gaussian"`` (Φ((μ − b)/σ) under each closure), ``"kprop"`` (with the κ3, κ4
    Edgeworth terms) or ``"monte_carlo"`` (``n_samples`` samples, ``stderr`` = √(p(1 − p)/N)).
    """
    layers = as_layers(model)
    idx = _resolve_layer(layers, layer)
    used = layers[: idx + 1]
    n = used[-1].out_features
    b = _threshold(threshold, n)
    start = time.perf_counter()
    if method == "monte_carlo":
        p, stderr, flops = monte_carlo_tails(used, inp, b[None, :], layer=idx, n_samples=n_samples,
                                             batch_size=batch_size, seed=seed)
        p, stderr = p[0], stderr[0]
        with torch.no_grad():
            log_p = torch.where(p > 0, torch.log(p.clamp_min(1e-300)), torch.full_like(p, -math.inf))
        return TailProbability(method=method, layer=idx, threshold=b, probability=p, raw=p.clone(),
                               log_probability=log_p, n_clamped=0, flops=flops,
                               seconds=time.perf_counter() - start, stderr=stderr, n_samples=n_samples)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS + ('monte_carlo',)}")
    res = propagate(used, inp, method, wick_order=wick_order, variance=variance, return_layers=True)
    mom = res.layers[-1]
    if method == "kprop":
        raw = edgeworth_tail(mom.pre_mean, mom.pre_var, b, third=mom.pre_third, fourth=mom.pre_fourth)
        extra = 3 * CLOSED_FORM_COST * n
    else:
        raw = edgeworth_tail(mom.pre_mean, mom.pre_var, b)
        extra = CLOSED_FORM_COST * n
    prob = raw.clamp(0.0, 1.0)
    n_clamped = int(((raw < 0) | (raw > 1)).sum())
    if method == "kprop":
        log_p = log_edgeworth_tail(mom.pre_mean, mom.pre_var, b, third=mom.pre_third, fourth=mom.pre_fourth)
        log_p = log_p.clamp_max(0.0)
    else:
        log_p = log_edgeworth_tail(mom.pre_mean, mom.pre_var, b)
    return TailProbability(method=method, layer=idx, threshold=b, probability=prob, raw=raw, log_probability=log_p,
                           n_clamped=n_clamped, flops=res.flops + FlopCount(0, extra),
                           seconds=time.perf_counter() - start)


def expected_output(model: nn.Module | Sequence[Affine], inp: GaussianInput | None = None, *,
                    method: str = "gaussian", wick_order: int | str = 1, variance: str = "diagonal") -> torch.Tensor:
    """E[f(x)] ``[out]`` float64 for x ~ ``inp`` (default N(0, I)); a shortcut for ``propagate(...).mean``."""
    if method == "monte_carlo":
        return monte_carlo(as_layers(model), inp).mean
    return propagate(as_layers(model), inp, method, wick_order=wick_order, variance=variance).mean


__all__ = ["as_layers", "edgeworth_tail", "expected_output", "log_edgeworth_tail", "tail_probability"]
