"""How the Trainer callback talks: the "hfvolume" logger follows the Trainer's log level, and repeats are shown once.

hfvolume logs through the standard ``logging`` logger named "hfvolume" and attaches no handler of its own: records
reach whatever handlers the application configured (or Python's last-resort handler on stderr). The Trainer sets
the level of the transformers loggers from ``TrainingArguments.log_level`` (main process) and
``log_level_replica`` (other processes); for the duration of each callback event the "hfvolume" logger gets the
same level, so ``log_level="critical"`` silences hfvolume's warnings too. ``"passive"`` (the default of
``log_level``) sets nothing, as in the Trainer: the "hfvolume" logger then keeps whatever level the application
gave it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

LOGGER_NAME = "hfvolume"
_PASSIVE = -1  # transformers' trainer_log_levels["passive"]


def process_log_level(args: Any) -> int | None:
    """The logging level ``args`` (``TrainingArguments``) asks for in this process, or None for "passive".

    The main process uses ``log_level``, the others ``log_level_replica``; which one this process is comes from
    ``args.should_log``, as in ``TrainingArguments.get_process_log_level`` (which resolves "passive" to the
    transformers verbosity instead: here "passive" leaves hfvolume's level alone).
    """
    from transformers.training_args import trainer_log_levels

    if args is None:
        return None
    try:
        main = bool(args.should_log)
    except Exception:  # noqa: BLE001 - an args object without a process state: treat it as the main process
        main = True
    name = getattr(args, "log_level" if main else "log_level_replica", "passive")
    level = trainer_log_levels.get(name, _PASSIVE) if isinstance(name, str) else int(name)
    return None if level == _PASSIVE else int(level)


@contextlib.contextmanager
def trainer_log_level(args: Any) -> Iterator[None]:
    """Run the block with the "hfvolume" logger at the level ``args`` asks for in this process; restore it after."""
    level = process_log_level(args)
    log = logging.getLogger(LOGGER_NAME)
    if level is None:
        yield
        return
    previous = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)


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
def once_per_run(seen: set[str]) -> Iterator[None]:
    """The same diagnostic (e.g. "ESS < 2") at every evaluation of a long run is noise: show each kind once.

    ``seen`` holds the templates already shown; the caller keeps it for the run and clears it for a new one."""
    log = logging.getLogger(LOGGER_NAME)
    flt = _SeenFilter(seen)
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


__all__ = ["LOGGER_NAME", "once_per_run", "process_log_level", "trainer_log_level"]
