"""Overhead of OnlineCodeCallback's tap on a Trainer's training loop: time per optimizer step and extra memory.

Two loops, each trained with and without the callback in alternating runs (without, with, without, ...) in one
process, one intra-op thread:

* the main job's loop (scripts/train_digits.py's model and recipe: the digits MLP, batch 64, Adam 1e-3);
* the bundled GPT-NeoX benchmark shape (vocab 2048, hidden 128, 4 layers) on 16 × 64-token batches.

The tap computes only during the first pass, so the step time is read there: the median over first-epoch steps
(on_step_begin → on_step_end, which contains forward, backward, the tap and the optimizer step), pooled over the
repeats of each side. The whole train() time over ``--epochs`` is reported too (later epochs run untapped). On a
shared machine those end-to-end medians move by several % between runs, so the tap's own cost is also measured in
pairs: the same ``training_step`` on a fixed batch through the original ``compute_loss`` and through the tap,
alternating, many times; its median difference, against the median full step time, is the overhead figure; and
the tap's own work alone (its per-batch coding and the amortised coding of kept batches), the minimum over
repeats, which load from other processes can only lengthen.
Extra memory: peak bytes of tensors alive at once during one tap call on the loop's logits (profiler allocation
events), against the tap's ``code_working_memory`` budget. Acceptance (issue 17): ≤ 2 % of the step time; extra
memory ≤ the budget.

    python scripts/benchmarks/bench_online_code.py [--repeats 5] [--epochs 3] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, Callable

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments


def _digits() -> tuple[Callable[[], Any], Any, dict[str, Any]]:
    try:
        from hfvolume.integrations.demo import DigitsClassifier, digits_datasets
    except ImportError:  # the layout before the integrations package
        from hfvolume.demo import DigitsClassifier, digits_datasets
    train, _ = digits_datasets(seed=0)
    return (lambda: DigitsClassifier(seed=0)), train, dict(per_device_train_batch_size=64, learning_rate=1e-3)


def _neox() -> tuple[Callable[[], Any], Any, dict[str, Any]]:
    from datasets import Dataset
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPTNeoXConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=128)

    def make() -> Any:
        torch.manual_seed(0)
        return GPTNeoXForCausalLM(config)

    ids = torch.randint(0, 2048, (16 * 24, 64), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    data.set_format("torch")
    return make, data, dict(per_device_train_batch_size=16, learning_rate=1e-4)


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step, with the epoch it belongs to."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        epoch = int((state.epoch or 0) - 1e-9)
        self.steps.append((epoch, time.perf_counter() - self._t0))


def run_once(make: Callable[[], Any], data: Any, recipe: dict[str, Any], *, tap: bool, epochs: int,
             nll_source: str = "logits") -> tuple:
    """(first-epoch step seconds, later-epoch step seconds, train() seconds) of one fresh run."""
    from hfvolume.mdl import OnlineCodeCallback

    timer = StepTimer()
    callbacks: list[Any] = [timer] + ([OnlineCodeCallback(code_write_card=False, nll_source=nll_source)] if tap else [])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, num_train_epochs=epochs, lr_scheduler_type="constant",
                                 logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True,
                                 use_cpu=True, seed=0, **recipe)
        trainer = Trainer(model=make(), args=args, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    first = [dt for e, dt in timer.steps if e == 0]
    later = [dt for e, dt in timer.steps if e > 0]
    return first, later, seconds


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors allocated inside ``fn()`` and alive at once (profiler allocation/free events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    alive = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        alive += event.nbytes()
        peak = max(peak, alive)
    return peak


def tap_memory(make: Callable[[], Any], data: Any, recipe: dict[str, Any]) -> tuple[int, int]:
    """(peak tap bytes on one training batch's logits, the logits' own bytes)."""
    from transformers import default_data_collator

    from hfvolume.mdl.nll import DEFAULT_WORKING_MEMORY, item_nll

    model = make()
    batch = default_data_collator([data[i] for i in range(recipe["per_device_train_batch_size"])])
    with torch.no_grad():
        logits = model(**batch).logits
    causal = logits.dim() == 3
    peak = tensor_peak_bytes(lambda: item_nll(logits, batch, causal=causal, working_memory=DEFAULT_WORKING_MEMORY))
    return peak, logits.numel() * logits.element_size()


def paired_tap_cost(make: Callable[[], Any], data: Any, recipe: dict[str, Any], pairs: int,
                    nll_source: str = "logits") -> tuple[float, float]:
    """(median extra seconds the tap adds to one ``training_step``, median untapped ``training_step`` seconds).

    One Trainer, one fixed batch; each pair times the step once through the original ``compute_loss`` and once
    through the tap's wrapper, in alternating order, so that load from other processes hits both alike.
    """
    from transformers import default_data_collator

    from hfvolume.mdl import OnlineCodeCallback

    cb = OnlineCodeCallback(code_write_card=False, nll_source=nll_source)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, report_to=[], disable_tqdm=True, use_cpu=True, **recipe)
        trainer = Trainer(model=make(), args=args, train_dataset=data, callbacks=[cb])
        trainer.create_optimizer()
    tapped, plain = trainer.compute_loss, cb.tap._original
    model = trainer.model.train()
    batch = default_data_collator([data[i] for i in range(recipe["per_device_train_batch_size"])])
    trainer.current_gradient_accumulation_steps = 1
    diffs, bases = [], []
    for i in range(pairs):
        timing = {}
        for use_tap in ((False, True) if i % 2 else (True, False)):
            trainer.compute_loss = tapped if use_tap else plain
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            trainer.training_step(model, dict(batch))
            timing[use_tap] = time.perf_counter() - start
        diffs.append(timing[True] - timing[False])
        bases.append(timing[False])
    cb.tap.flush()  # the kept batches are coded too: their cost belongs to the tap
    return statistics.median(diffs), statistics.median(bases)


def isolated_tap_cost(make: Callable[[], Any], data: Any, recipe: dict[str, Any], nll_source: str) -> float:
    """Seconds the tap's own work takes per micro-batch, timed alone: minimum over repeats of (n taps of one
    batch's outputs, then the flush of kept batches) / n. The minimum filters out other processes' load."""
    from transformers import default_data_collator

    from hfvolume.mdl.tap import LossTap

    model = make().train()
    batch = default_data_collator([data[i] for i in range(recipe["per_device_train_batch_size"])])
    with torch.no_grad():
        outputs = model(**batch)
    n = 200 if outputs["logits"].numel() < 1e5 else 3  # windows of a few ms: some fall between load spikes
    best = float("inf")
    for _ in range(20):
        tap = LossTap(nll_source=nll_source, on_error=lambda err: (_ for _ in ()).throw(err))
        start = time.perf_counter()
        for _ in range(n):
            tap._record(model, outputs, batch, None, True)
        tap.flush()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def bench(name: str, factory: Callable[[], tuple], repeats: int, epochs: int,
          nll_source: str = "logits") -> dict[str, float]:
    make, data, recipe = factory()
    run_once(make, data, recipe, tap=True, epochs=1)  # warm-up: imports, allocator, first-call costs
    sides: dict[bool, list[tuple]] = {False: [], True: []}
    for i in range(repeats):
        for tap in (False, True):
            sides[tap].append(run_once(make, data, recipe, tap=tap, epochs=epochs, nll_source=nll_source))
        print(f"  {name} repeat {i + 1}/{repeats}: train() {sides[False][-1][2]:.2f} s without, "
              f"{sides[True][-1][2]:.2f} s with", flush=True)
    first = {tap: statistics.median([dt for run in runs for dt in run[0]]) for tap, runs in sides.items()}
    later = {tap: statistics.median([dt for run in runs for dt in run[1]] or [float("nan")])
             for tap, runs in sides.items()}
    total = {tap: statistics.median([run[2] for run in runs]) for tap, runs in sides.items()}
    peak, logits_bytes = tap_memory(make, data, recipe)
    budget_s = 5.0 if repeats <= 2 else 30.0  # wall time of the paired measurement
    pairs = int(min(1000, max(20, budget_s / (2 * first[False]))))
    extra, base = paired_tap_cost(make, data, recipe, pairs=pairs, nll_source=nll_source)
    alone = isolated_tap_cost(make, data, recipe, nll_source)
    return {"isolated_us": 1e6 * alone, "isolated_pct_of_step": 100 * alone / first[False],
            "paired_extra_us": 1e6 * extra, "paired_pct_of_step": 100 * extra / first[False],
            "paired_pct_of_training_step": 100 * extra / base,
            "step_without_ms": 1e3 * first[False], "step_with_ms": 1e3 * first[True],
            "step_overhead_pct": 100 * (first[True] / first[False] - 1),
            "later_without_ms": 1e3 * later[False], "later_with_ms": 1e3 * later[True],
            "train_overhead_pct": 100 * (total[True] / total[False] - 1),
            "tap_peak_mib": peak / 2**20, "logits_mib": logits_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the tap is active in the first)")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 2 epochs")
    args = parser.parse_args()
    repeats, epochs = (2, 2) if args.quick else (args.repeats, args.epochs)
    torch.set_num_threads(1)
    cases = (("digits MLP (main job)", _digits, "logits"), ("GPT-NeoX 16×64 tokens", _neox, "logits"),
             ("GPT-NeoX 16×64 tokens, nll_source=loss", _neox, "loss"))
    rows = {name: bench(name, factory, repeats, epochs, source) for name, factory, source in cases}
    from hfvolume.mdl.nll import DEFAULT_WORKING_MEMORY

    print(f"\nmedian step time in the first pass (tap active), {repeats} alternating repeats × {epochs} epochs, "
          f"1 thread; budget code_working_memory = {DEFAULT_WORKING_MEMORY / 2**20:.0f} MiB")
    print("| loop | step without (ms) | step with (ms) | step overhead | later epochs without / with (ms) | "
          "train() overhead | paired tap cost per step (µs) | paired cost / step | tap alone (µs, min) | "
          "tap alone / step | tap peak memory (MiB) | logits (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_without_ms']:.3f} | {r['step_with_ms']:.3f} | {r['step_overhead_pct']:+.2f} % | "
              f"{r['later_without_ms']:.3f} / {r['later_with_ms']:.3f} | {r['train_overhead_pct']:+.2f} % | "
              f"{r['paired_extra_us']:.1f} | {r['paired_pct_of_step']:+.2f} % | {r['isolated_us']:.1f} | "
              f"{r['isolated_pct_of_step']:.2f} % | {r['tap_peak_mib']:.3f} | {r['logits_mib']:.3f} |")


if __name__ == "__main__":
    main()
