"""Analytic FLOP counts, the cost axis on which cumulant propagation is compared with Monte Carlo.

Conventions (those of the paper's comparison, arXiv 2605.05179 §5): a dense product [m, k] × [k, n] costs 2mkn
("matmul"); elementwise work costs one FLOP per output element and per elementary operation ("elementwise"); a
Wick coefficient costs ``CLOSED_FORM_COST`` per unit when it has a closed form and 2 × (nodes) + ``NODE_COST`` ×
nodes per unit by Gauss–Hermite. No symmetric-tensor discounts are applied: the counts are the operations this
implementation executes. A Monte Carlo sample through the same network costs ``forward_flops`` (matmul, bias and
activation per unit).
"""
from __future__ import annotations

from dataclasses import dataclass

CLOSED_FORM_COST = 20
NODE_COST = 10
ACTIVATION_COST = 1


@dataclass(frozen=True)
class FlopCount:
    """matmul: FLOPs in dense products; elementwise: everything else; both plain ints."""

    matmul: int = 0
    elementwise: int = 0

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.matmul + other.matmul, self.elementwise + other.elementwise)

    def to_dict(self) -> dict[str, int]:
        return {"matmul": self.matmul, "elementwise": self.elementwise, "total": self.total}


class FlopTally:
    """Mutable accumulator used while propagating; frozen into a :class:`FlopCount` at the end."""

    def __init__(self) -> None:
        self.matmul = 0
        self.elementwise = 0

    def mm(self, m: int, k: int, n: int) -> None:
        """A product [m, k] × [k, n] (n = 1 for a matrix–vector product)."""
        self.matmul += 2 * m * k * n

    def ew(self, count: int) -> None:
        self.elementwise += int(count)

    def wick(self, n_units: int, n_coefficients: int, *, smooth: bool, nodes: int) -> None:
        per = (2 * nodes + NODE_COST * nodes) if smooth else CLOSED_FORM_COST
        self.elementwise += n_units * n_coefficients * per

    def freeze(self) -> FlopCount:
        return FlopCount(self.matmul, self.elementwise)


def forward_flops(shapes: list[tuple[int, int]], *, has_bias: list[bool] | None = None) -> int:
    """FLOPs of one Monte Carlo sample: Σ_l (2 n_l n_{l−1} + n_l [bias] + n_l [activation]); shapes [(out, in)]."""
    total = 0
    for i, (out, inp) in enumerate(shapes):
        total += 2 * out * inp + ACTIVATION_COST * out
        if has_bias is None or has_bias[i]:
            total += out
    return total


__all__ = ["FlopCount", "FlopTally", "forward_flops"]
