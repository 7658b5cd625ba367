"""User options → the core's inputs: the Gaussian prior's σ and mean, and the proposal's scales.

Every option accepts the forms a user has at hand (a float, a per-tensor mapping, a state dict or a model, a
``[D]`` tensor, an optimizer or a Trainer checkpoint) and turns it into the flat ``[D]`` vectors of the core, in the
order of a :class:`~hfvolume.models.params.ParameterView`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Union

import torch
from torch import nn

from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.params import ParameterView
from hfvolume.volume.checks import check_choice, check_positive
from hfvolume.volume.priors import GaussianPrior, UniformPrior
from hfvolume.volume.tilted import CurvatureProposal

SigmaSpec = Union[None, str, float, Mapping[str, float], torch.Tensor]
PriorMeanSpec = Union[None, Mapping[str, torch.Tensor], nn.Module, torch.Tensor]
PreconditionerSpec = Union[None, str, Mapping[str, Any], torch.Tensor, CurvatureProposal]
PriorSpec = Union[str, GaussianPrior, UniformPrior]

PRECONDITIONERS = ("adam", "adam-m", "fisher", "ggn")
_ADAM_OPTIONS = {"exponent", "eps", "fallback", "betas", "bias_correction"}
_FISHER_OPTIONS = {"exponent", "eps", "n_samples", "damping", "max_batches", "method"}
# "tilt" and "floor_shape" belong to the proposal; the rest are curvature_of's knobs (hfvolume.models.curvature).
_GGN_PROPOSAL_OPTIONS = {"tilt", "floor_shape", "floor_shape_options"}
_GGN_OPTIONS = _GGN_PROPOSAL_OPTIONS | {"method", "rank", "floor", "pilot_rays", "iterations", "max_forward_passes",
                                       "exact_bytes_limit", "krylov_bytes_limit", "floor_evaluations", "max_radius",
                                       "rtol"}
FLOOR_SHAPES = ("auto", "isotropic", "fisher", "adam", "adam-m")
DEFAULT_TILT = 10.0


def check_prior_arguments(prior: PriorSpec, sigma: SigmaSpec, prior_mean: PriorMeanSpec) -> None:
    """Refuse σ / mean given twice (inside a ``GaussianPrior`` and as arguments)."""
    if isinstance(prior, GaussianPrior) and (sigma is not None or prior_mean is not None):
        raise ValueError("pass sigma/prior_mean either inside GaussianPrior(...) or as arguments, not both")


def resolve_sigma(sigma: SigmaSpec, view: ParameterView) -> Union[float, torch.Tensor, None]:
    """σ of the Gaussian prior: None (the prior takes the RMS of the anchor), a float, or a ``[D]`` tensor."""
    if sigma is None or (isinstance(sigma, str) and sigma == "rms"):
        return None
    if isinstance(sigma, str):
        raise ValueError(f"unknown sigma {sigma!r}: use a float, 'rms', a mapping name → float, or a [D] tensor")
    if isinstance(sigma, Mapping):
        return view.expand_per_tensor(sigma)
    if isinstance(sigma, torch.Tensor):
        return sigma
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return float(sigma)
    raise TypeError(f"sigma must be None, 'rms', a float, a mapping or a tensor, got {type(sigma).__name__}")


def resolve_prior_mean(prior_mean: PriorMeanSpec, view: ParameterView) -> torch.Tensor | None:
    """The prior's centre m as a ``[D]`` tensor (None: the origin)."""
    if prior_mean is None:
        return None
    if isinstance(prior_mean, nn.Module):
        return view.flatten(dict(prior_mean.named_parameters()))
    if isinstance(prior_mean, Mapping):
        return view.flatten(prior_mean)
    if isinstance(prior_mean, torch.Tensor):
        if prior_mean.numel() != view.n_params:
            raise ValueError(f"prior_mean has {prior_mean.numel()} entries, expected {view.n_params}")
        return prior_mean.reshape(-1)
    raise TypeError(f"prior_mean must be None, a state dict, a model or a tensor, got {type(prior_mean).__name__}")


def resolve_prior(prior: PriorSpec, sigma: SigmaSpec, prior_mean: PriorMeanSpec, view: ParameterView) -> PriorSpec:
    """``prior="gaussian"`` with the user's σ and mean built into a :class:`GaussianPrior`; other priors as given."""
    if isinstance(prior, str) and prior.lower() == "gaussian":
        return GaussianPrior(sigma=resolve_sigma(sigma, view), mean=resolve_prior_mean(prior_mean, view))
    if sigma is not None or prior_mean is not None:
        raise ValueError(f"sigma and prior_mean apply to the Gaussian prior only, not to prior={prior!r}")
    return prior


def _named_parameters(model: nn.Module, view: ParameterView) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name] for name in view.names}


def _check_options(kind: str, options: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown preconditioner_options {sorted(unknown)} for {kind!r}; allowed: {sorted(allowed)}")


def _adam(kind: str, model: nn.Module, named: dict[str, torch.Tensor], optimizer: Any,
          options: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    _check_options(kind, options, _ADAM_OPTIONS)
    if optimizer is None:
        raise ValueError(f"preconditioner={kind!r} needs optimizer= (a torch optimizer or a Trainer checkpoint "
                         "directory with optimizer.pt)")
    from hfvolume.models.optim_state import adam_scales, optimizer_state_from_checkpoint

    source = optimizer
    if isinstance(optimizer, (str, os.PathLike)):
        source = optimizer_state_from_checkpoint(optimizer, model)
    moment = "exp_avg" if kind == "adam-m" else "exp_avg_sq"
    return adam_scales(source, named, moment=moment, **options)


def _fisher(model: nn.Module, named: dict[str, torch.Tensor], behavior: ModelBehavior | None, seed: int,
            options: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    _check_options("fisher", options, _FISHER_OPTIONS)
    if behavior is None:
        raise ValueError("preconditioner='fisher' needs the evaluation batches")
    from hfvolume.models.fisher import fisher_diagonal, fisher_scales

    scale_kw = {k: options.pop(k) for k in ("exponent", "eps") if k in options}
    fisher = fisher_diagonal(model, behavior.raw_batches, named, seed=seed, **options)
    scales, info = fisher_scales(fisher, **scale_kw)
    return scales, {**info, **{k: v for k, v in options.items() if isinstance(v, (int, float, str))}}


def _given_scales(preconditioner: Any, view: ParameterView) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(preconditioner, torch.Tensor):
        return preconditioner.reshape(-1), {"name": "scales"}
    if isinstance(preconditioner, Mapping):
        values = dict(preconditioner)
        if all(isinstance(v, (int, float)) for v in values.values()):
            return view.expand_per_tensor(values), {"name": "per-tensor scales"}
        scales = view.flatten({n: torch.as_tensor(v) for n, v in values.items()}, dtype=torch.float64)
        return scales, {"name": "per-parameter scales"}
    raise TypeError(f"preconditioner must be None, a name, a mapping or a tensor, got {type(preconditioner).__name__}")


def resolve_preconditioner(
    preconditioner: PreconditionerSpec,
    view: ParameterView,
    *,
    model: nn.Module,
    optimizer: Any = None,
    behavior: ModelBehavior | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Proposal scales p ``[D]`` (None for isotropic) and a JSON-safe description of where they came from.

    ``"adam"`` / ``"adam-m"``: p_i = 1/(ν̂_i^γ + η) from ``optimizer`` (a live torch optimizer, Accelerate's
    wrapper, or a Trainer ``checkpoint-N`` directory holding ``optimizer.pt``); ν̂ is Adam's bias-corrected second
    moment (``"adam-m"``: |first moment|). ``"fisher"``: p_i = 1/(F_ii^γ + η) from the diagonal Fisher information
    on the behaviour's batches, labels drawn from the model. Near a minimum the region is ≈ {½ δᵀHδ ≤ ε}; a proposal
    p ∝ diag(H)^{−1/2} closes most of the gap between the arithmetic and geometric means of the curvature that
    isotropic directions suffer (Scherlis & Belrose, arXiv 2501.18812, §4).
    """
    options = dict(options or {})
    if preconditioner is None:
        if options:
            raise ValueError("preconditioner_options given without a preconditioner")
        return None, {"name": "isotropic"}
    if isinstance(preconditioner, str):
        if preconditioner == "ggn":
            raise ValueError("preconditioner='ggn' is not a diagonal proposal: use resolve_curvature_proposal")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {preconditioner!r}: use one of {PRECONDITIONERS}, a mapping "
                             "name → scales, or a [D] tensor")
        named = _named_parameters(model, view)
        if preconditioner in ("adam", "adam-m"):
            scales, info = _adam(preconditioner, model, named, optimizer, options)
        else:
            scales, info = _fisher(model, named, behavior, seed, options)
        return view.flatten(scales, dtype=torch.float64), info
    if options:
        raise ValueError("preconditioner_options only apply to 'adam', 'adam-m', 'fisher' and 'ggn'")
    return _given_scales(preconditioner, view)


def resolve_curvature_proposal(
    view: ParameterView,
    *,
    model: nn.Module,
    behavior: ModelBehavior,
    cutoff: float,
    mixture: float,
    optimizer: Any = None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> tuple[CurvatureProposal, int]:
    """``preconditioner="ggn"``: the prior tilted by the behaviour's quadratic model, and the forward passes (passes
    over the eval data) spent building it.

    The curvature Ĝ = U diag(λ) Uᵀ + λ₀ (I − UUᵀ) comes from :func:`hfvolume.models.curvature.curvature_of` (the
    exact Gauss–Newton matrix of a classifier's KL, else top-k Lanczos pairs, and a floor λ₀ measured on pilot rays
    orthogonal to U). Near a minimum the region is ≈ {½ xᵀGx ≤ ε}, whose prior mass is set by the whole of G, not
    by its diagonal (Scherlis & Belrose, arXiv 2501.18812, §4: importance sampling with the curvature).
    ``options``: curvature_of's knobs (``method``, ``rank``, ``floor``, ``pilot_rays``, ...) and the proposal's:

    * ``tilt`` (default :data:`DEFAULT_TILT`): the multiple of the saddlepoint ŝ used. 1 is the exact tilt of the
      quadratic model; real regions are bounded by higher-order terms the model lacks, above all along the
      direction towards the prior mean, which the exact tilt leans into because the prior gains along it linearly
      in the radius; a stronger tilt leans less and follows the curvature's shape more.
    * ``floor_shape``: the floor's shape on the D − k directions U leaves out: "isotropic" (λ₀ everywhere), or
      φ ∝ p⁻² for the scales p of the diagonal proposal "fisher", "adam" or "adam-m" (``floor_shape_options`` are
      that proposal's options), scaled so that random rays orthogonal to U see λ₀ on average; "auto" (default):
      "adam" when ``optimizer`` is given, else "fisher". A low-rank U leaves most of the curvature's spread in the
      complement, where an isotropic floor costs what an isotropic proposal costs.
    """
    options = dict(options or {})
    _check_options("ggn", options, _GGN_OPTIONS)
    tilt = check_positive("tilt", options.pop("tilt", DEFAULT_TILT))
    shape_name = check_choice("floor_shape", options.pop("floor_shape", "auto"), FLOOR_SHAPES)
    if shape_name == "auto":
        shape_name = "fisher" if optimizer is None else "adam"
    shape_options = dict(options.pop("floor_shape_options", None) or {})
    from hfvolume.models.curvature import curvature_of

    with torch.enable_grad():  # the curvature needs Jacobian products; the measurement runs under no_grad
        curvature, passes = curvature_of(behavior, model=model, cutoff=cutoff, seed=seed, **options)
    info: dict[str, Any] = {"name": "ggn", "curvature": dict(curvature.info)}
    shape = None
    if shape_name != "isotropic":
        scales, shape_info = resolve_preconditioner(shape_name, view, model=model, optimizer=optimizer,
                                                    behavior=behavior, seed=seed, options=shape_options)
        shape = scales.to(torch.float64).pow(-2)  # type: ignore[union-attr]
        shape_passes = _diagonal_passes(shape_name, shape_options)
        passes += shape_passes
        info["floor_shape_source"] = {**shape_info, "forward_passes": shape_passes}
    info["curvature_forward_passes"] = int(passes)
    return CurvatureProposal(curvature, mixture=mixture, tilt=tilt, floor_shape=shape, info=info), int(passes)


def _diagonal_passes(name: str, options: Mapping[str, Any]) -> int:
    """Forward-pass equivalents of a diagonal proposal's scales: Adam's state is free; the Fisher diagonal costs one
    vector-Jacobian pass over the eval data (its forward included) per label sample."""
    return int(options.get("n_samples", 1)) if name == "fisher" else 0


__all__ = [
    "DEFAULT_TILT",
    "FLOOR_SHAPES",
    "PRECONDITIONERS",
    "PreconditionerSpec",
    "PriorMeanSpec",
    "PriorSpec",
    "SigmaSpec",
    "check_prior_arguments",
    "resolve_curvature_proposal",
    "resolve_preconditioner",
    "resolve_prior",
    "resolve_prior_mean",
    "resolve_sigma",
]
