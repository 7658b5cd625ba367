"""``estimate_local_volume``: the local volume of a torch / Hugging Face model on some data.

This is the model-facing layer over :func:`hfvolume.estimate_log_volume`: it picks the measured parameters
(:mod:`hfvolume.params`), turns (model, data) into a batched behaviour (:mod:`hfvolume.behaviors`), resolves the
prior and proposal, and guarantees that the model and the caller's random state are left exactly as they were.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
from torch import nn

from hfvolume.behaviors import ModelBehavior, smallest_relative_step
from hfvolume.distributed import is_main_process, main_process_logging, refuse_sharded_parameters, resolve_sharding
from hfvolume.estimator import estimate_log_volume, perturbation_dtype
from hfvolume.params import ParameterView, rms
from hfvolume.priors import GaussianPrior, UniformPrior
from hfvolume.results import VolumeResult
from hfvolume.sharded_behavior import FSDPCoordinates, ShardedModelBehavior, ShardedParameterView, fsdp_modules, reshard

logger = logging.getLogger("hfvolume")

SigmaSpec = Union[None, str, float, Mapping[str, float], torch.Tensor]
PriorMeanSpec = Union[None, Mapping[str, torch.Tensor], nn.Module, torch.Tensor]
PreconditionerSpec = Union[None, str, Mapping[str, Any], torch.Tensor]
# Lockstep width K: the two [K, D] buffers (directions, perturbed points) plus K rows of vmapped activations stay
# under working_memory (default 32 MiB), K ≤ 64. Measured on CPU (digits MLP, 64 directions, after the pilot
# directions the other 60 in one lockstep batch or two): 801 / 884 / 1042 dirs/s at K = 16 / 32 / 64 with one
# thread, 955 / 1057 / 1184 with two. Models whose single direction needs more than half of the budget are
# evaluated one direction at a time in place: a vmapped pass of one row only adds copies (tiny GPT-NeoX, 1.3M
# parameters: 7.2 dirs/s in place against 5.9 through vmap).
DEFAULT_BATCH_BYTES = 32 * 2**20
MAX_DIRECTIONS_PER_BATCH = 64


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode and restore the train/eval flags of every submodule and all global RNG states.

    The RNG states (torch CPU and CUDA, Python ``random``, numpy) are restored even though the estimator draws
    only from private generators, because user code run inside (a DataLoader's sampler, a custom behaviour)
    may not.
    """
    modes = {name: m.training for name, m in model.named_modules()}
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]
        random.setstate(py_state)
        np.random.set_state(np_state)


def _resolve_sigma(sigma: SigmaSpec, view: ParameterView) -> Union[float, torch.Tensor, None]:
    if sigma is None or (isinstance(sigma, str) and sigma == "rms"):
        return None  # GaussianPrior takes the RMS of the anchor itself
    if isinstance(sigma, str):
        raise ValueError(f"unknown sigma {sigma!r}: use a float, 'rms', a mapping name → float, or a [D] tensor")
    if isinstance(sigma, Mapping):
        return view.expand_per_tensor(sigma)
    if isinstance(sigma, torch.Tensor):
        return sigma
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return float(sigma)
    raise TypeError(f"sigma must be None, 'rms', a float, a mapping or a tensor, got {type(sigma).__name__}")


def _resolve_prior_mean(prior_mean: PriorMeanSpec, view: ParameterView) -> torch.Tensor | None:
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


PRECONDITIONERS = ("adam", "adam-m", "fisher")
_ADAM_OPTIONS = {"exponent", "eps", "fallback", "betas"}
_FISHER_OPTIONS = {"exponent", "eps", "n_samples", "damping", "max_batches", "method"}


def _named_parameters(model: nn.Module, view: ParameterView) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name] for name in view.names}


def _check_options(kind: str, options: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown preconditioner_options {sorted(unknown)} for {kind!r}; allowed: {sorted(allowed)}")


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
    """Proposal scales ``[D]`` (or None for isotropic) and a JSON-safe description of where they came from.

    ``"adam"`` / ``"adam-m"``: p = 1/(ν̂^γ + η) from ``optimizer`` (a live torch optimizer, accelerate's wrapper,
    or a Trainer ``checkpoint-N`` directory holding ``optimizer.pt``). ``"fisher"``: p = 1/(F^γ + η) from the
    diagonal Fisher on the behaviour's batches, labels sampled from the model (ESTIMATOR.md §2).
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
            _check_options(preconditioner, options, _ADAM_OPTIONS)
            if optimizer is None:
                raise ValueError(f"preconditioner={preconditioner!r} needs optimizer= (a torch optimizer or a "
                                 "Trainer checkpoint directory with optimizer.pt)")
            from hfvolume.optim_state import adam_scales, optimizer_state_from_checkpoint

            source = optimizer
            if isinstance(optimizer, (str, os.PathLike)):
                source = optimizer_state_from_checkpoint(optimizer, model)
            moment = "exp_avg" if preconditioner == "adam-m" else "exp_avg_sq"
            scales, info = adam_scales(source, named, moment=moment, **options)
        else:
            _check_options(preconditioner, options, _FISHER_OPTIONS)
            if behavior is None:
                raise ValueError("preconditioner='fisher' needs the evaluation batches")
            from hfvolume.fisher import fisher_diagonal, fisher_scales

            scale_kw = {k: options.pop(k) for k in ("exponent", "eps") if k in options}
            fisher = fisher_diagonal(model, behavior.raw_batches, named, seed=seed, **options)
            scales, info = fisher_scales(fisher, **scale_kw)
            info = {**info, **{k: v for k, v in options.items() if isinstance(v, (int, float, str))}}
        return view.flatten(scales, dtype=torch.float64), info
    if options:
        raise ValueError("preconditioner_options only apply to 'adam', 'adam-m' and 'fisher'")
    if isinstance(preconditioner, torch.Tensor):
        return preconditioner.reshape(-1), {"name": "scales"}
    if isinstance(preconditioner, Mapping):
        values = dict(preconditioner)
        if all(isinstance(v, (int, float)) for v in values.values()):
            return view.expand_per_tensor(values), {"name": "per-tensor scales"}
        return view.flatten({n: torch.as_tensor(v) for n, v in values.items()}, dtype=torch.float64), {
            "name": "per-parameter scales"
        }
    raise TypeError(f"preconditioner must be None, a name, a mapping or a tensor, got {type(preconditioner).__name__}")


def _check_precision(view: ParameterView, result: VolumeResult, anchor: torch.Tensor) -> None:
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


def estimate_local_volume(
    model: nn.Module,
    data: Union[Iterable[Any], Any],
    *,
    behavior: Union[str, Callable[..., torch.Tensor]] = "kl",
    cutoff: float = 1e-2,
    prior: Union[str, GaussianPrior, UniformPrior] = "gaussian",
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
    """Estimate the local volume of ``model`` around its current weights, on ``data`` (ESTIMATOR.md).

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
        preconditioner: proposal scales: None (isotropic), a mapping name → tensor of per-coordinate scales or
            name → float, or a ``[D]`` tensor.
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
            models (see benchmarks/bench_models.py). Changes which code path computes Δ, so results can
            differ in the last bits between settings.
        anchor_cache: where the anchor's outputs are kept: "auto", "device", "cpu" or "recompute".
        progress: show a progress bar (on rank 0 only in a multi-process run).
        distributed: None (default): inside an initialised Accelerate / torch.distributed group of N > 1
            processes, split the directions across them (every rank must call this with the same arguments; all
            get the same result, identical to one process's); refuses to run when the launcher started N
            independent single-process runs (:func:`hfvolume.distributed.check_launch`). True: require a group.
            False: ignore any group (each process computes the whole estimate).
            FSDP2 models (``fully_shard``, Accelerate's FSDP v2) are measured on their own process group whatever
            this says: every rank evaluates every direction on its own shards (:mod:`hfvolume.sharded_behavior`);
            the result equals the unsharded model's up to float rounding. ``[D]`` tensors for ``sigma``,
            ``prior_mean`` or ``preconditioner`` are then the global vectors; "fisher" is not supported, and
            DeepSpeed ZeRO-3 models are refused (NotImplementedError).

    Returns:
        :class:`VolumeResult`; ``settings`` records the behaviour, data size, parameters and every knob.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(working_memory, bool) or not isinstance(working_memory, int) or working_memory < 0:
        raise ValueError(f"working_memory must be a non-negative int (bytes), got {working_memory!r}")
    if directions_per_batch is not None and (
        isinstance(directions_per_batch, bool) or not isinstance(directions_per_batch, int) or directions_per_batch < 1
    ):
        raise ValueError(f"directions_per_batch must be a positive int or None, got {directions_per_batch!r}")
    if isinstance(prior, GaussianPrior) and (sigma is not None or prior_mean is not None):
        raise ValueError("pass sigma/prior_mean either inside GaussianPrior(...) or as arguments, not both")
    fsdp = bool(fsdp_modules(model))
    coordinates: FSDPCoordinates | None = None
    if fsdp:
        # Every rank works on every direction with its own shards (hfvolume.sharded_behavior); the directions
        # are not split, whatever `distributed` says: the model's own process group is the one used.
        sharding = None
        reshard(model)
        global_view = ParameterView.from_model(model, params)
        coordinates = FSDPCoordinates.from_model(model, global_view)
        view: ParameterView = ShardedParameterView.from_global(global_view, coordinates)
        sigma, prior_mean, preconditioner = (
            coordinates.take(x) if isinstance(x, torch.Tensor) and x.numel() == coordinates.n_params > view.n_params
            else x for x in (sigma, prior_mean, preconditioner)
        )
        if isinstance(preconditioner, str) and preconditioner == "fisher":
            raise NotImplementedError("preconditioner='fisher' is not supported for FSDP2-sharded models yet")
    else:
        refuse_sharded_parameters(model)
        sharding = resolve_sharding(distributed)
        view = ParameterView.from_model(model, params)
    # Every rank computes the same result: its warnings are rank 0's, so only rank 0 logs them.
    quiet_ranks = main_process_logging() if sharding is not None or fsdp else contextlib.nullcontext()
    with quiet_ranks, preserved_state(model):
        # vmap only when at least two directions' working sets (each its [D] direction and perturbed point, and its
        # activations) fit in working_memory: a pass of one row only adds vmap's own copies of the weights, while
        # the per-row loop evaluates in place (no points buffer; measured on all-MiniLM-L6-v2, 1 thread: 0.040 s
        # per row against 0.070 s through vmap; tiny GPT-NeoX: 7.2 against 5.9 directions/s). The behaviour
        # decides from the model and data only, never from directions_per_batch: the path decides the bits of
        # each row's values, and those must not depend on how directions are batched.
        direction_bytes = 2 * view.n_params * perturbation_dtype(view.dtype).itemsize
        extra_kw = {} if fsdp else {
            "use_vmap": 2 * direction_bytes <= working_memory, "vmap_row_bytes_limit": working_memory // 2,
        }
        fn = (ShardedModelBehavior if fsdp else ModelBehavior)(
            model, data, view, behavior=behavior, max_batches=max_batches, max_examples=max_examples,
            anchor_cache=anchor_cache, collate_fn=collate_fn, batch_size=batch_size, **extra_kw,
        )
        # The behaviour's own copy of θ0 (already in the perturbation dtype): a second D-sized copy would only
        # cost memory, and its in-place path recognises its anchor.
        anchor = view.flatten(model) if fsdp else fn.anchor
        if isinstance(prior, str) and prior.lower() == "gaussian":
            prior = GaussianPrior(sigma=_resolve_sigma(sigma, view), mean=_resolve_prior_mean(prior_mean, view))
        elif sigma is not None or prior_mean is not None:
            raise ValueError(f"sigma and prior_mean apply to the Gaussian prior only, not to prior={prior!r}")
        scales, proposal_info = resolve_preconditioner(
            preconditioner, view, model=model, optimizer=optimizer, behavior=fn, seed=seed,
            options=preconditioner_options,
        )
        if directions_per_batch is None:
            if fn.path == "vmap":
                # Per lockstep direction: its [D] direction and perturbed point, plus the activations of its row in
                # a vmapped pass (the behaviour's per-row estimate): the whole working set stays under
                # working_memory for any n_directions.
                row_bytes = direction_bytes + int(fn.describe()["row_bytes_estimate"])
                directions_per_batch = int(max(1, min(MAX_DIRECTIONS_PER_BATCH, working_memory // max(row_bytes, 1))))
            else:
                # In place, one direction at a time: its [D] vector is the only D-sized buffer beyond the anchor
                # copy (more directions in lockstep would only save the per-batch prior arithmetic, ~1 ms).
                directions_per_batch = 1
        result = estimate_log_volume(
            fn,
            anchor,
            cutoff=cutoff,
            prior=prior,
            n_directions=n_directions,
            scales=scales,
            mixture=mixture,
            seed=seed,
            rtol=rtol,
            batch_size=directions_per_batch,
            batched=True,
            radius_method=radius_method,  # type: ignore[arg-type]
            # FSDP2: every rank evaluates every direction (no split), so the estimator would show a bar on each.
            progress=progress and (not fsdp or is_main_process()),
            proposal_info=proposal_info,
            extra_settings={"behavior": fn.describe(), "parameters": view.describe(), "working_memory": working_memory},
            sharding=sharding,
            coordinates=coordinates,
        )
        _check_precision(view, result, anchor)
    return result


__all__ = ["estimate_local_volume", "preserved_state", "resolve_preconditioner"]
