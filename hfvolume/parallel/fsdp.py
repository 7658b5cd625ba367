"""Behaviour of an FSDP2-sharded model: every rank perturbs its own shard of the same global direction.

With ``torch.distributed.fsdp.fully_shard`` (FSDP2; Accelerate's ``fsdp_version=2``) each measured parameter is a
DTensor sharded on dim 0 (``torch.chunk`` rows per rank) and no rank holds the whole model. The estimator then runs
on every rank over *all* directions, each rank holding only its coordinates of θ (``hfvolume.volume.collectives.
CoordinateShard``); this module supplies the two model-facing pieces:

* :class:`FSDPCoordinates`: which global coordinates (in the layout :class:`~hfvolume.models.params.ParameterView` gives
  the unsharded model: tensor order, row-major) this rank holds, and the float64 all-reduce over the mesh.
* :class:`ShardedModelBehavior`: Δ for ``[K, D_local]`` rows. For each row it writes the row into the local shards
  (``p.to_local().copy_``), runs the model's ordinary forward on every rank in lockstep (FSDP2 all-gathers the
  shards inside), reshards, and scores the outputs with :class:`~hfvolume.models.behavior.ModelBehavior`'s own code
  (scored positions, anchor cache, KL / loss / output reductions). Rank 0's values are broadcast, so every rank's
  radius search takes the same decisions. Writing into the model is unavoidable here (``functional_call`` cannot
  stand in for parameters FSDP manages); the local shards are restored bit for bit from a saved copy after every
  call and on any exception.

One row per forward (the per-row loop path of ModelBehavior): vmap cannot run through FSDP's hooks. Not covered:
HSDP / 2-D meshes, tensor parallelism, FSDP models whose measured parameters are not all sharded DTensors, and
preconditioners that need gradients ("fisher").
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.params import ParameterView
from hfvolume.volume.collectives import check_coordinates_agree, local_size


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` (itself included) that ``fully_shard`` (FSDP2) was applied to."""
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no public FSDP2, so no model can be wrapped in it
        return []

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters, so that ``named_parameters()`` yields the sharded DTensors again.

    FSDP2 keeps the root module's parameters unsharded after a forward (it expects a backward); a forward under
    ``no_grad`` would then leave them unsharded, and later edits of the local shards would not be seen.
    """
    for m in fsdp_modules(model):
        m.reshard()  # type: ignore[operator]


@dataclass(frozen=True, eq=False)
class FSDPCoordinates:
    """This rank's coordinates of an FSDP2 model's flat parameter vector
    (:class:`hfvolume.volume.collectives.CoordinateShard`).

    n_params: global D; local_ranges: the global ``[start, stop)`` ranges held here, in view order; row_starts /
    local_rows: per measured tensor, the first global row held here and how many; group / device: the mesh's
    process group and the device collectives run on.
    """

    n_params: int
    local_ranges: tuple[tuple[int, int], ...]
    row_starts: tuple[int, ...]
    local_rows: tuple[int, ...]
    group: Any = field(repr=False)
    device: torch.device = field(default=torch.device("cpu"))

    @classmethod
    def from_model(cls, model: nn.Module, view: ParameterView) -> "FSDPCoordinates":
        """Read the shard layout of the measured parameters ``view`` (built on the resharded FSDP2 model)."""
        from torch.distributed.tensor import DTensor, Shard

        params = dict(model.named_parameters(remove_duplicate=False))
        ranges, starts, rows_held = [], [], []
        mesh = None
        for name, shape, offset, numel in zip(view.names, view.shapes, view.offsets, view.numels):
            p = params[name]
            if not isinstance(p, DTensor):
                raise NotImplementedError(
                    f"parameter {name!r} of this FSDP2 model is a plain tensor, not a sharded DTensor: only models "
                    "whose measured parameters are all sharded by fully_shard are supported (exclude it with params=)"
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or len(shape) == 0:
                raise NotImplementedError(
                    f"parameter {name!r} has placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh: only "
                    "FSDP2 sharding on dim 0 over a 1-D mesh is supported (not HSDP or tensor parallelism)"
                )
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise NotImplementedError(f"parameter {name!r} is sharded over another device mesh than the others")
            world, rank = mesh.size(), mesh.get_local_rank()
            n_rows = shape[0]
            chunk = math.ceil(n_rows / world)  # torch.chunk's rule, which fully_shard uses
            start = min(rank * chunk, n_rows)
            rows = max(0, min(chunk, n_rows - start))
            local = p.to_local()
            if tuple(local.shape) != (rows, *shape[1:]):
                raise NotImplementedError(
                    f"parameter {name!r}: local shard of shape {tuple(local.shape)} on mesh rank {rank}, expected "
                    f"{(rows, *shape[1:])} (torch.chunk rows); unsupported shard layout"
                )
            per_row = numel // n_rows if n_rows else 0
            ranges.append((offset + start * per_row, offset + (start + rows) * per_row))
            starts.append(start)
            rows_held.append(rows)
        assert mesh is not None  # internal: a ParameterView holds at least one tensor
        device = params[view.names[0]].to_local().device
        return cls(n_params=view.n_params, local_ranges=tuple(ranges), row_starts=tuple(starts),
                   local_rows=tuple(rows_held), group=mesh.get_group(), device=device)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise float64 sum over the mesh's ranks, identical on all of them (collective).

        Gathered and summed in rank order here rather than by the backend's all-reduce, whose summation order is
        not specified: the ranks must agree bit for bit, and the result must not depend on the backend.
        """
        arr = np.ascontiguousarray(values, dtype=np.float64)
        mine = torch.from_numpy(arr.reshape(-1).copy()).to(self.device)
        parts = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(self.group))]
        torch.distributed.all_gather(parts, mine, group=self.group)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.cpu().numpy().reshape(arr.shape)

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Mesh rank 0's ``values`` (float64, any shape) on every rank (collective)."""
        t = values.detach().to(device=self.device, dtype=torch.float64).contiguous().clone()
        src = torch.distributed.get_global_rank(self.group, 0)
        torch.distributed.broadcast(t, src=src, group=self.group)
        return t.cpu()

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's ``[D_local]`` entries of a global ``[D]`` vector."""
        if flat.numel() != self.n_params:
            raise ValueError(f"expected a global [D] vector with D = {self.n_params}, got {flat.numel()} entries")
        flat = flat.reshape(-1)
        return torch.cat([flat[a:b] for a, b in self.local_ranges])


@dataclass(frozen=True, eq=False)
class ShardedParameterView(ParameterView):
    """The local part of an FSDP2 model's :class:`ParameterView`: flat vectors are this rank's ``[D_local]``.

    ``shapes`` stay the global shapes (what the model's DTensors report); ``numels``/``offsets``/``n_params`` are
    local; ``local_shapes`` are the local shards' shapes. :meth:`flatten` accepts DTensors (their local shard) or
    full, unsharded tensors (their rows held here), e.g. a base model's state dict as a prior mean.
    """

    local_shapes: tuple[torch.Size, ...] = ()
    coordinates: FSDPCoordinates | None = None
    global_view: ParameterView | None = None

    @classmethod
    def from_global(cls, view: ParameterView, coordinates: FSDPCoordinates) -> "ShardedParameterView":
        local_shapes = tuple(torch.Size((rows, *shape[1:])) for rows, shape in zip(coordinates.local_rows, view.shapes))
        numels = tuple(b - a for a, b in coordinates.local_ranges)
        offsets, acc = [], 0
        for k in numels:
            offsets.append(acc)
            acc += k
        return cls(names=view.names, shapes=view.shapes, numels=numels, offsets=tuple(offsets), dtypes=view.dtypes,
                   dtype=view.dtype, device=coordinates.device, aliases=view.aliases, selection=view.selection,
                   _model_ref=view._model_ref, local_shapes=local_shapes, coordinates=coordinates,
                   global_view=view)

    @property
    def n_params(self) -> int:
        """D_local (the global D is ``coordinates.n_params``)."""
        return sum(self.numels)

    @functools.cached_property
    def local_layout(self) -> ParameterView:
        """A plain view with the local shapes, to reuse ParameterView's checks and conversions on the local shards
        (built once: :meth:`unflatten` runs for every evaluated row)."""
        return ParameterView(names=self.names, shapes=self.local_shapes, numels=self.numels, offsets=self.offsets,
                             dtypes=self.dtypes, dtype=self.dtype, device=self.device, aliases=self.aliases,
                             selection=self.selection)

    def flatten(
        self,
        model_or_mapping: nn.Module | Mapping[str, Any] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A copy of this rank's measured values, ``[D_local]``; see :meth:`ParameterView.flatten`."""
        from torch.distributed.tensor import DTensor

        assert self.coordinates is not None  # internal: set by from_global
        if model_or_mapping is None:
            model = self._model_ref() if self._model_ref is not None else None
            if model is None:
                raise ValueError("the model this view was built from no longer exists: pass a model or a state dict")
            model_or_mapping = model
        source = (dict(model_or_mapping.named_parameters(remove_duplicate=False))
                  if isinstance(model_or_mapping, nn.Module) else dict(model_or_mapping))
        alias_of = dict(self.aliases)
        local: dict[str, torch.Tensor] = {}
        for name, shape, lshape, start, rows in zip(self.names, self.shapes, self.local_shapes,
                                                     self.coordinates.row_starts, self.coordinates.local_rows):
            key = name if name in source else next((a for a in alias_of.get(name, ()) if a in source), None)
            if key is None:
                continue  # reported by ParameterView.flatten below
            t = source[key]
            if isinstance(t, DTensor):
                t = t.to_local()
            else:
                t = torch.as_tensor(t)
                if t.shape != shape:
                    raise ValueError(f"{key!r} has shape {tuple(t.shape)} in the source but {tuple(shape)} in the "
                                     "model: pass full (unsharded) tensors or the model's DTensors")
                t = t.narrow(0, start, rows)
            local[name] = t
        return self.local_layout.flatten(local, dtype=dtype or self.dtype, device=device or self.device)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[D_local]`` or ``[K, D_local]`` → ``{name: view}`` of the local shards' shapes (no copy)."""
        return self.local_layout.unflatten(flat)

    def describe(self) -> dict[str, Any]:
        assert self.global_view is not None  # internal: set by from_global
        return self.global_view.describe()


def _checksum(obj: Any, crc: int = 0) -> int:
    """CRC-32 of every tensor's bytes (and shape) in a nested batch structure, in a fixed traversal order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        crc = zlib.crc32(repr((tuple(obj.shape), str(obj.dtype))).encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy().tobytes(), crc)
    if isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            crc = _checksum(obj[key], zlib.crc32(str(key).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for item in obj:
            crc = _checksum(item, crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc) if isinstance(obj, (int, float, str, bool, type(None))) else crc


class ShardedModelBehavior(ModelBehavior):
    """:class:`ModelBehavior` for an FSDP2 model: ``fn(rows [K, D_local]) -> [K]`` float64, the same on all ranks.

    A collective: every rank calls it with its own shards of the same K global points. Construction saves the
    local shards; they are restored bit for bit after construction, after every call and on any exception.
    Arguments as for :class:`ModelBehavior` (the per-row loop path is always used).
    """

    def __init__(self, model: nn.Module, data: Any, view: ShardedParameterView, **kwargs: Any) -> None:
        if not isinstance(view, ShardedParameterView) or view.coordinates is None:
            raise TypeError(f"view must be a ShardedParameterView, got {type(view).__name__}")
        params = dict(model.named_parameters(remove_duplicate=False))
        self._sharded = [params[name] for name in view.names]
        self._coordinates = view.coordinates
        self._fsdp_modules = fsdp_modules(model)
        with torch.no_grad():
            self._saved = [p.to_local().detach().clone() for p in self._sharded]
        try:
            super().__init__(model, data, view, use_vmap=False, pad_chunks=False, directions_per_pass=1, **kwargs)
        finally:
            self._restore()

    def _setup_anchor(self, mode: str, device_limit: int, host_limit: int) -> None:
        # Only rank 0's values are used (broadcast), so ranks given different data (e.g. a per-rank split of an
        # eval set) would silently measure rank 0's part: refuse instead — before the anchor's forwards, whose
        # all-gathers would hang if the ranks held different numbers of batches.
        check_coordinates_agree(self._coordinates, {"data checksum": _checksum(self.raw_batches)}, hint=(
            "every rank must pass the same data to a sharded model (the data is not split across ranks)"))
        super()._setup_anchor(mode, device_limit, host_limit)

    def _reshard(self) -> None:
        for m in self._fsdp_modules:
            m.reshard()  # type: ignore[operator]

    def _restore(self) -> None:
        self._reshard()  # after an exception mid-forward the parameters may still be unsharded
        with torch.no_grad():
            for p, saved in zip(self._sharded, self._saved):
                p.to_local().copy_(saved)

    def _forward_row(self, row: torch.Tensor, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            for p, part in zip(self._sharded, self.view.unflatten(row).values()):
                p.to_local().copy_(part)
            outputs = self.model(*batch.args, **batch.kwargs)
            self._reshard()  # so that the next row's writes into the shards are all-gathered again
        return self._extract(outputs, batch)

    def _is_anchor(self, row: torch.Tensor) -> bool:
        """Never short-cut the anchor here: each rank would decide on its own shard, and a rank that skipped the
        forward would leave the others waiting in its all-gathers."""
        return False

    def evaluate_along(self, theta0: torch.Tensor, directions: torch.Tensor, ts: Any) -> None:
        """Not offered: this behaviour writes rows into the local shards itself (see :meth:`__call__`)."""
        return None

    def __call__(self, thetas: torch.Tensor) -> torch.Tensor:
        """``[K, D_local]`` (or ``[D_local]``) rows → ``[K]`` (or scalar) float64 on the CPU, rank 0's values."""
        try:
            out = super().__call__(thetas)
        finally:
            self._restore()
        return self._coordinates.broadcast(out)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_params": self._coordinates.n_params, "sharding": "fsdp2",
                "n_local_params": local_size(self._coordinates)}


__all__ = ["FSDPCoordinates", "ShardedModelBehavior", "ShardedParameterView", "fsdp_modules", "reshard"]
