"""``estimate_log_volume``: the local volume of a flat anchor θ0 ∈ R^D, the functional core of hfvolume.

The local volume (Scherlis & Belrose 2025, arXiv 2501.18812) is the prior mass of the star-shaped region
L = {θ0 + t w : |w| = 1, 0 ≤ t < ρ(w)}, where ρ(w) is the first radius at which the behaviour change
Δ(θ0 + t w) = fn(θ0 + t w) − fn(θ0) reaches the cutoff ε. In polar coordinates about θ0,

    μ(L) = E_{w ~ Unif(S^{D−1})}[f(w)],    f(w) = |S^{D−1}| ∫_0^{ρ(w)} p(θ0 + t w) t^{D−1} dt,

and a direction w_i drawn from a proposal with density q relative to the uniform one gives the unbiased sample
f(w_i)/q(w_i). The estimate is log μ̂ = log-mean-exp_i [log f(w_i) − log q(w_i)] in nats, reported with its
effective sample size, a Markov lower bound and a bootstrap spread (:mod:`hfvolume.volume.stats`).

:func:`estimate_log_volume` is a short sequence of steps: validate the arguments, set up the anchor, prior,
proposal and behaviour, check that all ranks were given the same problem, search the directions in two phases
(:mod:`hfvolume.volume.phases`), and assemble the :class:`VolumeResult`. It knows nothing about models.
"""
from __future__ import annotations

import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from hfvolume.volume.checks import check_choice, check_fraction, check_int, check_positive
from hfvolume.volume.collectives import (
    CoordinateShard,
    Sharding,
    SingleProcess,
    check_coordinate_shard,
    check_coordinates_agree,
    check_ranks_agree,
    check_sharding,
    gather_checked,
    global_sums,
    shard_indices,
)
from hfvolume.volume.evaluation import Behavior, BehaviorCalls
from hfvolume.volume.numerics import all_finite, sum_squares_f64
from hfvolume.volume.phases import DirectionSearch, phases, pilot_start, run_phase
from hfvolume.volume.priors import GaussianPrior, UniformPrior, resolve_prior
from hfvolume.volume.proposals import DirectionProposal, Proposal, ProposalSpec, normalize_log_scales
from hfvolume.volume.radius import RADIUS_METHODS, RadiusMethod
from hfvolume.volume.results import LN2, VolumeResult
from hfvolume.volume.stats import summarize_log_estimates
from hfvolume.volume.table import DirectionTable

logger = logging.getLogger("hfvolume")

DEFAULT_START_FRACTION = 1e-2  # default first radius: this fraction of |θ0| (or of √D when θ0 = 0)
UNIFORM_CAP_FACTOR = 1e6  # uniform prior's default radius cap, in units of the starting radius


def perturbation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Perturbed points are formed in float64 for float64 anchors and float32 otherwise (bf16/fp16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Settings:
    """The validated scalar arguments of :func:`estimate_log_volume`."""

    cutoff: float
    n_directions: int
    batch_size: int
    max_evaluations: int
    seed: int
    rtol: float
    radius_method: RadiusMethod
    delta: float
    initial_radius: float | None


@dataclass(frozen=True, eq=False)
class _Setup:
    """The problem every rank must agree on: the search itself, plus what is checked and recorded about it."""

    search: DirectionSearch
    anchor_norm: float  # |θ0| (global with sharded coordinates)
    t_first: float  # first radius of the pilot directions
    log_scales: torch.Tensor | None  # the proposal's log p (local with sharded coordinates)


def estimate_log_volume(
    fn: Behavior,
    anchor: torch.Tensor,
    *,
    cutoff: float,
    prior: Union[str, GaussianPrior, UniformPrior] = "gaussian",
    n_directions: int = 100,
    scales: Union[torch.Tensor, np.ndarray, Sequence[float], None] = None,
    mixture: float = 0.0,
    proposal: ProposalSpec | None = None,
    seed: int = 0,
    rtol: float = 1e-2,
    batch_size: int = 1,
    batched: bool = False,
    radius_method: RadiusMethod = "secant",
    initial_radius: float | None = None,
    max_evaluations: int = 64,
    delta: float = 0.05,
    progress: bool = True,
    proposal_info: Mapping[str, Any] | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    sharding: Sharding | None = None,
    coordinates: CoordinateShard | None = None,
) -> VolumeResult:
    """Estimate log μ, the log prior mass of the local region {θ : fn(θ) − fn(anchor) ≤ cutoff}, in nats.

    Args:
        fn: behaviour. ``fn(theta)`` takes a ``[D]`` tensor and returns a scalar; with ``batched=True`` it takes
            ``[K, D]`` and returns ``[K]``. It is called under ``torch.no_grad()``.
        anchor: ``[D]`` float tensor θ0 (the trained network). Never modified.
        cutoff: ε > 0, in the units of ``fn`` (nats for KL).
        prior: "gaussian" (σ = RMS of the anchor, centred at the origin), "uniform" (Lebesgue volume), or a
            :class:`GaussianPrior` / :class:`UniformPrior` instance.
        n_directions: number of directions (importance samples).
        scales: optional positive ``[D]`` proposal scales p (normalised to unit geometric mean); directions are
            v = P u, w = v/|v| with P = diag(p), weighted by 1/q(w) exactly (:class:`Proposal`).
        mixture: α ∈ [0, 1], fraction of isotropic directions in a defensive mixture with the ``scales`` proposal.
        proposal: a proposal resolved against the prior, the anchor and the cutoff, e.g. the curvature-tilted
            :class:`hfvolume.volume.tilted.CurvatureProposal` (which carries its own mixture and description);
            exclusive with ``scales``, ``mixture`` and ``proposal_info``. Not available with ``coordinates``.
        seed: direction i comes from generators keyed by (seed, i): results do not depend on ``batch_size``.
        rtol: radius search tolerance: a converged ray has |Δ − ε| ≤ rtol·ε at its (evaluated) radius.
        batch_size: rays searched in lockstep (points per call of a batched ``fn``).
        radius_method: "secant" (default) or "bisection" (the research code's method, as a baseline).
        initial_radius: first radius tried by the first directions; default 1e-2·|θ0| (1e-2·√D if θ0 = 0).
            Later directions start at the median radius of the first :data:`~hfvolume.volume.phases.PILOT_DIRECTIONS`.
        max_evaluations: budget of ``fn`` calls per direction before a ray is flagged ``failed``.
        delta: the lower bound holds with probability 1 − delta.
        progress: show a tqdm progress bar.
        proposal_info, extra_settings: JSON-safe descriptions recorded in ``result.settings``.
        sharding: a process group (:class:`hfvolume.volume.collectives.Sharding`): every rank calls this function
            with the same arguments; each searches its block of the directions, the per-direction arrays are
            all-gathered once per phase, and every rank returns the same result as one process would
            (``forward_passes`` is summed over ranks, ``wall_time_s`` is this rank's). Progress is shown on rank 0.
        coordinates: for a model whose *parameters* are sharded (FSDP2): this rank's part of the coordinates
            (:class:`hfvolume.volume.collectives.CoordinateShard`). Every rank then calls this function with its
            local ``[D_local]`` anchor (and local ``scales``), works on every direction (its local coordinates of
            the same global direction), all-reduces every sum over coordinates, and needs an ``fn`` that returns
            the same values on all ranks (so that all take the same radius-search decisions). Not combinable with
            a multi-process ``sharding``. ``n_params`` in the result is the global D.

    Returns:
        A :class:`VolumeResult`; ``log_volume`` = log-mean-exp of the ``[n_directions]`` per-direction estimates
        log f(w_i) − log q(w_i), nats.
    """
    t_begin = time.perf_counter()
    _check_behavior_and_anchor(fn, anchor)
    settings = _Settings(
        cutoff=check_positive("cutoff", cutoff),
        n_directions=check_int("n_directions", n_directions),
        batch_size=check_int("batch_size", batch_size),
        max_evaluations=check_int("max_evaluations", max_evaluations, minimum=2),
        seed=check_int("seed", seed, minimum=0),
        rtol=check_fraction("rtol", rtol, open_low=True, open_high=True),
        radius_method=check_choice("radius_method", radius_method, RADIUS_METHODS),
        delta=check_fraction("delta", delta, open_low=True, open_high=True),
        initial_radius=None if initial_radius is None else check_positive("initial_radius", initial_radius),
    )
    group = SingleProcess() if sharding is None else check_sharding(sharding)
    coordinates = _check_coordinates(coordinates, anchor, group)
    _check_proposal_arguments(proposal, scales=scales, mixture=mixture, proposal_info=proposal_info)
    setup = _set_up(fn, anchor, settings, prior=prior, scales=scales, mixture=mixture, batched=batched,
                    proposal_info=proposal_info, coordinates=coordinates, proposal=proposal)
    if group.world_size > 1 or coordinates is not None:
        _check_same_problem(setup, settings, group, extra_settings)
    if not math.isfinite(setup.search.f0):
        raise ValueError(f"fn(anchor) is not finite ({setup.search.f0}); the region {{fn − fn(anchor) ≤ cutoff}} "
                         "is undefined")
    table, forward_passes = _search_directions(setup, settings, group, progress=progress)
    result = _assemble_result(setup, settings, group, table, forward_passes=forward_passes,
                              extra_settings=extra_settings, wall_time_s=time.perf_counter() - t_begin)
    report_diagnostics(result)
    return result


def _check_behavior_and_anchor(fn: Any, anchor: Any) -> None:
    """``anchor`` must be a non-empty, finite, floating-point ``[D]`` tensor and ``fn`` a callable."""
    if not isinstance(anchor, torch.Tensor):
        raise TypeError(f"anchor must be a torch.Tensor, got {type(anchor).__name__}")
    if anchor.ndim != 1 or anchor.numel() == 0:
        raise ValueError(f"anchor must be a non-empty 1-D tensor [D], got shape {tuple(anchor.shape)}")
    if not anchor.is_floating_point():
        raise TypeError(f"anchor must be a floating-point tensor, got {anchor.dtype}")
    if not all_finite(anchor):
        raise ValueError("anchor has non-finite entries")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")


def _check_coordinates(coordinates: Any, anchor: torch.Tensor, group: Sharding) -> CoordinateShard | None:
    """A valid coordinate shard for the local ``anchor``, or None; never together with a multi-process group."""
    if coordinates is None:
        return None
    coordinates = check_coordinate_shard(coordinates, anchor.numel())
    if group.world_size > 1:
        raise ValueError("coordinates= (a sharded model: every rank works on every direction) cannot be "
                         f"combined with a {group.world_size}-process sharding= (directions split across ranks)")
    return coordinates


def _check_proposal_arguments(proposal: Any, *, scales: Any, mixture: float, proposal_info: Any) -> None:
    """``proposal=`` replaces ``scales``, ``mixture`` and ``proposal_info`` (it carries its own)."""
    if proposal is None:
        return
    if not callable(getattr(proposal, "resolve", None)):
        raise TypeError(f"proposal must have a resolve(prior, *, cutoff, coordinates) method (e.g. "
                        f"CurvatureProposal), got {type(proposal).__name__}")
    given = [name for name, value in (("scales", scales), ("proposal_info", proposal_info)) if value is not None]
    if mixture != 0.0:
        given.append("mixture")
    if given:
        raise ValueError(f"proposal= cannot be combined with {', '.join(given)}: set the mixture and the "
                         "description on the proposal itself")


def _set_up(
    fn: Behavior,
    anchor: torch.Tensor,
    settings: _Settings,
    *,
    prior: Union[str, GaussianPrior, UniformPrior],
    scales: Union[torch.Tensor, np.ndarray, Sequence[float], None],
    mixture: float,
    batched: bool,
    proposal_info: Mapping[str, Any] | None,
    coordinates: CoordinateShard | None,
    proposal: ProposalSpec | None = None,
) -> _Setup:
    """Anchor in the perturbation dtype, first radius, resolved prior, proposal, and fn(θ0) (one forward pass).

    With ``coordinates`` the norms, the prior's sums and the scales' normalisation are collectives.
    """
    n_params = anchor.numel() if coordinates is None else coordinates.n_params
    theta0 = anchor.detach().to(perturbation_dtype(anchor.dtype))
    if coordinates is None:
        anchor_norm = math.sqrt(sum_squares_f64(theta0))  # chunked: no D-sized float64 copy
    else:
        anchor_norm = math.sqrt(float(global_sums(coordinates, np.array([sum_squares_f64(theta0)]))[0]))
    default_start = DEFAULT_START_FRACTION * (anchor_norm if anchor_norm > 0 else math.sqrt(n_params))
    t_first = default_start if settings.initial_radius is None else settings.initial_radius

    resolved = resolve_prior(prior, anchor, default_max_radius=UNIFORM_CAP_FACTOR * t_first, coordinates=coordinates)
    log_scales = None if scales is None else normalize_log_scales(scales, n_params, coordinates=coordinates)
    directions: DirectionProposal
    if proposal is not None:
        directions = proposal.resolve(resolved, cutoff=settings.cutoff, coordinates=coordinates)
    else:
        info = dict(proposal_info or {"name": "isotropic" if scales is None else "scales"})
        directions = Proposal(log_scales, mixture, info)

    behavior = BehaviorCalls(fn, batched)
    f0 = float(behavior(theta0.unsqueeze(0))[0])
    search = DirectionSearch(
        behavior=behavior, theta0=theta0, f0=f0, prior=resolved, proposal=directions, n_params=n_params,
        seed=settings.seed, cutoff=settings.cutoff, rtol=settings.rtol, radius_method=settings.radius_method,
        max_evaluations=settings.max_evaluations, batch_size=settings.batch_size, coordinates=coordinates,
    )
    return _Setup(search=search, anchor_norm=anchor_norm, t_first=t_first, log_scales=log_scales)


def _check_same_problem(setup: _Setup, settings: _Settings, group: Sharding,
                        extra_settings: Mapping[str, Any] | None) -> None:
    """Collective: raise on every rank if the ranks were not given the same problem.

    Runs before any rank can raise alone (fn(θ0) is checked for finiteness only afterwards), so a mismatch is
    reported everywhere and nobody blocks: with sharded coordinates a mismatch, say in n_directions, would
    otherwise leave ranks waiting in different collectives.
    """
    search, coordinates = setup.search, setup.search.coordinates
    described = json.dumps([search.prior.describe(), search.proposal.describe(), settings.radius_method,
                            settings.delta, extra_settings], sort_keys=True, default=str)
    agree: dict[str, float] = {
        "n_params": search.n_params, "n_directions": settings.n_directions, "seed": settings.seed,
        "cutoff": settings.cutoff, "rtol": settings.rtol, "max_evaluations": settings.max_evaluations,
        "initial_radius": setup.t_first, "fn(anchor)": search.f0, "|anchor|": setup.anchor_norm,
    }
    if coordinates is None:  # sharded scales are local: their sum differs between ranks
        agree["Σ log² proposal scales"] = 0.0 if setup.log_scales is None else sum_squares_f64(setup.log_scales)
    agree["settings checksum"] = zlib.crc32(described.encode())
    hint = "every rank must call with the same model, data and arguments (the data is not split across ranks)"
    if coordinates is None:
        check_ranks_agree(group, agree, hint=hint)
    else:
        check_coordinates_agree(coordinates, agree, hint=hint)


def _search_directions(setup: _Setup, settings: _Settings, group: Sharding, *,
                       progress: bool) -> tuple[DirectionTable, int]:
    """Search the pilot, then the rest from the pilot's median radius. Returns the full table (every rank has it)
    and the forward passes of all ranks, each rank's fn(θ0) included."""
    search, table = setup.search, DirectionTable.empty(settings.n_directions)
    pilot, rest = phases(settings.n_directions)
    n_mine = sum(len(shard_indices(p, group.rank, group.world_size)) for p in (pilot, rest))
    show = progress and group.rank == 0
    with tqdm(total=n_mine, disable=not show, desc="local volume", unit="dir", leave=False) as bar:
        run_phase(search, group, table, pilot, setup.t_first, bar)
        run_phase(search, group, table, rest, pilot_start(table, len(pilot), setup.t_first), bar)
    forward_passes = search.behavior.calls
    if group.world_size > 1:
        forward_passes = int(gather_checked(group, np.array([[float(search.behavior.calls)]]), columns=1).sum())
    return table, forward_passes


def _assemble_result(setup: _Setup, settings: _Settings, group: Sharding, table: DirectionTable, *,
                     forward_passes: int, extra_settings: Mapping[str, Any] | None, wall_time_s: float) -> VolumeResult:
    """Reduce the ``[n_directions]`` log estimates once (:func:`summarize_log_estimates`) and record every setting
    needed to reproduce the number (``extra_settings`` last, so a caller's description wins)."""
    search = setup.search
    summary = summarize_log_estimates(table.log_estimates, delta=settings.delta, seed=settings.seed)
    recorded: dict[str, Any] = {
        "seed": settings.seed,
        "cutoff": settings.cutoff,
        "rtol": settings.rtol,
        "prior": search.prior.describe(),  # a collective with per-coordinate σ on sharded coordinates
        "proposal": search.proposal.describe(),
        "radius_method": settings.radius_method,
        "n_params": search.n_params,
        "n_directions": settings.n_directions,
        "initial_radius": setup.t_first,
        "max_evaluations": settings.max_evaluations,
        "delta": settings.delta,
        "dtype": str(search.theta0.dtype).replace("torch.", ""),
        "world_size": group.world_size,
    }
    if search.coordinates is not None:
        recorded["coordinate_sharded"] = True
    recorded.update(dict(extra_settings or {}))
    return VolumeResult(
        log_volume=summary.log_mean,
        information_content_bits=-summary.log_mean / LN2,
        log_volume_lower_bound=summary.lower_bound,
        confidence=1.0 - settings.delta,
        ess=summary.ess,
        log_volume_std=summary.bootstrap_std,
        norm_term=float(search.prior.norm_term),
        n_params=search.n_params,
        n_directions=settings.n_directions,
        forward_passes=forward_passes,
        wall_time_s=wall_time_s,
        **table.result_fields(),
        settings=recorded,
    )


def report_diagnostics(result: VolumeResult) -> None:
    """Log the warnings a user needs to read a number correctly (lower bounds, one-sample dominance, failures)."""
    if result.n_unbounded:
        logger.warning(
            "%d of %d directions were still inside the region at the radius cap (uniform prior): "
            "log_volume is only a lower bound",
            result.n_unbounded,
            result.n_directions,
        )
    if result.n_failed:
        logger.warning(
            "%d of %d directions did not reach |Δ − cutoff| ≤ rtol·cutoff; their last inside point was used "
            "(conservative)",
            result.n_failed,
            result.n_directions,
        )
    if sum(result.nonfinite):
        logger.warning("the behaviour returned NaN/inf at %d evaluated points; counted as outside the region",
                       sum(result.nonfinite))
    if result.ess < 2.0 and result.n_directions > 1:
        logger.warning(
            "effective sample size %.3g < 2: one direction dominates, so log_volume is closer to a single sample's "
            "lower bound than to an average",
            result.ess,
        )
    pareto = result.pareto
    if pareto.reliability in ("unreliable", "unreliable_sample_size"):
        logger.warning("%s (Pareto k̂ of the importance weights; quote log_volume_lower_bound)", pareto.message)
    elif pareto.reliability == "too_few_samples":
        logger.info("%s", pareto.message)


__all__ = ["estimate_log_volume", "perturbation_dtype", "report_diagnostics"]
