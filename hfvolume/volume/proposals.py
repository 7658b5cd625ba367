"""Seeded directions and diagonal importance-sampling proposals on the unit sphere.

Direction i is a standard normal vector u_i ∈ R^D drawn from private generators keyed by (seed, i, block), one
block per ``BLOCK`` coordinates. It therefore depends on nothing but (seed, i): not on the batch size, the process
count, or how the coordinates are sharded (a shard can draw just the blocks it owns).

Isotropic directions w = u/|u| see a region's extent in the *arithmetic* mean of its curvatures while its volume
depends on the *geometric* mean, so near a minimum with Hessian H the typical isotropic sample of the local volume
is low by about (D/2)·log(AM/GM) of H's eigenvalues: linear in D. Stretching the flat coordinates closes that gap
(Scherlis & Belrose 2025, arXiv 2501.18812, whose scales p come from Adam's second moments). The proposal is an
angular central Gaussian (ACG; Tyler 1987, Biometrika 74(3)): v = P u with P = diag(p), det P = 1 (unit geometric
mean), w = v/|v|. Its density on the sphere relative to the uniform distribution is

    q_ACG(w) = det(P)⁻¹ |P⁻¹ w|^{−D} = |P⁻¹ w|^{−D},

and the importance weight of a direction is 1/q(w), exact for the w actually used. The defensive mixture
q = α·1 + (1 − α)·q_ACG (Hesterberg 1995, Technometrics 37(2)) bounds the weights by 1/α, so the estimate is never
much worse than the isotropic one. Mixture components are assigned by stratification (direction i is isotropic
when ⌊(i+1)α⌋ > ⌊iα⌋), which keeps the fraction exact and the assignment independent of batching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch

from hfvolume.volume.checks import check_fraction
from hfvolume.volume.collectives import CoordinateShard, global_sums, local_size
from hfvolume.volume.numerics import NORM_CHUNK, sum_squares_f64

if TYPE_CHECKING:
    from hfvolume.volume.priors import ResolvedGaussianPrior, ResolvedUniformPrior

BLOCK = 1 << 16  # coordinates per generator block; fixed forever, since it defines which direction a seed gives


def _block_seed(seed: int, index: int, block: int) -> int:
    state = np.random.SeedSequence([seed, index, block]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _block_values(seed: int, index: int, block: int, n_params: int, dtype: torch.dtype,
                  gen: torch.Generator, out: torch.Tensor | None = None) -> torch.Tensor:
    """Block ``block`` of u_index: its ``min(BLOCK, D − block·BLOCK)`` standard normal coordinates (written into
    ``out``, a contiguous CPU tensor of that size and ``dtype``, when given: the same values, without a copy)."""
    gen.manual_seed(_block_seed(seed, index, block))
    size = min((block + 1) * BLOCK, n_params) - block * BLOCK
    if out is not None:
        return torch.randn(size, generator=gen, dtype=dtype, out=out)
    return torch.randn(size, generator=gen, dtype=dtype)


def _check_out(out: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=dtype)
    if out.shape != (n,) or out.dtype != dtype or out.device.type != "cpu":
        raise ValueError(f"out must be a CPU {dtype} tensor of shape [{n}], got {out.dtype} {tuple(out.shape)} on "
                         f"{out.device}")
    return out


def gaussian_direction(
    index: int,
    n_params: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    start: int = 0,
    stop: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Coordinates ``[start, stop)`` of the standard normal vector u_index ∈ R^D; shape ``[stop − start]``.

    Drawn on the CPU from private generators (never the global RNG); the same (seed, index) always gives the
    same vector for a given dtype, whatever slice is asked for. ``out``: a ``[stop − start]`` CPU tensor of
    ``dtype`` to fill (and return) instead of allocating one, so drawing into a direction buffer needs no D-sized
    temporary.
    """
    stop = n_params if stop is None else stop
    if not 0 <= start <= stop <= n_params:
        raise ValueError(f"bad coordinate range [{start}, {stop}) for n_params={n_params}")
    out = _check_out(out, stop - start, dtype)
    gen = torch.Generator(device="cpu")
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else start // BLOCK):
        b0 = block * BLOCK
        b1 = min(b0 + BLOCK, n_params)
        if start <= b0 and b1 <= stop and out.is_contiguous():  # a whole block: drawn straight into place
            _block_values(seed, index, block, n_params, dtype, gen, out=out[b0 - start : b1 - start])
            continue
        values = _block_values(seed, index, block, n_params, dtype, gen)
        lo, hi = max(b0, start), min(b1, stop)
        out[lo - start : hi - start] = values[lo - b0 : hi - b0]
    return out


def local_gaussian_direction(
    index: int, coordinates: CoordinateShard, *, seed: int, dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """This shard's coordinates ``[D_local]`` of u_index ∈ R^D (its ``local_ranges`` one after the other).

    Each generator block is drawn once even when several local ranges fall in it (an FSDP shard holds one range
    per parameter tensor, often many per block)."""
    n = coordinates.n_params
    out = _check_out(out, local_size(coordinates), dtype)
    gen = torch.Generator(device="cpu")
    current: tuple[int, torch.Tensor] | None = None
    pos = 0
    for a, b in coordinates.local_ranges:
        for block in range(a // BLOCK, (b - 1) // BLOCK + 1 if b > a else a // BLOCK):
            if current is None or current[0] != block:
                current = (block, _block_values(seed, index, block, n, dtype, gen))
            b0 = block * BLOCK
            lo, hi = max(b0, a), min(b0 + current[1].numel(), b)
            out[pos : pos + hi - lo] = current[1][lo - b0 : hi - b0]
            pos += hi - lo
    return out


def normalize_log_scales(
    scales: torch.Tensor | np.ndarray | Sequence[float], n_params: int, *, coordinates: CoordinateShard | None = None
) -> torch.Tensor | None:
    """``[D]`` positive proposal scales → ``[D]`` float64 log scales with zero mean (unit geometric mean, det P = 1).

    Constant scales are the isotropic proposal: None is returned so that the result equals the naive one bit for
    bit (e.g. Adam's second moment at step 0), rather than up to the rounding of a weight of exactly 1.
    With ``coordinates`` (a sharded model), ``scales`` are this shard's ``[D_local]`` and so is the result; the
    mean and the checks are global (collectives: every rank calls this).
    """
    if isinstance(scales, torch.Tensor):
        p = scales.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    else:
        p = torch.as_tensor(np.asarray(scales, dtype=np.float64)).reshape(-1)
    if coordinates is not None:
        return _normalize_local_log_scales(p, coordinates)
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


def _normalize_local_log_scales(p: torch.Tensor, coordinates: CoordinateShard) -> torch.Tensor | None:
    n_local, n = local_size(coordinates), coordinates.n_params
    # Global coordinate 0 lives on exactly one rank: summing (p[0] there, 0 elsewhere) hands its value to all.
    owns_first = bool(coordinates.local_ranges) and coordinates.local_ranges[0][0] == 0 and n_local > 0
    wrong_size = float(p.numel() != n_local)
    ok = p.numel() == n_local
    bad = float(torch.count_nonzero(~torch.isfinite(p) | (p <= 0))) if ok else 0.0
    first = float(p[0]) if ok and owns_first else 0.0
    wrong_size, bad, first = global_sums(coordinates, np.array([wrong_size, bad, first]))
    # Every rank raises together: one rank raising alone would leave the others blocked in the next collective.
    if wrong_size:
        raise ValueError(f"scales must have this shard's {n_local} entries on every rank (D = {n} in all)")
    if bad:
        raise ValueError(f"scales must be positive and finite; {int(bad)} entries are not")
    differ = float(torch.count_nonzero(p != first))
    log_p = torch.log(p)
    differ, log_sum = global_sums(coordinates, np.array([differ, float(log_p.sum(dtype=torch.float64))]))
    if differ == 0:
        return None
    return log_p - log_sum / n


def is_isotropic_draw(index: int, mixture: float) -> bool:
    """Stratified assignment of direction ``index`` to the isotropic component of the defensive mixture."""
    if mixture <= 0.0:
        return False
    if mixture >= 1.0:
        return True
    return math.floor((index + 1) * mixture) > math.floor(index * mixture)


class DirectionProposal(Protocol):
    """What the radius search needs from a proposal: seeded unit directions and their exact log weights."""

    @property
    def is_isotropic(self) -> bool:
        """True when every direction has weight exactly 1."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-safe description recorded in results."""
        ...

    def draw(self, indices: Sequence[int], n_params: int, *, seed: int, dtype: torch.dtype,
             device: torch.device | str, coordinates: CoordinateShard | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Unit directions ``[K, D]`` and ``[K]`` log importance weights −log q(w) (nats); direction i depends
        only on (seed, i)."""
        ...


class ProposalSpec(Protocol):
    """A proposal that depends on the prior, the anchor or the cutoff, resolved by the estimator once these are
    known (e.g. :class:`hfvolume.volume.tilted.CurvatureProposal`)."""

    def resolve(self, prior: "ResolvedGaussianPrior | ResolvedUniformPrior", *, cutoff: float,
                coordinates: CoordinateShard | None = None) -> DirectionProposal:
        """The proposal for this prior (about its anchor) and cutoff."""
        ...


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
        check_fraction("mixture", self.mixture)

    @property
    def is_isotropic(self) -> bool:
        """True when every direction gets weight 1: no scales, α = 1, or all log scales 0."""
        return self.log_scales is None or self.mixture >= 1.0 or bool((self.log_scales == 0).all())

    def describe(self) -> dict[str, Any]:
        """JSON-safe description recorded in results: ``info`` plus the mixture fraction."""
        return {**self.info, "mixture": float(self.mixture)}

    def draw(
        self,
        indices: Sequence[int],
        n_params: int,
        *,
        seed: int,
        dtype: torch.dtype,
        device: torch.device | str,
        coordinates: CoordinateShard | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Unit directions ``[K, D]`` (``dtype`` on ``device``) and their ``[K]`` log importance weights (nats).

        log weight = −log q(w), with log q_ACG(w) = −D·log|P⁻¹w| and the mixture log q = logaddexp(log α,
        log(1−α) + log q_ACG) (module docstring). An isotropic proposal has weight 1 (log 0) exactly.
        With ``coordinates`` (a sharded model) the rows are this shard's ``[K, D_local]`` part of the same global
        unit directions (``log_scales`` is then local too); norms are all-reduced, so this is a collective.
        """
        width = n_params if coordinates is None else local_size(coordinates)
        out = torch.empty(len(indices), width, dtype=dtype)
        log_w = np.zeros(len(indices), dtype=np.float64)
        for k, i in enumerate(indices):
            if coordinates is None:
                gaussian_direction(int(i), n_params, seed=seed, dtype=dtype, out=out[k])
            else:
                local_gaussian_direction(int(i), coordinates, seed=seed, dtype=dtype, out=out[k])
        scaled = [] if self.log_scales is None else [
            k for k, i in enumerate(indices) if not is_isotropic_draw(int(i), self.mixture)]
        # p = exp(log p) and later 1/p² a chunk at a time, in float64 (no D-sized float64 vector per batch); the
        # same values as whole-row products, and each row's arithmetic is its own.
        for c in range(0, width, NORM_CHUNK) if scaled else ():
            p = torch.exp(self.log_scales[c : c + NORM_CHUNK])  # type: ignore[index]
            for k in scaled:
                chunk = out[k, c : c + NORM_CHUNK]
                chunk.copy_(chunk.to(torch.float64) * p)
        # Only the sums are batched, so a sharded run needs one collective per batch for the norms and one for
        # the weights.
        sq = global_sums(coordinates, np.array([sum_squares_f64(out[k]) for k in range(len(indices))]))
        for k in range(len(indices)):
            out[k].div_(math.sqrt(float(sq[k])))
        if self.log_scales is not None and self.mixture < 1.0:
            pinv_sq = np.zeros(len(indices))
            for c in range(0, width, NORM_CHUNK):
                inv_sq = torch.exp(self.log_scales[c : c + NORM_CHUNK]).pow(-2)
                for k in range(len(indices)):
                    part = out[k, c : c + NORM_CHUNK].to(torch.float64)
                    pinv_sq[k] += float(torch.dot(part * part, inv_sq))
            pinv_sq = global_sums(coordinates, pinv_sq)
            for k in range(len(indices)):
                # |P⁻¹ w| from the w actually used, so the weight matches the direction that is perturbed along.
                log_norm_pinv_w = 0.5 * math.log(float(pinv_sq[k]))
                log_q_acg = -n_params * log_norm_pinv_w
                if self.mixture > 0.0:
                    log_q = float(np.logaddexp(math.log(self.mixture), math.log1p(-self.mixture) + log_q_acg))
                else:
                    log_q = log_q_acg
                log_w[k] = -log_q
        return out.to(device), log_w


__all__ = [
    "BLOCK", "DirectionProposal", "Proposal", "ProposalSpec", "gaussian_direction", "is_isotropic_draw",
    "local_gaussian_direction", "normalize_log_scales",
]
