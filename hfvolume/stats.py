"""Aggregation of per-direction log estimates (ESTIMATOR.md §4).

All reductions happen once, in float64 log space, over the full set of per-direction estimates: never average
logs, and never reduce partial sets separately (the distributed code gathers, then calls these).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hfvolume.numerics import log_mean_exp


@dataclass(frozen=True)
class LogEstimateSummary:
    """Summary of ``[n_directions]`` per-direction log estimates (nats).

    log_mean: log-mean-exp of the estimates (the log of an exp-space unbiased estimate).
    lower_bound: Markov bound ``log_mean - log(1/delta)``: P(log_mean ≥ log μ + t) ≤ e^{-t}.
    ess: ``exp(2·LSE(est) − LSE(2·est))``.
    bootstrap_std: standard deviation of log_mean over bootstrap resamples of the directions (0 for one sample).
    log_estimate_std: standard deviation of the finite estimates themselves.
    """

    log_mean: float
    lower_bound: float
    ess: float
    bootstrap_std: float
    log_estimate_std: float


def effective_sample_size(log_estimates: np.ndarray) -> float:
    """ESS = exp(2·LSE(est) − LSE(2·est)) of ``[n]`` log estimates; 0 when every estimate is −inf."""
    est = np.asarray(log_estimates, dtype=np.float64)
    if est.size == 0 or not np.isfinite(est).any():
        return 0.0
    # Shift by the maximum first: (Σ e^y)² / Σ e^{2y} with y ≤ 0 avoids cancelling two huge log-sums.
    y = np.exp(est - np.max(est))
    return float(np.sum(y) ** 2 / np.sum(y * y))


def markov_lower_bound(log_mean: float, *, delta: float = 0.05) -> float:
    """Log-space Markov bound: with probability ≥ 1 − delta, ``log μ ≥ log_mean − log(1/delta)``."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(log_mean + math.log(delta))


def bootstrap_log_mean_std(log_estimates: np.ndarray, *, n_resamples: int = 200, seed: int = 0) -> float:
    """Bootstrap standard deviation of the log-mean-exp over resampled directions (private RNG), nats."""
    est = np.asarray(log_estimates, dtype=np.float64)
    if est.size < 2 or not np.isfinite(est).any():
        return 0.0
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED_B007]))
    idx = rng.integers(0, est.size, size=(n_resamples, est.size))
    samples = log_mean_exp(est[idx], axis=-1)
    samples = samples[np.isfinite(samples)]
    return float(np.std(samples)) if samples.size > 1 else float("inf")


def summarize_log_estimates(
    log_estimates: np.ndarray, *, delta: float = 0.05, n_resamples: int = 200, seed: int = 0
) -> LogEstimateSummary:
    """Summarise ``[n_directions]`` log estimates (nats); NaN is rejected by :func:`log_mean_exp`."""
    est = np.asarray(log_estimates, dtype=np.float64)
    if est.ndim != 1 or est.size == 0:
        raise ValueError(f"need a non-empty 1-D array of log estimates, got shape {est.shape}")
    log_mean = float(log_mean_exp(est))
    finite = est[np.isfinite(est)]
    return LogEstimateSummary(
        log_mean=log_mean,
        lower_bound=markov_lower_bound(log_mean, delta=delta),
        ess=effective_sample_size(est),
        bootstrap_std=bootstrap_log_mean_std(est, n_resamples=n_resamples, seed=seed),
        log_estimate_std=float(np.std(finite)) if finite.size > 1 else 0.0,
    )
