"""How far to trust a number: reported uncertainty against the spread actually observed across seeds.

For each problem and each number of directions N ∈ {32, 128, 512}, the estimate is repeated over ``--seeds`` seeds
and the script prints:

* the observed standard deviation of ``log_volume`` across seeds (the truth about its spread);
* the median of the bootstrap std that a result carries (``log_volume_std``), how many seeds report a ±
  (``reported_log_volume_std`` is finite only when Pareto k̂ < 0.5) and its median (a one-sided 95% upper bound on
  the spread);
* the median Pareto k̂ and the most frequent verdict;
* on problems with an exact answer, the mean error of ``log_volume`` and the share of seeds whose 95% lower bound
  (``log_volume_lower_bound``) is at or below the truth, which must be at least 95%.

Problems:

* ``ellipsoid``: a full-rank diagonal quadratic ½ Σ h_i δ_i² ≤ ε (D = 1,000, h log-uniform over e^{±3}) under a
  Gaussian prior centred at the anchor. Exact: the lower tail of a weighted central χ² (saddlepoint).
* ``rank-deficient``: ½ xᵀ G x ≤ ε with G of rank 400 in D = 2,000 (eigenvalues log-uniform over e^{−4…2}, random
  eigenvectors) under a Gaussian prior centred off the anchor. Exact: a weighted non-central χ² lower tail. The
  estimator sees the unbounded null space only through the prior.
* ``ellipsoid-matched``: a smaller ellipsoid (D = 100, h over e^{±1}) with the proposal p ∝ h^{−1/2} that matches
  its curvature: light-tailed weights, the case in which a bootstrap ± is reported (k̂ < 0.5) and can be checked
  against the observed spread.
* ``digits``: the bundled digits MLP (D = 8,970, KL cutoff 0.01, the default isotropic proposal); no exact answer.

Direction i depends only on (seed, i), so the N-direction estimate of a seed is the running estimate of its
512-direction run after N directions; the script runs each seed once and reads every N off it.

    python scripts/benchmarks/bench_calibration.py                 # 20 seeds (a few minutes on 2 cores)
    python scripts/benchmarks/bench_calibration.py --seeds 5 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hfvolume import GaussianPrior, estimate_log_volume
from hfvolume.volume.psis import pareto_khat
from hfvolume.volume.quadratic import log_prob_weighted_chi2_below
from hfvolume.volume.stats import std_upper_bound_factor, summarize_log_estimates

DIRECTIONS = (32, 128, 512)
LOG_DELTA = math.log(0.05)


@dataclass(frozen=True)
class Problem:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    anchor: torch.Tensor
    prior: GaussianPrior | str
    cutoff: float
    truth: float | None
    scales: torch.Tensor | None = None


def ellipsoid(seed: int = 0, d: int = 1000, cutoff: float = 50.0, spread: float = 3.0) -> Problem:
    g = np.random.default_rng(seed)
    h = torch.tensor(np.exp(g.uniform(-spread, spread, size=d)))
    anchor = torch.tensor(g.normal(size=d))

    def fn(theta: torch.Tensor) -> torch.Tensor:
        diff = theta - anchor
        return 0.5 * (diff * diff * h).sum(-1)

    truth = log_prob_weighted_chi2_below(h.numpy(), np.zeros(d), 2.0 * cutoff)  # σ = 1, prior mean = anchor
    return Problem("ellipsoid", fn, anchor, GaussianPrior(sigma=1.0, mean=anchor.clone()), cutoff, truth)


def ellipsoid_matched() -> Problem:
    """A smaller, less elongated ellipsoid (D = 100, h over e^{±1}) with the proposal p ∝ h^{-1/2} that matches its
    curvature: light-tailed weights (k̂ < 0.5), the case in which a bootstrap spread is reported and can be compared
    with the truth."""
    base = ellipsoid(d=100, cutoff=5.0, spread=1.0)
    h = 2.0 * base.fn(base.anchor + torch.eye(base.anchor.numel(), dtype=base.anchor.dtype))
    return Problem("ellipsoid, matched proposal", base.fn, base.anchor, base.prior, base.cutoff, base.truth,
                   scales=h.rsqrt())


def rank_deficient(seed: int = 1, d: int = 2000, rank: int = 400, cutoff: float = 20.0) -> Problem:
    g = np.random.default_rng(seed)
    u, _ = np.linalg.qr(g.normal(size=(d, rank)))
    lam = np.exp(g.uniform(-4.0, 2.0, size=rank))
    anchor = torch.tensor(g.normal(scale=0.5, size=d))
    basis, weights = torch.tensor(u), torch.tensor(lam)

    def fn(theta: torch.Tensor) -> torch.Tensor:
        y = (theta - anchor) @ basis
        return 0.5 * (y * y * weights).sum(-1)

    sigma = 1.0
    d_proj = u.T @ (np.zeros(d) - anchor.numpy()) / sigma  # prior mean at the origin
    truth = log_prob_weighted_chi2_below(lam * sigma**2, d_proj**2, 2.0 * cutoff)
    return Problem("rank-deficient", fn, anchor, GaussianPrior(sigma=sigma), cutoff, truth)


PROBLEMS = {"ellipsoid": ellipsoid, "ellipsoid-matched": ellipsoid_matched, "rank-deficient": rank_deficient}


def run_problem(problem: Problem, seeds: range, n_max: int) -> list[np.ndarray]:
    runs = []
    for seed in seeds:
        result = estimate_log_volume(problem.fn, problem.anchor, cutoff=problem.cutoff, prior=problem.prior,
                                     scales=problem.scales, n_directions=n_max, seed=seed, batch_size=64,
                                     batched=True, progress=False)
        runs.append(np.asarray(result.log_estimates, dtype=np.float64))
    return runs


def run_digits(seeds: range, n_max: int) -> tuple[list[np.ndarray], None]:
    from hfvolume import estimate_local_volume
    from hfvolume.integrations.demo import train_digits_mlp

    trained = train_digits_mlp(epochs=30)
    runs = []
    for seed in seeds:
        result = estimate_local_volume(trained.model, trained.eval_batches(), n_directions=n_max, seed=seed,
                                       progress=False)
        runs.append(np.asarray(result.log_estimates, dtype=np.float64))
    return runs, None


def rows_for(name: str, runs: list[np.ndarray], truth: float | None, seeds: range) -> list[dict]:
    rows = []
    for n in DIRECTIONS:
        summaries = [summarize_log_estimates(est[:n], seed=seed) for est, seed in zip(runs, seeds)]
        paretos = [pareto_khat(est[:n]) for est in runs]
        log_vol = np.array([s.log_mean for s in summaries])
        boot = np.array([s.bootstrap_std for s in summaries])
        # What VolumeResult.reported_log_volume_std gives: a 95% upper bound on the spread, only when k̂ < 0.5.
        reported = np.array([s.bootstrap_std * std_upper_bound_factor(n) for s, p in zip(summaries, paretos)
                             if p.khat < 0.5])
        row = {
            "problem": name, "n_directions": n, "seeds": len(runs),
            "observed_sd": float(np.std(log_vol, ddof=1)) if len(runs) > 1 else math.nan,
            "bootstrap_std_median": float(np.median(boot)),
            "seeds_reporting_std": int(reported.size),
            "reported_std_median": float(np.median(reported)) if reported.size else math.nan,
            "khat_median": float(np.median([p.khat for p in paretos])),
            "verdict": Counter(p.reliability for p in paretos).most_common(1)[0][0],
            "mean_log_volume": float(np.mean(log_vol)),
        }
        if truth is not None:
            lower = log_vol + LOG_DELTA
            row.update(truth=truth, mean_error=float(np.mean(log_vol) - truth),
                       lower_bound_coverage=float(np.mean(lower <= truth)))
        rows.append(row)
    return rows


def _fmt(x: float, digits: int = 0) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "—"
    return f"{x:,.{digits}f}" if abs(x) >= 100 or digits else f"{x:.3g}"


def print_table(rows: list[dict]) -> None:
    print("| problem | N | observed sd (nats) | bootstrap std, median | seeds reporting a ± (k̂ < 0.5) | "
          "reported ±, median | k̂, median | verdict | mean − truth | lower bound ≤ truth |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        cover = f"{r['lower_bound_coverage']:.0%}" if "truth" in r else "n/a"
        error = _fmt(r["mean_error"]) if "truth" in r else "n/a"
        print(f"| {r['problem']} | {r['n_directions']} | {_fmt(r['observed_sd'])} | {_fmt(r['bootstrap_std_median'])}"
              f" | {r['seeds_reporting_std']}/{r['seeds']} | {_fmt(r['reported_std_median'])}"
              f" | {_fmt(r['khat_median'], 2)} | {r['verdict']} | {error} | {cover} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS) + ["digits"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = range(args.seeds)
    n_max = max(DIRECTIONS)
    rows: list[dict] = []
    for name in args.problems:
        t0 = time.perf_counter()
        if name == "digits":
            runs, truth = run_digits(seeds, n_max)
        else:
            problem = PROBLEMS[name]()
            runs, truth = run_problem(problem, seeds, n_max), problem.truth
            print(f"{name}: exact log volume {truth:,.2f} nats")
            name = problem.name
        rows += rows_for(name, runs, truth, seeds)
        print(f"{name}: {args.seeds} seeds × {n_max} directions in {time.perf_counter() - t0:.0f} s")
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
