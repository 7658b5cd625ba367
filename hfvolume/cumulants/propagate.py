"""Cumulant propagation through an MLP: mean field, Gaussian closure, and (in :mod:`.kprop`) third-order kprop.

Wu, Lecomte, Winer, Robinson, Hilton, Christiano, *Estimating the expected output of wide random MLPs more
efficiently than sampling* (arXiv 2605.05179). With z_l = W_l x_{l−1} + b_l and x_l = φ_l(z_l), each method carries
a truncated description of the distribution of x_l layer by layer, without samples:

* the linear step is exact: cumulants transform multilinearly, K_d(z) = K_d(x) ×_1 W ⋯ ×_d W, and K_1 gains b;
* the nonlinear step expands φ around the Gaussian N(μ_i, v_i) that matches each unit (Wick coefficients
  w_i(k, p) = E[∂^k φ(Z)^p], :mod:`.activations`).

Methods (the paper's algorithm with budget K = 1, 2, 3; MSE of the mean at fixed depth O(n^{−K})):

``"mean_field"``   mean and per-unit variance. ``variance="diagonal"``: v_z = (W ∘ W) v_x;
                   ``"isotropic"`` (the paper's K = 1): v_{z,i} = c ‖W_i‖², c = mean_j Var[φ(z_j)].
``"gaussian"``     mean and full covariance (K = 2): C_z = W C_x Wᵀ, μ_x = E[φ(z)], C_x,ii = Var[φ(z_i)] and, for
                   i ≠ j, the Mehler series C_x,ij = Σ_{k=1}^{K_w} C_z,ij^k / k! · w_i(k) w_j(k) (``wick_order`` K_w;
                   1 is the paper's algorithm, ``"exact"`` the closed-form kernel where one exists).
``"kprop"``        K = 3: adds the third cumulant (factorised) and the isotropic trace of the fourth.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from hfvolume.cumulants.activations import GH_NODES, VAR_FLOOR, gaussian_pair_covariance, wick_table
from hfvolume.cumulants.flops import FlopTally
from hfvolume.cumulants.gaussian import GaussianInput
from hfvolume.cumulants.layers import Affine, check_layers
from hfvolume.cumulants.results import CumulantResult, LayerMoments

METHODS = ("mean_field", "gaussian", "kprop")


def _check_input(layers: list[Affine], inp: GaussianInput | None) -> GaussianInput:
    n0 = layers[0].in_features
    if inp is None:
        return GaussianInput.standard(n0)
    if not isinstance(inp, GaussianInput):
        raise TypeError(f"inp must be a GaussianInput, got {type(inp).__name__}")
    if inp.dim != n0:
        raise ValueError(f"the input has {inp.dim} dimensions but the first layer takes {n0}")
    return inp


def _linear_mean(layer: Affine, mean: torch.Tensor, tally: FlopTally) -> torch.Tensor:
    tally.mm(layer.out_features, layer.in_features, 1)
    z = layer.weight @ mean
    if layer.bias is not None:
        tally.ew(layer.out_features)
        z = z + layer.bias
    return z


def _wick(layer: Affine, mean: torch.Tensor, var: torch.Tensor, k_max: int, p_max: int,
          tally: FlopTally) -> torch.Tensor:
    tally.wick(mean.shape[0], p_max * (k_max + 1), smooth=layer.act.is_smooth, nodes=GH_NODES)
    return wick_table(layer.act, mean, var, k_max=k_max, p_max=p_max)


# ------------------------------------------------------------------------------------------------- mean field


def _mean_field(layers: list[Affine], inp: GaussianInput, *, variance: str, return_layers: bool,
                tally: FlopTally) -> tuple[torch.Tensor, torch.Tensor, list[LayerMoments]]:
    mean, var = inp.mean, None
    moments: list[LayerMoments] = []
    for idx, layer in enumerate(layers):
        out, n_in = layer.out_features, layer.in_features
        z_mean = _linear_mean(layer, mean, tally)
        if idx == 0 and inp.cov is not None:
            # First layer exact for any Gaussian input: diag(W Σ Wᵀ) = rowsum((W Σ) ∘ W).
            tally.mm(out, n_in, n_in)
            tally.ew(2 * out * n_in)
            z_var = ((layer.weight @ inp.cov) * layer.weight).sum(1)
        elif idx == 0 or variance == "diagonal":
            x_var = inp.var if idx == 0 else var
            tally.ew(out * n_in)
            tally.mm(out, n_in, 1)
            z_var = (layer.weight**2) @ x_var
        else:
            # Isotropic (the paper's K = 1): every input unit carries the mean variance c.
            tally.ew(2 * out * n_in + n_in)
            z_var = var.mean() * (layer.weight**2).sum(1)
        pre_flops = tally.freeze()
        if layer.act is None:
            mean, var = z_mean, z_var
        else:
            w = _wick(layer, z_mean, z_var, 0, 2, tally)
            tally.ew(3 * out)
            mean, var = w[0, 0], (w[1, 0] - w[0, 0] ** 2).clamp_min(0.0)
        if return_layers:
            moments.append(LayerMoments(pre_mean=z_mean, pre_var=z_var, act_mean=mean, act_var=var,
                                        pre_flops=pre_flops))
    return mean, var, moments


# --------------------------------------------------------------------------------------------- Gaussian closure


def covariance_transfer(layer: Affine, z_mean: torch.Tensor, z_cov: torch.Tensor, wick_order: int | str,
                        tally: FlopTally) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_x ``[n]``, C_x ``[n, n]``) of x = φ(z) for Gaussian z ~ N(z_mean, z_cov), Gaussian closure.

    Diagonal exact (Var[φ(z_i)]); off-diagonal the Mehler series truncated at ``wick_order`` (arXiv 2605.05179
    §3, K = 2 keeps the first term), or the closed-form kernel for ``"exact"``.
    """
    n = z_mean.shape[0]
    z_var = torch.diagonal(z_cov).clamp_min(VAR_FLOOR)
    k_max = 1 if wick_order == "exact" else int(wick_order)
    w = _wick(layer, z_mean, z_var, k_max, 2, tally)
    mean = w[0, 0]
    var = (w[1, 0] - mean**2).clamp_min(0.0)
    if wick_order == "exact":
        tally.ew(20 * n * n)
        cov = gaussian_pair_covariance(layer.act, z_mean, z_var, z_cov)
    else:
        power = z_cov.clone()
        cov = torch.zeros_like(z_cov)
        for k in range(1, k_max + 1):
            if k > 1:
                power = power * z_cov
            tally.ew(4 * n * n)
            cov = cov + power * torch.outer(w[0, k], w[0, k]) / math.factorial(k)
    cov.diagonal().copy_(var)
    return mean, cov


def _gaussian(layers: list[Affine], inp: GaussianInput, *, wick_order: int | str, return_layers: bool,
              tally: FlopTally) -> tuple[torch.Tensor, torch.Tensor, list[LayerMoments]]:
    mean, cov = inp.mean, inp.covariance()
    moments: list[LayerMoments] = []
    for idx, layer in enumerate(layers):
        out, n_in = layer.out_features, layer.in_features
        z_mean = _linear_mean(layer, mean, tally)
        if idx == 0 and inp.var is not None:
            tally.ew(out * n_in)
            tally.mm(out, n_in, out)
            z_cov = (layer.weight * inp.var[None, :]) @ layer.weight.T
        else:
            tally.mm(out, n_in, n_in)
            tally.mm(out, n_in, out)
            z_cov = (layer.weight @ cov) @ layer.weight.T
        z_cov = 0.5 * (z_cov + z_cov.T)
        pre_flops = tally.freeze()
        if layer.act is None:
            mean, cov = z_mean, z_cov
        else:
            mean, cov = covariance_transfer(layer, z_mean, z_cov, wick_order, tally)
        if return_layers:
            moments.append(LayerMoments(pre_mean=z_mean, pre_var=torch.diagonal(z_cov).clone(), pre_cov=z_cov,
                                        act_mean=mean, act_var=torch.diagonal(cov).clone(), pre_flops=pre_flops))
    return mean, cov, moments


# ------------------------------------------------------------------------------------------------------ driver


def _check_options(method: str, wick_order: int | str, variance: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if variance not in ("diagonal", "isotropic"):
        raise ValueError(f"variance must be 'diagonal' or 'isotropic', got {variance!r}")
    if wick_order != "exact" and (isinstance(wick_order, bool) or not isinstance(wick_order, int) or wick_order < 1):
        raise ValueError(f"wick_order must be a positive int or 'exact', got {wick_order!r}")


def propagate(layers: list[Affine], inp: GaussianInput | None = None, method: str = "gaussian", *,
              wick_order: int | str = 1, variance: str = "diagonal", return_layers: bool = False) -> CumulantResult:
    """Estimate E[f(x)] (and the output's variance) for x ~ ``inp`` by cumulant propagation, without sampling.

    layers: from :func:`mlp_layers` (or built by hand); inp: default N(0, I). method: ``"mean_field"`` (MSE of the
    mean O(1/n) at fixed depth, ≈ 5 n² FLOPs per layer), ``"gaussian"`` (O(1/n²), ≈ 4 n³), ``"kprop"``
    (O(1/n³), third cumulant factorised, O(n³ · depth) per layer). Returns a :class:`CumulantResult` with ``mean``
    and ``var`` ``[out]``, ``cov`` ``[out, out]`` (not for mean field), per-layer moments if ``return_layers``,
    and the analytic FLOP count. Deterministic: float64, no random numbers.
    """
    layers = check_layers(layers)
    _check_options(method, wick_order, variance)
    inp = _check_input(layers, inp)
    tally = FlopTally()
    start = time.perf_counter()
    settings: dict[str, Any] = {"method": method}
    cov = third = fourth = None
    with torch.no_grad():
        if method == "mean_field":
            settings["variance"] = variance
            mean, var, moments = _mean_field(layers, inp, variance=variance, return_layers=return_layers,
                                             tally=tally)
        elif method == "gaussian":
            settings["wick_order"] = wick_order
            mean, cov, moments = _gaussian(layers, inp, wick_order=wick_order, return_layers=return_layers,
                                           tally=tally)
            var = torch.diagonal(cov).clone()
        else:
            from hfvolume.cumulants.kprop import kprop

            settings["k_max"] = 3
            mean, cov, third, fourth, moments = kprop(layers, inp, return_layers=return_layers, tally=tally)
            var = torch.diagonal(cov).clone()
    for name, t in (("mean", mean), ("var", var)):
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"propagation produced a non-finite output {name}; the network's activations "
                                     "overflow float64 under this input")
    return CumulantResult(method=method, mean=mean, var=var, cov=cov, third=third, fourth=fourth,
                          flops=tally.freeze(), seconds=time.perf_counter() - start,
                          layers=tuple(moments) if return_layers else None, settings=settings)


__all__ = ["METHODS", "covariance_transfer", "propagate"]
