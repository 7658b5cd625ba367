"""Where the coordinates and the directions of one estimate live: one process, directions split across ranks, or
an FSDP2 model whose parameters are sharded (every rank works on every direction, on its own coordinates)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from hfvolume.models.params import ParameterView
from hfvolume.parallel.distributed import main_process_logging, refuse_sharded_parameters, resolve_sharding
from hfvolume.parallel.fsdp import FSDPCoordinates, ShardedParameterView, fsdp_modules, reshard
from hfvolume.volume.collectives import Sharding


@dataclass(frozen=True)
class Layout:
    """The measured coordinates and how the work is split.

    view: the measured parameters (for an FSDP2 model: this rank's shards of them).
    sharding: the process group the directions are split across, or None (one process, or FSDP2).
    coordinates: this rank's coordinates of θ for an FSDP2 model, else None.
    """

    view: ParameterView
    sharding: Sharding | None
    coordinates: FSDPCoordinates | None

    @property
    def fsdp(self) -> bool:
        return self.coordinates is not None

    @property
    def multi_process(self) -> bool:
        return self.sharding is not None or self.fsdp

    def quiet_ranks(self) -> ContextManager[Any]:
        """Every rank computes the same result, so its warnings are rank 0's: only rank 0 logs them."""
        return main_process_logging() if self.multi_process else contextlib.nullcontext()

    def local(self, value: Any) -> Any:
        """A global ``[D]`` tensor option (σ, prior mean, scales) cut to this rank's coordinates under FSDP2."""
        c = self.coordinates
        if c is not None and isinstance(value, torch.Tensor) and value.numel() == c.n_params > self.view.n_params:
            return c.take(value)
        return value


def resolve_layout(model: nn.Module, params: Any, distributed: bool | None) -> Layout:
    """FSDP2 models are measured on their own shards whatever ``distributed`` says (the model's process group is
    the one used, and the directions are not split); other models split the directions across the Accelerate /
    torch.distributed group when there is one (``distributed=None``/True) and refuse sharded parameters that are
    not FSDP2's."""
    if fsdp_modules(model):
        reshard(model)
        global_view = ParameterView.from_model(model, params)
        coordinates = FSDPCoordinates.from_model(model, global_view)
        return Layout(ShardedParameterView.from_global(global_view, coordinates), None, coordinates)
    refuse_sharded_parameters(model)
    return Layout(ParameterView.from_model(model, params), resolve_sharding(distributed), None)


__all__ = ["Layout", "resolve_layout"]
