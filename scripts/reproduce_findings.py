"""Reproduce the findings of Scherlis & Belrose (arXiv 2501.18812) on models you can run yourself, in one command.

    python scripts/reproduce_findings.py --quick     # ≤ 10 minutes on 2 CPU cores: the README's plots
    python scripts/reproduce_findings.py             # full mode: more seeds, directions and cutoffs (~1 hour)
    python scripts/reproduce_findings.py --tiny --output_dir /tmp/findings   # seconds: the test's smoke run

No network: the models are the 64-64-64-10 digits MLP (scikit-learn's digits) and, in check 3, a tiny GPT-NeoX
trained from scratch on generated token sequences, all trained with a ``transformers.Trainer`` and measured with
hfvolume's public API (``LocalVolumeCallback``, ``estimate_local_volume``) and, when it is installed, the
prequential code (``hfvolume.mdl.OnlineCodeCallback``). Torch runs on one thread by default (``--threads``). The
five checks:

1. training: information content over training steps (the callback's series), several seeds;
2. memorisation: nets trained to the same training loss on clean and 25/50/100% random labels, measured on their
   own training inputs;
3. proposals: isotropic vs Adam vs Fisher vs curvature ("ggn") directions at an equal number of forward passes;
4. cutoff: log volume against log ε, its slope against half the number of bounded directions of the exact
   Gauss–Newton spectrum;
5. prior centring: the prior at the origin vs at initialisation over training (the weight-norm term, and what
   training added).

The output folder (``--output_dir``, default ``hfvolume-output/findings``) receives ``report.md`` (claim, set-up,
figure, numbers across seeds and a verdict per finding), one PNG per finding and ``findings.json`` (every number
the report shows; the report is rendered from it alone). Verdicts follow the rules of :data:`VERDICT_RULES`,
written before the first quick run and printed in the report.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import hfvolume
from hfvolume import LocalVolumeCallback, VolumeResult, estimate_local_volume
from hfvolume.integrations.demo import DigitsClassifier, digits_datasets
from hfvolume.models.gauss_newton import kl_gauss_newton_factor

LN2 = math.log(2.0)
DEFAULT_OUTPUT = "hfvolume-output/findings"
REPORT_FILE, JSON_FILE = "report.md", "findings.json"
FIGURES = {"training": "training.png", "memorisation": "memorisation.png", "proposals": "proposals.png",
           "cutoff": "cutoff.png", "prior_centring": "prior_centring.png"}
PROPOSALS = ("isotropic", "adam", "fisher", "ggn")
MIXTURE = 0.25  # isotropic share of every non-isotropic proposal (the callback's default with Adam state)
FISHER_SETUP_PASSES = 2  # the diagonal Fisher: one forward and one backward pass over the data (1 label sample)
VERDICTS = ("reproduced", "not reproduced", "inconclusive")
RULES_HISTORY = ("The rules were written into the script before the first quick run; single-seed exploratory runs "
                 "had been made while designing the experiments. Finding 3's language model was added after that "
                 "first run had shown the digits MLP alone to be inconclusive; the combined rule it is judged by can "
                 "only make a verdict stricter.")
PAPER = "Scherlis & Belrose, *Estimating the Probability of Sampling a Trained Neural Network at Random* " \
        "(arXiv 2501.18812)"

# Written before the first quick run (see RULES_HISTORY); the report prints them.
VERDICT_RULES = {
    "sign": "**reproduced** if the effect has the claimed sign on every seed and its mean exceeds twice its "
            "standard deviation across seeds; **not reproduced** if it has the opposite sign on every seed with "
            "the same margin; **inconclusive** otherwise (including fewer than two seeds).",
    "slope": "**reproduced** if, for every proposal and seed, the fitted slope of log volume against log ε lies "
             "within a factor 2 of the quadratic model's slope (half the number of bounded directions, averaged "
             "over the swept cutoffs); **not reproduced** if every ratio lies outside that band on the same side; "
             "**inconclusive** otherwise.",
    "combined": "for a finding with several parts (two models, or two claims), each judged by the sign rule: "
                "**reproduced** if every part is reproduced; **not reproduced** if any part is not reproduced; "
                "**inconclusive** otherwise.",
}


@dataclass(frozen=True)
class Mode:
    """Sizes of one run of the script. Steps and epochs count optimizer steps and passes over the 1,348 training
    digits; ``proposal_budget`` counts forward passes over the measured data; cutoffs are in nats (KL)."""

    name: str
    seeds: tuple[int, ...]
    epochs: int  # finding 1 and 5: training length
    evaluations: int  # measurements over that training
    n_directions: int  # directions per measurement (findings 1, 2, 4, 5)
    fractions: tuple[float, ...]  # finding 2: shares of random training labels
    memorise_lr: float
    memorise_target_loss: float  # nats: training stops at this mean training loss
    memorise_max_epochs: int
    memorise_examples: int | None  # training inputs measured (None: all)
    proposal_budget: int  # finding 3: forward passes per proposal, set-up included
    proposals: tuple[str, ...]  # finding 3: the proposals run (the others are reported as not run)
    proposal_examples: int | None  # eval inputs measured in finding 3 (None: all 449)
    lm_steps: int  # finding 3: training steps of the tiny language model (batches of 16 sequences)
    lm_eval_sequences: int  # held-out generated sequences it is measured on
    cutoffs: tuple[float, ...]  # finding 4
    sweep_examples: int  # eval inputs of the Gauss–Newton spectrum and of the sweep
    sweep_proposals: tuple[str, ...]


MODES = {
    "tiny": Mode("tiny", seeds=(0, 1), epochs=2, evaluations=2, n_directions=8, fractions=(0.0, 1.0),
                 memorise_lr=1e-2, memorise_target_loss=0.05, memorise_max_epochs=2, memorise_examples=64,
                 proposal_budget=60, proposals=PROPOSALS[:3], proposal_examples=32, lm_steps=5,
                 lm_eval_sequences=4, cutoffs=(1e-4, 1e-3, 1e-2), sweep_examples=16, sweep_proposals=("isotropic",)),
    "quick": Mode("quick", seeds=(0, 1, 2), epochs=40, evaluations=10, n_directions=64,
                  fractions=(0.0, 0.25, 0.5, 1.0), memorise_lr=1e-2, memorise_target_loss=0.05,
                  memorise_max_epochs=150, memorise_examples=None, proposal_budget=800, proposals=PROPOSALS,
                  proposal_examples=None, lm_steps=150, lm_eval_sequences=16,
                  cutoffs=tuple(float(10 ** e) for e in np.arange(-5.0, -1.99, 0.5)),
                  sweep_examples=256, sweep_proposals=("isotropic", "adam")),
    "full": Mode("full", seeds=(0, 1, 2, 3, 4), epochs=40, evaluations=20, n_directions=256,
                 fractions=(0.0, 0.25, 0.5, 1.0), memorise_lr=1e-2, memorise_target_loss=0.05,
                 memorise_max_epochs=300, memorise_examples=None, proposal_budget=3200, proposals=PROPOSALS,
                 proposal_examples=None, lm_steps=150, lm_eval_sequences=16,
                 cutoffs=tuple(float(10 ** e) for e in np.arange(-6.0, -0.99, 0.5)), sweep_examples=449,
                 sweep_proposals=("isotropic", "adam", "ggn")),
}


# ------------------------------------------------------------------------------------------------ small helpers
class Progress:
    """Progress lines on stdout, with the seconds since the start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {message}", flush=True)


def bits(nats: float) -> float:
    """Information content in bits of a log volume in nats (−log₂ V)."""
    return -float(nats) / LN2


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, standard deviation across seeds (ddof 1; NaN for one value), min, max and the values themselves."""
    arr = np.asarray(values, dtype=np.float64)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    return {"values": [float(v) for v in arr], "mean": float(arr.mean()), "sd": sd,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}


def sign_verdict(effects: Sequence[float], *, sign: int = 1) -> str:
    """:data:`VERDICT_RULES` ["sign"] for per-seed effects whose claimed sign is ``sign`` (+1 or −1)."""
    arr = np.asarray(effects, dtype=np.float64) * sign
    if arr.size < 2 or not np.all(np.isfinite(arr)):
        return "inconclusive"
    mean, sd = float(arr.mean()), float(arr.std(ddof=1))
    if np.all(arr > 0) and mean > 2 * sd:
        return "reproduced"
    if np.all(arr < 0) and -mean > 2 * sd:
        return "not reproduced"
    return "inconclusive"


def ratio_verdict(ratios: Sequence[float], *, band: float = 2.0) -> str:
    """:data:`VERDICT_RULES` ["slope"]: ratios of fitted to predicted slope, all within [1/band, band]?"""
    arr = np.asarray(ratios, dtype=np.float64)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        return "inconclusive"
    if np.all((arr >= 1 / band) & (arr <= band)):
        return "reproduced"
    if np.all(arr > band) or np.all(arr < 1 / band):
        return "not reproduced"
    return "inconclusive"


def combined_verdict(verdicts: Sequence[str]) -> str:
    """:data:`VERDICT_RULES` ["combined"]: the verdict of a finding from those of its parts."""
    if "not reproduced" in verdicts:
        return "not reproduced"
    return "reproduced" if verdicts and all(v == "reproduced" for v in verdicts) else "inconclusive"


def effect(name: str, unit: str, values: Sequence[float], *, verdict: str | None = None, digits: int = 0,
           decides: bool = True, per: str = "seed") -> dict[str, Any]:
    """One measured effect across seeds: its :func:`spread`, unit, the digits the report shows, its verdict (the
    sign rule with a positive claimed sign unless given), whether it decides the finding's verdict, and what one
    value is (``per``: one seed, or one proposal and seed)."""
    return {"name": name, "unit": unit, "digits": digits, "decides": decides, "per": per, **spread(values),
            "verdict": sign_verdict(values) if verdict is None else verdict}


def information_transfer_status(enabled: bool) -> dict[str, Any]:
    """Whether the prequential information transfer L_IT can be added to findings 1 and 2."""
    if not enabled:
        return {"included": False, "reason": "switched off with --no_information_transfer"}
    try:
        from hfvolume.mdl import OnlineCodeCallback  # noqa: F401
    except ImportError as err:
        return {"included": False, "reason": f"hfvolume.mdl is not available ({err})"}
    return {"included": True, "reason": "hfvolume.mdl.OnlineCodeCallback (first-pass online code, uniform "
                                        "reference: L_IT = N·log₂10 − L_online)"}


def _inputs(dataset: Any, limit: int | None) -> torch.Tensor:
    """The ``[N, 64]`` float32 pixel inputs of a digits ``datasets.Dataset`` (the first ``limit`` rows)."""
    rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    return torch.as_tensor(np.asarray(rows["pixel_values"]), dtype=torch.float32)


def _batches(x: torch.Tensor, size: int = 128) -> list[tuple[torch.Tensor]]:
    """Inputs as a list of 1-tuples ``([b, 64],)``: the model is called as ``model(pixel_values)``."""
    return [(x[i : i + size],) for i in range(0, len(x), size)]


def _rms_of(model: torch.nn.Module) -> float:
    """RMS of the trainable weights: the prior's σ when taken at initialisation (the callback's rule)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters() if p.requires_grad])
    return float(flat.pow(2).mean().sqrt())


def _volume_point(result: VolumeResult) -> dict[str, float]:
    """The numbers of one estimate that the report uses (nats unless named bits)."""
    return {"log_volume": result.log_volume, "lower_bound": result.log_volume_lower_bound,
            "bound_bits": bits(result.log_volume_lower_bound), "estimate_bits": bits(result.log_volume),
            "pareto_k": float(result.pareto_k), "ess": float(result.ess), "norm_term": float(result.norm_term),
            "forward_passes": int(result.forward_passes), "n_directions": int(result.n_directions)}


# ------------------------------------------------------------------------------------------------- training
def _training_args(output_dir: str, *, seed: int, max_steps: int, lr: float, eval_steps: int | None,
                   logging_steps: int, batch_size: int = 64) -> TrainingArguments:
    """Trainer settings shared by every run: CPU, constant learning rate, no checkpoints, no trackers."""
    return TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=128,
        learning_rate=lr, lr_scheduler_type="constant", eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps, logging_steps=logging_steps, save_strategy="no", report_to=[], seed=seed,
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )


def _trainer(model: torch.nn.Module, args: TrainingArguments, train: Any, evald: Any, callbacks: list[Any]) -> Trainer:
    """A Trainer without the console printer (the script prints its own progress lines)."""
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evald, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _code_callback(lit: Mapping[str, Any]) -> list[Any]:
    """``[OnlineCodeCallback]`` when L_IT is included, else ``[]``."""
    if not lit["included"]:
        return []
    from hfvolume.mdl import OnlineCodeCallback

    return [OnlineCodeCallback(code_write_card=False)]


def _lit_series(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """L_IT (bits) at each training log while the first pass lasts, and its final value."""
    points = [(int(e["step"]), float(e["information_transfer_bits"]), float(e.get("online_code_complete", 0.0)))
              for e in log_history if "information_transfer_bits" in e]
    if not points:
        return None
    first_pass = [p for p in points if p[2] == 0.0] + [p for p in points if p[2] == 1.0][:1]
    return {"steps": [p[0] for p in first_pass], "bits": [p[1] for p in first_pass], "final_bits": points[-1][1],
            "complete": bool(points[-1][2] == 1.0)}


@dataclass(frozen=True)
class TrainedRun:
    """One Trainer run of finding 1/5: the callback's series, L_IT, and the final model and optimizer."""

    seed: int
    prior_mean: str
    series: list[dict[str, Any]]
    sigma: float
    lit: dict[str, Any] | None
    model: torch.nn.Module
    optimizer: Any
    eval_inputs: torch.Tensor


def train_with_callback(*, seed: int, mode: Mode, prior_mean: str, lit: Mapping[str, Any]) -> TrainedRun:
    """Train the digits MLP for ``mode.epochs`` with ``LocalVolumeCallback`` measuring at each evaluation."""
    train, evald = digits_datasets(seed=seed)
    per_epoch = math.ceil(len(train) / 64)
    steps = mode.epochs * per_epoch
    callback = LocalVolumeCallback(n_directions=mode.n_directions, prior_mean=prior_mean, write_card=False,
                                   direction_seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = _training_args(tmp, seed=seed, max_steps=steps, lr=1e-3,
                              eval_steps=max(1, steps // mode.evaluations), logging_steps=max(1, per_epoch // 4))
        trainer = _trainer(DigitsClassifier(seed=seed), args, train, evald, [callback, *_code_callback(lit)])
        trainer.train()
    model = trainer.model.eval()
    return TrainedRun(seed, prior_mean, list(callback.series), float(callback.sigma),
                      _lit_series(trainer.state.log_history) if lit["included"] else None, model, trainer.optimizer,
                      _inputs(evald, None))


# --------------------------------------------------------------------------------------- finding 1: training
def finding_training(runs: Sequence[TrainedRun], mode: Mode) -> dict[str, Any]:
    """Information content (95% bound) over training steps, per seed; effect: last minus first measurement."""
    per_seed = []
    for run in runs:
        s = run.series
        per_seed.append({
            "seed": run.seed, "sigma": run.sigma, "steps": [int(p["step"]) for p in s],
            "bound_bits": [bits(p["log_volume_lower_bound"]) for p in s],
            "estimate_bits": [float(p["information_content_bits"]) for p in s],
            "pareto_k": [float(p["pareto_k"]) for p in s], "ess": [float(p["ess"]) for p in s],
            "norm_term": [float(p["norm_term"]) for p in s], "lit": run.lit,
        })
    rise = [p["bound_bits"][-1] - p["bound_bits"][0] for p in per_seed]
    rising_steps = [float(np.mean(np.diff(p["bound_bits"]) > 0)) if len(p["steps"]) > 1 else math.nan
                    for p in per_seed]
    effects = [effect("rise of the information-content bound, last minus first measurement", "bits", rise)]
    lits = [p["lit"]["final_bits"] for p in per_seed if p["lit"]]
    return {
        "number": 1, "key": "training", "title": "Information content rises during training",
        "claim": "The information content of a network (−log₂ of its local volume) rises as training goes on.",
        "setup": (f"`Trainer` + `LocalVolumeCallback` (defaults: KL behaviour, ε = 0.01 nats, Gaussian prior at the "
                  f"origin with σ = RMS of the initial weights, Adam proposal with a 25% isotropic mixture, "
                  f"{mode.n_directions} directions) on the digits MLP (D = 8,970), {mode.epochs} epochs of Adam at "
                  f"lr 1e-3, {mode.evaluations} measurements on the 449 eval digits; seeds {list(mode.seeds)} "
                  "(data split, initialisation, shuffling and directions)."),
        "figure": FIGURES["training"], "rule": "sign", "per_seed": per_seed, "effects": effects,
        "fraction_of_rising_steps": spread(rising_steps),
        "first_bound_bits": spread([p["bound_bits"][0] for p in per_seed]),
        "last_bound_bits": spread([p["bound_bits"][-1] for p in per_seed]),
        "pareto_k_median": float(np.median([k for p in per_seed for k in p["pareto_k"]])),
        "information_transfer_bits": spread(lits) if lits else None,
        "verdict": effects[0]["verdict"],
    }


# ---------------------------------------------------------------------------------- finding 2: memorisation
class StopAtLoss(TrainerCallback):
    """Stop training once the logged mean training loss is at most ``target`` (nats)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and logs["loss"] <= self.target:
            control.should_training_stop = True
        return control


def train_to_loss(*, seed: int, fraction: float, mode: Mode, lit: Mapping[str, Any]) -> dict[str, Any]:
    """Train on labels with ``fraction`` randomised until the mean training loss reaches the target; measure the
    volume on the training inputs (same σ rule as the callback: RMS of the initial weights; Adam proposal)."""
    train, _ = digits_datasets(seed=seed, corrupt_fraction=fraction)
    per_epoch = math.ceil(len(train) / 64)
    model = DigitsClassifier(seed=seed)
    sigma = _rms_of(model)
    with tempfile.TemporaryDirectory() as tmp:
        args = _training_args(tmp, seed=seed, max_steps=mode.memorise_max_epochs * per_epoch, lr=mode.memorise_lr,
                              eval_steps=None, logging_steps=per_epoch)
        trainer = _trainer(model, args, train, None, [StopAtLoss(mode.memorise_target_loss), *_code_callback(lit)])
        trainer.train()
    model.eval()
    x, y = _inputs(train, None), torch.as_tensor(np.asarray(train["labels"]))
    with torch.no_grad():
        loss = float(model(x, labels=y).loss)
    measured = x if mode.memorise_examples is None else x[: mode.memorise_examples]
    result = estimate_local_volume(model, _batches(measured, 512), sigma=sigma, n_directions=mode.n_directions,
                                   preconditioner="adam", optimizer=trainer.optimizer, mixture=MIXTURE, seed=seed,
                                   progress=False)
    lit_series = _lit_series(trainer.state.log_history) if lit["included"] else None
    return {"seed": seed, "fraction": fraction, "train_loss": loss, "steps": int(trainer.state.global_step),
            "epochs": trainer.state.global_step / per_epoch, "reached_target": loss <= 2 * mode.memorise_target_loss,
            "sigma": sigma, "n_measured": int(len(measured)), **_volume_point(result),
            "beyond_norm_bits": bits(result.log_volume_lower_bound - result.norm_term),
            "lit_bits": lit_series["final_bits"] if lit_series else None}


def finding_memorisation(mode: Mode, lit: Mapping[str, Any], log: Progress) -> dict[str, Any]:
    """Bits per label-corruption level over seeds; effect: fully random minus clean labels."""
    rows = []
    for seed in mode.seeds:
        for fraction in mode.fractions:
            row = train_to_loss(seed=seed, fraction=fraction, mode=mode, lit=lit)
            log(f"finding 2: seed {seed}, {fraction:.0%} random labels: loss {row['train_loss']:.3f} after "
                f"{row['epochs']:.0f} epochs, information content ≤ {row['bound_bits']:,.0f} bits")
            rows.append(row)
    by_fraction = {}
    for fraction in mode.fractions:
        sel = [r for r in rows if r["fraction"] == fraction]
        by_fraction[f"{fraction:g}"] = {k: spread([r[k] for r in sel]) for k in
                                        ("bound_bits", "beyond_norm_bits", "train_loss", "epochs", "pareto_k")}
        if lit["included"]:
            by_fraction[f"{fraction:g}"]["lit_bits"] = spread([r["lit_bits"] for r in sel])
    lo, hi = min(mode.fractions), max(mode.fractions)

    def gap(key: str) -> list[float]:
        return [next(r[key] for r in rows if r["seed"] == s and r["fraction"] == hi)
                - next(r[key] for r in rows if r["seed"] == s and r["fraction"] == lo) for s in mode.seeds]

    effects = [effect(f"information-content bound at {hi:.0%} random labels minus at {lo:.0%}", "bits",
                      gap("bound_bits")),
               effect("the same without the weight-norm term", "bits", gap("beyond_norm_bits"), decides=False)]
    if lit["included"]:
        effects.append(effect(f"L_IT at {hi:.0%} random labels minus at {lo:.0%}", "bits", gap("lit_bits"),
                              decides=False, verdict="not judged"))
    return {
        "number": 2, "key": "memorisation", "title": "Memorising networks have smaller local volume",
        "claim": "Networks trained on corrupted (random) labels, which memorise, have a smaller local volume — more "
                 "bits — than networks trained to the same loss on clean labels, which generalise.",
        "setup": (f"The digits MLP trained with a `Trainer` (Adam, lr {mode.memorise_lr:g}, batch 64) on clean labels "
                  f"and on {', '.join(f'{f:.0%}' for f in mode.fractions if f > 0)} random training labels, until "
                  f"the mean training loss of an epoch is ≤ {mode.memorise_target_loss} nats (at most "
                  f"{mode.memorise_max_epochs} epochs). Volume measured with `estimate_local_volume` on the nets' "
                  f"own training inputs (KL, ε = 0.01, σ = RMS of the initial weights, prior at the origin, Adam "
                  f"proposal with a 25% isotropic mixture, {mode.n_directions} directions); seeds "
                  f"{list(mode.seeds)}."),
        "figure": FIGURES["memorisation"], "rule": "sign", "per_seed": rows, "by_fraction": by_fraction,
        "effects": effects, "verdict": effects[0]["verdict"],
    }


# ------------------------------------------------------------------------------------- finding 3: proposals
@dataclass(frozen=True)
class Subject:
    """A trained model measured in finding 3: final weights, optimizer, eval batches and the prior's σ (the RMS of
    its initial weights)."""

    model_name: str
    seed: int
    model: torch.nn.Module
    optimizer: Any
    batches: list[Any]
    sigma: float


def digits_subject(run: TrainedRun, mode: Mode) -> Subject:
    """Finding 3's view of a finding-1 run: the final MLP on (the first ``proposal_examples``) eval digits."""
    x = run.eval_inputs if mode.proposal_examples is None else run.eval_inputs[: mode.proposal_examples]
    return Subject("digits MLP", run.seed, run.model, run.optimizer, _batches(x), run.sigma)


def generated_sequences(seed: int, *, n: int = 256, length: int = 32, vocab: int = 64) -> torch.Tensor:
    """``[n, length]`` token ids of generated text with a learnable rule: arithmetic progressions mod ``vocab``
    (random start, step 1–3), so each next token is the previous one plus the sequence's step."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=gen)
    steps = torch.randint(1, 4, (n, 1), generator=gen)
    return (starts + steps * torch.arange(length)) % vocab


def train_tiny_lm(*, seed: int, mode: Mode) -> Subject:
    """A 2-layer GPT-NeoX (D = 75,264) trained from scratch with the Trainer (AdamW, lr 3e-3, batches of 16) on
    240 generated sequences; measured on ``mode.lm_eval_sequences`` held-out ones."""
    from datasets import Dataset
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    sigma = _rms_of(model)
    seqs = generated_sequences(seed)
    train = Dataset.from_dict({"input_ids": seqs[:240].tolist(), "labels": seqs[:240].tolist()})
    train.set_format("torch")
    with tempfile.TemporaryDirectory() as tmp:
        args = _training_args(tmp, seed=seed, max_steps=mode.lm_steps, lr=3e-3, eval_steps=None,
                              logging_steps=max(1, mode.lm_steps), batch_size=16)
        trainer = _trainer(model, args, train, None, [])
        trainer.train()
    model.eval()
    held_out = seqs[240 : 240 + mode.lm_eval_sequences]
    batches = [{"input_ids": held_out, "attention_mask": torch.ones_like(held_out)}]
    return Subject("tiny LM", seed, model, trainer.optimizer, batches, sigma)


def _prefix(result: VolumeResult, n: int, *, setup_passes: int) -> VolumeResult:
    """The estimate from the first ``n`` directions only (directions depend on (seed, i) alone, so this is what
    a run with ``n_directions=n`` gives), its forward passes counting ``setup_passes`` for the proposal."""
    est = np.asarray(result.log_estimates[:n], dtype=np.float64)
    lv = float(result.running_log_volume[n - 1])
    top = float(est.max())
    lse1 = top + math.log(np.exp(est - top).sum())
    lse2 = 2 * top + math.log(np.exp(2 * (est - top)).sum())
    markov = result.log_volume - result.log_volume_lower_bound
    cut = {name: getattr(result, name)[:n] for name in
           ("log_estimates", "radii", "deltas", "log_weights", "flags", "evaluations", "nonfinite")}
    return dataclasses.replace(
        result, log_volume=lv, information_content_bits=bits(lv), log_volume_lower_bound=lv - markov,
        ess=float(math.exp(2 * lse1 - lse2)), log_volume_std=math.nan, n_directions=n,
        forward_passes=int(setup_passes + 1 + sum(result.evaluations[:n])), **cut)


def _proposal_kwargs(name: str, optimizer: Any) -> dict[str, Any]:
    """``estimate_local_volume`` arguments of a proposal (25% isotropic directions in every non-isotropic one)."""
    if name == "isotropic":
        return {"preconditioner": None}
    return {"preconditioner": name, "mixture": MIXTURE, **({"optimizer": optimizer} if name == "adam" else {})}


def _proposal_run(name: str, subject: Subject, mode: Mode) -> tuple[VolumeResult, int]:
    """One proposal's estimate with more directions than the budget needs, and its set-up forward passes."""
    result = estimate_local_volume(subject.model, subject.batches, sigma=subject.sigma,
                                   n_directions=max(2, mode.proposal_budget // 2), seed=subject.seed, progress=False,
                                   **_proposal_kwargs(name, subject.optimizer))
    setup = result.forward_passes - sum(result.evaluations) - 1  # "ggn" adds its curvature's passes
    return result, setup + (FISHER_SETUP_PASSES if name == "fisher" else 0)


def compare_proposals(subject: Subject, mode: Mode) -> list[dict[str, Any]]:
    """Every proposal at ``mode.proposal_budget`` forward passes on one trained model (rows of the JSON)."""
    rows = []
    for name in PROPOSALS:
        row: dict[str, Any] = {"model": subject.model_name, "seed": subject.seed, "proposal": name,
                               "available": True, "reason": ""}
        if name not in mode.proposals:
            rows.append({**row, "available": False, "reason": f"not run in the {mode.name} mode"})
            continue
        try:
            result, setup = _proposal_run(name, subject, mode)
        except Exception as err:  # noqa: BLE001 - "ggn" may not exist yet: the report says why it is missing
            if name != "ggn":
                raise
            rows.append({**row, "available": False, "reason": f"{type(err).__name__}: {err}"})
            continue
        spent = setup + 1 + np.cumsum(result.evaluations)
        n = int(np.searchsorted(spent, mode.proposal_budget, side="right"))
        if n < 1:
            rows.append({**row, "available": False, "reason": f"its set-up alone costs {setup} forward passes"})
            continue
        cut = _prefix(result, n, setup_passes=setup)
        curve = {"forward_passes": [int(v) for v in spent[:n]],
                 "running_log_volume": [float(v) for v in cut.running_log_volume]}
        rows.append({**row, **_volume_point(cut), "setup_passes": int(setup), "curve": curve})
    return rows


def _gains(rows: Sequence[Mapping[str, Any]], model_name: str, seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per proposal: its lower bound minus isotropic's on the same net, per seed (only where it ran)."""
    out = {}
    for name in PROPOSALS[1:]:
        values = []
        for seed in seeds:
            pick = {r["proposal"]: r for r in rows if r["seed"] == seed and r["model"] == model_name}
            if pick[name]["available"]:
                values.append(pick[name]["lower_bound"] - pick["isotropic"]["lower_bound"])
        if values:
            out[name] = {**spread(values), "verdict": sign_verdict(values)}
    return out


def finding_proposals(subjects: Sequence[Subject], mode: Mode, log: Progress) -> dict[str, Any]:
    """Lower bounds per proposal at equal forward passes on each model; effects: Adam minus isotropic."""
    rows: list[dict[str, Any]] = []
    for subject in subjects:
        new = compare_proposals(subject, mode)
        if subject.seed != mode.seeds[0]:  # the figure draws the first seed's running estimates only
            new = [{k: v for k, v in r.items() if k != "curve"} for r in new]
        rows += new
        got = {r["proposal"]: r.get("lower_bound") for r in new}
        log(f"finding 3: {subject.model_name}, seed {subject.seed}: " + ", ".join(
            f"{k} {v:,.0f}" if v is not None else f"{k} n/a" for k, v in got.items()) + " nats (95% lower bounds)")
    models = list(dict.fromkeys(s.model_name for s in subjects))
    gains = {m: _gains(rows, m, mode.seeds) for m in models}
    effects = [effect(f"lower bound, Adam proposal minus isotropic, {m}", "nats", gains[m]["adam"]["values"])
               for m in models]
    return {
        "number": 3, "key": "proposals", "title": "Importance sampling with optimizer state raises the estimate",
        "claim": "Sampling directions from the optimizer's state (importance sampling) gives a larger log-volume "
                 "estimate than isotropic sampling, at the same cost.",
        "setup": (f"Two models, seeds {list(mode.seeds)}: the final digits MLPs of finding 1 on the eval digits, "
                  f"and a tiny GPT-NeoX language model (2 layers, width 64, D = 75,264) trained from scratch with "
                  f"the `Trainer` ({mode.lm_steps} AdamW steps, lr 3e-3) on generated text (arithmetic "
                  f"progressions of tokens mod 64), measured on {mode.lm_eval_sequences} held-out sequences. KL, "
                  f"ε = 0.01, prior at the origin with σ = RMS of the initial weights. Each proposal gets "
                  f"{mode.proposal_budget} forward passes, its set-up included (Fisher: {FISHER_SETUP_PASSES} "
                  "passes; ggn: its curvature's passes; Adam's state is a by-product of training): it is run with "
                  "more directions than that and its estimate is taken over the first directions that fit. Adam, "
                  "Fisher and ggn keep 25% isotropic directions. Effect: the 95% lower bound of the log volume "
                  "minus isotropic's, on the same net."),
        "figure": FIGURES["proposals"], "rule": "combined", "per_seed": rows, "models": models, "gains": gains,
        "ggn_available": all(r["available"] for r in rows if r["proposal"] == "ggn"),
        "unavailable": sorted({r["reason"] for r in rows if not r["available"]}),
        "effects": effects, "verdict": combined_verdict([e["verdict"] for e in effects]),
    }


# ----------------------------------------------------------------------------------------- finding 4: cutoff
def gauss_newton_spectrum(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Eigenvalues ``[N·C]`` (descending, ≥ 0) of the exact Gauss–Newton matrix G = AᵀA of the mean KL over the
    inputs ``x``: G is the Hessian of the behaviour at the trained weights. Computed from the small Gram matrix
    AAᵀ, which has the same non-zero eigenvalues."""
    factor = kl_gauss_newton_factor(model, x)
    eigenvalues = torch.linalg.eigvalsh(factor @ factor.T).numpy()[::-1]
    return np.clip(eigenvalues, 0.0, None)


def quadratic_model(eigenvalues: np.ndarray, cutoffs: Sequence[float], sigma: float) -> dict[str, Any]:
    """What the quadratic model {½ xᵀGx ≤ ε} predicts under a Gaussian prior of scale σ.

    Along eigenvector i the region reaches r_i = √(2ε/λ_i). It is *bounded* there — the cutoff, not the prior,
    limits it — when r_i < σ, i.e. λ_i > 2ε/σ². Each bounded direction adds ½ log(2ε/(λ_i σ²)) to log V, so the
    local slope d log V / d log ε is (number of bounded directions)/2; the predicted slope over the sweep is the
    least-squares slope of Σ_i min(0, ½ log(2ε/(λ_i σ²))) against log ε (nats per unit of log ε)."""
    positive = eigenvalues[eigenvalues > eigenvalues[0] * 1e-10] if eigenvalues[0] > 0 else eigenvalues[:0]
    cut = np.asarray(cutoffs, dtype=np.float64)
    bounded = [int((positive > 2 * c / sigma**2).sum()) for c in cut]
    curve = [float(np.minimum(0.0, 0.5 * np.log(2 * c / (positive * sigma**2))).sum()) for c in cut]
    slope = float(np.polyfit(np.log(cut), curve, 1)[0])
    return {"rank": int(positive.size), "bounded": bounded, "curve": curve, "slope": slope,
            "thresholds": [float(2 * c / sigma**2) for c in cut]}


def cutoff_sweep(run: TrainedRun, mode: Mode) -> dict[str, Any]:
    """log V at each cutoff for each sweep proposal, the fitted slopes, and the quadratic model's prediction."""
    x = run.eval_inputs[: mode.sweep_examples]
    spectrum = gauss_newton_spectrum(run.model, x)
    model = quadratic_model(spectrum, mode.cutoffs, run.sigma)
    log_cut = np.log(np.asarray(mode.cutoffs))
    estimates: dict[str, Any] = {}
    for name in mode.sweep_proposals:
        try:
            points = [_volume_point(estimate_local_volume(
                run.model, _batches(x), cutoff=float(c), sigma=run.sigma, n_directions=mode.n_directions,
                seed=run.seed, progress=False, **_proposal_kwargs(name, run.optimizer))) for c in mode.cutoffs]
        except Exception as err:  # noqa: BLE001 - "ggn" may not exist yet: the report says why it is missing
            if name != "ggn":
                raise
            estimates[name] = {"available": False, "reason": f"{type(err).__name__}: {err}"}
            continue
        slope = float(np.polyfit(log_cut, [p["log_volume"] for p in points], 1)[0])
        ratio = slope / model["slope"] if model["slope"] > 0 else math.nan
        estimates[name] = {"available": True, "points": points, "slope": slope, "ratio": ratio}
    return {"seed": run.seed, "sigma": run.sigma, "n_examples": int(len(x)), "n_params": int(
        sum(p.numel() for p in run.model.parameters())), "top_eigenvalues": [float(v) for v in spectrum[:10]],
        "quadratic": model, "estimates": estimates, "spectrum": [float(f"{v:.6g}") for v in spectrum[: model["rank"]]]}


def finding_cutoff(runs: Sequence[TrainedRun], mode: Mode, log: Progress) -> dict[str, Any]:
    """Slopes of log V against log ε over seeds, against the quadratic model's."""
    sweeps = []
    for i, run in enumerate(runs):
        sweep = cutoff_sweep(run, mode)
        if i > 0:
            sweep.pop("spectrum")  # the figure draws the first seed's spectrum; the JSON keeps its counts only
        sweeps.append(sweep)
        slopes = ", ".join(f"{k} {v['slope']:,.0f}" for k, v in sweep["estimates"].items() if v["available"])
        log(f"finding 4: seed {run.seed}: fitted slopes {slopes}; quadratic model {sweep['quadratic']['slope']:,.1f} "
            f"(rank of G {sweep['quadratic']['rank']})")
    names = [n for n in mode.sweep_proposals if all(s["estimates"][n]["available"] for s in sweeps)]
    ratios = [s["estimates"][n]["ratio"] for n in names for s in sweeps]
    of_half_d = [s["estimates"][n]["slope"] / (s["n_params"] / 2) for n in names for s in sweeps]
    decades = math.log10(max(mode.cutoffs) / min(mode.cutoffs))
    return {
        "number": 4, "key": "cutoff", "title": "Log volume against the cutoff: slope and effective dimension",
        "claim": "Log volume grows with log ε with a slope set by the region's effective dimension: under the "
                 "quadratic model, slope ≈ (number of bounded directions)/2.",
        "setup": (f"The final nets of finding 1, measured on the first {mode.sweep_examples} eval digits at "
                  f"{len(mode.cutoffs)} cutoffs from {min(mode.cutoffs):.0e} to {max(mode.cutoffs):.0e} nats "
                  f"({decades:.1f} decades), {mode.n_directions} directions, proposals {', '.join(names)} (prior "
                  "at the origin, σ = RMS of the initial weights). The slope is a least-squares fit of log V "
                  "(nats) against ln ε. The effective dimension comes from the exact Gauss–Newton matrix G of the "
                  "mean KL on the same inputs (`kl_gauss_newton_factor`, eigenvalues from the Gram matrix AAᵀ): "
                  "a direction is *bounded* when the region ends inside the prior's scale along it, λ > 2ε/σ²; "
                  "the predicted slope is the least-squares slope of Σ min(0, ½ ln(2ε/(λσ²))), the average of "
                  "(bounded directions)/2 over the sweep."),
        "figure": FIGURES["cutoff"], "rule": "slope", "per_seed": sweeps, "proposals": names,
        "cutoffs": [float(c) for c in mode.cutoffs],
        "unavailable": sorted({v["reason"] for s in sweeps for v in s["estimates"].values() if not v["available"]}),
        "predicted_slope": spread([s["quadratic"]["slope"] for s in sweeps]),
        "slopes": {n: spread([s["estimates"][n]["slope"] for s in sweeps]) for n in names},
        "effects": [effect("fitted slope / predicted slope", "", ratios, verdict=ratio_verdict(ratios),
                           per=f"proposal ({', '.join(names)}) and seed"),
                    effect("fitted slope / (D/2), the slope if every parameter direction were bounded", "",
                           of_half_d, digits=2, decides=False, verdict="not judged",
                           per=f"proposal ({', '.join(names)}) and seed")],
        "verdict": ratio_verdict(ratios),
    }


# -------------------------------------------------------------------------------- finding 5: prior centring
def finding_prior_centring(origin: Sequence[TrainedRun], initial: Sequence[TrainedRun], mode: Mode) -> dict[str, Any]:
    """The same training runs measured with the prior at the origin and at initialisation."""
    per_seed = []
    for o, i in zip(origin, initial):
        per_seed.append({
            "seed": o.seed, "steps": [int(p["step"]) for p in o.series],
            "origin_bound_bits": [bits(p["log_volume_lower_bound"]) for p in o.series],
            "origin_norm_bits": [bits(p["norm_term"]) for p in o.series],
            "origin_norm_share": [p["norm_term"] / p["log_volume"] for p in o.series],
            "initial_bound_bits": [bits(p["log_volume_lower_bound"]) for p in i.series],
            "initial_norm_bits": [bits(p["norm_term"]) for p in i.series],
            "initial_pareto_k": [float(p["pareto_k"]) for p in i.series],
        })
    share = [p["origin_norm_share"][-1] for p in per_seed]
    rise = [p["initial_bound_bits"][-1] - p["initial_bound_bits"][0] for p in per_seed]
    effects = [effect("share of the origin-centred log volume that is the weight-norm term, last step (claim: "
                      "> 0.5)", "", share, digits=2, verdict=sign_verdict([s - 0.5 for s in share])),
               effect("rise of the initial-centred information-content bound, last minus first measurement", "bits",
                      rise)]
    return {
        "number": 5, "key": "prior_centring", "title": "Prior centring: weight norm vs what training added",
        "claim": "(hfvolume's own claim, not one of the paper's four.) With the prior centred at the origin most "
                 "of the number is the weight norm (`norm_term` > half of the log volume); centred at the initial "
                 "weights it measures what training added, and that still rises during training.",
        "setup": ("The runs of finding 1, repeated with `LocalVolumeCallback(prior_mean=\"initial\")` (the callback "
                  "never changes training, so both measure the same weights at the same steps with the same "
                  "directions and σ). Part a: the share `norm_term / log_volume` at the last step, origin prior "
                  "(the sign rule on share − ½). Part b: rise of the initial-centred information-content bound, "
                  "last minus first measurement."),
        "figure": FIGURES["prior_centring"], "rule": "combined", "per_seed": per_seed,
        "initial_last_bound_bits": spread([p["initial_bound_bits"][-1] for p in per_seed]),
        "origin_last_bound_bits": spread([p["origin_bound_bits"][-1] for p in per_seed]),
        "effects": effects,
        "verdict": combined_verdict([e["verdict"] for e in effects]),
    }


# ---------------------------------------------------------------------------------------------------- figures
def _figure(n_panels: int, rows: int = 1) -> tuple[Any, list[Any]]:
    """A matplotlib Figure (object API: the caller's pyplot backend is never touched) with ``rows`` rows of
    ``n_panels`` axes, returned row by row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * n_panels, 3.9 * rows), layout="constrained")
    axes = fig.subplots(rows, n_panels, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Any, path: Path) -> None:
    """Write a PNG without the matplotlib version in its metadata."""
    fig.savefig(path, dpi=110, metadata={"Software": None})


def plot_training(f: Mapping[str, Any], path: Path) -> None:
    """The information-content bound over steps per seed; L_IT over the first pass when present."""
    lit = [p for p in f["per_seed"] if p["lit"]]
    fig, axes = _figure(2 if lit else 1)
    for p in f["per_seed"]:
        axes[0].plot(p["steps"], p["bound_bits"], marker="o", ms=3, label=f"seed {p['seed']}")
    axes[0].set(xlabel="optimizer step", ylabel="information content, 95% bound (bits)",
                title="1. Information content over training")
    axes[0].legend(fontsize=7)
    if lit:
        for p in lit:
            axes[1].plot(p["lit"]["steps"], p["lit"]["bits"], marker="o", ms=3, label=f"seed {p['seed']}")
        axes[1].set(xlabel="optimizer step (first pass only)", ylabel="L_IT (bits)",
                    title="Information transfer over the first pass")
        axes[1].legend(fontsize=7)
    _save(fig, path)


def plot_memorisation(f: Mapping[str, Any], path: Path) -> None:
    """Bits against the share of random labels (per seed and mean ± sd), beyond the norm term, and L_IT."""
    keys = [("bound_bits", "information content, 95% bound (bits)"),
            ("beyond_norm_bits", "bound without the norm term (bits)")]
    if any(r["lit_bits"] is not None for r in f["per_seed"]):
        keys.append(("lit_bits", "L_IT, first pass (bits)"))
    fig, axes = _figure(len(keys))
    fractions = sorted({r["fraction"] for r in f["per_seed"]})
    for ax, (key, label) in zip(axes, keys):
        for seed in sorted({r["seed"] for r in f["per_seed"]}):
            rows = sorted((r for r in f["per_seed"] if r["seed"] == seed), key=lambda r: r["fraction"])
            ax.plot([100 * r["fraction"] for r in rows], [r[key] for r in rows], marker="o", ms=3, lw=0.8,
                    alpha=0.6, label=f"seed {seed}")
        means = [f["by_fraction"][f"{x:g}"][key] for x in fractions]
        ax.errorbar([100 * x for x in fractions], [m["mean"] for m in means],
                    yerr=[0 if m["sd"] is None else m["sd"] for m in means], color="k", lw=2, capsize=4,
                    label="mean ± sd")
        ax.set(xlabel="random training labels (%)", ylabel=label)
        ax.legend(fontsize=7)
    axes[0].set_title("2. Memorisation and information content")
    _save(fig, path)


def plot_proposals(f: Mapping[str, Any], path: Path) -> None:
    """Per model: each proposal's lower bound minus isotropic's (seeds and mean); running estimates, first seed."""
    fig, axes = _figure(2, rows=len(f["models"]))
    for row, model in enumerate(f["models"]):
        gains, left, right = f["gains"][model], axes[2 * row], axes[2 * row + 1]
        names = [n for n in PROPOSALS[1:] if n in gains]
        for i, name in enumerate(names):
            left.bar(i, gains[name]["mean"], color="0.8", edgecolor="k")
            left.plot([i] * len(gains[name]["values"]), gains[name]["values"], "o", color="C0", ms=4)
        left.axhline(0, color="k", lw=0.8)
        left.set_xticks(range(len(names)), names)
        left.set(ylabel="lower bound − isotropic's (nats)", title=f"3. Proposals at equal forward passes: {model}")
        rows = [r for r in f["per_seed"] if r["model"] == model and r["available"]]
        first = rows[0]["seed"]
        for r in rows:
            if r["seed"] == first:
                right.plot(r["curve"]["forward_passes"], r["curve"]["running_log_volume"], label=r["proposal"])
        right.set(xlabel="forward passes (set-up included)", ylabel="running log volume (nats)",
                  title=f"Running estimate: {model}, seed {first}")
        right.legend(fontsize=7)
    _save(fig, path)


def plot_cutoff(f: Mapping[str, Any], path: Path) -> None:
    """log V against log10 ε with the quadratic model's slope drawn through each curve's mean; the spectrum."""
    fig, axes = _figure(2)
    eps = np.asarray(f["cutoffs"], dtype=np.float64)
    for j, name in enumerate(f["proposals"]):
        for i, s in enumerate(f["per_seed"]):
            lv = np.asarray([p["log_volume"] for p in s["estimates"][name]["points"]])
            axes[0].plot(np.log10(eps), lv, marker="o", ms=3, color=f"C{j}",
                         label=f"{name} (fitted slope {f['slopes'][name]['mean']:,.0f})" if i == 0 else None)
            model = s["quadratic"]["slope"] * (np.log(eps) - np.log(eps).mean()) + lv.mean()
            axes[0].plot(np.log10(eps), model, ls=":", color="k",
                         label=f"quadratic model (slope {f['predicted_slope']['mean']:,.1f})" if i == j == 0 else None)
    axes[0].set(xlabel="log10 cutoff ε (nats)", ylabel="log volume (nats)", title="4. Log volume against the cutoff")
    axes[0].legend(fontsize=7)
    s0 = f["per_seed"][0]
    axes[1].semilogy(np.arange(1, len(s0["spectrum"]) + 1), s0["spectrum"], lw=1, label="eigenvalues of G")
    thresholds = s0["quadratic"]["thresholds"]
    axes[1].axhline(max(thresholds), ls="--", lw=0.8, color="C3", label="2ε/σ² at the largest ε")
    axes[1].axhline(min(thresholds), ls="--", lw=0.8, color="C2", label="2ε/σ² at the smallest ε")
    axes[1].set(xlabel="index", ylabel="eigenvalue", title=f"Gauss–Newton spectrum, seed {s0['seed']}")
    axes[1].legend(fontsize=7)
    _save(fig, path)


def plot_prior_centring(f: Mapping[str, Any], path: Path) -> None:
    """Origin- and initial-centred bounds and their norm terms over steps (mean over seeds, min–max band)."""
    fig, axes = _figure(1)
    steps = f["per_seed"][0]["steps"]
    series = [("origin_bound_bits", "origin prior: information content (95% bound)", "C0", "-"),
              ("origin_norm_bits", "origin prior: −norm_term", "C0", "--"),
              ("initial_bound_bits", "prior at initialisation: information content (95% bound)", "C1", "-"),
              ("initial_norm_bits", "prior at initialisation: −norm_term", "C1", "--")]
    for key, label, color, style in series:
        values = np.asarray([p[key] for p in f["per_seed"]], dtype=np.float64)
        axes[0].plot(steps, values.mean(0), ls=style, color=color, marker="o", ms=3, label=label)
        axes[0].fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15)
    axes[0].set(xlabel="optimizer step", ylabel="bits", title="5. Where the number comes from")
    axes[0].legend(fontsize=7)
    _save(fig, path)


PLOTTERS: dict[str, Callable[[Mapping[str, Any], Path], None]] = {
    "training": plot_training, "memorisation": plot_memorisation, "proposals": plot_proposals,
    "cutoff": plot_cutoff, "prior_centring": plot_prior_centring,
}


# ----------------------------------------------------------------------------------------------------- report
def num(x: Any, digits: int = 0) -> str:
    """A number for the report (thousands separators; "n/a" for a missing or non-finite value)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def pm(s: Mapping[str, Any] | None, digits: int = 0, unit: str = "") -> str:
    """"mean ± sd unit" of a :func:`spread` (across seeds)."""
    if not s:
        return "n/a"
    text = num(s["mean"], digits) + ("" if s["sd"] is None else f" ± {num(s['sd'], digits)}")
    return text + (f" {unit}" if unit else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table (and a blank line after it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _median(values: Sequence[Any]) -> float | None:
    """Median of the finite values, None if there is none."""
    clean = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(clean)) if clean else None


def effect_text(e: Mapping[str, Any], *, with_verdict: bool) -> str:
    """"name: mean ± sd unit (per seed: …)", and the part's verdict when asked."""
    per_seed = ", ".join(num(v, e["digits"]) for v in e["values"])
    text = f"{e['name']}: {pm(e, e['digits'], e['unit'])} (per {e['per']}: {per_seed})"
    return text + (f" → {e['verdict']}" if with_verdict else "")


def headline(f: Mapping[str, Any]) -> str:
    """The numbers behind a finding's verdict, in one line (the effects that decide it)."""
    deciding = [e for e in f["effects"] if e["decides"]]
    text = "; ".join(effect_text(e, with_verdict=len(deciding) > 1) for e in deciding)
    if f["key"] == "cutoff":
        slopes = "; ".join(f"{n} {pm(f['slopes'][n])}" for n in f["proposals"])
        text = f"fitted slope {slopes} vs quadratic model {pm(f['predicted_slope'], 1)} nats per ln ε; " + text
    return text


def effects_lines(f: Mapping[str, Any]) -> list[str]:
    """Every effect of a finding, deciding or context, as a list."""
    lines = []
    for e in f["effects"]:
        role = "decides the verdict" if e["decides"] else "context"
        lines.append(f"- {effect_text(e, with_verdict=e['verdict'] != 'not judged')} ({role})")
    return lines + [""]


def section_training(f: Mapping[str, Any]) -> list[str]:
    """Finding 1's table: one row per seed."""
    rows = []
    for p in f["per_seed"]:
        lit = p["lit"]["final_bits"] if p["lit"] else None
        rows.append([str(p["seed"]), f"{p['steps'][0]} → {p['steps'][-1]}", num(p["bound_bits"][0]),
                     num(p["bound_bits"][-1]), num(p["bound_bits"][-1] - p["bound_bits"][0]),
                     num(_median(p["pareto_k"]), 0), num(_median(p["ess"]), 1), num(lit)])
    return _table(["seed", "steps", "bound, first (bits)", "bound, last (bits)", "rise (bits)", "k̂ (median)",
                   "ESS (median)", "L_IT (bits)"], rows)


def section_memorisation(f: Mapping[str, Any]) -> list[str]:
    """Finding 2's table: one row per share of random labels, mean ± sd across seeds."""
    rows = []
    for key, b in f["by_fraction"].items():
        rows.append([f"{float(key):.0%}", pm(b["train_loss"], 3), pm(b["epochs"], 0), pm(b["bound_bits"]),
                     pm(b["beyond_norm_bits"]), pm(b["pareto_k"], 0), pm(b.get("lit_bits"))])
    return _table(["random labels", "training loss (nats)", "epochs", "information content, bound (bits)",
                   "bound without norm term (bits)", "k̂", "L_IT (bits)"], rows)


def section_proposals(f: Mapping[str, Any]) -> list[str]:
    """Finding 3's table: one row per model and proposal."""
    rows = []
    for model in f["models"]:
        for name in PROPOSALS:
            sel = [r for r in f["per_seed"] if r["model"] == model and r["proposal"] == name and r["available"]]
            if not sel:
                rows.append([model, name, "not available", "", "", "", "", "", ""])
                continue
            gain = f["gains"][model].get(name)
            rows.append([model, name, num(_median([r["forward_passes"] for r in sel])),
                         num(_median([r["n_directions"] for r in sel])),
                         pm(spread([r["lower_bound"] for r in sel])), pm(gain) if gain else "—",
                         num(_median([r["pareto_k"] for r in sel])), num(_median([r["ess"] for r in sel]), 1),
                         gain["verdict"] if gain else "—"])
    return _table(["model", "proposal", "forward passes (median)", "directions (median)", "lower bound (nats)",
                   "gain over isotropic (nats)", "k̂ (median)", "ESS (median)", "sign rule"], rows)


def section_cutoff(f: Mapping[str, Any]) -> list[str]:
    """Finding 4's table: one row per seed, and the scale of the slopes."""
    rows = []
    for s in f["per_seed"]:
        q = s["quadratic"]
        fitted = "; ".join(f"{n} {num(s['estimates'][n]['slope'])} (×{num(s['estimates'][n]['ratio'], 0)})"
                           for n in f["proposals"])
        rows.append([str(s["seed"]), f"{s['n_params']:,} / {q['rank']:,}",
                     f"{q['bounded'][0]:,} → {q['bounded'][-1]:,}", num(q["slope"], 1), fitted])
    lines = _table(["seed", "D / rank of G", "bounded directions (smallest → largest ε)", "predicted slope",
                    "fitted slope (× predicted)"], rows)
    half_d = f["per_seed"][0]["n_params"] / 2
    lines += [f"For scale: D/2 = {num(half_d)}, rank(G)/2 = {num(f['per_seed'][0]['quadratic']['rank'] / 2)} "
              "(first seed). Slopes are in nats of log volume per unit of ln ε.", ""]
    return lines


def section_prior_centring(f: Mapping[str, Any]) -> list[str]:
    """Finding 5's table: one row per seed."""
    rows = []
    for p in f["per_seed"]:
        rows.append([str(p["seed"]), num(p["origin_bound_bits"][-1]), num(p["origin_norm_bits"][-1]),
                     num(p["origin_norm_share"][-1], 2), f"{num(p['initial_bound_bits'][0])} → "
                     f"{num(p['initial_bound_bits'][-1])}", num(p["initial_norm_bits"][-1]),
                     num(_median(p["initial_pareto_k"]), 0)])
    return _table(["seed", "origin: bound, last (bits)", "origin: −norm_term (bits)", "norm share",
                   "initial: bound, first → last (bits)", "initial: −norm_term, last (bits)", "initial: k̂"], rows)


SECTIONS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "training": section_training, "memorisation": section_memorisation, "proposals": section_proposals,
    "cutoff": section_cutoff, "prior_centring": section_prior_centring,
}


def _notes(payload: Mapping[str, Any]) -> list[str]:
    """What the run includes and leaves out (L_IT, the curvature proposal, a language model, k̂)."""
    f = {x["key"]: x for x in payload["findings"]}
    lit = payload["information_transfer"]
    notes = ["## What is and is not included", "",
             f"- Information transfer L_IT (prequential code) in findings 1 and 2: "
             f"{'included' if lit['included'] else 'not included'} — {lit['reason']}.",
             "- The curvature proposal (`preconditioner=\"ggn\"`) in finding 3: " + (
                 "included." if f["proposals"]["ggn_available"] else
                 "not included (" + "; ".join(f["proposals"]["unavailable"]) + ")."),
             "- A tiny language model trained from scratch on generated text: in finding 3 only, where it adds "
             "something (optimizer-state proposals behave differently there than on the digits MLP). Findings 1, "
             "2, 4 and 5 use the digits MLP, which the 10 minutes allow over several seeds.",
             "- Every estimate here has Pareto k̂ far above 0.7 (one direction dominates, ESS ≈ 1): the 95% lower "
             "bound of the log volume (an upper bound on the bits) is what is compared, always at equal settings, "
             "and the ± are spreads across seeds, never one run's bootstrap.", ""]
    return notes


def render_report(payload: Mapping[str, Any]) -> str:
    """The Markdown report, from the JSON payload alone (so the two always agree)."""
    env = payload["environment"]
    lines = [f"# {PAPER.split(',')[0]}'s findings, reproduced with hfvolume", "",
             f"Mode **{payload['mode']['name']}**: `{payload['command']}`. Wall time {num(payload['wall_time_s'])} s "
             f"({num(payload['process_seconds'])} s with the imports) on {env['cpu_count']} CPU cores, torch with "
             f"{env['threads']} thread(s); load average "
             f"{env['load_average_start']} at the start and {env['load_average_end']} at the end (a shared machine: "
             "other jobs ran alongside). Method: " + PAPER + f". Seeds {payload['mode']['seeds']}; every ± is the "
             "standard deviation across seeds.", "", "## Verdicts", ""]
    lines += _table(["#", "finding", "verdict", "numbers"],
                    [[str(f["number"]), f["title"], f"**{f['verdict']}**", headline(f)] for f in payload["findings"]])
    lines += ["## How the verdicts are decided", "", RULES_HISTORY, ""]
    lines += [f"- {name} rule: {text}" for name, text in payload["verdict_rules"].items()] + [""]
    lines += ["\"Information content\" below is −log₂ of the 95% Markov lower bound of the log volume (it holds "
              "whatever the importance weights' tail); \"estimate\" is the log-mean-exp itself.", ""]
    for f in payload["findings"]:
        lines += [f"## {f['number']}. {f['title']}", "", f"**Claim.** {f['claim']}", "", f"**Setup.** {f['setup']}",
                  "", f"![{f['title']}]({f['figure']})", ""]
        lines += SECTIONS[f["key"]](f)
        lines += ["**Effects across seeds:**", ""] + effects_lines(f)
        lines += [f"**Verdict: {f['verdict']}** ({f['rule']} rule). {headline(f)}.", ""]
    lines += _notes(payload)
    lines += ["## Files", "", f"`{JSON_FILE}` holds every number above and the per-seed series; the figures are "
              f"{', '.join(f'`{v}`' for v in FIGURES.values())}. Stage times (s): "
              + ", ".join(f"{k} {num(v)}" for k, v in payload["stage_seconds"].items()) + ".", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- run
def json_safe(value: Any) -> Any:
    """Plain JSON: non-finite floats become None, numpy scalars and tuples become Python ones."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _environment(threads: int) -> dict[str, Any]:
    """Versions, cores and threads, and the machine's load average when the run starts."""
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "hfvolume": hfvolume.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": threads, "load_average_start": _load()}


def process_seconds() -> float | None:
    """Seconds since this process started (imports included), from /proc on Linux; None elsewhere."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _load() -> str:
    """The 1, 5 and 15-minute load averages (how busy the shared machine was)."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def collect(mode: Mode, lit: Mapping[str, Any], log: Progress) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run every experiment; returns the findings and the seconds each stage took."""
    seconds: dict[str, float] = {}
    begin = log.elapsed()
    origin, initial = [], []
    for seed in mode.seeds:
        origin.append(train_with_callback(seed=seed, mode=mode, prior_mean="origin", lit=lit))
        s = origin[-1].series
        log(f"finding 1: seed {seed}: information content ≤ {bits(s[0]['log_volume_lower_bound']):,.0f} bits at step "
            f"{s[0]['step']} → {bits(s[-1]['log_volume_lower_bound']):,.0f} at step {s[-1]['step']}")
        initial.append(train_with_callback(seed=seed, mode=mode, prior_mean="initial", lit={"included": False}))
        s = initial[-1].series
        log(f"finding 5: seed {seed}: prior at initialisation: {bits(s[0]['log_volume_lower_bound']):,.0f} → "
            f"{bits(s[-1]['log_volume_lower_bound']):,.0f} bits")
    seconds["training runs (1, 5)"] = log.elapsed() - begin
    findings = [finding_training(origin, mode)]
    for name, make in (("memorisation (2)", lambda: finding_memorisation(mode, lit, log)),
                       ("proposals (3)", lambda: finding_proposals(_subjects(origin, mode, log), mode, log)),
                       ("cutoff (4)", lambda: finding_cutoff(origin, mode, log))):
        begin = log.elapsed()
        findings.append(make())
        seconds[name] = log.elapsed() - begin
    findings.append(finding_prior_centring(origin, initial, mode))
    return findings, seconds


def _subjects(origin: Sequence[TrainedRun], mode: Mode, log: Progress) -> list[Subject]:
    """Finding 3's models: the digits MLPs of finding 1, then a tiny language model per seed."""
    subjects = [digits_subject(run, mode) for run in origin]
    for seed in mode.seeds:
        subjects.append(train_tiny_lm(seed=seed, mode=mode))
        log(f"finding 3: tiny LM, seed {seed}: trained ({mode.lm_steps} steps)")
    return subjects


def write_outputs(payload: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """Write the JSON, the figures and the report (rendered from the JSON as written); returns that JSON."""
    output_dir.mkdir(parents=True, exist_ok=True)
    safe = json.loads(json.dumps(json_safe(payload)))
    (output_dir / JSON_FILE).write_text(json.dumps(safe, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for f in safe["findings"]:
        PLOTTERS[f["key"]](f, output_dir / f["figure"])
    (output_dir / REPORT_FILE).write_text(render_report(safe), encoding="utf-8")
    return safe


def command_line(mode: Mode, output_dir: Path) -> str:
    """The command that reproduces this run's outputs."""
    flag = "" if mode.name == "full" else f" --{mode.name}"
    out = "" if str(output_dir) == DEFAULT_OUTPUT else f" --output_dir {output_dir}"
    return f"python scripts/reproduce_findings.py{flag}{out}"


@contextlib.contextmanager
def quiet_threads(threads: int) -> Iterator[None]:
    """Torch on ``threads`` threads, hfvolume's k̂ warnings and transformers' notices silenced (the report states
    k̂ for every number); all three restored afterwards, so calling :func:`run` leaves the process as it was."""
    import transformers

    before = (torch.get_num_threads(), logging.getLogger("hfvolume").level, transformers.logging.get_verbosity())
    torch.set_num_threads(threads)
    logging.getLogger("hfvolume").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        logging.getLogger("hfvolume").setLevel(before[1])
        transformers.logging.set_verbosity(before[2])


def run(mode: Mode, output_dir: Path, *, threads: int = 1, information_transfer: bool = True) -> dict[str, Any]:
    """Everything: experiments, verdicts, files. Returns the JSON payload as written."""
    log = Progress()
    lit = information_transfer_status(information_transfer)
    log(f"mode {mode.name}: seeds {list(mode.seeds)}, output {output_dir}; L_IT: "
        f"{'included' if lit['included'] else 'not included'}")
    environment = _environment(threads)
    with quiet_threads(threads):
        findings, seconds = collect(mode, lit, log)
    environment["load_average_end"] = _load()
    payload = {"title": "Scherlis & Belrose's findings, reproduced with hfvolume", "paper": PAPER,
               "command": command_line(mode, output_dir), "mode": dataclasses.asdict(mode),
               "environment": environment, "verdict_rules": VERDICT_RULES, "information_transfer": lit,
               "findings": findings, "stage_seconds": seconds, "wall_time_s": log.elapsed(),
               "process_seconds": process_seconds()}
    safe = write_outputs(payload, output_dir)
    for f in safe["findings"]:
        log(f"finding {f['number']} ({f['key']}): {f['verdict'].upper()} — {headline(f)}")
    log(f"wrote {output_dir / REPORT_FILE}, {output_dir / JSON_FILE} and {len(FIGURES)} figures")
    return safe


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line and run; returns the JSON payload written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="at most 10 minutes on 2 CPU cores (the README's plots)")
    size.add_argument("--tiny", action="store_true", help="seconds: a smoke run (what the test runs)")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT, help=f"output folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the models are small, and a second thread mostly waits "
                             "on a shared machine)")
    parser.add_argument("--no_information_transfer", action="store_true",
                        help="leave the prequential information transfer L_IT out of findings 1 and 2")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    mode = MODES["quick" if args.quick else "tiny" if args.tiny else "full"]
    return run(mode, Path(args.output_dir), threads=args.threads,
               information_transfer=not args.no_information_transfer)


if __name__ == "__main__":
    main()
