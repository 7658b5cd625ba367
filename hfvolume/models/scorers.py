"""Scorers: how one behaviour kind turns a model's outputs into Δ, one class per kind.

A behaviour Δ(θ) compares the model with parameters θ to the anchor θ0 on fixed data (Scherlis & Belrose 2025,
arXiv 2501.18812: the behaviour region is {θ : Δ(θ) ≤ ε} with Δ(θ0) = 0). The kinds:

* :class:`KLScorer` ("kl"): mean over scored positions of KL(p_θ0(·|x) ‖ p_θ(·|x)), nats per position;
* :class:`OutputScorer` ("output"): mean over scored positions of |y_θ(x) − y_θ0(x)|², squared output units;
* :class:`LossScorer` ("loss"): the model's own loss, averaged over batches weighted by their examples;
* :class:`CallableScorer`: a user callable ``behavior(outputs, batch) -> scalar tensor``, averaged like "loss".

The first two are :class:`PositionScorer` s: they keep a reference from the anchor per batch (log p0, or the
anchor's outputs) at the scored positions and sum per-position terms; the last two are :class:`ScalarScorer` s: a
batch gives one number, and the anchor's is remembered. Every scorer offers the same small interface:
:meth:`Scorer.extract` (the tensor compared, per row), :meth:`Scorer.anchor_pass` (what is kept from the anchor),
:meth:`Scorer.values` (a batch's ``[C]`` float64 contribution) and :meth:`Scorer.mean` (the final average).

**Row invariance.** A row's value must not depend on the other rows of its forward pass: the radius search makes
discrete decisions on these values. Position terms are therefore reduced a chunk of positions at a time
(:func:`position_chunks`, which depend on the batch only), with one fixed-shape float64 sum per row.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch

from hfvolume.models.outputs import HIDDEN_KEYS, LOGITS_KEYS, loss_of, output_tensor, scored_position_mask
from hfvolume.volume.checks import check_choice

BEHAVIORS = ("kl", "loss", "output")
BehaviorSpec = Union[str, Callable[[Any, Any], torch.Tensor]]
# torch's parallel grain size: a reduction over fewer elements runs serially, with the same kernel for any number
# of rows C, so one batched sum gives every row's sum bitwise (larger ones may split differently for C = 1).
SERIAL_REDUCTION_NUMEL = 32768
# "kl" log-probs of fewer classes use x − logsumexp(x): the same value up to rounding and still per position (so
# row-invariant), and log_softmax's last-dim kernel is slow for such narrow rows, where a classifier's cost goes.
NARROW_SOFTMAX_WIDTH = 32


class ScoringError(ValueError):
    """A user error found while scoring outputs (wrong output type, non-scalar callable): never a reason to fall
    back from vmap to the per-row loop."""


@dataclass(eq=False)
class ScoredBatch:
    """One materialised batch (on the model's device) and what a scorer keeps about it."""

    raw: Any  # the batch as the user gave it (dict / tuple / tensor), moved to the device; passed to callables
    args: tuple
    kwargs: dict
    n_examples: int
    index: torch.Tensor | None = None  # [N] flat indices of the scored positions into the output's leading dims
    all_scored: bool = False  # every position is scored: chunks are slices, no gather
    width: int = 1  # size of the output's last dim (V for "kl", H for "output")
    n_scored: int = 0
    anchor: torch.Tensor | None = None  # cached anchor reference [N, width] ("kl": log-probs, "output": outputs)
    anchor_value: torch.Tensor | None = None  # [1] float64 anchor value × n_examples ("loss" / callable)
    p0_has_zeros: bool = True  # "kl": some anchor probability underflows to 0 (its terms need masking)


def position_chunks(batch: ScoredBatch) -> list[tuple[int, int]]:
    """Chunks ``[start, stop)`` of a batch's scored positions, of fewer than :data:`SERIAL_REDUCTION_NUMEL` elements
    per row (one position when a row is wider). They depend on the batch only, never on the number of rows, so
    every row is reduced in the same order whatever else is in the call."""
    step = max(1, (SERIAL_REDUCTION_NUMEL - 1) // max(1, batch.width))
    return [(a, min(a + step, batch.n_scored)) for a in range(0, batch.n_scored, step)]


def has_zero_probability(log_p: torch.Tensor) -> bool:
    """Whether exp underflows to 0 anywhere in ``log_p`` (exp is monotone: its minimum decides, without a
    temporary of the tensor's size)."""
    return log_p.numel() > 0 and bool(torch.exp(log_p.min()) == 0)


class Scorer(ABC):
    """The common interface; see the module docstring. ``compute_dtype``: float32, or float64 for float64 models
    (bf16 log-probs would swamp a 1e-2 cutoff)."""

    name: str = ""
    per_position = False  # values are sums over scored positions (mean over n_scored), else per-example means
    uses_labels = False  # the labels restrict the scored positions

    def __init__(self, *, compute_dtype: torch.dtype) -> None:
        self.compute_dtype = compute_dtype

    @abstractmethod
    def extract(self, outputs: Any, batch: ScoredBatch) -> torch.Tensor:
        """The tensor compared, for one row: the outputs (positions) or a scalar (per-batch kinds)."""
        raise NotImplementedError

    @abstractmethod
    def anchor_pass(
        self, out: torch.Tensor, batch: ScoredBatch, *, index: int, device: torch.device
    ) -> torch.Tensor | None:
        """Learn what is kept about ``batch`` (number ``index``) from the anchor's extracted outputs ``out``
        ``[1, ...]``; returns the reference to cache (per-position kinds) or None."""
        raise NotImplementedError

    def working_bytes(self, out: torch.Tensor, ref: torch.Tensor) -> int:
        """Bytes one row's reduction needs beyond the model's own activations (``ref``: the anchor's reference)."""
        return 0

    @abstractmethod
    def values(self, out: torch.Tensor, batch: ScoredBatch, ref: torch.Tensor | None) -> torch.Tensor:
        """``[C]`` float64 contribution of one batch for rows' extracted outputs ``out`` ``[C, ...]``."""
        raise NotImplementedError

    @abstractmethod
    def expected_anchor_values(self, batch: ScoredBatch) -> torch.Tensor:
        """``[1]`` float64 (CPU): what :meth:`values` must give for the anchor's own row on ``batch``."""
        raise NotImplementedError

    def skips(self, batch: ScoredBatch) -> bool:
        """Whether ``batch`` contributes nothing (no scored position)."""
        return self.per_position and batch.n_scored == 0

    def mean(self, total: torch.Tensor, *, n_examples: int, n_scored: int | None) -> torch.Tensor:
        """Δ from the batches' summed contributions ``[K]``: per scored position or per example."""
        return total / (n_scored if self.per_position else n_examples)


# ---------------------------------------------------------------------------------------------- one number per batch
class ScalarScorer(Scorer):
    """A behaviour that gives one number per batch; Δ is their mean weighted by examples."""

    def anchor_pass(self, out: torch.Tensor, batch: ScoredBatch, *, index: int, device: torch.device) -> None:
        value = out.to(torch.float64)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the anchor's {self.name} value on batch {index} is not finite")
        batch.anchor_value = value * batch.n_examples

    def values(self, out: torch.Tensor, batch: ScoredBatch, ref: torch.Tensor | None) -> torch.Tensor:
        return out.to(torch.float64) * batch.n_examples

    def expected_anchor_values(self, batch: ScoredBatch) -> torch.Tensor:
        assert batch.anchor_value is not None  # internal: set by anchor_pass
        return batch.anchor_value.to("cpu")


class LossScorer(ScalarScorer):
    """"loss": the model's own ``outputs.loss`` (the batches must hold labels)."""

    name = "loss"

    def extract(self, outputs: Any, batch: ScoredBatch) -> torch.Tensor:
        loss = loss_of(outputs)
        if loss is None:
            raise ScoringError(
                "behavior='loss' needs the model to return a loss (outputs.loss): include labels in every batch"
            )
        return loss.reshape(()).to(self.compute_dtype)


class CallableScorer(ScalarScorer):
    """A user callable ``behavior(outputs, batch) -> scalar tensor`` (``batch`` as the user gave it)."""

    def __init__(self, fn: Callable[[Any, Any], Any], *, compute_dtype: torch.dtype) -> None:
        super().__init__(compute_dtype=compute_dtype)
        self.fn = fn
        self.name = f"callable:{getattr(fn, '__qualname__', type(fn).__name__)}"

    def extract(self, outputs: Any, batch: ScoredBatch) -> torch.Tensor:
        value = torch.as_tensor(self.fn(outputs, batch.raw))
        if value.numel() != 1:
            raise ScoringError(f"the behavior callable must return a scalar, got shape {tuple(value.shape)}")
        return value.reshape(()).to(self.compute_dtype)


# ---------------------------------------------------------------------------------------------- per scored position
class PositionScorer(Scorer):
    """A behaviour summed over scored positions of outputs ``[*lead, width]`` (``[B]`` outputs are ``[B, 1]``).

    Scored: every position, restricted to ``attention_mask != 0`` where the mask's shape equals ``lead`` (and, when
    :attr:`uses_labels`, to labels != -100; :func:`~hfvolume.models.outputs.scored_position_mask`).
    """

    per_position = True
    keys: tuple[str, ...] = ()

    def __init__(self, *, compute_dtype: torch.dtype, causal: bool, encoder_decoder: bool) -> None:
        super().__init__(compute_dtype=compute_dtype)
        self.causal, self.encoder_decoder = causal, encoder_decoder

    def extract(self, outputs: Any, batch: ScoredBatch) -> torch.Tensor:
        tensor = output_tensor(outputs, self.keys)
        if tensor is not None:
            return tensor
        if isinstance(outputs, Mapping):
            raise ScoringError(self.missing_key_message(outputs))
        raise ScoringError(
            f"cannot find an output tensor in {type(outputs).__name__}; use behavior='loss' or a callable"
        )

    @abstractmethod
    def missing_key_message(self, outputs: Any) -> str:
        """The error for a mapping output without any of :attr:`keys`."""

    def check_row_shape(self, row_shape: tuple[int, ...]) -> None:
        """Refuse outputs this kind cannot compare (per row, without the rows' dim)."""

    def layout(self, batch: ScoredBatch, row_shape: tuple[int, ...], *, device: torch.device) -> None:
        """Set ``batch.index``, ``width``, ``n_scored`` and ``all_scored`` for outputs of shape ``row_shape``."""
        if len(row_shape) <= 1:  # [B] (or scalar) outputs: each entry is one position of width 1
            lead, width = (math.prod(row_shape) if row_shape else 1,), 1
        else:
            lead, width = tuple(row_shape[:-1]), int(row_shape[-1])
        mask = scored_position_mask(
            batch.kwargs, lead, device=device, causal=self.causal, encoder_decoder=self.encoder_decoder,
            use_labels=self.uses_labels,
        )
        batch.index = torch.nonzero(mask.reshape(-1)).reshape(-1)
        batch.width = width
        batch.n_scored = int(batch.index.numel())
        batch.all_scored = batch.n_scored * width == math.prod(row_shape)

    def scored(self, flat: torch.Tensor, batch: ScoredBatch, start: int, stop: int) -> torch.Tensor:
        """Scored positions ``[start, stop)`` of outputs ``[C, P, width]`` as ``[C, stop − start, width]`` in the
        compute dtype, in a new tensor (the model's outputs are never written to). The anchor's reference and every
        row go through this same code on the same chunks, so Δ(θ0) is exactly 0."""
        if batch.all_scored:
            part = flat[:, start:stop]
        else:
            assert batch.index is not None  # internal: set by layout
            part = flat.index_select(1, batch.index[start:stop])
        copied = not batch.all_scored or part.dtype != self.compute_dtype
        part = part.to(self.compute_dtype)
        return self.transform(part, batch, copied=copied)

    def transform(self, part: torch.Tensor, batch: ScoredBatch, *, copied: bool) -> torch.Tensor:
        """What is compared at the scored positions ``part`` (a view of the outputs unless ``copied``)."""
        return part if copied else part.clone()

    def reference(self, out: torch.Tensor, batch: ScoredBatch) -> torch.Tensor:
        """The anchor's scored reference ``[N, width]`` from its extracted outputs ``[1, *lead, width]``."""
        flat = out.reshape(1, -1, batch.width)
        ref = torch.empty(batch.n_scored, batch.width, dtype=self.compute_dtype, device=out.device)
        for a, b in position_chunks(batch):
            ref[a:b] = self.scored(flat, batch, a, b)[0]
        return ref

    def zero_mask_needed(self, ref: torch.Tensor | None) -> bool:
        """Whether the terms need masking where the anchor's probability is 0 (``ref`` None: not known)."""
        return False

    def not_finite(self, ref: torch.Tensor) -> bool:
        return bool(torch.isnan(ref).any() | torch.isposinf(ref).any() | torch.isneginf(ref).any())

    def anchor_pass(
        self, out: torch.Tensor, batch: ScoredBatch, *, index: int, device: torch.device
    ) -> torch.Tensor:
        """Lay ``batch`` out (scored positions on ``device``) and return the anchor's reference ``[N, width]``."""
        row_shape = tuple(out.shape[1:])
        self.check_row_shape(row_shape)
        self.layout(batch, row_shape, device=device)
        ref = self.reference(out, batch)
        batch.p0_has_zeros = self.zero_mask_needed(ref)
        if self.not_finite(ref):
            raise ValueError(f"the anchor's outputs on batch {index} are not finite (NaN/inf)")
        return ref

    def working_bytes(self, out: torch.Tensor, ref: torch.Tensor) -> int:
        """Bytes alive during one row's reduction at worst: its raw outputs, and a chunk's scored copy, p0 and zero
        mask."""
        width = ref.shape[-1]
        chunk = min(ref.numel() * ref.element_size(), max(width, SERIAL_REDUCTION_NUMEL) * ref.element_size())
        return out[0].numel() * out.element_size() + 3 * chunk

    @abstractmethod
    def terms(self, cur: torch.Tensor, ref: torch.Tensor, batch: ScoredBatch) -> tuple[torch.Tensor, float]:
        """Per-position terms ``[C, n, width]`` (in place on ``cur``) and the sign their sum is added with."""
        raise NotImplementedError

    def values(self, out: torch.Tensor, batch: ScoredBatch, ref: torch.Tensor | None) -> torch.Tensor:
        assert ref is not None  # internal: position scorers always get the anchor's reference
        flat = out.reshape(out.shape[0], -1, batch.width)
        total = torch.zeros(out.shape[0], dtype=torch.float64, device=out.device)
        # A chunk of positions at a time: the temporaries beyond the model's own outputs are bounded by
        # C × SERIAL_REDUCTION_NUMEL elements, however many positions and classes the data have.
        for a, b in position_chunks(batch):
            terms, sign = self.terms(self.scored(flat, batch, a, b), ref[a:b], batch)
            # One fixed-shape reduction per row: a reduction over [C, n, width] may split its summation differently
            # for different C (with C = 1, torch splits a reduction of ≥ SERIAL_REDUCTION_NUMEL elements over
            # threads along the reduced dim). Below that size every C reduces each row serially with the same
            # kernel, so one batched call gives the per-row sums bitwise.
            per_row = terms[0].numel()
            if per_row < SERIAL_REDUCTION_NUMEL:
                sums = terms.reshape(terms.shape[0], per_row).sum(dim=1, dtype=torch.float64)
            else:
                sums = torch.stack([terms[i].sum(dtype=torch.float64) for i in range(terms.shape[0])])
            total.add_(sums, alpha=sign)
        return total

    def expected_anchor_values(self, batch: ScoredBatch) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.float64)


class KLScorer(PositionScorer):
    """"kl": Σ over scored positions of KL(p0 ‖ q) = Σ_v p0 (log p0 − log q), p0 = softmax of the anchor's logits,
    q of the row's; per-token ``labels`` also restrict the positions (with the causal-LM shift)."""

    name = "kl"
    keys = LOGITS_KEYS
    uses_labels = True

    def missing_key_message(self, outputs: Any) -> str:
        return (
            f"behavior='kl' needs logits but the model returned {type(outputs).__name__} with keys "
            f"{list(outputs.keys())}; use behavior='output' (distance of outputs) or 'loss'"
        )

    def check_row_shape(self, row_shape: tuple[int, ...]) -> None:
        if len(row_shape) < 2:
            raise ValueError(
                f"behavior='kl' needs logits of shape [B, C] or [B, T, V], got {row_shape}; use "
                "behavior='output' or 'loss'"
            )

    def transform(self, part: torch.Tensor, batch: ScoredBatch, *, copied: bool) -> torch.Tensor:
        """Log-probabilities of the scored positions."""
        if batch.width < NARROW_SOFTMAX_WIDTH:
            return part - torch.logsumexp(part, dim=-1, keepdim=True)
        return torch.log_softmax(part, dim=-1)

    def zero_mask_needed(self, ref: torch.Tensor | None) -> bool:
        return ref is None or has_zero_probability(ref)

    def not_finite(self, ref: torch.Tensor) -> bool:
        return bool(torch.isnan(ref).any() | torch.isposinf(ref).any())  # log p0 = −inf is a valid p0 = 0

    def terms(self, cur: torch.Tensor, ref: torch.Tensor, batch: ScoredBatch) -> tuple[torch.Tensor, float]:
        # KL(p0 ‖ q) per position = −Σ_v p0 (log q − log p0), in place on the chunk, negated once per row after the
        # sum (round-to-nearest is symmetric: the same bits as negating every term). Terms with p0 = 0 are 0, also
        # where log q = −inf (0 · inf would be NaN); the mask is skipped for batches whose anchor has no p0 = 0.
        p0 = ref.exp()
        terms = cur.sub_(ref).mul_(p0)
        if batch.p0_has_zeros:
            terms.masked_fill_(p0 == 0, 0.0)
        return terms, -1.0


class OutputScorer(PositionScorer):
    """"output": Σ over scored positions of the squared Euclidean distance from the anchor's outputs
    (``last_hidden_state`` if present, else ``logits``)."""

    name = "output"
    keys = HIDDEN_KEYS

    def missing_key_message(self, outputs: Any) -> str:
        return f"behavior='output' found no last_hidden_state or logits in {list(outputs.keys())}"

    def terms(self, cur: torch.Tensor, ref: torch.Tensor, batch: ScoredBatch) -> tuple[torch.Tensor, float]:
        terms = cur.sub_(ref)
        terms.mul_(terms)
        return terms, 1.0


def make_scorer(
    behavior: BehaviorSpec, *, compute_dtype: torch.dtype, causal: bool, encoder_decoder: bool
) -> Scorer:
    """The scorer for a ``behavior`` spec: "kl", "loss", "output" or a callable ``(outputs, batch) -> scalar``."""
    if isinstance(behavior, str):
        check_choice("behavior", behavior, BEHAVIORS)
        if behavior == "loss":
            return LossScorer(compute_dtype=compute_dtype)
        kind = KLScorer if behavior == "kl" else OutputScorer
        return kind(compute_dtype=compute_dtype, causal=causal, encoder_decoder=encoder_decoder)
    if callable(behavior):
        return CallableScorer(behavior, compute_dtype=compute_dtype)
    raise TypeError(f"behavior must be one of {BEHAVIORS} or a callable, got {type(behavior).__name__}")


__all__ = [
    "BEHAVIORS",
    "BehaviorSpec",
    "CallableScorer",
    "KLScorer",
    "LossScorer",
    "OutputScorer",
    "PositionScorer",
    "ScalarScorer",
    "ScoredBatch",
    "Scorer",
    "ScoringError",
    "has_zero_probability",
    "make_scorer",
    "position_chunks",
]
