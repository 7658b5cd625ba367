"""Memory planning for evaluating a behaviour: rows per forward pass and where the anchor cache lives.

Model per forward pass of C parameter rows on one batch, estimated from the anchor pass at construction:

    C · (D_cast + max(A, R)) bytes, plus fixed costs (the anchor cache and the materialised batches), where

* D_cast = bytes of the measured parameters whose dtype differs from the rows' (:func:`cast_bytes`; 0 for
  float32/float64 models, whose rows are used as views; bf16/fp16 models get a cast copy per row);
* A = 4 × the largest module output seen in the anchor pass (a layer's input, output and two temporaries alive at
  once) + the attention scores and their softmax, 2·B·heads·T² elements, when the config names
  ``num_attention_heads`` (vmap's fallback for scaled-dot-product attention materialises them)
  (:func:`forward_bytes`, :func:`attention_bytes`);
* R = the raw outputs + 3 chunks of scored positions (the gathered chunk, and for "kl" p0 = exp(log p0) and its
  zero mask; :meth:`hfvolume.models.scorers.PositionScorer.working_bytes`): distances are reduced a chunk of
  positions at a time, so beyond the model's own outputs they cost O(C · chunk) elements however many positions
  and classes there are.

C is the largest count with C · (D_cast + max(A, R)) ≤ ``memory_bytes_limit``, capped at
:data:`MAX_DIRECTIONS_PER_PASS` (:func:`rows_per_pass`). Nothing is kept between calls except the anchor cache
(log p0 or the outputs at the scored positions, in the compute dtype; :class:`AnchorCachePlan`), so memory does
not grow with the number of directions evaluated. ``scripts/benchmarks/bench_models.py`` measures the real
allocations against this model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from hfvolume.models.batches import walk
from hfvolume.models.outputs import model_config

ANCHOR_CACHE_MODES = ("auto", "device", "cpu", "recompute")
MAX_DIRECTIONS_PER_PASS = 64  # beyond this, vmap gains nothing on CPU and chunks only add padding waste on GPU
# On CPU, rows per vmapped pass are also capped so that one activation tensor of the pass (rows × the largest module
# output of one row) stays within about one core's L2 cache: past that, every layer streams its activations from
# main memory and a row costs more in a large pass than in a small one.
PASS_CACHE_BYTES = 2 * 2**20
DEFAULT_MEMORY_BYTES_LIMIT = 2 * 2**30  # activations per forward pass
DEFAULT_CACHE_BYTES_LIMIT = 2**30  # anchor cache kept on the model's device
DEFAULT_HOST_CACHE_BYTES_LIMIT = 8 * 2**30  # anchor cache kept in host memory ("cpu") when the device one is full


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a floating-point ``dtype``."""
    return torch.finfo(dtype).bits // 8


def tensor_bytes(t: torch.Tensor) -> int:
    """Logical bytes of a tensor (numel × element size; also correct for vmap's batched tensors)."""
    return t.numel() * t.element_size()


def largest_tensor_bytes(obj: Any) -> int:
    """Bytes of the largest tensor in a (nested) module output."""
    return max((tensor_bytes(t) for t in walk(obj) if isinstance(t, torch.Tensor)), default=0)


class LargestOutput:
    """Forward hooks on every submodule recording the bytes of the largest module output since :meth:`reset`.

    Use as a context manager: the hooks are removed on exit, also when the block raises.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.bytes = 0
        self._handles: list[Any] = []

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.bytes = max(self.bytes, largest_tensor_bytes(output))

    def reset(self) -> None:
        self.bytes = 0

    def __enter__(self) -> LargestOutput:
        self._handles = [m.register_forward_hook(self._hook) for m in self.model.modules()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attention_bytes(model: nn.Module, kwargs: Mapping[str, Any], dtype: torch.dtype) -> int:
    """Attention scores and their softmax, 2·B·heads·T² elements of ``dtype``, when the model's config names
    ``num_attention_heads`` and the batch has ``input_ids`` (or an ``attention_mask``) of shape ``[B, T]``; else 0."""
    heads = getattr(model_config(model), "num_attention_heads", None)
    ids = kwargs.get("input_ids", kwargs.get("attention_mask"))
    if not isinstance(heads, int) or not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return 0
    b, t = ids.shape
    return 2 * b * heads * t * t * itemsize(dtype)


def forward_bytes(largest_output: int, attention: int) -> int:
    """Peak inside the model for one row: its largest activation with its input and two temporaries, plus the
    attention scores."""
    return 4 * largest_output + attention


def cast_bytes(numels: Sequence[int], dtypes: Sequence[torch.dtype], row_dtype: torch.dtype) -> int:
    """D_cast: bytes of the per-row copies of the parameters whose dtype differs from the rows' (bf16/fp16)."""
    return sum(k * itemsize(dt) for k, dt in zip(numels, dtypes) if dt != row_dtype)


def rows_per_pass(
    requested: int | str,
    *,
    row_bytes: int,
    memory_bytes_limit: int,
    largest_output: int,
    on_cpu: bool,
) -> int:
    """Rows C per vmapped forward pass: ``requested`` if it is a number, else ("auto") the largest C with
    C · ``row_bytes`` ≤ ``memory_bytes_limit``, at most :data:`MAX_DIRECTIONS_PER_PASS` and, on CPU, at most
    :data:`PASS_CACHE_BYTES` / ``largest_output`` (bytes of the largest module output of one row); at least 1."""
    if requested != "auto":
        return int(requested)
    limit = min(MAX_DIRECTIONS_PER_PASS, memory_bytes_limit // max(1, row_bytes))
    if on_cpu:
        limit = min(limit, PASS_CACHE_BYTES // max(1, largest_output))
    return int(max(1, limit))


class AnchorCachePlan:
    """Collects the anchor's scored references batch by batch and decides where they are kept.

    ``mode``: "device" or "cpu" keep every reference there; "recompute" keeps none (the anchor forward is re-run
    per batch and call); "auto" keeps them on the device while they fit in ``device_limit``, else in (pinned) host
    memory on accelerators while they fit in ``host_limit``, else recomputes. References are held on the host until
    :meth:`placement` is known (``mode="device"`` keeps them where they are).
    """

    def __init__(self, mode: str, *, device_limit: int, host_limit: int, on_cpu: bool, cacheable: bool) -> None:
        self.mode = mode
        self.device_limit, self.host_limit, self.on_cpu = device_limit, host_limit, on_cpu
        self.keep = mode in ("auto", "device", "cpu") and cacheable
        # Largest cache "auto" may keep: on a CPU model the device cache is the host cache.
        self._auto_limit = device_limit if on_cpu else max(device_limit, host_limit)
        self.total_bytes = 0
        self.cached: list[torch.Tensor] = []

    def add(self, ref: torch.Tensor) -> int:
        """Account for (and keep, while the plan still caches) one batch's reference; returns its bytes."""
        nbytes = tensor_bytes(ref)
        self.total_bytes += nbytes
        if self.keep and self.mode == "auto" and self.total_bytes > self._auto_limit:
            self.keep, self.cached = False, []  # too big for any cache: recompute
        if self.keep:
            self.cached.append(ref.to("cpu") if self.mode != "device" else ref)
        return nbytes

    def placement(self) -> str:
        """"device", "cpu" or "recompute", once every batch has been added."""
        if not self.keep:
            return "recompute"
        if self.mode != "auto":
            return self.mode
        if self.total_bytes <= self.device_limit:
            return "device"
        if not self.on_cpu and self.total_bytes <= self.host_limit:
            return "cpu"
        return "recompute"


__all__ = [
    "ANCHOR_CACHE_MODES",
    "AnchorCachePlan",
    "DEFAULT_CACHE_BYTES_LIMIT",
    "DEFAULT_HOST_CACHE_BYTES_LIMIT",
    "DEFAULT_MEMORY_BYTES_LIMIT",
    "LargestOutput",
    "MAX_DIRECTIONS_PER_PASS",
    "PASS_CACHE_BYTES",
    "attention_bytes",
    "cast_bytes",
    "forward_bytes",
    "itemsize",
    "largest_tensor_bytes",
    "rows_per_pass",
    "tensor_bytes",
]
