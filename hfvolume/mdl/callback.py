"""``OnlineCodeCallback``: the first-pass online (prequential) code of the training labels and its information
transfer ``L_IT``, logged by the ``Trainer`` like any training metric.

Online code of one pass of SGD with optimizer steps on groups G_1, G_2, … (Dawid 1984; Blier & Ollivier,
arXiv 1802.07044 §2.4):

    L_online = Σ_s Σ_{t ∈ G_s} −log2 p_{θ_{s−1}}(y_t | x_t)   bits,

each item coded by the weights before the step that trains on it, which costs nothing (the tap of
:mod:`hfvolume.mdl.tap` reads it from the forward the Trainer runs anyway). It is a valid code (the receiver
replays the training) only on the first pass, so the sum freezes at the end of epoch 1. Information transfer
(after Zhang, Li, Dou & Wu, arXiv 2009.07624) is ``L_IT = L_ref − L_online``, a sum of loss differences on items
not yet trained on: ≈ 0 for labels independent of the inputs, large when what is learned generalises.

Where the values go: the callback adds its keys to the very dicts the Trainer logs (training logs, evaluation
logs, the final ``train_runtime`` log), so they reach ``state.log_history``, every ``report_to`` tracker (it moves
itself to the front of the callback list), ``trainer_state.json``, ``TrainOutput.metrics`` and
``metric_for_best_model``. Sums stay float64 on the device; ranks are summed when a log is written, with one small
collective, the same on every rank.

Failure isolation: an error of the tap logs a warning once, ``online_code_failed = 1.0`` is logged, the tap stops
and training goes on (``code_strict=True`` re-raises). Non-interference: the tap only reads outputs under
``no_grad``, draws no random numbers and never writes weights, so a run with the callback ends bit for bit like
one without it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hfvolume.mdl.codelength import LN2, CodeLength, compression, information_transfer, uniform_bits
from hfvolume.mdl.collective import sum_across_ranks
from hfvolume.mdl.evaluation import dataset_code
from hfvolume.mdl.nll import DEFAULT_WORKING_MEMORY
from hfvolume.mdl.reference import CODE_REFERENCES, SERIES_FILE, ReferenceCode, learner_reference
from hfvolume.mdl.tap import NLL_SOURCES, LossTap
from hfvolume.volume.checks import config_with_overrides

logger = logging.getLogger("hfvolume")

#: Keys of every training log (trackers show them under ``train/``); ``train_<key>`` in the final train log.
TRAIN_KEYS = ("online_code_bits", "online_code_items", "online_code_bits_per_item", "online_uniform_bits",
              "online_compression", "online_reference_bits", "information_transfer_bits", "online_code_complete")
#: Suffixes of the keys of an evaluation log with prefix ``eval`` (``eval_code_bits``, ...).
EVAL_SUFFIXES = ("code_bits", "code_items", "code_bits_per_item", "information_transfer_bits")
FAILED_KEY = "online_code_failed"
CARD_FILE = "hfvolume/code_length.md"

_RUNTIME = re.compile(r"^(.+)_runtime$")


@dataclass(frozen=True)
class OnlineCodeConfig:
    """Settings of :class:`OnlineCodeCallback`; an ``HfArgumentParser`` dataclass beside ``TrainingArguments`` and
    ``LocalVolumeConfig`` (hence the ``code_`` prefixes). Units: ``code_working_memory`` in bytes."""

    code_reference: str = field(
        default="uniform",
        metadata={"help": "reference code of L_IT: uniform (items·log2 C), initial (the weights before training, "
                          "one eval pass over the training set), learner (another run: code_reference_run) or none"},
    )
    code_reference_run: Optional[str] = field(
        default=None, metadata={"help": "learner reference: another run's output_dir (its hfvolume/code_length.json)"}
    )
    num_classes: Optional[int] = field(
        default=None, metadata={"help": "C of the uniform code (default: the logits' last dimension, V for an LM)"}
    )
    nll_source: str = field(
        default="logits",
        metadata={"help": "logits (−log p(y) recomputed, exact for any loss) or loss (the model's unsmoothed loss "
                          "× its item count; no label smoother or compute_loss_func)"},
    )
    code_working_memory: int = field(
        default=DEFAULT_WORKING_MEMORY, metadata={"help": "bytes of float temporaries per chunk of logits rows"}
    )
    code_write_card: bool = field(
        default=True, metadata={"help": "write the card sub-section (hfvolume/code_length.md) at train end"}
    )
    code_strict: bool = field(default=False, metadata={"help": "re-raise errors of the tap (default: warn)"})

    def __post_init__(self) -> None:
        if self.code_reference not in CODE_REFERENCES:
            raise ValueError(f"code_reference must be one of {CODE_REFERENCES}, got {self.code_reference!r}")
        if (self.code_reference == "learner") != (self.code_reference_run is not None):
            raise ValueError("code_reference='learner' needs code_reference_run (and only it uses it), got "
                             f"code_reference={self.code_reference!r}, code_reference_run={self.code_reference_run!r}")
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2
        ):
            raise ValueError(f"num_classes must be an int ≥ 2, got {self.num_classes!r}")
        if self.nll_source not in NLL_SOURCES:
            raise ValueError(f"nll_source must be one of {NLL_SOURCES}, got {self.nll_source!r}")
        wm = self.code_working_memory
        if isinstance(wm, bool) or not isinstance(wm, int) or wm < 0:
            raise ValueError(f"code_working_memory must be a non-negative int of bytes, got {wm!r}")


def _find_trainer() -> Any:
    """The ``Trainer`` whose method is on the call stack (callback events are called from Trainer methods)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _save_expected(args: Any, state: Any, *, epoch_end: bool) -> bool:
    """Whether the Trainer's default flow checkpoints after this event (its DefaultFlowCallback's rules)."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if epoch_end:
        return strategy == "epoch"
    if strategy != "steps":
        return False
    return (state.save_steps > 0 and state.global_step % state.save_steps == 0) or state.global_step >= state.max_steps


class OnlineCodeCallback(TrainerCallback, ExportableState):
    """Log the first-pass online code of the training labels and its information transfer L_IT.

    ``OnlineCodeCallback(code_reference="initial", ...)`` takes the fields of :class:`OnlineCodeConfig` as keyword
    arguments (or ``OnlineCodeCallback(config)``). Keys (plain floats): :data:`TRAIN_KEYS` in every training log,
    ``train_<key>`` in the final one, and ``<prefix>_code_bits``, ``_code_items``, ``_code_bits_per_item`` (the
    exact held-out code of that evaluation set under the current weights) and ``<prefix>_information_transfer_bits``
    (the training L_IT at this step, beside ``eval_information_content_bits``) in every evaluation log.
    ``online_code_complete`` is 1.0 once the first pass has ended (the values freeze there); ``max_steps`` shorter
    than an epoch leaves it 0.0.

    The series (one point per training log) and the reference are written to ``output_dir/hfvolume/
    code_length.json``; a resumed run continues the sum from the checkpoint's exported state
    (``restore_callback_states_from_checkpoint=True``) or from ``log_history``.
    """

    def __init__(self, config: OnlineCodeConfig | None = None, **kwargs: Any) -> None:
        self.config = config_with_overrides(OnlineCodeConfig, config, kwargs, owner="OnlineCodeCallback")
        self.tap = LossTap(nll_source=self.config.nll_source, working_memory=self.config.code_working_memory,
                           on_error=self._tap_error)
        self.series: list[dict[str, Any]] = []
        self.restored: dict[str, Any] | None = None  # set by the Trainer when it restores a checkpoint's state
        self.code = CodeLength()  # first-pass code of all ranks, as of the last reduction
        self.complete = False
        self.failed = False
        self.reference: ReferenceCode | None = None
        self.num_classes: int | None = self.config.num_classes
        self._local_error: str | None = None
        self._from_checkpoint = False
        self._install_error: ValueError | None = None
        self._trainer: Any = None

    # ---------------------------------------------------------------------------------------- Trainer plumbing
    def bind(self, trainer: Any) -> "OnlineCodeCallback":
        """Attach to ``trainer``: wrap its ``compute_loss`` and run before the logging callbacks. Called
        automatically on the first callback event. Returns ``self``."""
        self._trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks and callbacks[0] is not self:
            callbacks.remove(self)  # in place: safe while the handler iterates (earlier entries shift right)
            callbacks.insert(0, self)
        try:
            self.tap.install(trainer)
        except ValueError as err:  # e.g. nll_source="loss" beside a label smoother: reported at every run start
            self._install_error = err
            self._tap_error(err)
        if self.restored is not None:
            self._apply_restored(self.restored)
            self.restored = None
        return self

    def _ensure_bound(self) -> None:
        if self._trainer is None:
            trainer = _find_trainer()
            if trainer is not None:
                self.bind(trainer)

    def state(self) -> dict[str, Any]:
        """Stateful-callback export: JSON only. The sums of all ranks as of the last reduction (the callback
        reduces before the default flow's checkpoints), plus this process's unreduced steps when it is alone."""
        code = self.code
        alone = self._trainer is None or self._trainer.args.world_size == 1
        if alone:
            self.tap.flush()
            if self.tap.train.nats is not None:
                code = code + CodeLength(float(self.tap.train.nats), float(self.tap.train.items))
        return {"args": asdict(self.config),
                "attributes": {"restored": {
                    "nats": code.nats, "items": code.items, "complete": self.complete, "failed": self.failed,
                    "num_classes": self.num_classes, "series": list(self.series),
                    "reference": None if self.reference is None else self.reference.to_dict()}}}

    def _apply_restored(self, data: Mapping[str, Any]) -> None:
        self.code = CodeLength(float(data["nats"]), float(data["items"]))
        self.complete, self.failed = bool(data["complete"]), bool(data["failed"])
        self.num_classes = data.get("num_classes") or self.num_classes
        self.series = list(data.get("series") or [])
        ref = data.get("reference")
        self.reference = None if ref is None else ReferenceCode.from_dict(ref)
        self.tap.reset()
        self._from_checkpoint = True
        self.tap.code_train = not (self.complete or self.failed)
        self.tap.code_eval = not self.failed

    def _tap_error(self, err: BaseException) -> None:
        if self.config.code_strict:
            raise err
        if self._local_error is None:
            logger.warning("hfvolume: online code stopped: %s: %s (training continues; code_strict=True re-raises)",
                           type(err).__name__, err, exc_info=True)
            self._local_error = f"{type(err).__name__}: {err}"
        self.tap.code_train = self.tap.code_eval = False

    # ------------------------------------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        self._ensure_bound()

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._ensure_bound()
        self.tap.reset()
        if state.global_step > 0:
            if not self._from_checkpoint:  # the Trainer restored the exported state before this event
                self._resume(args, state)
        else:
            self.code, self.complete, self.failed, self.series = CodeLength(), False, False, []
            self._local_error = None
            self.tap.code_train = self.tap.code_eval = True
            if self._install_error is not None:
                self._tap_error(self._install_error)
            else:
                self.reference = self._guarded(lambda: self._make_reference(args, model, train_dataloader))
        self._from_checkpoint = False  # a later train() call (e.g. a hyperparameter trial) starts afresh
        if state.is_world_process_zero:
            self._write_series(args.output_dir)

    def on_step_begin(self, args, state, control, **kwargs):
        self._ensure_bound()  # a callback restored from a checkpoint is new: it must tap from the first step

    def on_step_end(self, args, state, control, **kwargs):
        # The tap adds each batch to its train sums (it codes only during the first pass); nothing to move here
        # but, before the default flow's checkpoints, the sums of all ranks (so that the exported state is global).
        if _save_expected(args, state, epoch_end=False):
            self._guarded(lambda: self._reduce(args))

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.complete and state.epoch is not None and state.epoch >= 1.0 - 1e-9:
            self.complete = True
            self.tap.code_train = False  # later passes are not a code: nothing more to compute
        if _save_expected(args, state, epoch_end=True):
            self._guarded(lambda: self._reduce(args))

    def on_predict(self, args, state, control, **kwargs):
        self.tap.eval.clear()  # predict() logs nothing: its eval-mode sums must not leak into the next evaluation

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._ensure_bound()
        if not logs:
            return
        prefixes = [m.group(1) for m in map(_RUNTIME.match, logs) if m]
        if "train" in prefixes:
            values = self._train_values(args, state, prefix="train_")
        elif prefixes:
            values = self._eval_values(args, state, prefixes[0])
        elif "loss" in logs:
            values = self._train_values(args, state, prefix="")
            if values and FAILED_KEY not in values:
                self._record_point(state, values)
        else:
            return
        # Trainer.log appended a copy of logs to the history just before calling on_log: update that entry too.
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and all(k in entry for k in logs):
            entry.update(values)
        logs.update(values)  # the dict evaluate() and train() return: metric_for_best_model sees the keys

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._write_series(args.output_dir)
            if self.config.code_write_card and self.series:
                self._write_card(args.output_dir)

    # ------------------------------------------------------------------------------------------------ values
    def _reduce(self, args: Any, *, with_eval: bool = False) -> tuple[float, float] | None:
        """Sum this rank's finished steps (and eval sums) over ranks into :attr:`code`; the same collective on
        every rank. Returns the evaluation's (nats, items) when ``with_eval``; None after a failure."""
        if self.failed:
            return None
        device = args.device
        try:
            train = self.tap.take_train(device)
        except Exception as err:  # noqa: BLE001 - coding the kept batches failed: report it with the others
            self._tap_error(err)
            train = torch.zeros(2, dtype=torch.float64, device=device)
        vec = torch.cat([train, self.tap.eval.as_tensor(device),
                         torch.tensor([float(self._local_error is not None)], dtype=torch.float64, device=device)])
        total = sum_across_ranks(vec, world=args.world_size)
        if with_eval:
            self.tap.eval.clear()
        if total[4] > 0 or not all(math.isfinite(v) for v in total[:4]):
            self.failed = True
            self.tap.code_train = self.tap.code_eval = False
            if self._local_error is None:
                logger.warning("hfvolume: online code stopped: %s", "a failure on another rank" if total[4] > 0
                               else "non-finite code length (inf/nan logits)")
            return None
        self.code = self.code + CodeLength(float(total[0]), float(total[1]))
        self.num_classes = self.num_classes or self.tap.num_classes
        return float(total[2]), float(total[3])

    def current(self) -> dict[str, float]:
        """The training-set values as of the last reduction (:data:`TRAIN_KEYS` that are defined)."""
        bits, items = self.code.bits, self.code.items
        out = {"online_code_bits": bits, "online_code_items": items,
               "online_code_complete": float(self.complete)}
        if items <= 0:
            return out
        out["online_code_bits_per_item"] = bits / items
        if self.num_classes is not None:
            out["online_uniform_bits"] = uniform_bits(items, self.num_classes)
            if bits > 0:
                out["online_compression"] = compression(out["online_uniform_bits"], bits)
        ref = None if self.reference is None else self.reference.bits(items, self.num_classes)
        if ref is not None:
            out["online_reference_bits"] = ref
            out["information_transfer_bits"] = information_transfer(ref, bits)
        return out

    def _train_values(self, args: Any, state: Any, *, prefix: str) -> dict[str, float]:
        if self._guarded(lambda: self._reduce(args)) is None and self.failed:
            return {prefix + FAILED_KEY: 1.0}
        return {prefix + k: float(v) for k, v in self.current().items()}

    def _eval_values(self, args: Any, state: Any, prefix: str) -> dict[str, float]:
        got = self._guarded(lambda: self._reduce(args, with_eval=True))
        if got is None:
            return {f"{prefix}_{FAILED_KEY}": 1.0} if self.failed else {}
        nats, items = got
        values: dict[str, float] = {}
        if items > 0:
            values = {f"{prefix}_code_bits": nats / LN2, f"{prefix}_code_items": items,
                      f"{prefix}_code_bits_per_item": nats / LN2 / items}
        lit = self.current().get("information_transfer_bits")
        if lit is not None:
            values[f"{prefix}_information_transfer_bits"] = lit
        if values and self.series and self.series[-1]["step"] == int(state.global_step) and items > 0:
            self.series[-1][f"{prefix}_code_bits_per_item"] = values[f"{prefix}_code_bits_per_item"]
        return values

    def _guarded(self, fn: Any) -> Any:
        """``fn()``, with any error handled like a tap error (strict: re-raised)."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - failure isolation is the point; KeyboardInterrupt passes
            self._tap_error(err)
            return None

    def _record_point(self, state: Any, values: Mapping[str, float]) -> None:
        point = {"step": int(state.global_step), "epoch": state.epoch, "items": values.get("online_code_items"),
                 "online_bits": values.get("online_code_bits"), "uniform_bits": values.get("online_uniform_bits"),
                 "reference_bits": values.get("online_reference_bits"),
                 "information_transfer_bits": values.get("information_transfer_bits"),
                 "complete": values.get("online_code_complete")}
        self.series = [p for p in self.series if p["step"] != point["step"]] + [point]

    # ---------------------------------------------------------------------------------------- reference, files
    def _make_reference(self, args: Any, model: Any, train_dataloader: Any) -> ReferenceCode | None:
        kind = self.config.code_reference
        if kind == "none":
            return None
        if kind == "uniform":
            return ReferenceCode("uniform")
        if kind == "learner":
            return learner_reference(self.config.code_reference_run)  # type: ignore[arg-type]
        if model is None or train_dataloader is None:
            raise ValueError("code_reference='initial' needs the model and the training data at on_train_begin")
        trainer = self._trainer
        local = dataset_code(model, train_dataloader.dataset, train_dataloader.collate_fn,
                             batch_size=args.per_device_eval_batch_size, device=args.device,
                             kind=self.tap._model_kind, rank=trainer.accelerator.process_index,
                             world=trainer.accelerator.num_processes,
                             working_memory=self.config.code_working_memory)
        total = sum_across_ranks(local[:2], world=args.world_size)
        self.num_classes = self.num_classes or (int(local[2]) if local[2] > 0 else None)
        return ReferenceCode("initial", nats=float(total[0]), items=float(total[1]))

    def _resume(self, args: Any, state: Any) -> None:
        """Continue the sum of a resumed run from the series file or ``log_history`` (the checkpoint's exported
        state, when restored by the Trainer, overrides this on the next event)."""
        step = int(state.global_step)
        data = _read_series(args.output_dir)
        if data.get("reference") is not None:
            self.reference = ReferenceCode.from_dict(data["reference"])
        elif self.config.code_reference in ("uniform", "learner"):
            self.reference = self._guarded(lambda: self._make_reference(args, None, None))
        elif self.config.code_reference == "initial":
            logger.warning("hfvolume: resumed without %s: the 'initial' reference (the weights before training) is "
                           "lost, so L_IT is not logged", SERIES_FILE)
        entries = [e for e in state.log_history if "online_code_bits" in e and int(e["step"]) <= step]
        if not entries:
            logger.warning("hfvolume: resumed at step %d without a logged online code: it starts again here", step)
            return
        last = entries[-1]
        self.code = CodeLength(float(last["online_code_bits"]) * LN2, float(last["online_code_items"]))
        self.complete = bool(last.get("online_code_complete", 0.0))
        self.tap.code_train = not self.complete
        self.series = [p for p in data.get("series", []) if int(p["step"]) <= step]
        if int(last["step"]) < step and not self.complete:
            logger.warning("hfvolume: resumed at step %d but the online code was last logged at step %d: the items "
                           "of the steps in between are not coded (log at the checkpoint steps to avoid this)",
                           step, int(last["step"]))

    def summary(self) -> dict[str, Any]:
        """Plain data for the card and the series file: the current values and the settings."""
        return {**self.current(), "reference": self.config.code_reference, "num_classes": self.num_classes,
                "nll_source": self.config.nll_source, "failed": self.failed}

    def _write_series(self, output_dir: str) -> None:
        path = Path(output_dir) / SERIES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"summary": self.summary(), "series": self.series,
                "reference": None if self.reference is None else self.reference.to_dict()}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)  # never a half-written file

    def _write_card(self, output_dir: str) -> None:
        from hfvolume.mdl.card import render_code_section

        try:
            text = render_code_section(self.summary())
            (Path(output_dir) / CARD_FILE).write_text(text, encoding="utf-8")
        except Exception as err:  # noqa: BLE001 - a card problem must not fail the training run
            if self.config.code_strict:
                raise
            logger.warning("hfvolume: could not write the code-length card section: %s: %s", type(err).__name__, err)


def _read_series(output_dir: str) -> dict[str, Any]:
    path = Path(output_dir) / SERIES_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


__all__ = ["EVAL_SUFFIXES", "FAILED_KEY", "OnlineCodeCallback", "OnlineCodeConfig", "TRAIN_KEYS"]
