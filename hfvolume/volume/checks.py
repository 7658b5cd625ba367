"""Validation of user-supplied arguments: one place for the checks every layer repeats.

Each helper returns the value converted to a plain Python type, or raises ``TypeError`` (wrong kind of value) or
``ValueError`` (right kind, bad value) with a message that names the argument and the value it got. ``bool`` is
never accepted as a number, although Python treats it as one: ``n_directions=True`` is a mistake, not 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, TypeVar

import numpy as np

T = TypeVar("T")

_INT_TYPES = (int, np.integer)
_REAL_TYPES = (int, float, np.integer, np.floating)


def _is_int(value: Any) -> bool:
    return isinstance(value, _INT_TYPES) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, _REAL_TYPES) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, *, minimum: int = 1, wrong_type: type[Exception] = TypeError) -> int:
    """``value`` as an int ≥ ``minimum``. ``wrong_type``: the exception for a non-int (APIs that have always
    raised ``ValueError`` for every bad value keep doing so)."""
    if not _is_int(value):
        raise wrong_type(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


def check_optional_int(name: str, value: Any, *, minimum: int = 1,
                       wrong_type: type[Exception] = TypeError) -> int | None:
    """``None``, or ``value`` as an int ≥ ``minimum``."""
    return None if value is None else check_int(name, value, minimum=minimum, wrong_type=wrong_type)


def check_number(name: str, value: Any) -> float:
    """``value`` as a finite float."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a finite float > 0."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` as a finite float ≥ 0."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and ≥ 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a float in [0, 1]; ``open_low`` / ``open_high`` exclude 0 / 1."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices`` (compared with ``==``)."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {tuple(choices)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (not merely truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def config_with_overrides(cls: type[T], config: Any, overrides: dict[str, Any], *, owner: str) -> T:
    """``config`` (an instance of the frozen dataclass ``cls``, or None for its defaults) with keyword
    ``overrides`` applied; ``owner`` names the caller in the errors (a wrong config type, unknown fields)."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be of type {cls.__name__}, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {owner} arguments {unknown}; known: {sorted(known)}")
    base = config if config is not None else cls()
    return dataclasses.replace(base, **overrides) if overrides else base  # type: ignore[type-var]


__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_nonnegative",
    "check_number",
    "check_optional_int",
    "check_positive",
    "config_with_overrides",
]
