"""Settings of :class:`~hfvolume.integrations.callback.LocalVolumeCallback` and the names of the values it logs.

Logged names follow the Trainer's ``{metric_key_prefix}_{name}`` convention: ``Trainer.evaluate`` prefixes every
metric of an evaluation with ``metric_key_prefix`` (``"eval"`` by default, ``"eval_a"`` for the eval set named
``"a"`` of a dict ``eval_dataset``, ``"test"`` for ``evaluate(metric_key_prefix="test")``), and the callback's
values sit in that evaluation's log under the same prefix. The module-level ``*_KEY`` constants spell the names
under the default ``"eval"`` prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hfvolume.volume.checks import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_optional_int,
    check_positive,
)

#: Values a successful measurement logs that are always finite, and the :class:`VolumeResult` attribute each one
#: carries (nats unless the name says bits; ``eval_log_volume_lower_bound`` is the 95% Markov lower bound of the
#: log volume, Scherlis & Belrose 2025, §3; ``eval_volume_seconds`` is wall time).
LOGGED_KEYS: dict[str, str] = {
    "eval_log_volume": "log_volume",
    "eval_information_content_bits": "information_content_bits",
    "eval_log_volume_lower_bound": "log_volume_lower_bound",
    "eval_volume_ess": "ess",
    "eval_volume_norm_term": "norm_term",
    "eval_volume_seconds": "wall_time_s",
}
#: Reliability values, logged at every measurement but NaN when not meaningful (a key that comes and goes breaks
#: trackers' charts): the bootstrap standard deviation of the log volume only while Pareto k̂ < 0.5 (finite
#: variance of the importance weights; Vehtari et al., JMLR 2024, §3), and k̂ itself (NaN below 21 directions).
DIAGNOSTIC_KEYS: dict[str, str] = {
    "eval_volume_log_std": "reported_log_volume_std",
    "eval_volume_pareto_k": "pareto_k",
}
SIGMA_KEY = "eval_volume_prior_sigma"  # logged so a resumed run recovers the fixed σ from log_history alone
FAILED_KEY = "eval_volume_failed"  # 1.0 when the measurement failed, 0.0 when it succeeded

DEFAULT_PREFIX = "eval"
SIGMA_NAME = SIGMA_KEY[len(DEFAULT_PREFIX) + 1:]
FAILED_NAME = FAILED_KEY[len(DEFAULT_PREFIX) + 1:]

MIN_BUDGET_DIRECTIONS = 8  # max_seconds never cuts a measurement below this many directions
AUTO_MIXTURE = 0.25  # preconditioner="auto": defensive-mixture floor with the Adam proposal

PRECONDITIONERS = ("auto", "none", "adam", "adam-m", "fisher", "ggn")
SIGMA_RULES = ("initial-rms", "rms")


def metric_keys(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """``{f"{prefix}_{name}": VolumeResult attribute}``: every value a successful measurement logs under
    ``prefix`` (the σ and the failure flag aside)."""
    out = {}
    for key, attr in (*LOGGED_KEYS.items(), *DIAGNOSTIC_KEYS.items()):
        out[f"{prefix}_{key[len(DEFAULT_PREFIX) + 1:]}"] = attr
    return out


def sigma_key(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}_{SIGMA_NAME}"


def failed_key(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}_{FAILED_NAME}"


@dataclass(frozen=True)
class LocalVolumeConfig:
    """Settings of :class:`LocalVolumeCallback`; also an ``HfArgumentParser`` dataclass (no name clashes with
    ``TrainingArguments``, so ``HfArgumentParser((TrainingArguments, LocalVolumeConfig))`` works).

    Units: ``cutoff`` in the behaviour's units (nats for KL); ``rtol`` relative to the cutoff; ``max_seconds`` in
    seconds. Invalid values raise ``ValueError`` / ``TypeError`` naming the field.
    """

    n_directions: int = field(default=32, metadata={"help": "directions per measurement (the accuracy knob)"})
    cutoff: float = field(default=1e-2, metadata={"help": "behaviour cutoff ε (nats for kl)"})
    behavior: str = field(default="kl", metadata={"help": "kl, loss or output"})
    prior: str = field(default="gaussian", metadata={"help": "gaussian or uniform"})
    sigma: str = field(
        default="initial-rms",
        metadata={"help": "Gaussian σ: initial-rms (RMS of the measured weights when training starts, fixed for "
                          "the run; the RMS of all the model's weights if the measured ones are all zero), rms (at "
                          "each measurement), or a number"},
    )
    prior_mean: str = field(
        default="origin",
        metadata={"help": "origin, or initial (the weights when training starts: measures what training added)"},
    )
    preconditioner: str = field(
        default="auto",
        metadata={"help": "auto (Adam's second moment with a 25%% isotropic mixture when the optimizer has Adam "
                          "state, else isotropic), none, adam, adam-m, fisher, or ggn (the prior tilted by the "
                          "behaviour's curvature: the best estimates, at a set-up cost of up to 64 directions per "
                          "measurement)"},
    )
    mixture: float = field(default=0.0, metadata={"help": "defensive-mixture fraction of isotropic directions"})
    direction_seed: int = field(default=0, metadata={"help": "seed of the directions (the same at every step)"})
    rtol: float = field(default=1e-2, metadata={"help": "radius tolerance relative to the cutoff"})
    volume_max_batches: Optional[int] = field(
        default=4, metadata={"help": "evaluation batches used for the measurement (none: all of them)"}
    )
    volume_eval_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "when eval_dataset is a dict: measure only on this named set, logged under the plain "
                          "eval_ prefix (default: measure every named set, logged as eval_<name>_...)"},
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
    init_health_report: bool = field(
        default=False,
        metadata={"help": "at train begin, propagate a Gaussian input through the model's MLP parts (cumulant "
                          "propagation, no sampling): expected-output spread and dead/linear unit fractions, logged "
                          "once and written to the card"},
    )
    strict: bool = field(default=False, metadata={"help": "re-raise errors of the measurement (default: warn)"})

    def __post_init__(self) -> None:
        check_int("n_directions", self.n_directions)
        check_positive("cutoff", self.cutoff)
        check_fraction("rtol", self.rtol, open_low=True, open_high=True)
        check_choice("behavior", self.behavior, ("kl", "loss", "output"))
        check_choice("prior", self.prior, ("gaussian", "uniform"))
        if self.sigma not in SIGMA_RULES:
            try:
                value = float(self.sigma)
            except (TypeError, ValueError):
                raise ValueError(
                    f"sigma must be 'initial-rms', 'rms' or a positive number, got {self.sigma!r}") from None
            check_positive("sigma", value)
        check_choice("prior_mean", self.prior_mean, ("origin", "initial"))
        if self.prior == "uniform" and (self.sigma != "initial-rms" or self.prior_mean != "origin"):
            raise ValueError("sigma and prior_mean apply to the Gaussian prior only")
        check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        check_fraction("mixture", self.mixture)
        check_int("direction_seed", self.direction_seed, minimum=0)
        check_optional_int("volume_max_batches", self.volume_max_batches)
        if self.volume_eval_dataset is not None and not isinstance(self.volume_eval_dataset, str):
            raise TypeError(f"volume_eval_dataset must be a str or None, got {type(self.volume_eval_dataset).__name__}")
        check_optional_int("measure_every_n_steps", self.measure_every_n_steps)
        if self.max_seconds is not None:
            check_positive("max_seconds", self.max_seconds)
        for name in ("measure_on_evaluate", "measure_on_train_end", "write_card", "init_health_report", "strict"):
            check_bool(name, getattr(self, name))


__all__ = [
    "AUTO_MIXTURE",
    "DIAGNOSTIC_KEYS",
    "FAILED_KEY",
    "LOGGED_KEYS",
    "LocalVolumeConfig",
    "MIN_BUDGET_DIRECTIONS",
    "SIGMA_KEY",
    "failed_key",
    "metric_keys",
    "sigma_key",
]
