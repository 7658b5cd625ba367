"""The local-volume metric for 🤗 ``evaluate``: ``evaluate.load(hfvolume.METRIC_PATH)``.

A thin face over :func:`hfvolume.estimate_local_volume`: this module only turns the accumulated inputs into padded
batches, loads a model given as a local path, forwards the estimator's own keyword arguments unchanged and
returns the result as plain Python numbers. Every number comes from the library, so the metric, the Trainer
callback and the CLI cannot drift apart.

evaluate copies this file alone into its modules cache and scans its imports with a regular expression, so it
imports only installed packages, one per line, and nothing relative.
"""
from __future__ import annotations

import inspect
import math
import os
from typing import Any, Mapping, Sequence

import datasets
import evaluate
import torch
from torch.nn.utils.rnn import pad_sequence

from hfvolume.integrations.loading import TASKS, load_local_model
from hfvolume.measure.local_volume import estimate_local_volume
from hfvolume.models.outputs import is_causal_lm

_CITATION = """\
@article{scherlis2025estimating,
  title={Estimating the Probability of Sampling a Trained Neural Network at Random},
  author={Scherlis, Adam and Belrose, Nora},
  journal={arXiv preprint arXiv:2501.18812},
  year={2025}
}
"""

_DESCRIPTION = """\
Local volume of a trained network (Scherlis & Belrose, arXiv 2501.18812): the log-probability, under a prior over
parameters, of the star-shaped region around the trained weights where the network still behaves like itself
(by default: mean KL divergence of its next-token / class distributions on the given inputs at most `cutoff`
nats). Its negative in bits is the network's information content. Estimated by importance-sampled random
directions with `hfvolume.estimate_local_volume`; this metric returns exactly what that function returns.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the evaluation inputs (the model's outputs are computed here, so these are inputs, not
        predictions): a list of texts (needs `tokenizer`) or a list of token-id lists. Accumulate them with
        `add` / `add_batch`; in distributed mode every process adds its share and process 0 measures.
    model: a `torch.nn.Module` (e.g. any 🤗 model) or a local model directory (loaded with the Auto classes,
        `local_files_only=True`). Required. Left bit-for-bit unchanged.
    tokenizer: a 🤗 tokenizer or a local directory; needed for texts (defaults to the model directory when
        `model` is a path). Special tokens are added as the tokenizer does by default.
    batch_size (int, default 8): examples per padded batch (right padding with an attention mask).
    max_length (int, optional): truncate every example to this many tokens.
    pad_token_id (int, optional): id used for padding (default: the tokenizer's, else the model config's,
        else 0; padded positions are masked out, so the value does not change the result).
    task (str, default "auto"): model head when `model` is a path: "auto" (from config.architectures),
        "causal-lm", "sequence-classification" or "feature-extraction".
    return_per_direction (bool, default False): also return the per-direction lists.
    any keyword argument of `hfvolume.estimate_local_volume` except `data`, `batch_size` and `collate_fn`:
        `behavior`, `cutoff`, `prior`, `sigma`, `prior_mean`, `n_directions`, `preconditioner`, `optimizer`
        (a torch optimizer or a Trainer checkpoint directory with optimizer.pt, for preconditioner="adam"),
        `mixture`, `params`, `seed`, `rtol`, ... with that function's defaults.
Returns:
    log_volume (float, nats), information_content_bits (float), log_volume_lower_bound (float, nats, holds with
    probability `confidence`), confidence, ess (effective sample size), log_volume_std (bootstrap, nats),
    norm_term (nats), n_params, n_directions, n_saturated, n_unbounded, n_failed, forward_passes, wall_time_s,
    settings (JSON-safe: every setting needed to reproduce the number), and with `return_per_direction=True`
    log_estimates, radii, deltas, log_weights, flags, evaluations, nonfinite (lists, one entry per direction).
    Processes other than 0 return None.
Examples:
    >>> import evaluate, hfvolume
    >>> metric = evaluate.load(hfvolume.METRIC_PATH)
    >>> metric.add_batch(predictions=["the cat sat", "on the mat"])
    >>> out = metric.compute(model=model, tokenizer=tokenizer, n_directions=64, seed=0)
    >>> out["information_content_bits"]
"""

# The metric's own settings; everything else must be a keyword argument of estimate_local_volume.
_METRIC_DEFAULTS: dict[str, Any] = {
    "batch_size": 8,
    "max_length": None,
    "pad_token_id": None,
    "task": "auto",
    "return_per_direction": False,
}
# estimate_local_volume's parameters the metric fills itself (data and its batching).
_RESERVED = {"model", "data", "batch_size", "collate_fn"}
_ESTIMATOR_SETTINGS = frozenset(inspect.signature(estimate_local_volume).parameters) - _RESERVED
_PER_DIRECTION = ("log_estimates", "radii", "deltas", "log_weights", "flags", "evaluations", "nonfinite",
                  "running_log_volume")


class LocalVolume(evaluate.Metric):
    """Local volume / information content of a model on the accumulated inputs (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
            ],
            reference_urls=["https://arxiv.org/abs/2501.18812"],
        )

    def add_batch(self, *, predictions: Sequence[Any] | None = None, references: Any = None, **kwargs: Any) -> None:
        """Add a batch of evaluation inputs (texts or token-id lists) to the metric's stack."""
        # evaluate infers the feature type from the first example and fails with an IndexError on an empty first
        # batch; later empty batches are harmless no-ops.
        if predictions is not None and len(predictions) == 0 and self.writer is None:
            raise ValueError("predictions is empty: add at least one text or token-id list")
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(
        self, *, predictions: Sequence[Any] | None = None, references: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Measure on the gathered ``predictions`` (process 0 only); ``references`` are not used."""
        metric_kw = {k: kwargs.pop(k, v) for k, v in _METRIC_DEFAULTS.items()}
        model_spec = kwargs.pop("model", None)
        tokenizer_spec = kwargs.pop("tokenizer", None)
        unknown = sorted(set(kwargs) - _ESTIMATOR_SETTINGS)
        if unknown:
            raise ValueError(
                f"unknown settings {unknown}; the metric accepts model, tokenizer, {sorted(_METRIC_DEFAULTS)} and "
                f"the keyword arguments of hfvolume.estimate_local_volume: {sorted(_ESTIMATOR_SETTINGS)}"
            )
        batch_size = _positive_int("batch_size", metric_kw["batch_size"])
        max_length = None if metric_kw["max_length"] is None else _positive_int("max_length", metric_kw["max_length"])
        if metric_kw["task"] not in TASKS:
            raise ValueError(f"unknown task {metric_kw['task']!r}: use one of {TASKS}")
        if not isinstance(metric_kw["return_per_direction"], bool):
            raise TypeError(f"return_per_direction must be a bool, got {metric_kw['return_per_direction']!r}")
        if model_spec is None:
            raise ValueError("compute() needs model=: a torch.nn.Module or a local model directory")
        if predictions is None or len(predictions) == 0:
            raise ValueError("no evaluation inputs: pass predictions= (texts or token-id lists) or add_batch them")

        model = _load_model(model_spec, metric_kw["task"])
        texts = isinstance(predictions[0], str)
        if texts:
            if tokenizer_spec is None and isinstance(model_spec, (str, os.PathLike)):
                tokenizer_spec = model_spec
            if tokenizer_spec is None:
                raise ValueError("predictions are texts: pass tokenizer= (a tokenizer or a local directory)")
            tokenizer = _load_tokenizer(tokenizer_spec)
            ids = _tokenize(tokenizer, predictions, max_length)
        else:
            tokenizer = _load_tokenizer(tokenizer_spec) if tokenizer_spec is not None else None
            ids = [[int(t) for t in row][:max_length] for row in predictions]
        _check_ids(ids, model)
        pad_id = _pad_id(metric_kw["pad_token_id"], tokenizer, model)
        with_labels = kwargs.get("behavior", "kl") == "loss"
        if with_labels and not is_causal_lm(model):
            raise ValueError(
                "behavior='loss' needs labels, which the metric has only for causal LMs (the inputs themselves); "
                "use behavior='kl' or 'output', or hfvolume.estimate_local_volume with labelled batches"
            )
        batches = _padded_batches(ids, batch_size=batch_size, pad_id=pad_id, with_labels=with_labels)

        result = estimate_local_volume(model, batches, **kwargs)

        out: dict[str, Any] = {k: _plain(v) for k, v in result.summary().items()}
        out["confidence"] = float(result.confidence)
        settings = result.to_dict()["settings"]
        settings["metric"] = {
            **{k: metric_kw[k] for k in ("batch_size", "max_length", "task")},
            "pad_token_id": pad_id,
            "inputs": "texts" if texts else "token_ids",
            "n_examples": len(ids),
            "n_tokens": sum(len(row) for row in ids),
            "model": _describe(model_spec),
            "tokenizer": None if tokenizer is None else _describe(tokenizer_spec),
            "estimator_arguments": {k: _describe(v) for k, v in sorted(kwargs.items())},
        }
        out["settings"] = settings
        if metric_kw["return_per_direction"]:
            for name in _PER_DIRECTION:
                out[name] = [_plain(v) for v in getattr(result, name)]
        return out


# ------------------------------------------------------------------------------------------------ helpers
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """Python int / float / str for numpy or torch scalars (evaluate results must serialise)."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int) or (hasattr(value, "dtype") and "int" in str(value.dtype)):
        return int(value)
    return float(value)


def _describe(value: Any) -> Any:
    """A JSON-safe account of a setting's value (objects become their class name, tensors their shape)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    name = getattr(value, "name_or_path", None) or getattr(getattr(value, "config", None), "_name_or_path", None)
    return f"{type(value).__name__}({name})" if name else type(value).__name__


def _load_model(spec: Any, task: str) -> torch.nn.Module:
    if isinstance(spec, torch.nn.Module):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model must be a torch.nn.Module or a local directory, got {type(spec).__name__}")
    path = os.fspath(spec)
    if not os.path.isdir(path):
        raise ValueError(f"model={path!r} is not a local directory (the metric never downloads models)")
    return load_local_model(path, task)[0]


def _load_tokenizer(spec: Any) -> Any:
    if not isinstance(spec, (str, os.PathLike)):
        if not callable(spec):
            raise TypeError(f"tokenizer must be a tokenizer or a local directory, got {type(spec).__name__}")
        return spec
    path = os.fspath(spec)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer={path!r} is not a local directory (the metric never downloads tokenizers)")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    # Unpadded ids: padding is done below, identically for texts and token ids, so the tokenizer's own padding
    # settings (and a missing pad token) do not matter and the user's tokenizer is not modified.
    encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length, padding=False)
    return [list(row) for row in encoded["input_ids"]]


def _check_ids(ids: list[list[int]], model: torch.nn.Module) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"example {i} has no tokens: every input needs at least one token")
        low, high = min(row), max(row)
        if low < 0 or (isinstance(vocab, int) and high >= vocab):
            bad = low if low < 0 else high
            raise ValueError(f"example {i} has token id {bad}, outside the model's vocabulary [0, {vocab})")


def _pad_id(explicit: Any, tokenizer: Any, model: torch.nn.Module) -> int:
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int):
            raise ValueError(f"pad_token_id must be an int, got {explicit!r}")
        return explicit
    for candidate in (getattr(tokenizer, "pad_token_id", None),
                      getattr(getattr(model, "config", None), "pad_token_id", None)):
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
    return 0


def _padded_batches(
    ids: list[list[int]], *, batch_size: int, pad_id: int, with_labels: bool
) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of ``batch_size`` examples, right-padded: ``input_ids`` / ``attention_mask`` int64
    ``[B, T_max]`` (and ``labels`` = the ids with -100 at padding, for the causal-LM loss)."""
    batches = []
    for start in range(0, len(ids), batch_size):
        rows = [torch.tensor(r, dtype=torch.long) for r in ids[start : start + batch_size]]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if with_labels:
            batch["labels"] = input_ids.masked_fill(mask == 0, -100)
        batches.append(batch)
    return batches
