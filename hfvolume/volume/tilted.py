"""The curvature-matched proposal: the prior tilted by a quadratic model of the behaviour, projected to directions.

Near the anchor the behaviour is, to second order, Δ(θ0 + x) ≈ ½ xᵀĜx with a curvature model
Ĝ = U diag(λ) Uᵀ + λ₀ (I − UUᵀ) (:class:`~hfvolume.volume.curvature.LowRankCurvature`). Under the Gaussian prior
N(m, diag(s²)) the prior mass of the quadratic region {xᵀĜx ≤ 2ε} is the lower tail of Q = xᵀĜx, a weighted
non-central χ² whose saddlepoint ŝ solves K'(ŝ) = 2ε (Lugannani & Rice 1980; see :mod:`hfvolume.volume.quadratic`).
Tilting the prior by e^{ŝQ} gives the Gaussian, relative to θ0,

    x ~ N(μ_s, Σ_s),    P = Σ_s⁻¹ = diag(1/s²) − 2ŝĜ,    μ_s = Σ_s h,    h = diag(1/s²)(m − θ0),

whose bulk lies where the region's prior mass does: it follows the curvature's full structure, not its diagonal.
The proposal is the direction w = x/|x|. Its density on the unit sphere S^{D−1}, relative to the uniform
distribution, is the projected normal (Mardia & Jupp, *Directional Statistics*, 2000, §9.3.3)

    q(w) = |S^{D−1}| ∫_0^∞ N(t w; μ_s, Σ_s) t^{D−1} dt = |S^{D−1}| e^c ∫_0^∞ t^{D−1} exp(−a t²/2 + b t) dt,
    a = wᵀPw,    b = wᵀPμ_s = wᵀh,    c = −½ μ_sᵀPμ_s + ½ log det P − (D/2) log 2π,

the same one-dimensional integral as the prior's own ray mass (:mod:`hfvolume.volume.ray_integral`), here taken to
∞ and computed with the same self-checked quadrature. The per-direction estimate stays log f(w) − log q(w)
(Scherlis & Belrose 2025, arXiv 2501.18812, §3: the local volume E_{Unif}[f(w)] importance-sampled), so the estimate
is unbiased whatever the curvature's quality; a poor Ĝ only costs variance. q is homogeneous of degree −D in w,
like f, so f/q does not depend on rounding of |w|.

The model that is tilted (:class:`FlooredModel`) is Ĝ = Φ + U diag(λ − φ̄) Uᵀ: the floor Φ is λ₀ I, or a diagonal
diag(φ) shaped like a diagonal proposal's curvature, and no eigenvalue stays below the floor (φ̄_j = u_jᵀΦu_j).
Only low-rank algebra is used (never a D × D matrix). With one global σ and an isotropic floor, P is diagonal in
(U, its complement): 1/σ² − 2ŝλ_j on u_j and 1/σ² − 2ŝλ₀ elsewhere. Otherwise P = D₀ + U diag(c) Uᵀ with D₀ =
diag(1/s² − 2ŝφ) and c = −2ŝ(λ − φ̄); writing V = D₀^{−½}U = QR (thin QR) and R diag(c) Rᵀ = W diag(ν) Wᵀ gives
P = D₀^{½}(I + B diag(ν) Bᵀ)D₀^{½} with B = QW orthonormal, from which the inverse, a square root and log det P
follow (Woodbury's identity in an orthonormal basis). Both cases are stored in that form: a scale g = D₀^{−½} (a
number or ``[D]``), ``B`` ``[D, k]`` and ``ν`` ``[k]``.

The tilt. ŝ is the saddlepoint of Q under the prior, with the floor's D − k directions as χ² terms (one of D − k
degrees of freedom and weight λ₀σ², or bins of coordinates of similar φ) carrying the prior offset's component
outside U as their non-centrality. With per-coordinate s the weights are not known in closed form, and ŝ is chosen
for the RMS of s: the tilt only decides how efficient the proposal is, never whether its weights are right.
``tilt`` multiplies ŝ: 1 is the exact tilt of the quadratic model (the right choice when Δ is that model); a real
region is bounded by higher-order terms too, most of all along the direction towards the prior mean, where the
prior gains linearly in the radius and the exact tilt therefore leans hardest; a stronger tilt leans less, and as
it grows the directions tend to the angular central Gaussian of Ĝ⁻¹ (Tyler 1987, Biometrika 74(3)).

The defensive mixture q = α + (1 − α) q_tilt (Hesterberg 1995, Technometrics 37(2)) bounds every weight by 1/α;
components are assigned by the same stratification as the other proposals
(:func:`~hfvolume.volume.proposals.is_isotropic_draw`), and direction i is drawn from the seeded standard normal
u_i of :func:`~hfvolume.volume.proposals.gaussian_direction` only, so it depends on (seed, i) alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from hfvolume.volume.checks import check_fraction, check_positive
from hfvolume.volume.collectives import CoordinateShard
from hfvolume.volume.curvature import LowRankCurvature
from hfvolume.volume.numerics import log_sphere_area, sum_squares_f64
from hfvolume.volume.priors import ResolvedGaussianPrior, ResolvedUniformPrior
from hfvolume.volume.proposals import gaussian_direction, is_isotropic_draw
from hfvolume.volume.ray_integral import log_ray_integral

_NEWTON_STEPS = 200
_ROOT_TOL = 1e-12  # on the solver's log-scale variable: a relative accuracy of ŝ far beyond what the tilt needs


# ------------------------------------------------------------------------------------------------ the saddlepoint
@dataclass(frozen=True)
class ChiSquareGroups:
    """Q = Σ_j a_j χ²_{n_j}(δ_j²): groups of n_j squared unit normals with a common weight a_j > 0 and a total
    non-centrality δ_j² ≥ 0 (the law of a group depends on its non-centrality only through the total).

    weights, counts, noncentralities: ``[J]`` float64 (counts may be large: D − k for the floor's group).
    """

    weights: np.ndarray
    counts: np.ndarray
    noncentralities: np.ndarray

    def derivatives(self, r: np.ndarray) -> tuple[float, float]:
        """(K'(s), K''(s)) of the cumulant generating function
        K(s) = Σ_j [−(n_j/2) log(1 − 2a_j s) + a_j δ_j² s/(1 − 2a_j s)], given r_j = 1/(1 − 2a_j s) ``[J]``."""
        a, n, d2 = self.weights, self.counts, self.noncentralities
        k1 = float(np.sum(a * r * (n + d2 * r)))
        k2 = float(np.sum(2.0 * a * a * r * r * (n + 2.0 * d2 * r)))
        return k1, k2

    @property
    def mean(self) -> float:
        """E[Q] = K'(0) = Σ a_j (n_j + δ_j²)."""
        return float(np.sum(self.weights * (self.counts + self.noncentralities)))


def _bracketed_newton(fun: Callable[[float], tuple[float, float]], lo: float, hi: float) -> float:
    """The root of an increasing h on [lo, hi] with h(lo) ≤ 0 ≤ h(hi); ``fun(v) = (h(v), h'(v))``. Newton steps,
    replaced by bisection whenever one would leave the bracket."""
    v = 0.5 * (lo + hi)
    for _ in range(_NEWTON_STEPS):
        h, dh = fun(v)
        if h == 0.0:
            return v
        lo, hi = (lo, v) if h > 0 else (v, hi)
        step = v - h / dh if dh > 0 and math.isfinite(dh) else math.nan
        if not lo < step < hi:
            step = 0.5 * (lo + hi)
        if abs(step - v) <= _ROOT_TOL * max(1.0, abs(v)) or hi - lo <= _ROOT_TOL * max(1.0, abs(v)):
            return step
        v = step
    raise RuntimeError(f"saddlepoint search did not converge in {_NEWTON_STEPS} steps (bracket [{lo}, {hi}])")


def solve_group_saddlepoint(groups: ChiSquareGroups, q: float) -> float:
    """ŝ with K'(ŝ) = q for Q of ``groups`` (q > 0, units of Q): ŝ < 0 below the mean, 0 < ŝ < 1/(2 max a) above.

    Below the mean the unknown is v = log(−s), above it v = −log(1 − 2 a_max s); in both log K' is close to linear
    in v far from the mean. Bracket below: K'(s) ≤ Σn/(2|s|) + Σ δ²/(4a s²) and K'(s) ≥ E[Q]/(1 + 2a_max|s|)².
    """
    q = check_positive("q", q)
    mean = groups.mean
    if q == mean:
        return 0.0
    a, log_q = groups.weights, math.log(q)
    a_max = float(a.max())
    if q < mean:

        def lower(v: float) -> tuple[float, float]:
            s = -math.exp(v)
            k1, k2 = groups.derivatives(1.0 / (1.0 - 2.0 * a * s))
            return log_q - math.log(k1), -s * k2 / k1

        far = max(float(np.sum(groups.counts)) / q,
                  math.sqrt(float(np.sum(groups.noncentralities / a)) / (2.0 * q)))
        near = max((math.sqrt(mean / q) - 1.0) / (2.0 * a_max), 1e-300)  # q a hair below the mean: ŝ ≈ 0⁻
        return -math.exp(_bracketed_newton(lower, math.log(near), math.log(far)))
    ratio = a / a_max

    def upper(v: float) -> tuple[float, float]:
        one_minus = (1.0 - ratio) + ratio * math.exp(-v)  # 1 − 2 a_j s, exact for the largest weight
        k1, k2 = groups.derivatives(1.0 / one_minus)
        return math.log(k1) - log_q, k2 / k1 * math.exp(-v) / (2.0 * a_max)

    n_top = float(groups.counts[int(np.argmax(a))])
    v = _bracketed_newton(upper, 0.0, math.log(q / (a_max * n_top)))  # the top group alone reaches q there
    return -math.expm1(-v) / (2.0 * a_max)


@dataclass(frozen=True, eq=False)
class FlooredModel:
    """The quadratic model that is tilted: Ĝ = Φ + U diag(λ − φ̄) Uᵀ with the floor Φ = λ₀ I (``floor`` a number) or
    Φ = diag(φ) (``floor`` ``[D]``), φ̄_j = u_jᵀΦu_j, and every λ_j raised to at least φ̄_j (so u_jᵀĜu_j = λ_j).

    eigenvalues: ``[k]`` float64 λ_j (already raised). basis: U ``[D, k]``. floor: λ₀ or φ ``[D]`` float64.
    """

    eigenvalues: torch.Tensor
    basis: torch.Tensor
    floor: Union[float, torch.Tensor]

    @classmethod
    def of(cls, curvature: LowRankCurvature, floor_shape: torch.Tensor | None) -> "FlooredModel":
        """The floor stands for the higher-order terms that bound the region where G is (nearly) flat; they bound
        G's near-null eigendirections as they bound its null space, so an eigenvalue below the floor is raised to
        it (left alone, its direction would stay as wide as the prior in the proposal although the region is not).
        With ``floor_shape`` (``[D]`` positive, e.g. p⁻² of a diagonal proposal's scales p) the floor is
        φ ∝ floor_shape, scaled so that a random unit ray orthogonal to U sees λ₀ on average (what pilot rays
        measure): E[wᵀΦw] = tr((I − UUᵀ)Φ)/(D − k) = λ₀."""
        lam, u, lam0 = curvature.eigenvalues, curvature.basis, curvature.floor
        if floor_shape is None:
            return cls(lam.clamp_min(lam0), u, lam0)
        shape = floor_shape.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        along = ((u * u) * shape.unsqueeze(1)).sum(0)  # u_jᵀ diag(shape) u_j
        rest = float(shape.sum()) - float(along.sum())
        factor = lam0 * (curvature.dim - curvature.rank) / rest if rest > 0 else 0.0
        phi = shape * factor
        return cls(torch.maximum(lam, along * factor), u, phi)

    def _floor_along(self) -> torch.Tensor:
        """φ̄ ``[k]``."""
        if isinstance(self.floor, float):
            return torch.full_like(self.eigenvalues, self.floor)
        return ((self.basis * self.basis) * self.floor.unsqueeze(1)).sum(0)

    def chi_square_groups(self, offset: torch.Tensor, sigma: float, *, bins: int = 1024) -> ChiSquareGroups:
        """The groups of Q = xᵀĜx for x ~ N(offset, σ² I) (``offset``: ``[D]`` float64 prior mean minus anchor):
        one per eigenpair (weight λ_jσ², δ_j² = (u_jᵀ offset/σ)²) and the floor's D − k directions, as one group
        (λ₀) or, for a diagonal floor, ``bins`` groups of coordinates of similar φ (each the mean φ of its bin, and
        its share of the D − k directions and of the offset outside U). Zero weights are dropped. The U and
        complement parts of Φ are treated as separate: the groups only choose the tilt, never the weights."""
        proj = offset @ self.basis
        d = offset.numel()
        weights = [self.eigenvalues.numpy() * sigma**2]
        noncentral = [(proj * proj).numpy() / sigma**2]
        counts = [np.ones(self.eigenvalues.numel())]
        rest = d - self.basis.shape[1]
        perp = max(sum_squares_f64(offset) - float(torch.dot(proj, proj)), 0.0) / sigma**2
        if rest > 0 and isinstance(self.floor, float) and self.floor > 0:
            weights.append(np.array([self.floor * sigma**2]))
            counts.append(np.array([float(rest)]))
            noncentral.append(np.array([perp]))
        elif rest > 0 and not isinstance(self.floor, float):
            order = torch.argsort(self.floor)
            chunks = torch.tensor_split(order, min(bins, d))
            total = max(sum_squares_f64(offset), 1e-300)
            weights.append(np.array([float(self.floor[c].mean()) * sigma**2 for c in chunks]))
            counts.append(np.array([c.numel() * rest / d for c in chunks]))
            noncentral.append(np.array([sum_squares_f64(offset[c]) / total * perp for c in chunks]))
        a, n, d2 = (np.concatenate(x) for x in (weights, counts, noncentral))
        keep = a > 0
        return ChiSquareGroups(a[keep], n[keep], d2[keep])


# ------------------------------------------------------------------------------------------------ the proposal
@dataclass(frozen=True, eq=False)
class CurvatureProposal:
    """The curvature-tilted proposal, before it meets the prior and the anchor (the estimator resolves it).

    curvature: Ĝ (:class:`~hfvolume.volume.curvature.LowRankCurvature`), in the anchor's flat coordinate order.
    mixture: α, the fraction of isotropic directions in a defensive mixture (weights ≤ 1/α).
    tilt: the multiple of the saddlepoint ŝ used (1: the exact tilt of the quadratic model; larger: less lean
        towards the prior mean, tending to the curvature's angular central Gaussian; see the module docstring).
    floor_shape: None (the floor λ₀ is isotropic), or ``[D]`` positive relative curvatures that shape it
        (:meth:`FlooredModel.of`), e.g. p⁻² for the scales p of a diagonal proposal.
    info: JSON-safe description merged into the result's ``settings["proposal"]`` (e.g. the curvature's cost).
    """

    curvature: LowRankCurvature
    mixture: float = 0.0
    tilt: float = 1.0
    floor_shape: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.curvature, LowRankCurvature):
            raise TypeError(f"curvature must be a LowRankCurvature, got {type(self.curvature).__name__}")
        check_fraction("mixture", self.mixture)
        check_positive("tilt", self.tilt)
        shape = self.floor_shape
        if shape is not None:
            if not isinstance(shape, torch.Tensor):
                raise TypeError(f"floor_shape must be a tensor or None, got {type(shape).__name__}")
            if shape.numel() != self.curvature.dim:
                raise ValueError(f"floor_shape has {shape.numel()} entries, the curvature D = {self.curvature.dim}")
            if not bool((torch.isfinite(shape) & (shape > 0)).all()):
                raise ValueError("floor_shape must be positive and finite")

    def resolve(self, prior: Union[ResolvedGaussianPrior, ResolvedUniformPrior], *, cutoff: float,
                coordinates: CoordinateShard | None = None) -> "TiltedProposal":
        """The proposal for ``prior`` (about its anchor θ0) and the cutoff ε (the tilt solves K'(ŝ) = 2ε)."""
        if coordinates is not None:
            raise NotImplementedError("the curvature-tilted proposal needs every coordinate on each process; with an "
                                      "FSDP2-sharded model use a diagonal proposal (preconditioner='adam' or scales)")
        if not isinstance(prior, ResolvedGaussianPrior):
            raise ValueError("the curvature-tilted proposal tilts a Gaussian prior; with prior='uniform' use a "
                             "diagonal proposal (preconditioner='fisher', 'adam' or scales)")
        cutoff = check_positive("cutoff", cutoff)
        theta0 = prior.theta0.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if theta0.numel() != self.curvature.dim:
            raise ValueError(f"the curvature has D = {self.curvature.dim} but the anchor has {theta0.numel()} entries")
        model = FlooredModel.of(self.curvature, self.floor_shape)
        offset = -theta0 if prior.mean is None else prior.mean - theta0
        sigma = prior.sigma
        sigma_rms = sigma if isinstance(sigma, float) else math.sqrt(float(torch.mean(sigma * sigma)))
        groups = model.chi_square_groups(offset, sigma_rms)
        s_hat = solve_group_saddlepoint(groups, 2.0 * cutoff) if groups.weights.size else 0.0
        raised = int((model.eigenvalues > self.curvature.eigenvalues).sum())
        info = {**self.info, "saddlepoint": s_hat, "cutoff": cutoff, "eigenvalues_raised_to_floor": raised,
                "floor_shape": "isotropic" if self.floor_shape is None else "diagonal",
                "rank": self.curvature.rank, "floor": self.curvature.floor}
        inv_var = _inverse_variance(sigma)
        return TiltedProposal.build(model, inv_var, offset * inv_var, s_used=self.tilt * s_hat,
                                    mixture=self.mixture, info={"name": "curvature-tilted", "tilt": self.tilt, **info})


def _inverse_variance(sigma: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    if isinstance(sigma, float):
        return 1.0 / (sigma * sigma)
    s = sigma.to(torch.float64)
    return 1.0 / (s * s)


@dataclass(frozen=True, eq=False)
class TiltedProposal:
    """The prior N(m, diag(s²)) tilted by e^{ŝ xᵀĜx}, as a distribution of unit directions (module docstring).

    P = Γ⁻¹(I + B diag(ν) Bᵀ)Γ⁻¹ with Γ = diag(g); h = Pμ_s.
    scale: g, a number or ``[D]`` float64. basis: B ``[D, k]`` orthonormal float64. nu: ν ``[k]`` (> −1).
    h: ``[D]`` float64 diag(1/s²)(m − θ0). mean: μ_s ``[D]`` float64, relative to θ0.
    log_const: log|S^{D−1}| + c, nats (c as in the module docstring). mixture: α. info: JSON-safe description.
    """

    scale: Union[float, torch.Tensor]
    basis: torch.Tensor
    nu: torch.Tensor
    h: torch.Tensor
    mean: torch.Tensor
    log_const: float
    mixture: float
    info: dict[str, Any]

    @classmethod
    def build(cls, model: FlooredModel, inv_var: Union[float, torch.Tensor], h: torch.Tensor, *, s_used: float,
              mixture: float, info: dict[str, Any]) -> "TiltedProposal":
        """P = diag(1/s²) − 2ŝĜ in the (g, B, ν) form, then μ_s = P⁻¹h and the density's constant.

        model: Ĝ; inv_var: 1/s² (a number or ``[D]``); h: ``[D]`` float64; s_used: the tilt (nats per unit of Q)."""
        base = inv_var - 2.0 * s_used * model.floor  # the diagonal part D₀ of P
        c = -2.0 * s_used * (model.eigenvalues - model._floor_along())
        if isinstance(base, float):
            if not base > 0:
                raise ValueError(f"the tilted precision 1/σ² − 2ŝλ₀ = {base!r} is not positive (ŝ = {s_used!r})")
            scale: Union[float, torch.Tensor] = 1.0 / math.sqrt(base)
            basis, nu = model.basis, c / base
        else:
            if not bool((base > 0).all()):
                raise ValueError(f"the tilted precision 1/s² − 2ŝφ is not positive everywhere (ŝ = {s_used!r})")
            scale = torch.rsqrt(base)
            basis, nu = _whitened_update(model.basis * scale.unsqueeze(1), c)
        if nu.numel() and not float(nu.min()) > -1.0:
            raise ValueError(f"the tilted precision is not positive definite (ŝ = {s_used!r}): the tilt must stay "
                             "inside the cumulant generating function's domain")
        gh = h * scale
        mean = (gh - basis @ ((nu / (1.0 + nu)) * (basis.T @ gh))) * scale
        d = h.numel()
        log_det_p = float(torch.sum(torch.log1p(nu))) + (
            -2.0 * d * math.log(scale) if isinstance(scale, float) else -2.0 * float(torch.sum(torch.log(scale))))
        log_const = log_sphere_area(d) - 0.5 * float(torch.dot(h, mean)) + 0.5 * (log_det_p - d * math.log(2 * math.pi))
        return cls(scale=scale, basis=basis, nu=nu, h=h, mean=mean, log_const=log_const, mixture=mixture,
                   info={**info, "s_used": s_used})

    @property
    def dim(self) -> int:
        """D."""
        return self.h.numel()

    @property
    def is_isotropic(self) -> bool:
        """True when every direction is drawn isotropically (α = 1): every weight is then exactly 1."""
        return self.mixture >= 1.0

    def describe(self) -> dict[str, Any]:
        """JSON-safe description recorded in results: ŝ, the fraction used, k, λ₀, α and the curvature's info."""
        return {**self.info, "mixture": float(self.mixture)}

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """x = μ_s + L z with L Lᵀ = Σ_s, L = Γ(I + B diag((1 + ν)^{−½} − 1) Bᵀ): ``[D]`` float64 from a ``[D]``
        standard normal z."""
        f = torch.rsqrt(1.0 + self.nu) - 1.0
        return self.mean + (z + self.basis @ (f * (self.basis.T @ z))) * self.scale

    def log_density(self, directions: torch.Tensor) -> np.ndarray:
        """``[K]`` log q_tilt(w) relative to the uniform distribution on S^{D−1} (nats) for ``[K, D]`` directions
        (module docstring: log|S^{D−1}| + c + log ∫_0^∞ t^{D−1} e^{−a t²/2 + b t} dt)."""
        a = np.empty(directions.shape[0])
        b = np.empty(directions.shape[0])
        for k in range(directions.shape[0]):
            w = directions[k].detach().to(device="cpu", dtype=torch.float64)
            y = w / self.scale
            proj = self.basis.T @ y
            a[k] = float(torch.dot(y, y)) + float(torch.dot(self.nu * proj, proj))
            b[k] = float(torch.dot(w, self.h))
        return self.log_const + log_ray_integral(self.dim - 1, a, b, np.inf)

    def draw(self, indices: Sequence[int], n_params: int, *, seed: int, dtype: torch.dtype,
             device: torch.device | str, coordinates: CoordinateShard | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Unit directions ``[K, D]`` (``dtype`` on ``device``) and their ``[K]`` log importance weights −log q(w)
        (nats), with q the defensive mixture α + (1 − α) q_tilt evaluated at the directions as stored."""
        if coordinates is not None:
            raise NotImplementedError("the curvature-tilted proposal does not support sharded coordinates")
        if n_params != self.dim:
            raise ValueError(f"the proposal has D = {self.dim}, asked for {n_params}")
        out = torch.empty(len(indices), n_params, dtype=dtype)
        for k, i in enumerate(indices):
            if is_isotropic_draw(int(i), self.mixture):
                gaussian_direction(int(i), n_params, seed=seed, dtype=dtype, out=out[k])
                out[k].div_(math.sqrt(sum_squares_f64(out[k])))
            else:
                x = self.sample(gaussian_direction(int(i), n_params, seed=seed, dtype=torch.float64))
                out[k] = x / math.sqrt(float(torch.dot(x, x)))
        log_w = np.zeros(len(indices))
        if self.mixture < 1.0 and len(indices):
            log_q = self.log_density(out)
            if self.mixture > 0.0:
                log_q = np.logaddexp(math.log(self.mixture), math.log1p(-self.mixture) + log_q)
            if not np.all(np.isfinite(log_q)):
                raise FloatingPointError(f"non-finite proposal density {log_q.tolist()} for directions {list(indices)}")
            log_w = -log_q
        return out.to(device), log_w


def _whitened_update(v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I + V diag(c) Vᵀ = I + B diag(ν) Bᵀ with B ``[D, k]`` orthonormal: V = QR, R diag(c) Rᵀ = W diag(ν) Wᵀ,
    B = QW (no D × D matrix)."""
    if v.shape[1] == 0:
        return v, c
    q, r = torch.linalg.qr(v)
    nu, w = torch.linalg.eigh((r * c) @ r.T)
    return q @ w, nu


__all__ = ["ChiSquareGroups", "CurvatureProposal", "FlooredModel", "TiltedProposal", "solve_group_saddlepoint"]
