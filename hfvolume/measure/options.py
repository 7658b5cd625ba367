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
from hfvolume.volume.priors import GaussianPrior, UniformPrior

SigmaSpec = Union[None, str, float, Mapping[str, float], torch.Tensor]
PriorMeanSpec = Union[None, Mapping[str, torch.Tensor], nn.Module, torch.Tensor]
PreconditionerSpec = Union[None, str, Mapping[str, Any], torch.Tensor]
PriorSpec = Union[str, GaussianPrior, UniformPrior]

PRECONDITIONERS = ("adam", "adam-m", "fisher")
_ADAM_OPTIONS = {"exponent", "eps", "fallback", "betas"}
_FISHER_OPTIONS = {"exponent", "eps", "n_samples", "damping", "max_batches", "method"}


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
        raise ValueError("preconditioner_options only apply to 'adam', 'adam-m' and 'fisher'")
    return _given_scales(preconditioner, view)


__all__ = [
    "PRECONDITIONERS",
    "PreconditionerSpec",
    "PriorMeanSpec",
    "PriorSpec",
    "SigmaSpec",
    "check_prior_arguments",
    "resolve_preconditioner",
    "resolve_prior",
    "resolve_prior_mean",
    "resolve_sigma",
]
