"""Priors over parameters, and the prior mass of the local region along one ray.

The local volume of an anchor θ0 ∈ R^D (Scherlis & Belrose 2025, arXiv 2501.18812) is the prior mass of the
star-shaped region {θ0 + t w : |w| = 1, 0 ≤ t < ρ(w)}. In polar coordinates about θ0,

    μ(L) = E_{w ~ Unif(S^{D−1})}[f(w)],    f(w) = |S^{D−1}| ∫_0^{ρ(w)} p(θ0 + t w) t^{D−1} dt,

so all a prior has to provide is log f(w) for a batch of directions and radii (:class:`Rays`).

* Gaussian prior N(m, diag(s²)), d = θ0 − m. Expanding the exponent of p(θ0 + t w) in t gives

      a = Σ w_i²/s_i²,   b = −Σ d_i w_i/s_i²,   c = −½ Σ d_i²/s_i² − ½ Σ log(2π s_i²),
      f(w) = |S^{D−1}| e^c ∫_0^ρ t^{D−1} exp(−a t²/2 + b t) dt,

  a one-dimensional integral (:mod:`hfvolume.volume.ray_integral`). The first term of c, −½ Σ d_i²/s_i², is
  the "norm term": with the paper's prior centred at the origin it is −|θ0|²/(2σ²), it does not depend on the
  direction, and it usually dominates log μ, so results report it separately.
* Uniform (Lebesgue) prior: f(w) = |S^{D−1}| ρ^D / D = V_D ρ(w)^D, and μ is a volume in parameter space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, Union

import numpy as np
import torch

from hfvolume.volume.checks import check_positive
from hfvolume.volume.collectives import CoordinateShard, global_sums
from hfvolume.volume.numerics import all_finite, log_sphere_area, log_unit_ball_volume, sum_squares_f64
from hfvolume.volume.ray_integral import log_ray_integral, ray_peak, saturation_radius
from hfvolume.volume.results import DirectionFlag

_COEFF_CHUNK = 1 << 16  # coordinates per float64 chunk when forming a and b
# A Gaussian ray still inside the region where less than e^-40 of its prior mass lies further out is "saturated":
# integrating it to ∞ instead changes log f(w) by less than e^-40 nats, far below any other error.
SATURATION_LOG_TOL = -40.0


class Rays(Protocol):
    """What the radius search and the estimator need from a prior, for a batch of K unit directions."""

    cap: np.ndarray  # [K] largest radius worth searching
    cap_floor: np.ndarray  # [K] cheap lower bounds of cap
    cap_flag: DirectionFlag  # flag of a direction still inside the region at its cap

    def cap_at(self, rays: np.ndarray) -> np.ndarray:
        """``[k]`` caps of the rays with indices ``rays``."""
        ...

    def log_mass(self, radii: np.ndarray, capped: np.ndarray) -> np.ndarray:
        """``[K]`` log f(w) in nats for radii ``[K]``; ``capped`` ``[K]`` marks directions that ended at the cap."""
        ...


def _as_vector(value: torch.Tensor | np.ndarray | float, n: int, name: str) -> torch.Tensor:
    # Python numbers and numpy arrays go straight to float64: torch.as_tensor(0.7) would round through float32.
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device="cpu", dtype=torch.float64)
    else:
        t = torch.as_tensor(np.asarray(value, dtype=np.float64))
    if t.ndim == 0:
        return t.expand(n).clone()
    t = t.reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} must be a scalar or have {n} entries (one per parameter), got {t.numel()}")
    return t


@dataclass(frozen=True, eq=False)
class GaussianPrior:
    """Gaussian prior N(mean, diag(sigma²)).

    sigma: one global σ (float), or a ``[D]`` tensor of per-coordinate σ; None → RMS of the anchor's entries
        (the paper's choice is the RMS of the *initial* parameters: pass it explicitly to compare checkpoints).
    mean: ``[D]`` tensor; None → the origin.
    """

    sigma: Union[float, torch.Tensor, None] = None
    mean: Union[torch.Tensor, None] = None

    def __post_init__(self) -> None:
        if self.sigma is not None and not isinstance(self.sigma, torch.Tensor):
            check_positive("sigma", self.sigma)  # a tensor σ is checked entry by entry in resolve()

    def resolve(self, anchor: torch.Tensor, *, coordinates: CoordinateShard | None = None) -> "ResolvedGaussianPrior":
        """About ``anchor`` ``[D]``; with ``coordinates`` (a sharded model) ``anchor``, a per-coordinate ``sigma`` and
        ``mean`` are this shard's ``[D_local]`` slices and every sum is global (a collective)."""
        n = anchor.numel()
        # The anchor is read in place (chunks are upcast on the fly): a float64 copy would cost 8·D bytes.
        theta0 = anchor.detach().to(device="cpu").reshape(-1)
        sigma: Union[float, torch.Tensor]
        if coordinates is not None and isinstance(self.sigma, torch.Tensor) and self.sigma.numel() > 1:
            sigma = _as_vector(self.sigma, n, "sigma")
            n_bad = float(torch.count_nonzero(~torch.isfinite(sigma) | (sigma <= 0)))
            n_bad = float(global_sums(coordinates, np.array([n_bad]))[0])
            if n_bad:  # raised on every rank together (see normalize_log_scales)
                raise ValueError(f"sigma must be positive and finite; {int(n_bad)} entries are not")
        elif self.sigma is None:
            total = float(global_sums(coordinates, np.array([sum_squares_f64(theta0)]))[0])
            rms = math.sqrt(total / (n if coordinates is None else coordinates.n_params))
            if not (math.isfinite(rms) and rms > 0):
                raise ValueError("sigma=None uses the RMS of the anchor, which is 0: pass sigma explicitly")
            sigma = rms
        elif isinstance(self.sigma, torch.Tensor) and self.sigma.numel() > 1:
            sigma = _as_vector(self.sigma, n, "sigma")
            bad = torch.nonzero(~torch.isfinite(sigma) | (sigma <= 0))
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"sigma must be positive and finite; sigma[{i}] = {float(sigma[i])!r}")
            if bool(torch.all(sigma == sigma[0])):
                sigma = float(sigma[0])
        else:
            sigma = check_positive("sigma", float(self.sigma))  # a one-entry tensor σ is checked only here
        mean = None if self.mean is None else _as_vector(self.mean, n, "mean")
        if mean is not None:
            bad = float(not all_finite(mean))
            if coordinates is not None:  # raised on every rank together: __post_init__'s sums are collectives
                bad = float(global_sums(coordinates, np.array([bad]))[0])
            if bad:
                raise ValueError("prior mean has non-finite entries")
        return ResolvedGaussianPrior(theta0=theta0, sigma=sigma, mean=mean, coordinates=coordinates)


@dataclass(frozen=True)
class UniformPrior:
    """Uniform (Lebesgue) measure: the result is a log volume in parameter space, nats.

    max_radius: the largest radius searched; a direction still inside there is flagged ``unbounded`` and the
    result becomes a lower bound. None → 1e6 × the search's starting radius.
    """

    max_radius: float | None = None

    def __post_init__(self) -> None:
        if self.max_radius is not None:
            check_positive("max_radius", self.max_radius)

    def resolve(
        self, anchor: torch.Tensor, *, default_max_radius: float, coordinates: CoordinateShard | None = None
    ) -> "ResolvedUniformPrior":
        cap = self.max_radius if self.max_radius is not None else default_max_radius
        n = anchor.numel() if coordinates is None else coordinates.n_params
        return ResolvedUniformPrior(n_params=n, max_radius=float(cap))


@dataclass(frozen=True, eq=False)
class ResolvedGaussianPrior:
    """N(m, diag(s²)) about a given anchor, stored compactly: a scalar σ stays a float and the origin stays None,
    so the only D-sized state is the anchor itself (not copied) unless per-coordinate σ or a mean is given."""

    theta0: torch.Tensor  # [D] anchor, any float dtype
    sigma: Union[float, torch.Tensor]  # σ, or [D] float64
    mean: Union[torch.Tensor, None]  # [D] float64, or None for the origin
    # A sharded model's coordinates: the tensors above are then this shard's [D_local] and sums are all-reduced.
    coordinates: Union[CoordinateShard, None] = None

    @property
    def centred_at_origin(self) -> bool:
        return self.mean is None

    def _chunk(self, start: int, stop: int) -> tuple[torch.Tensor, Union[float, torch.Tensor]]:
        """(d = θ0 − m, 1/s²) on coordinates [start, stop), float64."""
        d = self.theta0[start:stop].to(torch.float64)
        if self.mean is not None:
            d = d - self.mean[start:stop]
        if isinstance(self.sigma, float):
            return d, 1.0 / (self.sigma * self.sigma)
        s = self.sigma[start:stop]
        return d, 1.0 / (s * s)

    def __post_init__(self) -> None:
        # The direction-independent terms: the norm term −½ Σ d_i²/s_i² and c = norm term − ½ Σ log(2π s_i²).
        n = self.theta0.numel()
        norm = 0.0
        for start in range(0, n, _COEFF_CHUNK):
            d, inv_var = self._chunk(start, start + _COEFF_CHUNK)
            norm += float(torch.sum(d * d * inv_var))
        if self.coordinates is not None:
            log_det_part = 0.0 if isinstance(self.sigma, float) else float(
                torch.sum(torch.log(2 * math.pi * self.sigma * self.sigma)))
            norm, log_det_part = (float(x) for x in global_sums(self.coordinates, np.array([norm, log_det_part])))
            n = self.coordinates.n_params
        if isinstance(self.sigma, float):
            log_det = n * math.log(2 * math.pi * self.sigma * self.sigma)
        elif self.coordinates is not None:
            log_det = log_det_part
        else:
            log_det = float(torch.sum(torch.log(2 * math.pi * self.sigma * self.sigma)))
        object.__setattr__(self, "_norm_term", -0.5 * norm)
        object.__setattr__(self, "_log_c", -0.5 * norm - 0.5 * log_det)

    @property
    def n_params(self) -> int:
        """D (global for a sharded model)."""
        return self.theta0.numel() if self.coordinates is None else self.coordinates.n_params

    @property
    def norm_term(self) -> float:
        """−½ Σ (θ0 − m)_i² / s_i², nats."""
        return self._norm_term  # type: ignore[attr-defined]

    def ray_coefficients(self, directions: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """a = Σ w_i²/s_i² and b = −Σ d_i w_i/s_i² for ``[K, D]`` unit directions → two ``[K]`` float64 arrays."""
        k_rows, n = directions.shape
        a = np.zeros(k_rows)
        b = np.zeros(k_rows)
        for start in range(0, n, _COEFF_CHUNK):
            # Coordinate chunks keep float64 temporaries cache-sized; each row is reduced on its own, so a row's
            # value does not depend on how many rows are in the batch.
            d, inv_var = self._chunk(start, start + _COEFF_CHUNK)
            d_inv_var = d * inv_var
            for k in range(k_rows):
                w = directions[k, start : start + _COEFF_CHUNK].detach().to(device="cpu", dtype=torch.float64)
                if isinstance(inv_var, float):
                    a[k] += inv_var * float(torch.dot(w, w))
                else:
                    a[k] += float(torch.dot(w * w, inv_var))
                b[k] -= float(torch.dot(w, d_inv_var))
        if self.coordinates is not None:
            a, b = global_sums(self.coordinates, np.stack([a, b]))
        return a, b

    def rays(self, directions: torch.Tensor) -> "GaussianRays":
        """The rays along ``[K, D]`` unit directions (a collective with sharded coordinates)."""
        a, b = self.ray_coefficients(directions)
        return GaussianRays(prior=self, a=a, b=b)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description recorded in results (σ itself, or its RMS when it is per-coordinate)."""
        if isinstance(self.sigma, float):
            sigma: Any = self.sigma
            sigma_rms = self.sigma
        elif self.coordinates is not None:
            # A collective: describe() is called on every rank (the estimator's settings).
            sq = global_sums(self.coordinates, np.array([float(torch.sum(self.sigma * self.sigma))]))[0]
            sigma, sigma_rms = "per-coordinate", math.sqrt(sq / self.coordinates.n_params)
        else:
            sigma, sigma_rms = "per-coordinate", float(torch.sqrt(torch.mean(self.sigma * self.sigma)))
        return {"name": "gaussian", "sigma": sigma, "sigma_rms": sigma_rms,
                "mean": "origin" if self.centred_at_origin else "custom"}


@dataclass(frozen=True, eq=False)
class GaussianRays:
    """K rays of a Gaussian prior: their ``[K]`` coefficients a and b (the prior's exponent along the ray is
    c − a t²/2 + b t). A ray still inside at its cap is ``saturated`` and integrated to ∞."""

    prior: ResolvedGaussianPrior
    a: np.ndarray
    b: np.ndarray
    cap_flag: DirectionFlag = DirectionFlag.SATURATED

    @property
    def cap(self) -> np.ndarray:
        """``[K]`` saturation radii: beyond them a ray holds < e^{SATURATION_LOG_TOL} of its prior mass."""
        return self.cap_at(np.arange(self.a.size))

    def cap_at(self, rays: np.ndarray) -> np.ndarray:
        """The caps of the rays with indices ``rays`` (``[k]``), each ≥ its :attr:`cap_floor`."""
        idx = np.asarray(rays, dtype=np.int64)
        n = self.prior.n_params - 1
        return np.asarray(saturation_radius(n, self.a[idx], self.b[idx], log_tol=SATURATION_LOG_TOL),
                          dtype=np.float64)

    @property
    def cap_floor(self) -> np.ndarray:
        """``[K]`` peaks t* of the radial integrand t^{D−1} e^{−a t²/2 + b t}: closed form, and ≤ the caps (the
        saturation radius lies past the peak), so a search below them needs no cap."""
        return np.asarray(ray_peak(self.prior.n_params - 1, self.a, self.b), dtype=np.float64)

    def log_mass(self, radii: np.ndarray, capped: np.ndarray) -> np.ndarray:
        """log f(w) = log|S^{D−1}| + c + log ∫_0^ρ t^{D−1} e^{−a t²/2 + b t} dt, with ρ = ∞ where capped."""
        n = self.prior.n_params
        x1 = np.where(np.asarray(capped, dtype=bool), np.inf, np.asarray(radii, dtype=np.float64))
        out = np.full(x1.shape, -np.inf)
        positive = x1 > 0
        if positive.any():
            log_i = log_ray_integral(n - 1, self.a[positive], self.b[positive], x1[positive])
            out[positive] = log_sphere_area(n) + self.prior._log_c + log_i  # type: ignore[attr-defined]
        return out


@dataclass(frozen=True)
class ResolvedUniformPrior:
    """Lebesgue measure on R^D, searched up to ``max_radius`` along every ray; it has no norm term."""

    n_params: int
    max_radius: float
    norm_term: float = 0.0

    def rays(self, directions: torch.Tensor) -> "UniformRays":
        return UniformRays(n_params=self.n_params, cap=np.full(directions.shape[0], self.max_radius))

    def describe(self) -> dict[str, Any]:
        return {"name": "uniform", "max_radius": self.max_radius}


@dataclass(frozen=True)
class UniformRays:
    """K rays of the uniform prior: the cap is the same ``max_radius`` for all, and known without any work, so it
    is its own floor. A ray still inside at the cap is ``unbounded`` and the estimate only a lower bound."""

    n_params: int
    cap: np.ndarray
    cap_flag: DirectionFlag = DirectionFlag.UNBOUNDED

    @property
    def cap_floor(self) -> np.ndarray:
        return self.cap

    def cap_at(self, rays: np.ndarray) -> np.ndarray:
        return self.cap[np.asarray(rays, dtype=np.int64)]

    def log_mass(self, radii: np.ndarray, capped: np.ndarray) -> np.ndarray:
        """log f(w) = log V_D + D log ρ (a capped direction keeps ρ = cap: a lower bound)."""
        r = np.asarray(radii, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return log_unit_ball_volume(self.n_params) + self.n_params * np.log(r)


def concatenate_rays(parts: Sequence[Rays]) -> Rays:
    """The rays of several batches of directions as one, in order, so that ``log_mass`` (a quadrature per
    direction, vectorised) runs once for all of them instead of once per batch."""
    if not parts:
        raise ValueError("concatenate_rays needs at least one batch of rays")
    first = parts[0]
    if isinstance(first, GaussianRays) and all(isinstance(p, GaussianRays) and p.prior is first.prior for p in parts):
        return GaussianRays(prior=first.prior, a=np.concatenate([p.a for p in parts]),
                            b=np.concatenate([p.b for p in parts]))
    if isinstance(first, UniformRays) and all(isinstance(p, UniformRays) and p.n_params == first.n_params
                                              for p in parts):
        return UniformRays(n_params=first.n_params, cap=np.concatenate([p.cap for p in parts]))
    raise TypeError(f"cannot concatenate rays of different priors: {sorted({type(p).__name__ for p in parts})}")


def resolve_prior(
    prior: Union[str, GaussianPrior, UniformPrior],
    anchor: torch.Tensor,
    *,
    default_max_radius: float,
    coordinates: CoordinateShard | None = None,
) -> Union[ResolvedGaussianPrior, ResolvedUniformPrior]:
    """Turn the user's ``prior`` argument ("gaussian", "uniform" or an instance) into a resolved prior.

    With ``coordinates`` (a sharded model) ``anchor`` is this shard's ``[D_local]`` slice (collective)."""
    if isinstance(prior, str):
        name = prior.lower()
        if name == "gaussian":
            prior = GaussianPrior()
        elif name == "uniform":
            prior = UniformPrior()
        else:
            raise ValueError(f"unknown prior {prior!r}: use 'gaussian', 'uniform', GaussianPrior(...) or "
                             "UniformPrior(...)")
    if isinstance(prior, GaussianPrior):
        return prior.resolve(anchor, coordinates=coordinates)
    if isinstance(prior, UniformPrior):
        return prior.resolve(anchor, default_max_radius=default_max_radius, coordinates=coordinates)
    raise TypeError(f"prior must be 'gaussian', 'uniform', GaussianPrior or UniformPrior, got {type(prior).__name__}")


__all__ = ["GaussianPrior", "ResolvedGaussianPrior", "ResolvedUniformPrior", "UniformPrior", "resolve_prior"]
