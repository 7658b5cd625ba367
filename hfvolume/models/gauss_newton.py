"""The exact Gauss–Newton factor of a classifier's mean KL behaviour: G = AᵀA with A `[N·C, D]`.

For the KL behaviour of Scherlis & Belrose (arXiv 2501.18812: Δ(θ) = mean over the N scored inputs of
KL(p_θ0(·|x_n) ‖ p_θ(·|x_n))), the gradient with respect to the logits vanishes at θ0, so the Hessian at the anchor
is exactly the Gauss–Newton matrix

    G = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n,      J_n = ∂ logits_n / ∂θ  `[C, D]`,  p_n = softmax(logits_n),

of rank ≤ N (C − 1). This module builds a factor A with AᵀA = G: example n contributes the C rows
S_n J_n / √N with S_n = (I − √p_n √p_nᵀ) diag(√p_n), a square root of diag p_n − p_n p_nᵀ in the sense
S_nᵀ S_n = diag p_n − p_n p_nᵀ (I − √p√pᵀ is a projection), i.e. row c is √p_{n,c} (J_{n,c} − Σ_c' p_{n,c'} J_{n,c'}).
The factor is what :meth:`hfvolume.volume.quadratic.QuadraticRegion.from_factor` takes, and what
:mod:`hfvolume.models.curvature` turns into eigenpairs.

The examples may come as one tensor or mapping (:func:`kl_gauss_newton_factor`) or as several batches, each with
its own positional and keyword arguments (:func:`kl_gauss_newton_factor_of_batches`, the layout of a
:class:`~hfvolume.models.behavior.ModelBehavior`); in a batch, a tensor whose leading size is the batch's number of
examples is split into examples, every other argument is passed to each example unchanged. Label entries
(``labels``, ``shift_labels``) are dropped: the logits do not depend on them.

The Jacobians are reverse-mode; an ``nn.Embedding``'s ``padding_idx`` and ``scale_grad_by_freq`` change its
backward only (no gradient for the padding row, rows rescaled by frequency) while the forward, and so the KL, uses
every row: they are switched off while the factor is built (:func:`true_embedding_gradients`).

Memory: the result is N·C·D float64 (8 N C D bytes: 322 MB for the 449-example, 8,970-parameter digits MLP); while
it is built, one chunk of per-example Jacobians, chunk_size · C · D in the compute dtype, plus the backward passes
of chunk_size · C vector-Jacobian products, is alive.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]
LABEL_KEYS = ("labels", "shift_labels")  # never inputs of the logits
_PER_EXAMPLE = object()  # placeholder, in a batch's constant positional arguments, of one split into examples


@dataclass(frozen=True)
class ExampleBatch:
    """One batch as the model takes it: ``model(*args, **kwargs)``, holding ``n_examples`` examples."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    n_examples: int = 0


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() lists a tied tensor once, under its first name: the flat layout of the measured
    # parameters used everywhere else (ParameterView.from_model(model, "trainable")).
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
    return named


def _selected(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    """The measured parameters: the trainable ones (``names`` None), or ``names`` in that order (each the first
    name of its tensor in ``model.named_parameters()``, as in a ParameterView)."""
    if names is None:
        return _trainable(model)
    own = dict(model.named_parameters())
    missing = [n for n in names if n not in own]
    if missing or not names:
        raise ValueError(f"params must name parameters of {type(model).__name__}; unknown: {missing[:5] or 'none'}")
    return [(n, own[n]) for n in names]


@contextlib.contextmanager
def true_embedding_gradients(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.Embedding`` of ``model`` back-propagates the exact transpose of its forward
    (no ``padding_idx`` row masking, no ``scale_grad_by_freq``, dense gradients); restored on exit, also when the
    block raises. Forward values are unchanged."""
    saved = [(m, m.padding_idx, m.scale_grad_by_freq, m.sparse) for m in model.modules() if isinstance(m, nn.Embedding)]
    try:
        for m, _, _, _ in saved:
            m.padding_idx, m.scale_grad_by_freq, m.sparse = None, False, False
        yield
    finally:
        for m, padding_idx, by_freq, sparse in saved:
            m.padding_idx, m.scale_grad_by_freq, m.sparse = padding_idx, by_freq, sparse


def flat_trainable_parameters(model: nn.Module) -> torch.Tensor:
    """θ0 `[D]` float64: the trainable parameters in ``model.named_parameters()`` order (the factor's columns)."""
    return torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for _, p in _trainable(model)])


def _check_inputs(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        tensors = [("inputs", inputs)]
    elif isinstance(inputs, Mapping):
        tensors = list(inputs.items())
        bad = [k for k, v in tensors if not isinstance(v, torch.Tensor)]
        if bad or not tensors:
            raise TypeError(f"inputs must map names to tensors; {bad or 'nothing'} given")
    else:
        raise TypeError(f"inputs must be a tensor or a mapping of tensors, got {type(inputs).__name__}")
    sizes = {name: (int(t.shape[0]) if t.ndim else -1) for name, t in tensors}
    if len(set(sizes.values())) != 1 or -1 in sizes.values() or 0 in sizes.values():
        raise ValueError(f"every input needs the same, non-zero leading (example) dimension; got {sizes}")
    return next(iter(sizes.values()))


def _logits_of(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model must return logits or an output with .logits, got {type(out).__name__}")
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise ValueError(f"a single example must give logits of shape [1, C], got {tuple(logits.shape)}")
    return logits[0]


def _check_settings(model: Any, chunk_size: Any, dtype: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"the model must be in eval mode (dropout/batch-norm make the KL random); in training mode: {training[:5]}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def kl_gauss_newton_factor(
    model: nn.Module,
    inputs: Inputs,
    *,
    chunk_size: int = 32,
    dtype: torch.dtype = torch.float64,
    params: Sequence[str] | None = None,
) -> torch.Tensor:
    """A `[N·C, D]` float64 factor A with AᵀA = G, the Hessian at θ0 of the mean KL over the N inputs.

    Rows are example-major (row n·C + c); columns follow the measured parameters: the trainable ones in
    ``model.named_parameters()`` order (:func:`flat_trainable_parameters`), or ``params``. Jacobians come from
    ``torch.func.jacrev`` of the logits of one example, vmapped over ``chunk_size`` examples, evaluated with
    ``functional_call`` on copies of the parameters cast to ``dtype``: the model is never modified, and nothing
    random is drawn.

    Args:
        model: a classifier in eval mode; ``model(x)`` (tensor inputs) or ``model(**x)`` (mapping inputs) on one
            example with a leading dimension of 1 returns logits `[1, C]` or an output with ``.logits`` `[1, C]`.
        inputs: `[N, ...]` tensor, or a mapping of such tensors (floating ones are cast to ``dtype``).
        chunk_size: examples per vmapped Jacobian pass (memory: see the module docstring).
        dtype: compute dtype of the Jacobians and probabilities (float64 by default, whatever the model's dtype).
        params: names of the measured parameters, in column order (e.g. a ParameterView's ``names``); None: the
            trainable ones. The others are held fixed.

    Raises:
        ValueError: the model is in training mode, has no trainable parameter, the inputs' leading dimensions
            differ, or the logits do not have shape `[1, C]` per example.
    """
    _check_settings(model, chunk_size, dtype)
    n = _check_inputs(inputs)
    if isinstance(inputs, Mapping):
        batch = ExampleBatch(kwargs=dict(inputs), n_examples=n)
    else:
        batch = ExampleBatch(args=(inputs,), n_examples=n)
    return kl_gauss_newton_factor_of_batches(model, [batch], chunk_size=chunk_size, dtype=dtype, params=params)


def kl_gauss_newton_factor_of_batches(
    model: nn.Module,
    batches: Sequence[ExampleBatch],
    *,
    chunk_size: int = 32,
    dtype: torch.dtype = torch.float64,
    params: Sequence[str] | None = None,
) -> torch.Tensor:
    """:func:`kl_gauss_newton_factor` over several batches: a `[N·C, D]` float64 factor of the Hessian of the mean
    KL over all N = Σ n_examples examples (rows in batch order, then example-major).

    In each batch, tensors whose leading size is the batch's ``n_examples`` are split into examples (floating ones
    cast to ``dtype``); every other argument is passed to each example as is; label entries are dropped.
    """
    _check_settings(model, chunk_size, dtype)
    if not batches or any(not isinstance(b, ExampleBatch) or b.n_examples < 1 for b in batches):
        raise ValueError("batches must be a non-empty sequence of ExampleBatch with n_examples ≥ 1")
    named = _selected(model, params)
    theta = {name: p.detach().to(dtype) for name, p in named}
    measured_ids = {id(p) for _, p in named}
    frozen = {
        name: _cast(t, dtype)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if id(t) not in measured_ids
    }
    total = sum(b.n_examples for b in batches)
    d = sum(p.numel() for p in theta.values())
    scale = 1.0 / math.sqrt(total)
    out: torch.Tensor | None = None
    start = 0  # first example of the current chunk, over all batches
    with true_embedding_gradients(model):
        for batch in batches:
            for rows in _batch_rows(model, frozen, theta, batch, dtype, chunk_size):  # [b, C, D] float64
                b, c = rows.shape[0], rows.shape[1]
                if out is None:
                    out = torch.empty(total * c, d, dtype=torch.float64)
                elif out.shape[0] != total * c:
                    raise ValueError(f"the number of classes differs between batches ({out.shape[0] // total} and "
                                     f"{c})")
                out[start * c : (start + b) * c] = rows.reshape(b * c, d).mul_(scale)
                start += b
    assert out is not None  # internal: every batch has ≥ 1 example
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype) if t.is_floating_point() else t.detach()


def _split(batch: ExampleBatch, dtype: torch.dtype) -> tuple[dict[Any, torch.Tensor], tuple, dict[str, Any]]:
    """(per-example tensors keyed by ("arg", i) / ("kw", name), constant args, constant kwargs) of a batch."""
    n = batch.n_examples

    def per_example(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n

    split: dict[Any, torch.Tensor] = {}
    args = list(batch.args)
    for i, v in enumerate(args):
        if per_example(v):
            split[("arg", i)] = _cast(v, dtype)
    kwargs = {k: v for k, v in batch.kwargs.items() if k not in LABEL_KEYS}
    for k, v in kwargs.items():
        if per_example(v):
            split[("kw", k)] = _cast(v, dtype)
    const_args = tuple(_PER_EXAMPLE if ("arg", i) in split else (_cast(v, dtype) if isinstance(v, torch.Tensor) else v)
                       for i, v in enumerate(args))
    const_kwargs = {k: (_cast(v, dtype) if isinstance(v, torch.Tensor) else v)
                    for k, v in kwargs.items() if ("kw", k) not in split}
    return split, const_args, const_kwargs


def _batch_rows(model: nn.Module, frozen: dict[str, torch.Tensor], theta: dict[str, torch.Tensor],
                batch: ExampleBatch, dtype: torch.dtype, chunk_size: int) -> Any:
    """Yield ``[b, C, D]`` float64 rows √p_c (J_c − pᵀJ) of a batch's examples, ``chunk_size`` examples at a time
    (unscaled: the caller divides by √N)."""
    split, const_args, const_kwargs = _split(batch, dtype)
    if not split:
        raise ValueError(f"the batch has no tensor with {batch.n_examples} examples along its leading dimension")

    def one_example(params: dict[str, torch.Tensor], example: dict[Any, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        args = tuple(example[("arg", i)].unsqueeze(0) if v is _PER_EXAMPLE else v for i, v in enumerate(const_args))
        kwargs = {**const_kwargs, **{k: v.unsqueeze(0) for (kind, k), v in example.items() if kind == "kw"}}
        logits = _logits_of(functional_call(model, {**frozen, **params}, args, kwargs))
        return logits, logits.detach()

    jac_fn = vmap(jacrev(one_example, has_aux=True), in_dims=(None, 0))
    for start in range(0, batch.n_examples, chunk_size):
        chunk = {k: v[start : start + chunk_size] for k, v in split.items()}
        jac, logits = jac_fn(theta, chunk)  # jac: name -> [b, C, *shape]; logits [b, C]
        b, c = logits.shape
        j = torch.cat([jac[name].reshape(b, c, -1) for name in theta], dim=-1).to(torch.float64)
        p = torch.softmax(logits.to(torch.float64), dim=-1)
        mean_j = torch.einsum("bc,bcd->bd", p, j)
        yield torch.sqrt(p).unsqueeze(-1) * (j - mean_j.unsqueeze(1))


__all__ = [
    "ExampleBatch",
    "LABEL_KEYS",
    "flat_trainable_parameters",
    "kl_gauss_newton_factor",
    "kl_gauss_newton_factor_of_batches",
    "true_embedding_gradients",
]
