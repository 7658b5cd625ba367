"""The series a model card shows: one :class:`VolumePoint` per measured step, normalised from whatever the user has.

A point holds the headline figures of one estimate (Scherlis & Belrose 2025, arXiv:2501.18812: the log local
volume in nats, its Markov lower bound, the information content ``−log_volume / ln 2`` in bits) and the honest
uncertainty attached to it: the Pareto k̂ of the directions' importance weights (Vehtari et al., "Pareto Smoothed
Importance Sampling", JMLR 2024, §3) with its verdict, the ± (spread between seeds) only where it means
something (k̂ < 1/2), and for a single estimate the running log-mean-exp over the first n directions.

Series written by older versions of hfvolume lack k̂ and the reported standard deviation: they read as NaN (and
the verdict as ``"not_recorded"``), so the card withholds the ± rather than quote an unchecked one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from hfvolume.volume.results import VolumeResult

LN2 = math.log(2.0)

#: The verdict of a point whose k̂ was never computed (a series written by an older hfvolume).
NOT_RECORDED = "not_recorded"

#: Bumped whenever the rendered section or plot changes for the same series, so that cards and plots written by an
#: older version are redrawn (the digest recorded in both includes it).
RENDER_FORMAT = "2"

# Keys a point's summary carries, with the default used when an input (a hand-made dict, an older series) lacks
# one; None marks a required key.
_SUMMARY_DEFAULTS: dict[str, Any] = {
    "log_volume": None,
    "information_content_bits": None,  # derived from log_volume when missing
    "log_volume_lower_bound": None,
    "log_volume_std": math.nan,
    "pareto_k": math.nan,
    "reliability": NOT_RECORDED,
    "reported_log_volume_std": math.nan,  # older series: withheld, since k̂ was never checked
    "ess": None,
    "norm_term": 0.0,
    "n_params": 0,
    "n_directions": 0,
    "n_saturated": 0,
    "n_unbounded": 0,
    "n_failed": 0,
    "forward_passes": 0,
    "wall_time_s": math.nan,
}
_INT_KEYS = frozenset({"n_params", "n_directions", "n_saturated", "n_unbounded", "n_failed", "forward_passes"})
_STR_KEYS = frozenset({"reliability"})


@dataclass(frozen=True)
class VolumePoint:
    """One estimate in a series: the global step, the headline figures, the settings and the running estimate.

    ``summary`` holds the keys of ``_SUMMARY_DEFAULTS`` plus ``confidence``, as plain Python numbers (``reliability``
    is a string); ``settings`` is JSON-safe; ``running_log_volume`` is ``[n_directions]`` log-mean-exp over the first
    n directions, nats, or empty when unknown. Build points with :func:`normalize_series` rather than by hand.
    """

    step: int
    summary: Mapping[str, Any]
    settings: Mapping[str, Any] = field(default_factory=dict)
    running_log_volume: tuple[float, ...] = ()

    @property
    def bits(self) -> float:
        """Information content ``−log_volume / ln 2``, bits."""
        return float(self.summary["information_content_bits"])

    @property
    def upper_bound_bits(self) -> float:
        """Information content not exceeded with probability ``confidence`` (the Markov bound, in bits)."""
        return -float(self.summary["log_volume_lower_bound"]) / LN2

    @property
    def std_bits(self) -> float:
        """The bootstrap standard deviation, bits, whether or not it means anything: quote
        :attr:`reported_std_bits`."""
        return float(self.summary["log_volume_std"]) / LN2

    @property
    def reported_std_bits(self) -> float:
        """The ± to quote, bits (``VolumeResult.reported_log_volume_std`` / ln 2): an upper bound on the spread of
        the estimate between seeds when k̂ < 1/2 (finite variance of the weights), else NaN."""
        return float(self.summary["reported_log_volume_std"]) / LN2

    @property
    def pareto_k(self) -> float:
        return float(self.summary["pareto_k"])

    @property
    def reliability(self) -> str:
        """``"good"``, ``"unreliable_sample_size"``, ``"unreliable"``, ``"too_few_samples"`` or ``"not_recorded"``."""
        return str(self.summary["reliability"])

    @property
    def is_lower_bound(self) -> bool:
        return int(self.summary["n_unbounded"]) > 0

    @property
    def dominated_by_one_sample(self) -> bool:
        return float(self.summary["ess"]) < 2.0

    def flags(self) -> list[str]:
        """Short caveat labels for tables: ``unbounded``, ``ESS<2``, ``failed``."""
        out = []
        if self.is_lower_bound:
            out.append(f"{int(self.summary['n_unbounded'])} unbounded")
        if self.dominated_by_one_sample:
            out.append("ESS<2")
        if int(self.summary["n_failed"]) > 0:
            out.append(f"{int(self.summary['n_failed'])} failed")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"step": self.step, "summary": dict(self.summary), "settings": plain(self.settings)}
        if self.running_log_volume:
            out["running_log_volume"] = list(self.running_log_volume)
        return out


SeriesLike = Union[
    VolumeResult,
    VolumePoint,
    Mapping[str, Any],
    Sequence[Union[VolumeResult, VolumePoint, Mapping[str, Any], "tuple[int, VolumeResult]"]],
    str,
    "os.PathLike[str]",
]


def normalize_series(series: SeriesLike) -> list[VolumePoint]:
    """Turn any accepted input into a list of :class:`VolumePoint` sorted by step.

    Accepted: a :class:`VolumeResult`; a :class:`VolumePoint`; a dict (``{"step": int, **result.summary(),
    "settings": ...}``, a ``VolumePoint.to_dict()``, or a ``VolumeResult.to_dict()`` with an optional ``"step"``);
    a list of any of these or of ``(step, VolumeResult)`` pairs; or the path of a JSON file holding such a list (or a
    dict with a ``"series"`` list, or a single result). A point without a step gets its position in the list. When
    two points share a step, the later one wins (a re-evaluated step replaces the old estimate). Points of older
    series without ``pareto_k`` / ``reported_log_volume_std`` get NaN for both.
    """
    if isinstance(series, (str, os.PathLike)):
        path = Path(series)
        if not path.is_file():
            raise FileNotFoundError(f"series file not found: {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping) and "series" in data:
            data = data["series"]
        return normalize_series(data)
    if isinstance(series, (VolumeResult, VolumePoint, Mapping)):
        items: list[Any] = [series]
    elif isinstance(series, Sequence) and not isinstance(series, (bytes, bytearray)):
        items = list(series)
    else:
        raise TypeError(f"expected a VolumeResult, a list of them, a dict or a JSON path; got {type(series).__name__}")
    if not items:
        raise ValueError("the series is empty: nothing to put in the model card")
    by_step: dict[int, VolumePoint] = {}
    for index, item in enumerate(items):
        point = _to_point(item, default_step=index)
        by_step[point.step] = point
    return [by_step[s] for s in sorted(by_step)]


def _to_point(item: Any, *, default_step: int) -> VolumePoint:
    if isinstance(item, VolumePoint):
        settings = plain(item.settings)
        return VolumePoint(int(item.step), _canonical_summary(dict(item.summary), settings), settings,
                           _floats(item.running_log_volume))
    if isinstance(item, VolumeResult):
        return _point_from_result(item, _step_from_settings(item.settings, default_step))
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], VolumeResult):
        return _point_from_result(item[1], _as_step(item[0]))
    if isinstance(item, Mapping):
        data = dict(item)
        step = _as_step(data.pop("step", data.pop("global_step", default_step)))
        running = _floats(data.pop("running_log_volume", None) or ())
        if isinstance(data.get("summary"), Mapping):  # VolumePoint.to_dict()
            settings = plain(data.get("settings") or {})
            return VolumePoint(step, _canonical_summary(dict(data["summary"]), settings), settings, running)
        if "log_estimates" in data:  # VolumeResult.to_dict()
            return _point_from_result(VolumeResult.from_dict(data), step)
        settings = plain(data.pop("settings", None) or {})
        return VolumePoint(step, _canonical_summary(data, settings), settings, running)
    raise TypeError(
        f"series item {default_step}: expected a VolumeResult, a (step, VolumeResult) pair or a dict, "
        f"got {type(item).__name__}"
    )


def _floats(values: Any) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"running_log_volume must be a list of numbers, got {values!r}") from None


def _as_step(value: Any) -> int:
    try:
        step = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"step must be an integer, got {value!r}") from None
    if step != value and not isinstance(value, str):
        raise ValueError(f"step must be an integer, got {value!r}")
    return step


def _step_from_settings(settings: Mapping[str, Any], default: int) -> int:
    for key in ("global_step", "step"):
        if isinstance(settings.get(key), int):
            return int(settings[key])
    return default


def _point_from_result(result: VolumeResult, step: int) -> VolumePoint:
    settings = plain(result.settings)
    summary = dict(result.summary())
    summary["confidence"] = result.confidence
    return VolumePoint(step, _canonical_summary(summary, settings), settings, tuple(result.running_log_volume))


def _canonical_summary(data: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The known summary keys as plain numbers; derives what a hand-made or older dict may leave out."""
    out: dict[str, Any] = {}
    for key, default in _SUMMARY_DEFAULTS.items():
        value = data.get(key, default)
        if value is None and key == "information_content_bits" and data.get("log_volume") is not None:
            value = -float(data["log_volume"]) / LN2
        if value is None:
            raise ValueError(f"series point is missing {key!r} (have: {sorted(data)})")
        out[key] = int(value) if key in _INT_KEYS else str(value) if key in _STR_KEYS else float(value)
    if not out["n_params"] and isinstance(settings.get("n_params"), int):
        out["n_params"] = int(settings["n_params"])
    if not out["n_directions"] and isinstance(settings.get("n_directions"), int):
        out["n_directions"] = int(settings["n_directions"])
    confidence = data.get("confidence")
    if confidence is None and isinstance(settings.get("delta"), (int, float)):
        confidence = 1.0 - float(settings["delta"])
    if confidence is None:
        # The Markov bound is log_volume - log(1/delta): recover delta from the two numbers themselves.
        gap = out["log_volume"] - out["log_volume_lower_bound"]
        confidence = 1.0 - math.exp(-gap) if math.isfinite(gap) and gap > 0 else math.nan
    out["confidence"] = float(confidence)
    return out


def series_hash(series: SeriesLike) -> str:
    """SHA-256 (hex) of the normalised series: steps, headline figures and settings.

    The running estimate is left out: a point read from ``result.summary()`` does not carry it, and the same
    measurement must hash the same whichever form it came in. :func:`render_digest` covers everything drawn.
    """
    points = normalize_series(series)
    payload = [{k: v for k, v in p.to_dict().items() if k != "running_log_volume"} for p in points]
    return _sha256(payload)


def render_digest(points: Sequence[VolumePoint], extra_sections: Sequence[str] = ()) -> str:
    """SHA-256 (hex) of everything the section and the plot are drawn from, and of :data:`RENDER_FORMAT`.

    The card records it and the PNG stores it, so an unchanged series is neither re-committed nor redrawn.
    Extra sub-sections (other measures of the run) count only when there are some, so cards without them keep
    their digest.
    """
    payload: dict[str, Any] = {"format": RENDER_FORMAT, "series": [p.to_dict() for p in points]}
    if extra_sections:
        payload["extra_sections"] = list(extra_sections)
    return _sha256(payload)


def _sha256(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plain(obj: Any) -> Any:
    """A JSON/YAML-safe deep copy: dicts with str keys, lists, Python scalars (numpy scalars unwrapped)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return plain(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist"):
        return plain(obj.tolist())
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), (str, int, float)):  # Enum
        return obj.value
    return str(obj)


__all__ = [
    "LN2",
    "NOT_RECORDED",
    "RENDER_FORMAT",
    "SeriesLike",
    "VolumePoint",
    "normalize_series",
    "plain",
    "render_digest",
    "series_hash",
]
