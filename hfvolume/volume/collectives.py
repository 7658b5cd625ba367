"""How the functional core splits directions across processes, without knowing what a process group is.

The estimator only needs three things from a multi-process run: which rank it is, how many ranks there are, and
an all-gather. :class:`Sharding` is that contract; :mod:`hfvolume.parallel.distributed` builds one from
torch.distributed / Accelerate, and tests can build one from threads. Because direction i depends only on
(seed, i) and its start radius, any split of the indices gives the same per-direction results as one process.

A model whose *parameters* are sharded (FSDP2) needs the other split: every rank works on every direction but
holds only some coordinates of θ. :class:`CoordinateShard` is that contract (which global coordinates are local,
and a float64 all-reduce); :mod:`hfvolume.parallel.fsdp` builds one from an FSDP2 model.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from hfvolume.volume.checks import check_int


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
    world = check_int("sharding.world_size", sharding.world_size, minimum=1)
    rank = check_int("sharding.rank", sharding.rank, minimum=0)
    if rank >= world:
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


@runtime_checkable
class CoordinateShard(Protocol):
    """This process's part of the *coordinates* of θ ∈ R^D, for a model whose parameters are sharded (FSDP2).

    Every rank works on every direction but holds only its local coordinates: the global coordinate ranges
    ``local_ranges`` (sorted, disjoint, half-open, in ``[0, n_params)``), stored one after the other in a local
    ``[D_local]`` vector. Every global sum the core needs (norms, prior coefficients, log weights) is a local
    partial sum followed by ``all_reduce_sum``: a collective that every rank calls in the same order with a float64
    array of the same shape, and that returns to every rank the same float64 array (the elementwise sum over
    ranks, bit for bit identical on all of them, so that their radius searches take the same decisions).
    """

    @property
    def n_params(self) -> int: ...

    @property
    def local_ranges(self) -> tuple[tuple[int, int], ...]: ...

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray: ...


def local_size(coordinates: CoordinateShard) -> int:
    """D_local: the number of coordinates ``coordinates`` holds."""
    return sum(stop - start for start, stop in coordinates.local_ranges)


def check_coordinate_shard(coordinates: Any, n_local: int) -> CoordinateShard:
    """Validate a user-supplied coordinate shard against the local vector length ``n_local``."""
    if not isinstance(coordinates, CoordinateShard):
        raise TypeError(
            f"coordinates must have n_params, local_ranges and all_reduce_sum(values), got {type(coordinates).__name__}"
        )
    n = check_int("coordinates.n_params", coordinates.n_params, wrong_type=ValueError)
    previous = 0
    for start, stop in coordinates.local_ranges:
        if not previous <= start <= stop <= n:
            raise ValueError(f"coordinates.local_ranges must be sorted, disjoint ranges in [0, {n}); got "
                             f"{list(coordinates.local_ranges)}")
        previous = stop
    if local_size(coordinates) != n_local:
        raise ValueError(f"coordinates.local_ranges cover {local_size(coordinates)} coordinates but the local "
                         f"vector has {n_local}")
    return coordinates


def global_sums(coordinates: CoordinateShard | None, values: np.ndarray) -> np.ndarray:
    """Local partial sums → global sums (float64); the values themselves when the coordinates are not sharded."""
    values = np.asarray(values, dtype=np.float64)
    if coordinates is None:
        return values
    out = np.asarray(coordinates.all_reduce_sum(np.ascontiguousarray(values)), dtype=np.float64)
    if out.shape != values.shape:
        raise RuntimeError(f"coordinates.all_reduce_sum returned shape {out.shape} for input shape {values.shape}")
    return out


def check_coordinates_agree(coordinates: CoordinateShard, values: Mapping[str, float], *, hint: str) -> None:
    """Collective: raise ValueError on every rank if the ranks holding ``coordinates`` disagree on any of ``values``.

    Only sums are available, so each float64 is split into four 16-bit integers q; with W = Σ 1, S1 = Σ q and
    S2 = Σ q² over the ranks (all exact in float64), the ranks agree on q exactly when W·S2 = S1² (equality in
    Cauchy–Schwarz). Values are compared bit for bit (NaN equals NaN of the same payload).
    """
    names = list(values)
    bits = np.array([float(values[n]) for n in names], dtype=np.float64).view(np.uint64)
    pieces = np.stack([(bits >> np.uint64(16 * j)) & np.uint64(0xFFFF) for j in range(4)], axis=1).astype(np.float64)
    totals = global_sums(coordinates, np.concatenate([[1.0], pieces.reshape(-1), (pieces * pieces).reshape(-1)]))
    world, s1, s2 = totals[0], totals[1 : 1 + pieces.size], totals[1 + pieces.size :]
    differ = (world * s2 != s1 * s1).reshape(len(names), 4).any(axis=1)
    if differ.any():
        bad = [n for n, d in zip(names, differ) if d]
        raise ValueError(f"ranks disagree on {', '.join(bad)} (this rank: "
                         f"{', '.join(f'{n}={values[n]!r}' for n in bad)}). Cause: {hint}")


__all__ = [
    "CoordinateShard", "Sharding", "SingleProcess", "check_coordinate_shard", "check_coordinates_agree",
    "check_ranks_agree", "check_sharding", "gather_checked", "global_sums", "local_size", "shard_indices",
]
