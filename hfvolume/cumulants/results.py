"""Result types of cumulant propagation and of its Monte Carlo baseline (frozen, float64 tensors)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hfvolume.cumulants.flops import FlopCount


@dataclass(frozen=True)
class LayerMoments:
    """Moments at one affine layer l: pre-activation z_l = W_l x_{l−1} + b_l and activation x_l = φ_l(z_l).

    pre_mean, pre_var: ``[n_l]``; pre_cov ``[n_l, n_l]`` or None (mean field, Monte Carlo); pre_third and
    pre_fourth ``[n_l]``: the diagonal third and fourth cumulants κ3(z_i), κ4(z_i) ("kprop" only, else None);
    act_mean, act_var ``[n_l]``; pre_mean_stderr ``[n_l]`` for Monte Carlo, else None; pre_flops: cumulative
    analytic FLOPs spent once this layer's pre-activation moments are known (the cost of stopping there).
    """

    pre_mean: torch.Tensor
    pre_var: torch.Tensor
    act_mean: torch.Tensor
    act_var: torch.Tensor
    pre_cov: torch.Tensor | None = None
    pre_third: torch.Tensor | None = None
    pre_fourth: torch.Tensor | None = None
    pre_mean_stderr: torch.Tensor | None = None
    pre_flops: FlopCount | None = None


@dataclass(frozen=True)
class CumulantResult:
    """Estimate of the output's moments, E[f(x)] and Var[f_i(x)] for x ~ N(μ_0, Σ_0).

    mean, var: ``[out]``; cov ``[out, out]`` ("gaussian", "kprop") or None; third, fourth ``[out]`` diagonal
    cumulants ("kprop") or None; stderr ``[out]`` standard errors of ``mean`` (Monte Carlo only, else None);
    layers: per-layer :class:`LayerMoments` if requested; flops: analytic count; seconds: wall time (not
    deterministic, keep it out of anything compared across runs); settings: the knobs used, plain values.
    """

    method: str
    mean: torch.Tensor
    var: torch.Tensor
    flops: FlopCount
    seconds: float
    cov: torch.Tensor | None = None
    third: torch.Tensor | None = None
    fourth: torch.Tensor | None = None
    stderr: torch.Tensor | None = None
    n_samples: int | None = None
    layers: tuple[LayerMoments, ...] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TailProbability:
    """P(z_i > threshold) per unit of one pre-activation layer.

    probability: ``[n]`` in [0, 1] (estimates below 0 or above 1 are clamped); raw: ``[n]`` before clamping;
    n_clamped: how many units were clamped (Edgeworth corrections can overshoot deep in the tail);
    log_probability: ``[n]`` natural log, exact in the deep tail for the Gaussian methods (log Φ), −inf where the
    estimate was clamped to 0; stderr: ``[n]`` for Monte Carlo, else None.
    """

    method: str
    layer: int
    threshold: torch.Tensor
    probability: torch.Tensor
    raw: torch.Tensor
    log_probability: torch.Tensor
    n_clamped: int
    flops: FlopCount
    seconds: float
    stderr: torch.Tensor | None = None
    n_samples: int | None = None


__all__ = ["CumulantResult", "LayerMoments", "TailProbability"]
