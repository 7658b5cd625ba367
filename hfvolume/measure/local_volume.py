"""``estimate_local_volume``: the local volume of a torch / Hugging Face model on some data.

The model-facing entry point over :func:`hfvolume.volume.estimator.estimate_log_volume`. In order: decide where the
coordinates and directions live (:mod:`hfvolume.measure.layout`), turn (model, data) into a batched behaviour
(:mod:`hfvolume.models.behavior`, or the FSDP2 one), resolve the prior and the proposal
(:mod:`hfvolume.measure.options`), choose how many directions to search in lockstep, and run the core; all of it
inside :func:`hfvolume.models.state.preserved_state`, so the model and the caller's random state are left exactly
as they were.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping, Union

import numpy as np
import torch
from torch import nn

from hfvolume.measure.layout import Layout, resolve_layout
from hfvolume.measure.options import (
    PreconditionerSpec,
    PriorMeanSpec,
    PriorSpec,
    SigmaSpec,
    check_prior_arguments,
    resolve_curvature_proposal,
    resolve_preconditioner,
    resolve_prior,
)
from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.params import ParameterView, rms, smallest_relative_step
from hfvolume.models.state import preserved_state
from hfvolume.parallel.distributed import is_main_process
from hfvolume.parallel.fsdp import ShardedModelBehavior
from hfvolume.volume.checks import check_int, check_optional_int
from hfvolume.volume.estimator import estimate_log_volume, perturbation_dtype
from hfvolume.volume.results import VolumeResult
from hfvolume.volume.tilted import CurvatureProposal

logger = logging.getLogger("hfvolume")

# Default scratch for evaluating directions together (their [K, D] directions and perturbed points, and K rows of
# vmapped activations); directions searched in lockstep are capped at MAX_DIRECTIONS_PER_BATCH. The README's speed
# table (scripts/benchmarks/bench_models.py) shows what these choices cost and save.
DEFAULT_BATCH_BYTES = 32 * 2**20
MAX_DIRECTIONS_PER_BATCH = 64


def _direction_bytes(view: ParameterView) -> int:
    """Bytes of one lockstep direction's two [D] rows: the direction and its perturbed point."""
    return 2 * view.n_params * perturbation_dtype(view.dtype).itemsize


def _build_behavior(model: nn.Module, data: Any, layout: Layout, *, working_memory: int, **kwargs: Any) -> Any:
    """The behaviour Δ on the materialised data. vmap is allowed only when two directions' working sets fit in
    ``working_memory``: a vmapped pass of one row only adds vmap's copies of the weights, while the per-row loop
    evaluates in place. The choice depends on the model and data only, never on ``directions_per_batch``, because
    the path decides the last bits of each row's value and those must not depend on how directions are batched."""
    if layout.fsdp:
        return ShardedModelBehavior(model, data, layout.view, **kwargs)
    budget = {"use_vmap": 2 * _direction_bytes(layout.view) <= working_memory,
              "vmap_row_bytes_limit": working_memory // 2}
    return ModelBehavior(model, data, layout.view, **kwargs, **budget)


def _directions_per_batch(fn: Any, view: ParameterView, working_memory: int) -> int:
    """Rays searched in lockstep. On the vmap path each costs its [D] direction and perturbed point plus its row of
    activations, so the whole working set stays under ``working_memory`` for any n_directions. In place, one
    direction at a time: its [D] vector is the only D-sized buffer beyond the anchor copy."""
    if fn.path != "vmap":
        return 1
    row_bytes = _direction_bytes(view) + int(fn.describe()["row_bytes_estimate"])
    return int(max(1, min(MAX_DIRECTIONS_PER_BATCH, working_memory // max(row_bytes, 1))))


def _check_precision(view: ParameterView, result: VolumeResult, anchor: torch.Tensor) -> None:
    """Warn when typical perturbations fall below the resolution of low-precision (bf16/fp16) parameters."""
    resolution = smallest_relative_step(view)
    if resolution <= torch.finfo(torch.float32).eps:
        return
    radii = [r for r, f in zip(result.radii, result.flags) if f == "converged" and r > 0]
    if not radii:
        return
    per_coord = float(np.median(radii)) / math.sqrt(result.n_params)
    scale = resolution * rms(anchor)
    if per_coord < scale:
        logger.warning(
            "typical perturbation per coordinate (%.3g) is below the resolution of the model's low-precision "
            "parameters at the weights' scale (%.3g): perturbations partly vanish when cast; use a larger cutoff "
            "or a float32 copy of the model",
            per_coord, scale,
        )


@dataclasses.dataclass(frozen=True)
class _ProposalInputs:
    """The core's proposal arguments: diagonal ``scales`` (with ``mixture``) or a curvature ``proposal``, and the
    forward passes spent building the latter."""

    scales: torch.Tensor | None
    info: dict[str, Any] | None
    mixture: float
    proposal: CurvatureProposal | None = None
    forward_passes: int = 0
    wall_time_s: float = 0.0


def _proposal_inputs(preconditioner: PreconditionerSpec, view: ParameterView, *, model: nn.Module, fn: Any,
                     optimizer: Any, mixture: float, cutoff: float, seed: int,
                     options: Mapping[str, Any] | None) -> _ProposalInputs:
    """``"ggn"`` builds the curvature proposal (the mixture goes inside it), a prebuilt one is used as given (its
    cost was paid when it was built); everything else gives scales."""
    if isinstance(preconditioner, CurvatureProposal):
        if options or mixture:
            raise ValueError("a prebuilt CurvatureProposal carries its own options and mixture: leave "
                             "preconditioner_options and mixture unset")
        return _ProposalInputs(None, None, 0.0, preconditioner)
    if isinstance(preconditioner, str) and preconditioner == "ggn":
        begin = time.perf_counter()
        proposal, passes = resolve_curvature_proposal(view, model=model, behavior=fn, cutoff=cutoff, mixture=mixture,
                                                      optimizer=optimizer, seed=seed, options=options)
        return _ProposalInputs(None, None, 0.0, proposal, passes, time.perf_counter() - begin)
    scales, info = resolve_preconditioner(preconditioner, view, model=model, optimizer=optimizer, behavior=fn,
                                          seed=seed, options=options)
    return _ProposalInputs(scales, info, mixture)


def estimate_local_volume(
    model: nn.Module,
    data: Union[Iterable[Any], Any],
    *,
    behavior: Union[str, Callable[..., torch.Tensor]] = "kl",
    cutoff: float = 1e-2,
    prior: PriorSpec = "gaussian",
    sigma: SigmaSpec = None,
    prior_mean: PriorMeanSpec = None,
    n_directions: int = 64,
    preconditioner: PreconditionerSpec = None,
    optimizer: Any = None,
    mixture: float = 0.0,
    params: Union[str, Iterable[str], Callable[[str, nn.Parameter], bool]] = "trainable",
    seed: int = 0,
    rtol: float = 1e-2,
    radius_method: str = "secant",
    directions_per_batch: int | None = None,
    working_memory: int = DEFAULT_BATCH_BYTES,
    max_batches: int | None = None,
    max_examples: int | None = None,
    collate_fn: Callable[..., Any] | None = None,
    batch_size: int | None = None,
    anchor_cache: str = "auto",
    progress: bool = True,
    preconditioner_options: Mapping[str, Any] | None = None,
    distributed: bool | None = None,
) -> VolumeResult:
    """Estimate the local volume of ``model`` around its current weights, on ``data``.

    The local volume is the prior mass of the star-shaped region {θ0 + t·w : t < ρ(w)} around θ0 where the
    behaviour stays within ``cutoff`` of the anchor's (Scherlis & Belrose, arXiv 2501.18812, §3); its negative in
    bits is the network's information content.

    Args:
        model: any ``torch.nn.Module``; Hugging Face outputs are read from ``.logits`` (KL), ``.loss`` (loss) or
            ``.last_hidden_state`` (output distance). Left bit-for-bit unchanged, in its original train/eval mode.
        data: a DataLoader, an iterable of batches (dicts → keyword arguments, tuples → positional), or a
            ``datasets.Dataset`` (with ``collate_fn`` and ``batch_size``). All of it is evaluated unless
            ``max_batches`` / ``max_examples`` limit it; batches are materialised once.
        behavior: "kl" (mean KL(anchor ‖ perturbed) over scored positions, nats), "loss" (the model's loss minus
            the anchor's), "output" (mean squared output distance), or a callable ``(outputs, batch) -> scalar``.
        cutoff: ε, in the behaviour's units (nats for KL).
        prior: "gaussian" or "uniform" or an instance; with a :class:`GaussianPrior` instance leave ``sigma``
            and ``prior_mean`` unset.
        sigma: Gaussian σ: None/"rms" (RMS of the measured parameters), a float, a mapping name → σ (per
            tensor), or a ``[D]`` tensor.
        prior_mean: None (origin), a state dict / model whose parameters are the centre (e.g. the base model of
            a fine-tune: the result then measures the information the fine-tune added), or a ``[D]`` tensor.
        n_directions: number of directions.
        preconditioner: the proposal: None (isotropic), "adam" / "adam-m" (optimizer state), "fisher" (diagonal
            Fisher), "ggn" (the prior tilted by the behaviour's Gauss–Newton curvature, low rank plus a floor
            measured on pilot rays: :class:`hfvolume.volume.tilted.CurvatureProposal`; the curvature's forward
            passes are added to the result's, and its rank, floor and tilt are in ``settings["proposal"]``), a
            mapping name → tensor of per-coordinate scales or name → float, a ``[D]`` tensor, or a prebuilt
            :class:`~hfvolume.volume.tilted.CurvatureProposal` (e.g. from
            :func:`hfvolume.measure.options.resolve_curvature_proposal`, reused across seeds; its cost is not
            counted again).
        optimizer: the training optimizer, for optimizer-state proposals.
        mixture: defensive-mixture fraction α of isotropic directions.
        params: "trainable" (default: parameters with ``requires_grad``), "all", a list of names, or a predicate.
        seed: direction i depends only on (seed, i).
        rtol: radius tolerance, relative to the cutoff.
        directions_per_batch: rays searched in lockstep; None chooses from ``working_memory`` (at most 64; 1 when
            directions are evaluated in place, so that one [D] direction is the only buffer beyond the anchor copy).
        working_memory: bytes of scratch for evaluating directions together (default 32 MiB): their ``[K, D]``
            directions and perturbed points and K rows of vmapped activations. When two directions' shares do
            not fit, directions are evaluated one at a time, written into the model's parameters in place
            (restored bit for bit from the anchor copy). 0 gives the least memory — the anchor copy and one
            direction, 2 × the measured parameters' bytes, plus the anchor cache — at a speed cost on small
            models (see scripts/benchmarks/bench_models.py). Changes which code path computes Δ, so results can
            differ in the last bits between settings.
        anchor_cache: where the anchor's outputs are kept: "auto", "device", "cpu" or "recompute".
        progress: show a progress bar (on rank 0 only in a multi-process run).
        distributed: None (default): inside an initialised Accelerate / torch.distributed group of N > 1
            processes, split the directions across them (every rank must call this with the same arguments; all
            get the same result, identical to one process's); refuses to run when the launcher started N
            independent single-process runs (:func:`hfvolume.parallel.distributed.check_launch`). True: require a group.
            False: ignore any group (each process computes the whole estimate).
            FSDP2 models (``fully_shard``, Accelerate's FSDP v2) are measured on their own process group whatever
            this says: every rank evaluates every direction on its own shards (:mod:`hfvolume.parallel.fsdp`);
            the result equals the unsharded model's up to float rounding. ``[D]`` tensors for ``sigma``,
            ``prior_mean`` or ``preconditioner`` are then the global vectors; "fisher" is not supported, and
            DeepSpeed ZeRO-3 models are refused (NotImplementedError).

    Returns:
        :class:`VolumeResult`; ``settings`` records the behaviour, data size, parameters and every knob.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    working_memory = check_int("working_memory", working_memory, minimum=0, wrong_type=ValueError)
    directions_per_batch = check_optional_int("directions_per_batch", directions_per_batch, wrong_type=ValueError)
    check_prior_arguments(prior, sigma, prior_mean)
    layout = resolve_layout(model, params, distributed)
    sigma, prior_mean, preconditioner = (layout.local(x) for x in (sigma, prior_mean, preconditioner))
    if layout.fsdp and isinstance(preconditioner, str) and preconditioner == "fisher":
        raise NotImplementedError("preconditioner='fisher' is not supported for FSDP2-sharded models yet")
    if layout.fsdp and isinstance(preconditioner, str) and preconditioner == "ggn":
        raise NotImplementedError("preconditioner='ggn' is not supported for FSDP2-sharded models; use "
                                  "preconditioner='adam' (a diagonal proposal) instead")
    view = layout.view
    with layout.quiet_ranks(), preserved_state(model):
        fn = _build_behavior(model, data, layout, working_memory=working_memory, behavior=behavior,
                             max_batches=max_batches, max_examples=max_examples, anchor_cache=anchor_cache,
                             collate_fn=collate_fn, batch_size=batch_size)
        # The behaviour's own copy of θ0 (already in the perturbation dtype): a second D-sized copy would only
        # cost memory, and its in-place path recognises its anchor.
        anchor = view.flatten(model) if layout.fsdp else fn.anchor
        resolved_prior = resolve_prior(prior, sigma, prior_mean, view)
        chosen = _proposal_inputs(preconditioner, view, model=model, fn=fn, optimizer=optimizer, mixture=mixture,
                                  cutoff=cutoff, seed=seed, options=preconditioner_options)
        result = estimate_log_volume(
            fn, anchor, cutoff=cutoff, prior=resolved_prior, n_directions=n_directions, scales=chosen.scales,
            mixture=chosen.mixture, proposal=chosen.proposal, seed=seed, rtol=rtol, batched=True,
            radius_method=radius_method,  # type: ignore[arg-type]
            batch_size=directions_per_batch or _directions_per_batch(fn, view, working_memory),
            # FSDP2: every rank evaluates every direction (no split), so the estimator would show a bar on each.
            progress=progress and (not layout.fsdp or is_main_process()),
            proposal_info=chosen.info,
            extra_settings={"behavior": fn.describe(), "parameters": view.describe(), "working_memory": working_memory},
            sharding=layout.sharding,
            coordinates=layout.coordinates,
        )
        _check_precision(view, result, anchor)
    if chosen.forward_passes:
        # Every rank built the same curvature: the result's forward passes are summed over ranks.
        ranks = 1 if layout.sharding is None else layout.sharding.world_size
        result = dataclasses.replace(result, forward_passes=result.forward_passes + ranks * chosen.forward_passes,
                                     wall_time_s=result.wall_time_s + chosen.wall_time_s)
    return result


__all__ = ["DEFAULT_BATCH_BYTES", "MAX_DIRECTIONS_PER_BATCH", "estimate_local_volume"]
