"""Importance-sampling scales from an optimizer's moment estimates, and optimizer state read from checkpoints.

Adam's bias-corrected second moment ν̂ = exp_avg_sq / (1 − β2^step) (Kingma & Ba 2015, Algorithm 1) is a running
average of squared gradients, i.e. a cheap stand-in for diag(H), so the proposal scales are

    p_i = 1 / (ν̂_i^γ + η),      γ = ``exponent``, η = ``eps``

(the importance sampling of Scherlis & Belrose 2025, arXiv 2501.18812; the formula, the relative η and the
invariances the tests pin are those of :mod:`hfvolume.models.scales`). At step 0 (ν ≡ 0) the proposal is exactly
isotropic, so the estimate equals the naive one bit for bit.

Sources of state accepted by :func:`adam_scales`:

* any ``torch.optim.Optimizer`` keeping ``exp_avg_sq``/``exp_avg`` and ``betas`` (Adam, AdamW, NAdam, RAdam, ...);
* wrappers exposing the real optimizer as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, which is what
  Trainer callbacks receive), unwrapped repeatedly;
* ``transformers.optimization.Adafactor``: its factored ``exp_avg_sq_row``/``exp_avg_sq_col`` are expanded to
  ν_ij = row_i·col_j / mean(row) — the same rank-1 estimate Adafactor itself divides by — without bias correction,
  because Adafactor's β2 schedule 1 − step^decay_rate starts at 0 and so its averages are not biased towards 0;
* a :class:`NamedOptimizerState` (e.g. from :func:`optimizer_state_from_checkpoint`), or a plain mapping
  name → per-parameter state together with ``betas=``.

Parameters without usable state (never stepped, frozen, not in the optimizer, SGD, 8-bit states, ...) get a
documented fallback scale and one warning that counts them; they never cause a crash.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from hfvolume.models.scales import (
    DEFAULT_EPS,
    DEFAULT_EXPONENT,
    EpsSpec,
    check_scale_settings,
    inverse_power_scale,
    resolve_eps,
)
from hfvolume.volume.checks import check_bool, check_choice, check_fraction

OPTIMIZER_NAME = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME: the file Trainer checkpoints hold
MOMENTS = ("exp_avg_sq", "exp_avg")
FALLBACKS = ("mean", "one")
# Per-parameter state entries whose shape must equal the parameter's (checked when loading checkpoints).
_PARAM_SHAPED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
# Library defaults for the Adam proposal, used whenever exponent/eps are not given (see hfvolume.models.scales).
DEFAULT_ADAM_EXPONENT = DEFAULT_EXPONENT
DEFAULT_ADAM_EPS: EpsSpec = DEFAULT_EPS

def _fill_fallback(
    scales: dict[str, torch.Tensor | None],
    named_params: Mapping[str, torch.Tensor],
    fallback: str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Replace the None entries of ``scales`` by the fallback constant and cast everything to ``dtype`` on CPU.

    ``"mean"``: the geometric mean over all coordinates that have a scale (so the fallback tensors look "typical"
    after the core's unit-geometric-mean normalisation), 1 if none has; ``"one"``: 1. When every known scale is
    the same number the fallback is exactly that number, so ν ≡ 0 plus some stateless tensors is still exactly
    isotropic.
    """
    known = [s for s in scales.values() if s is not None and s.numel() > 0]
    if fallback == "one" or not known:
        value = 1.0
    else:
        lo = min(float(s.min()) for s in known)
        hi = max(float(s.max()) for s in known)
        if lo == hi:
            value = lo
        else:
            n = sum(s.numel() for s in known)
            value = math.exp(sum(float(torch.log(s).sum()) for s in known) / n)
    out: dict[str, torch.Tensor] = {}
    for name, s in scales.items():
        shape = tuple(named_params[name].shape)
        if s is None:
            out[name] = torch.full(shape, value, dtype=dtype)
        else:
            out[name] = s.to(device="cpu", dtype=dtype).reshape(shape)
    return out


class NamedOptimizerState(dict):
    """Optimizer state keyed by parameter name: ``{name: {"step": ..., "exp_avg_sq": Tensor, ...}}``.

    A ``dict`` subclass (so it *is* the ``dict[str, dict[str, Tensor]]`` that
    :func:`optimizer_state_from_checkpoint` promises) that also carries each parameter's param-group
    hyperparameters in ``hyperparameters[name]`` (``betas``, ``weight_decay``, ``lr``, ...) and the group layout in
    ``groups`` (list of lists of names, optimizer order). :func:`adam_scales` accepts it in place of an optimizer.
    Names in ``hyperparameters`` without an entry in the dict had no state (e.g. never received a gradient).
    """

    def __init__(
        self,
        state: Mapping[str, Mapping[str, Any]] | None = None,
        hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
        groups: Iterable[Iterable[str]] | None = None,
    ) -> None:
        super().__init__({k: dict(v) for k, v in (state or {}).items()})
        self.hyperparameters: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (hyperparameters or {}).items()}
        self.groups: list[list[str]] = [list(g) for g in (groups or [])]

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], names_per_group: list[list[str]] | None = None
    ) -> NamedOptimizerState:
        """Name the integer-indexed ``state`` of ``torch.optim.Optimizer.state_dict()`` output.

        ``names_per_group[k]`` lists the parameter names of param group k in the order the optimizer received
        them (the saved ``params`` index lists are in that order). When omitted, the ``param_names`` that torch
        saves for optimizers built from ``named_parameters()`` are used. Group sizes must match exactly.
        """
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError("expected an optimizer state_dict with 'state' and 'param_groups' entries")
        groups = list(state_dict["param_groups"])
        if names_per_group is None:
            if not all("param_names" in g for g in groups):
                raise ValueError("the state_dict has no 'param_names'; pass names_per_group (one list per group)")
            names_per_group = [list(g["param_names"]) for g in groups]
        if len(names_per_group) != len(groups):
            raise ValueError(
                f"the optimizer state has {len(groups)} param groups of sizes {[len(g['params']) for g in groups]}, "
                f"but {len(names_per_group)} name lists of sizes {[len(n) for n in names_per_group]} were given"
            )
        raw_state = state_dict["state"]
        state: dict[str, dict[str, Any]] = {}
        hyper: dict[str, dict[str, Any]] = {}
        for k, (group, names) in enumerate(zip(groups, names_per_group)):
            if len(group["params"]) != len(names):
                raise ValueError(
                    f"param group {k} of the optimizer state holds {len(group['params'])} parameters but "
                    f"{len(names)} names were given for it (groups: saved sizes "
                    f"{[len(g['params']) for g in groups]}, given sizes {[len(n) for n in names_per_group]})"
                )
            settings = {key: value for key, value in group.items() if key not in ("params", "param_names")}
            for index, name in zip(group["params"], names):
                if name in hyper:
                    raise ValueError(f"parameter {name!r} appears twice in the optimizer's param groups")
                hyper[name] = settings
                if index in raw_state:
                    state[name] = dict(raw_state[index])
        return cls(state, hyper, names_per_group)


def _named_parameter_list(model_or_named_params: nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, Any]]:
    if isinstance(model_or_named_params, nn.Module):
        # named_parameters() de-duplicates tied weights, exactly like the list the Trainer builds groups from.
        return list(model_or_named_params.named_parameters())
    if isinstance(model_or_named_params, Mapping):
        return list(model_or_named_params.items())
    raise TypeError(
        "model_or_named_params must be an nn.Module or a mapping name → parameter, "
        f"got {type(model_or_named_params).__name__}"
    )


def trainer_decay_parameter_names(model: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
    """Names the installed ``transformers.Trainer`` puts in the weight-decay group (param group 0).

    Calls ``Trainer.get_decay_parameter_names`` itself (it does not use ``self`` in transformers 5.x), so the rule
    follows the installed version: parameters outside ``nn.LayerNorm`` modules whose lower-cased name matches none
    of ``bias``, ``layernorm``, ``rmsnorm``, ``(^|.)norm($|.)``, ``_norm($|.)``. A mapping of names (no module
    types) gets the name patterns only; the group sizes saved in the checkpoint then catch a mismatch.
    """
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    if isinstance(model, nn.Module):
        try:
            from transformers import Trainer

            return list(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
        except (ImportError, AttributeError, TypeError):
            # A future Trainer may need ``self``; fall back to the 5.x rule (trainer_pt_utils.get_parameter_names).
            from transformers.trainer_pt_utils import get_parameter_names

            return list(get_parameter_names(model, [nn.LayerNorm], patterns))
    compiled = [re.compile(p) for p in patterns]
    return [n for n, _ in _named_parameter_list(model) if not any(c.search(n.lower()) for c in compiled)]


def _check_state_shapes(state: NamedOptimizerState, params: Mapping[str, Any]) -> None:
    for name, entry in state.items():
        shape = tuple(params[name].shape)
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            expected: tuple[int, ...] | None = None
            if key in _PARAM_SHAPED_KEYS:
                expected = shape
            elif key == "exp_avg_sq_row":
                expected = shape[:-1]
            elif key == "exp_avg_sq_col":
                expected = shape[:-2] + shape[-1:]
            if expected is not None and tuple(value.shape) != expected:
                raise ValueError(
                    f"optimizer state {key!r} of parameter {name!r} has shape {tuple(value.shape)}, but the "
                    f"parameter has shape {shape} (expected {expected}): the checkpoint does not belong to this "
                    "model, or its parameters were ordered/frozen differently"
                )


def optimizer_state_from_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    model_or_named_params: nn.Module | Mapping[str, torch.Tensor],
    *,
    weight_decay_split: bool = True,
    decay_parameter_names: Iterable[str] | None = None,
    weights_only: bool = True,
) -> NamedOptimizerState:
    """Load ``optimizer.pt`` of a Trainer ``checkpoint-N`` directory and key its state by parameter name.

    ``torch.optim.Optimizer.state_dict()`` numbers parameters 0, 1, ... across param groups in the order the
    optimizer received them, and ``Trainer.create_optimizer`` (transformers 5.24) builds two groups from
    ``model.named_parameters()`` (tied weights counted once), ``requires_grad`` only:

    * group 0 (``weight_decay = args.weight_decay``): names in ``Trainer.get_decay_parameter_names(model)``;
    * group 1 (``weight_decay = 0``): all other trainable names (biases, LayerNorm/RMSNorm weights, ...).

    This function rebuilds those name lists (``weight_decay_split=False``: one group with every trainable
    parameter, for optimizers built from ``model.parameters()``; ``decay_parameter_names``: override the decay
    set, e.g. for a Trainer subclass) and zips them with the saved ``params`` index lists. If the optimizer was
    built from named parameters, torch saved ``param_names`` and those are used instead. Not reproduced: the
    Trainer's extra per-device-mesh groups for DTensor parameters on several meshes (expert parallelism), and
    optimizers that build their own groups (GaLore, LOMO, Muon factories); the group-size check reports those.

    Args:
        checkpoint_dir: a ``checkpoint-N`` directory (or the ``optimizer.pt`` file itself).
        model_or_named_params: the model (preferred: module types decide the decay group), or a mapping with *all*
            its parameters in ``named_parameters()`` order, with ``requires_grad`` as during training.
        weights_only: passed to ``torch.load``. The Trainer's file holds only tensors and plain Python values, so
            the safe loader works; set False only for a file you trust that needs full unpickling.

    Returns:
        A :class:`NamedOptimizerState` (``{name: {"step", "exp_avg", "exp_avg_sq", ...}}`` with CPU tensors, plus
        per-name group hyperparameters) that :func:`adam_scales` accepts directly.

    Raises:
        FileNotFoundError: no ``optimizer.pt`` (e.g. ``save_only_model=True``, or DeepSpeed/FSDP checkpoints that
            store the optimizer in their own formats).
        ValueError: group sizes or state shapes do not match the model.
    """
    file = _optimizer_file(Path(checkpoint_dir))
    state_dict = _load_state_dict(file, weights_only=weights_only)
    params = dict(_named_parameter_list(model_or_named_params))
    groups = list(state_dict["param_groups"])
    if all("param_names" in g for g in groups):
        names_per_group = [list(g["param_names"]) for g in groups]
    else:
        names_per_group = _trainer_groups(model_or_named_params, params, groups, weight_decay_split=weight_decay_split,
                                          decay_parameter_names=decay_parameter_names)
    unknown = [n for names in names_per_group for n in names if n not in params]
    if unknown:
        raise ValueError(f"the optimizer state names parameters the model does not have, e.g. {unknown[0]!r}")
    named = NamedOptimizerState.from_state_dict(state_dict, names_per_group)
    _check_state_shapes(named, params)
    return named


def _optimizer_file(path: Path) -> Path:
    """``path`` itself if it is a file, else its ``optimizer.pt``; FileNotFoundError listing what is there."""
    file = path if path.is_file() else path / OPTIMIZER_NAME
    if not file.is_file():
        others = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        hint = (
            "; the directory holds " + ", ".join(others[:12]) + (" ..." if len(others) > 12 else "")
            if others
            else ""
        )
        raise FileNotFoundError(
            f"no {OPTIMIZER_NAME} in {str(path)!r}{hint}. Trainer writes it with every checkpoint unless "
            "save_only_model=True; DeepSpeed and FSDP checkpoints keep the optimizer in their own formats, which "
            "are not supported here"
        )
    return file


def _load_state_dict(file: Path, *, weights_only: bool) -> Mapping[str, Any]:
    """The optimizer ``state_dict`` saved in ``file`` (CPU tensors), checked to have ``state`` and param groups."""
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(file)!r} holds objects that torch.load(weights_only=True) refuses to unpickle ({err}). A Trainer "
            "optimizer.pt contains only tensors and plain values; if you trust this file, pass weights_only=False"
        ) from err
    groups = list(state_dict.get("param_groups", [])) if isinstance(state_dict, Mapping) else []
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or not groups:
        raise ValueError(f"{str(file)!r} is not a torch optimizer state_dict (no 'state'/'param_groups')")
    return state_dict


def _trainer_groups(
    model_or_named_params: nn.Module | Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    groups: list[Mapping[str, Any]],
    *,
    weight_decay_split: bool,
    decay_parameter_names: Iterable[str] | None,
) -> list[list[str]]:
    """The parameter names of each saved param group, rebuilt the way ``Trainer.create_optimizer`` builds them
    (see :func:`optimizer_state_from_checkpoint`), checked against the saved group sizes."""
    trainable = [n for n, p in params.items() if getattr(p, "requires_grad", True)]
    if weight_decay_split:
        decay = set(
            decay_parameter_names
            if decay_parameter_names is not None
            else trainer_decay_parameter_names(model_or_named_params)
        )
        names_per_group = [[n for n in trainable if n in decay], [n for n in trainable if n not in decay]]
    else:
        names_per_group = [trainable]
    saved_sizes = [len(g["params"]) for g in groups]
    built_sizes = [len(n) for n in names_per_group]
    if saved_sizes != built_sizes:
        raise ValueError(
            f"the checkpoint's param groups have sizes {saved_sizes} but the model gives {built_sizes} "
            f"({'Trainer decay/no-decay split' if weight_decay_split else 'one group'} of the "
            f"{len(trainable)} parameters with requires_grad=True). Freeze the same parameters as during "
            "training, pass decay_parameter_names= for a custom split, or weight_decay_split=False for an "
            "optimizer built from model.parameters()"
        )
    return names_per_group


def _unwrap_optimizer(optimizer: Any) -> Any:
    # AcceleratedOptimizer (and DeepSpeed/apex-style wrappers) keep the real optimizer in `.optimizer`; unwrap until
    # the innermost object, guarding against self-references.
    seen: set[int] = set()
    while not isinstance(optimizer, Mapping) and id(optimizer) not in seen:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        seen.add(id(optimizer))
        optimizer = inner
    return optimizer


def has_adam_state(optimizer: Any, moment: str = "exp_avg_sq") -> bool:
    """Whether ``optimizer`` (torch, accelerate-wrapped, or a :class:`NamedOptimizerState`) holds a non-empty
    ``moment`` tensor for at least one parameter, i.e. whether an Adam proposal would differ from isotropic."""
    inner = _unwrap_optimizer(optimizer)
    states = inner.values() if isinstance(inner, Mapping) else getattr(inner, "state", {}).values()
    return any(isinstance(st, Mapping) and isinstance(st.get(moment), torch.Tensor) and st[moment].numel() > 0
               for st in states)


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().to("cpu", torch.float64).reshape(-1)[0]) if value.numel() == 1 else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 keeps state as DTensors sharded like the parameter; full_tensor() is a collective, so under FSDP2 every
    # rank must call adam_scales together. Plain tensors pass through.
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _moment_estimate(
    entry: Mapping[str, Any] | None,
    hyper: Mapping[str, Any] | None,
    param_shape: tuple[int, ...],
    moment: str,
    name: str,
    bias_correction: bool = True,
) -> tuple[torch.Tensor | None, float | None, str]:
    """(bias-corrected moment in float64 shaped like the parameter, step, source) or (None, None, reason);
    ``bias_correction=False`` returns Adam's raw running average instead."""
    if not entry:
        return None, None, "no state"
    hyper = hyper or {}
    step = _as_float(entry.get("step"))
    betas = hyper.get("betas")
    numel = math.prod(param_shape)

    def corrected(t: torch.Tensor, beta: float | None) -> torch.Tensor:
        # To the CPU first: the result lives there anyway, and some devices (MPS) have no float64.
        t = _full(t.detach()).to("cpu", torch.float64)
        if t.numel() != numel:
            raise ValueError(
                f"optimizer state {moment!r} of parameter {name!r} has {t.numel()} entries but the parameter has "
                f"{numel} (shape {param_shape}); sharded or flattened optimizer states need their full tensors"
            )
        t = t.reshape(param_shape)
        if beta is None or not bias_correction:
            return t
        if step is None:
            raise ValueError(f"optimizer state of parameter {name!r} has {moment!r} but no 'step'")
        # Bias correction 1 − β^step (Kingma & Ba 2015, Algorithm 1). At step 0 the average holds no gradient yet
        # (it is 0, and 0/0 is undefined): that is "no information", i.e. ν̂ = 0 and the scale 1/η.
        if step <= 0:
            return torch.zeros_like(t)
        return t / (1.0 - float(beta) ** step)

    if moment == "exp_avg_sq":
        if isinstance(entry.get("exp_avg_sq"), torch.Tensor):
            beta2 = float(betas[1]) if betas is not None else None  # Adafactor's unfactored ν: no correction
            return corrected(entry["exp_avg_sq"], beta2), step, "adam" if betas is not None else "adafactor"
        row, col = entry.get("exp_avg_sq_row"), entry.get("exp_avg_sq_col")
        if isinstance(row, torch.Tensor) and isinstance(col, torch.Tensor):
            row = _full(row.detach()).to("cpu", torch.float64)
            col = _full(col.detach()).to("cpu", torch.float64)
            # Adafactor's rank-1 reconstruction ν_ij = row_i col_j / mean_i(row) (its _approx_sq_grad, squared⁻¹).
            mean = row.mean(dim=-1, keepdim=True)
            tiny = torch.finfo(torch.float64).tiny
            nu = row.unsqueeze(-1) * col.unsqueeze(-2) / mean.unsqueeze(-1).clamp_min(tiny)
            if tuple(nu.shape) != param_shape:
                raise ValueError(
                    f"Adafactor state of parameter {name!r} reconstructs to shape {tuple(nu.shape)}, but the "
                    f"parameter has shape {param_shape}"
                )
            return nu, step, "adafactor-factored"
        return None, None, "no second moment"
    # moment == "exp_avg": |m̂| = |exp_avg| / (1 − β1^step). Only for Adam-style groups: Adafactor's exp_avg averages
    # normalised updates, not gradients, so it is no estimate of |E g|.
    if isinstance(entry.get("exp_avg"), torch.Tensor) and betas is not None:
        return corrected(entry["exp_avg"], float(betas[0])).abs(), step, "adam"
    return None, None, "no first moment"


def adam_scales(
    optimizer: Any,
    named_params: Mapping[str, torch.Tensor],
    *,
    exponent: float = DEFAULT_ADAM_EXPONENT,
    eps: EpsSpec = DEFAULT_ADAM_EPS,
    moment: str = "exp_avg_sq",
    fallback: str = "mean",
    betas: tuple[float, float] | None = None,
    bias_correction: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-parameter proposal scales p = 1/(ν̂^γ + η) from Adam-style optimizer state (see the module docstring).

    Args:
        optimizer: a ``torch.optim.Optimizer`` (Adam, AdamW, ..., Adafactor), a wrapper with ``.optimizer`` such as
            accelerate's ``AcceleratedOptimizer``, a :class:`NamedOptimizerState`, or a plain mapping
            name → state dict (then ``betas`` is required, because bias correction needs β).
        named_params: ``{name: parameter}`` of the measured parameters (model order). A live optimizer is matched by
            parameter identity, named state by name.
        exponent: γ ≥ 0 (0.5 makes p ∝ ν̂^{-1/2} when ν̂^γ ≫ η, the diag(H)^{-1/2} ideal). Default
            ``DEFAULT_ADAM_EXPONENT``.
        eps: η: a float ≥ 0 in the units of ν̂^γ (gradient units for γ = 0.5), or
            :class:`~hfvolume.models.scales.RelativeEps` ``(r)`` for η = r · median(ν̂^γ) over the coordinates with
            state and ν̂ > 0 (fallback tensors do not count). Default ``DEFAULT_ADAM_EPS``. An effective η = 0 is
            allowed only if ν̂ > 0 everywhere (ValueError otherwise, since p would be infinite).
        moment: ``"exp_avg_sq"`` (ν̂ = exp_avg_sq / (1 − β2^step)) or ``"exp_avg"`` (|m̂| = |exp_avg| / (1 − β1^step)).
        fallback: scale for tensors without usable state: ``"mean"`` (geometric mean over the coordinates that have
            one; 1 if none) or ``"one"``. Counted in the description and announced with one ``warnings.warn``.
        betas: overrides/provides (β1, β2) for every parameter (required for a plain mapping).
        bias_correction: True (default): η is added to the bias-corrected ν̂. False: to Adam's raw running average
            ν = exp_avg_sq, as Scherlis & Belrose's research code does. ν = (1 − β2^step)·ν̂ (0.33·ν̂ at step 400
            with β2 = 0.999), so with an absolute η (their 1e-5) the two give different proposals: use False to
            reproduce their settings literally. With a relative η the factor cancels and both give one proposal.
        dtype: dtype of the returned tensors (computation is float64).

    Returns:
        ``(scales, info)``: ``scales[name]`` a CPU tensor shaped like ``named_params[name]``, positive and finite;
        ``info`` a JSON-safe description ``{"name": "adam" | "adam-m", "exponent", "eps", "eps_relative",
        "eps_reference", "moment", "fallback", "step", "n_tensors", "n_fallback_tensors", "n_adafactor_tensors"}``
        where ``eps`` is the absolute η used, ``eps_relative``/``eps_reference`` the factor r and median(ν̂^γ) of a
        relative η (None for an absolute one), ``step`` is the single step seen
        (int), the sorted distinct steps (list) when they differ, or None when no tensor had state.
    """
    exponent, eps = check_scale_settings(exponent, eps)
    check_choice("moment", moment, MOMENTS)
    check_choice("fallback", fallback, FALLBACKS)
    _check_named_params(named_params)
    betas = _check_betas(betas)
    check_bool("bias_correction", bias_correction)
    found = _collect_moments(_state_lookup(optimizer, named_params, betas), named_params, moment, betas,
                             bias_correction)

    eta, eps_info = resolve_eps(eps, (m for m in found.moments.values() if m is not None), exponent)
    raw: dict[str, torch.Tensor | None] = {}
    for name in list(found.moments):
        m = found.moments.pop(name)  # release each float64 moment as soon as its scales exist: peak ≈ one copy
        raw[name] = None if m is None else inverse_power_scale(m, exponent, eta, name=name)

    n_fallback = sum(len(v) for v in found.reasons.values())
    if n_fallback:
        detail = "; ".join(f"{why}: {len(names)} (e.g. {names[0]!r})" for why, names in sorted(found.reasons.items()))
        warnings.warn(
            f"adam_scales: {n_fallback} of {len(named_params)} parameter tensors have no usable optimizer "
            f"{moment} ({detail}); they get the {fallback!r} fallback scale",
            stacklevel=2,
        )
    scales = _fill_fallback(raw, named_params, fallback, dtype)
    info: dict[str, Any] = {
        "name": "adam" if moment == "exp_avg_sq" else "adam-m",
        "exponent": exponent,
        **eps_info,
        "moment": moment,
        "bias_correction": bias_correction,
        "fallback": fallback,
        "step": found.step_info(),
        "n_tensors": len(named_params),
        "n_fallback_tensors": n_fallback,
        "n_adafactor_tensors": found.n_adafactor,
    }
    return scales, info


def _check_named_params(named_params: Any) -> None:
    if not isinstance(named_params, Mapping):
        raise TypeError(f"named_params must be a mapping name → parameter, got {type(named_params).__name__}")
    for name, p in named_params.items():
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"named_params[{name!r}] must be a tensor, got {type(p).__name__}")


def _check_betas(betas: Any) -> tuple[float, float] | None:
    """(β1, β2) as floats in [0, 1), or None."""
    if betas is None:
        return None
    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return check_fraction("betas[0]", betas[0], open_high=True), check_fraction("betas[1]", betas[1], open_high=True)


_Lookup = dict[str, tuple[Union[Mapping[str, Any], None], Union[Mapping[str, Any], None]]]


def _state_lookup(optimizer: Any, named_params: Mapping[str, torch.Tensor], betas: tuple[float, float] | None
                  ) -> _Lookup:
    """For each name, its per-parameter state entry and its param-group hyperparameters (None when absent)."""
    lookup: _Lookup = {}
    opt = _unwrap_optimizer(optimizer)
    if isinstance(opt, torch.optim.Optimizer):
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        for name, p in named_params.items():
            # .get: torch optimizers keep state in a defaultdict; indexing would insert empty entries.
            lookup[name] = (opt.state.get(p), group_of.get(id(p)))
    elif isinstance(opt, NamedOptimizerState):
        for name in named_params:
            lookup[name] = (opt.get(name), opt.hyperparameters.get(name))
    elif isinstance(opt, Mapping) and not ("state" in opt and "param_groups" in opt):
        if betas is None:
            raise ValueError("a plain mapping name → state has no betas for bias correction; pass betas=(β1, β2)")
        for name in named_params:
            lookup[name] = (opt.get(name), None)
    elif isinstance(opt, Mapping):
        raise TypeError(
            "got a raw optimizer state_dict (integer-indexed); name it first with "
            "NamedOptimizerState.from_state_dict(state_dict, names_per_group) or optimizer_state_from_checkpoint"
        )
    else:
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, a wrapper with .optimizer (accelerate's "
            f"AcceleratedOptimizer), or a NamedOptimizerState; got {type(optimizer).__name__}"
        )
    return lookup


@dataclass
class _Moments:
    """The moment estimate per name (None: no usable state), and what was seen while reading them."""

    moments: dict[str, torch.Tensor | None] = field(default_factory=dict)
    steps: set[int] = field(default_factory=set)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # why a name has no moment → names
    n_adafactor: int = 0

    def step_info(self) -> int | list[int] | None:
        """The single step seen, the sorted distinct steps when they differ, or None when no tensor had state."""
        if len(self.steps) == 1:
            return next(iter(self.steps))
        return sorted(self.steps) if self.steps else None


def _collect_moments(lookup: _Lookup, named_params: Mapping[str, torch.Tensor], moment: str,
                     betas: tuple[float, float] | None, bias_correction: bool = True) -> _Moments:
    found = _Moments()
    for name, p in named_params.items():
        entry, group = lookup[name]
        hyper = dict(group or {})
        if betas is not None:
            hyper["betas"] = betas
        m, step, source = _moment_estimate(entry, hyper, tuple(p.shape), moment, name, bias_correction)
        found.moments[name] = m
        if m is None:
            found.reasons.setdefault(source, []).append(name)
            continue
        found.n_adafactor += source.startswith("adafactor")
        if step is not None:
            found.steps.add(int(step))
    return found


__all__ = [
    "DEFAULT_ADAM_EPS",
    "DEFAULT_ADAM_EXPONENT",
    "NamedOptimizerState",
    "adam_scales",
    "has_adam_state",
    "optimizer_state_from_checkpoint",
    "trainer_decay_parameter_names",
]
