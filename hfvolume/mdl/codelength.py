"""Code-length arithmetic of prequential (online) coding: uniform codes, information transfer, block boundaries.

Pure float64 arithmetic on host numbers; no torch, no Hugging Face. Definitions (Dawid 1984; Blier & Ollivier,
arXiv 1802.07044 §2.4; Voita & Titov, arXiv 2003.12298 §2.2; information transfer after Zhang, Li, Dou & Wu,
arXiv 2009.07624):

* uniform code of N items with C labels: ``L_unif = N log2 C`` bits;
* online code: ``L_online = Σ_t −log2 p_{θ_{t−1}}(y_t | x_t)``, each item coded by the weights trained on the items
  before it only;
* block-wise prequential code on boundaries ``0 = t_0 < t_1 < … < t_S = N``:
  ``L_preq = t_1 log2 C + Σ_{i=1..S−1} Σ_{t_i < t ≤ t_{i+1}} −log2 p_{θ_i}(y_t | x_t)``, θ_i trained from scratch on
  items ``1..t_i``;
* information transfer ``L_IT = L_ref − L_code`` (the bits a learner saves on items it has not trained on yet);
* compression ``L_unif / L_code`` (Voita & Titov's ratio).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence, Union

LN2 = math.log(2.0)

#: Voita & Titov's (arXiv 2003.12298 §2.2) block boundaries as exact fractions of N: 0.1, 0.2, 0.4, 0.8, 1.6, 3.2,
#: 6.25, 12.5, 25, 50 and 100 %.
VOITA_FRACTIONS: tuple[Fraction, ...] = tuple(
    Fraction(k, 1000) for k in (1, 2, 4, 8, 16, 32)
) + (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))

BoundarySpec = Union[str, Sequence[int], Sequence[float]]


def _check_count(name: str, value: object, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def _check_bits(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of bits, got {type(value).__name__} ({value!r})")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def nats_to_bits(nats: float) -> float:
    """``nats / ln 2``: a code length in nats converted to bits."""
    return float(nats) / LN2


def uniform_bits(items: float, num_classes: int) -> float:
    """``items · log2 C`` bits: the code of ``items`` labels that all C classes predict equally (the "knows
    nothing" reference, and the first block of a prequential code). ``items`` may be fractional (a mean)."""
    _check_count("num_classes", num_classes, minimum=2)
    n = _check_bits("items", items)
    if n < 0:
        raise ValueError(f"items must be ≥ 0, got {items!r}")
    return n * math.log2(num_classes)


def information_transfer(reference_bits: float, code_bits: float) -> float:
    """``L_IT = L_ref − L_code`` bits (arXiv 2009.07624): what a learner saves, on items it had not trained on,
    over a reference code that learned nothing from them. ≈ 0 (slightly negative) for labels independent of x."""
    return _check_bits("reference_bits", reference_bits) - _check_bits("code_bits", code_bits)


def compression(uniform: float, code_bits: float) -> float:
    """``L_unif / L_code`` (Voita & Titov's compression): 1 for a learner no better than uniform.

    Raises ``ValueError`` when the code length is not positive (no items coded yet): the ratio is undefined there.
    """
    u, c = _check_bits("uniform", uniform), _check_bits("code_bits", code_bits)
    if c <= 0.0:
        raise ValueError(f"compression needs a positive code length, got code_bits={code_bits!r}")
    return u / c


@dataclass(frozen=True)
class CodeLength:
    """A code length on the host: ``nats`` (float64 sum of −ln p over coded items) and ``items`` (how many).

    ``a + b`` merges two disjoint sets of items (ranks, blocks). ``bits`` and ``bits_per_item`` convert.
    """

    nats: float = 0.0
    items: float = 0.0

    def __post_init__(self) -> None:
        for name in ("nats", "items"):
            _check_bits(name, getattr(self, name))
        if self.items < 0:
            raise ValueError(f"items must be ≥ 0, got {self.items!r}")

    def __add__(self, other: "CodeLength") -> "CodeLength":
        if not isinstance(other, CodeLength):
            return NotImplemented
        return CodeLength(self.nats + other.nats, self.items + other.items)

    @property
    def bits(self) -> float:
        return nats_to_bits(self.nats)

    @property
    def bits_per_item(self) -> float:
        """Mean bits per coded item; ``ValueError`` when no item was coded."""
        if self.items <= 0:
            raise ValueError("bits_per_item of a code length with no items")
        return self.bits / self.items


def _round_half_up(x: Fraction) -> int:
    return int(math.floor(x + Fraction(1, 2)))


def _strictly_increasing(points: Sequence[int], n: int) -> tuple[int, ...]:
    """Drop zeros and repeats (small N rounds several fractions to the same count), keep the order."""
    out: list[int] = []
    for t in points:
        if 0 < t <= n and (not out or t > out[-1]):
            out.append(t)
    if not out or out[-1] != n:
        out.append(n)
    if len(out) < 2:
        raise ValueError(f"N={n} items give fewer than 2 blocks: a prequential code needs a first block and at "
                         "least one block coded by a trained model")
    return tuple(out)


def voita_boundaries(n: int) -> tuple[int, ...]:
    """Voita & Titov's schedule ``t_i = round(f_i N)`` for ``f_i`` in :data:`VOITA_FRACTIONS` (arXiv 2003.12298
    §2.2): 11 boundaries, 10 trained models, for N = 10^5 ``(100, 200, …, 50000, 100000)``. For small N, fractions
    that round to 0 or to the previous count are dropped. Returns ``[S]`` increasing item counts ending at N."""
    _check_count("n", n, minimum=2)
    return _strictly_increasing([_round_half_up(f * n) for f in VOITA_FRACTIONS], n)


def doubling_boundaries(n: int, *, first: int) -> tuple[int, ...]:
    """``first, 2·first, 4·first, …, N``: each prefix ``first·2^k`` with ``first·2^(k+1) ≤ N``, then N, so every
    coded block is at least as large as the prefix that codes it (Blier & Ollivier, arXiv 1802.07044 §2.4)."""
    _check_count("n", n, minimum=2)
    _check_count("first", first, minimum=1)
    if first >= n:
        raise ValueError(f"first={first} must be < n={n}")
    points = [first]
    while 2 * points[-1] * 2 <= n:
        points.append(2 * points[-1])
    return _strictly_increasing(points, n)


def resolve_boundaries(spec: BoundarySpec, n: int) -> tuple[int, ...]:
    """Boundaries ``[S]`` (increasing item counts ending at N) from a specification.

    ``"voita"``: :func:`voita_boundaries`; ``"doubling"``: :func:`doubling_boundaries` with
    ``first = max(1, N // 64)``; a sequence of ints: item counts in ``[1, N]`` (N appended when missing); a sequence
    of floats: fractions of N in ``(0, 1]``, rounded half up (1 appended when missing).
    """
    _check_count("n", n, minimum=2)
    if isinstance(spec, str):
        if spec == "voita":
            return voita_boundaries(n)
        if spec == "doubling":
            return doubling_boundaries(n, first=max(1, n // 64))
        raise ValueError(f"boundaries must be 'voita', 'doubling' or a sequence, got {spec!r}")
    values = list(spec)
    if not values:
        raise ValueError("boundaries must not be empty")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        counts = [int(v) for v in values]
        bad = [v for v in counts if not 1 <= v <= n]
        if bad:
            raise ValueError(f"boundary counts must be in [1, {n}], got {bad}")
    elif all(isinstance(v, float) for v in values):
        bad_f = [v for v in values if not (math.isfinite(v) and 0.0 < v <= 1.0)]
        if bad_f:
            raise ValueError(f"boundary fractions must be in (0, 1], got {bad_f}")
        counts = [_round_half_up(Fraction(v) * n) for v in values]
    else:
        raise TypeError(f"boundaries must be all ints (item counts) or all floats (fractions), got {values!r}")
    if any(b <= a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {values!r}")
    return _strictly_increasing(counts, n)


__all__ = [
    "BoundarySpec",
    "CodeLength",
    "LN2",
    "VOITA_FRACTIONS",
    "compression",
    "doubling_boundaries",
    "information_transfer",
    "nats_to_bits",
    "resolve_boundaries",
    "uniform_bits",
    "voita_boundaries",
]
