"""Searching every direction of a run: batches of rays, two phases, and sharing the results between processes.

For direction i the search draws the unit direction w_i and its log weight −log q(w_i) from the proposal, finds
the radius ρ(w_i) where Δ(θ0 + t w_i) reaches the cutoff ε, and records the per-direction estimate

    est_i = log f(w_i) − log q(w_i),    f(w) = |S^{D−1}| ∫_0^{ρ(w)} p(θ0 + t w) t^{D−1} dt    (nats),

an unbiased (in exp space) sample of the local volume μ = E_{w ~ Unif(S^{D−1})}[f(w)] (Scherlis & Belrose 2025,
arXiv 2501.18812: the prior mass of the star-shaped region around θ0 in polar coordinates, importance-sampled).

The directions are searched in two phases. The first ``PILOT_DIRECTIONS`` (the pilot) start from the default
radius; the rest start from the pilot's median converged radius, a start already on the scale of the region
(the default, a fixed fraction of |θ0|, can be off by orders of magnitude), so their searches need fewer calls.
With a process group, each phase's directions are split into contiguous blocks (:func:`shard_indices`) and the
blocks' rows are all-gathered at the end of the phase, so every rank knows the pilot's radii before the rest
starts and all ranks end with the full table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from hfvolume.volume.collectives import CoordinateShard, Sharding, gather_checked, shard_indices
from hfvolume.volume.evaluation import BehaviorCalls, RayPoints
from hfvolume.volume.priors import Rays, ResolvedGaussianPrior, ResolvedUniformPrior, concatenate_rays
from hfvolume.volume.proposals import DirectionProposal
from hfvolume.volume.radius import RadiusMethod, search_radii
from hfvolume.volume.results import DirectionFlag
from hfvolume.volume.table import WIRE_COLUMNS, DirectionTable

PILOT_DIRECTIONS = 4  # directions searched from the default start; the rest start at their median radius


@dataclass(frozen=True, eq=False)
class DirectionSearch:
    """Everything needed to search any direction of the seed; the same on every rank of a process group.

    behavior: the counted calls of fn. theta0: ``[D]`` anchor (``[D_local]`` with ``coordinates``) in the
        perturbation dtype, which the directions are drawn in too. f0: fn(θ0), so that Δ = fn − f0.
    prior, proposal: the resolved prior (log f(w) along rays) and the proposal (directions and log weights).
    n_params: D, global with ``coordinates`` (a sharded model's shard, whose sums are collectives). seed: direction
        i is drawn from generators keyed by (seed, i).
    cutoff, rtol, radius_method, max_evaluations: the radius search's settings (:func:`search_radii`).
    batch_size: directions searched in lockstep, i.e. points per call of a batched behaviour.
    """

    behavior: BehaviorCalls
    theta0: torch.Tensor
    f0: float
    prior: Union[ResolvedGaussianPrior, ResolvedUniformPrior]
    proposal: DirectionProposal
    n_params: int
    seed: int
    cutoff: float
    rtol: float
    radius_method: RadiusMethod
    max_evaluations: int
    batch_size: int
    coordinates: CoordinateShard | None = None

    def search_batch(self, indices: np.ndarray, t_start: float, table: DirectionTable) -> Rays:
        """Search directions ``indices`` (``[k]``) from radius ``t_start``; record radii, Δ, flags and log weights
        in ``table`` and return their rays (log masses are formed once per block, by :meth:`record_estimates`)."""
        w, log_w = self.proposal.draw(indices.tolist(), self.n_params, seed=self.seed, dtype=self.theta0.dtype,
                                      device=self.theta0.device, coordinates=self.coordinates)
        rays = self.prior.rays(w)
        found = search_radii(
            RayPoints(self.behavior, self.theta0, w, self.f0),
            np.full(len(indices), t_start),
            cutoff=self.cutoff,
            rtol=self.rtol,
            # A Gaussian prior's exact cap costs a quadrature and a root search per ray, so it is computed only
            # for rays that search past the cheap lower bound (the radial integrand's peak).
            cap=rays.cap_floor,
            cap_flag=rays.cap_flag,
            method=self.radius_method,
            max_evaluations=self.max_evaluations,
            exact_cap=rays.cap_at,
        )
        table.record_search(indices, found, log_w)
        return rays

    def record_estimates(self, indices: np.ndarray, rays: Rays, table: DirectionTable) -> None:
        """est_i = log f(w_i) + log weight_i for the searched directions ``indices``, with one vectorised
        ``log_mass`` call; a capped direction integrates to its cap (uniform) or to ∞ (Gaussian, saturated)."""
        capped = table.flags[indices] == rays.cap_flag
        est = rays.log_mass(table.radii[indices], capped) + table.log_weights[indices]
        bad = np.flatnonzero(np.isnan(est))
        if bad.size:
            i = int(indices[bad[0]])
            raise FloatingPointError(
                f"log estimate of direction {i} is NaN (radius={table.radii[i]!r}, "
                f"log weight={table.log_weights[i]!r}); refusing to average it"
            )
        table.log_estimates[indices] = est

    def search_block(self, indices: np.ndarray, t_start: float, table: DirectionTable, bar: Any) -> None:
        """Search directions ``indices`` in batches of ``batch_size``, then form their estimates together."""
        searched = []
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            searched.append(self.search_batch(batch, t_start, table))
            bar.update(len(batch))
        if searched:
            self.record_estimates(indices, concatenate_rays(searched), table)


def run_phase(search: DirectionSearch, group: Sharding, table: DirectionTable, phase: np.ndarray, t_start: float,
              bar: Any) -> None:
    """Search this rank's block of the directions ``phase`` (``[k]`` indices); with several ranks, share them."""
    mine = shard_indices(phase, group.rank, group.world_size)
    error: BaseException | None = None
    try:
        search.search_block(mine, t_start, table, bar)
    except Exception as err:  # re-raised in share_phase() after the other ranks learn of it
        if group.world_size == 1:
            raise
        error = err
    if group.world_size > 1:
        share_phase(group, table, phase, mine, error)


def share_phase(group: Sharding, table: DirectionTable, phase: np.ndarray, mine: np.ndarray,
                error: BaseException | None) -> None:
    """Collective: give every rank the whole phase's rows of ``table``, or raise on every rank if one failed.

    Two collectives per phase, reached by every rank even after a local failure, so that one rank's error is
    reported on all of them instead of leaving the others blocked in the gather.
    """
    failed = np.flatnonzero(gather_checked(group, np.array([[float(error is not None)]]), columns=1)[:, 0])
    if error is not None:
        raise error
    if failed.size:
        raise RuntimeError(f"rank(s) {failed.tolist()} failed during the radius search (see their error)")
    rows = gather_checked(group, table.rows(mine), columns=len(WIRE_COLUMNS))
    if not np.array_equal(rows[:, WIRE_COLUMNS.index("index")].astype(np.int64), phase):
        raise RuntimeError(f"gathered directions {rows[:, 0].astype(np.int64).tolist()} differ from the phase's "
                           f"{phase.tolist()}: the ranks disagree on n_directions or the split")
    table.update_from_rows(rows)


def pilot_start(table: DirectionTable, n_pilot: int, default: float) -> float:
    """Start radius of the directions after the pilot: the median of the pilot's converged radii > 0, else
    ``default``. Every rank has all pilot radii (gathered), so all choose the same start."""
    radii, flags = table.radii, table.flags
    inside = [radii[i] for i in range(n_pilot) if flags[i] == DirectionFlag.CONVERGED and radii[i] > 0]
    return float(np.median(inside)) if inside else default


def phases(n_directions: int) -> tuple[np.ndarray, np.ndarray]:
    """The pilot's direction indices and the rest's, ``[min(PILOT_DIRECTIONS, n)]`` and ``[n − that]``."""
    n_pilot = min(PILOT_DIRECTIONS, n_directions)
    return np.arange(n_pilot), np.arange(n_pilot, n_directions)


__all__ = ["PILOT_DIRECTIONS", "DirectionSearch", "phases", "pilot_start", "run_phase", "share_phase"]
