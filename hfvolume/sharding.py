"""How the functional core splits directions across processes, without knowing what a process group is.

The estimator only needs three things from a multi-process run: which rank it is, how many ranks there are, and
an all-gather. :class:`Sharding` is that contract; :mod:`hfvolume.distributed` builds one from torch.distributed
/ Accelerate, and tests can build one from threads. Because direction i depends only on (seed, i) and its start
radius, any split of the indices gives the same per-direction results as one process.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Sharding(Protocol):
    """A group of ``world_size`` cooperating processes, seen from the one with index ``rank``.

    ``gather(values)`` is a collective: every rank calls it (in the same order) with a float64 array whose first
    axis may have a different length on each rank and whose other axes agree; every rank receives the
    concatenation of all ranks' arrays along axis 0, in rank order, with values bit for bit as sent.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def gather(self, values: np.ndarray) -> np.ndarray: ...


class SingleProcess:
    """The trivial group of one process (what ``sharding=None`` means)."""

    rank = 0
    world_size = 1

    def gather(self, values: np.ndarray) -> np.ndarray:
        return np.array(values, copy=True)


def check_sharding(sharding: Any) -> Sharding:
    """Validate a user-supplied sharding object: integer rank in [0, world_size) and a callable ``gather``."""
    if not isinstance(sharding, Sharding):
        raise TypeError(
            f"sharding must have rank, world_size and gather(values), got {type(sharding).__name__}"
        )
    rank, world = sharding.rank, sharding.world_size
    for name, value in (("rank", rank), ("world_size", world)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"sharding.{name} must be an int, got {type(value).__name__}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"sharding has rank={rank}, world_size={world}: need 0 ≤ rank < world_size")
    return sharding


def shard_indices(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous block of ``indices`` owned by ``rank``: sizes differ by at most one, lower ranks larger.

    Blocks concatenated in rank order give back ``indices``, so a gather restores the original order.
    """
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return indices[start:stop]


def gather_checked(sharding: Sharding, values: np.ndarray, *, columns: int) -> np.ndarray:
    """``sharding.gather`` with a check of the result's shape, so a broken implementation fails loudly here."""
    values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1, columns)
    out = np.asarray(sharding.gather(values))
    if out.ndim != 2 or out.shape[1] != columns or out.dtype != np.float64:
        raise RuntimeError(
            f"sharding.gather returned an array of shape {out.shape} and dtype {out.dtype}; expected "
            f"[n, {columns}] float64 (the rank-ordered concatenation of every rank's rows)"
        )
    return out


def check_ranks_agree(sharding: Sharding, values: Mapping[str, float], *, hint: str) -> None:
    """Collective: raise ValueError on every rank if any rank's ``values`` differ from rank 0's.

    Ranks that were given different inputs would otherwise combine directions measured on different problems
    into one wrong answer (or block in a later collective). Values are compared exactly (NaN equals NaN).
    """
    names = list(values)
    mine = np.array([[float(values[n]) for n in names]], dtype=np.float64)
    table = gather_checked(sharding, mine, columns=len(names))
    problems = []
    for col, name in enumerate(names):
        ref = table[0, col]
        same = (table[:, col] == ref) | (np.isnan(table[:, col]) & np.isnan(ref))
        bad = np.flatnonzero(~same).tolist()
        if bad:
            seen = ", ".join(f"rank {r}: {float(table[r, col])!r}" for r in [0, *bad])
            problems.append(f"{name} ({seen})")
    if problems:
        raise ValueError(f"ranks disagree on {'; '.join(problems)}. Cause: {hint}")


__all__ = ["Sharding", "SingleProcess", "check_ranks_agree", "check_sharding", "gather_checked", "shard_indices"]
