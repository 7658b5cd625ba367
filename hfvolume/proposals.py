"""Seeded directions and diagonal importance-sampling proposals (ESTIMATOR.md §2).

Direction i is a standard normal vector u_i ∈ R^D drawn from private generators keyed by (seed, i, block), one
block per ``BLOCK`` coordinates. It therefore depends on nothing but (seed, i): not on the batch size, the process
count, or how the coordinates are sharded (a shard can draw just the blocks it owns).

The proposal is an angular central Gaussian (ACG): v = P u with P = diag(p), det P = 1 (unit geometric mean),
w = v/|v|. Its density on the sphere, relative to the uniform distribution, is q(w) = |P⁻¹ w|^{-D}; the
importance weight of a direction is 1/q(w). The defensive mixture q = α·1 + (1−α)·q_ACG bounds the weights by
1/α; mixture components are assigned by stratification (direction i is isotropic when ⌊(i+1)α⌋ > ⌊iα⌋), which
keeps the fraction exact and the assignment independent of batching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

BLOCK = 1 << 16  # coordinates per generator block; fixed forever, since it defines which direction a seed gives


def _block_seed(seed: int, index: int, block: int) -> int:
    state = np.random.SeedSequence([seed, index, block]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def gaussian_direction(
    index: int,
    n_params: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Coordinates ``[start, stop)`` of the standard normal vector u_index ∈ R^D; shape ``[stop − start]``.

    Drawn on the CPU from private generators (never the global RNG); the same (seed, index) always gives the
    same vector for a given dtype, whatever slice is asked for.
    """
    stop = n_params if stop is None else stop
    if not 0 <= start <= stop <= n_params:
        raise ValueError(f"bad coordinate range [{start}, {stop}) for n_params={n_params}")
    out = torch.empty(stop - start, dtype=dtype)
    first, last = start // BLOCK, (stop - 1) // BLOCK if stop > start else start // BLOCK - 1
    gen = torch.Generator(device="cpu")
    for block in range(first, last + 1):
        b0, b1 = block * BLOCK, min((block + 1) * BLOCK, n_params)
        gen.manual_seed(_block_seed(seed, index, block))
        values = torch.randn(b1 - b0, generator=gen, dtype=dtype)
        lo, hi = max(b0, start), min(b1, stop)
        out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out


_NORM_CHUNK = 1 << 18


def sum_squares_f64(x: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Σ x_i² (or Σ x_i² w_i) accumulated in float64 over cache-sized chunks of a 1-D tensor.

    Direction norms must be accurate to well below 1/D: a unit direction off by a factor (1 + ε) shifts the
    polar-coordinate Jacobian t^{D−1} by e^{Dε}. Upcasting the whole vector would cost a D-sized float64 copy.
    """
    total = 0.0
    for start in range(0, x.numel(), _NORM_CHUNK):
        c = x[start : start + _NORM_CHUNK].to(dtype=torch.float64)
        if weights is None:
            total += float(torch.dot(c, c))
        else:
            total += float(torch.dot(c * c, weights[start : start + _NORM_CHUNK]))
    return total


def normalize_log_scales(
    scales: torch.Tensor | np.ndarray | Sequence[float], n_params: int
) -> torch.Tensor | None:
    """``[D]`` positive proposal scales → ``[D]`` float64 log scales with zero mean (unit geometric mean, det P = 1).

    Constant scales are the isotropic proposal: None is returned so that the result equals the naive one bit for
    bit (e.g. Adam's second moment at step 0), rather than up to the rounding of a weight of exactly 1.
    """
    if isinstance(scales, torch.Tensor):
        p = scales.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    else:
        p = torch.as_tensor(np.asarray(scales, dtype=np.float64)).reshape(-1)
    if p.numel() != n_params:
        raise ValueError(f"scales must have {n_params} entries (one per parameter), got {p.numel()}")
    bad = torch.nonzero(~torch.isfinite(p) | (p <= 0))
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"scales must be positive and finite; scales[{i}] = {float(p[i])!r}")
    if bool(torch.all(p == p[0])):
        return None
    log_p = torch.log(p)
    return log_p - log_p.mean()


def is_isotropic_draw(index: int, mixture: float) -> bool:
    """Stratified assignment of direction ``index`` to the isotropic component of the defensive mixture."""
    if mixture <= 0.0:
        return False
    if mixture >= 1.0:
        return True
    return math.floor((index + 1) * mixture) > math.floor(index * mixture)


@dataclass(frozen=True)
class Proposal:
    """A diagonal ACG proposal with optional defensive mixture.

    log_scales: ``[D]`` float64 log p with zero mean, or None for the isotropic (naive) proposal.
    mixture: α, the fraction of directions drawn isotropically; weights use the mixture density.
    info: JSON-safe description (name, settings) recorded in results.
    """

    log_scales: torch.Tensor | None = None
    mixture: float = 0.0
    info: dict[str, Any] = field(default_factory=lambda: {"name": "isotropic"})

    def __post_init__(self) -> None:
        if not (isinstance(self.mixture, (int, float)) and 0.0 <= float(self.mixture) <= 1.0):
            raise ValueError(f"mixture must be a number in [0, 1], got {self.mixture!r}")

    @property
    def is_isotropic(self) -> bool:
        return self.log_scales is None or self.mixture >= 1.0 or bool((self.log_scales == 0).all())

    def describe(self) -> dict[str, Any]:
        return {**self.info, "mixture": float(self.mixture)}

    def draw(
        self, indices: Sequence[int], n_params: int, *, seed: int, dtype: torch.dtype, device: torch.device | str
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Unit directions ``[K, D]`` (``dtype`` on ``device``) and their ``[K]`` log importance weights (nats).

        log weight = −log q(w), with log q_ACG(w) = −D·log|P⁻¹w| and the mixture log q = logaddexp(log α,
        log(1−α) + log q_ACG). An isotropic proposal has weight 1 (log 0) exactly.
        """
        scales = None if self.log_scales is None else torch.exp(self.log_scales)
        inv_sq = None if scales is None else scales.pow(-2)
        out = torch.empty(len(indices), n_params, dtype=dtype)
        log_w = np.zeros(len(indices), dtype=np.float64)
        for k, i in enumerate(indices):
            row = out[k]
            row.copy_(gaussian_direction(int(i), n_params, seed=seed, dtype=dtype))
            if scales is not None and not is_isotropic_draw(int(i), self.mixture):
                row.copy_(row.to(torch.float64) * scales)
            row.div_(math.sqrt(sum_squares_f64(row)))
            if inv_sq is not None and self.mixture < 1.0:
                # |P⁻¹ w| from the w actually used, so the weight matches the direction that is perturbed along.
                log_norm_pinv_w = 0.5 * math.log(sum_squares_f64(row, inv_sq))
                log_q_acg = -n_params * log_norm_pinv_w
                if self.mixture > 0.0:
                    log_q = float(np.logaddexp(math.log(self.mixture), math.log1p(-self.mixture) + log_q_acg))
                else:
                    log_q = log_q_acg
                log_w[k] = -log_q
        return out.to(device), log_w


__all__ = ["BLOCK", "Proposal", "gaussian_direction", "is_isotropic_draw", "normalize_log_scales", "sum_squares_f64"]
