"""All process-topology logic: which process group we are in, the all-gather the estimator uses, rank 0 duties.

The core (:mod:`hfvolume.volume.estimator`) only sees a :class:`hfvolume.volume.collectives.Sharding`. This module
builds one from an initialised Accelerate state (``accelerate.PartialState``) or a bare ``torch.distributed``
process group, and guards against a launcher trap: ``accelerate launch --multi_gpu`` on a CPU host (or a script
that never initialises a group) starts N *independent* single-process runs, each of which would silently compute
the whole estimate and write the same files N times. :func:`check_launch` turns that into an error.

Gathering uses ``torch.distributed.all_gather_object``: arrays are pickled, so float64 values arrive bit for bit.
(``accelerate.utils.gather_object`` is the same call behind a ``PartialState``, which a bare torch.distributed
group does not have.) With NCCL, the current CUDA device must be set (Accelerate does this; with a bare process
group, call ``torch.cuda.set_device(local_rank)``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from hfvolume.volume.collectives import Sharding

# Environment variables in which launchers announce the total number of processes (torchrun / accelerate, MPI).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

_FIX = (
    "Initialise one process group before estimating: build accelerate.Accelerator(), "
    "transformers.TrainingArguments, or hfvolume.parallel.distributed.init_process_state() "
    "(PartialState(cpu=True) on a "
    "host without accelerators; a bare PartialState() ignores ACCELERATE_USE_CPU), or call "
    "torch.distributed.init_process_group(). On a CPU host launch with `ACCELERATE_USE_CPU=true accelerate launch "
    "--multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N ...`. To run the whole estimate "
    "independently in every process on purpose, pass distributed=False."
)


class LaunchError(RuntimeError):
    """The launcher started several processes that do not form one process group."""


@dataclass(frozen=True)
class ProcessGroupInfo:
    """The process group this process belongs to.

    rank: this process's index in ``[0, world_size)``; world_size: number of processes; source: "accelerate" or
    "torch.distributed" (which initialised state was found); backend: e.g. "gloo", "nccl" (None if unknown).
    """

    rank: int
    world_size: int
    source: str
    backend: str | None


def env_world_size() -> int | None:
    """The process count the launcher announced in the environment, or None when no launcher set one."""
    for name in WORLD_SIZE_VARIABLES:
        raw = os.environ.get(name)
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None
    return None


def _accelerate_state() -> ProcessGroupInfo | None:
    # Only look if accelerate was already imported: if it was not, no PartialState can exist, and importing it
    # here would cost a second on every call.
    if "accelerate" not in sys.modules:
        return None
    from accelerate.state import PartialState

    if not PartialState._shared_state:
        return None
    state = PartialState()
    return ProcessGroupInfo(
        rank=int(state.process_index), world_size=int(state.num_processes), source="accelerate",
        backend=state.backend,
    )


def process_group_info() -> ProcessGroupInfo | None:
    """The initialised Accelerate state if any, else an initialised ``torch.distributed`` group, else None."""
    info = _accelerate_state()
    if info is not None:
        return info
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return ProcessGroupInfo(
            rank=dist.get_rank(), world_size=dist.get_world_size(), source="torch.distributed",
            backend=str(dist.get_backend()),
        )
    return None


def check_launch() -> ProcessGroupInfo | None:
    """Refuse to run as one of N independent single-process runs; return the process group (None if there is none).

    Raises :class:`LaunchError` when the launcher announced N > 1 processes (``WORLD_SIZE`` etc.) but this process
    is in no group or in a group of a different size, and when ``LOCAL_RANK`` is set with no process count and
    no group (a launcher whose topology is unknown).
    """
    info = process_group_info()
    announced = env_world_size()
    size = 1 if info is None else info.world_size
    if announced is not None and announced > 1 and size != announced:
        found = "no process group" if info is None else f"a {info.source} group of {size} process(es)"
        raise LaunchError(
            f"the launcher started {announced} processes (WORLD_SIZE={announced}) but this one is in {found}: they "
            f"would run {announced} independent copies of the estimate instead of one {announced}-process run. "
            + _FIX
        )
    if info is None and announced is None and os.environ.get("LOCAL_RANK") not in (None, ""):
        raise LaunchError(
            f"LOCAL_RANK={os.environ['LOCAL_RANK']} is set (a multi-process launcher) but there is no process group "
            "and no WORLD_SIZE. " + _FIX
        )
    return info


class TorchDistributedSharding:
    """:class:`hfvolume.volume.collectives.Sharding` over the default ``torch.distributed`` group (Accelerate's as
    well)."""

    def __init__(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise LaunchError("torch.distributed is not initialised: there is no group to gather over. " + _FIX)
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def is_main(self) -> bool:
        return self._rank == 0

    def gather(self, values: np.ndarray) -> np.ndarray:
        """All-gather ``[n_r, ...]`` float64 arrays; every rank receives their rank-ordered concatenation."""
        mine = np.ascontiguousarray(values, dtype=np.float64)
        parts: list[np.ndarray | None] = [None] * self._world_size
        torch.distributed.all_gather_object(parts, mine)
        shapes = {p.shape[1:] for p in parts if p is not None}
        if len(shapes) != 1 or any(p is None for p in parts):
            per_rank = [None if p is None else p.shape for p in parts]
            raise RuntimeError(f"ranks sent arrays of incompatible shapes to gather: {per_rank} (by rank)")
        return np.concatenate(parts, axis=0)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"TorchDistributedSharding(rank={self._rank}, world_size={self._world_size})"


def resolve_sharding(distributed: bool | None) -> Sharding | None:
    """The sharding for ``estimate_local_volume(distributed=...)``.

    None: auto-detect (after :func:`check_launch`): the group's sharding when it has more than one process, else
    None. False: None, without any check (every process computes the whole estimate on its own). True: the
    group's sharding; raises :class:`LaunchError` if no group is initialised.
    """
    if distributed is False:
        return None
    if distributed is not None and distributed is not True:
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    info = check_launch()
    if info is None:
        if distributed:
            raise LaunchError("distributed=True but no Accelerate state or torch.distributed group is initialised. "
                              + _FIX)
        return None
    if info.world_size == 1:
        return None
    return TorchDistributedSharding()


def init_process_state(*, cpu: bool | None = None) -> ProcessGroupInfo:
    """Initialise Accelerate's ``PartialState`` (joining the launcher's group) and check the launch.

    ``cpu=None`` uses CPU (gloo) processes when ``ACCELERATE_USE_CPU`` is set or no accelerator is available, so
    ``torchrun`` / ``accelerate launch`` on a CPU host form one group instead of independent runs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env

    if cpu is None:
        accelerator = getattr(torch, "accelerator", None)
        has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator
    PartialState(cpu=cpu)
    info = check_launch()
    if info is None:  # cannot happen once PartialState exists; kept explicit for type checkers
        raise LaunchError("PartialState did not initialise")
    return info


def refuse_sharded_parameters(model: torch.nn.Module) -> None:
    """Raise NotImplementedError if ``model`` holds sharded parameters that cannot be measured in place.

    Each rank holds only a slice of such a parameter, so measuring "the model" on one rank would silently measure
    a shard. FSDP2 models (``fully_shard``) are measured by :mod:`hfvolume.parallel.fsdp` and never reach this
    check; what remains refused is FSDP1 (``FullyShardedDataParallel``), DeepSpeed ZeRO-3 partitions (``ds_id``)
    and DTensors outside FSDP2 (tensor parallelism). For those, unshard first (a full state dict loaded into an
    unwrapped copy) and measure that.
    """
    dtensor: type | None = None
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        try:
            from torch.distributed.tensor import DTensor as dtensor
        except ImportError:  # torch < 2.5: DTensor is not public yet, and nothing we measure can hold one
            dtensor = None

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise NotImplementedError(
                "the model is wrapped in FSDP1 (FullyShardedDataParallel): each rank holds flattened shards that "
                "cannot be measured in place. Use FSDP2 (torch.distributed.fsdp.fully_shard; Accelerate's "
                "fsdp_version=2), or measure an unsharded copy."
            )
    for name, p in model.named_parameters():
        kind = ("DTensor outside FSDP2 (tensor parallel)" if dtensor is not None and isinstance(p, dtensor) else
                "DeepSpeed ZeRO-3 partition" if hasattr(p, "ds_id") else None)
        if kind is not None:
            raise NotImplementedError(
                f"parameter {name!r} is a {kind}: only FSDP2 (fully_shard) sharded models are supported. Measure "
                "an unsharded copy (gather a full state dict, load it into the unwrapped model class) instead."
            )


def is_main_process() -> bool:
    """True on rank 0 of the current group, and in a process that belongs to no group."""
    info = process_group_info()
    return info is None or info.rank == 0


# A filter on the "hfvolume" logger rather than ``accelerate.logging.get_logger``: the records come from every layer,
# the functional core included (which imports no Hugging Face library), and Accelerate's adapter raises when no
# PartialState exists (a bare torch.distributed group is supported here).
class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


_MAIN_ONLY = _MainProcessOnly()


@contextlib.contextmanager
def main_process_logging(logger: logging.Logger | str = "hfvolume") -> Iterator[None]:
    """Within the block, records of ``logger`` are emitted on rank 0 only (the others would repeat them)."""
    log = logging.getLogger(logger) if isinstance(logger, str) else logger
    added = _MAIN_ONLY not in log.filters
    if added:
        log.addFilter(_MAIN_ONLY)
    try:
        yield
    finally:
        if added:
            log.removeFilter(_MAIN_ONLY)


__all__ = [
    "LaunchError",
    "ProcessGroupInfo",
    "TorchDistributedSharding",
    "check_launch",
    "env_world_size",
    "init_process_state",
    "is_main_process",
    "main_process_logging",
    "process_group_info",
    "refuse_sharded_parameters",
    "resolve_sharding",
]
