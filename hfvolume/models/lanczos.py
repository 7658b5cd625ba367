"""The top eigenpairs of a symmetric positive semi-definite operator known only through products v ↦ Gv.

Lanczos iteration with full reorthogonalisation (Golub & Van Loan, *Matrix Computations*, 4th ed., §10.1 and
§10.3.1): from a random unit vector q_1, the Krylov basis Q = [q_1 … q_m] and the tridiagonal T = QᵀGQ with
diagonal α_j = q_jᵀGq_j and off-diagonal β_j = |r_j|, r_j = Gq_j − α_j q_j − β_{j−1} q_{j−1}. Every r_j is
orthogonalised against all of Q twice ("twice is enough": Giraud et al. 2005, Numer. Math. 101), so Q stays
orthonormal to rounding and no spurious copies of converged eigenvalues appear. The Ritz pairs (θ_i, Q s_i) from
T = S diag(θ) Sᵀ approximate G's extreme eigenpairs, the largest first; |G Q s_i − θ_i Q s_i| = β_m |s_{m,i}| is the
residual bound reported per pair. When β_j vanishes (to the products' precision) Q spans an invariant subspace
and the Ritz pairs are exact. A Krylov space holds one vector per distinct eigenvalue: an eigenvalue of exact
multiplicity m > 1 is found once, and its other m − 1 directions stay outside the basis.

Memory: the basis, m · D numbers of ``dtype``. Cost: m products (one per iteration) plus O(m² D) arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hfvolume.volume.checks import check_int, check_nonnegative


@dataclass(frozen=True)
class LanczosResult:
    """Ritz pairs of G, largest first.

    eigenvalues: ``[k]`` float64 θ_i ≥ 0 (G's units). vectors: ``[D, k]`` float64, orthonormal columns.
    residuals: ``[k]`` float64 bounds β_m |s_{m,i}| on |G u_i − θ_i u_i|. products: products with G computed.
    invariant: whether the iteration stopped on an invariant subspace (then the pairs are exact to rounding).
    """

    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    products: int
    invariant: bool


def lanczos_top(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    iterations: int,
    rank: int,
    generator: torch.Generator,
    relative_floor: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> LanczosResult:
    """The ``rank`` largest Ritz pairs of a symmetric positive semi-definite G after ``iterations`` Lanczos steps.

    Args:
        matvec: ``[D]`` → ``[D]`` product with G (``dtype`` on ``device`` in and out).
        dim: D.
        iterations: m, the Krylov dimension (capped at D); one product per step.
        rank: k ≤ m pairs kept, the largest first.
        generator: the private generator of the start vector (a standard normal draw on the CPU).
        relative_floor: Ritz values ≤ relative_floor · θ_max are dropped (the products' noise level: they carry no
            curvature the caller could trust, and a zero pair would say less than the caller's own floor).
        device, dtype: of the basis and the products.

    Returns:
        :class:`LanczosResult` with at most ``rank`` pairs (fewer when the Krylov space is exhausted or the
        remaining Ritz values are below the floor), on the CPU.
    """
    check_int("dim", dim)
    m = min(check_int("iterations", iterations), dim)
    rank = min(check_int("rank", rank, minimum=0), m)
    relative_floor = check_nonnegative("relative_floor", relative_floor)
    basis = torch.empty(m, dim, dtype=dtype, device=device)
    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= torch.linalg.vector_norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    invariant = False
    scale = 0.0  # running estimate of |G|, for the breakdown test
    noise = max(relative_floor, 10.0 * torch.finfo(dtype).eps)
    for j in range(m):
        basis[j] = q
        r = matvec(q).to(device=device, dtype=dtype)
        alpha = float(torch.dot(q, r))
        alphas.append(alpha)
        r -= alpha * q
        if j > 0:
            r -= betas[-1] * basis[j - 1]
        known = basis[: j + 1]
        for _ in range(2):
            r -= known.T @ (known @ r)
        beta = float(torch.linalg.vector_norm(r))
        betas.append(beta)
        scale = max(scale, abs(alpha) + beta)
        if beta <= noise * scale:
            invariant = True
            break
        if j + 1 < m:
            q = r / beta
    return _ritz_pairs(basis[: len(alphas)], alphas, betas, rank=rank, invariant=invariant,
                       relative_floor=relative_floor)


def _ritz_pairs(basis: torch.Tensor, alphas: list[float], betas: list[float], *, rank: int, invariant: bool,
                relative_floor: float) -> LanczosResult:
    """The ``rank`` largest Ritz pairs of T = tridiag(β, α, β) lifted by the Krylov basis ``[n, D]``."""
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    order = torch.argsort(theta, descending=True)
    theta, s = theta[order], s[:, order]
    top = float(theta[0]) if n else 0.0
    keep = [i for i in range(n) if float(theta[i]) > relative_floor * top and float(theta[i]) > 0][:rank]
    sel = torch.tensor(keep, dtype=torch.long)
    last = 0.0 if invariant else betas[-1]
    residuals = last * s[n - 1, sel].abs()
    vectors = (s[:, sel].T.to(device=basis.device, dtype=basis.dtype) @ basis).T
    return LanczosResult(
        eigenvalues=theta[sel].contiguous(),
        vectors=vectors.to(device="cpu", dtype=torch.float64).contiguous(),
        residuals=residuals.contiguous(),
        products=n,
        invariant=invariant,
    )


__all__ = ["LanczosResult", "lanczos_top"]
