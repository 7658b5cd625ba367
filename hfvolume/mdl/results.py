"""The result of a block-wise prequential code: per-block code lengths, totals, reference, L_IT, compression.

Plain frozen data, JSON round-trippable (``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json``). Bits
throughout. No torch, no Hugging Face.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

REFERENCES = ("uniform", "initial", "learner", "none")


def _json_float(x: float | None) -> Any:
    # JSON has no inf/nan: encoded as strings and decoded by float() in from_dict.
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass(frozen=True)
class PrequentialResult:
    """A block-wise prequential code ``L_preq`` (Blier & Ollivier, arXiv 1802.07044 §2.4; Voita & Titov,
    arXiv 2003.12298 §2.2) and the information transfer ``L_IT = L_ref − L_preq`` (after arXiv 2009.07624).

    boundaries: ``[S]`` item counts ``t_1 < … < t_S = N`` in transmission order.
    block_items: ``[S]`` scored items of each block ``(t_{i−1}, t_i]`` (labels for a classifier, scored tokens for
        a language model).
    first_block_bits: the first block's uniform code, ``block_items[0] · log2 C``.
    block_bits: ``[S − 1]`` code of block i + 1 under the model trained from scratch on items ``1..t_i``.
    total_bits: ``first_block_bits + Σ block_bits`` (= L_preq).
    uniform_bits: ``Σ block_items · log2 C``.
    reference: "uniform", "initial" (code under the weights ``model_init`` returns), "learner" (another
        prequential result) or "none"; reference_bits its code length (None for "none").
    information_transfer_bits: ``reference_bits − total_bits`` (None for "none").
    compression: ``uniform_bits / total_bits``.
    selection_bits: ``Σ_i log2(#checkpoints compared by early stopping on block i)``, the cost of telling the
        receiver which checkpoint codes each block; reported apart, not included in ``total_bits``.
    seconds_per_block: ``[S − 1]`` wall time of training and coding each block (the first entry of
        ``block_bits`` ↔ the first entry here).
    num_classes: C of the uniform code (2 per label for multi-label heads).
    settings: how the code was computed (schedule, early stopping, mixture, order seed, world size, ...).
    """

    boundaries: tuple[int, ...]
    block_items: tuple[float, ...]
    first_block_bits: float
    block_bits: tuple[float, ...]
    total_bits: float
    uniform_bits: float
    reference: str
    reference_bits: float | None
    information_transfer_bits: float | None
    compression: float
    selection_bits: float
    seconds_per_block: tuple[float, ...]
    num_classes: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        s = len(self.boundaries)
        if len(self.block_items) != s or len(self.block_bits) != s - 1 or len(self.seconds_per_block) != s - 1:
            raise ValueError(
                f"inconsistent lengths: {s} boundaries, {len(self.block_items)} block_items, "
                f"{len(self.block_bits)} block_bits, {len(self.seconds_per_block)} seconds_per_block"
            )

    @property
    def n_items(self) -> int:
        """N, the number of dataset items (examples) coded."""
        return int(self.boundaries[-1])

    @property
    def bits_per_item(self) -> float:
        """``total_bits / Σ block_items``: the per-item form, comparable across datasets of different N."""
        return self.total_bits / sum(self.block_items)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = [_json_float(v) if isinstance(v, float) else v for v in value]
            elif isinstance(value, float):
                value = _json_float(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrequentialResult":
        known = {f.name for f in fields(cls)}
        missing = sorted(known - {"settings"} - set(data))
        if missing:
            raise ValueError(f"not a PrequentialResult: missing {missing}")
        kw = {k: data[k] for k in known if k in data}
        kw["boundaries"] = tuple(int(v) for v in kw["boundaries"])
        for name in ("block_items", "block_bits", "seconds_per_block"):
            kw[name] = tuple(float(v) for v in kw[name])
        for name in ("first_block_bits", "total_bits", "uniform_bits", "compression", "selection_bits"):
            kw[name] = float(kw[name])
        for name in ("reference_bits", "information_transfer_bits"):
            kw[name] = None if kw[name] is None else float(kw[name])
        kw["num_classes"] = int(kw["num_classes"])
        return cls(**kw)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "PrequentialResult":
        return cls.from_dict(json.loads(text))


__all__ = ["PrequentialResult", "REFERENCES"]
