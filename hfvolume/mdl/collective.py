"""Summing a few float64 accumulators over the ranks of a ``torch.distributed`` group, identically on every rank.

Every rank all-gathers the ``[k]`` vectors and adds them in rank order on the host, so every rank holds the same
float64 numbers bit for bit (a ring all-reduce may round differently on different ranks). One small collective per
call; callers invoke it at log time only, never per step.
"""
from __future__ import annotations

import numpy as np
import torch


def sum_across_ranks(values: torch.Tensor, *, world: int) -> np.ndarray:
    """``[k]`` float64 sums over the ``world`` ranks of each rank's ``values`` ``[k]`` (returned as a host array).

    ``world`` is the number of processes of the run that logs (``TrainingArguments.world_size``), not of the
    process group: a run may be a single-process job inside a larger launch. ``world == 1`` returns ``values``.
    The tensor stays on its device for the collective (NCCL needs CUDA tensors, gloo takes CPU ones).
    """
    vec = values.detach().to(torch.float64).reshape(-1)
    if world == 1:
        return vec.cpu().numpy().copy()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        raise RuntimeError(f"a {world}-process run without a torch.distributed group of {world} processes")
    parts = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(parts, vec.contiguous())
    rows = [p.cpu().numpy() for p in parts]
    total = np.zeros_like(rows[0])
    for row in rows:  # rank order: the same rounding on every rank
        total = total + row
    return total


__all__ = ["sum_across_ranks"]
