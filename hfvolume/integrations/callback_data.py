"""What the Trainer callback measures on: which eval set goes with which logged prefix, its batches, and a check
that the model's forward is deterministic.

An evaluation's log carries ``{metric_key_prefix}_runtime``; ``Trainer.evaluate`` with a dict ``eval_dataset``
evaluates each named set under ``f"{metric_key_prefix}_{name}"``. The callback measures each evaluated set on its
own data and logs under that set's prefix (:class:`EvalTarget`), or, with ``volume_eval_dataset="b"``, only set
``"b"``, under the prefix without the ``_b`` (so ``metric_for_best_model="information_content_bits"`` works as
with a single eval set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from hfvolume.integrations.callback_config import DEFAULT_PREFIX


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


__all__ = [
    "EvalTarget",
    "eval_loader",
    "eval_log_prefixes",
    "eval_set_names",
    "step_targets",
    "target_for_prefix",
]
