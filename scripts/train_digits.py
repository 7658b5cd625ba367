"""The main job: train the digits MLP with a ``transformers.Trainer`` and track its information content.

    python scripts/train_digits.py                         # defaults: 40 epochs, 10 evaluations, ~10 s on 2 cores
    python scripts/train_digits.py --n_directions 64 --cutoff 0.01 --output_dir runs/digits
    python scripts/train_digits.py --corrupt_fraction 0.5  # a "poisoned" net: expect more bits
    python scripts/train_digits.py --no_volume             # the same run without the callback (for timing)

Everything is offline: scikit-learn ships the 1,797 digit images. Each evaluation prints the information content;
``output_dir`` receives the Trainer's outputs (model, trainer_state.json), ``hfvolume/series.json`` (the series),
``hfvolume/information_content.png`` (the plot over training steps), the online code length of the training labels
(``hfvolume/code_length.json``; ``hfvolume/information.png`` plots information content and the information transfer
L_IT on one step axis) and a README.md model card with hfvolume's section. Arguments: the fields of
:class:`DigitsRunArguments`, :class:`hfvolume.LocalVolumeConfig` and :class:`hfvolume.OnlineCodeConfig`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from transformers import HfArgumentParser, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hfvolume import LocalVolumeCallback, LocalVolumeConfig, OnlineCodeCallback, OnlineCodeConfig, volume_series
from hfvolume.integrations.demo import DigitsClassifier, digits_datasets


@dataclass(frozen=True)
class DigitsRunArguments:
    output_dir: str = field(default="hfvolume-digits", metadata={"help": "where the outputs go"})
    epochs: int = field(default=40, metadata={"help": "training epochs"})
    evaluations: int = field(default=10, metadata={"help": "evaluations (and measurements) over the run"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    corrupt_fraction: float = field(default=0.0, metadata={"help": "share of training labels randomised"})
    seed: int = field(default=0, metadata={"help": "data split, initialisation and shuffling seed"})
    no_volume: bool = field(default=False, metadata={"help": "train without the callbacks (timing baseline)"})
    no_code: bool = field(default=False, metadata={"help": "train without the online code length (L_IT)"})
    progress: bool = field(default=False, metadata={"help": "show the Trainer's progress bars"})


class PrintEvaluations(TrainerCallback):
    """One line per evaluation: step, eval loss and accuracy, the information content as the bound that holds
    whatever the weights' tails (95%), the estimate, and Pareto k̂ (a ± only where it is meaningful, k̂ < 0.5), and the
    information transfer L_IT of the labels coded so far (the online code's latest training log)."""

    def __init__(self) -> None:
        self.transfer_bits = math.nan

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "information_transfer_bits" in logs:
            self.transfer_bits = logs["information_transfer_bits"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        line = f"step {state.global_step:5d}  eval_loss {metrics.get('eval_loss', math.nan):.4f}"
        if "eval_accuracy" in metrics:
            line += f"  accuracy {metrics['eval_accuracy']:.3f}"
        if metrics.get("eval_volume_failed") == 1.0 or "eval_information_content_bits" not in metrics:
            if "eval_volume_failed" in metrics:
                line += "  information content: measurement failed (see the warning above)"
            print(line, flush=True)
            return
        bound_bits = -metrics["eval_log_volume_lower_bound"] / math.log(2)
        std_bits = metrics.get("eval_volume_log_std", math.nan) / math.log(2)
        k = metrics.get("eval_volume_pareto_k", math.nan)
        spread = f" ± {std_bits:,.0f}" if math.isfinite(std_bits) else ""
        verdict = "k̂ n/a" if math.isnan(k) else f"k̂ {k:.2f}{' unreliable' if k >= 0.7 else ''}"
        line += (f"  information content ≤ {bound_bits:,.0f} bits (95%), estimate "
                 f"{metrics['eval_information_content_bits']:,.0f}{spread} ({verdict}, "
                 f"{metrics['eval_volume_seconds']:.2f} s)")
        if math.isfinite(self.transfer_bits):
            line += f"  L_IT {self.transfer_bits:,.0f} bits"
        print(line, flush=True)


def _accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def run(run_args: DigitsRunArguments, volume: LocalVolumeConfig, code: OnlineCodeConfig | None = None) -> dict:
    """Train, measure at each evaluation, write the outputs; returns a small JSON-safe summary."""
    if run_args.epochs < 1 or run_args.evaluations < 1:
        raise ValueError(f"epochs and evaluations must be ≥ 1, got {run_args.epochs}, {run_args.evaluations}")
    train, evald = digits_datasets(seed=run_args.seed, corrupt_fraction=run_args.corrupt_fraction)
    steps = run_args.epochs * math.ceil(len(train) / run_args.batch_size)
    args = TrainingArguments(
        output_dir=run_args.output_dir,
        max_steps=steps,
        per_device_train_batch_size=run_args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=run_args.learning_rate,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=max(1, steps // run_args.evaluations),
        logging_steps=max(1, steps // run_args.evaluations),
        save_strategy="no",
        report_to=[],
        seed=run_args.seed,
        use_cpu=True,
        disable_tqdm=not run_args.progress,
    )
    callbacks: list[TrainerCallback] = [PrintEvaluations()]
    if not run_args.no_volume:
        callbacks.insert(0, LocalVolumeCallback(volume))
        if not run_args.no_code:
            callbacks.insert(1, OnlineCodeCallback(code or OnlineCodeConfig()))
    trainer = Trainer(model=DigitsClassifier(seed=run_args.seed), args=args, train_dataset=train,
                      eval_dataset=evald, compute_metrics=_accuracy, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # PrintEvaluations prints one readable line per evaluation instead
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()  # a plain nn.Module: the Trainer's own card needs a config, hfvolume's section does not
    out = Path(run_args.output_dir)
    summary = {"train_seconds": seconds, "steps": steps, "output_dir": str(out)}
    if not run_args.no_volume:
        series = volume_series(out)
        summary["series"] = [{"step": p["step"], "information_content_bits": p["information_content_bits"]}
                             for p in series]
        plot = out / "hfvolume" / "information_content.png"
        both = out / "hfvolume" / "information.png"
        print(f"\nseries: {out / 'hfvolume' / 'series.json'}\nplot:   {plot if plot.exists() else '(none)'}"
              + (f"\nplot:   {both} (information content and L_IT)" if both.exists() else "")
              + f"\ncard:   {out / 'README.md'}")
    print(f"training took {seconds:.1f} s ({steps} steps)")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = HfArgumentParser((DigitsRunArguments, LocalVolumeConfig, OnlineCodeConfig),
                              description=__doc__.splitlines()[0])
    run_args, volume, code = parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    return run(run_args, volume, code)


if __name__ == "__main__":
    main()
