"""Proposal scales from a curvature moment: p = 1/(m^γ + η), shared by the Adam and Fisher proposals.

The ideal diagonal importance-sampling proposal for a local-volume estimate is p ∝ diag(H)^{-1/2}, H the Hessian of
Δ at the anchor (Scherlis & Belrose 2025, arXiv 2501.18812, importance sampling with the optimizer's second
moments): near a minimum the region {Δ ≤ ε} is close to the ellipsoid ½ δᵀHδ ≤ ε, whose volume is set by the
geometric mean of H's eigenvalues, while isotropic directions see their arithmetic mean, so a naive estimate is low
by (D/2)·log(AM/GM) nats. A non-negative moment m stands in for diag(H) — Adam's bias-corrected second moment ν̂
(:mod:`hfvolume.models.optim_state`) or the diagonal Fisher F (:mod:`hfvolume.models.fisher`) — and

    p_i = 1 / (m_i^γ + η),      γ = ``exponent`` ≥ 0, η = ``eps`` ≥ 0.

η is either absolute (a float, in the units of m^γ) or :class:`RelativeEps` ``(r)``: η = r · median(m^γ) over the
coordinates with m > 0. An absolute η means different things on different models (ν̂ depends on the loss scale,
batch size and learning-rate schedule, F on the behaviour's units), so a fixed 1e-5 can be negligible on one model
and dominate on another; the relative form keeps "how far below the typical coordinate the floor sits" the same
everywhere. The core normalises p to unit geometric mean itself, so only ratios between coordinates matter, which
gives two properties the tests pin:

* m ≡ 0 gives p ≡ 1/η exactly, which the core recognises as the isotropic proposal, so the estimate equals the
  naive one bit for bit (for a relative η the reference is 1 when no coordinate has m > 0);
* m → c·m together with η → c^γ·η gives p → c^{−γ}·p, a constant the core normalises away; with a relative η the
  rescaling of η happens by itself, so scaling m changes nothing at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Union

import torch

from hfvolume.volume.checks import check_nonnegative

# The median for a relative η is taken over at most this many coordinates (an even stride through the rest):
# η only needs its order of magnitude, and an exact median of a billion-parameter model would copy all of it.
MEDIAN_MAX_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RelativeEps:
    """η given relative to the data: η = ``factor`` · median(m^γ) over the coordinates with m > 0.

    m is the moment the scales are built from (Adam's bias-corrected ν̂, or the diagonal Fisher). Pass it as
    ``eps=RelativeEps(1e-2)`` to :func:`~hfvolume.models.optim_state.adam_scales` /
    :func:`~hfvolume.models.fisher.fisher_scales`, or in ``preconditioner_options={"eps": RelativeEps(1e-2)}``.
    ``factor`` is dimensionless, finite and ≥ 0; with ``factor = 0`` every coordinate must have m > 0 (as for an
    absolute η = 0).
    """

    factor: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", check_nonnegative("RelativeEps.factor", self.factor))


EpsSpec = Union[float, RelativeEps]

# Defaults of both proposals, chosen with scripts/benchmarks/bench_proposals.py (README, "Importance sampling"):
# p ∝ m^{-1/2} is the diag(H)^{-1/2} ideal, and η at the median of m^γ keeps every coordinate's scale within 2× of
# the typical one at the low-m end, so flat coordinates (dead inputs, m ≈ 0) cannot capture the directions — which
# is how a small absolute η loses thousands of nats on a small MLP — while high-curvature coordinates are still
# shrunk.
DEFAULT_EXPONENT = 0.5
DEFAULT_EPS: EpsSpec = RelativeEps(1.0)


def check_scale_settings(exponent: Any, eps: Any) -> tuple[float, EpsSpec]:
    """Validate (γ, η) of p = 1/(m^γ + η): γ finite and ≥ 0; η a finite number ≥ 0 or a :class:`RelativeEps`."""
    if isinstance(eps, RelativeEps):
        return check_nonnegative("exponent", exponent), eps
    return check_nonnegative("exponent", exponent), check_nonnegative("eps", eps)


def median_positive(moments: Iterable[torch.Tensor], *, max_elements: int = MEDIAN_MAX_ELEMENTS) -> float | None:
    """Lower median of the entries m > 0 of all ``moments`` (float64), or None when no entry is positive.

    Above ``max_elements`` positive entries the median is taken over an even stride through them (deterministic:
    the same tensors give the same value).
    """
    flat = [t.detach().reshape(-1) for t in moments]
    total = sum(int(torch.count_nonzero(t > 0)) for t in flat)
    if total == 0:
        return None
    stride = max(1, math.ceil(total / max_elements))
    # One tensor's positive entries at a time, copied down to the strided sample before the next (never all the
    # moments' positive entries at once).
    values = torch.cat([t[t > 0][::stride].to("cpu", torch.float64, copy=True) for t in flat])
    return float(values.median())


def resolve_eps(eps: EpsSpec, moments: Iterable[torch.Tensor], exponent: float) -> tuple[float, dict[str, Any]]:
    """The absolute η for validated ``eps`` and a JSON-safe description.

    For :class:`RelativeEps` ``(r)``: η = r · median(m > 0)^γ (= r · median of m^γ, the power being monotone), with
    the reference 1 when no entry is positive (then every scale is the same constant and the proposal is
    isotropic). Returns ``(η, {"eps": η, "eps_relative": r or None, "eps_reference": median^γ or None})``.
    """
    if not isinstance(eps, RelativeEps):
        return float(eps), {"eps": float(eps), "eps_relative": None, "eps_reference": None}
    med = median_positive(moments)
    reference = 1.0 if med is None else med**exponent
    eta = eps.factor * reference
    return eta, {"eps": eta, "eps_relative": eps.factor, "eps_reference": reference}


def inverse_power_scale(moment: torch.Tensor, exponent: float, eps: float, *, name: str) -> torch.Tensor:
    """p = 1/(m^γ + η) in float64 for a non-negative moment tensor m (any shape; same shape returned).

    ``eps = 0`` is allowed only where every m > 0 (or γ = 0): m = 0 would give p = ∞, so a ValueError names the
    tensor instead. Negative or non-finite moments are a ValueError too (they mean the state is corrupt).
    """
    m = moment.to(torch.float64)
    bad = ~torch.isfinite(m) | (m < 0)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: moment must be finite and ≥ 0, found {int(bad.sum())} bad values (e.g. {float(m[bad][0])!r})"
        )
    # torch.pow(0, 0) = 1, so γ = 0 gives the constant 1/(1 + η) even where m = 0.
    denom = torch.pow(m, exponent) + eps
    zero = denom == 0
    if bool(zero.any()):
        raise ValueError(
            f"{name}: eps = 0 with a zero moment in {int(zero.sum())} coordinates would give infinite scales; "
            "use eps > 0"
        )
    return 1.0 / denom


__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EXPONENT",
    "EpsSpec",
    "MEDIAN_MAX_ELEMENTS",
    "RelativeEps",
    "check_scale_settings",
    "inverse_power_scale",
    "median_positive",
    "resolve_eps",
]
