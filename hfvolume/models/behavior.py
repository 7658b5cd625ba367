"""Behaviour functions Δ(θ) from a model and data: the bridge from (model, data) to the estimator's ``fn``.

:class:`ModelBehavior` is a callable ``[K, D] → [K]``: row k of ``thetas`` is a flat vector of the measured
parameters (layout from a :class:`~hfvolume.models.params.ParameterView`); the value is the behaviour of the model with
those parameters on a fixed, materialised set of batches — the Δ whose sublevel set {θ : Δ(θ) ≤ ε} is the region
whose prior mass is the local volume (Scherlis & Belrose 2025, arXiv 2501.18812). The kinds ("kl", "loss",
"output", a callable) are the scorers of :mod:`hfvolume.models.scorers`. The estimator subtracts fn(θ0) itself;
``anchor_value`` is that value (exactly 0 for "kl" and "output").

How the model is evaluated, and why:

* ``torch.func.functional_call`` with the measured parameters taken from the rows (zero-copy views; a cast only
  when the parameter's dtype differs from the row's, i.e. bf16/fp16 models) and every other parameter and buffer
  the model's own. The model's parameters are never written to: in-place ``θ += δ; θ -= δ`` drifts in floating
  point, and an exception mid-forward would leave a perturbed model behind.
* Several rows per forward pass with ``torch.func.vmap`` over the rows (the data are shared, not batched), or one
  row per forward (the per-row loop). :func:`choose_path` decides which, at construction and never later, because
  the two paths differ in the last bits and a behaviour must not change path half-way through a run.
* **Row invariance**: a row's value never depends on which other rows are in the call, on K or on the chunking.
  The radius search makes discrete decisions on these values, so batch-dependent rounding would make a
  direction's result depend on the batch size. vmap over K rows normally gives per-row outputs bitwise equal to
  vmap over one row (the plain, un-vmapped forward can differ from both in the last bits, so the anchor's outputs
  are computed through the same path as every other row), but some CPU kernels round a one-row pass differently
  at some thread counts. The construction-time check (``_check_row_invariance``) detects that and switches to the
  per-row loop. Reductions are per row (:mod:`hfvolume.models.scorers`). On accelerators, where library kernels may
  be chosen by batch count, chunks are padded to a fixed size by repeating the last row (``pad_chunks="auto"``),
  so every forward has the same shape.
* The model must be in eval mode (dropout/batch-norm in training mode make Δ random and batch-norm would update
  its running statistics). Saving and restoring the mode is the caller's job; construction raises ``ValueError``
  and a call raises ``RuntimeError`` if any submodule is in training mode.

Memory per forward pass and the anchor cache: :mod:`hfvolume.models.memory`.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from hfvolume.models.batches import examples_in, materialize_batches, split_batch
from hfvolume.models.inplace import InPlaceParameters
from hfvolume.models.memory import (
    ANCHOR_CACHE_MODES,
    DEFAULT_CACHE_BYTES_LIMIT,
    DEFAULT_HOST_CACHE_BYTES_LIMIT,
    DEFAULT_MEMORY_BYTES_LIMIT,
    AnchorCachePlan,
    LargestOutput,
    attention_bytes,
    cast_bytes,
    forward_bytes,
    rows_per_pass,
)
from hfvolume.models.outputs import accepts_use_cache, is_causal_lm, is_encoder_decoder
from hfvolume.models.params import ParameterView
from hfvolume.models.scorers import BehaviorSpec, ScoredBatch, ScoringError, make_scorer, position_chunks
from hfvolume.models.state import RANDOM_FORWARD_MESSAGE, cuda_devices_of, rng_snapshot, same_rng
from hfvolume.volume.checks import check_bool, check_choice, check_int, check_optional_int
from hfvolume.volume.estimator import perturbation_dtype  # one rule for the rows' dtype, shared with the core

logger = logging.getLogger("hfvolume")


# torch warns once that scaled_dot_product_attention has no vmap batching rule and runs it row by row; that is
# expected here (and is what keeps the rows independent), so it is not shown to users.
_SDPA_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


@dataclass(frozen=True)
class EvaluationPath:
    """How rows are evaluated: ``name`` "vmap" (several rows per vmapped forward) or "loop" (one row per forward),
    and why the loop was chosen (None on the vmap path)."""

    name: str
    reason: str | None = None


def choose_path(
    *,
    use_vmap: bool,
    vmap_error: str | None = None,
    one_row_bytes: int = 0,
    row_bytes_limit: int | None = None,
    rows_agree: bool = True,
) -> EvaluationPath:
    """The evaluation path from what is known about the model and data — never from how many rows are asked for.

    The per-row loop when vmap is switched off, when vmap failed on the anchor (``vmap_error``: some code paths
    are not vmappable), when one row's working set ``one_row_bytes`` (its ``[D]`` direction and point plus its
    activations) exceeds ``row_bytes_limit`` (every pass would carry a single row anyway), or when the anchor
    evaluated as several rows of one pass did not give the anchor's own value (``rows_agree=False``).
    """
    if not use_vmap:
        return EvaluationPath("loop", "use_vmap=False")
    if vmap_error is not None:
        return EvaluationPath("loop", "vmap failed")
    if row_bytes_limit is not None and one_row_bytes > row_bytes_limit:
        return EvaluationPath("loop", f"one row needs {one_row_bytes} bytes > {row_bytes_limit}")
    if not rows_agree:
        return EvaluationPath("loop", "row invariance check")
    return EvaluationPath("vmap")


def _any_training(model: nn.Module) -> bool:
    return any(m.training for m in model.modules())


def _require_eval(model: nn.Module) -> None:
    if _any_training(model):
        raise RuntimeError("the model is in training mode: call model.eval() before evaluating the behaviour")


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
        behavior: "kl", "loss", "output" or a callable ``(outputs, batch) -> scalar tensor``
            (:mod:`hfvolume.models.scorers`). The tensor compared: ``outputs.logits`` for "kl"; for "output"
            ``last_hidden_state`` if present, else ``logits``; a plain tensor output is used as is, a tuple's first
            element.
        max_batches, max_examples: evaluate at most this many batches / examples (the last batch is cut to fit).
        batch_size, collate_fn: only for datasets of examples.
        anchor_cache: where the anchor's scored outputs ("kl" log-probs, "output" outputs) are kept: "device",
            "cpu" (copied to the device per batch), "recompute" (the anchor forward is re-run for every batch of
            every call, costing one more forward pass per batch) or "auto": "device" if the cache fits in
            ``cache_bytes_limit``, else "cpu" (accelerators only) if it fits in ``host_cache_bytes_limit``, else
            "recompute". Ignored for "loss" and callables (their anchor is one number per batch).
        directions_per_pass: rows per vmapped forward pass: "auto" (:func:`hfvolume.models.memory.rows_per_pass`,
            from ``memory_bytes_limit``) or a positive int. The per-row loop path always uses 1.
        memory_bytes_limit: activation bytes allowed per forward pass, for "auto".
        pad_chunks: pad every chunk to ``directions_per_pass`` rows (repeating the last row) so all forwards have
            one shape; "auto" = on for non-CPU devices (see "Row invariance").
        use_vmap: False skips vmap and uses the per-row loop.
        vmap_row_bytes_limit: use vmap only while one row's working set — its ``[D]`` direction and perturbed point
            in the row dtype plus its activations (the per-row estimate) — fits in this many bytes; above it every
            pass would carry a single row anyway, so rows are evaluated one at a time by the per-row loop (and
            :meth:`evaluate_along` in place, without a points buffer). None: no limit.
        causal_lm: whether labels are shifted inside the model (None → :func:`~hfvolume.models.outputs.is_causal_lm`).

    Scored positions ("kl", "output"): every non-padding position, for "kl" also labels != -100 with the causal-LM
    shift (:func:`~hfvolume.models.outputs.scored_position_mask`); classifier logits ``[B, C]``: one per example.

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
        _check_model(model)
        check_choice("anchor_cache", anchor_cache, ANCHOR_CACHE_MODES)
        for name, value in (("max_batches", max_batches), ("max_examples", max_examples)):
            check_optional_int(name, value)
        for name, value in (("cache_bytes_limit", cache_bytes_limit), ("host_cache_bytes_limit",
                            host_cache_bytes_limit), ("memory_bytes_limit", memory_bytes_limit)):
            check_int(name, value, minimum=0)
        check_optional_int("vmap_row_bytes_limit", vmap_row_bytes_limit, minimum=0)
        if directions_per_pass != "auto":
            check_int("directions_per_pass", directions_per_pass)
        check_choice("pad_chunks", pad_chunks, ("auto", True, False))
        check_bool("use_vmap", use_vmap)

        self._bind(model, view, behavior, causal_lm)
        self._load_batches(data, max_batches=max_batches, max_examples=max_examples, batch_size=batch_size,
                           collate_fn=collate_fn)
        self.forward_passes = 0
        self.model_calls = 0
        self._in_place: InPlaceParameters | None = None  # see evaluate_along
        self._vmap_error: str | None = None
        self._path = "vmap" if use_vmap else "loop"  # the anchor pass probes vmap and may fall back (see _run)
        self._path_reason: str | None = None
        self.anchor = self.view.flatten(model, dtype=self._row_dtype)
        self._setup_anchor(anchor_cache, cache_bytes_limit, host_cache_bytes_limit)

        # What the path depends on, known once the anchor pass has run (see choose_path).
        self._path_facts = {
            "use_vmap": use_vmap,
            "one_row_bytes": 2 * self.view.n_params * self.anchor.element_size() + self._row_bytes,
            "row_bytes_limit": vmap_row_bytes_limit,
        }
        self._use_path(choose_path(**self._path_facts, vmap_error=self._vmap_error))
        self._chunk = 1 if self._path == "loop" else rows_per_pass(
            directions_per_pass, row_bytes=self._row_bytes, memory_bytes_limit=memory_bytes_limit,
            largest_output=self._largest_output, on_cpu=self.device.type == "cpu",
        )
        self._pad = (self.device.type != "cpu") if pad_chunks == "auto" else bool(pad_chunks)
        self._invariance_check = self._check_row_invariance()
        logger.debug(
            "ModelBehavior(%s): %s path, %d rows per pass (%.3g bytes per row estimated), anchor cache %s",
            self._behavior_name, self._path, self._chunk, self._row_bytes, self._cache_mode,
        )

    # ------------------------------------------------------------------------------------------ set-up
    def _bind(self, model: nn.Module, view: ParameterView | None, behavior: BehaviorSpec,
              causal_lm: bool | None) -> None:
        """The model, the measured parameters' dtypes and devices, the rows' dtype and the scorer."""
        self.model = model
        self.view = ParameterView.from_model(model) if view is None else view
        if not isinstance(self.view, ParameterView):
            raise TypeError(f"view must be a ParameterView, got {type(self.view).__name__}")
        # The measured tensors' own dtype/device: rows are cast to them before the forward (bf16/fp16 models,
        # models split over devices).
        self._targets = self.view.placements(model)
        self._aliases = dict(self.view.aliases)
        self.device = self.view.device
        self._row_dtype = perturbation_dtype(self.view.dtype)
        # KL and distances in float32 (float64 for float64 models): bf16 log-probs would swamp a 1e-2 cutoff.
        self._compute_dtype = self._row_dtype
        self._causal = is_causal_lm(model) if causal_lm is None else bool(causal_lm)
        self._scorer = make_scorer(behavior, compute_dtype=self._compute_dtype, causal=self._causal,
                                   encoder_decoder=is_encoder_decoder(model))
        self._behavior_name = self._scorer.name

    def _load_batches(self, data: Any, *, max_batches: int | None, max_examples: int | None,
                      batch_size: int | None, collate_fn: Callable | None) -> None:
        raw_batches, truncated = materialize_batches(
            data, self.device, max_batches=max_batches, max_examples=max_examples,
            batch_size=batch_size, collate_fn=collate_fn,
        )
        no_cache = accepts_use_cache(self.model)
        self._batches: list[ScoredBatch] = []
        for raw in raw_batches:
            args, kwargs = split_batch(raw)
            if no_cache and isinstance(raw, Mapping) and "use_cache" not in kwargs:
                kwargs["use_cache"] = False  # no KV cache: it is never read here and costs activation memory
            self._batches.append(ScoredBatch(raw=raw, args=args, kwargs=kwargs, n_examples=examples_in(raw)))
        self.n_examples = sum(b.n_examples for b in self._batches)
        self._max_batches, self._max_examples, self._truncated = max_batches, max_examples, truncated

    # ------------------------------------------------------------------------------------------ evaluation core
    def _batched_params(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[C, D]`` rows (or one ``[D]`` row) → {name: ``[C, *shape]`` (or ``shape``) view cast to the parameter's
        dtype/device}, every name of a shared tensor included.

        Split outside vmap and with the ties spelled out, so no vmapped call slices a batched row or walks the
        module tree to untie names (for small models that costs as much as a small forward pass). .to() is a no-op
        when dtype and device already match: float32/float64 models use pure views."""
        out: dict[str, torch.Tensor] = {}
        for (n, v), (dt, dev) in zip(self.view.unflatten(rows).items(), self._targets):
            out[n] = v = v.to(dtype=dt, device=dev)
            for alias in self._aliases.get(n, ()):
                out[alias] = v
        return out

    def _extract(self, outputs: Any, batch: ScoredBatch) -> torch.Tensor:
        """The tensor the behaviour compares, per row: outputs ("kl"/"output") or a scalar ("loss"/callable)."""
        return self._scorer.extract(outputs, batch)

    def _forward_row(self, row: torch.Tensor, batch: ScoredBatch) -> torch.Tensor:
        return self._forward_params(self._batched_params(row), batch)

    def _forward_params(self, params: dict[str, torch.Tensor], batch: ScoredBatch) -> torch.Tensor:
        """One row's forward from :meth:`_batched_params` (under vmap: one entry of the batch of rows)."""
        outputs = torch.func.functional_call(
            self.model, params, batch.args, batch.kwargs, tie_weights=False, strict=False
        )
        return self._extract(outputs, batch)

    def _run(self, rows: torch.Tensor | None, batch: ScoredBatch) -> torch.Tensor:
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

    _positions = staticmethod(position_chunks)

    def _batch_values(self, rows: torch.Tensor | None, batch: ScoredBatch, ref: torch.Tensor | None) -> torch.Tensor:
        """``[C]`` float64 contribution of one batch for rows ``[C, D]`` (a sum over scored positions for
        "kl"/"output", n_examples × value for "loss"/callable); ``rows=None``: see :meth:`_run`."""
        return self._scorer.values(self._run(rows, batch), batch, ref)

    # ------------------------------------------------------------------------------------------ anchor
    def _probe(self, theta0: torch.Tensor, batch: ScoredBatch, largest: LargestOutput) -> torch.Tensor:
        """The anchor on the first batch, which also decides whether vmap works on this model at all, and refuses a
        forward that draws random numbers in eval mode (vmap's randomness check, or a global generator moving)."""
        devices = cuda_devices_of(self.model)
        before = rng_snapshot(devices)
        out = self._probe_path(theta0, batch, largest)
        if not same_rng(before, rng_snapshot(devices)):
            raise ValueError(RANDOM_FORWARD_MESSAGE)
        return out

    def _probe_path(self, theta0: torch.Tensor, batch: ScoredBatch, largest: LargestOutput) -> torch.Tensor:
        if self._path != "vmap":
            return self._run(theta0, batch)
        try:
            return self._run(theta0, batch)
        except ScoringError:
            raise
        except Exception as err:  # not vmappable: fall back for the life of this object
            if "randomness" in str(err) and "random" in str(err):
                raise ValueError(RANDOM_FORWARD_MESSAGE) from err
            self._vmap_error = f"{type(err).__name__}: {err}"[:500]
            logger.debug("vmap over parameter rows failed (%s); using the per-row loop", self._vmap_error)
            self._path = "loop"
            largest.reset()
            return self._run(theta0, batch)

    def _setup_anchor(self, mode: str, device_limit: int, host_limit: int) -> None:
        """One forward pass of the anchor over all batches: path probe, scored positions, anchor cache, the
        anchor value and the per-row memory estimate."""
        theta0 = self.anchor.unsqueeze(0)
        plan = AnchorCachePlan(mode, device_limit=device_limit, host_limit=host_limit,
                               on_cpu=self.device.type == "cpu", cacheable=self._scorer.per_position)
        row_bytes = 0
        self._largest_output = 0  # bytes of the largest module output of one row, over the batches
        with LargestOutput(self.model) as largest, torch.no_grad():
            for i, b in enumerate(self._batches):
                largest.reset()
                out = self._probe(theta0, b, largest) if i == 0 else self._run(theta0, b)
                ref = self._scorer.anchor_pass(out, b, index=i, device=self.device)
                extra = 0
                if ref is not None:
                    plan.add(ref)
                    extra = self._scorer.working_bytes(out, ref)
                self._largest_output = max(self._largest_output, largest.bytes)
                # Peak inside the model or during the reduction (model activations freed by then).
                row_bytes = max(row_bytes, forward_bytes(largest.bytes, self._attention_bytes(b)), extra)
        self._finish_anchor(plan)
        # Rows arrive in the row dtype; parameters of another dtype (bf16/fp16) get a cast copy per row.
        self._row_bytes = int(row_bytes + cast_bytes(self.view.numels, [dt for dt, _ in self._targets],
                                                     self._row_dtype))

    def _finish_anchor(self, plan: AnchorCachePlan) -> None:
        """Scored-position count, where the anchor cache lives, and the anchor value, after the anchor pass."""
        self.n_scored: int | None = None
        if not self._scorer.per_position:
            self._cache_mode, self._cache_bytes = "none", 0
            self._sum_anchor_values()
            return
        self.n_scored = sum(b.n_scored for b in self._batches)
        if self.n_scored == 0:
            raise ValueError(
                "no scored position in the data (attention_mask and labels != -100 exclude every position)"
            )
        self._cache_mode = plan.placement()
        cached = [] if self._cache_mode == "recompute" else plan.cached
        for b, ref in zip(self._batches, cached):
            b.anchor = self._placed(ref.to(self.device) if self._cache_mode == "device" else ref.to("cpu"))
        self._cache_bytes = plan.total_bytes if self._cache_mode != "recompute" else 0
        self.anchor_value = 0.0

    def _placed(self, ref: torch.Tensor) -> torch.Tensor:
        """A cached reference as kept: pinned when it lives on the host for a CUDA model (asynchronous copies to the
        device per batch)."""
        return ref.pin_memory() if self._cache_mode == "cpu" and self.device.type == "cuda" else ref

    def _sum_anchor_values(self) -> None:
        """``anchor_value`` of a per-batch behaviour: the same arithmetic, in the same order, as :meth:`__call__`."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for b in self._batches:
            total = total + b.anchor_value
        self._anchor_total = total
        self.anchor_value = float((total / self.n_examples)[0])

    def _attention_bytes(self, batch: ScoredBatch) -> int:
        return attention_bytes(self.model, batch.kwargs, self.view.dtype)

    def _anchor_for(self, batch: ScoredBatch) -> torch.Tensor | None:
        """The anchor's scored reference for one batch (from the cache or recomputed), once per batch per call."""
        if not self._scorer.per_position:
            return None
        if self._cache_mode == "recompute":
            return self._scorer.reference(self._run(self.anchor.unsqueeze(0), batch), batch)
        assert batch.anchor is not None  # internal: filled by _setup_anchor for cached modes
        return batch.anchor.to(self.device, non_blocking=True)

    def _anchor_matches(self, n_rows: int) -> tuple[bool, list[float], list[float]]:
        """Whether the anchor evaluated as ``n_rows`` rows of one pass on the first scored batch gives exactly the
        anchor's own value (0 for "kl"/"output"), with the values seen and expected."""
        b = next((x for x in self._batches if not self._scorer.skips(x)), None)
        if b is None:
            return True, [], []
        rows = self.anchor.unsqueeze(0).repeat(n_rows, 1)
        with torch.no_grad():
            vals = self._batch_values(rows, b, self._anchor_for(b)).cpu()
        expected = self._scorer.expected_anchor_values(b).expand_as(vals)
        return torch.equal(vals, expected), vals.tolist(), expected.tolist()

    def _refresh_anchor(self) -> None:
        """Recompute the cached anchor references / values after the evaluation path changed."""
        theta0 = self.anchor.unsqueeze(0)
        with torch.no_grad():
            for b in self._batches:
                if not self._scorer.per_position:
                    b.anchor_value = self._batch_values(theta0, b, None)  # the anchor's value × n_examples
                    continue
                if b.anchor is None:  # recompute mode: nothing cached, and nothing known about its zeros
                    b.p0_has_zeros = self._scorer.zero_mask_needed(None)
                    continue
                ref = self._scorer.reference(self._run(theta0, b), b)
                b.p0_has_zeros = self._scorer.zero_mask_needed(ref)
                b.anchor = self._placed(ref.to(b.anchor.device))
        if not self._scorer.per_position:
            self._sum_anchor_values()

    def _use_path(self, choice: EvaluationPath) -> None:
        """Evaluate rows through ``choice`` from now on; the anchor is re-evaluated when the path changes (the two
        paths differ in the last bits, and Δ(θ0) must stay exactly the anchor's value)."""
        self._path_reason = choice.reason
        if choice.name != self._path:
            self._path = choice.name
            self._refresh_anchor()

    def _check_row_invariance(self) -> str:
        """Evaluate the anchor as several rows of one pass: the values must equal the anchor's exactly.

        Some CPU kernels take another code path for one row than for several, at some thread counts, so one-row
        passes differ from multi-row ones in the last bits. Padding every pass to two rows would cost twice as much
        for one-direction-at-a-time runs, so on a mismatch the per-row loop is used instead (invariant by
        construction), the anchor recomputed through it, and ``"fallback-loop"`` returned. The decision depends on
        the device and thread count, never on how many rows later calls pass.
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
        choice = choose_path(**self._path_facts, vmap_error=self._vmap_error, rows_agree=False)
        self._vmap_error = "row values depended on the number of rows per vmapped pass"
        self._chunk = 1
        self._use_path(choice)
        return "fallback-loop"

    # ------------------------------------------------------------------------------------------ public
    @property
    def raw_batches(self) -> list[Any]:
        """The materialised batches as given (on the model's device), e.g. for the Fisher proposal."""
        return [b.raw for b in self._batches]

    @property
    def scored_batches(self) -> list[ScoredBatch]:
        """The batches with their scored-position masks and cached anchor outputs (read-only use: curvature)."""
        return list(self._batches)

    @property
    def scorer(self) -> Any:
        """The behaviour kind's scorer: how the compared tensor is read from the outputs and scored."""
        return self._scorer

    @property
    def causal(self) -> bool:
        """Whether labels and logits are shifted by one position (a causal language model)."""
        return bool(self._causal)

    def evaluate_along(
        self, theta0: torch.Tensor, directions: torch.Tensor, ts: Sequence[float]
    ) -> torch.Tensor | None:
        """Behaviour values at θ0 + t_k·w_k for the rows w_k of ``directions`` ``[K, D]``, without a ``[K, D]``
        buffer of perturbed points (``[K]`` float64 on the CPU, like :meth:`__call__`).

        On the per-row loop path (large models) each point is written into the model's own parameters, evaluated
        with the ordinary forward, and the anchor is restored bit for bit afterwards, also when the forward raises
        (:mod:`hfvolume.models.inplace`). This saves the D-sized points buffer. Returns None, and the caller builds
        the points itself, on the vmap path, or when ``theta0`` is not this behaviour's anchor, or when the model's
        parameters no longer hold the anchor (restoring would undo someone else's change).
        """
        if self._path != "loop":
            return None
        _require_eval(self.model)
        if not self._is_anchor(theta0):
            return None
        if self._in_place is None:  # evaluate_along runs once per evaluated point: build this once
            self._in_place = InPlaceParameters(self.model, self.view, self.anchor)
        with torch.no_grad():
            if not self._in_place.hold_anchor():
                return None
            acc = torch.zeros(directions.shape[0], dtype=torch.float64, device=self.device)
            with self._in_place.perturbed() as write:
                for k, t in enumerate(float(x) for x in ts):
                    write(directions[k].to(self.device), t)
                    for b in self._batches:
                        if not self._scorer.skips(b):
                            acc[k] += self._batch_values(None, b, self._anchor_for(b))[0]
            return self._scorer.mean(acc, n_examples=self.n_examples, n_scored=self.n_scored).cpu()

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
        _require_eval(self.model)
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
                if self._scorer.skips(b):
                    continue
                anchor = self._anchor_for(b)
                for s in range(0, k_total, c):
                    rows = rows_all[s : s + c]
                    k = rows.shape[0]
                    if self._pad and k < c:
                        rows = torch.cat([rows, rows[-1:].expand(c - k, -1)])
                    acc[s : s + k] += self._batch_values(rows, b, anchor)[:k]
            out = self._scorer.mean(acc, n_examples=self.n_examples, n_scored=self.n_scored).cpu()
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
            "causal_lm_label_shift": self._causal if self._scorer.uses_labels else None,
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


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _any_training(model):
        raise ValueError(
            "the model is in training mode: call model.eval() before building a ModelBehavior (dropout would "
            "make Δ random and batch-norm would update its statistics); restore the mode afterwards"
        )


__all__ = ["EvaluationPath", "ModelBehavior", "choose_path"]
