"""Leaving the caller's world as it was: global random states and the train/eval flags of a model.

hfvolume draws its own random numbers from private ``torch.Generator`` objects only. Code it runs on the user's
behalf may not: a shuffling ``DataLoader`` draws from torch's global generator, a custom behaviour or collate
function may call ``random`` or numpy. The Trainer checkpoints those global states, so a measurement that moved
them would change the training run it observes. Everything that runs user code runs inside these managers.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn


def _all_cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def preserved_rng(*, cuda_devices: Sequence[int] | None = None) -> Iterator[None]:
    """Restore torch's CPU generator, the CUDA generators of ``cuda_devices`` (default: every visible device),
    Python's ``random`` and numpy's global state on exit, also when the block raises."""
    devices = _all_cuda_devices() if cuda_devices is None else list(cuda_devices)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def preserved_modes(model: nn.Module, *, eval_mode: bool = True) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (unless ``eval_mode=False``) and give every submodule back its own
    ``training`` flag on exit (``model.train(flag)`` would overwrite submodules the user froze in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, cuda_devices: Sequence[int] | None = None) -> Iterator[None]:
    """:func:`preserved_rng` and :func:`preserved_modes` together, under ``torch.no_grad()``: the context of a
    measurement."""
    with preserved_modes(model), preserved_rng(cuda_devices=cuda_devices), torch.no_grad():
        yield


RANDOM_FORWARD_MESSAGE = (
    "the model draws random numbers in eval mode (MC dropout, a noise layer, or another random op that ignores "
    "model.eval()): the behaviour Δ would be random, so the region whose volume is measured, and every estimate, "
    "would depend on the global random state. Make the forward deterministic in eval mode, e.g. draw the noise "
    "only under `if self.training:`, or pass behavior= a callable that fixes the randomness"
)


def rng_snapshot(cuda_devices: Sequence[int] = ()) -> tuple[Any, ...]:
    """The global random states a forward pass can move: torch's CPU generator, the CUDA generators of
    ``cuda_devices``, Python's ``random`` and numpy's. Compare two with :func:`same_rng`; comparing generator
    states, not outputs, keeps the float non-determinism of GPU kernels from counting as randomness."""
    np_state = np.random.get_state()
    return (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices], random.getstate(),
            np_state[1].copy(), np_state[2:])


def same_rng(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two :func:`rng_snapshot` results are equal."""
    return (torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2]
            and np.array_equal(a[3], b[3]) and a[4] == b[4])


def cuda_devices_of(model: nn.Module) -> list[int]:
    """Indices of the CUDA devices that hold ``model``'s parameters (their generators are the ones it can move)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


__all__ = [
    "RANDOM_FORWARD_MESSAGE",
    "cuda_devices_of",
    "preserved_modes",
    "preserved_rng",
    "preserved_state",
    "rng_snapshot",
    "same_rng",
]
