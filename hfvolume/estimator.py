"""``estimate_log_volume``: the functional core of hfvolume (ESTIMATOR.md §1–4).

It works on a flat anchor θ0 ∈ R^D and a behaviour callable, and knows nothing about models or Hugging Face.
For direction i (from the seed), it draws a unit direction w_i from the proposal, finds the radius ρ(w_i) where
Δ(θ0 + t w_i) = fn(θ0 + t w_i) − fn(θ0) reaches the cutoff, and records

    est_i = log f(w_i) + log weight_i           (nats; f from the prior, weight = 1/q(w_i))

then reduces the estimates once with log-mean-exp (log μ̂), ESS, a Markov lower bound and a bootstrap spread.
"""
from __future__ import annotations

import json
import logging
import math
import time
import zlib
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from hfvolume.numerics import all_finite
from hfvolume.priors import GaussianPrior, Rays, UniformPrior, concatenate_rays, resolve_prior
from hfvolume.proposals import Proposal, normalize_log_scales, sum_squares_f64
from hfvolume.radius import RADIUS_METHODS, RadiusMethod, search_radii
from hfvolume.results import LN2, DirectionFlag, VolumeResult
from hfvolume.sharding import (
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
from hfvolume.stats import summarize_log_estimates

logger = logging.getLogger("hfvolume")

PILOT_DIRECTIONS = 4  # directions searched from the default start; the rest start at their median radius
DEFAULT_START_FRACTION = 1e-2  # default first radius: this fraction of |θ0| (or of √D when θ0 = 0)
UNIFORM_CAP_FACTOR = 1e6  # uniform prior's default radius cap, in units of the starting radius

Behavior = Callable[[torch.Tensor], Union[torch.Tensor, float]]
_FLAGS = tuple(DirectionFlag)  # flags travel between ranks as their index here
_FLAG_CODES = {f: float(k) for k, f in enumerate(_FLAGS)}


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


def _check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def perturbation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Perturbed points are formed in float64 for float64 anchors and float32 otherwise (bf16/fp16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Behavior:
    """Calls the user's fn on ``[k, D]`` points (batched or one row at a time) and returns float64 values."""

    def __init__(self, fn: Behavior, batched: bool):
        self.fn, self.batched, self.calls = fn, batched, 0

    def __call__(self, points: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            if self.batched:
                out = torch.as_tensor(self.fn(points)).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
                if out.numel() != points.shape[0]:
                    raise ValueError(
                        f"batched fn returned {out.numel()} values for {points.shape[0]} points; expected shape [K]"
                    )
            else:
                vals = []
                for row in points:
                    v = torch.as_tensor(self.fn(row)).detach().to(device="cpu", dtype=torch.float64)
                    if v.numel() != 1:
                        raise ValueError(f"fn must return a scalar, got a value of shape {tuple(v.shape)}")
                    vals.append(v.reshape(()))
                out = torch.stack(vals)
        self.calls += points.shape[0]
        return out.numpy()

    def along(self, theta0: torch.Tensor, w: torch.Tensor, rows: np.ndarray, ts: np.ndarray) -> np.ndarray | None:
        """Values at θ0 + ts[j]·w[rows[j]] from ``fn.evaluate_along(θ0, [1, D] direction, [t])`` when a batched
        fn offers it and accepts (one row per call: a view of ``w``, never a gathered copy), else None."""
        method = getattr(self.fn, "evaluate_along", None) if self.batched else None
        if method is None:
            return None
        values = []
        with torch.no_grad():
            for r, t in zip(rows.tolist(), ts.tolist()):
                out = method(theta0, w[r : r + 1], [float(t)])
                if out is None:
                    if values:
                        raise RuntimeError("evaluate_along accepted some rows of a round and declined others")
                    return None
                out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
                if out.numel() != 1:
                    raise ValueError(f"evaluate_along returned {out.numel()} values for 1 point")
                values.append(float(out[0]))
                self.calls += 1
        return np.asarray(values, dtype=np.float64)


def estimate_log_volume(
    fn: Behavior,
    anchor: torch.Tensor,
    *,
    cutoff: float,
    prior: Union[str, GaussianPrior, UniformPrior] = "gaussian",
    n_directions: int = 100,
    scales: Union[torch.Tensor, np.ndarray, Sequence[float], None] = None,
    mixture: float = 0.0,
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
    """Estimate the log prior mass of the local region {θ : fn(θ) − fn(anchor) ≤ cutoff} (ESTIMATOR.md §1).

    Args:
        fn: behaviour. ``fn(theta)`` takes a ``[D]`` tensor and returns a scalar; with ``batched=True`` it takes
            ``[K, D]`` and returns ``[K]``. It is called under ``torch.no_grad()``.
        anchor: ``[D]`` float tensor θ0 (the trained network). Never modified.
        cutoff: ε > 0, in the units of ``fn`` (nats for KL).
        prior: "gaussian" (σ = RMS of the anchor, centred at the origin), "uniform" (Lebesgue volume), or a
            :class:`GaussianPrior` / :class:`UniformPrior` instance.
        n_directions: number of directions (importance samples).
        scales: optional positive ``[D]`` proposal scales p (normalised to unit geometric mean); directions are
            v = P u, w = v/|v|, weighted by 1/q(w) exactly (ESTIMATOR.md §2).
        mixture: α ∈ [0, 1], fraction of isotropic directions in a defensive mixture with the ``scales`` proposal.
        seed: direction i comes from generators keyed by (seed, i): results do not depend on ``batch_size``.
        rtol: radius search tolerance: a converged ray has |Δ − ε| ≤ rtol·ε at its (evaluated) radius.
        batch_size: rays searched in lockstep (points per call of a batched ``fn``).
        radius_method: "secant" (default) or "bisection" (the research code's method, as a baseline).
        initial_radius: first radius tried by the first directions; default 1e-2·|θ0| (1e-2·√D if θ0 = 0).
            Later directions start at the median radius of the first ``PILOT_DIRECTIONS``.
        max_evaluations: budget of ``fn`` calls per direction before a ray is flagged ``failed``.
        delta: the lower bound holds with probability 1 − delta.
        progress: show a tqdm progress bar.
        proposal_info, extra_settings: JSON-safe descriptions recorded in ``result.settings``.
        sharding: a process group (:class:`hfvolume.sharding.Sharding`): every rank calls this function with the
            same arguments; each searches its block of the directions, the per-direction arrays are all-gathered
            once per phase, and every rank returns the same result as one process would (``forward_passes`` is
            summed over ranks, ``wall_time_s`` is this rank's). Progress is shown on rank 0 only.
        coordinates: for a model whose *parameters* are sharded (FSDP2): this rank's part of the coordinates
            (:class:`hfvolume.sharding.CoordinateShard`). Every rank then calls this function with its local
            ``[D_local]`` anchor (and local ``scales``), works on every direction (its local coordinates of the
            same global direction), all-reduces every sum over coordinates, and needs an ``fn`` that returns the
            same values on all ranks (so that all take the same radius-search decisions). Not combinable with a
            multi-process ``sharding``. ``n_params`` in the result is the global D.

    Returns:
        A :class:`VolumeResult`; ``log_volume`` in nats.
    """
    t_begin = time.perf_counter()
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
    cutoff = _check_positive_float("cutoff", cutoff)
    n_directions = _check_positive_int("n_directions", n_directions)
    batch_size = _check_positive_int("batch_size", batch_size)
    max_evaluations = _check_positive_int("max_evaluations", max_evaluations, minimum=2)
    seed = _check_positive_int("seed", seed, minimum=0)
    rtol = _check_positive_float("rtol", rtol)
    if rtol >= 1:
        raise ValueError(f"rtol must be < 1, got {rtol}")
    if radius_method not in RADIUS_METHODS:
        raise ValueError(f"unknown radius_method {radius_method!r}: use one of {RADIUS_METHODS}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    group = SingleProcess() if sharding is None else check_sharding(sharding)
    n_params = anchor.numel()
    if coordinates is not None:
        coordinates = check_coordinate_shard(coordinates, n_params)
        if group.world_size > 1:
            raise ValueError("coordinates= (a sharded model: every rank works on every direction) cannot be "
                             f"combined with a {group.world_size}-process sharding= (directions split across ranks)")
        n_params = coordinates.n_params

    dtype = perturbation_dtype(anchor.dtype)
    theta0 = anchor.detach().to(dtype)
    if coordinates is None:
        anchor_norm = math.sqrt(sum_squares_f64(theta0))  # chunked: no D-sized float64 copy
    else:
        anchor_norm = math.sqrt(float(global_sums(coordinates, np.array([sum_squares_f64(theta0)]))[0]))
    default_start = DEFAULT_START_FRACTION * (anchor_norm if anchor_norm > 0 else math.sqrt(n_params))
    t_first = default_start if initial_radius is None else _check_positive_float("initial_radius", initial_radius)

    resolved = resolve_prior(prior, anchor, default_max_radius=UNIFORM_CAP_FACTOR * t_first, coordinates=coordinates)
    log_scales = None if scales is None else normalize_log_scales(scales, n_params, coordinates=coordinates)
    info = dict(proposal_info or {"name": "isotropic" if scales is None else "scales"})
    proposal = Proposal(log_scales, mixture, info)

    behavior = _Behavior(fn, batched)
    f0 = float(behavior(theta0.unsqueeze(0))[0])
    if group.world_size > 1 or coordinates is not None:
        # Before any rank can raise alone, so a mismatch is reported and nobody blocks. With sharded coordinates
        # a mismatch (say in n_directions) would otherwise leave ranks waiting in different collectives.
        described = json.dumps([resolved.describe(), proposal.describe(), radius_method, delta, extra_settings],
                               sort_keys=True, default=str)
        agree: dict[str, float] = {
            "n_params": n_params, "n_directions": n_directions, "seed": seed, "cutoff": cutoff, "rtol": rtol,
            "max_evaluations": max_evaluations, "initial_radius": t_first, "fn(anchor)": f0, "|anchor|": anchor_norm,
        }
        if coordinates is None:  # sharded scales are local: their sum differs between ranks
            agree["Σ log² proposal scales"] = 0.0 if log_scales is None else sum_squares_f64(log_scales)
        agree["settings checksum"] = zlib.crc32(described.encode())
        hint = "every rank must call with the same model, data and arguments (the data is not split across ranks)"
        if coordinates is None:
            check_ranks_agree(group, agree, hint=hint)
        else:
            check_coordinates_agree(coordinates, agree, hint=hint)
    if not math.isfinite(f0):
        raise ValueError(f"fn(anchor) is not finite ({f0}); the region {{fn − fn(anchor) ≤ cutoff}} is undefined")

    log_est = np.empty(n_directions)
    radii = np.empty(n_directions)
    deltas = np.empty(n_directions)
    log_w = np.empty(n_directions)
    flags = np.empty(n_directions, dtype=object)
    evals = np.empty(n_directions, dtype=np.int64)
    nonfinite = np.empty(n_directions, dtype=np.int64)

    def run_batch(indices: np.ndarray, t_start: float) -> Rays:
        """Search the directions ``indices``; returns their rays (log masses are formed once per phase)."""
        w, lw = proposal.draw(indices.tolist(), n_params, seed=seed, dtype=dtype, device=theta0.device,
                              coordinates=coordinates)
        rays = resolved.rays(w)

        # One [K, D] buffer per batch, refilled every round: fresh D-sized allocations each round cost more
        # (page faults) than the arithmetic for large models. θ0 is never written to (no drift).
        # A behaviour that can evaluate θ0 + t·w itself (ModelBehavior's in-place path for large models) is
        # asked first and spares this buffer; it is allocated on the first round that needs it.
        points: list[torch.Tensor] = []

        def evaluate(rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
            along = behavior.along(theta0, w, rows, ts)
            if along is not None:
                return along - f0
            if not points:
                points.append(torch.empty_like(w))
            for j, (r, t) in enumerate(zip(rows.tolist(), ts.tolist())):
                torch.add(theta0, w[r], alpha=t, out=points[0][j])
            return behavior(points[0][: len(rows)]) - f0

        found = search_radii(
            evaluate,
            np.full(len(indices), t_start),
            cutoff=cutoff,
            rtol=rtol,
            # Caps (for the Gaussian prior a quadrature and a root search per ray) are computed only for rays that
            # search past their cheap lower bound.
            cap=rays.cap_floor,
            cap_flag=rays.cap_flag,
            method=radius_method,
            max_evaluations=max_evaluations,
            exact_cap=rays.cap_at,
        )
        radii[indices], deltas[indices] = found.radius, found.delta
        log_w[indices], flags[indices] = lw, found.flag
        evals[indices], nonfinite[indices] = found.evaluations, found.nonfinite
        return rays

    def estimate(indices: np.ndarray, rays: Rays) -> None:
        """log f(w) + log weight for ``indices`` (searched), with one vectorised log_mass call."""
        capped = flags[indices] == rays.cap_flag
        est = rays.log_mass(radii[indices], capped) + log_w[indices]
        bad = np.flatnonzero(np.isnan(est))
        if bad.size:
            i = int(indices[bad[0]])
            raise FloatingPointError(
                f"log estimate of direction {i} is NaN (radius={radii[i]!r}, log weight={log_w[i]!r}); "
                "refusing to average it"
            )
        log_est[indices] = est

    def share(phase: np.ndarray, mine: np.ndarray, error: BaseException | None) -> None:
        # Two collectives per phase, reached by every rank even after a local failure, so that one rank's error
        # is reported on all of them instead of leaving the others blocked in the gather.
        failed = np.flatnonzero(gather_checked(group, np.array([[float(error is not None)]]), columns=1)[:, 0])
        if error is not None:
            raise error
        if failed.size:
            raise RuntimeError(f"rank(s) {failed.tolist()} failed during the radius search (see their error)")
        rows = np.column_stack([
            mine, log_est[mine], radii[mine], deltas[mine], log_w[mine],
            [_FLAG_CODES[DirectionFlag(f)] for f in flags[mine]], evals[mine], nonfinite[mine],
        ]) if mine.size else np.empty((0, 8))
        got = gather_checked(group, rows, columns=8)
        idx = got[:, 0].astype(np.int64)
        if not np.array_equal(idx, phase):
            raise RuntimeError(f"gathered directions {idx.tolist()} differ from the phase's {phase.tolist()}: the "
                               "ranks disagree on n_directions or the split")
        log_est[idx], radii[idx], deltas[idx], log_w[idx] = got[:, 1], got[:, 2], got[:, 3], got[:, 4]
        flags[idx] = [_FLAGS[int(c)] for c in got[:, 5]]
        evals[idx], nonfinite[idx] = got[:, 6].astype(np.int64), got[:, 7].astype(np.int64)

    def run_phase(phase: np.ndarray, t_start: float, bar: Any) -> None:
        mine = shard_indices(phase, group.rank, group.world_size)
        error: BaseException | None = None
        try:
            searched = []
            for start in range(0, len(mine), batch_size):
                idx = mine[start : start + batch_size]
                searched.append(run_batch(idx, t_start))
                bar.update(len(idx))
            if searched:
                estimate(mine, concatenate_rays(searched))
        except Exception as err:  # re-raised in share() after the other ranks learn of it
            if group.world_size == 1:
                raise
            error = err
        if group.world_size > 1:
            share(phase, mine, error)

    n_pilot = min(PILOT_DIRECTIONS, n_directions)
    pilot, rest = np.arange(n_pilot), np.arange(n_pilot, n_directions)
    n_mine = sum(len(shard_indices(p, group.rank, group.world_size)) for p in (pilot, rest))
    show = progress and group.rank == 0
    with tqdm(total=n_mine, disable=not show, desc="local volume", unit="dir", leave=False) as bar:
        run_phase(pilot, t_first, bar)
        # Every rank sees all pilot radii (gathered), so all choose the same start for the rest.
        inside = [radii[i] for i in range(n_pilot) if flags[i] == DirectionFlag.CONVERGED and radii[i] > 0]
        t_next = float(np.median(inside)) if inside else t_first
        run_phase(rest, t_next, bar)
    forward_passes = behavior.calls
    if group.world_size > 1:
        forward_passes = int(gather_checked(group, np.array([[float(behavior.calls)]]), columns=1).sum())

    summary = summarize_log_estimates(log_est, delta=delta, seed=seed)
    settings: dict[str, Any] = {
        "seed": seed,
        "cutoff": cutoff,
        "rtol": rtol,
        "prior": resolved.describe(),
        "proposal": proposal.describe(),
        "radius_method": radius_method,
        "n_params": n_params,
        "n_directions": n_directions,
        "initial_radius": t_first,
        "max_evaluations": max_evaluations,
        "delta": delta,
        "dtype": str(dtype).replace("torch.", ""),
        "world_size": group.world_size,
    }
    if coordinates is not None:
        settings["coordinate_sharded"] = True
    settings.update(dict(extra_settings or {}))
    result = VolumeResult(
        log_volume=summary.log_mean,
        information_content_bits=-summary.log_mean / LN2,
        log_volume_lower_bound=summary.lower_bound,
        confidence=1.0 - delta,
        ess=summary.ess,
        log_volume_std=summary.bootstrap_std,
        norm_term=float(resolved.norm_term),
        n_params=n_params,
        n_directions=n_directions,
        forward_passes=forward_passes,
        wall_time_s=time.perf_counter() - t_begin,
        log_estimates=tuple(float(x) for x in log_est),
        radii=tuple(float(x) for x in radii),
        deltas=tuple(float(x) for x in deltas),
        log_weights=tuple(float(x) for x in log_w),
        flags=tuple(DirectionFlag(f).value for f in flags),
        evaluations=tuple(int(x) for x in evals),
        nonfinite=tuple(int(x) for x in nonfinite),
        settings=settings,
    )
    report_diagnostics(result)
    return result


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


__all__ = ["estimate_log_volume", "perturbation_dtype", "report_diagnostics"]
