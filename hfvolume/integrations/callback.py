"""``LocalVolumeCallback``: information content measured during ``Trainer`` training, logged like any eval metric.

Where the values go, and why the callback is built this way: ``Trainer.evaluate`` logs its metrics
(``Trainer.log`` → ``state.log_history`` and ``on_log`` of every callback, which is how the ``report_to`` trackers
and the console see them) *before* ``on_evaluate``, and keys added in ``on_evaluate`` reach neither the history, nor
the trackers, nor the Trainer's model card. So the callback measures inside ``on_log`` when it sees an evaluation's
log, adds its keys to that very dict (which is also the dict ``evaluate()`` returns, so ``metric_for_best_model``
and early stopping see them) and to the history entry just appended. For the trackers to see the keys, the
callback must run before them: when it first meets its Trainer (:mod:`hfvolume.integrations.trainer_binding`) it
moves itself to the front of the Trainer's callback list. It also wraps ``trainer.create_model_card`` so
hfvolume's section survives the README the Trainer regenerates before every push.

Nothing the callback does may stop training: a failed measurement, a file that cannot be written or a prior that
cannot be set up is logged once and recorded (``strict=True`` re-raises). Measurements never touch the model's
weights, train/eval flags or any global RNG (:func:`hfvolume.models.state.preserved_state`), so a run with the
callback trains exactly as one without it.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict
from typing import Any, Callable, Mapping

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import is_matplotlib_available

from hfvolume.integrations import trainer_binding as binding
from hfvolume.integrations.callback_config import (
    AUTO_MIXTURE,
    DIAGNOSTIC_KEYS,
    FAILED_KEY,
    LOGGED_KEYS,
    MIN_BUDGET_DIRECTIONS,
    SIGMA_KEY,
    SIGMA_NAME,
    SIGMA_RULES,
    LocalVolumeConfig,
    failed_key,
    metric_keys,
    sigma_key,
)
from hfvolume.integrations.callback_data import (
    EvalTarget,
    eval_loader,
    eval_log_prefixes,
    eval_set_names,
    step_targets,
    target_for_prefix,
)
from hfvolume.integrations.callback_files import (
    INITIAL_PARAMETERS_FILE,
    SERIES_FILE,
    load_initial_parameters,
    save_initial_parameters,
    series_prefixes,
    volume_series,
    write_series,
)
from hfvolume.integrations.callback_logging import once_per_run, trainer_log_level
from hfvolume.integrations.callback_sections import extra_card_content, report_init_health
from hfvolume.measure.local_volume import estimate_local_volume
from hfvolume.models.batches import materialize_batches
from hfvolume.models.optim_state import has_adam_state
from hfvolume.models.params import ParameterView, rms
from hfvolume.parallel.distributed import resolve_sharding
from hfvolume.volume.checks import config_with_overrides
from hfvolume.volume.results import VolumeResult

logger = logging.getLogger("hfvolume")

LN2 = math.log(2.0)
_EXPORTED = ("series", "series_by_prefix", "failures", "sigma")  # attributes saved in checkpoints


def _event(*, required: bool = False, refresh: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a Trainer event: find the Trainer (``required``: raise if it cannot be found; ``refresh``: look
    again even if bound, for events that start a run), hand the event to the instance that serves the Trainer
    now (see :meth:`LocalVolumeCallback.bind`) and run it at the Trainer's log level."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: "LocalVolumeCallback", args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            live = self._attach(required=required, refresh=refresh)
            with trainer_log_level(args):
                return method(live, args, state, control, **kwargs)

        return run

    return decorate


class LocalVolumeCallback(TrainerCallback, ExportableState):
    """Measure the local volume (information content) of the model being trained, at each evaluation.

    ``LocalVolumeCallback(n_directions=32, cutoff=1e-2, ...)`` takes the fields of :class:`LocalVolumeConfig` as
    keyword arguments (or ``LocalVolumeCallback(config)``). Each measurement calls
    :func:`hfvolume.estimate_local_volume` on the model's trainable parameters and the first
    ``volume_max_batches`` batches of the evaluated data (the same batches every time), with a Gaussian prior
    whose σ is fixed when training starts, so values are comparable across steps (Scherlis & Belrose 2025, §3:
    the local volume is the prior mass of the region where the behaviour stays within ``cutoff``).

    Logged values (plain floats, under the evaluation's prefix: ``eval_`` for the eval set, ``eval_<name>_`` for
    each set of a dict ``eval_dataset`` unless ``volume_eval_dataset`` picks one, ``test_`` for
    ``evaluate(metric_key_prefix="test")``): :data:`LOGGED_KEYS` (always finite), :data:`DIAGNOSTIC_KEYS` (Pareto
    k̂ and the bootstrap std, NaN when not meaningful), the σ and ``volume_failed`` (0.0 or 1.0). They reach
    ``state.log_history``, every ``report_to`` tracker, ``trainer_state.json``, ``metric_for_best_model`` (e.g.
    ``"information_content_bits"`` with ``greater_is_better=False``) and the Trainer's model card.

    Never stops training: a failing measurement logs a warning, records ``volume_failed = 1.0`` and, when
    ``metric_for_best_model`` names one of its keys, logs that key at its worst value (+inf when
    ``greater_is_better=False``, −inf otherwise) so the Trainer finds it and never picks that step as best.
    ``strict=True`` re-raises. Weights all zero when training starts (a zero-initialised head) take σ from all
    the model's weights, with a warning; a forward that draws random numbers in eval mode is refused.

    The series (:attr:`series`: the main prefix; :attr:`series_by_prefix`: the others) survives checkpoint/resume:
    it is rebuilt from ``state.log_history``, or restored with ``restore_callback_states_from_checkpoint=True``,
    into this very object (when it was given to the Trainer's constructor, or bound before ``train()``).
    """

    _restored_from_checkpoint = False  # set on the copies the Trainer builds from a checkpoint's exported state

    def __init__(self, config: LocalVolumeConfig | None = None, **kwargs: Any) -> None:
        self.config = config_with_overrides(LocalVolumeConfig, config, kwargs, owner="LocalVolumeCallback")
        self.series: list[dict[str, Any]] = []  # one JSON-safe point per measured step of the main prefix
        self.series_by_prefix: dict[str, list[dict[str, Any]]] = {}  # the other prefixes' points
        self.failures: list[dict[str, Any]] = []
        self.sigma: float | None = None if self.config.sigma in SIGMA_RULES else float(self.config.sigma)
        self._trainer: Any = None
        self._initial: torch.Tensor | None = None
        self._seconds_per_direction: float | None = None  # of the last measurement, for max_seconds
        self._new_run()

    def _new_run(self) -> None:
        """Forget what belongs to one ``train()`` call: data, last values, warnings shown, set-up errors."""
        self._batches: dict[str, list[Any]] = {}  # EvalTarget.data_key → batches
        # prefix → ((global step, weights' version counters, data key), logged values) of its last measurement
        self._last: dict[str, tuple[tuple[Any, ...], dict[str, float]]] = {}
        self._warned: set[str] = set()  # warnings already shown in this run (see once_per_run, _warn_once)
        self._setup_error: str | None = None
        self.init_health: Any = None  # the initialisation-health report of the run, when asked for

    # ---------------------------------------------------------------------------------------- Trainer plumbing
    def state(self) -> dict[str, Any]:
        """Stateful-callback export (``restore_callback_states_from_checkpoint=True``): JSON only."""
        attributes = {"series": list(self.series), "failures": list(self.failures), "sigma": self.sigma,
                      "series_by_prefix": {k: list(v) for k, v in self.series_by_prefix.items()}}
        return {"args": asdict(self.config), "attributes": {**attributes, "_restored_from_checkpoint": True}}

    def bind(self, trainer: Any) -> "LocalVolumeCallback":
        """Attach to ``trainer``: run before the logging callbacks and keep the card section on pushes.

        Called automatically by the callback's events (they find the Trainer on the call stack); call it yourself
        after ``trainer.add_callback(callback)`` when you drive the callback outside the Trainer's own methods, or
        before ``train(resume_from_checkpoint=...)`` with ``restore_callback_states_from_checkpoint=True`` for a
        callback added after construction. Returns the instance that serves ``trainer``: ``self``, except on the
        copy the Trainer rebuilt from a checkpoint, which hands its state back to the original object (the one
        the user holds) and puts it back in its place.
        """
        if self._restored_from_checkpoint:
            self._restored_from_checkpoint = False
            original = binding.orphan_of(trainer, self)
            if original is not None:
                original._take_state_of(self)
                binding.replace_in_list(trainer, self, original)
                return original.bind(trainer)
        self._trainer = trainer
        binding.register(trainer, self)
        binding.move_to_front(trainer, self)
        if not getattr(trainer.create_model_card, "_hfvolume_wrapped", False):
            trainer.create_model_card = _card_preserving(trainer, trainer.create_model_card)
        return self

    def _take_state_of(self, restored: "LocalVolumeCallback") -> None:
        self.config = restored.config
        for name in _EXPORTED:
            setattr(self, name, getattr(restored, name))

    def _attach(self, *, required: bool, refresh: bool) -> "LocalVolumeCallback":
        current = self._trainer
        serving = current is not None and binding.holds(current, self)
        if refresh or not serving:
            found = binding.find_trainer(self)
            if found is not None and found is not current:
                return self.bind(found)
            if found is None and not serving and required:
                raise RuntimeError(binding.UNBOUND_MESSAGE.format(name=type(self).__name__))
        return self

    @_event(refresh=True)
    def on_init_end(self, args, state, control, **kwargs):
        pass  # binding only: moves the callback ahead of the trackers before anything is logged

    @_event(required=True, refresh=True)
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._new_run()  # a new train() call: fresh data loaders, nothing measured yet
        self._restore_series(state)
        self._check_eval_set_choice()
        try:
            self._fix_prior(args, state, model)
        except Exception as err:  # noqa: BLE001 - training goes on; the measurements report the reason
            if self.config.strict:
                raise
            self._setup_error = f"{type(err).__name__}: {err}"
            logger.warning("hfvolume: cannot set up the prior of this run's measurements: %s (training continues; "
                           "every measurement of this run will fail)", self._setup_error)
        if self.config.init_health_report and model is not None:
            self.init_health = report_init_health(model, trainer=self._trainer, state=state,
                                                  strict=self.config.strict)

    @_event()
    def on_step_end(self, args, state, control, **kwargs):
        n = self.config.measure_every_n_steps
        if n and state.global_step % n == 0:
            self._measure_and_log(args, state, kwargs)

    @_event()
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.config.measure_on_evaluate or not logs:
            return
        targets = [self._target_for(prefix) for prefix in eval_log_prefixes(logs)]
        values: dict[str, float] = {}
        for target in targets:
            if target is not None:
                values.update(self._measure_once(args, state, kwargs, target) or {})
        if not values:
            return
        logs.update(values)  # the same dict evaluate() returns: metric_for_best_model sees the keys
        # Trainer.log appended {**logs, "step": ...} to the history just before calling on_log: that entry.
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step and (
                eval_log_prefixes(entry) == eval_log_prefixes(logs)):
            entry.update(values)

    @_event()
    def on_train_end(self, args, state, control, **kwargs):
        if self.config.measure_on_train_end:
            self._measure_and_log(args, state, kwargs)
        if self.config.write_card and self.series and state.is_world_process_zero:
            self.write_card(args.output_dir)

    # --------------------------------------------------------------------------------------------- measuring
    def _target_for(self, prefix: str) -> EvalTarget | None:
        return target_for_prefix(prefix, self.config.volume_eval_dataset, eval_set_names(self._trainer))

    def _step_targets(self) -> list[EvalTarget]:
        return step_targets(self.config.volume_eval_dataset, eval_set_names(self._trainer))

    def _main_prefix(self) -> str:
        return self._step_targets()[0].prefix

    def _measure_and_log(self, args, state, kwargs: Mapping[str, Any]) -> None:
        """Measure outside an evaluation (every n steps, at train end) and log through the Trainer."""
        values: dict[str, float] = {}
        for target in self._step_targets():
            values.update(self._measure_once(args, state, kwargs, target) or {})
        if values and self._trainer is not None:
            self._trainer.log(dict(values))

    def _measure_once(self, args, state, kwargs: Mapping[str, Any], target: EvalTarget) -> dict[str, float] | None:
        """Measure ``target`` at this global step (once: a second request at the same step, with the weights
        unchanged, reuses the values; loading other weights, e.g. load_best_model_at_end, bumps their version
        counters). Returns the values to log, also when the measurement failed."""
        model = kwargs.get("model")
        if model is None:
            return None
        key = (int(state.global_step), tuple(p._version for p in model.parameters()), target.data_key)
        last = self._last.get(target.prefix)
        if last is not None and last[0] == key:
            return last[1]
        try:
            result = self._measure_target(args, state, model, target, optimizer=kwargs.get("optimizer"),
                                          eval_dataloader=kwargs.get("eval_dataloader"))
        except Exception as err:  # noqa: BLE001 - failure isolation is the point; KeyboardInterrupt passes
            if self.config.strict:
                raise
            logger.warning("hfvolume: local-volume measurement failed at step %d: %s: %s (training continues; "
                           "strict=True re-raises)", state.global_step, type(err).__name__, err, exc_info=True)
            self.failures.append({"step": int(state.global_step), "prefix": target.prefix,
                                  "error": f"{type(err).__name__}: {err}"})
            values = _failure_values(args, target.prefix)
        else:
            values = {key: float(getattr(result, attr)) for key, attr in metric_keys(target.prefix).items()}
            if self.sigma is not None:
                values[sigma_key(target.prefix)] = float(self.sigma)
            values[failed_key(target.prefix)] = 0.0
            self._record(state, result, args, target.prefix)
            _report(state, result, target.prefix)
        self._last[target.prefix] = (key, values)
        return values

    def measure(self, args, state, model: torch.nn.Module, *, optimizer: Any = None,
                eval_dataloader: Any = None) -> VolumeResult:
        """One measurement of ``model`` now, on the data of the main series (what the events call). Raises on
        failure."""
        return self._measure_target(args, state, model, self._step_targets()[0], optimizer=optimizer,
                                    eval_dataloader=eval_dataloader)

    def _measure_target(self, args, state, model: torch.nn.Module, target: EvalTarget, *, optimizer: Any,
                        eval_dataloader: Any) -> VolumeResult:
        cfg = self.config
        if self._setup_error is not None:
            raise ValueError(self._setup_error)
        batches = self._eval_batches(target, eval_dataloader)
        # Measured before training started (trainer.evaluate() first): the current weights are the initial ones.
        need_sigma = cfg.prior == "gaussian" and cfg.sigma == "initial-rms" and self.sigma is None
        if need_sigma or (cfg.prior_mean == "initial" and self._initial is None):
            theta = ParameterView.from_model(model).flatten(model)
            if need_sigma:
                self.sigma = _starting_sigma(model, theta)
            if cfg.prior_mean == "initial" and self._initial is None:
                self._initial = theta.detach().cpu()
        preconditioner, mixture = self._proposal(optimizer)
        progress = bool(state.is_local_process_zero and not getattr(args, "disable_tqdm", False))
        with once_per_run(self._warned):
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
                optimizer=optimizer if preconditioner in ("adam", "adam-m", "ggn") else None,
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
            # The default chosen by scripts/benchmarks/bench_proposals.py (README, "Importance sampling"): Adam's
            # second moment with γ = 0.5 and η at the median, defended by a 25% isotropic mixture; isotropic
            # without optimizer state.
            if optimizer is not None and has_adam_state(optimizer):
                return "adam", max(self.config.mixture, AUTO_MIXTURE)
            return None, self.config.mixture
        if choice in ("adam", "adam-m") and optimizer is None:
            raise ValueError(f"preconditioner={choice!r} needs the Trainer's optimizer, which is not available here")
        return choice, self.config.mixture

    def _eval_batches(self, target: EvalTarget, eval_dataloader: Any) -> list[Any]:
        """The batches of ``target``'s data, taken once per run and reused at every step."""
        cached = self._batches.get(target.data_key)
        if cached is not None:
            return cached
        loader = eval_loader(self._trainer, target, eval_dataloader)
        if loader is None:
            raise ValueError("no evaluation data: give the Trainer an eval_dataset (the callback measures on it)")
        # Iterating a DataLoader draws its base seed from the global RNG: materialize_batches restores it.
        batches = materialize_batches(loader, torch.device("cpu"), max_batches=self.config.volume_max_batches)[0]
        self._batches[target.data_key] = batches
        return batches

    # ----------------------------------------------------------------------------------- prior set-up, files
    def _fix_prior(self, args, state, model: torch.nn.Module | None) -> None:
        """σ (``sigma="initial-rms"``) and the prior mean (``prior_mean="initial"``) of this run, from the weights
        when training starts (or, on a resumed run, from what the run recorded then)."""
        cfg = self.config
        resumed = state.global_step > 0
        theta: torch.Tensor | None = None  # the measured weights now, flattened once for σ and the prior mean
        if model is not None and (cfg.sigma == "initial-rms" or cfg.prior_mean == "initial"):
            theta = ParameterView.from_model(model).flatten(model).detach().cpu()
        if cfg.sigma == "initial-rms" and cfg.prior == "gaussian":
            if not resumed:
                self.sigma = None  # a new run (e.g. hyperparameter_search's next trial): σ of its own weights
            elif self.sigma is None:
                self.sigma = _sigma_from_history(state.log_history)
                if self.sigma is None:
                    logger.warning("hfvolume: resumed run without a recorded prior σ; using the RMS of the current "
                                   "weights, so values are not comparable with those before the checkpoint")
            if self.sigma is None and theta is not None:
                self.sigma = _starting_sigma(model, theta)
        if cfg.prior_mean == "initial" and theta is not None:
            if resumed:
                self._initial = self._initial if self._initial is not None else load_initial_parameters(
                    args.output_dir)
            else:
                self._initial = theta
                if state.is_world_process_zero:
                    self._save(INITIAL_PARAMETERS_FILE, lambda: save_initial_parameters(args.output_dir, theta))

    def _check_eval_set_choice(self) -> None:
        wanted, names = self.config.volume_eval_dataset, eval_set_names(self._trainer)
        if wanted is not None and wanted not in names:
            self._warn_once("eval-set", "hfvolume: volume_eval_dataset=%r is not one of the eval datasets %s: "
                            "evaluations will not be measured", wanted, names or "(eval_dataset is not a dict)")

    def _record(self, state, result: VolumeResult, args, prefix: str) -> None:
        point = {"step": int(state.global_step), **result.summary(), "confidence": result.confidence,
                 "settings": {**result.settings, "global_step": int(state.global_step)}}
        if prefix == self._main_prefix():
            self.series = [p for p in self.series if p["step"] != point["step"]] + [point]
        else:
            others = self.series_by_prefix.get(prefix, [])
            self.series_by_prefix[prefix] = [p for p in others if p["step"] != point["step"]] + [point]
        if state.is_world_process_zero:
            payload = {"prefix": self._main_prefix(), "series": self.series,
                       "series_by_prefix": self.series_by_prefix, "failures": self.failures}
            self._save(SERIES_FILE, lambda: write_series(args.output_dir, payload))
            if self.config.write_card and getattr(args, "push_to_hub", False):
                # Checkpoint pushes upload output_dir as it is (no create_model_card): keep its card current.
                self.write_card(args.output_dir)

    def _restore_series(self, state) -> None:
        """Keep the points at or before the (resumed) step; rebuild them from ``log_history`` if none."""
        step = int(state.global_step)
        self.series = [p for p in self.series if int(p["step"]) <= step]
        self.series_by_prefix = {k: [p for p in v if int(p["step"]) <= step] for k, v in self.series_by_prefix.items()}
        self.failures = [f for f in self.failures if int(f["step"]) <= step]
        main = self._main_prefix()
        for prefix in dict.fromkeys([main, *series_prefixes(state.log_history)]):
            if (self.series if prefix == main else self.series_by_prefix.get(prefix)):
                continue
            by_step = {p["step"]: p for p in volume_series(state.log_history, prefix=prefix) if p["step"] <= step}
            points = [by_step[s] for s in sorted(by_step)]
            if prefix == main:
                self.series = points
            elif points:
                self.series_by_prefix[prefix] = points

    def _save(self, what: str, write: Callable[[], Any]) -> Any:
        """Run a file writer and return what it returns; an error (a path that is a file or a directory, disk
        full, permissions) is shown once per run, returns None and never stops training (``strict=True``
        re-raises)."""
        try:
            return write()
        except Exception as err:  # noqa: BLE001 - a file problem must not fail the training run
            if self.config.strict:
                raise
            self._warn_once(f"save:{what}", "hfvolume: could not write %s: %s: %s (training continues; the values "
                            "stay in memory on the callback)", what, type(err).__name__, err)
            return None

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def write_card(self, output_dir: str | os.PathLike[str]) -> None:
        """Write hfvolume's section (series table, plot, ``model-index``) into ``output_dir/README.md``."""
        from hfvolume.integrations.modelcard import card_from_trainer_output

        complete = [p for p in self.series if "log_volume_lower_bound" in p and "ess" in p]
        if complete:
            plot = is_matplotlib_available()
            sections, results = extra_card_content(self, output_dir, complete, plot=plot)
            self._save("the model card section",
                       lambda: card_from_trainer_output(output_dir, complete, plot=plot, extra_sections=sections,
                                                        extra_results=results))


def _failure_values(args: Any, prefix: str) -> dict[str, float]:
    """What a failed measurement logs: the failure flag, and the key ``metric_for_best_model`` names if it is one
    of ours, at its worst value (the Trainer raises KeyError on a missing key, and must never pick it as best)."""
    values = {failed_key(prefix): 1.0}
    name = getattr(args, "metric_for_best_model", None)
    if name:
        wanted = name if name.startswith("eval_") else f"eval_{name}"
        if wanted in metric_keys(prefix) or wanted == sigma_key(prefix):
            values[wanted] = -math.inf if getattr(args, "greater_is_better", False) else math.inf
    return values


def _report(state: Any, result: VolumeResult, prefix: str) -> None:
    """One line per measurement: the lower bound first, then the estimate (± only when the bootstrap spread is
    meaningful, i.e. k̂ < 0.5) and Pareto k̂'s verdict."""
    std = result.reported_log_volume_std
    spread = f" ± {std / LN2:.3g}" if math.isfinite(std) else ""
    logger.info("hfvolume: step %d (%s): information content ≤ %.6g bits with %.0f%% confidence (log volume ≥ "
                "%.6g nats); estimate %.6g%s bits. %s", state.global_step, prefix,
                result.information_content_upper_bound_bits, 100 * result.confidence, result.log_volume_lower_bound,
                result.information_content_bits, spread, result.pareto.message)


def _starting_sigma(model: torch.nn.Module, theta: torch.Tensor) -> float:
    """σ of ``sigma="initial-rms"``: the RMS of the measured ``[D]`` weights ``theta`` when training starts.

    All zero (a zero-initialised probe head, LoRA's B matrices trained alone) would give σ = 0, a prior with no
    volume; σ is then the RMS of all the model's weights, trainable and frozen, with a warning. Raises
    ``ValueError`` with the fix when no usable σ can be taken from the weights.
    """
    sigma = rms(theta)
    if math.isfinite(sigma) and sigma > 0:
        return sigma
    fix = "pass sigma=<number> (e.g. the standard deviation such weights are initialised with)"
    if not math.isfinite(sigma):
        raise ValueError(f"the measured weights are not finite when training starts (RMS = {sigma}); {fix}")
    fallback = rms(ParameterView.from_model(model, "all").flatten(model))
    if not (math.isfinite(fallback) and fallback > 0):
        raise ValueError(f"all the model's weights are zero or not finite when training starts (RMS = {fallback}), "
                         f"so no prior σ can be taken from them; {fix}")
    logger.warning("hfvolume: all %d measured (trainable) weights are zero when training starts (e.g. a "
                   "zero-initialised head): a Gaussian prior with σ = 0 has no volume, so σ is the RMS of all the "
                   "model's weights, trainable and frozen: %.4g; %s", theta.numel(), fallback, fix)
    return fallback


def _sigma_from_history(log_history: list[Mapping[str, Any]]) -> float | None:
    suffix = f"_{SIGMA_NAME}"
    for entry in reversed(log_history):
        for key, value in entry.items():
            if key.endswith(suffix):
                return float(value)
    return None


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


__all__ = [
    "DIAGNOSTIC_KEYS",
    "FAILED_KEY",
    "INITIAL_PARAMETERS_FILE",
    "LOGGED_KEYS",
    "LocalVolumeCallback",
    "LocalVolumeConfig",
    "SERIES_FILE",
    "SIGMA_KEY",
    "volume_series",
]
