"""Behaviour functions Δ(θ) from a model and data: the bridge from (model, data) to the estimator's ``fn``.

:class:`ModelBehavior` is a callable ``[K, D] → [K]``: row k of ``thetas`` is a flat vector of the measured
parameters (layout from a :class:`~hfvolume.params.ParameterView`); the value is the behaviour of the model with
those parameters on a fixed, materialised set of batches (ESTIMATOR.md §1):

* ``"kl"`` (default): mean over scored positions of KL(p_θ0(·|x) ‖ p_θ(·|x)), in nats;
* ``"loss"``: the model's own loss, averaged over batches weighted by their number of examples;
* ``"output"``: mean over scored positions of the squared Euclidean distance from the anchor's outputs;
* a callable ``behavior(outputs, batch) -> scalar tensor``, averaged like ``"loss"``.

The estimator subtracts fn(θ0) itself; ``anchor_value`` is that value (exactly 0 for "kl" and "output").

How the model is evaluated, and why:

* ``torch.func.functional_call`` with the measured parameters taken from the rows (zero-copy views; a cast only
  when the parameter's dtype differs from the row's, i.e. bf16/fp16 models) and every other parameter and buffer
  the model's own. The model's parameters are never written to: in-place ``θ += δ; θ -= δ`` drifts in floating
  point, and an exception mid-forward would leave a perturbed model behind.
* Several rows per forward pass with ``torch.func.vmap`` over the rows (the data are shared, not batched). If vmap
  fails on this model (some code paths are not vmappable) the whole ModelBehavior uses a per-row loop instead —
  decided once, at construction, because the two paths differ in the last bits and a behaviour must not change
  path half-way through a run.
* **Row invariance**: a row's value never depends on which other rows are in the call, on K or on the chunking.
  The radius search makes discrete decisions on these values, so batch-dependent rounding would make a
  direction's result depend on the batch size. Measured on CPU (torch 2.13, MKL): vmap over K rows gives per-row
  outputs bitwise equal to vmap over one row for a GPT-NeoX LM, a BERT classifier and an MLP, for every K and
  offset tried (the plain, un-vmapped forward differs from both by ~1e-7 for the transformers, so the anchor
  outputs are computed through the same path as every other row) — but not for all-MiniLM-L6-v2 with two
  threads, where one-row passes differ from multi-row ones (which agree with each other). The construction-time
  check (``_check_row_invariance``) detects that and switches the behaviour to the per-row loop (recomputing the
  anchor that way). Reductions that could change their summation order with the number of rows are done
  per row (a fixed-shape float64 ``sum`` per row, or one batched sum over rows small enough that torch reduces
  each serially). On accelerators, where library kernels may be chosen by batch count, chunks are padded to a
  fixed size by repeating the last row (``pad_chunks="auto"``), so every forward has the same shape.
* The model must be in eval mode (dropout/batch-norm in training mode make Δ random and batch-norm would update
  its running statistics). Saving and restoring the mode is the caller's job; construction raises ``ValueError``
  and a call raises ``RuntimeError`` if any submodule is in training mode.

Memory model (per forward pass of C rows on one batch, all estimated from the anchor pass at construction):
    C · (D_cast + max(A, R)) bytes, plus fixed costs: the anchor cache and the materialised batches. Here
    D_cast = bytes of the measured parameters whose dtype differs from the rows' (0 for float32/float64 models:
    the rows are used as views; bf16/fp16 models get a cast copy per row), A = 4 × the largest module output
    seen in the anchor pass (a layer's input, output and two temporaries alive at once) + the attention scores
    and their softmax, 2·B·heads·T² elements, when the config names ``num_attention_heads`` (the vmap fallback
    for SDPA materialises them), and R = the raw outputs + 3 chunks of scored positions (the gathered chunk, and
    for "kl" p0 = exp(log p0) and its zero mask): the KL and distance terms are reduced a chunk of positions at
    a time (< 32768 elements per row, one position for wider rows), so beyond the model's own outputs they cost
    O(C · 32768) elements however many positions and classes there are. C is the largest count with
    C · (D_cast + max(A, R)) ≤ ``memory_bytes_limit``, capped at ``MAX_DIRECTIONS_PER_PASS``. Nothing is kept
    between calls except the anchor cache (log p0 or the outputs at the scored positions, in the compute dtype),
    so memory does not grow with the number of directions evaluated; the ``[K, D]`` rows belong to the caller.
    Measured with the profiler's allocation events (benchmarks/bench_models.py): a whole estimate on a 1.3M-
    parameter GPT-NeoX (16 × 64 tokens, V = 2048) needs 9.2 MB of tensors beyond a plain forward pass over
    the same data — the 5 MB anchor copy, one 5 MB direction and the 8 MB anchor cache, less the log-softmax
    copy the plain pass makes.
"""
from __future__ import annotations

import inspect
import logging
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from hfvolume.estimator import perturbation_dtype  # one rule for the rows' dtype, shared with the core
from hfvolume.params import ParameterView

logger = logging.getLogger("hfvolume")

BEHAVIORS = ("kl", "loss", "output")
ANCHOR_CACHE_MODES = ("auto", "device", "cpu", "recompute")
MAX_DIRECTIONS_PER_PASS = 64  # beyond this, vmap gains nothing on CPU and chunks only add padding waste on GPU
# On CPU, rows per vmapped pass are also capped so that one activation tensor of the pass (rows × the largest
# module output of one row) stays within about one core's L2 cache. Measured on the digits MLP (torch 2.13, 2 threads,
# 2 MiB L2 per core, batch of 256 examples): 45 µs per row at 32 rows per pass, 88–115 µs at 40–64 rows; at one
# thread 64 rows were 7% faster than 32.
PASS_CACHE_BYTES = 2 * 2**20
DEFAULT_MEMORY_BYTES_LIMIT = 2 * 2**30  # activations per forward pass
DEFAULT_CACHE_BYTES_LIMIT = 2**30  # anchor cache kept on the model's device
DEFAULT_HOST_CACHE_BYTES_LIMIT = 8 * 2**30  # anchor cache kept in host memory ("cpu") when the device one is full
DEFAULT_DATASET_BATCH_SIZE = 8
IGNORE_INDEX = -100  # the label value Hugging Face losses ignore
_NARROW_SOFTMAX_WIDTH = 32  # "kl" log-probs of fewer classes use x − logsumexp(x) (faster there, see _scored)
_SERIAL_REDUCTION_NUMEL = 32768  # torch's parallel grain size: smaller reductions run serially, for any C

BehaviorSpec = Union[str, Callable[[Any, Any], torch.Tensor]]

# torch warns once that scaled_dot_product_attention has no vmap batching rule and runs it row by row; that is
# expected here (and is what keeps the rows independent), so it is not shown to users.
_SDPA_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


def _has_zero_probability(log_p: torch.Tensor) -> bool:
    """Whether exp underflows to 0 anywhere in ``log_p`` (exp is monotone: its minimum decides, without a
    temporary of the tensor's size)."""
    return log_p.numel() > 0 and bool(torch.exp(log_p.min()) == 0)


class _SetupError(ValueError):
    """A user error found while evaluating the anchor: never a reason to fall back from vmap to the loop."""


def smallest_relative_step(view: ParameterView) -> float:
    """Resolution of the measured parameters: ``torch.finfo(dtype).eps`` of the coarsest measured dtype.

    A perturbation δ_i with |δ_i| < eps/2 · |θ_i| rounds back to θ_i when the row is cast to the parameter's dtype
    (bf16: eps = 2^-7 ≈ 7.8e-3, fp16: 2^-10, float32: 2^-23), so the behaviour cannot see it. Callers can compare
    the radii they search against this to warn that a cutoff is below what the model's dtype resolves.
    """
    return max(torch.finfo(dt).eps for dt in view.dtypes)


# ---------------------------------------------------------------------------------------------- data handling
@dataclass
class _Batch:
    """One materialised batch (on the model's device) and what the behaviour needs to score it."""

    raw: Any  # the batch as the user gave it (dict / tuple / tensor), moved to the device; passed to callables
    args: tuple
    kwargs: dict
    n_examples: int
    index: torch.Tensor | None = None  # [N] flat indices of the scored positions into the output's leading dims
    all_scored: bool = False  # every position is scored: chunks are slices, no gather
    width: int = 1  # size of the output's last dim (V for "kl", H for "output")
    n_scored: int = 0
    anchor: torch.Tensor | None = None  # cached anchor reference [N, width] ("kl": log-probs, "output": outputs)
    anchor_value: torch.Tensor | None = None  # [1] float64 anchor value ("loss" / callable)
    p0_has_zeros: bool = True  # "kl": some anchor probability underflows to 0 (its terms need masking)


@dataclass
class _Anchor:
    """The anchor's scored reference on one batch: ``ref`` [N, width] ("kl": log p0; p0 = exp(ref) is formed a
    chunk of positions at a time when needed, so it is never held whole)."""

    ref: torch.Tensor


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):  # dicts, BatchEncoding
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj if obj.ndim > 0 else None
    if isinstance(obj, Mapping):
        # Prefer the canonical input keys: a dict's first tensor could be a per-batch scalar or a label vector.
        for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"):
            if isinstance(obj.get(key), torch.Tensor) and obj[key].ndim > 0:
                return obj[key]
        values: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        return None
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _take_first(obj: Any, n: int, full: int) -> Any:
    """The first ``n`` examples of a batch of ``full``: slices every tensor/list whose leading size is ``full``."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.ndim > 0 and obj.shape[0] == full else obj
    if isinstance(obj, Mapping):
        return {k: _take_first(v, n, full) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if len(obj) == full and not any(isinstance(v, torch.Tensor) for v in obj):
            return type(obj)(obj[:n]) if type(obj) in (list, tuple) else obj
        return type(obj)(_take_first(v, n, full) for v in obj) if type(obj) in (list, tuple) else obj
    return obj


def _hf_dataset_format(data: Any) -> str | None | bool:
    """False if ``data`` is not a 🤗 ``datasets`` dataset, else its format type (None when unformatted)."""
    mod = type(data).__module__ or ""
    if not mod.startswith("datasets"):
        return False
    fmt = getattr(data, "format", None)
    if isinstance(fmt, Mapping):
        return fmt.get("type")
    formatting = getattr(data, "_formatting", None)
    return getattr(formatting, "format_type", None)


def _batch_source(data: Any, batch_size: int | None, collate_fn: Callable | None) -> Iterable[Any]:
    """An iterable of batches for any accepted ``data`` (see :class:`ModelBehavior`)."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    fmt = _hf_dataset_format(data)
    is_example_dataset = fmt is not False or (
        isinstance(data, (Dataset, IterableDataset)) and not isinstance(data, DataLoader)
    )
    if is_example_dataset:
        if fmt is not False and collate_fn is None and fmt not in ("torch", "pt"):
            raise ValueError(
                "a datasets.Dataset needs collate_fn= (e.g. a DataCollatorWithPadding) or must yield tensors "
                "(dataset.with_format('torch'))"
            )
        bs = DEFAULT_DATASET_BATCH_SIZE if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        # shuffle=False: the evaluated data must not depend on the RNG.
        return DataLoader(data, batch_size=bs, shuffle=False, collate_fn=collate_fn)
    if batch_size is not None or collate_fn is not None:
        raise ValueError(
            "batch_size= and collate_fn= only apply when data is a dataset of examples; "
            f"{type(data).__name__} is used as an iterable of ready batches"
        )
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]  # a single batch given directly
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader, an iterable of batches or a dataset, got {type(data).__name__}")
    return data


def materialize_batches(
    data: Any,
    device: torch.device,
    *,
    max_batches: int | None = None,
    max_examples: int | None = None,
    batch_size: int | None = None,
    collate_fn: Callable | None = None,
) -> tuple[list[Any], bool]:
    """Iterate ``data`` once and return (batches moved to ``device``, whether the last batch was truncated).

    Iteration happens inside ``torch.random.fork_rng`` with Python's ``random`` and numpy's global states saved
    and restored: a shuffling DataLoader draws from the global torch RNG, and the caller's RNG (e.g. the
    Trainer's, which it checkpoints) must not move. With ``max_examples`` the last batch is cut to fit exactly.
    """
    source = _batch_source(data, batch_size, collate_fn)
    batches: list[Any] = []
    truncated = False
    seen = 0
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            iterator = iter(source)
            while True:
                # Check the limits before drawing: a DataLoader's next batch may do real work (workers, RNG).
                if max_batches is not None and len(batches) >= max_batches:
                    break
                if max_examples is not None and seen >= max_examples:
                    break
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                lead = _first_tensor(batch)
                if lead is None:
                    raise ValueError(
                        f"batch {len(batches)} ({type(batch).__name__}) contains no tensor with a batch dim"
                    )
                n = int(lead.shape[0])
                if max_examples is not None and seen + n > max_examples:
                    batch = _take_first(batch, max_examples - seen, n)
                    n, truncated = max_examples - seen, True
                batches.append(_to_device(batch, device))
                seen += n
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if not batches:
        raise ValueError("data is empty: no batch to evaluate the behaviour on")
    return batches, truncated


def _split_batch(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise TypeError(f"a batch must be a dict, a tuple/list or a tensor, got {type(batch).__name__}")


# ---------------------------------------------------------------------------------------------- model helpers
def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT wrappers
    return get_base() if callable(get_base) else model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` shifts labels internally (logits[t] scored against labels[t + 1]).

    Rule: not an encoder-decoder, and the class (or a PEFT wrapper's base class) is a value of transformers'
    causal-LM auto mapping, or its name ends with "ForCausalLM" / "LMHeadModel", or ``config.is_decoder`` is set.
    """
    config = getattr(_unwrap(model), "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    names = {type(model).__name__, type(_unwrap(model)).__name__}
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


def scored_position_mask(
    batch: Any,
    lead: tuple[int, ...],
    *,
    device: torch.device,
    causal: bool,
    encoder_decoder: bool,
    use_labels: bool = True,
) -> torch.Tensor:
    """Boolean mask over an output's leading dims ``lead`` of the positions that are scored (ESTIMATOR.md §1).

    ``attention_mask != 0`` (``decoder_attention_mask`` for encoder-decoders) where its shape equals ``lead``;
    with ``use_labels`` and ``[B, T]`` outputs also ``labels != -100``, shifted for causal LMs (HF scores logits[t]
    against labels[t + 1], so the last position is never scored); a ``shift_labels`` entry is used as given.
    Shared by the KL behaviour and the Fisher proposal, so the Fisher is the curvature of exactly that Δ.
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


def _any_training(model: nn.Module) -> bool:
    return any(m.training for m in model.modules())


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the largest tensor in a module output (logical sizes, also inside vmap)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return max((_tensor_bytes(v) for v in obj), default=0)
    return 0


# ---------------------------------------------------------------------------------------------- the behaviour
class ModelBehavior:
    """Δ's raw values for a model on fixed data: ``fn(thetas [K, D]) -> [K]`` float64 (see the module docstring).

    Args:
        model: a ``torch.nn.Module`` in eval mode (HF ``PreTrainedModel`` or plain torch). Never modified.
        data: a ``torch.utils.data.DataLoader`` or any iterable of batches; a 🤗 ``datasets.Dataset`` or torch
            ``Dataset`` of examples (batched here with ``batch_size`` and ``collate_fn``; a 🤗 dataset needs
            ``collate_fn`` unless formatted as torch); or one batch (a dict or a tensor). Batches that are dicts
            are passed as keyword arguments, tuples/lists positionally, tensors as the single positional argument.
            The batches are materialised once, here, on the model's device.
        view: which parameters the rows hold (None → ``ParameterView.from_model(model)``, the trainable ones).
        behavior: "kl", "loss", "output" or a callable ``(outputs, batch) -> scalar tensor`` (see module docstring).
            The tensor compared: ``outputs.logits`` for "kl"; for "output" ``last_hidden_state`` if present, else
            ``logits``; a plain tensor output is used as is, a tuple's first element.
        max_batches, max_examples: evaluate at most this many batches / examples (the last batch is cut to fit).
        batch_size, collate_fn: only for datasets of examples.
        anchor_cache: where the anchor's scored outputs ("kl" log-probs, "output" outputs) are kept: "device",
            "cpu" (copied to the device per batch), "recompute" (the anchor forward is re-run for every batch of
            every call, costing one more forward pass per batch) or "auto": "device" if the cache fits in
            ``cache_bytes_limit``, else "cpu" (accelerators only) if it fits in ``host_cache_bytes_limit``, else
            "recompute". Ignored for "loss" and callables (their anchor is one number per batch).
        directions_per_pass: rows per vmapped forward pass: "auto" (from ``memory_bytes_limit``, see the module
            docstring, at most ``MAX_DIRECTIONS_PER_PASS``, and on CPU at most ``PASS_CACHE_BYTES`` / the largest
            module output of one row) or a positive int. The per-row loop path always uses 1.
        memory_bytes_limit: activation bytes allowed per forward pass, for "auto".
        pad_chunks: pad every chunk to ``directions_per_pass`` rows (repeating the last row) so all forwards have
            one shape; "auto" = on for non-CPU devices (see "Row invariance").
        use_vmap: False skips vmap and uses the per-row loop.
        vmap_row_bytes_limit: use vmap only while one row's working set — its ``[D]`` direction and perturbed point
            in the row dtype plus its activations (the per-row estimate) — fits in this many bytes; above it every
            pass would carry a single row anyway, so rows are evaluated one at a time by the per-row loop (and
            :meth:`evaluate_along` in place, without a points buffer). None: no limit.
        causal_lm: whether labels are shifted inside the model (None → :func:`is_causal_lm`).

    Scored positions ("kl", "output"), for outputs of shape ``[*lead, width]`` (``[B]`` outputs are ``[B, 1]``):
    every position, restricted to ``attention_mask != 0`` (``decoder_attention_mask`` for encoder-decoders) when
    the mask's shape equals ``lead``; for "kl" with per-token ``labels`` of shape ``lead = [B, T]``, also to
    labels != -100 — for a causal LM position t is scored when ``labels[t + 1] != -100`` (HF's internal shift;
    the last position never), otherwise when ``labels[t] != -100``; a ``shift_labels`` entry is used unshifted.
    Classifier logits ``[B, C]``: one position per example.

    Attributes:
        anchor: ``[D]`` flat θ0 in the row dtype (float32, or float64 for float64 models); pass it to the estimator.
        anchor_value: fn(anchor) as a float (0.0 for "kl" and "output").
        n_examples, n_scored: examples evaluated; scored positions ("kl"/"output", else None).
        forward_passes: model evaluations at one parameter row on one batch (a vmapped pass over C rows counts C,
            padding rows included; anchor passes included).
        model_calls: calls into the model (a vmapped pass counts 1).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        view: ParameterView | None = None,
        *,
        behavior: BehaviorSpec = "kl",
        max_batches: int | None = None,
        max_examples: int | None = None,
        batch_size: int | None = None,
        collate_fn: Callable | None = None,
        anchor_cache: str = "auto",
        cache_bytes_limit: int = DEFAULT_CACHE_BYTES_LIMIT,
        host_cache_bytes_limit: int = DEFAULT_HOST_CACHE_BYTES_LIMIT,
        directions_per_pass: int | str = "auto",
        memory_bytes_limit: int = DEFAULT_MEMORY_BYTES_LIMIT,
        pad_chunks: bool | str = "auto",
        use_vmap: bool = True,
        vmap_row_bytes_limit: int | None = None,
        causal_lm: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if _any_training(model):
            raise ValueError(
                "the model is in training mode: call model.eval() before building a ModelBehavior (dropout would "
                "make Δ random and batch-norm would update its statistics); restore the mode afterwards"
            )
        if isinstance(behavior, str):
            if behavior not in BEHAVIORS:
                raise ValueError(
                    f"unknown behavior {behavior!r}: use one of {BEHAVIORS} or a callable (outputs, batch)"
                )
            self._kind = behavior
        elif callable(behavior):
            self._kind = "callable"
        else:
            raise TypeError(f"behavior must be one of {BEHAVIORS} or a callable, got {type(behavior).__name__}")
        if anchor_cache not in ANCHOR_CACHE_MODES:
            raise ValueError(f"unknown anchor_cache {anchor_cache!r}: use one of {ANCHOR_CACHE_MODES}")
        for name, value in (("max_batches", max_batches), ("max_examples", max_examples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name, value in (
            ("cache_bytes_limit", cache_bytes_limit),
            ("host_cache_bytes_limit", host_cache_bytes_limit),
            ("memory_bytes_limit", memory_bytes_limit),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int (bytes), got {value!r}")
        if directions_per_pass != "auto" and (
            isinstance(directions_per_pass, bool) or not isinstance(directions_per_pass, int) or directions_per_pass < 1
        ):
            raise ValueError(f"directions_per_pass must be 'auto' or a positive int, got {directions_per_pass!r}")
        if pad_chunks not in ("auto", True, False):
            raise ValueError(f"pad_chunks must be 'auto', True or False, got {pad_chunks!r}")

        self.model = model
        self.view = ParameterView.from_model(model) if view is None else view
        if not isinstance(self.view, ParameterView):
            raise TypeError(f"view must be a ParameterView, got {type(self.view).__name__}")
        self._behavior_fn = behavior if self._kind == "callable" else None
        qualname = getattr(behavior, "__qualname__", type(behavior).__name__)
        self._behavior_name = behavior if isinstance(behavior, str) else f"callable:{qualname}"
        # The measured tensors' own dtype/device: rows are cast to them before the forward (bf16/fp16 models,
        # models split over devices).
        params = dict(model.named_parameters(remove_duplicate=False))
        self._targets: list[tuple[torch.dtype, torch.device]] = []
        self._aliases = dict(self.view.aliases)
        for name, shape in zip(self.view.names, self.view.shapes):
            if name not in params:
                raise ValueError(f"the view's parameter {name!r} is not a parameter of {type(model).__name__}")
            if params[name].shape != shape:
                raise ValueError(
                    f"{name!r} has shape {tuple(params[name].shape)} in the model, {tuple(shape)} in the view"
                )
            self._targets.append((params[name].dtype, params[name].device))
        self.device = self.view.device
        self._row_dtype = perturbation_dtype(self.view.dtype)
        # KL and distances in float32 (float64 for float64 models): bf16 log-probs would swamp a 1e-2 cutoff.
        self._compute_dtype = self._row_dtype
        self._causal = is_causal_lm(model) if causal_lm is None else bool(causal_lm)
        self._encoder_decoder = bool(getattr(getattr(_unwrap(model), "config", None), "is_encoder_decoder", False))
        try:
            accepts_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            accepts_use_cache = False

        raw_batches, truncated = materialize_batches(
            data, self.device, max_batches=max_batches, max_examples=max_examples,
            batch_size=batch_size, collate_fn=collate_fn,
        )
        self._batches: list[_Batch] = []
        for raw in raw_batches:
            args, kwargs = _split_batch(raw)
            if accepts_use_cache and isinstance(raw, Mapping) and "use_cache" not in kwargs:
                kwargs["use_cache"] = False  # no KV cache: it is never read here and costs activation memory
            n = int(_first_tensor(raw).shape[0])  # type: ignore[union-attr]  # checked in materialize_batches
            self._batches.append(_Batch(raw=raw, args=args, kwargs=kwargs, n_examples=n))
        self.n_examples = sum(b.n_examples for b in self._batches)
        self._max_batches, self._max_examples, self._truncated = max_batches, max_examples, truncated

        self.forward_passes = 0
        self.model_calls = 0
        self._path = "vmap" if use_vmap else "loop"
        self._inplace_versions: tuple[int, ...] | None = None  # see evaluate_along
        self._inplace_targets: list[tuple[torch.Tensor, slice, torch.Tensor]] | None = None
        self._vmap_error: str | None = None
        self.anchor = self.view.flatten(model, dtype=self._row_dtype)
        self._setup_anchor(anchor_cache, cache_bytes_limit, host_cache_bytes_limit)
        self._path_reason = "use_vmap=False" if not use_vmap else None
        if self._vmap_error is not None:
            self._path_reason = "vmap failed"
        if self._path == "vmap" and vmap_row_bytes_limit is not None:
            one_row = 2 * self.view.n_params * self.anchor.element_size() + self._row_bytes
            if one_row > vmap_row_bytes_limit:
                # Decided from the model and data alone (never from how many directions are asked for), before
                # any row is evaluated: the two paths differ in the last bits, so the anchor is re-evaluated.
                self._path, self._path_reason = "loop", f"one row needs {one_row} bytes > {vmap_row_bytes_limit}"
                self._refresh_anchor()

        if self._path == "loop":
            self._chunk = 1
        elif directions_per_pass == "auto":
            limit = min(MAX_DIRECTIONS_PER_PASS, memory_bytes_limit // max(1, self._row_bytes))
            if self.device.type == "cpu":
                limit = min(limit, PASS_CACHE_BYTES // max(1, self._largest_output))
            self._chunk = int(max(1, limit))
        else:
            self._chunk = int(directions_per_pass)
        self._pad = (self.device.type != "cpu") if pad_chunks == "auto" else bool(pad_chunks)
        self._invariance_check = self._check_row_invariance()
        logger.debug(
            "ModelBehavior(%s): %s path, %d rows per pass (%.3g bytes per row estimated), anchor cache %s",
            self._behavior_name, self._path, self._chunk, self._row_bytes, self._cache_mode,
        )

    # ------------------------------------------------------------------------------------------ evaluation core
    def _batched_params(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[C, D]`` rows (or one ``[D]`` row) → {name: ``[C, *shape]`` (or ``shape``) view cast to the parameter's
        dtype/device}, every name of a shared tensor included.

        Split outside vmap and with the ties already spelled out, so each vmapped call neither slices a batched
        row nor walks the module tree to untie names (functional_call's ``tie_weights``): on the digits MLP
        (1 thread) that per-call work was ~0.1 ms, as much as a 4-row forward pass. .to() is a no-op (no copy)
        when dtype and device already match: float32/float64 models use pure views."""
        out: dict[str, torch.Tensor] = {}
        for (n, v), (dt, dev) in zip(self.view.unflatten(rows).items(), self._targets):
            out[n] = v = v.to(dtype=dt, device=dev)
            for alias in self._aliases.get(n, ()):
                out[alias] = v
        return out

    def _extract(self, outputs: Any, batch: _Batch) -> torch.Tensor:
        """The tensor the behaviour compares, per row: outputs ("kl"/"output") or a scalar ("loss"/callable)."""
        kind = self._kind
        if kind == "callable":
            value = self._behavior_fn(outputs, batch.raw)  # type: ignore[misc]
            value = torch.as_tensor(value)
            if value.numel() != 1:
                raise _SetupError(f"the behavior callable must return a scalar, got shape {tuple(value.shape)}")
            return value.reshape(()).to(self._compute_dtype)
        if kind == "loss":
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
            if loss is None:
                raise _SetupError(
                    "behavior='loss' needs the model to return a loss (outputs.loss): include labels in every batch"
                )
            return loss.reshape(()).to(self._compute_dtype)
        if isinstance(outputs, torch.Tensor):
            return outputs
        if isinstance(outputs, Mapping):
            keys = ("logits",) if kind == "kl" else ("last_hidden_state", "logits")
            for key in keys:
                if isinstance(outputs.get(key), torch.Tensor):
                    return outputs[key]
            if kind == "kl":
                raise _SetupError(
                    f"behavior='kl' needs logits but the model returned {type(outputs).__name__} with keys "
                    f"{list(outputs.keys())}; use behavior='output' (distance of outputs) or 'loss'"
                )
            raise _SetupError(f"behavior='output' found no last_hidden_state or logits in {list(outputs.keys())}")
        if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
            return outputs[0]
        raise _SetupError(
            f"cannot find an output tensor in {type(outputs).__name__}; use behavior='loss' or a callable"
        )

    def _forward_row(self, row: torch.Tensor, batch: _Batch) -> torch.Tensor:
        return self._forward_params(self._batched_params(row), batch)

    def _forward_params(self, params: dict[str, torch.Tensor], batch: _Batch) -> torch.Tensor:
        """One row's forward from :meth:`_batched_params` (under vmap: one entry of the batch of rows)."""
        outputs = torch.func.functional_call(
            self.model, params, batch.args, batch.kwargs, tie_weights=False, strict=False
        )
        return self._extract(outputs, batch)

    def _run(self, rows: torch.Tensor | None, batch: _Batch) -> torch.Tensor:
        """Extracted outputs ``[C, ...]`` for rows ``[C, D]`` on one batch, through this behaviour's path; with
        ``rows=None``, ``[1, ...]`` for the parameters the model holds (the in-place path of evaluate_along)."""
        if rows is None:
            out = self._extract(self.model(*batch.args, **batch.kwargs), batch).unsqueeze(0)
            self.model_calls += 1
            self.forward_passes += 1
            return out
        if self._path == "vmap":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SDPA_FALLBACK_WARNING)
                # in_dims over the rows only: the batch is closed over, shared by all rows. randomness="error":
                # a random op in the forward means the model is not deterministic, which Δ must be.
                out = torch.func.vmap(lambda p: self._forward_params(p, batch), randomness="error")(
                    self._batched_params(rows)
                )
            self.model_calls += 1
        else:
            out = torch.stack([self._forward_row(r, batch) for r in rows])
            self.model_calls += rows.shape[0]
        self.forward_passes += rows.shape[0]
        return out

    def _positions(self, batch: _Batch) -> list[tuple[int, int]]:
        """Chunks ``[start, stop)`` of a batch's scored positions, of at most ``_SERIAL_REDUCTION_NUMEL`` elements
        per row (one position when a row is wider). They depend on the batch only, never on the number of rows,
        so every row is reduced in the same order whatever else is in the call (row invariance)."""
        step = max(1, (_SERIAL_REDUCTION_NUMEL - 1) // max(1, batch.width))
        return [(a, min(a + step, batch.n_scored)) for a in range(0, batch.n_scored, step)]

    def _scored(self, flat: torch.Tensor, batch: _Batch, start: int, stop: int) -> torch.Tensor:
        """Scored positions ``[start, stop)`` of outputs ``[C, P, width]`` as ``[C, stop − start, width]`` in the
        compute dtype ("kl": log-probs), in a new tensor (the model's outputs are never written to).

        The anchor's cache and every row go through this same code on the same chunks, so Δ(θ0) is exactly 0."""
        if batch.all_scored:
            part = flat[:, start:stop]
        else:
            part = flat.index_select(1, batch.index[start:stop])
        copied = not batch.all_scored or part.dtype != self._compute_dtype
        part = part.to(self._compute_dtype)
        if self._kind != "kl":
            return part if copied else part.clone()
        if batch.width < _NARROW_SOFTMAX_WIDTH:
            # Same value as log_softmax up to rounding, and per position, so still row-invariant. Measured on CPU
            # (torch 2.13, one thread, [32, 256, 10]): log_softmax 1023 µs, this 185 µs — log_softmax's last-dim
            # kernel is slow for narrow rows, which is where a classifier head's cost goes.
            return part - torch.logsumexp(part, dim=-1, keepdim=True)
        return torch.log_softmax(part, dim=-1)

    def _anchor_reference(self, out: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """The anchor's scored reference ``[N, width]`` from its extracted outputs ``[1, *lead, width]``."""
        flat = out.reshape(1, -1, batch.width)
        ref = torch.empty(batch.n_scored, batch.width, dtype=self._compute_dtype, device=out.device)
        for a, b in self._positions(batch):
            ref[a:b] = self._scored(flat, batch, a, b)[0]
        return ref

    def _batch_values(self, rows: torch.Tensor | None, batch: _Batch, anchor: _Anchor | None) -> torch.Tensor:
        """``[C]`` float64 contribution of one batch for rows ``[C, D]`` (a sum over scored positions for
        "kl"/"output", n_examples × value for "loss"/callable); ``rows=None``: see :meth:`_run`."""
        if self._kind in ("loss", "callable"):
            return self._run(rows, batch).to(torch.float64) * batch.n_examples
        assert anchor is not None  # internal: set for "kl"/"output" by _anchor_for
        out = self._run(rows, batch)
        flat = out.reshape(out.shape[0], -1, batch.width)
        total = torch.zeros(out.shape[0], dtype=torch.float64, device=out.device)
        # A chunk of positions at a time: the temporaries beyond the model's own outputs are bounded by
        # C × _SERIAL_REDUCTION_NUMEL elements, however many positions and classes the data have.
        for a, b in self._positions(batch):
            cur = self._scored(flat, batch, a, b)
            ref = anchor.ref[a:b]
            sign = 1.0
            if self._kind == "kl":
                # KL(p0 ‖ q) per position = Σ_v p0 (log p0 − log q) = −Σ_v p0 (log q − log p0), in place on the
                # chunk, negated once per row after the sum (round-to-nearest is symmetric: the same bits as
                # negating every term). Terms with p0 = 0 are 0, also where log q = −inf (0 · inf would be NaN);
                # the mask is skipped for batches whose anchor has no zero probability.
                p0 = ref.exp()
                terms = cur.sub_(ref).mul_(p0)
                if batch.p0_has_zeros:
                    terms.masked_fill_(p0 == 0, 0.0)
                sign = -1.0
            else:
                terms = cur.sub_(ref)
                terms.mul_(terms)
            # One fixed-shape reduction per row: a reduction over [C, n, width] may split its summation
            # differently for different C (with C = 1, torch splits a reduction of ≥ 32768 elements over threads
            # along the reduced dim). Below that size every C reduces each row serially with the same kernel, so
            # one batched call gives the per-row sums bitwise (checked in tests).
            per_row = terms[0].numel()
            if per_row < _SERIAL_REDUCTION_NUMEL:
                sums = terms.reshape(terms.shape[0], per_row).sum(dim=1, dtype=torch.float64)
            else:
                sums = torch.stack([terms[i].sum(dtype=torch.float64) for i in range(terms.shape[0])])
            total.add_(sums, alpha=sign)
        return total

    # ------------------------------------------------------------------------------------------ anchor
    def _scored_index(self, batch: _Batch, row_shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        if len(row_shape) <= 1:  # [B] (or scalar) outputs: each entry is one position of width 1
            lead, width = (int(np.prod(row_shape)) if row_shape else 1,), 1
        else:
            lead, width = tuple(row_shape[:-1]), int(row_shape[-1])
        mask = scored_position_mask(
            batch.kwargs, lead, device=self.device, causal=self._causal, encoder_decoder=self._encoder_decoder,
            use_labels=self._kind == "kl",
        )
        index = torch.nonzero(mask.reshape(-1)).reshape(-1)
        return index, width

    def _setup_anchor(self, mode: str, device_limit: int, host_limit: int) -> None:
        """One forward pass of the anchor over all batches: path probe, scored positions, anchor cache, the
        anchor value and the per-row memory estimate."""
        theta0 = self.anchor.unsqueeze(0)
        largest = [0]

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            largest[0] = max(largest[0], _tensor_bytes(output))

        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        row_bytes = 0
        self._largest_output = 0  # bytes of the largest module output of one row, over the batches
        cached: list[torch.Tensor | None] = []
        cache_total = 0
        keep = mode in ("auto", "device", "cpu") and self._kind in ("kl", "output")
        # Largest cache "auto" may keep: on a CPU model the device cache is the host cache.
        auto_limit = device_limit if self.device.type == "cpu" else max(device_limit, host_limit)
        try:
            with torch.no_grad():
                for i, b in enumerate(self._batches):
                    largest[0] = 0
                    if i == 0 and self._path == "vmap":
                        try:
                            out = self._run(theta0, b)
                        except _SetupError:
                            raise
                        except Exception as err:  # not vmappable: fall back for the life of this object
                            self._vmap_error = f"{type(err).__name__}: {err}"[:500]
                            logger.debug(
                                "vmap over parameter rows failed (%s); using the per-row loop", self._vmap_error
                            )
                            self._path = "loop"
                            largest[0] = 0
                            out = self._run(theta0, b)
                    else:
                        out = self._run(theta0, b)
                    extra = 0
                    if self._kind in ("kl", "output"):
                        row_shape = tuple(out.shape[1:])
                        if self._kind == "kl" and len(row_shape) < 2:
                            raise ValueError(
                                f"behavior='kl' needs logits of shape [B, C] or [B, T, V], got {row_shape}; use "
                                "behavior='output' or 'loss'"
                            )
                        b.index, b.width = self._scored_index(b, row_shape)
                        b.n_scored = int(b.index.numel())
                        b.all_scored = b.n_scored * b.width == out[0].numel()
                        ref = self._anchor_reference(out, b)
                        b.p0_has_zeros = self._kind == "kl" and _has_zero_probability(ref)
                        bad = torch.isnan(ref).any() | torch.isposinf(ref).any()
                        if self._kind == "output":
                            bad = bad | torch.isneginf(ref).any()
                        if bool(bad):
                            raise ValueError(f"the anchor's outputs on batch {i} are not finite (NaN/inf)")
                        nbytes = ref.numel() * ref.element_size()
                        cache_total += nbytes
                        if keep and mode == "auto" and cache_total > auto_limit:
                            keep, cached = False, []  # too big for any cache: recompute
                        if keep:
                            # Held on the host while the final placement is unknown; moved once at the end.
                            cached.append(ref.to("cpu") if mode != "device" else ref)
                        # Raw outputs and a chunk's scored copy, p0 and zero mask are alive together at worst.
                        chunk = min(nbytes, max(b.width, _SERIAL_REDUCTION_NUMEL) * ref.element_size())
                        extra = out[0].numel() * out.element_size() + 3 * chunk
                    else:
                        value = out.to(torch.float64)
                        if not bool(torch.isfinite(value).all()):
                            raise ValueError(f"the anchor's {self._behavior_name} value on batch {i} is not finite")
                        b.anchor_value = value * b.n_examples
                    self._largest_output = max(self._largest_output, largest[0])
                    # Peak inside the model (largest activation with its input and two temporaries, plus the
                    # attention scores) or during the reduction (model activations freed by then).
                    row_bytes = max(row_bytes, 4 * largest[0] + self._attention_bytes(b), extra)
        finally:
            for h in handles:
                h.remove()

        self.n_scored: int | None = None
        if self._kind in ("kl", "output"):
            self.n_scored = sum(b.n_scored for b in self._batches)
            if self.n_scored == 0:
                raise ValueError(
                    "no scored position in the data (attention_mask and labels != -100 exclude every position)"
                )
            if not keep:
                self._cache_mode = "recompute"
            elif mode == "auto":
                if cache_total <= device_limit:
                    self._cache_mode = "device"
                elif self.device.type != "cpu" and cache_total <= host_limit:
                    self._cache_mode = "cpu"
                else:
                    self._cache_mode = "recompute"
            else:
                self._cache_mode = mode
            if self._cache_mode == "recompute":
                cached = []
            for b, ref in zip(self._batches, cached):
                b.anchor = ref.to(self.device) if self._cache_mode == "device" else ref.to("cpu")
                if self._cache_mode == "cpu" and self.device.type == "cuda":
                    b.anchor = b.anchor.pin_memory()  # asynchronous copies to the device per batch
            self._cache_bytes = cache_total if self._cache_mode != "recompute" else 0
            self.anchor_value = 0.0
        else:
            self._cache_mode = "none"
            self._cache_bytes = 0
            total = torch.zeros(1, dtype=torch.float64, device=self.device)
            for b in self._batches:
                total = total + b.anchor_value  # same arithmetic, in the same order, as __call__
            self._anchor_total = total
            self.anchor_value = float((total / self.n_examples)[0])
        # Rows arrive in the row dtype; parameters of another dtype (bf16/fp16) get a cast copy per row.
        cast_bytes = sum(
            k * torch.finfo(dt).bits // 8
            for k, (dt, _) in zip(self.view.numels, self._targets)
            if dt != self._row_dtype
        )
        self._row_bytes = int(row_bytes + cast_bytes)

    def _attention_bytes(self, batch: _Batch) -> int:
        """Attention scores B·heads·T² (scores and softmax) when the config names the head count."""
        heads = getattr(getattr(_unwrap(self.model), "config", None), "num_attention_heads", None)
        ids = batch.kwargs.get("input_ids", batch.kwargs.get("attention_mask"))
        if not isinstance(heads, int) or not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            return 0
        b, t = ids.shape
        return 2 * b * heads * t * t * torch.finfo(self.view.dtype).bits // 8

    def _anchor_for(self, batch: _Batch) -> _Anchor | None:
        """The anchor's scored reference for one batch (from the cache or recomputed), once per batch per call."""
        if self._kind not in ("kl", "output"):
            return None
        if self._cache_mode == "recompute":
            ref = self._anchor_reference(self._run(self.anchor.unsqueeze(0), batch), batch)
        else:
            assert batch.anchor is not None  # internal: filled by _setup_anchor for cached modes
            ref = batch.anchor.to(self.device, non_blocking=True)
        return _Anchor(ref=ref)

    def _anchor_matches(self, n_rows: int) -> tuple[bool, list[float], list[float]]:
        """Whether the anchor evaluated as ``n_rows`` rows of one pass on the first scored batch gives exactly the
        anchor's own value (0 for "kl"/"output"), with the values seen and expected."""
        b = next((x for x in self._batches if self._kind not in ("kl", "output") or x.n_scored > 0), None)
        if b is None:
            return True, [], []
        rows = self.anchor.unsqueeze(0).repeat(n_rows, 1)
        with torch.no_grad():
            vals = self._batch_values(rows, b, self._anchor_for(b)).cpu()
        expected = b.anchor_value if self._kind in ("loss", "callable") else torch.zeros(1, dtype=torch.float64)
        expected = expected.to("cpu").expand_as(vals)
        return torch.equal(vals, expected), vals.tolist(), expected.tolist()

    def _refresh_anchor(self) -> None:
        """Recompute the cached anchor references / values after the evaluation path changed."""
        theta0 = self.anchor.unsqueeze(0)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for b in self._batches:
                if self._kind in ("kl", "output"):
                    if b.anchor is None:  # recompute mode: nothing cached, and nothing known about its zeros
                        b.p0_has_zeros = self._kind == "kl"
                        continue
                    ref = self._anchor_reference(self._run(theta0, b), b)
                    b.p0_has_zeros = self._kind == "kl" and _has_zero_probability(ref)
                    b.anchor = ref.to(b.anchor.device)
                    if self._cache_mode == "cpu" and self.device.type == "cuda":
                        b.anchor = b.anchor.pin_memory()
                else:
                    b.anchor_value = self._run(theta0, b).to(torch.float64) * b.n_examples
                    total = total + b.anchor_value  # same arithmetic, in the same order, as __call__
        if self._kind not in ("kl", "output"):
            self._anchor_total = total
            self.anchor_value = float((total / self.n_examples)[0])

    def _check_row_invariance(self) -> str:
        """Evaluate the anchor as several rows of one pass: the values must equal the anchor's exactly.

        Measured on CPU with two threads (torch 2.13, all-MiniLM-L6-v2, 16 sentences): one-row vmapped passes
        differ from multi-row ones in the last bits (Δ(θ0) came out 9e-9 instead of 0; a row's value moved by
        3e-7 relative), while 2, 3 and 5 rows agree with each other — the kernels take another code path for a
        single row. Padding every pass to two rows would fix that at twice the cost of one-direction-at-a-time
        runs, so on a mismatch this behaviour uses the per-row loop instead (each row its own forward: invariant
        by construction; for MiniLM on CPU it was also faster than vmap, whose attention runs row by row anyway),
        recomputes the anchor through it and returns ``"fallback-loop"``. The decision depends on the device and
        thread count, never on how many rows later calls pass.
        """
        if self._path != "vmap" or self._chunk < 2:
            return "skipped"
        ok, vals, expected = self._anchor_matches(self._chunk if self._pad else 2)
        if ok:
            return "passed"
        logger.info(
            "vmapped rows depend on the number of rows per pass on this device (anchor as several rows gave %s, "
            "expected %s): evaluating one row per forward instead", vals, expected,
        )
        self._vmap_error = "row values depended on the number of rows per vmapped pass"
        self._path, self._chunk, self._path_reason = "loop", 1, "row invariance check"
        self._refresh_anchor()
        return "fallback-loop"

    # ------------------------------------------------------------------------------------------ public
    @property
    def raw_batches(self) -> list[Any]:
        """The materialised batches as given (on the model's device), e.g. for the Fisher proposal."""
        return [b.raw for b in self._batches]

    def evaluate_along(
        self, theta0: torch.Tensor, directions: torch.Tensor, ts: Sequence[float]
    ) -> torch.Tensor | None:
        """Behaviour values at θ0 + t_k·w_k for the rows w_k of ``directions`` ``[K, D]``, without a ``[K, D]``
        buffer of perturbed points (``[K]`` float64 on the CPU, like :meth:`__call__`).

        On the per-row loop path (large models) each point is written into the model's own parameters, evaluated
        with the ordinary forward, and the parameters are restored bit for bit from :attr:`anchor` afterwards,
        also when the forward raises (ESTIMATOR.md §3: "restore from a saved copy"). This saves the D-sized
        points buffer. Returns None, and the caller builds the points itself, on the vmap path, or when
        ``theta0`` is not this behaviour's anchor, or when the model's parameters no longer hold the anchor
        (someone changed them since this behaviour was built: restoring would undo their change).
        """
        if self._path != "loop":
            return None
        if _any_training(self.model):
            raise RuntimeError("the model is in training mode: call model.eval() before evaluating the behaviour")
        if not self._is_anchor(theta0):
            return None
        if self._inplace_targets is None:  # evaluate_along runs once per evaluated point: build this once
            params = dict(self.model.named_parameters(remove_duplicate=False))
            self._inplace_targets = [
                (params[n], sl, self.anchor[sl].view(params[n].shape))
                for n, sl in zip(self.view.names, self.view.tensor_slices().values())
            ]
        targets = self._inplace_targets
        with torch.no_grad():
            # Every in-place change of a parameter bumps its version counter: unchanged counters since our last
            # restore mean the parameters still hold the anchor, and the O(D) comparison can be skipped.
            if tuple(p._version for p, _, _ in targets) != self._inplace_versions and not all(
                torch.equal(p, base.to(p.dtype)) for p, _, base in targets
            ):
                return None
            acc = torch.zeros(directions.shape[0], dtype=torch.float64, device=self.device)
            try:
                for k, t in enumerate(float(x) for x in ts):
                    w = directions[k].to(self.device)
                    for p, sl, base in targets:
                        step = w[sl].view(p.shape)
                        if p.dtype == base.dtype:
                            torch.add(base, step, alpha=t, out=p)
                        else:  # bf16/fp16 parameters: the point is formed in the row dtype, then cast
                            p.copy_(torch.add(base, step, alpha=t))
                    for b in self._batches:
                        if self._kind in ("kl", "output") and b.n_scored == 0:
                            continue
                        acc[k] += self._batch_values(None, b, self._anchor_for(b))[0]
            finally:
                for p, _, base in targets:
                    p.copy_(base)
                self._inplace_versions = tuple(p._version for p, _, _ in targets)
            denom = self.n_scored if self._kind in ("kl", "output") else self.n_examples
            return (acc / denom).cpu()

    def __call__(self, thetas: torch.Tensor) -> torch.Tensor:
        """Behaviour values of parameter rows.

        Args:
            thetas: ``[K, D]`` (or ``[D]``) flat parameter vectors in the view's layout, any float dtype (cast to
                each parameter's dtype before the forward). Not modified, not retained.

        Returns:
            ``[K]`` (or scalar) float64 on the CPU: "kl" in nats per scored position, "loss" in the loss's units,
            "output" in squared output units, callables in their own units. Row k depends only on ``thetas[k]``.
        """
        if not isinstance(thetas, torch.Tensor):
            raise TypeError(f"thetas must be a tensor [K, D], got {type(thetas).__name__}")
        single = thetas.ndim == 1
        rows_all = thetas.unsqueeze(0) if single else thetas
        if rows_all.ndim != 2 or rows_all.shape[1] != self.view.n_params:
            raise ValueError(f"thetas must have shape [K, {self.view.n_params}], got {tuple(thetas.shape)}")
        if not rows_all.is_floating_point():
            raise TypeError(f"thetas must be floating point, got {thetas.dtype}")
        if _any_training(self.model):
            raise RuntimeError("the model is in training mode: call model.eval() before evaluating the behaviour")
        k_total = rows_all.shape[0]
        if k_total == 0:
            return torch.zeros(0, dtype=torch.float64)
        if k_total == 1 and self._is_anchor(rows_all[0]):
            # Known from the set-up pass through the same path and arithmetic (exactly 0 for "kl"/"output"):
            # an estimator's first call, fn(θ0), costs no forward pass.
            out = torch.tensor([self.anchor_value], dtype=torch.float64)
            return out[0] if single else out
        c = self._chunk
        with torch.no_grad():
            rows_all = rows_all.detach().to(self.device)
            acc = torch.zeros(k_total, dtype=torch.float64, device=self.device)
            for b in self._batches:
                if self._kind in ("kl", "output") and b.n_scored == 0:
                    continue
                anchor = self._anchor_for(b)
                for s in range(0, k_total, c):
                    rows = rows_all[s : s + c]
                    k = rows.shape[0]
                    if self._pad and k < c:
                        rows = torch.cat([rows, rows[-1:].expand(c - k, -1)])
                    acc[s : s + k] += self._batch_values(rows, b, anchor)[:k]
            denom = self.n_scored if self._kind in ("kl", "output") else self.n_examples
            out = (acc / denom).cpu()
        return out[0] if single else out

    def _is_anchor(self, row: torch.Tensor) -> bool:
        """Whether ``row`` ``[D]`` is bitwise :attr:`anchor` (a view of it is recognised without comparing)."""
        if row.shape != self.anchor.shape or row.dtype != self.anchor.dtype or row.device != self.anchor.device:
            return False
        same_view = row.data_ptr() == self.anchor.data_ptr() and row.stride() == self.anchor.stride()
        return same_view or torch.equal(row, self.anchor)

    @property
    def path(self) -> str:
        """"vmap" or "loop": how rows are evaluated (fixed at construction)."""
        return self._path

    @property
    def directions_per_pass(self) -> int:
        """Rows per forward pass (1 on the loop path)."""
        return self._chunk

    def describe(self) -> dict[str, Any]:
        """JSON-safe account of exactly what is evaluated and how."""
        return {
            "behavior": self._behavior_name,
            "n_batches": len(self._batches),
            "n_examples": self.n_examples,
            "n_scored": self.n_scored,
            "max_batches": self._max_batches,
            "max_examples": self._max_examples,
            "last_batch_truncated": self._truncated,
            "causal_lm_label_shift": self._causal if self._kind == "kl" else None,
            "anchor_value": self.anchor_value,
            "anchor_cache": self._cache_mode,
            "anchor_cache_bytes": self._cache_bytes,
            "path": self._path,
            "path_reason": self._path_reason,
            "vmap_error": self._vmap_error,
            "directions_per_pass": self._chunk,
            "pad_chunks": self._pad,
            "row_bytes_estimate": self._row_bytes,
            "row_invariance_check": self._invariance_check,
            "compute_dtype": str(self._compute_dtype).replace("torch.", ""),
            "n_params": self.view.n_params,
            "forward_passes": self.forward_passes,
        }
