"""Evaluations of the behaviour per direction: safeguarded secant vs the research code's bisection.

Runs the full estimator (pilot directions included) on synthetic rays at rtol 1e-2 and 1e-4 and prints a table.
Target (issue 2): ≤ 3.5 evaluations per direction for secant at rtol 1e-2; bisection needs about 10.

    python scripts/benchmarks/bench_radius.py [--directions 200] [--dim 1000]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from hfvolume import estimate_log_volume


def behaviours(dim: int, seed: int = 0):
    g = np.random.default_rng(seed)
    h = torch.tensor(np.exp(g.uniform(-4, 4, size=dim)), dtype=torch.float64)
    anchor = torch.tensor(g.normal(size=dim), dtype=torch.float64)

    def quadratic(theta):
        d = theta - anchor
        return 0.5 * (d * d * h).sum(-1)

    def quartic(theta):
        q = quadratic(theta)
        return q + 50.0 * q * q

    # A genuine KL neighbourhood: softmax regression (10 classes) on 200 random inputs.
    n_in = dim // 10
    x = torch.tensor(g.normal(size=(200, n_in)), dtype=torch.float64)
    w0 = anchor[: n_in * 10].reshape(n_in, 10)
    logp0 = torch.log_softmax(x @ w0, -1)
    kl_anchor = anchor[: n_in * 10].clone()

    def softmax_kl(theta):
        w = theta[:, : n_in * 10].reshape(-1, n_in, 10)
        logp = torch.log_softmax(torch.einsum("nf,kfc->knc", x, w), -1)
        return (logp0.exp() * (logp0 - logp)).sum(-1).mean(-1)

    return {
        "quadratic": (quadratic, anchor),
        "quadratic+quartic": (quartic, anchor),
        "softmax-regression KL": (softmax_kl, kl_anchor),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", type=int, default=200)
    parser.add_argument("--dim", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    for name, (fn, anchor) in behaviours(args.dim).items():
        for rtol in (1e-2, 1e-4):
            per_method = {}
            for method in ("secant", "bisection"):
                res = estimate_log_volume(
                    fn, anchor, cutoff=1e-2, n_directions=args.directions, rtol=rtol, batched=True,
                    batch_size=50, radius_method=method, progress=False,
                )
                per_method[method] = (res.forward_passes_per_direction, res.n_failed, res.log_volume)
            rows.append((name, rtol, per_method))
    print(f"\nEvaluations of Δ per direction (D={args.dim}, {args.directions} directions, cutoff 1e-2, "
          "pilot included)\n")
    print("| behaviour | rtol | secant | bisection | ratio | failed (s/b) | log volume secant / bisection |")
    print("|---|---|---|---|---|---|---|")
    for name, rtol, m in rows:
        s, b = m["secant"], m["bisection"]
        print(f"| {name} | {rtol:g} | {s[0]:.2f} | {b[0]:.2f} | {b[0] / s[0]:.1f}× | {s[1]}/{b[1]} | "
              f"{s[2]:.2f} / {b[2]:.2f} |")
    worst = max(m["secant"][0] for name, rtol, m in rows if math.isclose(rtol, 1e-2))
    print(f"\nworst secant evaluations/direction at rtol 1e-2: {worst:.2f} (target ≤ 3.5)")


if __name__ == "__main__":
    main()
