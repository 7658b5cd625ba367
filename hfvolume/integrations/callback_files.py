"""Files the Trainer callback keeps in ``output_dir``, and the series read back from them or from ``log_history``.

* ``hfvolume/series.json``: every measured point (pushed to the Hub with the model: it is the card's data).
* ``_hfvolume/initial_parameters.safetensors``: the weights when training started, the prior mean of
  ``prior_mean="initial"``, kept for resuming. ``Trainer.push_to_hub`` and checkpoint pushes upload ``output_dir``
  with ``ignore_patterns=["_*", "checkpoint-*"]``, so a folder whose name starts with ``_`` stays local: a copy of
  the initial (e.g. pretrained base) weights does not belong in the fine-tune's repository. Runs written before
  this layout kept it in ``hfvolume/``; resuming still reads it from there.

The writers here raise on any I/O error; the callback decides whether that may stop training (it may not).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from hfvolume.integrations.callback_config import DEFAULT_PREFIX, metric_keys

SERIES_FILE = "hfvolume/series.json"
INITIAL_PARAMETERS_FILE = "_hfvolume/initial_parameters.safetensors"
LEGACY_INITIAL_PARAMETERS_FILE = "hfvolume/initial_parameters.safetensors"


def write_series(output_dir: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``output_dir/hfvolume/series.json`` atomically (a temporary file, then a rename, so a
    reader never sees a half-written file). Returns the path; raises ``OSError`` (and ``TypeError`` for values
    JSON cannot hold) without catching them."""
    path = Path(output_dir) / SERIES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(payload), indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_initial_parameters(output_dir: str | os.PathLike[str], theta: torch.Tensor) -> Path:
    """Save the ``[D]`` initial weights to ``output_dir/_hfvolume/initial_parameters.safetensors``; returns the path."""
    from safetensors.torch import save_file

    path = Path(output_dir) / INITIAL_PARAMETERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"theta": theta.contiguous()}, str(path))
    return path


def load_initial_parameters(output_dir: str | os.PathLike[str]) -> torch.Tensor:
    """The ``[D]`` initial weights saved when the run started (current layout first, then the legacy one)."""
    from safetensors.torch import load_file

    for name in (INITIAL_PARAMETERS_FILE, LEGACY_INITIAL_PARAMETERS_FILE):
        path = Path(output_dir) / name
        if path.is_file():
            return load_file(str(path))["theta"]
    raise ValueError(f"prior_mean='initial' on a resumed run needs {Path(output_dir) / INITIAL_PARAMETERS_FILE} "
                     "(written when training started)")


def series_prefixes(log_history: Iterable[Mapping[str, Any]]) -> list[str]:
    """Metric prefixes under which ``log_history`` holds measurements (``"eval"``, ``"eval_a"``, ``"test"``…),
    in order of first appearance."""
    suffix = "_log_volume"  # f"{prefix}_log_volume" is in every successful measurement's entry
    seen: dict[str, None] = {}
    for entry in log_history:
        for key in entry:
            if key.endswith(suffix) and len(key) > len(suffix):
                seen.setdefault(key[: -len(suffix)], None)
    return list(seen)


def volume_series(source: str | os.PathLike[str] | Iterable[Mapping[str, Any]], *,
                  prefix: str | None = None) -> list[dict[str, Any]]:
    """The series a run recorded: from its ``output_dir`` (``hfvolume/series.json``) or a ``log_history`` list.

    ``prefix`` selects the metric prefix (``"eval"``, ``"eval_<name>"`` for a named eval set, ``"test"``…): for a
    file, None means the callback's main series (:attr:`LocalVolumeCallback.series`); for a ``log_history``, None
    means ``"eval"``. Points rebuilt from ``log_history`` carry the logged values only (no settings).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / SERIES_FILE
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            return list(data)
        if prefix is None or prefix == data.get("prefix", DEFAULT_PREFIX):
            return list(data["series"])
        return list(data.get("series_by_prefix", {}).get(prefix, []))
    keys = metric_keys(prefix or DEFAULT_PREFIX)
    first = next(iter(keys))  # f"{prefix}_log_volume": present in every successful measurement's entry
    points = []
    for entry in source:
        if first in entry:
            point = {attr: entry[key] for key, attr in keys.items() if key in entry}
            point["step"] = int(entry["step"])
            points.append(point)
    return points


__all__ = [
    "INITIAL_PARAMETERS_FILE",
    "SERIES_FILE",
    "load_initial_parameters",
    "save_initial_parameters",
    "series_prefixes",
    "volume_series",
    "write_series",
]
