"""A curvature model of the behaviour around θ0: low rank plus an isotropic floor.

    Ĝ = U diag(λ) Uᵀ + λ₀ (I − U Uᵀ),      U ∈ R^{D×k} orthonormal, λ ∈ R^k, λ₀ ≥ 0,

so that Δ(θ0 + x) ≈ ½ xᵀ Ĝ x near the anchor. For the KL behaviour the Hessian at θ0 is exactly the Gauss–Newton
matrix G = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n (J_n the Jacobian of example n's logits), which has rank at most
N·(C − 1); U and λ are its top eigenpairs. G's null space is not flat: higher-order terms bound the region there,
and λ₀ stands for them (an effective curvature 2ε/r² measured along pilot rays of radius r orthogonal to U).

This module only holds the model; :mod:`hfvolume.models.curvature` builds it from a network, and the curvature
proposal uses it to tilt the prior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LowRankCurvature:
    """Ĝ = U diag(λ) Uᵀ + λ₀ (I − UUᵀ) on R^D.

    eigenvalues: ``[k]`` float64 λ_j ≥ 0 (behaviour units per squared parameter unit, e.g. nats for KL).
    basis: ``[D, k]`` float64 U with orthonormal columns (k may be 0).
    floor: λ₀ ≥ 0, the curvature assumed on the orthogonal complement of U.
    info: JSON-safe description of how the model was obtained (method, rank, the floor's measurement, cost).
    """

    eigenvalues: torch.Tensor
    basis: torch.Tensor
    floor: float
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lam, u = self.eigenvalues, self.basis
        if not isinstance(lam, torch.Tensor) or not isinstance(u, torch.Tensor):
            raise TypeError("eigenvalues and basis must be tensors")
        if lam.ndim != 1 or u.ndim != 2 or u.shape[1] != lam.shape[0]:
            raise ValueError(f"need eigenvalues [k] and basis [D, k]; got {tuple(lam.shape)} and {tuple(u.shape)}")
        if lam.dtype != torch.float64 or u.dtype != torch.float64:
            raise TypeError(f"eigenvalues and basis must be float64, got {lam.dtype} and {u.dtype}")
        if lam.numel() and not (bool(torch.isfinite(lam).all()) and float(lam.min()) >= 0):
            raise ValueError("eigenvalues must be finite and ≥ 0")
        if not (isinstance(self.floor, (int, float)) and math.isfinite(self.floor) and self.floor >= 0):
            raise ValueError(f"floor must be a finite number ≥ 0, got {self.floor!r}")

    @property
    def dim(self) -> int:
        """D."""
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        """k, the number of explicit eigenpairs."""
        return int(self.basis.shape[1])

    def quadratic_form(self, x: torch.Tensor) -> torch.Tensor:
        """xᵀ Ĝ x for ``[..., D]`` points (float64), without forming Ĝ."""
        x = x.to(torch.float64)
        y = x @ self.basis
        parallel = (y * y * self.eigenvalues).sum(-1)
        perpendicular = (x * x).sum(-1) - (y * y).sum(-1)
        return parallel + self.floor * perpendicular.clamp_min(0.0)


__all__ = ["LowRankCurvature"]
