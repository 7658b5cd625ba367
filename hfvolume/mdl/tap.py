"""The tap: reads each batch's code length out of ``Trainer.compute_loss`` before the optimizer step that uses it.

Trainer callbacks see neither the batch nor the logits, so :class:`LossTap` wraps the Trainer's ``compute_loss``
(an instance attribute shadowing the method). In train mode the Trainer calls it inside ``training_step``, before
``optimizer.step()``: every micro-batch of one gradient-accumulation cycle, on every rank, is coded by the same
weights θ_{s−1}, which is the online code's definition (Dawid 1984) and makes it invariant to gradient
accumulation and to the number of ranks at a fixed global batch. In eval mode (``prediction_step``) the same sums
give the exact held-out code of the evaluation set.

The wrapper reads the labels before calling the original (a label smoother or ``compute_loss_func`` pops them),
asks it for the outputs, computes −ln p(y) from the logits under ``no_grad`` (:func:`hfvolume.mdl.nll.item_nll`) and
returns exactly what the caller asked for. It draws no random numbers and writes nothing the model or optimizer
reads, so training is bitwise unchanged. Sums stay float64 tensors on the device: no host synchronisation per step.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from hfvolume.mdl.nll import DEFAULT_WORKING_MEMORY, ItemNll, count_items, item_nll
from hfvolume.models.outputs import is_causal_lm

_LABEL_KEYS = ("labels", "shift_labels", "attention_mask", "decoder_attention_mask")
_MARK = "_hfvolume_online_tap"  # attribute of the wrapper: the LossTap that installed it
NLL_SOURCES = ("logits", "loss")


class DeviceSums:
    """Two float64 scalars on the device, ``nats`` and ``items``, summed without host synchronisation."""

    def __init__(self) -> None:
        self.nats: torch.Tensor | None = None
        self.items: torch.Tensor | None = None

    def add(self, nats: torch.Tensor, items: torch.Tensor) -> None:
        if self.nats is None:
            self.nats = torch.zeros((), dtype=torch.float64, device=nats.device)
            self.items = torch.zeros((), dtype=torch.float64, device=nats.device)
        self.nats.add_(nats.to(self.nats.device))
        self.items.add_(items.to(self.nats.device))  # type: ignore[union-attr]

    def clear(self) -> None:
        if self.nats is not None:
            self.nats.zero_()
            self.items.zero_()  # type: ignore[union-attr]

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        """``[2]`` float64 (nats, items) on ``device`` (zeros when nothing was added)."""
        if self.nats is None:
            return torch.zeros(2, dtype=torch.float64, device=device)
        return torch.stack([self.nats, self.items]).to(device)  # type: ignore[list-item]


def _outputs_logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        logits = outputs[1] if outputs[0] is None or outputs[0].dim() == 0 else outputs[0]
    else:
        logits = None
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"the model's outputs ({type(outputs).__name__}) carry no logits tensor: the online code "
                         "needs the predictive distribution (nll_source='loss' reads the loss instead)")
    return logits


def _outputs_loss(outputs: Any) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0]
    if not isinstance(loss, torch.Tensor):
        raise ValueError("nll_source='loss' but the model returned no loss")
    return loss.detach()


class LossTap:
    """Wraps one Trainer's ``compute_loss`` and sums code lengths into device accumulators.

    ``train`` sums the train-mode batches since the owner last took them (:meth:`take_train`), ``eval`` the
    eval-mode batches of the current evaluation. ``code_train`` and ``code_eval`` switch the two modes on and off
    (off: the original runs untouched, at no cost). ``on_error(err)`` is called with any error of the tap's own
    computation; it may re-raise.

    Small classifier batches are not coded one by one: their logits (detached references, no copy) and labels are
    kept and coded together when they reach a quarter of ``working_memory`` or when the owner takes the sums, so
    that a tiny model's step pays for a list append instead of a handful of kernel launches. Every batch is still
    coded by the weights of its own forward: nothing writes to a logits tensor after its forward.
    """

    def __init__(
        self,
        *,
        nll_source: str = "logits",
        working_memory: int = DEFAULT_WORKING_MEMORY,
        on_error: Callable[[BaseException], None],
    ) -> None:
        if nll_source not in NLL_SOURCES:
            raise ValueError(f"nll_source must be one of {NLL_SOURCES}, got {nll_source!r}")
        self.nll_source = nll_source
        self.working_memory = working_memory
        self.on_error = on_error
        self.train = DeviceSums()
        self.eval = DeviceSums()
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._deferred_bytes = 0
        self.code_train = True
        self.code_eval = True
        self.mixture = 0.0  # ε of the uniform mixture, eval mode only (block-wise codes)
        self.num_classes: int | None = None
        self._trainer: Any = None
        self._original: Callable[..., Any] | None = None
        self._kind: tuple[int, tuple[bool, bool, bool]] | None = None

    # ------------------------------------------------------------------------------------------ installation
    def install(self, trainer: Any) -> None:
        """Wrap ``trainer.compute_loss`` (replacing another hfvolume tap's wrapper, never stacking on it)."""
        current = trainer.compute_loss
        previous = getattr(current, _MARK, None)
        if previous is self:
            return
        if previous is not None:
            current = previous._original
        if self.nll_source == "loss" and (trainer.label_smoother is not None or trainer.compute_loss_func is not None):
            raise ValueError("nll_source='loss' needs the model's own unsmoothed loss; this Trainer has a label "
                             "smoother or compute_loss_func: use nll_source='logits'")
        self._trainer, self._original = trainer, current

        def compute_loss(model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            return self._call(model, inputs, return_outputs, kwargs)

        setattr(compute_loss, _MARK, self)
        trainer.compute_loss = compute_loss

    # ------------------------------------------------------------------------------------------------ tapping
    def _call(self, model: Any, inputs: Any, return_outputs: bool, kwargs: dict[str, Any]) -> Any:
        original = self._original
        assert original is not None  # internal invariant: set by install()
        training = bool(model.training)
        if not ((self.code_train if training else self.code_eval) and isinstance(inputs, Mapping)):
            return original(model, inputs, return_outputs=return_outputs, **kwargs)
        snapshot = {k: inputs[k] for k in _LABEL_KEYS if k in inputs}  # before the original can pop them
        loss, outputs = original(model, inputs, return_outputs=True, **kwargs)
        try:
            self._record(model, outputs, snapshot, kwargs.get("num_items_in_batch"), training)
        except Exception as err:  # noqa: BLE001 - failure isolation: the owner warns (or re-raises when strict)
            self.on_error(err)
        return (loss, outputs) if return_outputs else loss

    def _model_kind(self, model: Any) -> tuple[bool, bool, bool]:
        """(causal, encoder_decoder, multi_label) of the model being trained, decided once per model."""
        if self._kind is not None and self._kind[0] == id(model):
            return self._kind[1]
        unwrapped = self._trainer.accelerator.unwrap_model(model) if self._trainer is not None else model
        config = getattr(unwrapped, "config", None)
        problem = getattr(config, "problem_type", None)
        if problem == "regression":
            raise ValueError("a regression head (problem_type='regression') has no discrete code length: a density "
                             "needs a quantisation step")
        kind = (is_causal_lm(unwrapped), bool(getattr(config, "is_encoder_decoder", False)),
                problem == "multi_label_classification")
        self._kind = (id(model), kind)  # asked after a forward with labels: HF has set problem_type by now
        return kind

    def _record(self, model: Any, outputs: Any, batch: Mapping[str, Any], num_items: Any, training: bool) -> None:
        causal, encoder_decoder, multi_label = self._model_kind(model)
        labels = batch.get("labels")
        logits = _outputs_logits(outputs) if self.nll_source == "logits" or not training else None
        if not multi_label and isinstance(labels, torch.Tensor) and labels.is_floating_point():
            logits = _outputs_logits(outputs) if logits is None else logits
            multi_label = tuple(labels.shape) == tuple(logits.shape) and logits.shape[-1] > 1
        if training and logits is not None and not multi_label and self._defer(logits, labels, batch):
            return
        kind = dict(causal=causal, encoder_decoder=encoder_decoder, multi_label=multi_label)
        if training and self.nll_source == "loss":
            sums = self._from_loss(outputs, batch, num_items, kind)
        else:
            keep = None if training else self._kept_rows(int(logits.shape[0]))  # type: ignore[union-attr]
            sums = item_nll(logits, batch, working_memory=self.working_memory,  # type: ignore[arg-type]
                            mixture=0.0 if training else self.mixture, per_row=keep is not None, **kind)
            if keep is not None:
                sums = ItemNll(sums.nats[:keep].sum(), sums.items[:keep].sum(), sums.num_classes)
        self.num_classes = sums.num_classes
        (self.train if training else self.eval).add(sums.nats, sums.items)

    def _defer(self, logits: torch.Tensor, labels: Any, batch: Mapping[str, Any]) -> bool:
        """Keep a small classifier batch ``[B, C]`` / ``[B]`` for coding later; False when it must be coded now."""
        if logits.dim() != 2 or not isinstance(labels, torch.Tensor) or labels.dim() != 1 or "shift_labels" in batch:
            return False
        nbytes = logits.numel() * logits.element_size()
        if nbytes * 16 > self.working_memory or labels.shape[0] != logits.shape[0]:
            return False
        self._deferred.append((logits.detach(), labels))
        self._deferred_bytes += nbytes
        self.num_classes = int(logits.shape[-1])
        if self._deferred_bytes * 4 > self.working_memory:
            self.flush()
        return True

    def flush(self) -> None:
        """Code the kept classifier batches into :attr:`train` (a concatenation per logits dtype and width, whose
        copy and log-softmax stay within ``working_memory`` with the kept tensors)."""
        groups: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for logits, labels in self._deferred:
            groups.setdefault((logits.dtype, logits.shape[-1], logits.device), []).append((logits, labels))
        self._deferred, self._deferred_bytes = [], 0
        for parts in groups.values():
            logits = torch.cat([p[0] for p in parts])
            labels = torch.cat([p[1].to(logits.device) for p in parts])
            sums = item_nll(logits, {"labels": labels}, working_memory=self.working_memory // 2)
            self.train.add(sums.nats, sums.items)

    def take_train(self, device: torch.device) -> torch.Tensor:
        """``[2]`` float64 (nats, items) of the train-mode batches since the last call, on ``device``; resets."""
        self.flush()
        out = self.train.as_tensor(device)
        self.train.clear()
        return out

    def reset(self) -> None:
        """Forget every sum (a new training run)."""
        self._deferred, self._deferred_bytes = [], 0
        self.train.clear()
        self.eval.clear()

    def _from_loss(self, outputs: Any, batch: Mapping[str, Any], num_items: Any, kind: dict[str, bool]) -> ItemNll:
        """nats = the model's mean loss × the count it divided by: HF's ``num_items_in_batch`` when the Trainer
        passed it to the model, else the items this batch scores (the model's own mean)."""
        loss = _outputs_loss(outputs).to(torch.float64)
        logits = _outputs_logits(outputs)
        items = count_items(logits, batch, **kind)
        divisor = items
        trainer = self._trainer
        if num_items is not None and trainer is not None and trainer.model_accepts_loss_kwargs:
            divisor = torch.as_tensor(num_items, device=loss.device).to(torch.float64).reshape(())
        return ItemNll(loss * divisor, items, 2 if kind["multi_label"] else int(logits.shape[-1]))

    def _kept_rows(self, rows: int) -> int | None:
        """How many leading rows of this eval batch are real items, or None when all are.

        Accelerate pads the last global batch of a multi-process evaluation with repeats of the first items, and
        ``gather_for_metrics`` keeps the first ``remainder`` rows of the rank-ordered concatenation; the same rows
        are kept here, so the evaluation set is coded exactly once whatever the number of processes.
        """
        accelerator = getattr(self._trainer, "accelerator", None)
        if accelerator is None or accelerator.num_processes <= 1:
            return None
        state = accelerator.gradient_state
        if not state.end_of_dataloader or state.remainder is None or state.remainder <= 0:
            return None
        return min(max(int(state.remainder) - accelerator.process_index * rows, 0), rows)
