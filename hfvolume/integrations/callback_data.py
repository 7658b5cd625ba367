"""What the Trainer callback measures on: which eval set goes with which logged prefix, its batches, and a check
that the model's forward is deterministic.

An evaluation's log carries ``{metric_key_prefix}_runtime``; ``Trainer.evaluate`` with a dict ``eval_dataset``
evaluates each named set under ``f"{metric_key_prefix}_{name}"``. The callback measures each evaluated set on its
own data and logs under that set's prefix (:class:`EvalTarget`), or, with ``volume_eval_dataset="b"``, only set
``"b"``, under the prefix without the ``_b`` (so ``metric_for_best_model="information_content_bits"`` works as
with a single eval set).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hfvolume.integrations.callback_config import DEFAULT_PREFIX
from hfvolume.models.batches import split_batch, to_device
from hfvolume.models.state import cuda_devices_of, preserved_state

RANDOM_FORWARD_MESSAGE = (
    "the model draws random numbers in its forward pass in eval mode (MC dropout, a noise layer, or another random "
    "op that ignores model.eval()): the behaviour Δ would be random, so each measurement would depend on the "
    "global random state at that step (and could not be vmapped). Make the forward deterministic in eval mode, "
    "e.g. draw the noise only under `if self.training:`, or measure a deterministic copy of the model with "
    "hfvolume.estimate_local_volume"
)


@dataclass(frozen=True)
class EvalTarget:
    """One measurement: the metric ``prefix`` its values are logged under (``"eval"``, ``"eval_a"``, ``"test"``)
    and the named eval set it measures (a key of ``trainer.eval_dataset``; None: the Trainer's single eval set, or
    the data the evaluation under ``prefix`` just used)."""

    prefix: str
    dataset: str | None = None

    @property
    def data_key(self) -> str:
        """Which batches: the same named set gives the same batches, whatever prefix it is logged under."""
        return f"set:{self.dataset}" if self.dataset is not None else f"log:{self.prefix}"


def eval_log_prefixes(logs: Mapping[str, Any]) -> list[str]:
    """Prefixes of the evaluations in ``logs``: ``Trainer.evaluate`` logs ``{prefix}_runtime`` with
    ``{prefix}_samples_per_second``; ``"train"`` (the end-of-training speed metrics, same shape) is not one."""
    out = []
    for key in logs:
        if key.endswith("_runtime"):
            prefix = key[: -len("_runtime")]
            if prefix and prefix != "train" and f"{prefix}_samples_per_second" in logs:
                out.append(prefix)
    return out


def eval_set_names(trainer: Any) -> list[str]:
    """Names of the Trainer's eval sets when ``eval_dataset`` is a dict, else []."""
    eval_dataset = getattr(trainer, "eval_dataset", None)
    return [str(name) for name in eval_dataset] if isinstance(eval_dataset, Mapping) else []


def target_for_prefix(prefix: str, wanted: str | None, names: Sequence[str]) -> EvalTarget | None:
    """The measurement that goes with the evaluation logged under ``prefix``, or None when it is not measured."""
    if wanted is not None:
        suffix = f"_{wanted}"
        if prefix.endswith(suffix) and len(prefix) > len(suffix):
            return EvalTarget(prefix[: -len(suffix)], wanted)
        return None
    matches = [name for name in names if prefix.endswith(f"_{name}")]
    return EvalTarget(prefix, max(matches, key=len) if matches else None)


def step_targets(wanted: str | None, names: Sequence[str]) -> list[EvalTarget]:
    """Measurements outside an evaluation (``measure_every_n_steps``, ``measure_on_train_end``): under the prefixes
    an evaluation would use, so the same keys chart the same quantity. The first is the callback's main series."""
    if wanted is not None:
        return [EvalTarget(DEFAULT_PREFIX, wanted)]
    if names:
        return [EvalTarget(f"{DEFAULT_PREFIX}_{name}", name) for name in names]
    return [EvalTarget(DEFAULT_PREFIX)]


def eval_loader(trainer: Any, target: EvalTarget, eval_dataloader: Any) -> Any:
    """An unsharded, sequential ``DataLoader`` over ``target``'s eval data, or None when there is none.

    The Trainer's eval loader is sharded across processes; every process must measure on the *same* (whole)
    batches, so that a multi-process run gives the single-process answer (the directions are what is split).
    Its dataset (unused columns removed) and collator are reused.
    """
    eval_dataset = getattr(trainer, "eval_dataset", None) if trainer is not None else None
    if target.dataset is not None:
        if not isinstance(eval_dataset, Mapping) or target.dataset not in eval_dataset:
            have = sorted(eval_dataset) if isinstance(eval_dataset, Mapping) else "none (eval_dataset is not a dict)"
            raise ValueError(f"volume_eval_dataset={target.dataset!r} is not one of the eval datasets {have}")
        prepared = trainer.get_eval_dataloader(target.dataset)
    elif eval_dataset is not None and not isinstance(eval_dataset, Mapping) and target.prefix == DEFAULT_PREFIX:
        prepared = trainer.get_eval_dataloader()
    elif eval_dataloader is not None:
        prepared = eval_dataloader  # the loader the evaluation under this prefix just used
    elif eval_dataset is not None and not isinstance(eval_dataset, Mapping):
        prepared = trainer.get_eval_dataloader()
    else:
        return None
    batch_size = trainer.args.eval_batch_size if trainer is not None else prepared.batch_size
    return torch.utils.data.DataLoader(prepared.dataset, batch_size=batch_size, collate_fn=prepared.collate_fn,
                                       shuffle=False)


def _rng_snapshot(cuda_devices: Sequence[int]) -> tuple[Any, ...]:
    np_state = np.random.get_state()
    return (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices], random.getstate(),
            np_state[1].copy(), np_state[2:])


def _same_rng(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2]
            and np.array_equal(a[3], b[3]) and a[4] == b[4])


def forward_draws_random_numbers(model: nn.Module, batch: Any) -> bool:
    """Whether one eval-mode forward of ``model`` on ``batch`` draws from a global random generator (torch's CPU
    and CUDA generators, Python's ``random``, numpy's): MC dropout, noise layers. Compared by generator state, so
    float non-determinism of GPU kernels does not count. Every state, and the model's modes, are restored."""
    devices = cuda_devices_of(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args, kwargs = split_batch(to_device(batch, device))
    with preserved_state(model, cuda_devices=devices):
        before = _rng_snapshot(devices)
        model(*args, **kwargs)
        return not _same_rng(before, _rng_snapshot(devices))


__all__ = [
    "EvalTarget",
    "RANDOM_FORWARD_MESSAGE",
    "eval_loader",
    "eval_log_prefixes",
    "eval_set_names",
    "forward_draws_random_numbers",
    "step_targets",
    "target_for_prefix",
]
