"""Per-item negative log-likelihood −ln p(y | x) from a model's logits, in chunks within a memory budget.

This is the code length of the items a batch scores (Dawid 1984: an item coded with predictive distribution p
costs −log2 p(y) bits). It is computed from the logits, never from the training loss, so label smoothing or a
custom loss does not change it. The scored positions follow the same rules as the KL behaviour of the local-volume
estimate (:func:`hfvolume.models.outputs.scored_position_mask`): ``labels == -100`` is ignored, the attention mask
(the decoder's for encoder-decoders) removes padding, a causal LM's logits at position t are scored against the
label at t + 1 (so its last position is never scored), and a ``shift_labels`` entry is used as given.

torch only (no Hugging Face imports); float64 sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from hfvolume.models.outputs import IGNORE_INDEX, scored_position_mask

DEFAULT_WORKING_MEMORY = 32 * 2**20  # bytes of [rows, C] temporaries per chunk


@dataclass(frozen=True)
class ItemNll:
    """Code length of one batch.

    nats: float64, Σ −ln p(y) over the scored items (tokens of a sequence, labels of a multi-label example, or the
        one label of a classified example): ``[B]`` per batch row, or a 0-dim batch total.
    items: float64, the number of scored items, same shape as ``nats``.
    num_classes: C, the number of values one item can take (V for a language model, 2 for a multi-label head).
    """

    nats: torch.Tensor
    items: torch.Tensor
    num_classes: int


def _targets(logits: torch.Tensor, batch: Mapping[str, Any], *, causal: bool, encoder_decoder: bool) -> torch.Tensor:
    """``[prod(lead)]`` int64 class targets aligned with the logits' rows, ``IGNORE_INDEX`` where not scored."""
    lead = tuple(logits.shape[:-1])
    labels, shift = batch.get("labels"), batch.get("shift_labels")
    ref = shift if isinstance(shift, torch.Tensor) else labels
    if not isinstance(ref, torch.Tensor):
        raise ValueError("no labels in the batch: the code length needs the labels the model is trained on")
    if ref.is_floating_point():
        raise ValueError(
            f"floating-point labels (dtype {ref.dtype}) with a single-label head: a regression or soft-label target "
            "has no discrete code length (a density needs a quantisation step); classify, or use a multi-label head"
        )
    if logits.shape[-1] < 2:
        raise ValueError(f"logits with {logits.shape[-1]} class: a code length needs C ≥ 2 (a regression head?)")
    device = logits.device
    if len(lead) == 2:
        if isinstance(shift, torch.Tensor) and tuple(shift.shape) == lead:
            targets = shift.to(device)
        elif isinstance(labels, torch.Tensor) and tuple(labels.shape) == lead:
            labels = labels.to(device)
            if causal:
                targets = torch.full_like(labels, IGNORE_INDEX)
                targets[:, :-1] = labels[:, 1:]
            else:
                targets = labels
        else:
            raise ValueError(f"labels of shape {tuple(ref.shape)} do not match logits of shape {tuple(logits.shape)}")
        mask = scored_position_mask(batch, lead, device=device, causal=causal, encoder_decoder=encoder_decoder)
        targets = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX))
    elif tuple(ref.shape) == lead:
        targets = ref.to(device)
    else:
        raise ValueError(f"labels of shape {tuple(ref.shape)} do not match logits of shape {tuple(logits.shape)}")
    return targets.reshape(-1).long()


def _rows_per_chunk(num_classes: int, dtype: torch.dtype, cast: bool, working_memory: int) -> int:
    # cross_entropy materialises a [rows, C] log-softmax, plus the cast copy when the logits are half precision.
    per_row = num_classes * torch.finfo(dtype).bits // 8 * (2 if cast else 1)
    return max(1, int(working_memory) // per_row)


def _mixture_nll(x: torch.Tensor, t: torch.Tensor, mixture: float) -> torch.Tensor:
    """``−ln((1 − ε) p(t) + ε / C)`` per row of ``x`` ``[rows, C]``; 0 where ``t`` is ignored."""
    keep = t != IGNORE_INDEX
    log_p = torch.log_softmax(x, dim=-1).gather(1, torch.where(keep, t, 0).unsqueeze(1)).squeeze(1)
    mixed = torch.logaddexp(log_p + math.log1p(-mixture), torch.full_like(log_p, math.log(mixture / x.shape[-1])))
    return torch.where(keep, -mixed, torch.zeros_like(mixed))


def _single_label(logits: torch.Tensor, targets: torch.Tensor, working_memory: int, mixture: float) -> torch.Tensor:
    """``[prod(lead)]`` float64 −ln p per logits row, a chunk of rows at a time."""
    num_classes = logits.shape[-1]
    flat = logits.reshape(-1, num_classes)  # a view for contiguous logits: no copy of the whole batch
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cast = flat.dtype != dtype
    step = _rows_per_chunk(num_classes, dtype, cast, working_memory)

    def chunk(start: int) -> torch.Tensor:
        x, t = flat[start : start + step].to(dtype), targets[start : start + step]
        if mixture > 0.0:
            return _mixture_nll(x, t, mixture)
        return F.cross_entropy(x, t, ignore_index=IGNORE_INDEX, reduction="none")

    if flat.shape[0] <= step:  # one chunk (a classifier's batch): no output buffer
        return chunk(0).to(torch.float64)
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[0], step):
        out[start : start + step] = chunk(start)
    return out


def _multi_label(logits: torch.Tensor, labels: Any, mixture: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent Bernoullis, one per label: ``[B]`` nats and ``[B]`` items (1 bit per label is uniform)."""
    _check_multi_label(logits, labels)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z, y = logits.to(dtype), labels.to(device=logits.device, dtype=dtype)
    nll = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if mixture > 0.0:
        nll = -torch.logaddexp(-nll + math.log1p(-mixture), torch.full_like(nll, math.log(mixture / 2.0)))
    rows = logits.shape[0]
    nats = nll.to(torch.float64).reshape(rows, -1).sum(1)
    return nats, _multi_label_items(logits)


def _check_multi_label(logits: torch.Tensor, labels: Any) -> None:
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape):
        shape = None if not isinstance(labels, torch.Tensor) else tuple(labels.shape)
        raise ValueError(f"multi-label labels of shape {shape} do not match logits of shape {tuple(logits.shape)}")


def _multi_label_items(logits: torch.Tensor) -> torch.Tensor:
    rows = logits.shape[0]
    per_row = float(logits[0].numel()) if rows else 0.0
    return torch.full((rows,), per_row, dtype=torch.float64, device=logits.device)


def _check_options(working_memory: Any, mixture: Any, logits: Any) -> None:
    if isinstance(working_memory, bool) or not isinstance(working_memory, int) or working_memory < 0:
        raise ValueError(f"working_memory must be a non-negative int of bytes, got {working_memory!r}")
    if isinstance(mixture, bool) or not isinstance(mixture, (int, float)) or not 0.0 <= mixture < 1.0:
        raise ValueError(f"mixture must be in [0, 1), got {mixture!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(f"logits must be a tensor [B, ..., C], got {getattr(logits, 'shape', type(logits))}")


def item_nll(
    logits: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    causal: bool = False,
    encoder_decoder: bool = False,
    multi_label: bool = False,
    working_memory: int = DEFAULT_WORKING_MEMORY,
    mixture: float = 0.0,
    per_row: bool = False,
) -> ItemNll:
    """Code length of a batch, in nats, from ``logits`` ``[B, ..., C]`` and the batch's labels.

    batch: the inputs (``labels`` ``[B]`` or ``[B, T]``, optional ``shift_labels``, ``attention_mask``,
        ``decoder_attention_mask``), read before the model or a label smoother could pop them.
    causal: the model scores logits[t] against labels[t + 1] (a causal LM); encoder_decoder: use the decoder's mask.
    multi_label: ``problem_type="multi_label_classification"``: C independent Bernoullis per example.
    working_memory: bytes of ``[rows, C]`` float temporaries per chunk (at least one row per chunk).
    mixture: ε ∈ [0, 1): code with ``(1 − ε) p + ε / C``, which caps an item's cost at ``log2(C / ε)`` bits.
    per_row: return ``[B]`` sums per batch row instead of 0-dim batch totals.

    Half-precision logits are upcast to float32 a chunk at a time; float64 logits stay float64 (exact oracles).
    Runs under ``torch.no_grad``: nothing reaches the autograd graph.
    """
    _check_options(working_memory, mixture, logits)
    with torch.no_grad():
        logits = logits.detach()
        if multi_label:
            nats, items = _multi_label(logits, batch.get("labels"), float(mixture))
            return ItemNll(nats if per_row else nats.sum(), items if per_row else items.sum(), 2)
        targets = _targets(logits, batch, causal=causal, encoder_decoder=encoder_decoder)
        nll = _single_label(logits, targets, working_memory, float(mixture))
        scored = targets != IGNORE_INDEX
        if per_row:
            rows = logits.shape[0]
            nats, items = nll.reshape(rows, -1).sum(1), scored.reshape(rows, -1).sum(1).to(torch.float64)
        else:
            nats, items = nll.sum(), scored.sum().to(torch.float64)
        return ItemNll(nats, items, int(logits.shape[-1]))


def count_items(
    logits: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    causal: bool = False,
    encoder_decoder: bool = False,
    multi_label: bool = False,
) -> torch.Tensor:
    """0-dim float64: the number of items :func:`item_nll` would score in this batch, without coding them."""
    _check_options(0, 0.0, logits)
    with torch.no_grad():
        if multi_label:
            _check_multi_label(logits, batch.get("labels"))
            return _multi_label_items(logits).sum()
        targets = _targets(logits.detach(), batch, causal=causal, encoder_decoder=encoder_decoder)
        return (targets != IGNORE_INDEX).sum().to(torch.float64)


__all__ = ["DEFAULT_WORKING_MEMORY", "ItemNll", "count_items", "item_nll"]
