"""Reference codes for the information transfer ``L_IT = L_ref − L_online`` of a training run.

* ``"uniform"``: ``L_ref = items · log2 C``, a learner that learned nothing.
* ``"initial"``: the code length of the training items under the weights before training, θ_0 (one eval-mode pass
  over the training set when training starts); for a partial first pass it is scaled to the items coded,
  ``L_ref = L_θ0(all) · items / items(all)``.
* ``"learner"``: another run's online code at the same number of coded items (read from its
  ``hfvolume/code_length.json``, linear between its logged points): what this run's starting point or recipe
  transfers, after the transfer-learning reading of Zhang et al., arXiv 2009.07624.
* ``"none"``: no reference, no L_IT.

Host-side float64; no torch, no Hugging Face.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hfvolume.mdl.codelength import LN2, uniform_bits

CODE_REFERENCES = ("uniform", "initial", "learner", "none")
SERIES_FILE = "hfvolume/code_length.json"


@dataclass(frozen=True)
class ReferenceCode:
    """A reference code as a function of the number of coded items.

    kind: one of :data:`CODE_REFERENCES`. For "initial": ``nats`` and ``items`` of the whole training set under
    θ_0. For "learner": ``curve_items`` / ``curve_bits`` ``[P]``, increasing, starting at (0, 0).
    """

    kind: str
    nats: float = 0.0
    items: float = 0.0
    curve_items: tuple[float, ...] = ()
    curve_bits: tuple[float, ...] = ()

    def bits(self, items: float, num_classes: int | None) -> float | None:
        """``L_ref`` in bits for the first ``items`` coded items; None when undefined (no reference, C unknown,
        beyond the other run's coded items)."""
        if self.kind == "uniform":
            return None if num_classes is None else uniform_bits(items, num_classes)
        if self.kind == "initial":
            return None if self.items <= 0 else self.nats / LN2 * (items / self.items)
        if self.kind == "learner":
            if not self.curve_items or items > self.curve_items[-1]:
                return None
            return float(np.interp(items, self.curve_items, self.curve_bits))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nats": self.nats, "items": self.items, "curve_items": list(self.curve_items),
                "curve_bits": list(self.curve_bits)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ReferenceCode":
        return cls(str(data["kind"]), float(data.get("nats", 0.0)), float(data.get("items", 0.0)),
                   tuple(float(v) for v in data.get("curve_items", ())),
                   tuple(float(v) for v in data.get("curve_bits", ())))


def learner_reference(run: str | os.PathLike[str]) -> ReferenceCode:
    """The "learner" reference from another run: its ``output_dir`` or its ``hfvolume/code_length.json``."""
    path = Path(run)
    if path.is_dir():
        path = path / SERIES_FILE
    if not path.is_file():
        raise ValueError(f"code_reference_run={str(run)!r}: no {SERIES_FILE} there (a run with OnlineCodeCallback)")
    data = json.loads(path.read_text(encoding="utf-8"))
    points = sorted((float(p["items"]), float(p["online_bits"])) for p in data.get("series", ())
                    if p.get("items") is not None and p.get("online_bits") is not None)
    if not points:
        raise ValueError(f"{path} holds no online-code points")
    items, bits = [0.0], [0.0]
    for n, b in points:
        if n > items[-1] and math.isfinite(b):
            items.append(n)
            bits.append(b)
    return ReferenceCode("learner", curve_items=tuple(items), curve_bits=tuple(bits))


__all__ = ["CODE_REFERENCES", "ReferenceCode", "SERIES_FILE", "learner_reference"]
