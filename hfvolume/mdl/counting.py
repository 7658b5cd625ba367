"""Closed forms of the additive (Dirichlet) counting learner: the known answers of prequential coding.

A counting learner predicts label c with ``p(c) = (n_c + α) / (n + C α)`` from the counts ``n_c`` of the labels it
has seen (Laplace's rule for α = 1, Krichevsky–Trofimov for α = ½). Coded one item at a time its online code has
the closed form (the Dirichlet-multinomial marginal likelihood; Grünwald, *The MDL Principle*, 2007, §9.4)

    L = −log2 [ Γ(Cα) / Γ(N + Cα) · Π_c Γ(n_c + α) / Γ(α) ]   bits,

which depends on the counts only (the code is exchangeable). For α = 1 it is
``log2[(N + C − 1)! / ((C − 1)! Π_c n_c!)]``. Coded in groups (all items of a group by the counts before the
group: one optimizer step, or one block of a block-wise prequential code) the code depends on the grouping and is
summed exactly by :func:`counting_code_bits`. These are the oracles the online callback and the block-wise code are
tested against; pure float64, no torch.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from hfvolume.mdl.codelength import LN2


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    return float(alpha)


def _labels_array(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int ≥ 2, got {num_classes!r}")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-d sequence of ints, got shape {y.shape} dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def dirichlet_code_bits(counts: Sequence[int], *, alpha: float) -> float:
    """Online code, in bits, of any sequence with label counts ``counts`` ``[C]`` under the additive rule α,
    coded one item at a time (closed form above; ``math.lgamma`` in float64)."""
    a = _check_alpha(alpha)
    n = [int(c) for c in counts]
    if len(n) < 2 or any(c < 0 for c in n):
        raise ValueError(f"counts must be ≥ 2 non-negative ints, got {list(counts)!r}")
    total, classes = sum(n), len(n)
    log_p = math.lgamma(classes * a) - math.lgamma(total + classes * a)
    log_p += sum(math.lgamma(c + a) - math.lgamma(a) for c in n)
    return -log_p / LN2


def laplace_code_bits(counts: Sequence[int]) -> float:
    """:func:`dirichlet_code_bits` with α = 1: ``log2[(N + C − 1)! / ((C − 1)! Π_c n_c!)]`` bits."""
    return dirichlet_code_bits(counts, alpha=1.0)


def kt_code_bits(counts: Sequence[int]) -> float:
    """:func:`dirichlet_code_bits` with α = ½ (Krichevsky–Trofimov)."""
    return dirichlet_code_bits(counts, alpha=0.5)


def counting_code_bits(
    labels: Sequence[int] | np.ndarray,
    *,
    num_classes: int,
    alpha: float,
    boundaries: Sequence[int] | None = None,
) -> float:
    """Code length, in bits, of ``labels`` ``[N]`` in order under the additive rule α, summed term by term.

    ``boundaries=None`` codes one item at a time (equals :func:`dirichlet_code_bits` of the counts). Otherwise
    ``boundaries`` ``[S]`` (increasing, ending at N) cut the sequence into groups ``(t_{i−1}, t_i]``, and every item
    of a group is coded by the counts of the items before the group. The first group is then coded uniformly
    (``t_1 log2 C``, the counts are all zero), so block boundaries give the block-wise prequential code of a
    counting learner trained to completion on each prefix, and the steps of an optimizer give its online code.
    """
    a = _check_alpha(alpha)
    y = _labels_array(labels, num_classes)
    if boundaries is None:
        cuts = np.arange(1, y.size + 1)
    else:
        cuts = np.asarray(list(boundaries), dtype=np.int64)
        if cuts.size == 0 or np.any(np.diff(cuts) <= 0) or cuts[0] < 1 or cuts[-1] != y.size:
            raise ValueError(f"boundaries must increase from ≥ 1 to N={y.size}, got {list(boundaries)!r}")
    counts = np.zeros(num_classes, dtype=np.int64)
    nats = 0.0
    start = 0
    for stop in cuts.tolist():
        group = np.bincount(y[start:stop], minlength=num_classes)
        log_p = np.log(counts + a) - math.log(counts.sum() + num_classes * a)
        nats -= float(np.dot(group, log_p))
        counts += group
        start = stop
    return nats / LN2


__all__ = ["counting_code_bits", "dirichlet_code_bits", "kt_code_bits", "laplace_code_bits"]
