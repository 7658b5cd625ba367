"""Information transfer vs information content on the digits label-noise sweep (issue 17's acceptance run).

For each label-noise level ρ ∈ {0, 0.2, …, 1} (a fraction ρ of the training labels replaced by uniform random
classes; the test labels stay clean) and each seed, one Trainer run of a digits MLP (``--model relu``, the
default: a 64-64-64-10 ReLU MLP with PyTorch's default initialisation; ``tanh``: the main job's model) with both
callbacks on:

* ``OnlineCodeCallback``: the first-pass online code and L_IT = N log2 C − L_online (uniform reference);
* ``LocalVolumeCallback``: the information content −log2 V at the end of training (KL behaviour on the test
  inputs, cutoff 1e-2, σ = RMS of the initial weights, isotropic directions);

plus the block-wise prequential code of the same training set (``prequential_code_length``: doubling boundaries
20, 40, …, 640, N; a fresh model per prefix, ≥ ``--epochs`` epochs and ≥ 300 steps, early stopping on a held-out
tenth) and the clean test accuracy. Prints per-ρ means ± sd, Spearman rank correlations over all runs, and the
acceptance checks: Spearman(L_IT, ρ) ≤ −0.8 (online and block-wise), Spearman(information content, ρ) ≥ +0.5,
|L_IT(ρ = 1)| ≤ 5 % of the uniform code.

    python scripts/benchmarks/bench_information.py [--model relu] [--seeds 3] [--epochs 40] [--quick] [--out F]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from hfvolume import LocalVolumeCallback
from hfvolume.mdl import OnlineCodeCallback, prequential_code_length

try:
    from hfvolume.integrations.demo import DigitsClassifier, digits_datasets
except ImportError:  # the layout before the integrations package
    from hfvolume.demo import DigitsClassifier, digits_datasets

NOISE = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
BATCH = 32


def _accuracy(prediction: Any) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


class ReluDigits(torch.nn.Module):
    """A 64-64-64-10 ReLU MLP with PyTorch's default initialisation drawn from ``seed`` (the global RNG is
    restored), behind the Trainer interface of the main job's model: ``forward(pixel_values, labels)``."""

    def __init__(self, *, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                           torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.mlp(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


MODELS = {"tanh": DigitsClassifier, "relu": ReluDigits}


def one_run(rho: float, seed: int, *, epochs: int, directions: int, block_epochs: int,
            model: str = "tanh") -> dict[str, float]:
    """Train once with both callbacks, then the block-wise code; JSON-safe figures of this run."""
    make = MODELS[model]
    train, test = digits_datasets(seed=seed, corrupt_fraction=rho)
    steps = epochs * math.ceil(len(train) / BATCH)
    online = OnlineCodeCallback(code_write_card=False)
    volume = LocalVolumeCallback(n_directions=directions, preconditioner="none", write_card=False,
                                 volume_max_batches=None)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH,
                                 per_device_eval_batch_size=128, learning_rate=1e-3, lr_scheduler_type="constant",
                                 eval_strategy="steps", eval_steps=steps, logging_steps=50, save_strategy="no",
                                 report_to=[], seed=seed, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=make(seed=seed), args=args, train_dataset=train, eval_dataset=test,
                          compute_metrics=_accuracy, callbacks=[online, volume])
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        output = trainer.train()
        train_seconds = time.perf_counter() - start
        final_eval = [e for e in trainer.state.log_history if "eval_loss" in e][-1]
        block_args = TrainingArguments(output_dir=out, num_train_epochs=block_epochs,
                                       per_device_train_batch_size=BATCH, per_device_eval_batch_size=256,
                                       learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], seed=seed,
                                       use_cpu=True, disable_tqdm=True, logging_strategy="no")
        n = len(train)
        boundaries = [20 * 2**k for k in range(6)] + [n]
        start = time.perf_counter()
        blocks = prequential_code_length(lambda: make(seed=seed), train, args=block_args,
                                         boundaries=boundaries, early_stopping=0.1, min_steps=300, order_seed=seed)
        block_seconds = time.perf_counter() - start
    return {
        "rho": rho, "seed": seed, "uniform_bits": output.metrics["train_online_uniform_bits"],
        "online_bits": output.metrics["train_online_code_bits"],
        "lit_online": output.metrics["train_information_transfer_bits"],
        "block_bits": blocks.total_bits, "lit_block": blocks.information_transfer_bits,
        "compression_block": blocks.compression, "selection_bits": blocks.selection_bits,
        "information_content_bits": final_eval.get("eval_information_content_bits", math.nan),
        "volume_ess": final_eval.get("eval_volume_ess", math.nan), "test_accuracy": final_eval["eval_accuracy"],
        "train_seconds": train_seconds, "block_seconds": block_seconds,
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # ties share their average rank
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks)."""
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    return float(np.corrcoef(ra, rb)[0, 1])


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:,.1f}"
    return f"{statistics.mean(values):,.1f} ± {statistics.stdev(values):,.1f}"


def report(runs: list[dict[str, float]]) -> bool:
    """Print the per-ρ table, the correlations and the acceptance checks; True when all checks pass."""
    cols = [("test accuracy", "test_accuracy", 3), ("online code (bits)", "online_bits", 1),
            ("L_IT online (bits)", "lit_online", 1), ("block-wise code (bits)", "block_bits", 1),
            ("L_IT block-wise (bits)", "lit_block", 1), ("compression block-wise", "compression_block", 3),
            ("information content −log2 V (bits)", "information_content_bits", 1)]
    levels = sorted({r["rho"] for r in runs})
    print("| quantity | " + " | ".join(f"ρ = {rho:g}" for rho in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for label, key, digits in cols:
        cells = []
        for rho in levels:
            vals = [r[key] for r in runs if r["rho"] == rho]
            cells.append(f"{statistics.mean(vals):.3f}" if digits == 3 and len(vals) == 1 else
                         (f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if digits == 3
                          else _mean_sd(vals)))
        print(f"| {label} | " + " | ".join(cells) + " |")
    rho = [r["rho"] for r in runs]
    corr = {
        "L_IT online vs ρ": spearman([r["lit_online"] for r in runs], rho),
        "L_IT block-wise vs ρ": spearman([r["lit_block"] for r in runs], rho),
        "information content vs ρ": spearman([r["information_content_bits"] for r in runs], rho),
        "L_IT online vs test accuracy": spearman([r["lit_online"] for r in runs], [r["test_accuracy"] for r in runs]),
        "L_IT block-wise vs test accuracy": spearman([r["lit_block"] for r in runs],
                                                     [r["test_accuracy"] for r in runs]),
        "L_IT online vs information content": spearman([r["lit_online"] for r in runs],
                                                       [r["information_content_bits"] for r in runs]),
    }
    print(f"\nSpearman rank correlations over {len(runs)} runs:")
    for name, value in corr.items():
        print(f"  {name}: {value:+.3f}")
    uniform = statistics.mean(r["uniform_bits"] for r in runs)
    at_one = [r for r in runs if r["rho"] == 1.0]
    worst_online = max((abs(r["lit_online"]) for r in at_one), default=math.nan) / uniform
    worst_block = max((abs(r["lit_block"]) for r in at_one), default=math.nan) / uniform
    mean_online = abs(statistics.mean(r["lit_online"] for r in at_one)) / uniform if at_one else math.nan
    mean_block = abs(statistics.mean(r["lit_block"] for r in at_one)) / uniform if at_one else math.nan
    checks = [
        ("Spearman(L_IT online, ρ) ≤ −0.8", corr["L_IT online vs ρ"] <= -0.8),
        ("Spearman(L_IT block-wise, ρ) ≤ −0.8", corr["L_IT block-wise vs ρ"] <= -0.8),
        ("Spearman(information content, ρ) ≥ +0.5", corr["information content vs ρ"] >= 0.5),
        (f"|mean L_IT online(ρ=1)| ≤ 5 % of the uniform code ({100 * mean_online:.2f} %, worst run "
         f"{100 * worst_online:.2f} %)", mean_online <= 0.05),
        (f"|mean L_IT block-wise(ρ=1)| ≤ 5 % of the uniform code ({100 * mean_block:.2f} %, worst run "
         f"{100 * worst_block:.2f} %)", mean_block <= 0.05),
    ]
    print(f"\nacceptance (uniform code N log2 C = {uniform:,.1f} bits):")
    for name, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    return all(ok for _, ok in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of the main run")
    parser.add_argument("--block_epochs", type=int, default=40, help="epochs per block (and ≥ 300 steps)")
    parser.add_argument("--directions", type=int, default=64, help="directions of the volume measurement")
    parser.add_argument("--model", choices=sorted(MODELS), default="relu",
                        help="relu: a 64-64-64-10 ReLU MLP with PyTorch's default init (the issue's reproduction); "
                             "tanh: the main job's MLP (hfvolume's digits demo)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 epochs, 16 directions")
    parser.add_argument("--out", default=None, help="write the per-run figures as JSON")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.block_epochs, args.directions = 1, 10, 10, 16
    torch.set_num_threads(1)
    runs = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        for rho in NOISE:
            run = one_run(rho, seed, epochs=args.epochs, directions=args.directions, block_epochs=args.block_epochs,
                          model=args.model)
            runs.append(run)
            print(f"ρ={rho:.1f} seed={seed}: L_IT online {run['lit_online']:8.1f}, block {run['lit_block']:8.1f}, "
                  f"information content {run['information_content_bits']:9.0f} bits, test accuracy "
                  f"{run['test_accuracy']:.3f} ({run['train_seconds']:.1f} s + {run['block_seconds']:.1f} s)",
                  flush=True)
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s, 1 thread; {args.model} MLP, main run "
          f"{args.epochs} epochs, blocks ≥ {args.block_epochs} epochs and ≥ 300 steps, {args.directions} directions\n")
    passed = report(runs)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=1)
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
