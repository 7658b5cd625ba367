"""Aggregation of per-direction log estimates est_i = log f(w_i) + log weight_i (nats).

log μ̂ = log-mean-exp(est) is the log of an estimate that is unbiased for the volume μ in exp space, hence biased
low in log space (Jensen). Markov's inequality gives P(μ̂ ≥ μ/δ) ≤ δ whatever the distribution of the weights, so
log μ̂ − log(1/δ) is a (1 − δ) lower confidence bound on log μ. The effective sample size
ESS = exp(2·LSE(est) − LSE(2·est)) says how many directions carry the average (Kong 1992).

All reductions happen once, in float64 log space, over the full set of per-direction estimates: never average
logs, and never reduce partial sets separately (the distributed code gathers, then calls these).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from hfvolume.volume.numerics import log_mean_exp


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


def std_upper_bound_factor(n: int, *, confidence: float = 0.95) -> float:
    """Factor turning a spread estimated from ``n`` samples into a one-sided ``confidence`` upper bound on it:
    √((n−1)/χ²_{n−1}(1 − confidence)), with the χ² quantile from the Wilson–Hilferty approximation
    χ²_p(k) ≈ k (1 − 2/(9k) + z_p √(2/(9k)))³ (Wilson & Hilferty 1931; accurate to < 1% for k ≥ 20).

    A bootstrap spread of the log-mean-exp runs a few percent below the spread between seeds even for light-tailed
    weights (the sample rarely holds the largest weights); the bound keeps a reported ± from understating it.
    """
    if n < 2:
        return math.inf
    k = n - 1
    z = -NormalDist().inv_cdf(confidence)
    cube = 1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))
    return math.inf if cube <= 0 else math.sqrt(k / (k * cube**3))


def running_log_mean_exp(log_estimates: np.ndarray) -> np.ndarray:
    """``[n]`` running estimates: entry k−1 is the log-mean-exp of the first k log estimates (nats).

    With heavy-tailed weights the log-mean-exp keeps rising as directions are added (it is close to the running
    maximum plus a term that grows with n); a curve that has levelled off is evidence, not proof, of convergence.
    """
    est = np.asarray(log_estimates, dtype=np.float64)
    if est.ndim != 1:
        raise ValueError(f"need a 1-D array of log estimates, got shape {est.shape}")
    if np.isnan(est).any():
        raise ValueError(f"log estimate of direction {int(np.flatnonzero(np.isnan(est))[0])} is NaN")
    if est.size == 0:
        return est.copy()
    return np.logaddexp.accumulate(est) - np.log(np.arange(1, est.size + 1, dtype=np.float64))


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
