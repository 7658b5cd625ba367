"""Hugging Face model conventions: where an output keeps its logits, loss or hidden states, and which positions of
an output are scored.

Everything here follows ``transformers``' own rules, so it changes when they do:

* outputs are ``ModelOutput`` mappings (``logits``, ``loss``, ``last_hidden_state``), plain tensors, or tuples
  whose first element is the main tensor;
* label value ``-100`` (:data:`IGNORE_INDEX`) marks a position no loss is computed on;
* a causal LM scores ``logits[t]`` against ``labels[t + 1]`` (it shifts labels internally), so its last position is
  never scored; a ``shift_labels`` entry is already aligned with the logits;
* PEFT wrappers expose the wrapped model through ``get_base_model()``.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn

IGNORE_INDEX = -100  # the label value Hugging Face losses ignore
LOGITS_KEYS = ("logits",)
HIDDEN_KEYS = ("last_hidden_state", "logits")  # what an "output" distance compares, in order of preference


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a PEFT wrapper (``get_base_model()``), else ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_config(model: nn.Module) -> Any:
    """The (unwrapped) model's ``config``, or None for plain torch modules."""
    return getattr(unwrap_model(model), "config", None)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``config.is_encoder_decoder`` is set (its decoder attention mask then selects the scored positions)."""
    return bool(getattr(model_config(model), "is_encoder_decoder", False))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` shifts labels internally (logits[t] scored against labels[t + 1]).

    Rule: not an encoder-decoder, and the class (or a PEFT wrapper's base class) is a value of transformers'
    causal-LM auto mapping, or its name ends with "ForCausalLM" / "LMHeadModel", or ``config.is_decoder`` is set.
    """
    config = model_config(model)
    if getattr(config, "is_encoder_decoder", False):
        return False
    names = {type(model).__name__, type(unwrap_model(model)).__name__}
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal: set[str] = set()
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            causal.update(v if isinstance(v, (tuple, list)) else (v,))
        if names & causal:
            return True
    except ImportError:  # transformers layout changed: the name rules below still apply
        pass
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return True
    return bool(getattr(config, "is_decoder", False))


def accepts_use_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``use_cache`` (Hugging Face decoders: False saves the unused KV cache)."""
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def output_tensor(outputs: Any, keys: Sequence[str]) -> torch.Tensor | None:
    """The main tensor of a model output, or None when there is none.

    A tensor is its own main tensor; a mapping (``ModelOutput``, dict) gives its entry under the first of ``keys``
    that holds a tensor (None if none does); another object its attribute of that name; a tuple/list its first
    element when that is a tensor.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return next((outputs[k] for k in keys if isinstance(outputs.get(k), torch.Tensor)), None)
    for key in keys:
        value = getattr(outputs, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    return None


def loss_of(outputs: Any) -> Any:
    """The ``loss`` a Hugging Face model returns when its batch has labels (None when it has none)."""
    return outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits ``[B, C]`` or ``[B, T, V]`` of a model output (:func:`output_tensor` with key ``logits``)."""
    logits = output_tensor(outputs, LOGITS_KEYS)
    if logits is None:
        raise TypeError(f"cannot find logits in the model output of type {type(outputs).__name__}")
    if logits.ndim not in (2, 3):
        raise ValueError(f"logits must be [B, C] or [B, T, V], got shape {tuple(logits.shape)}")
    return logits


def scored_position_mask(
    batch: Any,
    lead: tuple[int, ...],
    *,
    device: torch.device,
    causal: bool,
    encoder_decoder: bool,
    use_labels: bool = True,
) -> torch.Tensor:
    """Boolean mask ``lead`` over an output's leading dims: the positions a behaviour scores.

    ``attention_mask != 0`` (``decoder_attention_mask`` for encoder-decoders) where its shape equals ``lead``, i.e.
    no padding token is scored; with ``use_labels`` and ``[B, T]`` outputs also ``labels != -100``, shifted for
    causal LMs (``labels[t + 1]`` decides position t, so the last position is never scored); a ``shift_labels``
    entry is used as given. Shared by the KL behaviour and the Fisher proposal, so the Fisher is the curvature of
    exactly the Δ that is measured.
    """
    mask = torch.ones(lead, dtype=torch.bool, device=device)
    if not isinstance(batch, Mapping):
        return mask
    am = batch.get("decoder_attention_mask") if encoder_decoder else batch.get("attention_mask")
    if isinstance(am, torch.Tensor) and tuple(am.shape) == lead:
        mask &= am.to(device) != 0
    if use_labels and len(lead) == 2:
        shift, labels = batch.get("shift_labels"), batch.get("labels")
        if isinstance(shift, torch.Tensor) and tuple(shift.shape) == lead:
            mask &= shift.to(device) != IGNORE_INDEX  # already aligned with the logits by the caller
        elif isinstance(labels, torch.Tensor) and tuple(labels.shape) == lead:
            labels = labels.to(device)
            if causal:
                nxt = torch.full_like(labels, IGNORE_INDEX)
                nxt[:, :-1] = labels[:, 1:]
                mask &= nxt != IGNORE_INDEX
            else:
                mask &= labels != IGNORE_INDEX
    return mask


__all__ = [
    "HIDDEN_KEYS",
    "IGNORE_INDEX",
    "LOGITS_KEYS",
    "accepts_use_cache",
    "is_causal_lm",
    "is_encoder_decoder",
    "logits_of",
    "loss_of",
    "model_config",
    "output_tensor",
    "scored_position_mask",
    "unwrap_model",
]
