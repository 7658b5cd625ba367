"""``prequential_code_length``: the exact block-wise prequential code, retraining from scratch on every prefix.

Block-wise prequential code (Blier & Ollivier, arXiv 1802.07044 §2.4; Voita & Titov, arXiv 2003.12298 §2.2) on
boundaries ``0 = t_0 < t_1 < … < t_S = N`` of the items in transmission order:

    L_preq = t_1 log2 C + Σ_{i=1..S−1} Σ_{t_i < t ≤ t_{i+1}} −log2 p_{θ_i}(y_t | x_t)   bits,

θ_i trained from ``model_init`` on items ``1..t_i`` with the user's ``TrainingArguments`` (a ``Trainer`` per
block), then block i + 1 coded in eval mode with the same scored-item rules as the online tap. With early
stopping (the default), a fraction of each prefix is held out and the checkpoint (one per evaluation) with the
shortest held-out code codes the next block; telling the receiver which one costs ``log2(#checkpoints)`` bits per
block, reported as ``selection_bits`` and not added. Models trained to convergence on noisy labels are
overconfident, which makes their code exceed the uniform one; early stopping and the uniform mixture
``(1 − ε) p + ε / C`` (at most ``log2(C / ε)`` bits per item) bound that.

Blocks are independent jobs. Under a multi-process launch each process trains a share of them as a
single-process run (every job is seeded from ``args.seed`` alone) and the rows are all-gathered, so the result is
the same for any number of processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from hfvolume.mdl.callback import OnlineCodeCallback
from hfvolume.mdl.codelength import LN2, BoundarySpec, compression, resolve_boundaries
from hfvolume.mdl.evaluation import preserved_rng
from hfvolume.mdl.nll import DEFAULT_WORKING_MEMORY
from hfvolume.mdl.results import PrequentialResult
from hfvolume.parallel.distributed import resolve_sharding

_RANK_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
             "MV2_COMM_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")
_ROW = 8  # job, nats, items, selection bits, seconds, extra nats (θ_0 on the rest), extra items, C


class _BlockCoder(OnlineCodeCallback):
    """The tap in eval mode only: codes the held-out part and the next block (``code_strict``: errors raise)."""

    def __init__(self, mixture: float, working_memory: int) -> None:
        super().__init__(code_reference="none", code_write_card=False, code_strict=True,
                         code_working_memory=working_memory)
        self.tap.mixture = mixture

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.tap.code_train = False  # the prefix's own online code is not needed here

    def on_train_end(self, args, state, control, **kwargs):
        pass  # no files from the per-block runs


class _KeepBest(TrainerCallback):
    """Keeps (a CPU copy of) the weights with the shortest held-out code seen at an evaluation."""

    def __init__(self) -> None:
        self.best: float = math.inf
        self.state_dict: dict[str, torch.Tensor] | None = None
        self.candidates = 0

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None or not metrics:
            return
        value = metrics.get("eval_code_bits", metrics.get("eval_loss"))
        if value is None:
            return
        self.candidates += 1
        if float(value) < self.best:
            self.best = float(value)
            self.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _subset(dataset: Any, indices: Sequence[int]) -> Any:
    idx = [int(i) for i in indices]
    if hasattr(dataset, "select"):  # datasets.Dataset: keeps the columns the Trainer inspects
        return dataset.select(idx)
    return torch.utils.data.Subset(dataset, idx)


def _job_args(args: Any, output_dir: str, *, evaluate: bool, n_train: int, min_steps: int, checkpoints: int) -> Any:
    """The user's recipe for one block: no checkpoints on disk, trackers or pushes; at least ``min_steps``
    optimizer steps; when early stopping, the user's step-wise evaluations if any, else one per epoch, or
    ``checkpoints`` evenly spaced ones when the block has more epochs than that (a small prefix with a step
    floor runs hundreds of one-step epochs)."""
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    changes: dict[str, Any] = dict(
        output_dir=output_dir, save_strategy="no", load_best_model_at_end=False, push_to_hub=False, report_to=[],
        eval_strategy="no", prediction_loss_only=True, disable_tqdm=True, hub_model_id=None,
        ddp_backend=None,  # a named backend makes Accelerate join the launch's process group: one process here
    )
    per_epoch = math.ceil(math.ceil(n_train / args.per_device_train_batch_size) / args.gradient_accumulation_steps)
    planned = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    if planned < min_steps:
        changes["max_steps"] = planned = min_steps
    if evaluate and strategy == "steps":
        changes["eval_strategy"] = "steps"
    elif evaluate and planned <= checkpoints * per_epoch:
        changes["eval_strategy"] = "epoch"
    elif evaluate:
        changes.update(eval_strategy="steps", eval_steps=math.ceil(planned / checkpoints))
    return dataclasses.replace(args, **changes)


def _held_out(prefix: int, fraction: float, order_seed: int, job: int) -> np.ndarray:
    """Positions (within the prefix) held out for early stopping: a seeded choice, independent of the rank."""
    if fraction <= 0.0 or prefix < 2:
        return np.zeros(0, dtype=np.int64)
    n_hold = min(prefix - 1, max(1, int(round(fraction * prefix))))
    rng = np.random.default_rng([order_seed, job])
    return np.sort(rng.choice(prefix, size=n_hold, replace=False))


@contextlib.contextmanager
def _single_process(active: bool) -> Iterator[None]:
    """Make Accelerate (and so the Trainer) see a one-process world for a block trained on this rank alone; the
    process group, Accelerate's shared state and the rank variables are restored afterwards."""
    if not active:
        yield
        return
    from accelerate.state import AcceleratorState, GradientState, PartialState

    device = str(PartialState().device)
    classes = (PartialState, AcceleratorState, GradientState)
    saved = {cls: dict(cls._shared_state) for cls in classes}
    env = {k: os.environ.get(k) for k in (*_RANK_ENV, "ACCELERATE_TORCH_DEVICE")}
    try:
        for cls in classes:
            cls._shared_state.clear()
        for k in _RANK_ENV:
            os.environ.pop(k, None)
        os.environ["ACCELERATE_TORCH_DEVICE"] = device  # this rank's device, not device 0
        yield
    finally:
        for cls in classes:
            cls._shared_state.clear()
            cls._shared_state.update(saved[cls])
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class _Plan:
    """Everything a job needs, fixed before any job runs (identical on every rank)."""

    model_init: Callable[[], Any]
    dataset: Any
    args: Any
    boundaries: tuple[int, ...]
    order: np.ndarray
    collator: Any
    early_stopping: float
    mixture: float
    min_steps: int
    checkpoints: int
    order_seed: int
    trainer_cls: type
    callbacks: tuple[Any, ...]
    working_memory: int
    initial_reference: bool

    def items(self, start: int, stop: int) -> Any:
        return _subset(self.dataset, self.order[start:stop])

    def trainer(self, job_dir: str, train: Any, held: Any, *, evaluate: bool, n_train: int) -> tuple[Any, Any]:
        coder, keep = _BlockCoder(self.mixture, self.working_memory), _KeepBest()
        args = _job_args(self.args, job_dir, evaluate=evaluate, n_train=n_train, min_steps=self.min_steps,
                         checkpoints=self.checkpoints)
        trainer = self.trainer_cls(model_init=self.model_init, args=args, train_dataset=train, eval_dataset=held,
                                   data_collator=self.collator, callbacks=[coder, keep, *self.callbacks])
        for printer in (PrinterCallback, ProgressCallback):  # one line per block run would flood the console
            trainer.remove_callback(printer)
        return trainer, keep

    def run(self, job: int, job_dir: str) -> list[float]:
        """One row: job 0 codes block 1's items (and, for the "initial" reference, every item) under θ_0; job
        i ≥ 1 trains on items ``1..t_i`` and codes block i + 1."""
        start = time.perf_counter()
        b = self.boundaries
        if job == 0:
            trainer, _ = self.trainer(job_dir, self.items(0, b[0]), None, evaluate=False, n_train=b[0])
            first = trainer.evaluate(eval_dataset=self.items(0, b[0]), metric_key_prefix="block")
            extra: dict[str, float] = {}
            if self.initial_reference:
                extra = trainer.evaluate(eval_dataset=self.items(b[0], b[-1]), metric_key_prefix="block")
            return [0.0, *_code(first), 0.0, time.perf_counter() - start, *_code(extra), _classes(trainer)]
        prefix = b[job - 1]
        hold = _held_out(prefix, self.early_stopping, self.order_seed, job)
        keep_pos = np.setdiff1d(np.arange(prefix), hold)
        train = _subset(self.dataset, self.order[keep_pos])
        held = _subset(self.dataset, self.order[hold]) if hold.size else None
        trainer, keep = self.trainer(job_dir, train, held, evaluate=held is not None, n_train=len(keep_pos))
        trainer.train()
        selection = 0.0
        if keep.state_dict is not None:
            trainer.model.load_state_dict(keep.state_dict)
            selection = math.log2(keep.candidates)
        metrics = trainer.evaluate(eval_dataset=self.items(prefix, b[job]), metric_key_prefix="block")
        return [float(job), *_code(metrics), selection, time.perf_counter() - start, 0.0, 0.0, _classes(trainer)]


def _code(metrics: dict[str, float]) -> tuple[float, float]:
    """(nats, items) of an evaluation coded by the block coder (no keys: no scored item)."""
    return metrics.get("block_code_bits", 0.0) * LN2, metrics.get("block_code_items", 0.0)


def _classes(trainer: Any) -> float:
    coder = next(c for c in trainer.callback_handler.callbacks if isinstance(c, _BlockCoder))
    return float(coder.tap.num_classes or 0)


def _launched() -> bool:
    """Whether this process is in a group of several: then every block runs as a single-process job, also with
    ``distributed=False`` (each process computing every block on its own)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _assign(jobs: Sequence[int], costs: Sequence[float], world: int) -> list[list[int]]:
    """Longest job first onto the least-loaded rank (ties: lowest rank): deterministic on every rank."""
    loads, plan = [0.0] * world, [[] for _ in range(world)]  # type: list[float], list[list[int]]
    for job in sorted(jobs, key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda k: (loads[k], k))
        plan[r].append(job)
        loads[r] += costs[job]
    return plan


def _check_options(early_stopping: Any, uniform_mixture: Any, min_steps: Any, order_seed: Any,
                   checkpoints: Any) -> None:
    if isinstance(early_stopping, bool) or not isinstance(early_stopping, (int, float)) or \
            not 0.0 <= early_stopping < 1.0:
        raise ValueError(f"early_stopping must be a held-out fraction in [0, 1), got {early_stopping!r}")
    if isinstance(uniform_mixture, bool) or not isinstance(uniform_mixture, (int, float)) or \
            not 0.0 <= uniform_mixture < 1.0:
        raise ValueError(f"uniform_mixture must be in [0, 1), got {uniform_mixture!r}")
    for name, value in (("min_steps", min_steps), ("order_seed", order_seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1:
        raise ValueError(f"checkpoints must be a positive int, got {checkpoints!r}")


def _reference(code_reference: Any, rows: np.ndarray, boundaries: tuple[int, ...], uniform: float,
               num_classes: int) -> tuple[str, float | None]:
    if isinstance(code_reference, PrequentialResult):
        return "learner", code_reference.total_bits
    if code_reference == "uniform":
        return "uniform", uniform
    if code_reference == "initial":
        return "initial", float(rows[0, 1] + rows[0, 5]) / LN2
    return "none", None


def prequential_code_length(
    model_init: Callable[[], torch.nn.Module],
    train_dataset: Any,
    *,
    args: Any,
    boundaries: BoundarySpec = "voita",
    order_seed: int = 0,
    data_collator: Any = None,
    num_classes: int | None = None,
    code_reference: str | PrequentialResult = "uniform",
    early_stopping: float = 0.1,
    uniform_mixture: float = 0.0,
    min_steps: int = 0,
    checkpoints: int = 40,
    trainer_cls: type | None = None,
    callbacks: Sequence[Any] = (),
    distributed: bool | None = None,
    working_memory: int = DEFAULT_WORKING_MEMORY,
) -> PrequentialResult:
    """Block-wise prequential code length ``L_preq`` of ``train_dataset``'s labels and its information transfer.

    model_init: ``() -> nn.Module`` with fresh weights each call (the Trainer's ``model_init`` convention; seeded
        by ``args.seed`` before every call). train_dataset: N items with labels (map-style, with a length).
    args: the per-block training recipe (``TrainingArguments``: epochs, learning rate, batch size, seed, ...).
    boundaries: "voita" (Voita & Titov's 11 fractions), "doubling", item counts or fractions of N
        (:func:`hfvolume.mdl.codelength.resolve_boundaries`). order_seed: the transmission order is the
        permutation ``numpy.random.default_rng(order_seed).permutation(N)``.
    num_classes: C of the uniform code (default: the logits' last dimension; 2 per label for multi-label heads).
    code_reference: "uniform" (``Σ items · log2 C``), "initial" (the code of every item under the weights
        ``model_init`` returns, eval mode), "none", or a :class:`PrequentialResult` of another learner on the same
        data and boundaries ("learner": ``L_IT = L_preq(other) − L_preq(this)``).
    early_stopping: fraction of each prefix held out to pick the checkpoint (one per evaluation, per epoch unless
        ``args`` evaluates by steps) with the shortest held-out code; 0 trains on the whole prefix to the end.
    uniform_mixture: ε: items are coded with ``(1 − ε) p + ε / C``.
    min_steps: at least this many optimizer steps per block (small prefixes otherwise take few steps).
    checkpoints: at most this many early-stopping evaluations per block (one per epoch when there are fewer epochs;
        ignored when ``args`` evaluates by steps).
    trainer_cls, callbacks: the Trainer class and extra callbacks of every block's run.
    distributed: None: split the blocks over the processes of an initialised group (Accelerate / torchrun) when
        there is more than one; False: every process computes everything; True: require a group.

    Returns a :class:`PrequentialResult` (bits). Restores the caller's global RNG states.
    """
    _check_options(early_stopping, uniform_mixture, min_steps, order_seed, checkpoints)
    if not (isinstance(code_reference, PrequentialResult) or code_reference in ("uniform", "initial", "none")):
        raise ValueError(f"code_reference must be 'uniform', 'initial', 'none' or a PrequentialResult, got "
                         f"{code_reference!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"num_classes must be an int ≥ 2, got {num_classes!r}")
    if not hasattr(train_dataset, "__len__") or len(train_dataset) < 2:
        raise ValueError("train_dataset must be a map-style dataset of at least 2 items")
    n = len(train_dataset)
    bounds = resolve_boundaries(boundaries, n)
    if isinstance(code_reference, PrequentialResult) and code_reference.boundaries != bounds:
        raise ValueError(f"the reference learner was coded on boundaries {code_reference.boundaries}, this run on "
                         f"{bounds}: the codes are not of the same items")
    order = np.random.default_rng(order_seed).permutation(n)
    plan = _Plan(model_init, train_dataset, args, bounds, order, collator=data_collator,
                 early_stopping=float(early_stopping), mixture=float(uniform_mixture), min_steps=min_steps,
                 checkpoints=checkpoints, order_seed=order_seed, trainer_cls=trainer_cls or Trainer,
                 callbacks=tuple(callbacks), working_memory=working_memory,
                 initial_reference=code_reference == "initial")
    sharding = resolve_sharding(distributed)
    rank, world = (0, 1) if sharding is None else (sharding.rank, sharding.world_size)
    costs = [float(n if code_reference == "initial" else bounds[0])] + [2.0 * t for t in bounds[:-1]]
    mine = _assign(range(len(bounds)), costs, world)[rank]
    rows = []
    with preserved_rng(), tempfile.TemporaryDirectory(prefix="hfvolume-preq-") as tmp:
        with _single_process(_launched()):
            for job in mine:
                rows.append(plan.run(job, os.path.join(tmp, f"block-{job}")))
    local = np.asarray(rows, dtype=np.float64).reshape(-1, _ROW)
    table = local if sharding is None else sharding.gather(local)
    table = table[np.argsort(table[:, 0], kind="stable")]
    return _assemble(table, bounds, num_classes, code_reference, plan, world)


def _assemble(rows: np.ndarray, bounds: tuple[int, ...], num_classes: int | None, code_reference: Any,
              plan: _Plan, world: int) -> PrequentialResult:
    if rows.shape[0] != len(bounds) or not np.array_equal(rows[:, 0], np.arange(len(bounds))):
        raise RuntimeError(f"expected one row per job 0..{len(bounds) - 1}, got jobs {rows[:, 0].tolist()}")
    seen = {int(c) for c in rows[:, 7] if c > 0}
    if num_classes is None:
        if len(seen) != 1:
            raise ValueError(f"could not infer C from the logits (saw {sorted(seen)}); pass num_classes")
        num_classes = seen.pop()
    items = tuple(float(v) for v in rows[:, 2])
    first = items[0] * math.log2(num_classes)
    block_bits = tuple(float(v) / LN2 for v in rows[1:, 1])
    total = first + math.fsum(block_bits)
    uniform = math.fsum(items) * math.log2(num_classes)
    reference, ref_bits = _reference(code_reference, rows, bounds, uniform, num_classes)
    settings = {"boundaries": list(bounds), "order_seed": plan.order_seed, "early_stopping": plan.early_stopping,
                "uniform_mixture": plan.mixture, "min_steps": plan.min_steps, "checkpoints": plan.checkpoints,
                "world_size": world,
                "num_train_epochs": float(plan.args.num_train_epochs), "max_steps": int(plan.args.max_steps),
                "learning_rate": float(plan.args.learning_rate), "seed": int(plan.args.seed),
                "per_device_train_batch_size": int(plan.args.per_device_train_batch_size)}
    return PrequentialResult(
        boundaries=bounds, block_items=items, first_block_bits=first, block_bits=block_bits, total_bits=total,
        uniform_bits=uniform, reference=reference, reference_bits=ref_bits,
        information_transfer_bits=None if ref_bits is None else ref_bits - total,
        compression=compression(uniform, total) if total > 0 else math.inf,
        selection_bits=float(math.fsum(rows[1:, 3])), seconds_per_block=tuple(float(v) for v in rows[1:, 4]),
        num_classes=int(num_classes), settings=settings,
    )


__all__ = ["prequential_code_length"]
