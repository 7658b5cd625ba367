"""Eval-mode code length of a whole dataset under the weights a model holds now (the "initial" reference θ_0).

The pass runs over the Trainer's own training data (its dataset with unused columns removed, and its collator) in
fixed order, each rank a share of the batches, and leaves no trace: the model's train/eval flags, the global torch
(CPU and CUDA), NumPy and Python RNG states are restored, and the loader draws its seed from a private generator.
Under FSDP every rank runs the same number of forwards (the all-gathers inside them must pair up).
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from hfvolume.mdl.nll import DEFAULT_WORKING_MEMORY, item_nll


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global torch (CPU and initialised CUDA), NumPy and Python RNG states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextlib.contextmanager
def preserved_rng_and_modes(model: torch.nn.Module) -> Iterator[None]:
    """:func:`preserved_rng` and every module's ``training`` flag restored on exit (collators may draw numbers)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        with preserved_rng():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def rank_batches(n_items: int, batch_size: int, rank: int, world: int) -> tuple[list[list[int]], int]:
    """(this rank's batches of item indices, forwards every rank runs): batch k goes to rank k mod world, and every
    rank runs ``ceil(#batches / world)`` forwards (a rank with a batch fewer runs item 0 once more, ignored)."""
    batches = [list(range(s, min(s + batch_size, n_items))) for s in range(0, n_items, batch_size)]
    return batches[rank::world], -(-len(batches) // world)


def dataset_code(
    model: torch.nn.Module,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any] | None,
    *,
    batch_size: int,
    device: torch.device,
    kind: Callable[[torch.nn.Module], tuple[bool, bool, bool]],
    rank: int = 0,
    world: int = 1,
    working_memory: int = DEFAULT_WORKING_MEMORY,
) -> torch.Tensor:
    """``[3]`` float64 (nats, items, C) of this rank's share of ``dataset`` coded by ``model`` in eval mode.

    kind(model) -> (causal, encoder_decoder, multi_label), asked after the first forward (HF models decide their
    problem type there). Sum the first two entries over ranks for the dataset's code length.
    """
    if not hasattr(dataset, "__len__"):
        raise ValueError("the 'initial' reference needs a training dataset with a length (not an IterableDataset)")
    from torch.utils.data import DataLoader

    real, forwards = rank_batches(len(dataset), batch_size, rank, world)
    plan = real + [[0]] * (forwards - len(real))
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    if not plan:
        return totals
    loader = DataLoader(dataset, batch_sampler=plan, collate_fn=collate_fn, generator=torch.Generator())
    with preserved_rng_and_modes(model), torch.no_grad():
        model.eval()
        for index, batch in enumerate(loader):
            batch = _to_device(batch, device)
            outputs = model(**batch)
            if index >= len(real):
                continue  # a padding forward: keeps FSDP's collectives paired across ranks
            causal, encoder_decoder, multi_label = kind(model)
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
            sums = item_nll(logits, batch, causal=causal, encoder_decoder=encoder_decoder, multi_label=multi_label,
                            working_memory=working_memory)
            totals[0] += sums.nats.to(device)
            totals[1] += sums.items.to(device)
            totals[2] = float(sums.num_classes)
    return totals


__all__ = ["dataset_code", "preserved_rng", "preserved_rng_and_modes", "rank_batches"]
