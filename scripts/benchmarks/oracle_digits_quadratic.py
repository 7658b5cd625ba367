"""The quadratic-region oracle on the digits MLP: exact prior mass of {½xᵀGx ≤ ε} and its tilted-sampling check.

Trains the 64-64-64-10 tanh MLP on scikit-learn's digits (30 epochs of Adam, D = 8,970), builds the Gauss–Newton
factor A `[N·C, D]` of the mean KL over the 449 evaluation examples (G = AᵀA, the KL's Hessian at θ0), and reports
for ε = 1e-2 nats and the prior N(0, σ² I), σ = RMS of θ0:

* the saddlepoint (Lugannani–Rice) log prior mass of the quadratic region, and
* an importance-sampling estimate from the prior tilted at the saddlepoint (points drawn in the full D-space,
  membership by ½xᵀGx ≤ ε), with its standard error,

plus the rank of G, the saddlepoint ŝ, and the wall time of each step. Run:

    python scripts/benchmarks/oracle_digits_quadratic.py [--samples 256] [--seed 0] [--epochs 30]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from hfvolume.models.gauss_newton import flat_trainable_parameters, kl_gauss_newton_factor
from hfvolume.volume.quadratic import QuadraticRegion, tilted_log_prior_mass_mc

try:
    from hfvolume.integrations.demo import train_digits_mlp
except ImportError:  # the package layout before the integrations/ subpackage
    from hfvolume.demo import train_digits_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cutoff", type=float, default=1e-2, help="ε, nats of mean KL")
    parser.add_argument("--samples", type=int, default=256, help="tilted importance samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    trained = train_digits_mlp(epochs=args.epochs)
    t_train = time.perf_counter() - t0
    model = trained.model.eval()
    theta0 = flat_trainable_parameters(model)
    sigma = math.sqrt(float(torch.mean(theta0 * theta0)))

    t0 = time.perf_counter()
    factor = kl_gauss_newton_factor(model, trained.data.x_eval)
    t_factor = time.perf_counter() - t0
    t0 = time.perf_counter()
    region = QuadraticRegion.from_factor(factor, theta0)
    del factor
    t_eigen = time.perf_counter() - t0

    t0 = time.perf_counter()
    exact = region.log_prior_mass(mean=0.0, sigma=sigma, cutoff=args.cutoff)
    s_hat = region.saddlepoint(mean=0.0, sigma=sigma, cutoff=args.cutoff)
    t_saddle = time.perf_counter() - t0
    t0 = time.perf_counter()
    mc = tilted_log_prior_mass_mc(
        region, mean=0.0, sigma=sigma, cutoff=args.cutoff, n_samples=args.samples, seed=args.seed
    )
    t_mc = time.perf_counter() - t0

    n_eval = len(trained.data.x_eval)
    print(f"digits MLP: D = {region.dim:,}, {n_eval} eval examples, eval accuracy {trained.eval_accuracy:.3f}")
    print(f"G: rank {region.rank:,} (N(C-1) = {n_eval * 9:,}), λ_max {float(region.eigenvalues[0]):.4g}, "
          f"λ_min kept {float(region.eigenvalues[-1]):.4g}")
    print(f"prior N(0, σ² I), σ = RMS(θ0) = {sigma:.6f}; ε = {args.cutoff:g}; norm term −|θ0|²/(2σ²) = "
          f"{-0.5 * region.dim:,.1f} nats")
    print(f"saddlepoint (Lugannani–Rice): log P(½xᵀGx ≤ ε) = {exact:,.3f} nats  (ŝ = {s_hat:.6g})")
    gap = (mc.log_mass - exact) / mc.standard_error
    print(f"tilted sampling, {mc.n_samples} points (seed {args.seed}): {mc.log_mass:,.3f} ± {mc.standard_error:.3f} "
          f"nats (1 SE); {mc.n_inside} inside, ESS {mc.ess:.1f}; difference {gap:+.2f} SE")
    print(f"wall time: train {t_train:.1f} s, factor {t_factor:.1f} s, eigen {t_eigen:.1f} s, "
          f"saddlepoint {t_saddle:.2f} s, sampling {t_mc:.1f} s")


if __name__ == "__main__":
    main()
