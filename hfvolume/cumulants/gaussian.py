"""The Gaussian input distribution x ~ N(μ_0, Σ_0) that cumulant propagation starts from.

The first linear step is exact for any Gaussian input (μ_z = W μ_0 + b, Σ_z = W Σ_0 Wᵀ); the paper's experiments
use N(0, I) (arXiv 2605.05179 §2). ``from_data`` builds a *Gaussian surrogate* of real inputs: the propagated mean
under it differs from the empirical mean on the same data, and that gap is itself a diagnostic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch


@dataclass(frozen=True)
class GaussianInput:
    """mean ``[n]`` float64 and either a full covariance ``cov [n, n]`` or a diagonal ``var [n]`` (exactly one)."""

    mean: torch.Tensor
    cov: torch.Tensor | None = None
    var: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mean, torch.Tensor) or self.mean.ndim != 1:
            raise ValueError(f"mean must be a 1-D tensor, got {getattr(self.mean, 'shape', type(self.mean))}")
        n = self.mean.shape[0]
        if (self.cov is None) == (self.var is None):
            raise ValueError("give exactly one of cov [n, n] and var [n]")
        if self.cov is not None and tuple(self.cov.shape) != (n, n):
            raise ValueError(f"cov must have shape ({n}, {n}), got {tuple(self.cov.shape)}")
        if self.var is not None and tuple(self.var.shape) != (n,):
            raise ValueError(f"var must have shape ({n},), got {tuple(self.var.shape)}")
        object.__setattr__(self, "mean", self.mean.detach().to(torch.float64))
        for name in ("cov", "var"):
            t = getattr(self, name)
            if t is not None:
                object.__setattr__(self, name, t.detach().to(torch.float64))
        if not bool(torch.isfinite(self.mean).all()):
            raise ValueError("mean has non-finite entries")
        if self.var is not None and not bool((self.var >= 0).all() and torch.isfinite(self.var).all()):
            raise ValueError(f"var must be finite and non-negative, min {float(self.var.min())!r}")
        if self.cov is not None:
            if not bool(torch.isfinite(self.cov).all()):
                raise ValueError("cov has non-finite entries")
            if not torch.allclose(self.cov, self.cov.T, rtol=1e-10, atol=1e-12):
                raise ValueError("cov must be symmetric")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def diagonal(self) -> torch.Tensor:
        """``[n]`` marginal variances."""
        return self.var if self.var is not None else torch.diagonal(self.cov).clone()

    def covariance(self) -> torch.Tensor:
        """``[n, n]`` full covariance (materialised from ``var`` if diagonal)."""
        return self.cov if self.cov is not None else torch.diag(self.var)

    @classmethod
    def standard(cls, n: int) -> GaussianInput:
        """N(0, I_n), the setting of the paper's experiments."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return cls(mean=torch.zeros(n, dtype=torch.float64), var=torch.ones(n, dtype=torch.float64))

    @classmethod
    def from_data(cls, batches: Iterable[Any], *, key: str | None = None) -> GaussianInput:
        """Mean and covariance of real inputs, a Gaussian surrogate for them.

        batches: tensors ``[b, ...]`` (trailing dims flattened), tuples/lists whose first element is one, or mappings
        (``key`` selects the entry; default the only tensor-valued one). Sums are float64 and shifted by the first
        batch's mean, so the result does not depend on how the data are batched beyond rounding.
        """
        shift = total = outer = None
        count = 0
        for i, batch in enumerate(batches):
            x = _batch_tensor(batch, key, i).to(torch.float64)
            x = x.reshape(x.shape[0], -1)
            if shift is None:
                shift = x.mean(0)
                total = torch.zeros_like(shift)
                outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            elif x.shape[1] != shift.shape[0]:
                raise ValueError(f"batch {i} has {x.shape[1]} features, the first had {shift.shape[0]}")
            d = x - shift
            total += d.sum(0)
            outer += d.T @ d
            count += x.shape[0]
        if count < 2:
            raise ValueError(f"from_data needs at least 2 samples, got {count}")
        mean_d = total / count
        cov = (outer - count * torch.outer(mean_d, mean_d)) / (count - 1)
        cov = 0.5 * (cov + cov.T)
        return cls(mean=shift + mean_d, cov=cov)


def _batch_tensor(batch: Any, key: str | None, i: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        if key is not None:
            if key not in batch:
                raise ValueError(f"batch {i} has no key {key!r} (keys: {sorted(batch)})")
            return torch.as_tensor(batch[key])
        tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if len(tensors) != 1:
            raise ValueError(f"batch {i}: pass key= to choose among the floating-point entries {sorted(tensors)}")
        return batch[tensors[0]]
    raise TypeError(f"batch {i} must be a tensor, a tuple whose first item is a tensor, or a mapping; "
                    f"got {type(batch).__name__}")


__all__ = ["GaussianInput"]
