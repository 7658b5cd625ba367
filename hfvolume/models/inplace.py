"""Points written into a model's own parameters, and the anchor restored bit for bit afterwards.

For models too large for a ``[K, D]`` buffer of perturbed points, a point θ0 + t·w is formed directly in the
model's parameters and evaluated with the ordinary forward. The anchor is then restored from a saved copy (the
behaviour's flat anchor), never by subtracting the step: θ + δ − δ is not θ in floating point. The restore also
runs when the forward raises, so an exception never leaves a perturbed model behind.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from hfvolume.models.params import ParameterView

WritePoint = Callable[[torch.Tensor, float], None]


class InPlaceParameters:
    """The measured parameters of ``model`` as views of the flat ``anchor`` ``[D]`` (in ``view``'s layout)."""

    def __init__(self, model: nn.Module, view: ParameterView, anchor: torch.Tensor) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        # (parameter, its slice of the flat vector, its anchor values shaped like it)
        self.targets = [
            (params[n], sl, anchor[sl].view(params[n].shape))
            for n, sl in zip(view.names, view.tensor_slices().values())
        ]
        self._versions: tuple[int, ...] | None = None  # version counters right after our last restore

    def hold_anchor(self) -> bool:
        """Whether the parameters still hold the anchor (nobody changed them since they were last restored)."""
        # Every in-place change of a parameter bumps its version counter: unchanged counters since our last
        # restore mean the parameters still hold the anchor, and the O(D) comparison can be skipped.
        if tuple(p._version for p, _, _ in self.targets) == self._versions:
            return True
        return all(torch.equal(p, base.to(p.dtype)) for p, _, base in self.targets)

    def _write(self, direction: torch.Tensor, t: float) -> None:
        """θ0 + t·w into the parameters; ``direction`` ``[D]`` on the parameters' device."""
        for p, sl, base in self.targets:
            step = direction[sl].view(p.shape)
            if p.dtype == base.dtype:
                torch.add(base, step, alpha=t, out=p)
            else:  # bf16/fp16 parameters: the point is formed in the row dtype, then cast
                p.copy_(torch.add(base, step, alpha=t))

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[WritePoint]:
        """A block in which ``write(w, t)`` puts θ0 + t·w into the parameters; the anchor is restored on exit, also
        when the block raises. Call under ``torch.no_grad()``."""
        try:
            yield self._write
        finally:
            for p, _, base in self.targets:
                p.copy_(base)
            self._versions = tuple(p._version for p, _, _ in self.targets)


__all__ = ["InPlaceParameters", "WritePoint"]
