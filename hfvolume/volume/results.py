"""The result of a local-volume estimate: summary figures, per-direction records and settings.

Everything here is plain data: results are frozen, JSON round-trippable (``to_dict`` / ``from_dict`` /
``to_json`` / ``from_json``) and carry every setting needed to reproduce the number.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Mapping

import numpy as np

from hfvolume.volume.psis import KHAT_FINITE_VARIANCE, ParetoDiagnostic, pareto_khat
from hfvolume.volume.stats import running_log_mean_exp, std_upper_bound_factor

LN2 = math.log(2.0)


class DirectionFlag(str, Enum):
    """How the radius search along one direction ended."""

    CONVERGED = "converged"  # Δ was evaluated within rtol·cutoff of the cutoff at the reported radius
    SATURATED = "saturated"  # Gaussian prior: still inside where the prior's remaining mass is < e^-40; integral to ∞
    UNBOUNDED = "unbounded"  # uniform prior: still inside at the radius cap; the estimate is a lower bound
    FAILED = "failed"  # no point within tolerance (discontinuous Δ, budget spent); the last inside point is used


def _json_float(x: float) -> Any:
    # JSON has no inf/nan: encode them as strings that from_dict turns back into floats.
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _from_json_float(x: Any) -> float:
    return float(x)


@dataclass(frozen=True)
class VolumeResult:
    """A local-volume estimate (Scherlis & Belrose, arXiv 2501.18812). Units: nats unless a name says bits.

    Summary:
        log_volume: log-mean-exp of ``log_estimates`` — log of the unbiased (in exp space) estimate of the prior
            mass of the local region, nats. Biased low in log space (Jensen).
        information_content_bits: ``-log_volume / ln 2``.
        log_volume_lower_bound: Markov lower bound ``log_volume - log(1/delta)``, valid with probability
            ``confidence = 1 - delta`` over the draw of directions.
        ess: effective sample size ``exp(2 LSE(est) - LSE(2 est))``, in [1, n_directions].
        log_volume_std: bootstrap standard deviation of ``log_volume`` over resampled directions, nats. It only
            describes the directions at hand: quote it only when :attr:`reported_log_volume_std` is finite.
        norm_term: the prior's ``-½ Σ (θ0 - m)_i² / s_i²`` (Gaussian prior), 0 for the uniform prior, nats.
            With the prior centred at the origin this weight-norm term usually dominates ``log_volume``.
        n_params: D, the number of measured parameters.
        forward_passes: total calls of the behaviour (one per evaluated point, plus the anchor's).
    Per direction (tuples of length ``n_directions``, index i = direction i of the seed):
        log_estimates: log f(w_i) + log importance weight, nats.
        radii: Euclidean distance from the anchor along the unit direction where the search stopped.
        deltas: Δ evaluated at that radius (behaviour minus the anchor's), in the behaviour's units.
        log_weights: log importance weights (0 for isotropic directions), nats.
        flags: :class:`DirectionFlag` values.
        evaluations: forward passes used by each direction's radius search.
        nonfinite: NaN/inf behaviour values met by each direction (treated as outside the region).
    """

    log_volume: float
    information_content_bits: float
    log_volume_lower_bound: float
    confidence: float
    ess: float
    log_volume_std: float
    norm_term: float
    n_params: int
    n_directions: int
    forward_passes: int
    wall_time_s: float
    log_estimates: tuple[float, ...]
    radii: tuple[float, ...]
    deltas: tuple[float, ...]
    log_weights: tuple[float, ...]
    flags: tuple[str, ...]
    evaluations: tuple[int, ...]
    nonfinite: tuple[int, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------------- counts
    def _count(self, flag: DirectionFlag) -> int:
        return sum(1 for f in self.flags if f == flag.value)

    @property
    def n_converged(self) -> int:
        return self._count(DirectionFlag.CONVERGED)

    @property
    def n_saturated(self) -> int:
        return self._count(DirectionFlag.SATURATED)

    @property
    def n_unbounded(self) -> int:
        return self._count(DirectionFlag.UNBOUNDED)

    @property
    def n_failed(self) -> int:
        return self._count(DirectionFlag.FAILED)

    @property
    def is_lower_bound(self) -> bool:
        """True when some direction hit the radius cap of a uniform prior: the volume is then only bounded below."""
        return self.n_unbounded > 0

    @property
    def dominated_by_one_sample(self) -> bool:
        """True when ESS < 2: one direction decides the number, which is then closer to a lower bound."""
        return self.ess < 2.0

    @property
    def forward_passes_per_direction(self) -> float:
        return float(np.mean(self.evaluations)) if self.evaluations else 0.0

    @property
    def information_content_upper_bound_bits(self) -> float:
        """``-log_volume_lower_bound / ln 2``: information content not exceeded with probability ``confidence``."""
        return -self.log_volume_lower_bound / LN2

    # ------------------------------------------------------------------------------------------- reliability
    @functools.cached_property
    def pareto(self) -> ParetoDiagnostic:
        """PSIS Pareto-k̂ of the importance weights exp(log_estimates) (Vehtari et al., JMLR 2024, §3).

        k̂ ≥ 0.7: unreliable, and the log-mean-exp is then most likely far *below* the truth; k_S ≤ k̂ < 0.7: more
        directions would help (about ``pareto.min_sample_size``); k̂ < 0.5: the weights have a finite variance.
        """
        return pareto_khat(np.asarray(self.log_estimates, dtype=np.float64))

    @property
    def pareto_k(self) -> float:
        """k̂ of :attr:`pareto` (NaN when there are too few directions to fit the tail)."""
        return self.pareto.khat

    @property
    def reliability(self) -> str:
        """``"good"``, ``"unreliable_sample_size"``, ``"unreliable"`` or ``"too_few_samples"`` (:attr:`pareto`)."""
        return self.pareto.reliability

    @functools.cached_property
    def running_log_volume(self) -> tuple[float, ...]:
        """``[n_directions]``: log-mean-exp over the first n directions, n = 1…N, nats. A curve still rising at N
        means the estimate has not levelled off (with heavy-tailed weights it keeps rising with more directions)."""
        return tuple(float(x) for x in running_log_mean_exp(np.asarray(self.log_estimates, dtype=np.float64)))

    @property
    def std_withheld_reason(self) -> str | None:
        """Why :attr:`reported_log_volume_std` is NaN, or None when the bootstrap spread is reported.

        The bootstrap resamples the directions at hand, so it cannot see weights that no direction has reached:
        with a heavy upper tail (k̂ ≥ 1/2: infinite variance) it understates the real spread between seeds.
        """
        k = self.pareto_k
        if math.isnan(k):
            return (f"{self.n_directions} directions are too few to check the weights' tail (Pareto k̂ needs more "
                    "than 20)")
        if k >= KHAT_FINITE_VARIANCE:
            return (f"Pareto k̂ = {k:.2f} ≥ 0.5: the weights have no finite variance, so a bootstrap ± would "
                    "understate the spread between seeds")
        return None

    @property
    def reported_log_volume_std(self) -> float:
        """The ± to quote, nats: a one-sided 95% upper confidence bound on the spread of ``log_volume`` between
        seeds (``log_volume_std`` × :func:`~hfvolume.volume.stats.std_upper_bound_factor`), when the bootstrap
        means something (k̂ < 0.5); NaN otherwise, and :attr:`std_withheld_reason` says why."""
        if self.std_withheld_reason is not None:
            return math.nan
        return self.log_volume_std * std_upper_bound_factor(self.n_directions)

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-direction records as numpy arrays (for histograms and plots)."""
        return {
            "log_estimates": np.asarray(self.log_estimates, dtype=np.float64),
            "radii": np.asarray(self.radii, dtype=np.float64),
            "deltas": np.asarray(self.deltas, dtype=np.float64),
            "log_weights": np.asarray(self.log_weights, dtype=np.float64),
            "flags": np.asarray(self.flags),
            "evaluations": np.asarray(self.evaluations, dtype=np.int64),
            "nonfinite": np.asarray(self.nonfinite, dtype=np.int64),
        }

    def summary(self) -> dict[str, Any]:
        """The headline figures as plain Python scalars (what loggers and cards show)."""
        return {
            "log_volume": self.log_volume,
            "information_content_bits": self.information_content_bits,
            "log_volume_lower_bound": self.log_volume_lower_bound,
            "log_volume_std": self.log_volume_std,
            "reported_log_volume_std": self.reported_log_volume_std,
            "pareto_k": self.pareto_k,
            "reliability": self.reliability,
            "ess": self.ess,
            "norm_term": self.norm_term,
            "n_params": self.n_params,
            "n_directions": self.n_directions,
            "n_saturated": self.n_saturated,
            "n_unbounded": self.n_unbounded,
            "n_failed": self.n_failed,
            "forward_passes": self.forward_passes,
            "wall_time_s": self.wall_time_s,
        }

    # ----------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite floats become the strings "inf", "-inf", "nan")."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                out[f.name] = _json_float(value)
            elif isinstance(value, tuple):
                out[f.name] = [_json_float(v) if isinstance(v, float) else v for v in value]
            elif f.name == "settings":
                out[f.name] = json.loads(json.dumps(dict(value), default=_json_default))
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VolumeResult":
        names = {f.name for f in fields(cls)}
        missing = names - set(data) - {"settings"}
        if missing:
            raise ValueError(f"VolumeResult.from_dict: missing fields {sorted(missing)}")
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"VolumeResult.from_dict: unknown fields {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in {"n_params", "n_directions", "forward_passes"}:
                kwargs[f.name] = int(value)
            elif f.name in {"flags"}:
                kwargs[f.name] = tuple(str(v) for v in value)
            elif f.name in {"evaluations", "nonfinite"}:
                kwargs[f.name] = tuple(int(v) for v in value)
            elif f.name in {"log_estimates", "radii", "deltas", "log_weights"}:
                kwargs[f.name] = tuple(_from_json_float(v) for v in value)
            elif f.name == "settings":
                kwargs[f.name] = dict(value)
            else:
                kwargs[f.name] = _from_json_float(value)
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "VolumeResult":
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return (
            f"VolumeResult(log_volume={self.log_volume:.6g} nats, "
            f"information_content_bits={self.information_content_bits:.6g}, "
            f"lower_bound={self.log_volume_lower_bound:.6g}, ess={self.ess:.3g}, pareto_k={self.pareto_k:.3g}, "
            f"n_params={self.n_params}, n_directions={self.n_directions}, "
            f"saturated={self.n_saturated}, unbounded={self.n_unbounded}, failed={self.n_failed})"
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Enum):
        return obj.value
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


__all__ = ["DirectionFlag", "VolumeResult"]
