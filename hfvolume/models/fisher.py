"""Diagonal Fisher information on the eval inputs, for importance-sampling scales.

For a KL neighbourhood Δ(θ) = mean over scored positions of KL(p_θ0(·|x) ‖ p_θ(·|x)), the Hessian at θ0 is the
Fisher information of the model's predictive distribution on those positions,

    F = (1/N) Σ_n E_{y ~ p_θ0(·|x_n)}[ s_n(y) s_n(y)ᵀ ],   s_n(y) = ∇_θ log p_θ(y | x_n),

so the ideal diagonal proposal is p ∝ diag(F)^{-1/2} (:mod:`hfvolume.models.scales`, after the importance sampling
of Scherlis & Belrose 2025, arXiv 2501.18812, with F in place of Adam's second moment). We estimate diag F by Monte
Carlo with labels y **sampled from the model** (not the data labels, which would give the "empirical Fisher", a
different matrix away from a perfect fit): E[s_n(y)²] is exactly diag F_n, so the average of squared per-example
scores is unbiased.

Per example, not per batch: (Σ_n s_n)² ≠ Σ_n s_n². The square of a summed batch score is still unbiased here (the
cross terms have mean 0 because each score has mean 0 and the examples' labels are drawn independently) but its
variance grows with the batch size, and with data labels it would be biased. So the batch is never summed
before squaring; every example gets its own gradient (``torch.func.vmap`` over ``grad``, or a loop when the
model's forward cannot be vmapped, as with Hugging Face models whose mask code branches on tensor values).

Sequences (logits ``[B, T, V]``): a label y_t is sampled independently at every scored position t (teacher
forcing: the inputs stay the real tokens), and the squared gradient of the *sequence* score Σ_t s_t is used:
E[(Σ_t s_t)²] = Σ_t E[s_t²] because E[s_t s_t'] = E[s_t] E[s_t'] = 0 for t ≠ t' (independent labels, zero-mean
scores). Dividing the total by the number of scored positions therefore gives an unbiased estimate of the mean
per-position Fisher — the Hessian of the per-position-mean KL — at the cost of one gradient per sequence instead
of one per position (a per-position gradient would need T backward passes per sequence). The price is extra
variance from the zero-mean cross terms, which averages out over sequences and samples.

Everything is done with substitute leaf tensors through ``torch.func.functional_call``: the model's parameters,
their ``.grad`` and ``requires_grad`` are never touched; the model is put in eval mode (no dropout: the Fisher of
the deterministic predictive distribution) and every module's mode is restored afterwards; labels come from a
private ``torch.Generator`` and the global random states are restored as a guard against models that draw
randomness (:mod:`hfvolume.models.state`; of the CUDA generators, those of the model's devices).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from hfvolume.models.batches import map_batch, split_batch, to_device
from hfvolume.models.outputs import is_causal_lm, is_encoder_decoder, logits_of, scored_position_mask
from hfvolume.models.scales import (
    DEFAULT_EPS,
    DEFAULT_EXPONENT,
    EpsSpec,
    check_scale_settings,
    inverse_power_scale,
    resolve_eps,
)
from hfvolume.models.state import cuda_devices_of, preserved_modes, preserved_rng
from hfvolume.volume.checks import check_choice, check_int, check_nonnegative, check_optional_int

logger = logging.getLogger("hfvolume")

METHODS = ("auto", "vmap", "loop")
LABEL_KEYS = ("labels", "shift_labels")  # dropped from dict batches before the forward
DEFAULT_CHUNK_ELEMENTS = 1 << 25  # per-example gradients held at once: chunk · D ≤ this (float32 → 128 MiB)
# Classifiers with at most this many classes get the exact expectation over classes by default (C gradients per
# example instead of one sampled label); language models (vocabularies of thousands) keep sampling.
EXACT_MAX_CLASSES = 64
# Defaults of fisher_scales (see hfvolume.models.scales). The floor is relative: F has the units of the behaviour per
# parameter unit squared, so no absolute η means the same thing on two models.
DEFAULT_FISHER_EXPONENT = DEFAULT_EXPONENT
DEFAULT_FISHER_EPS: EpsSpec = DEFAULT_EPS

Call = Callable[[nn.Module, Any], Any]


def _prepare_batch(batch: Any, device: torch.device) -> Any:
    """Dict → plain dict without label keys (so no loss with the data labels is computed); tuple/list → tuple. The
    top-level tensors are moved to ``device``; a nested value (e.g. a cache) is passed on as it is."""
    if isinstance(batch, Mapping):
        batch = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    elif isinstance(batch, (tuple, list)):
        batch = tuple(batch)
    elif not isinstance(batch, torch.Tensor):
        raise TypeError(f"a batch must be a dict, a tuple/list or a tensor, got {type(batch).__name__}")
    return to_device(batch, device, depth=1)


def _default_call(model: nn.Module, batch: Any) -> Any:
    args, kwargs = split_batch(batch)
    return model(*args, **kwargs)


class _Forward(nn.Module):
    """model + call as one module, so functional_call can substitute the model's parameters under any call."""

    def __init__(self, model: nn.Module, call: Call) -> None:
        super().__init__()
        self.model = model
        self.call = call

    def forward(self, batch: Any) -> torch.Tensor:
        return logits_of(self.call(self.model, batch))


def _sample_labels(logits: torch.Tensor, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """y ~ p_θ0(·|x) at every row of ``logits`` ``[B, C]`` or ``[B, T, V]`` → ``[S, B]`` or ``[S, B, T]`` (int64, CPU).

    Drawn on the CPU from ``generator`` in float64 (softmax of the logits), row-major over (B, T).
    """
    probs = torch.softmax(logits.detach().to("cpu", torch.float64), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    y = torch.multinomial(flat, n_samples, replacement=True, generator=generator)  # [rows, S]
    return y.T.reshape(n_samples, *logits.shape[:-1])


def _exact_labels(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class as a "sample" of a ``[B, C]`` classifier: y ``[C, B]`` = c, and the per-sample mask
    ``[C, B]`` = mask_b·√(C·p_c(x_b)). Squaring a gradient scaled by √(C·p_c) and dividing by S = C gives
    Σ_c p_c (∇ log p_c)², the exact expectation the sampled labels estimate (no sampling noise)."""
    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)  # [B, C]
    n_classes = probs.shape[-1]
    y = torch.arange(n_classes, device=logits.device).unsqueeze(1).expand(n_classes, probs.shape[0])
    weights = (n_classes * probs.T).sqrt().to(mask.dtype) * mask.unsqueeze(0)
    return y, weights


def _use_exact(n_samples: int | str, logits: torch.Tensor) -> bool:
    """"exact" always (classifiers only); "auto": exact for ``[B, C]`` logits with C ≤ EXACT_MAX_CLASSES."""
    if n_samples == "exact":
        if logits.ndim != 2:
            raise ValueError(f"n_samples='exact' needs [batch, classes] logits (one scored position per example), "
                             f"got logits of shape {tuple(logits.shape)}; use an int number of samples")
        return True
    return n_samples == "auto" and logits.ndim == 2 and logits.shape[-1] <= EXACT_MAX_CLASSES


def _score_mask(raw: Any, logits: torch.Tensor, *, causal: bool, encoder_decoder: bool) -> torch.Tensor:
    """``[B]`` ones for ``[B, C]`` logits, else a ``[B, T]`` 0/1 float mask of the positions the KL behaviour scores
    (:func:`hfvolume.models.outputs.scored_position_mask`, so F is the curvature of exactly that Δ). Labels only select
    positions; they are never passed to the model nor used as targets."""
    if logits.ndim == 2:
        return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    mask = scored_position_mask(raw, tuple(logits.shape[:2]), device=logits.device, causal=causal,
                                encoder_decoder=encoder_decoder)
    return mask.to(torch.float32)


def _log_prob_sum(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over scored positions of log p(y|x) for one example: logits ``[1, C]``/``[1, T, V]``, y/mask ``[]``/``[T]``."""
    log_p = torch.log_softmax(logits.float(), dim=-1)[0]
    picked = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum()


def _is_batched(t: Any, size: int) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == size


def _in_dims(batch: Any, size: int) -> Any:
    """vmap ``in_dims`` for a prepared batch: 0 for tensors carrying the batch dimension, None for the rest.

    Batches are flat (dict / tuple / tensor); a nested value (e.g. a cache) is held fixed as a whole.
    """
    return map_batch(lambda v: 0 if _is_batched(v, size) else None, batch, depth=1)


def _map_batched(batch: Any, in_dims: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the batched tensors of a flat batch, leave everything else alone."""
    return map_batch(lambda v, d: fn(v) if d == 0 else v, batch, in_dims, depth=1)


def _select(batch: Any, in_dims: Any, index: torch.Tensor) -> Any:
    return _map_batched(batch, in_dims, lambda t: t.index_select(0, index.to(t.device)))


def _squared_grads_vmap(
    forward: _Forward,
    measured: dict[str, torch.Tensor],
    const: dict[str, torch.Tensor],
    batch: Any,
    y: torch.Tensor,
    mask: torch.Tensor,
    chunk: int,
) -> dict[str, torch.Tensor]:
    """Σ_{s,b} (∇ Σ_t mask log p(y_sbt|x_b))², per-(sample, example) gradients by vmap(grad), in chunks."""
    n_samples, size = y.shape[0], y.shape[1]
    in_dims = _in_dims(batch, size)

    def log_p(params: dict[str, torch.Tensor], example: Any, y_row: torch.Tensor, m_row: torch.Tensor) -> torch.Tensor:
        one = _map_batched(example, in_dims, lambda t: t.unsqueeze(0))  # the model sees a batch of one
        logits = functional_call(forward, (const, params), (one,))
        return _log_prob_sum(logits, y_row, m_row)

    per_example = vmap(grad(log_p), in_dims=(None, in_dims, 0, 0))
    acc = {n: _accumulator(t) for n, t in measured.items()}
    # Pairs (s, b) flattened sample-major; the inputs of example b are gathered for each pair.
    pairs = n_samples * size
    y_flat = y.reshape(pairs, *y.shape[2:])
    if mask.ndim < y.ndim:  # one mask for every sample
        mask = mask.unsqueeze(0).expand(n_samples, *mask.shape)
    m_flat = mask.reshape(pairs, *mask.shape[2:])
    for start in range(0, pairs, chunk):
        idx = torch.arange(start, min(start + chunk, pairs))
        example = _select(batch, in_dims, idx % size)
        with warnings.catch_warnings():
            # torch's note that an op (e.g. SDPA on CPU) has no batching rule and runs a slower fallback.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            g = per_example(measured, example, y_flat[idx], m_flat[idx])
        for n in acc:
            acc[n] += g[n].to(acc[n].dtype).square().sum(0)
    return acc


def _squared_grads_loop(
    forward: _Forward,
    measured: dict[str, torch.Tensor],
    const: dict[str, torch.Tensor],
    batch: Any,
    y: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Same sum as :func:`_squared_grads_vmap`: one forward per example, one backward per sample."""
    n_samples, size = y.shape[0], y.shape[1]
    if mask.ndim < y.ndim:  # one mask for every sample
        mask = mask.unsqueeze(0).expand(n_samples, *mask.shape)
    in_dims = _in_dims(batch, size)
    names = list(measured)
    acc = {n: _accumulator(t) for n, t in measured.items()}
    for b in range(size):
        example = _select(batch, in_dims, torch.tensor([b]))
        # Fresh leaves sharing storage with the parameters: gradients go to them, never to param.grad.
        leaves = {n: t.detach().requires_grad_(True) for n, t in measured.items()}
        with torch.enable_grad():
            logits = functional_call(forward, (const, leaves), (example,))
            for s in range(n_samples):
                objective = _log_prob_sum(logits, y[s, b], mask[s, b])
                grads = torch.autograd.grad(
                    objective, [leaves[n] for n in names], retain_graph=s < n_samples - 1, allow_unused=True
                )
                for n, g in zip(names, grads):
                    if g is not None:  # unused parameter: zero gradient, zero Fisher
                        acc[n] += g.to(acc[n].dtype).square()
    return acc


def _accumulator(t: torch.Tensor) -> torch.Tensor:
    # Squared gradients are summed over many examples: float64 where the device has it (MPS does not).
    return torch.zeros_like(t, dtype=torch.float32 if t.device.type == "mps" else torch.float64)


def _measured_names(model: nn.Module, named_params: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """caller's name → the model's own (first) name of the same parameter object."""
    own = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        own.setdefault(id(p), n)
    out = {}
    for name, p in named_params.items():
        if id(p) not in own:
            raise ValueError(f"named_params[{name!r}] is not a parameter of the model")
        out[name] = own[id(p)]
    return out


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any] | Mapping[str, Any] | torch.Tensor,
    named_params: Mapping[str, torch.Tensor],
    *,
    n_samples: int | str = "auto",
    damping: float = 0.0,
    seed: int = 0,
    max_batches: int | None = None,
    call: Call | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    causal_lm: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Monte-Carlo diagonal Fisher information of the model's predictive distribution on ``batches``.

    F̂ = (1/(S·N)) Σ_batches Σ_{b, s} (∇ Σ_{t scored} log p_θ(y_sbt | x_b, t))² + damping,  y ~ p_θ(·|x) sampled,

    with S = ``n_samples`` and N = number of scored positions: examples for ``[B, C]`` logits; for ``[B, T, V]``
    logits the positions the KL behaviour scores (attention mask, and ``labels != -100`` with the causal-LM shift,
    see :func:`_score_mask`). ``labels``/``shift_labels`` are removed from dict batches before the forward and
    never used as targets. Unbiased for the per-position mean Fisher (see the module docstring for why the
    per-sequence gradient suffices).

    Args:
        model: any module; only ``named_params`` are differentiated (others held fixed).
        batches: iterable of batches; a dict is called as ``model(**batch)``, a tuple as ``model(*batch)``, a tensor
            as ``model(batch)``. A single dict or tensor is treated as one batch. Tensors are moved to the
            parameters' device.
        named_params: ``{name: parameter}`` of the measured parameters (must be parameters of ``model``).
        n_samples: labels drawn per scored position; ``"exact"``: the expectation over every class instead of
            samples (classifiers with ``[B, C]`` logits: C gradients per example, no sampling noise); ``"auto"``
            (default): exact for classifiers with at most ``EXACT_MAX_CLASSES`` classes, else one sample. With one
            sampled label the digits MLP's proposal landed hundreds of nats below the exact diagonal's.
        damping: added to every returned entry (≥ 0).
        seed: seeds the private generator the labels are drawn from.
        max_batches: use at most this many batches.
        call: ``call(model, batch) -> logits or model output``, replacing the default dispatch (``batch`` is as
            given, minus the label keys). The scored positions are still read from dict batches.
        method: ``"vmap"`` (per-example gradients with ``torch.func``), ``"loop"`` (one example at a time) or
            ``"auto"`` (vmap, falling back to the loop for the rest of the call if the forward cannot be vmapped).
        chunk_size: (sample, example) pairs per vmap call; default keeps chunk · D ≤ 2^25.
        causal_lm: whether the model shifts labels internally (None → :func:`is_causal_lm`); only matters for
            the label mask of ``[B, T, V]`` logits.

    Returns:
        ``{name: float32 CPU tensor shaped like the parameter}``, entries ≥ damping, in units of (log-prob per
        parameter unit)², i.e. per scored position.
    """
    _check_arguments(model, named_params, n_samples=n_samples, damping=damping, max_batches=max_batches,
                     method=method, chunk_size=chunk_size, call=call)
    own_names = _measured_names(model, named_params)
    causal = is_causal_lm(model) if causal_lm is None else bool(causal_lm)
    encoder_decoder = is_encoder_decoder(model)
    if isinstance(batches, (Mapping, torch.Tensor)):
        batches = [batches]

    device = next(iter(named_params.values())).device
    n_params = sum(p.numel() for p in named_params.values())
    forward = _Forward(model, call or _default_call)
    measured_ids = {id(p) for p in named_params.values()}
    # Everything else is passed detached, so autograd records nothing for parameters we do not measure.
    const = {f"model.{n}": p.detach() for n, p in model.named_parameters() if id(p) not in measured_ids}
    measured = {f"model.{own_names[name]}": p.detach() for name, p in named_params.items()}
    total = _SquaredScores(forward, measured, const, method=method,
                           chunk=chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, n_params)))
    generator = torch.Generator().manual_seed(int(seed))
    with preserved_modes(model), preserved_rng(cuda_devices=cuda_devices_of(model)):
        for k, raw_batch in enumerate(batches):
            if max_batches is not None and k >= max_batches:
                break
            batch = _prepare_batch(raw_batch, device)
            with torch.no_grad():
                logits = forward(batch)
            mask = _score_mask(raw_batch, logits, causal=causal, encoder_decoder=encoder_decoder)
            if _use_exact(n_samples, logits):
                y, weights = _exact_labels(logits, mask)
                total.add(batch, y, mask, weights)
                per_position = y.shape[0]
            else:
                per_position = 1 if isinstance(n_samples, str) else n_samples
                y = _sample_labels(logits, per_position, generator).to(logits.device)
                total.add(batch, y, mask)
            total.samples_per_position.add(per_position)
    if total.n_scored == 0:
        raise ValueError("no scored positions in the batches (empty data, or attention masks all zero)")
    (samples,) = total.samples_per_position  # one logits shape per model, so one count per call
    return {
        name: (total.sums[f"model.{own_names[name]}"] / (samples * total.n_scored) + damping).to("cpu", torch.float32)
        for name in named_params
    }


def _check_arguments(model: Any, named_params: Any, *, n_samples: Any, damping: Any, max_batches: Any, method: Any,
                     chunk_size: Any, call: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(n_samples, str) and n_samples in ("auto", "exact")):
        check_int("n_samples", n_samples)
    check_nonnegative("damping", damping)
    check_optional_int("max_batches", max_batches)
    check_choice("method", method, METHODS)
    check_optional_int("chunk_size", chunk_size)
    if not isinstance(named_params, Mapping) or not named_params:
        raise ValueError("named_params must be a non-empty mapping name → parameter")
    if call is not None and not callable(call):
        raise TypeError("call must be callable as call(model, batch)")


class _SquaredScores:
    """Σ over examples and samples of squared per-example scores, per measured tensor, and the scored positions.

    Per-example gradients by vmap unless ``method="loop"``; with ``method="auto"`` a forward that cannot be vmapped
    switches to the per-example loop for the rest of the call.
    """

    def __init__(self, forward: _Forward, measured: dict[str, torch.Tensor], const: dict[str, torch.Tensor], *,
                 method: str, chunk: int) -> None:
        self.forward, self.measured, self.const = forward, measured, const
        self.method, self.chunk = method, chunk
        self.use_vmap = method != "loop"
        self.sums = {n: _accumulator(t) for n, t in measured.items()}
        self.n_scored = 0.0
        self.samples_per_position: set[int] = set()  # S of every batch (the sums are divided by S·N)

    def add(self, batch: Any, y: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """One prepared batch with its labels ``y`` ``[S, B(, T)]`` and score mask ``[B(, T)]``; ``weights``
        ``[S, B]`` replaces the mask in the objective (exact expectation over classes, see :func:`_exact_labels`)
        while the mask still counts the scored positions."""
        acc = None
        if self.use_vmap:
            try:
                acc = _squared_grads_vmap(self.forward, self.measured, self.const, batch, y,
                                          mask if weights is None else weights, self.chunk)
            except Exception as err:  # noqa: BLE001 - any failure inside vmap means "not vmappable"
                if self.method == "vmap":
                    raise
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                logger.info("fisher_diagonal: per-example vmap failed (%s); looping over examples", reason)
                self.use_vmap = False
        if acc is None:
            acc = _squared_grads_loop(self.forward, self.measured, self.const, batch, y,
                                      mask if weights is None else weights)
        for n in self.sums:
            self.sums[n] += acc[n]
        self.n_scored += float(mask.sum())


def fisher_scales(
    fisher: Mapping[str, torch.Tensor],
    *,
    exponent: float = DEFAULT_FISHER_EXPONENT,
    eps: EpsSpec = DEFAULT_FISHER_EPS,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Proposal scales p = 1/(F^γ + η) from a diagonal Fisher (:mod:`hfvolume.models.scales`, as ``adam_scales``).

    ``fisher[name]`` must be finite and ≥ 0. η = ``eps`` is either a float in the units of F^γ (per-parameter-unit
    log-prob for γ = 0.5) or :class:`hfvolume.models.scales.RelativeEps` ``(r)``: η = r · median(F^γ) over the
    coordinates with F > 0. It keeps coordinates with F = 0 (parameters the eval data never reaches) at the finite
    scale 1/η, and decides how far such flat coordinates may stretch the proposal.
    Returns ``({name: CPU tensor of dtype, same shape}, {"name": "fisher", "exponent", "eps", "eps_relative",
    "eps_reference", "n_tensors"})`` with ``eps`` the absolute η used (see :func:`hfvolume.models.scales.resolve_eps`).
    """
    exponent, eps = check_scale_settings(exponent, eps)
    if not isinstance(fisher, Mapping) or not fisher:
        raise ValueError("fisher must be a non-empty mapping name → tensor")
    moments = {name: torch.as_tensor(f).detach().to("cpu") for name, f in fisher.items()}
    eta, eps_info = resolve_eps(eps, moments.values(), exponent)
    scales = {name: inverse_power_scale(f, exponent, eta, name=name).to(dtype) for name, f in moments.items()}
    info = {"name": "fisher", "exponent": exponent, **eps_info, "n_tensors": len(scales)}
    return scales, info


__all__ = ["DEFAULT_FISHER_EPS", "DEFAULT_FISHER_EXPONENT", "fisher_diagonal", "fisher_scales", "is_causal_lm"]
