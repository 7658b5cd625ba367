"""Third-order cumulant propagation ("kprop", budget K = 3) with a factorised third cumulant.

arXiv 2605.05179 §3–4, the basic algorithm at K = 3. State between layers, for activations x (width n):

* mean μ ``[n]`` and full covariance C ``[n, n]``;
* third cumulant K3 = Sym(Σ_r A_r ⊗ B_r ⊗ C_r), factors ``[n, R]`` (the rank grows by 2n per layer, so a layer
  costs O(n³ · depth) instead of the O(n⁴) of a dense K3);
* fourth cumulant kept only through its isotropic trace part: K4 ≈ a · Sym(M ⊗ M) with a scalar a and a metric
  M (M = I after a nonlinearity, M ← W M Wᵀ through a linear step). The harmonic projection keeps
  a = 3 Σ_ij K4_iijj / (n (n + 2)), the component along Sym(I ⊗ I).

Nonlinear step, per unit i with Gaussian reference N(μ_i, v_i) and Wick coefficients w_i(k, p) = E[∂^k φ^p]:
joint cumulants of powers of activations are sums of connected diagrams; each block picks one entry of an input
cumulant, and a block on index multiplicities v costs |v| − 1 − [all entries of v even] powers of n^{−1/2}. K = 3
keeps every diagram of total cost ≤ 2, i.e.

    E[φ_i^p]          = w_i(0,p) + K3_iii w_i(3,p)/6 + K4_iiii w_i(4,p)/24                          (Edgeworth)
    κ(φ_i^p, φ_j^q)   = w_i(1,p) w_j(1,q) C_ij + w_i(2,p) w_j(2,q) (C_ij²/2 + K4_iijj/4)
                        + (K3_iij w_i(2,p) w_j(1,q) + K3_ijj w_i(1,p) w_j(2,q)) / 2                  (i ≠ j)
    κ(φ_i, φ_j, φ_k)  = w_i(1) w_j(1) w_k(1) K3_ijk + Σ_centres w(1) C w(2) C w(1)                  (distinct)

and converts power cumulants to ordinary ones (cumulants of products, Leonov–Shiryaev). Dropped diagrams have
squared size O(n^{−3}), hence MSE O(n^{−3}) at fixed depth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hfvolume.cumulants.flops import FlopTally
from hfvolume.cumulants.gaussian import GaussianInput
from hfvolume.cumulants.layers import Affine
from hfvolume.cumulants.propagate import _linear_mean, _wick
from hfvolume.cumulants.results import LayerMoments


@dataclass
class _State:
    mean: torch.Tensor
    cov: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    a4: float = 0.0
    metric: torch.Tensor | None = None  # None: identity


def third_slices(factors: tuple[torch.Tensor, ...] | None, n: int,
                 tally: FlopTally) -> tuple[torch.Tensor, torch.Tensor]:
    """(K3_iii ``[n]``, K3_iij ``[n, n]``) of K3 = Sym(Σ_r A_r ⊗ B_r ⊗ C_r); zeros without factors."""
    if factors is None:
        return torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    a, b, c = factors
    r = a.shape[1]
    tally.ew(5 * n * r)
    t3 = (a * b * c).sum(1)
    for _ in range(3):
        tally.mm(n, r, n)
    s21 = ((a * b) @ c.T + (a * c) @ b.T + (b * c) @ a.T) / 3.0
    return t3, s21


def fourth_slices(state: _State, n: int, tally: FlopTally) -> tuple[torch.Tensor, torch.Tensor]:
    """(K4_iiii ``[n]``, K4_iijj ``[n, n]``) of K4 = a · Sym(M ⊗ M): a M_ii² and a (M_ii M_jj + 2 M_ij²)/3."""
    if state.a4 == 0.0:
        return torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    m = state.metric if state.metric is not None else torch.eye(n, dtype=torch.float64)
    g = torch.diagonal(m)
    tally.ew(4 * n * n)
    return state.a4 * g * g, state.a4 * (torch.outer(g, g) + 2.0 * m * m) / 3.0


def _linear(layer: Affine, state: _State, tally: FlopTally) -> _State:
    out, n_in = layer.out_features, layer.in_features
    w = layer.weight
    mean = _linear_mean(layer, state.mean, tally)
    tally.mm(out, n_in, n_in)
    tally.mm(out, n_in, out)
    cov = (w @ state.cov) @ w.T
    cov = 0.5 * (cov + cov.T)
    factors = None
    if state.factors is not None:
        for f in state.factors:
            tally.mm(out, n_in, f.shape[1])
        factors = tuple(w @ f for f in state.factors)
    metric = None
    if state.a4 != 0.0:
        if state.metric is None:
            tally.mm(out, n_in, out)
            metric = w @ w.T
        else:
            tally.mm(out, n_in, n_in)
            tally.mm(out, n_in, out)
            metric = (w @ state.metric) @ w.T
    return _State(mean, cov, factors, state.a4, metric)


def _pair(w: torch.Tensor, p: int, q: int, c_off: torch.Tensor, c_sq: torch.Tensor, q22: torch.Tensor,
          s21: torch.Tensor) -> torch.Tensor:
    """κ(φ_i^p, φ_j^q) for i ≠ j from the cost ≤ 2 diagrams (zero diagonal)."""
    wp1, wp2, wq1, wq2 = w[p - 1, 1], w[p - 1, 2], w[q - 1, 1], w[q - 1, 2]
    out = torch.outer(wp1, wq1) * c_off + torch.outer(wp2, wq2) * (0.5 * c_sq + 0.25 * q22)
    out = out + 0.5 * (s21 * torch.outer(wp2, wq1) + s21.T * torch.outer(wp1, wq2))
    out.fill_diagonal_(0.0)
    return out


def _single_axis(w: torch.Tensor, t3: torch.Tensor, q4: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean and cumulants κ2, κ3, κ4 of φ(z_i) from Edgeworth-corrected moments E[φ^p], p = 1..4."""
    m1, m2, m3, m4 = (w[p, 0] + t3 * w[p, 3] / 6.0 + q4 * w[p, 4] / 24.0 for p in range(4))
    k2 = m2 - m1 * m1
    k3 = m3 - 3.0 * m2 * m1 + 2.0 * m1**3
    k4 = m4 - 4.0 * m3 * m1 - 3.0 * m2 * m2 + 12.0 * m2 * m1 * m1 - 6.0 * m1**4
    return m1, k2, k3, k4


def _nonlinear(layer: Affine, z: _State, t3: torch.Tensor, s21: torch.Tensor, q4: torch.Tensor,
               q22: torch.Tensor, tally: FlopTally) -> _State:
    n = z.mean.shape[0]
    w = _wick(layer, z.mean, torch.diagonal(z.cov), 4, 4, tally)
    mean, k2, k3, k4 = _single_axis(w, t3, q4)
    c_off = z.cov.clone()
    c_off.fill_diagonal_(0.0)
    c_sq = c_off * c_off
    tally.ew(60 * n * n)
    p11 = _pair(w, 1, 1, c_off, c_sq, q22, s21)
    p21 = _pair(w, 2, 1, c_off, c_sq, q22, s21)
    p22 = _pair(w, 2, 2, c_off, c_sq, q22, s21)
    # Cumulants of products → joint cumulants: κ(i,i,j) = κ(φ_i², φ_j) − 2 μ_i κ(i,j), and
    # κ(i,i,j,j) = κ(φ_i², φ_j²) − 2 μ_j κ(i,i,j) − 2 μ_i κ(i,j,j) − 2 κ(i,j)² − 4 μ_i μ_j κ(i,j).
    k21 = p21 - 2.0 * mean[:, None] * p11
    k22 = p22 - 2.0 * mean[None, :] * k21 - 2.0 * mean[:, None] * k21.T - 2.0 * p11 * p11 \
        - 4.0 * torch.outer(mean, mean) * p11
    k22.fill_diagonal_(0.0)
    a4 = float(3.0 * (k4.sum() + k22.sum()) / (n * (n + 2)))
    cov = p11 + torch.diag(k2.clamp_min(0.0))
    # Third cumulant: distinct-index part in factors, repeated-index entries corrected by a rank-n term.
    w1, w2 = w[0, 1], w[0, 2]
    eye = torch.eye(n, dtype=torch.float64)
    new_a, new_b, new_c = [3.0 * w1[:, None] * c_off], [torch.diag(w2)], [w1[:, None] * c_off]
    d3 = k3.clone()
    d21 = k21 - torch.outer(w1 * w1, w2) * c_sq
    if z.factors is not None:
        a, b, c = z.factors
        new_a.insert(0, w1[:, None] * a)
        new_b.insert(0, w1[:, None] * b)
        new_c.insert(0, w1[:, None] * c)
        d3 = d3 - w1**3 * t3
        d21 = d21 - torch.outer(w1 * w1, w1) * s21
    d21.fill_diagonal_(0.0)
    # Sym(Σ_r X_r ⊗ e_r ⊗ e_r) has entry X_jj at (j,j,j) and X_kj / 3 at (j,j,k): X = diag(d3) + 3 d21ᵀ.
    new_a.append(torch.diag(d3) + 3.0 * d21.T)
    new_b.append(eye)
    new_c.append(eye)
    factors = tuple(torch.cat(parts, dim=1) for parts in (new_a, new_b, new_c))
    tally.ew(3 * n * factors[0].shape[1])
    return _State(mean, cov, factors, a4, None), k2, k3, k4


def kprop(layers: list[Affine], inp: GaussianInput, *, return_layers: bool,
          tally: FlopTally) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[LayerMoments]]:
    """Run K = 3 propagation. Returns (mean ``[out]``, cov ``[out, out]``, κ3 ``[out]``, κ4 ``[out]``, moments)."""
    state = _State(inp.mean, inp.covariance())
    moments: list[LayerMoments] = []
    third = fourth = None
    for layer in layers:
        z = _linear(layer, state, tally)
        n = z.mean.shape[0]
        t3, s21 = third_slices(z.factors, n, tally)
        q4, q22 = fourth_slices(z, n, tally)
        pre_flops = tally.freeze()
        if layer.act is None:
            state = z
            third, fourth = t3, q4
            act_mean, act_var = z.mean, torch.diagonal(z.cov).clone()
        else:
            state, act_var, third, fourth = _nonlinear(layer, z, t3, s21, q4, q22, tally)
            act_mean = state.mean
        if return_layers:
            moments.append(LayerMoments(pre_mean=z.mean, pre_var=torch.diagonal(z.cov).clone(), pre_cov=z.cov,
                                        pre_third=t3, pre_fourth=q4, act_mean=act_mean, act_var=act_var,
                                        pre_flops=pre_flops))
    return state.mean, state.cov, third, fourth, moments


__all__ = ["fourth_slices", "kprop", "third_slices"]
