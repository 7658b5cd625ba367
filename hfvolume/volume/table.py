"""The per-direction record of one estimate, and the rows it travels in between processes.

Direction i of a run leaves seven numbers: its log estimate log f(w_i) + log weight_i (nats), the radius ρ_i where
the search stopped, Δ there, the log importance weight, how the search ended (a :class:`DirectionFlag`), and how
many behaviour values (all, and non-finite ones) it used. :class:`DirectionTable` holds them as ``[n_directions]``
arrays. When the directions are split across processes, each rank fills its block and the blocks are all-gathered
as float64 rows whose columns are named once, by :data:`WIRE_COLUMNS`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from hfvolume.volume.radius import RadiusSearchResult
from hfvolume.volume.results import DirectionFlag

_FLAGS = tuple(DirectionFlag)  # a flag travels between ranks as its index in this tuple
_FLAG_CODES = {flag: float(code) for code, flag in enumerate(_FLAGS)}


@dataclass(frozen=True, eq=False)
class DirectionTable:
    """``[n_directions]`` arrays, one entry per direction of the seed; field names match :class:`VolumeResult`.

    The arrays are filled in place as the phases of a run finish; the table itself is never rebound.
    """

    log_estimates: np.ndarray  # float64: log f(w_i) + log weight_i, nats
    radii: np.ndarray  # float64: where the search stopped (an evaluated point)
    deltas: np.ndarray  # float64: Δ at that radius, in the behaviour's units
    log_weights: np.ndarray  # float64: log importance weight −log q(w_i), nats
    flags: np.ndarray  # object: DirectionFlag
    evaluations: np.ndarray  # int64: behaviour values used by the search
    nonfinite: np.ndarray  # int64: NaN/inf behaviour values met

    @classmethod
    def empty(cls, n_directions: int) -> "DirectionTable":
        """A table for ``n_directions`` directions, every entry still to be written."""
        return cls(
            log_estimates=np.empty(n_directions),
            radii=np.empty(n_directions),
            deltas=np.empty(n_directions),
            log_weights=np.empty(n_directions),
            flags=np.empty(n_directions, dtype=object),
            evaluations=np.empty(n_directions, dtype=np.int64),
            nonfinite=np.empty(n_directions, dtype=np.int64),
        )

    def record_search(self, indices: np.ndarray, found: RadiusSearchResult, log_weights: np.ndarray) -> None:
        """Store the outcome of the radius search of directions ``indices`` (``[k]``) and their log weights."""
        self.radii[indices], self.deltas[indices] = found.radius, found.delta
        self.log_weights[indices], self.flags[indices] = log_weights, found.flag
        self.evaluations[indices], self.nonfinite[indices] = found.evaluations, found.nonfinite

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """``[k, len(WIRE_COLUMNS)]`` float64 rows of directions ``indices``, columns in :data:`WIRE_COLUMNS` order.

        Every value is exact in float64: the integers are far below 2^53 and a flag is sent as its index.
        """
        if not indices.size:
            return np.empty((0, len(WIRE_COLUMNS)))
        return np.column_stack([indices, *(self._encoded(name, indices) for name in WIRE_COLUMNS[1:])])

    def update_from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Write gathered ``rows`` (from :meth:`rows` on any rank) into the table; returns their ``[k]`` indices."""
        column = {name: rows[:, k] for k, name in enumerate(WIRE_COLUMNS)}
        indices = column["index"].astype(np.int64)
        for name in ("log_estimates", "radii", "deltas", "log_weights"):
            getattr(self, name)[indices] = column[name]
        self.flags[indices] = [_FLAGS[int(code)] for code in column["flags"]]
        for name in ("evaluations", "nonfinite"):
            getattr(self, name)[indices] = column[name].astype(np.int64)
        return indices

    def _encoded(self, name: str, indices: np.ndarray) -> Any:
        if name == "flags":
            return [_FLAG_CODES[DirectionFlag(f)] for f in self.flags[indices]]
        return getattr(self, name)[indices]

    def result_fields(self) -> dict[str, tuple]:
        """The per-direction fields of a :class:`VolumeResult`: tuples of Python floats, ints and flag strings."""
        return {
            "log_estimates": tuple(float(x) for x in self.log_estimates),
            "radii": tuple(float(x) for x in self.radii),
            "deltas": tuple(float(x) for x in self.deltas),
            "log_weights": tuple(float(x) for x in self.log_weights),
            "flags": tuple(DirectionFlag(f).value for f in self.flags),
            "evaluations": tuple(int(x) for x in self.evaluations),
            "nonfinite": tuple(int(x) for x in self.nonfinite),
        }


#: Columns of the rows exchanged between ranks: the direction's index, then every field of the table.
WIRE_COLUMNS: tuple[str, ...] = ("index", *(f.name for f in fields(DirectionTable)))

__all__ = ["WIRE_COLUMNS", "DirectionTable"]
