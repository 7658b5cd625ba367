"""``LocalVolumeCallback``: information content measured during ``Trainer`` training, logged like any eval metric.

Where the values go, and why the callback is built this way (ECOSYSTEM.md, transformers Trainer callbacks):
``Trainer.evaluate`` logs its metrics (``Trainer.log`` → ``state.log_history`` and ``on_log`` of every callback,
which is how the ``report_to`` trackers and the console see them) *before* ``on_evaluate``, and keys added in
``on_evaluate`` reach neither the history, nor the trackers, nor the Trainer's model card. So the callback
measures inside ``on_log`` when it sees the evaluation's log, adds its keys to that very dict (which is also the
dict ``evaluate()`` returns, so ``metric_for_best_model`` and early stopping see them) and to the history entry
just appended. For the trackers to see the keys, the callback must run before them: when it first meets its
Trainer (found on the call stack of a callback event, or given with :meth:`LocalVolumeCallback.bind`) it moves
itself to the front of the Trainer's callback list. It also wraps ``trainer.create_model_card`` so hfvolume's
section survives the README the Trainer regenerates on every push (issue 8).

Measurements never touch the model's weights, train/eval flags or any global RNG (see
:func:`hfvolume.local_volume.preserved_state`), so a run with the callback trains exactly as one without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hfvolume.behaviors import materialize_batches
from hfvolume.distributed import resolve_sharding
from hfvolume.local_volume import estimate_local_volume
from hfvolume.optim_state import has_adam_state
from hfvolume.params import ParameterView, rms
from hfvolume.results import VolumeResult

logger = logging.getLogger("hfvolume")

#: Logged keys (plain floats) and the :class:`VolumeResult` summary field each one carries.
LOGGED_KEYS: dict[str, str] = {
    "eval_log_volume": "log_volume",
    "eval_information_content_bits": "information_content_bits",
    "eval_log_volume_lower_bound": "log_volume_lower_bound",
    "eval_volume_log_std": "log_volume_std",
    "eval_volume_ess": "ess",
    "eval_volume_norm_term": "norm_term",
    "eval_volume_seconds": "wall_time_s",
}
SIGMA_KEY = "eval_volume_prior_sigma"  # logged so a resumed run recovers the fixed σ from log_history alone
FAILED_KEY = "eval_volume_failed"
SERIES_FILE = "hfvolume/series.json"
INITIAL_PARAMETERS_FILE = "hfvolume/initial_parameters.safetensors"

_EVAL_LOG = re.compile(r"^eval(?:_.+)?_runtime$")  # Trainer.evaluate logs f"{metric_key_prefix}_runtime"
_PRECONDITIONERS = ("auto", "none", "adam", "adam-m", "fisher")
_SIGMAS = ("initial-rms", "rms")


@dataclass(frozen=True)
class LocalVolumeConfig:
    """Settings of :class:`LocalVolumeCallback`; also an ``HfArgumentParser`` dataclass (no name clashes with
    ``TrainingArguments``, so ``HfArgumentParser((TrainingArguments, LocalVolumeConfig))`` works).

    Units: ``cutoff`` in the behaviour's units (nats for KL); ``max_seconds`` in seconds.
    """

    n_directions: int = field(default=32, metadata={"help": "directions per measurement (the accuracy knob)"})
    cutoff: float = field(default=1e-2, metadata={"help": "behaviour cutoff ε (nats for kl)"})
    behavior: str = field(default="kl", metadata={"help": "kl, loss or output"})
    prior: str = field(default="gaussian", metadata={"help": "gaussian or uniform"})
    sigma: str = field(
        default="initial-rms",
        metadata={"help": "Gaussian σ: initial-rms (RMS of the measured weights when training starts, fixed for "
                          "the run), rms (at each measurement), or a number"},
    )
    prior_mean: str = field(
        default="origin",
        metadata={"help": "origin, or initial (the weights when training starts: measures what training added)"},
    )
    preconditioner: str = field(
        default="auto",
        metadata={"help": "auto (Adam's second moment with a 25% isotropic mixture when the optimizer has Adam "
                          "state, else isotropic), none, adam, adam-m or fisher"},
    )
    mixture: float = field(default=0.0, metadata={"help": "defensive-mixture fraction of isotropic directions"})
    direction_seed: int = field(default=0, metadata={"help": "seed of the directions (the same at every step)"})
    rtol: float = field(default=1e-2, metadata={"help": "radius tolerance relative to the cutoff"})
    volume_max_batches: Optional[int] = field(
        default=4, metadata={"help": "evaluation batches used for the measurement (none: all of them)"}
    )
    volume_eval_dataset: Optional[str] = field(
        default=None, metadata={"help": "name of the eval dataset to measure on when eval_dataset is a dict"}
    )
    measure_on_evaluate: bool = field(default=True, metadata={"help": "measure with each evaluation"})
    measure_every_n_steps: Optional[int] = field(
        default=None, metadata={"help": "also measure every N optimizer steps"}
    )
    measure_on_train_end: bool = field(default=False, metadata={"help": "also measure when training ends"})
    max_seconds: Optional[float] = field(
        default=None,
        metadata={"help": "time budget per measurement: later measurements use fewer directions (at least 8)"},
    )
    write_card: bool = field(default=True, metadata={"help": "write the card section into output_dir/README.md"})
    strict: bool = field(default=False, metadata={"help": "re-raise errors of the measurement (default: warn)"})

    def __post_init__(self) -> None:
        _positive_int("n_directions", self.n_directions)
        for name in ("cutoff", "rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.rtol >= 1:
            raise ValueError(f"rtol must be < 1, got {self.rtol!r}")
        if self.behavior not in ("kl", "loss", "output"):
            raise ValueError(f"behavior must be 'kl', 'loss' or 'output' in the callback, got {self.behavior!r}")
        if self.prior not in ("gaussian", "uniform"):
            raise ValueError(f"prior must be 'gaussian' or 'uniform', got {self.prior!r}")
        if self.sigma not in _SIGMAS:
            try:
                value = float(self.sigma)
            except (TypeError, ValueError):
                raise ValueError(f"sigma must be 'initial-rms', 'rms' or a positive number, got {self.sigma!r}") from None
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"sigma must be positive and finite, got {self.sigma!r}")
        if self.prior_mean not in ("origin", "initial"):
            raise ValueError(f"prior_mean must be 'origin' or 'initial', got {self.prior_mean!r}")
        if self.prior == "uniform" and (self.sigma != "initial-rms" or self.prior_mean != "origin"):
            raise ValueError("sigma and prior_mean apply to the Gaussian prior only")
        if self.preconditioner not in _PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {_PRECONDITIONERS}, got {self.preconditioner!r}")
        if isinstance(self.mixture, bool) or not 0.0 <= float(self.mixture) <= 1.0:
            raise ValueError(f"mixture must be in [0, 1], got {self.mixture!r}")
        _positive_int("direction_seed", self.direction_seed, minimum=0)
        if self.volume_max_batches is not None:
            _positive_int("volume_max_batches", self.volume_max_batches)
        if self.measure_every_n_steps is not None:
            _positive_int("measure_every_n_steps", self.measure_every_n_steps)
        if self.max_seconds is not None and not (
            isinstance(self.max_seconds, (int, float)) and math.isfinite(self.max_seconds) and self.max_seconds > 0
        ):
            raise ValueError(f"max_seconds must be a positive number, got {self.max_seconds!r}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")


MIN_BUDGET_DIRECTIONS = 8
AUTO_MIXTURE = 0.25  # preconditioner="auto": defensive-mixture floor with the Adam proposal


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


class LocalVolumeCallback(TrainerCallback, ExportableState):
    """Measure the local volume (information content) of the model being trained, at each evaluation.

    ``LocalVolumeCallback(n_directions=32, cutoff=1e-2, ...)`` takes the fields of :class:`LocalVolumeConfig` as
    keyword arguments (or ``LocalVolumeCallback(config)``). Each measurement calls
    :func:`hfvolume.estimate_local_volume` on the model's trainable parameters and the first
    ``volume_max_batches`` batches of the Trainer's eval data (the same batches every time), with a Gaussian prior
    whose σ is fixed when training starts, so values are comparable across steps. The values are added to the
    evaluation's metrics (keys :data:`LOGGED_KEYS`, plain floats), so they reach ``state.log_history``, every
    ``report_to`` tracker, ``trainer_state.json``, ``metric_for_best_model`` (e.g.
    ``"information_content_bits"`` with ``greater_is_better=False``) and the Trainer's model card.

    A failing measurement logs a warning, records ``eval_volume_failed = 1.0`` and training goes on
    (``strict=True`` re-raises). The series (:attr:`series`) survives checkpoint/resume: it is rebuilt from
    ``state.log_history`` (or restored with ``restore_callback_states_from_checkpoint=True``).
    """

    def __init__(self, config: LocalVolumeConfig | None = None, **kwargs: Any) -> None:
        if config is not None and not isinstance(config, LocalVolumeConfig):
            raise TypeError(f"config must be a LocalVolumeConfig, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(LocalVolumeConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LocalVolumeCallback arguments {unknown}; known: {sorted(known)}")
        base = config or LocalVolumeConfig()
        self.config = dataclasses.replace(base, **kwargs) if kwargs else base
        self.series: list[dict[str, Any]] = []  # one JSON-safe point per measured step (see _point)
        self.failures: list[dict[str, Any]] = []
        self.sigma: float | None = None if self.config.sigma in _SIGMAS else float(self.config.sigma)
        self._trainer: Any = None
        self._initial: torch.Tensor | None = None
        self._batches: list[Any] | None = None
        # ((global step, weights' version counters), logged values) of the last measurement
        self._last: tuple[tuple[int, tuple[int, ...]], dict[str, float]] | None = None
        self._seconds_per_direction: float | None = None
        self._warned: set[str] = set()  # warning templates already shown in this run (see _once_per_run)

    # ---------------------------------------------------------------------------------------- Trainer plumbing
    def state(self) -> dict[str, Any]:
        """Stateful-callback export (``restore_callback_states_from_checkpoint=True``): JSON only."""
        return {
            "args": asdict(self.config),
            "attributes": {"series": list(self.series), "failures": list(self.failures), "sigma": self.sigma},
        }

    def bind(self, trainer: Any) -> "LocalVolumeCallback":
        """Attach to ``trainer``: run before the logging callbacks and keep the card section on pushes.

        Called automatically on the first callback event; call it yourself only if you drive the callback
        outside the Trainer's event loop. Returns ``self``.
        """
        self._trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks and callbacks[0] is not self:
            # In-place move: the handler may be iterating this list right now (it is safe for a list iterator:
            # callbacks before us shift right by one and are not visited again).
            callbacks.remove(self)
            callbacks.insert(0, self)
        if not getattr(trainer.create_model_card, "_hfvolume_wrapped", False):
            trainer.create_model_card = _card_preserving(trainer, trainer.create_model_card)
        return self

    def _ensure_bound(self) -> None:
        if self._trainer is None:
            trainer = _find_trainer()
            if trainer is not None:
                self.bind(trainer)

    def on_init_end(self, args, state, control, **kwargs):
        self._ensure_bound()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._ensure_bound()
        self._last, self._batches = None, None  # a new train() call: fresh data loader, nothing measured yet
        self._warned = set()
        resumed = state.global_step > 0
        self._restore_series(state)
        theta: torch.Tensor | None = None  # the measured weights now, flattened once for σ and the prior mean
        if model is not None and (self.config.sigma == "initial-rms" or self.config.prior_mean == "initial"):
            theta = ParameterView.from_model(model).flatten(model).detach().cpu()
        if self.config.sigma == "initial-rms" and self.config.prior == "gaussian":
            if not resumed:
                self.sigma = None  # a new run (e.g. hyperparameter_search's next trial): σ of its own weights
            elif self.sigma is None:
                self.sigma = self._sigma_from_history(state)
                if self.sigma is None:
                    logger.warning("hfvolume: resumed run without a recorded prior σ; using the RMS of the current "
                                   "weights, so values are not comparable with those before the checkpoint")
            if self.sigma is None and theta is not None:
                self.sigma = rms(theta)
        if self.config.prior_mean == "initial" and theta is not None:
            self._initial = self._initial_parameters(args, state, theta, resumed)

    def on_step_end(self, args, state, control, **kwargs):
        n = self.config.measure_every_n_steps
        if n and state.global_step % n == 0:
            values = self._measure_once(args, state, kwargs)
            if values is not None and self._trainer is not None:
                self._trainer.log(dict(values))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.config.measure_on_evaluate or not logs or not self._is_volume_eval_log(logs):
            return
        values = self._measure_once(args, state, kwargs)
        if values is None:
            return
        logs.update(values)  # the same dict evaluate() returns: metric_for_best_model sees the keys
        # Trainer.log appended {**logs, "step": ...} to the history just before calling on_log: that entry.
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and _runtime_keys(entry) == _runtime_keys(logs):
            entry.update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.config.measure_on_train_end:
            values = self._measure_once(args, state, kwargs)
            if values is not None and self._trainer is not None:
                self._trainer.log(dict(values))
        if self.config.write_card and self.series and state.is_world_process_zero:
            self.write_card(args.output_dir)

    # --------------------------------------------------------------------------------------------- measuring
    def _is_volume_eval_log(self, logs: Mapping[str, Any]) -> bool:
        prefixes = [key[: -len("_runtime")] for key in _runtime_keys(logs)]
        if not prefixes:
            return False
        wanted = self.config.volume_eval_dataset
        return wanted is None or f"eval_{wanted}" in prefixes

    def _measure_once(self, args, state, kwargs: Mapping[str, Any]) -> dict[str, float] | None:
        """Measure at this global step (once: a second request at the same step, with the weights unchanged,
        reuses the values; loading other weights, e.g. load_best_model_at_end, bumps their version counters)."""
        self._ensure_bound()
        model = kwargs.get("model")
        if model is None:
            return None
        key = (int(state.global_step), tuple(p._version for p in model.parameters()))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        try:
            result = self.measure(args, state, model, optimizer=kwargs.get("optimizer"),
                                  eval_dataloader=kwargs.get("eval_dataloader"))
        except Exception as err:  # noqa: BLE001 - failure isolation is the point; KeyboardInterrupt passes
            if self.config.strict:
                raise
            logger.warning("hfvolume: local-volume measurement failed at step %d: %s: %s (training continues; "
                           "strict=True re-raises)", state.global_step, type(err).__name__, err, exc_info=True)
            self.failures.append({"step": int(state.global_step), "error": f"{type(err).__name__}: {err}"})
            values = {FAILED_KEY: 1.0}
        else:
            values = {key: float(getattr(result, attr)) for key, attr in LOGGED_KEYS.items()}
            if self.sigma is not None:
                values[SIGMA_KEY] = float(self.sigma)
            self._record(state, result, args)
        self._last = (key, values)
        return values

    def measure(self, args, state, model: torch.nn.Module, *, optimizer: Any = None,
                eval_dataloader: Any = None) -> VolumeResult:
        """One measurement of ``model`` now (what the events call). Raises on failure."""
        cfg = self.config
        batches = self._eval_batches(eval_dataloader)
        # Measured before training started (trainer.evaluate() first): the current weights are the initial ones.
        need_sigma = cfg.prior == "gaussian" and cfg.sigma == "initial-rms" and self.sigma is None
        if need_sigma or (cfg.prior_mean == "initial" and self._initial is None):
            theta = ParameterView.from_model(model).flatten(model)
            if need_sigma:
                self.sigma = rms(theta)
            if cfg.prior_mean == "initial" and self._initial is None:
                self._initial = theta.detach().cpu()
        preconditioner, mixture = self._proposal(optimizer)
        progress = bool(state.is_local_process_zero and not getattr(args, "disable_tqdm", False))
        with _once_per_run(self._warned):
            result = estimate_local_volume(
                model,
                batches,
                behavior=cfg.behavior,
                cutoff=cfg.cutoff,
                prior=cfg.prior,
                sigma=None if cfg.prior != "gaussian" else "rms" if cfg.sigma == "rms" else self.sigma,
                prior_mean=self._initial if cfg.prior_mean == "initial" else None,
                n_directions=self._budget_directions(),
                preconditioner=preconditioner,
                optimizer=optimizer if preconditioner in ("adam", "adam-m") else None,
                mixture=mixture,
                seed=cfg.direction_seed,
                rtol=cfg.rtol,
                progress=progress,
            )
        self._note_timing(result)
        return result

    def _note_timing(self, result: VolumeResult) -> None:
        """Seconds per direction of this measurement, for ``max_seconds``; the slowest rank's in a multi-process
        run (each rank timed its own share), so that every rank asks for the same n_directions next time (the
        estimator refuses ranks that disagree)."""
        if not result.n_directions:
            return
        seconds = result.wall_time_s / result.n_directions
        if int(result.settings.get("world_size", 1)) > 1:
            seconds = float(resolve_sharding(None).gather(np.array([[seconds]])).max())
        self._seconds_per_direction = seconds

    def _budget_directions(self) -> int:
        cfg = self.config
        if cfg.max_seconds is None or self._seconds_per_direction is None:
            return cfg.n_directions
        affordable = int(cfg.max_seconds / max(self._seconds_per_direction, 1e-9))
        return max(min(cfg.n_directions, affordable), min(cfg.n_directions, MIN_BUDGET_DIRECTIONS))

    def _proposal(self, optimizer: Any) -> tuple[str | None, float]:
        """(preconditioner, mixture) for this measurement."""
        choice = self.config.preconditioner
        if choice == "none":
            return None, self.config.mixture
        if choice == "auto":
            # The default chosen by benchmarks/bench_proposals.py (README, "Importance sampling"): Adam's second
            # moment with γ = 0.5 and η at the median, defended by a 25% isotropic mixture; isotropic without state.
            if optimizer is not None and has_adam_state(optimizer):
                return "adam", max(self.config.mixture, AUTO_MIXTURE)
            return None, self.config.mixture
        if choice in ("adam", "adam-m") and optimizer is None:
            raise ValueError(f"preconditioner={choice!r} needs the Trainer's optimizer, which is not available here")
        return choice, self.config.mixture

    def _eval_batches(self, eval_dataloader: Any) -> list[Any]:
        """The measurement's batches, taken once from the Trainer's eval data and reused at every step."""
        if self._batches is not None:
            return self._batches
        loader = self._eval_loader(eval_dataloader)
        if loader is None:
            raise ValueError("no evaluation data: give the Trainer an eval_dataset (the callback measures on it)")
        # Iterating a DataLoader draws its base seed from the global RNG: materialize_batches restores it.
        self._batches = materialize_batches(loader, torch.device("cpu"), max_batches=self.config.volume_max_batches)[0]
        return self._batches

    def _eval_loader(self, eval_dataloader: Any) -> Any:
        trainer = self._trainer
        if trainer is None or getattr(trainer, "eval_dataset", None) is None:
            return eval_dataloader
        eval_dataset = trainer.eval_dataset
        name = self.config.volume_eval_dataset
        if isinstance(eval_dataset, Mapping):
            if name is None:
                name = next(iter(eval_dataset))
            elif name not in eval_dataset:
                raise ValueError(f"volume_eval_dataset={name!r} is not one of the eval datasets {sorted(eval_dataset)}")
            prepared = trainer.get_eval_dataloader(name)
        else:
            prepared = trainer.get_eval_dataloader()
        # The Trainer's loader is sharded across processes; every process must measure on the *same* (whole)
        # batches, so that a multi-process run gives the single-process answer (directions are what is split).
        # Its dataset (unused columns removed) and collator are reused, in plain sequential batches.
        return torch.utils.data.DataLoader(prepared.dataset, batch_size=trainer.args.eval_batch_size,
                                           collate_fn=prepared.collate_fn, shuffle=False)

    # ------------------------------------------------------------------------------------------ series state
    def _record(self, state, result: VolumeResult, args) -> None:
        point = {"step": int(state.global_step), **result.summary(), "confidence": result.confidence,
                 "settings": {**result.settings, "global_step": int(state.global_step)}}
        self.series = [p for p in self.series if p["step"] != point["step"]] + [point]
        if state.is_world_process_zero:
            self._write_series(args.output_dir)
            if self.config.write_card and getattr(args, "push_to_hub", False):
                # Checkpoint pushes upload output_dir as it is (no create_model_card): keep its card current.
                self.write_card(args.output_dir)

    def _write_series(self, output_dir: str) -> None:
        path = Path(output_dir) / SERIES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"series": self.series, "failures": self.failures}, indent=1, default=str),
                       encoding="utf-8")
        os.replace(tmp, path)  # never a half-written series file

    def _restore_series(self, state) -> None:
        """Keep the points at or before the (resumed) step; rebuild them from ``log_history`` if none."""
        step = int(state.global_step)
        self.series = [p for p in self.series if int(p["step"]) <= step]
        self.failures = [f for f in self.failures if int(f["step"]) <= step]
        if not self.series:
            by_step = {p["step"]: p for p in volume_series(state.log_history) if p["step"] <= step}
            self.series = [by_step[s] for s in sorted(by_step)]

    @staticmethod
    def _sigma_from_history(state) -> float | None:
        for entry in reversed(state.log_history):
            if SIGMA_KEY in entry:
                return float(entry[SIGMA_KEY])
        return None

    def _initial_parameters(self, args, state, theta: torch.Tensor, resumed: bool) -> torch.Tensor:
        """The prior mean: ``theta`` (the weights now, ``[D]``) for a new run, saved for resuming; the saved one
        on a resumed run."""
        from safetensors.torch import load_file, save_file

        path = Path(args.output_dir) / INITIAL_PARAMETERS_FILE
        if resumed:
            if self._initial is not None:
                return self._initial
            if path.is_file():
                return load_file(str(path))["theta"]
            raise ValueError(f"prior_mean='initial' on a resumed run needs {path} (written when training started)")
        if state.is_world_process_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"theta": theta.contiguous()}, str(path))
        return theta

    def write_card(self, output_dir: str | os.PathLike[str]) -> None:
        """Write hfvolume's section (series table, plot, ``model-index``) into ``output_dir/README.md``."""
        from hfvolume.modelcard import card_from_trainer_output

        complete = [p for p in self.series if "log_volume_lower_bound" in p and "ess" in p]
        if not complete:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        try:
            card_from_trainer_output(output_dir, complete, plot=_have_matplotlib())
        except Exception as err:  # noqa: BLE001 - a card problem must not fail the training run
            if self.config.strict:
                raise
            logger.warning("hfvolume: could not write the model card section: %s: %s", type(err).__name__, err)


class _SeenFilter(logging.Filter):
    """Passes each warning template of the "hfvolume" logger once per run and drops its repeats; records below
    WARNING pass untouched."""

    def __init__(self, seen: set[str]) -> None:
        super().__init__()
        self.seen = seen

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def _once_per_run(seen: set[str]) -> Iterator[None]:
    """The same diagnostic (e.g. "ESS < 2") at every evaluation of a long run is noise: show each kind once."""
    log = logging.getLogger("hfvolume")
    flt = _SeenFilter(seen)
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def _runtime_keys(logs: Mapping[str, Any]) -> list[str]:
    return [key for key in logs if _EVAL_LOG.match(key)]


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _card_preserving(trainer: Any, create_model_card: Any) -> Any:
    """Wrap ``trainer.create_model_card`` so hfvolume's section is re-added after the Trainer rewrites README.md.

    ``Trainer.push_to_hub`` (and checkpoint pushes) call ``create_model_card`` and then upload ``output_dir``, so
    adding the section right after it puts the section (and the plot) in the uploaded folder.
    """

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = create_model_card(*args, **kwargs)
        if trainer.is_world_process_zero():
            for cb in trainer.callback_handler.callbacks:
                if isinstance(cb, LocalVolumeCallback) and cb.config.write_card and cb.series:
                    cb.write_card(trainer.args.output_dir)
        return out

    wrapped._hfvolume_wrapped = True  # type: ignore[attr-defined]
    return wrapped


def volume_series(source: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The series a run recorded: from its ``output_dir`` (``hfvolume/series.json``) or a ``log_history`` list."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / SERIES_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
        return list(data["series"] if isinstance(data, Mapping) else data)
    points = []
    for entry in source:
        if "eval_log_volume" in entry:
            point = {attr: entry[key] for key, attr in LOGGED_KEYS.items() if key in entry}
            point["step"] = int(entry["step"])
            points.append(point)
    return points


__all__ = ["LOGGED_KEYS", "LocalVolumeCallback", "LocalVolumeConfig", "volume_series"]
