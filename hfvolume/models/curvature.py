"""The curvature of a model's behaviour around θ0, as a low-rank-plus-floor model for the curvature proposal.

Near the anchor Δ(θ0 + x) ≈ ½ xᵀGx, G the Gauss–Newton matrix of the behaviour (exactly its Hessian for "kl" and
"output", the Gauss–Newton part for "loss"; :mod:`hfvolume.models.ggn`). :func:`curvature_of` returns

    Ĝ = U diag(λ) Uᵀ + λ₀ (I − UUᵀ)          (:class:`~hfvolume.volume.curvature.LowRankCurvature`)

in the behaviour's flat layout. The proposal tilts the prior by this quadratic model (Scherlis & Belrose 2025,
arXiv 2501.18812, §3: importance sampling of the local volume), so U and λ should be G's top eigenpairs:

* ``method="exact"`` (classifiers with "kl"): G = AᵀA from the exact factor of :mod:`hfvolume.models.gauss_newton`
  (A ``[N·C, D]``); the eigenpairs come from the ``[N·C, N·C]`` Gram matrix AAᵀ = V diag(μ) Vᵀ, with
  u_j = Aᵀv_j/√μ_j. Costs C vector-Jacobian products per example and 8·N·C·D bytes for A.
* ``method="lanczos"``: the top k pairs from Lanczos on products v ↦ Gv (one Jacobian-vector and one
  vector-Jacobian product of the eval data each; :mod:`hfvolume.models.lanczos`); no D × D or N·C × D matrix.
* ``method="auto"``: "exact" when it applies and A fits in ``exact_bytes_limit``, else "lanczos" with as many
  steps as ``max_forward_passes`` (by default the cost of 64 directions of a default estimate) and
  ``krylov_bytes_limit`` allow, keeping the better-converged half of the Ritz pairs.

G's null space is not flat: higher-order terms bound the region there too, and λ₀ stands for them. With
``floor="measure"`` it is measured on ``pilot_rays`` unit rays w orthogonal to U (a private generator, U projected
out): the radius r where Δ(θ0 + r w) = ε is found with the estimator's own radius search (the first ray alone, the
others from its radius), and a ray that behaves like ½ λ t² has λ = 2ε/r², so λ₀ = median over rays of 2ε/r². A ray
still inside the region at ``max_radius`` (saturated), or whose search stopped inside it (out of evaluations, or Δ
jumping over ε), counts with the secant curvature 2Δ(r)/r² at its last point r inside the region: at most 2ε/r², so
the floor errs on the flat side, which widens the proposal rather than narrowing it. Saturated rays are reported
with a warning.

Forward passes are counted in passes over the eval data, the unit of the estimator's ``forward_passes``: one
Jacobian-vector or vector-Jacobian product over all batches counts as one pass (a Lanczos step two; the exact
factor C, its C vector-Jacobian products per example sharing a forward), a pilot-ray evaluation one, and the
anchor pass "loss" needs to recognise its loss one. The model's weights, train/eval modes and every random state
are left as they were (:mod:`hfvolume.models.state`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.gauss_newton import ExampleBatch, kl_gauss_newton_factor_of_batches
from hfvolume.models.ggn import (
    KINDS,
    GaussNewtonProducts,
    behavior_kind,
    scored_batches,
    unsupported_kind_message,
)
from hfvolume.models.lanczos import lanczos_top
from hfvolume.models.params import ParameterView, smallest_relative_step
from hfvolume.models.state import cuda_devices_of, preserved_modes, preserved_rng
from hfvolume.volume.checks import (
    check_choice,
    check_int,
    check_nonnegative,
    check_optional_int,
    check_positive,
)
from hfvolume.volume.curvature import LowRankCurvature
from hfvolume.volume.evaluation import BehaviorCalls, RayPoints
from hfvolume.volume.radius import search_radii
from hfvolume.volume.results import DirectionFlag

METHODS = ("auto", "exact", "lanczos")
BUDGET_DIRECTIONS = 64  # the default budget: this many directions of a default estimate ...
PASSES_PER_DIRECTION = 3.5  # ... each costing about this many passes of the eval data (secant radius search)
DEFAULT_MAX_FORWARD_PASSES = int(BUDGET_DIRECTIONS * PASSES_PER_DIRECTION)
DEFAULT_EXACT_BYTES_LIMIT = 256 << 20
DEFAULT_KRYLOV_BYTES_LIMIT = 512 << 20
DEFAULT_FLOOR_EVALUATIONS = 6  # Δ evaluations per pilot ray (the secant search usually needs 2–4)
MAX_RADIUS_FACTOR = 10.0  # default pilot-ray cap: this many |θ0| (past any prior's typical shell)
# Gram eigenvalues below this fraction of the largest are rounding (AAᵀ has ≥ N null directions, one √p_n per
# example), and their u_j = Aᵀv_j/√μ_j lose orthogonality as ε_mach·μ_max/μ_j.
EXACT_RELATIVE_FLOOR = 1e-10
_STREAM_LANCZOS, _STREAM_PILOT = 1, 2


@dataclass(frozen=True)
class CurvatureSettings:
    """The validated knobs of :func:`curvature_of` (see its docstring)."""

    cutoff: float
    method: str
    rank: int | None
    iterations: int | None
    floor: float | None  # None: measure
    pilot_rays: int
    seed: int
    max_forward_passes: int
    exact_bytes_limit: int
    krylov_bytes_limit: int
    floor_evaluations: int
    max_radius: float | None
    rtol: float


@dataclass(frozen=True)
class _Plan:
    """How the eigenpairs are obtained: ``method`` "exact", "lanczos" or "none" (rank 0), ``rank`` k (None: every
    pair above the rounding level), ``iterations`` m (Lanczos steps), and why."""

    method: str
    rank: int | None
    iterations: int
    reason: str


def curvature_of(
    behavior: ModelBehavior,
    *,
    model: nn.Module,
    cutoff: float,
    method: str = "auto",
    rank: int | None = None,
    floor: float | str = "measure",
    pilot_rays: int = 8,
    seed: int = 0,
    iterations: int | None = None,
    max_forward_passes: int | None = None,
    exact_bytes_limit: int = DEFAULT_EXACT_BYTES_LIMIT,
    krylov_bytes_limit: int = DEFAULT_KRYLOV_BYTES_LIMIT,
    floor_evaluations: int = DEFAULT_FLOOR_EVALUATIONS,
    max_radius: float | None = None,
    rtol: float = 1e-2,
) -> tuple[LowRankCurvature, int]:
    """Ĝ = U diag(λ) Uᵀ + λ₀ (I − UUᵀ) of ``behavior`` at its anchor, and the forward passes spent building it.

    Args:
        behavior: a :class:`~hfvolume.models.behavior.ModelBehavior` of kind "kl", "loss" or "output" (any kind,
            callables included, with ``rank=0``). Its anchor, batches, scored positions and scaling are used.
        model: the model ``behavior`` evaluates (the same object).
        cutoff: ε > 0, in the behaviour's units (the floor is 2ε/r²).
        method: "auto", "exact" (classifier logits ``[B, C]`` with "kl") or "lanczos" (module docstring).
        rank: k, eigenpairs kept (0: Ĝ = λ₀I); None: every numerically non-zero pair ("exact"), or half the Lanczos
            steps the budget allows ("lanczos").
        floor: λ₀ ≥ 0 as a float (used as given), or "measure" (pilot rays, module docstring).
        pilot_rays: rays for the floor; seed: seeds the private generators (Lanczos start, pilot rays).
        iterations: Lanczos steps m (default: 2k for an explicit rank, else what the budget allows).
        max_forward_passes: the budget "auto" plans within (default 64 directions × 3.5 passes = 224).
        exact_bytes_limit: "auto" uses "exact" only while the factor A (8·N·C·D bytes) fits.
        krylov_bytes_limit: the Lanczos basis (8·m·D bytes) must fit; "auto" shortens m to fit.
        floor_evaluations: Δ evaluations per pilot ray; max_radius: pilot-ray cap (default 10·|θ0|);
        rtol: relative tolerance on Δ = ε at a pilot ray's radius.

    Returns:
        (curvature, forward passes): eigenvalues ``[k]`` float64 in the behaviour's units per squared parameter
        unit (nats for "kl"), basis ``[D, k]`` float64 on the CPU in ``behavior.view``'s layout, λ₀, and ``info``
        (method, rank, iterations, residuals, the floor's radii, flags and per-ray curvatures, forward passes by
        stage, budget); forward passes in passes over the eval data (module docstring).

    Raises:
        TypeError / ValueError: bad arguments; a behaviour kind, model or method that cannot give a curvature (the
            message names the knobs to use instead).
        NotImplementedError: a coordinate-sharded (FSDP2) behaviour.
    """
    settings = _settings(cutoff=cutoff, method=method, rank=rank, floor=floor, pilot_rays=pilot_rays, seed=seed,
                         iterations=iterations, max_forward_passes=max_forward_passes,
                         exact_bytes_limit=exact_bytes_limit, krylov_bytes_limit=krylov_bytes_limit,
                         floor_evaluations=floor_evaluations, max_radius=max_radius, rtol=rtol)
    _check_behavior(behavior, model)
    with preserved_modes(model), preserved_rng(cuda_devices=cuda_devices_of(model)):
        plan = _plan(behavior, settings)
        lam, basis, passes, info = _eigenpairs(behavior, model, plan, settings)
        if basis.shape[1] >= basis.shape[0]:  # U spans R^D: there is no complement to put a floor on
            lam0, floor_passes, floor_info = 0.0, 0, {"measured": False, "reason": "the basis spans every direction"}
        elif settings.floor is None:
            lam0, floor_passes, floor_info = _measure_floor(behavior, lam, basis, settings)
        else:
            lam0, floor_passes, floor_info = settings.floor, 0, {"measured": False}
    total = passes + floor_passes
    info.update({
        "kind": behavior_kind(behavior),
        "floor": floor_info,
        "eigenvalues_below_floor": int((lam < lam0).sum()),
        "forward_passes": {"curvature": passes, "floor": floor_passes, "total": total},
        "budget": settings.max_forward_passes,
        "seed": settings.seed,
    })
    return LowRankCurvature(eigenvalues=lam, basis=basis, floor=float(lam0), info=info), total


# ---------------------------------------------------------------------------------------------- arguments
def _settings(*, cutoff: Any, method: Any, rank: Any, floor: Any, pilot_rays: Any, seed: Any, iterations: Any,
              max_forward_passes: Any, exact_bytes_limit: Any, krylov_bytes_limit: Any, floor_evaluations: Any,
              max_radius: Any, rtol: Any) -> CurvatureSettings:
    if isinstance(floor, str):
        check_choice("floor", floor, ("measure",))
        floor_value = None
    else:
        floor_value = check_nonnegative("floor", floor)
    rtol = check_positive("rtol", rtol)
    if rtol >= 1:
        raise ValueError(f"rtol must be < 1, got {rtol!r}")
    return CurvatureSettings(
        cutoff=check_positive("cutoff", cutoff),
        method=check_choice("method", method, METHODS),
        rank=check_optional_int("rank", rank, minimum=0),
        iterations=check_optional_int("iterations", iterations),
        floor=floor_value,
        pilot_rays=check_int("pilot_rays", pilot_rays),
        seed=check_int("seed", seed, minimum=0),
        max_forward_passes=(DEFAULT_MAX_FORWARD_PASSES if max_forward_passes is None
                            else check_int("max_forward_passes", max_forward_passes)),
        exact_bytes_limit=check_int("exact_bytes_limit", exact_bytes_limit, minimum=0),
        krylov_bytes_limit=check_int("krylov_bytes_limit", krylov_bytes_limit, minimum=0),
        floor_evaluations=check_int("floor_evaluations", floor_evaluations),
        max_radius=None if max_radius is None else check_positive("max_radius", max_radius),
        rtol=rtol,
    )


def _check_behavior(behavior: Any, model: Any) -> None:
    if not isinstance(behavior, ModelBehavior):
        raise TypeError(f"behavior must be a ModelBehavior, got {type(behavior).__name__}")
    if type(behavior.view) is not ParameterView:
        raise NotImplementedError(
            "the curvature of a coordinate-sharded (FSDP2) behaviour is not supported: use a diagonal proposal "
            "(preconditioner='fisher' or 'adam')"
        )
    if model is not behavior.model:
        raise ValueError("model must be the model the behaviour evaluates (behavior.model)")


# ---------------------------------------------------------------------------------------------- planning
def _is_classifier(behavior: ModelBehavior) -> bool:
    """Every batch scores each example once, over all its C logits: logits ``[B, C]``."""
    return all(b.all_scored and b.n_scored == b.n_examples for b in scored_batches(behavior))


def _plan(behavior: ModelBehavior, s: CurvatureSettings) -> _Plan:
    """Which method, how many pairs and steps (see the module docstring); refuses what cannot work."""
    kind, d = behavior_kind(behavior), behavior.view.n_params
    if s.rank == 0:
        return _Plan("none", 0, 0, "rank=0")
    if kind not in KINDS:
        raise ValueError(unsupported_kind_message(kind))
    exact_ok = kind == "kl" and _is_classifier(behavior)
    if s.method == "exact":
        if not exact_ok:
            raise ValueError(
                f"method='exact' needs behavior='kl' on classifier logits [B, C] (got {kind!r}"
                f"{'' if kind != 'kl' else ' on per-token logits'}); use method='lanczos'"
            )
        return _Plan("exact", s.rank, 0, "method='exact'")
    reserve = (s.pilot_rays + 1) * s.floor_evaluations if s.floor is None else 0  # the first ray may take 2×
    if s.method == "auto" and exact_ok:
        classes = scored_batches(behavior)[0].width
        factor_bytes = 8 * behavior.n_examples * classes * d
        if factor_bytes <= s.exact_bytes_limit and classes + reserve <= s.max_forward_passes:
            return _Plan("exact", s.rank, 0, f"factor of {factor_bytes} bytes fits exact_bytes_limit")
    setup = 1 if kind == "loss" else 0
    by_memory = max(1, s.krylov_bytes_limit // (8 * d))
    if s.iterations is not None or s.rank is not None:
        m = min(d, s.iterations if s.iterations is not None else 2 * s.rank)  # type: ignore[operator]
        k = min(m, s.rank) if s.rank is not None else max(1, m // 2)
        if m > by_memory:
            raise ValueError(f"{m} Lanczos steps need {8 * m * d} bytes for the basis > krylov_bytes_limit="
                             f"{s.krylov_bytes_limit}; lower rank/iterations or raise krylov_bytes_limit")
        return _Plan("lanczos", k, m, "explicit rank/iterations")
    by_budget = (s.max_forward_passes - reserve - setup) // 2
    m = min(d, by_budget, by_memory)
    if m < 2:
        raise ValueError(
            f"max_forward_passes={s.max_forward_passes} leaves room for {max(by_budget, 0)} Lanczos steps after the "
            f"pilot rays ({reserve} passes); raise max_forward_passes, or use rank=0 or fewer pilot_rays"
        )
    limit = "max_forward_passes" if m == by_budget else ("krylov_bytes_limit" if m == by_memory else "D")
    return _Plan("lanczos", max(1, m // 2), m, f"steps limited by {limit}")


# ---------------------------------------------------------------------------------------------- eigenpairs
def _generator(seed: int, stream: int) -> torch.Generator:
    """A private CPU generator per (seed, purpose), so the pilot rays do not depend on the Lanczos start."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _eigenpairs(behavior: ModelBehavior, model: nn.Module, plan: _Plan,
                s: CurvatureSettings) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, Any]]:
    """(λ ``[k]``, U ``[D, k]``, forward passes, info) by the planned method."""
    d = behavior.view.n_params
    info: dict[str, Any] = {"method": plan.method, "reason": plan.reason}
    if plan.method == "none":
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, torch.zeros(d, 0, dtype=torch.float64), 0, {**info, "rank": 0}
    if plan.method == "exact":
        lam, basis, passes = _exact_pairs(behavior, model, plan.rank)
        return lam, basis, passes, {**info, "rank": int(lam.numel()), "relative_floor": EXACT_RELATIVE_FLOOR}
    products = GaussNewtonProducts(behavior, model)
    # The products' relative precision: the model's coarsest dtype decides it (bf16 models compute in bf16).
    noise = 10.0 * smallest_relative_step(behavior.view)
    device = behavior.anchor.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    result = lanczos_top(products, d, iterations=plan.iterations, rank=plan.rank or 0,
                         generator=_generator(s.seed, _STREAM_LANCZOS), relative_floor=noise, device=device,
                         dtype=dtype)
    info.update({
        "rank": int(result.eigenvalues.numel()),
        "iterations": result.products,
        "invariant_subspace": result.invariant,
        "relative_floor": noise,
        "max_residual": float(result.residuals.max()) if result.residuals.numel() else 0.0,
        "residuals": [float(x) for x in result.residuals],
    })
    return result.eigenvalues, result.vectors, products.passes, info


def _exact_pairs(behavior: ModelBehavior, model: nn.Module,
                 rank: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """G's eigenpairs from the exact factor A (G = AᵀA) through the Gram matrix AAᵀ; never a D × D matrix."""
    batches = [ExampleBatch(args=b.args, kwargs=b.kwargs, n_examples=b.n_examples) for b in scored_batches(behavior)]
    factor = kl_gauss_newton_factor_of_batches(model, batches, params=list(behavior.view.names))
    classes = factor.shape[0] // behavior.n_examples
    mu, v = torch.linalg.eigh(factor @ factor.T)
    order = torch.argsort(mu, descending=True)
    mu, v = mu[order], v[:, order]
    top = float(mu[0]) if mu.numel() else 0.0
    keep = int(((mu > EXACT_RELATIVE_FLOOR * top) & (mu > 0)).sum())
    if rank is not None:
        keep = min(keep, rank)
    mu, v = mu[:keep].contiguous(), v[:, :keep]
    basis = (factor.T @ v) / torch.sqrt(mu)
    return mu, basis.contiguous(), classes


# ---------------------------------------------------------------------------------------------- the floor
def _pilot_directions(d: int, basis: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``[n, D]`` float64 unit rays orthogonal to the columns of ``basis`` (projected twice: one projection leaves
    rounding of the order of ε_mach·|g| along U)."""
    g = torch.randn(n, d, generator=_generator(seed, _STREAM_PILOT), dtype=torch.float64)
    for _ in range(2 if basis.shape[1] else 0):
        g -= (g @ basis) @ basis.T
    return g / torch.linalg.vector_norm(g, dim=1, keepdim=True)


def _pilot_start(lam: torch.Tensor, eps: float, cap: float) -> float:
    """The first ray's first radius: where the smallest kept curvature would put the crossing (the floor is usually
    below it), or a thousandth of the cap (a hundredth of |θ0| by default) without any; within [10⁻⁶, ¼] × cap."""
    guess = math.sqrt(2 * eps / float(lam.min())) if lam.numel() and float(lam.min()) > 0 else 1e-3 * cap
    return min(max(guess, 1e-6 * cap), 0.25 * cap)


def _search_pilot_rays(behavior: ModelBehavior, rays: torch.Tensor, start: float, cap: float,
                       s: CurvatureSettings) -> tuple[dict[str, np.ndarray], int]:
    """Radii along ``rays`` ``[n, D]``: the first ray alone (up to 2 × floor_evaluations), then the others in
    lockstep from its radius, where the secant search needs two or three evaluations (as the estimator's pilot
    phase). Returns the per-ray arrays of :class:`~hfvolume.volume.radius.RadiusSearchResult` and the points
    evaluated."""
    calls = BehaviorCalls(behavior, batched=True)
    anchor = behavior.anchor
    w = rays.to(device=anchor.device, dtype=anchor.dtype)
    parts = []
    for group, first, budget in ((slice(0, 1), start, 2 * s.floor_evaluations),
                                 (slice(1, rays.shape[0]), None, s.floor_evaluations)):
        n = w[group].shape[0]
        if n == 0:
            continue
        if first is None:  # the first ray's radius, when it found one
            first = float(parts[0].radius[0]) if parts[0].radius[0] > 0 else start
        points = RayPoints(calls, anchor, w[group], behavior.anchor_value)
        parts.append(search_radii(points, np.full(n, first), cutoff=s.cutoff, rtol=s.rtol, cap=np.full(n, cap),
                                  cap_flag=DirectionFlag.SATURATED, max_evaluations=budget))
    merged = {key: np.concatenate([getattr(p, key) for p in parts])
              for key in ("radius", "delta", "flag", "evaluations")}
    return merged, calls.calls


def _measure_floor(behavior: ModelBehavior, lam: torch.Tensor, basis: torch.Tensor,
                   s: CurvatureSettings) -> tuple[float, int, dict[str, Any]]:
    """λ₀ = median over pilot rays of 2ε/r² (module docstring), the passes spent, and what was measured."""
    d, eps = behavior.view.n_params, s.cutoff
    anchor_norm = float(torch.linalg.vector_norm(behavior.anchor.to(torch.float64)))
    cap = s.max_radius if s.max_radius is not None else MAX_RADIUS_FACTOR * (anchor_norm or math.sqrt(d))
    start = _pilot_start(lam, eps, cap)
    found, passes = _search_pilot_rays(behavior, _pilot_directions(d, basis, s.pilot_rays, s.seed), start, cap, s)
    flags = [DirectionFlag(f).value for f in found["flag"]]
    usable = found["radius"] > 0
    if not usable.any():
        raise ValueError(
            f"no pilot ray found a point inside the region (Δ ≤ {eps:g}) between {start:.3g} and {cap:.3g}; pass "
            "floor=<float>, or max_radius= / floor_evaluations= to search further"
        )
    converged = np.array([f == DirectionFlag.CONVERGED.value for f in flags])
    radius = np.where(usable, found["radius"], 1.0)
    per_ray = np.where(converged, 2 * eps, 2 * np.maximum(found["delta"], 0.0)) / radius**2
    per_ray = np.where(usable, per_ray, np.nan)
    floor = float(np.median(per_ray[usable]))
    n_saturated = flags.count(DirectionFlag.SATURATED.value)
    if n_saturated:
        warnings.warn(
            f"{n_saturated} of {s.pilot_rays} pilot rays stayed inside the region up to max_radius={cap:.3g}: they "
            f"count with the curvature seen there, 2Δ/max_radius² ≤ {2 * eps / cap**2:.3g}; floor λ₀ = {floor:.3g}",
            RuntimeWarning, stacklevel=3,
        )
    info = {
        "measured": True,
        "value": floor,
        "radii": [float(r) for r in found["radius"]],
        "deltas": [float(x) for x in found["delta"]],
        "curvatures": [None if not math.isfinite(x) else float(x) for x in per_ray],
        "flags": flags,
        "evaluations": [int(x) for x in found["evaluations"]],
        "n_saturated": n_saturated,
        "n_failed": flags.count(DirectionFlag.FAILED.value),
        "start_radius": start,
        "max_radius": cap,
    }
    return floor, passes, info


__all__ = [
    "DEFAULT_EXACT_BYTES_LIMIT",
    "DEFAULT_KRYLOV_BYTES_LIMIT",
    "DEFAULT_MAX_FORWARD_PASSES",
    "METHODS",
    "CurvatureSettings",
    "curvature_of",
]
