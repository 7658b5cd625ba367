"""OnlineCodeCallback end to end through a real Trainer (CPU, no network): oracles O2–O5 and O7–O11, O13.

The counting learner (tests/mdl/mdl_problems.py) makes the Laplace / KT closed forms end-to-end checks of the tap,
the step bookkeeping and the logging; float64 logistic regression makes accumulation invariance exact up to
float64 round-off; a tiny GPT-NeoX checks the causal shift, padding and non-interference with dropout.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mdl_problems import (
    CountingLearner,
    Items,
    Logistic,
    lm_dataset,
    lm_rows,
    reference_lm_code,
    teacher_data,
    tiny_neox,
)

from hfvolume.mdl import OnlineCodeCallback, OnlineCodeConfig
from hfvolume.mdl.callback import FAILED_KEY, TRAIN_KEYS
from hfvolume.mdl.counting import counting_code_bits, kt_code_bits, laplace_code_bits

LN2 = math.log(2.0)
P = [0.3, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03]


def run(tmp_path: Path, model, train, *, callbacks=None, eval_dataset=None, collator=None, **overrides):
    """Train ``model`` with the callback (or ``callbacks``); returns (trainer, TrainOutput)."""
    from transformers import Trainer, TrainingArguments

    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=1, per_device_eval_batch_size=8,
                    num_train_epochs=1, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                    use_cpu=True, seed=1, learning_rate=0.1, lr_scheduler_type="constant", optim="sgd")
    args = TrainingArguments(**{**settings, **overrides})
    cbs = [OnlineCodeCallback()] if callbacks is None else callbacks
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_dataset, callbacks=cbs,
                      data_collator=collator)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer, trainer.train()


def final(out, key: str = "online_code_bits") -> float:
    return out.metrics[f"train_{key}"]


# ---------------------------------------------------------------------------------------------- oracle O1
def test_o1_uniform_predictor_online_and_block_wise(tmp_path):
    from hfvolume.mdl import prequential_code_length

    def uniform_model():
        model = Logistic(20, 4)
        with torch.no_grad():
            model.linear.weight.zero_()  # constant logits: p = 1/4 for every item, whatever the training does
        return model

    data = teacher_data(100, seed=16)
    _, out = run(tmp_path, uniform_model(), data, per_device_train_batch_size=10, learning_rate=0.0)
    assert abs(final(out) - 200.0) < 1e-9 and final(out, "online_uniform_bits") == 200.0
    assert abs(final(out, "information_transfer_bits")) < 1e-9
    assert final(out, "online_compression") == pytest.approx(1.0, abs=1e-12)
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "blocks"), per_device_train_batch_size=10, learning_rate=0.0,
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no")
    blocks = prequential_code_length(uniform_model, data, args=args, boundaries=[10, 30], early_stopping=0.0)
    assert abs(blocks.total_bits - 200.0) < 1e-9 and blocks.uniform_bits == 200.0
    assert abs(blocks.information_transfer_bits) < 1e-9 and blocks.compression == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ oracles O2–O5
@pytest.mark.parametrize("labels,alpha,expected", [
    ((0, 0, 1), 1.0, math.log2(12)),
    ((0, 0, 1, 1), 1.0, math.log2(30)),
    ((0, 0, 1), 0.5, 4.0),
])
def test_o2_o3_counting_learner_hand_cases_one_item_per_step(tmp_path, labels, alpha, expected):
    _, out = run(tmp_path, CountingLearner(2, alpha), Items(np.array(labels)), train_sampling_strategy="sequential")
    assert abs(final(out) - expected) < 1e-12
    assert final(out, "online_code_items") == len(labels)
    assert final(out, "online_uniform_bits") == len(labels)  # log2 2 = 1 bit per item
    assert final(out, "information_transfer_bits") == pytest.approx(len(labels) - expected, abs=1e-12)
    assert final(out, "online_code_complete") == 1.0


@pytest.mark.slow
def test_o2_o5_laplace_seeded_sequence_in_the_trainers_random_order(tmp_path):
    y = np.random.default_rng(0).choice(10, 1000, p=P)
    _, out = run(tmp_path, CountingLearner(10, 1.0), Items(y), logging_steps=100)
    # The Trainer shuffles (its RandomSampler): the Laplace code is exchangeable, so the closed form still holds.
    assert abs(final(out) - laplace_code_bits(np.bincount(y, minlength=10))) < 1e-9
    assert abs(final(out) - 2990.811065254262) < 1e-9
    assert final(out, "online_uniform_bits") == 3321.928094887362


def test_o3_kt_seeded_sequence(tmp_path):
    y = np.random.default_rng(0).choice(10, 300, p=P)
    _, out = run(tmp_path, CountingLearner(10, 0.5), Items(y), logging_steps=100)
    assert abs(final(out) - kt_code_bits(np.bincount(y, minlength=10))) < 1e-10


@pytest.mark.parametrize("labels,batch,expected", [((0, 0, 1, 1), 2, 6.0), ((0, 1, 0, 1), 2, 4.0)])
def test_o4_a_step_of_b_items_is_coded_by_the_same_counts(tmp_path, labels, batch, expected):
    _, out = run(tmp_path, CountingLearner(2, 1.0), Items(np.array(labels)), per_device_train_batch_size=batch,
                 train_sampling_strategy="sequential")
    assert abs(final(out) - expected) < 1e-12
    y = np.random.default_rng(3).integers(0, 5, 37)  # groups of 4, last one of 1
    _, out = run(tmp_path, CountingLearner(5, 1.0), Items(y), per_device_train_batch_size=4,
                 train_sampling_strategy="sequential")
    grouped = counting_code_bits(y, num_classes=5, alpha=1.0, boundaries=list(range(4, 37, 4)) + [37])
    assert abs(final(out) - grouped) < 1e-11


# -------------------------------------------------------------------------------- O7 gradient accumulation
@pytest.mark.slow
def test_o7_gradient_accumulation_invariance(tmp_path):
    data = teacher_data(2048)
    common = dict(learning_rate=0.5, lr_scheduler_type="linear", logging_steps=16)
    _, a = run(tmp_path / "a", Logistic(20, 4), data, per_device_train_batch_size=8, gradient_accumulation_steps=4,
               **common)
    _, b = run(tmp_path / "b", Logistic(20, 4), data, per_device_train_batch_size=32, **common)
    _, c = run(tmp_path / "c", Logistic(20, 4), data, per_device_train_batch_size=8, **common)
    assert final(a, "online_code_items") == final(b, "online_code_items") == 2048
    assert abs(final(a) - final(b)) < 1e-9  # the same optimizer-step groups: the same code
    assert abs(final(a) - final(c)) > 10.0  # other steps (4x as many updates): another code, as it should be
    assert final(a) < 2048 * 2  # it learned something


def test_kept_small_batches_code_like_batches_coded_at_once(tmp_path):
    """Small classifier batches are coded together later (working_memory > 0) or one by one (0): same bits."""
    data = teacher_data(256, seed=12)
    kw = dict(per_device_train_batch_size=8, logging_steps=5)
    _, kept = run(tmp_path / "kept", Logistic(20, 4), data, callbacks=[OnlineCodeCallback()], **kw)
    small = OnlineCodeCallback(code_working_memory=16 * 8 * 4 * 8)  # a flush every few batches
    _, some = run(tmp_path / "some", Logistic(20, 4), data, callbacks=[small], **kw)
    _, each = run(tmp_path / "each", Logistic(20, 4), data, callbacks=[OnlineCodeCallback(code_working_memory=0)],
                  **kw)
    assert final(kept, "online_code_items") == final(each, "online_code_items") == 256
    assert abs(final(kept) - final(each)) < 1e-9 and abs(final(some) - final(each)) < 1e-9


# ---------------------------------------------------------------------------------- O8 non-interference
def _neox_run(tmp_path: Path, callbacks):
    from transformers import DataCollatorForLanguageModeling  # noqa: F401 - keeps the import cost out of timing

    train, evald = lm_dataset(24), lm_dataset(8, seed=5)
    from transformers import default_data_collator

    trainer, _ = run(tmp_path, tiny_neox(dropout=0.1), train, callbacks=callbacks, eval_dataset=evald,
                     collator=default_data_collator, per_device_train_batch_size=4, max_steps=8,
                     eval_strategy="steps", eval_steps=4, logging_steps=2, optim="adamw_torch", learning_rate=1e-3,
                     lr_scheduler_type="linear")
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    history = [{k: e[k] for k in ("loss", "grad_norm", "eval_loss", "learning_rate", "step") if k in e}
               for e in trainer.state.log_history]
    return trainer, weights, history, torch.get_rng_state()


def test_o8_bitwise_non_interference_with_dropout_and_the_initial_reference(tmp_path):
    _, w0, h0, rng0 = _neox_run(tmp_path / "without", [])
    cb = OnlineCodeCallback(code_reference="initial")
    trainer, w1, h1, rng1 = _neox_run(tmp_path / "with", [cb])
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert h0 == h1
    assert torch.equal(rng0, rng1)
    assert trainer.callback_handler.callbacks[0] is cb
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert all(type(e["eval_code_bits"]) is float and e["eval_code_items"] > 0 for e in evals)
    assert all("eval_information_transfer_bits" in e for e in evals)


# ------------------------------------------------------------------------------------- O9 label smoothing
def test_o9_label_smoothing_does_not_change_the_code(tmp_path):
    data = teacher_data(64, seed=2)
    model = Logistic(20, 4, seed=3)
    with torch.no_grad():
        model.linear.weight.mul_(100.0)  # a confident model: smoothing changes its loss a lot
        logits = model(data.x)["logits"]
        expected = float(torch.nn.functional.cross_entropy(logits, torch.tensor(data.labels), reduction="sum")) / LN2
        smoothed = float(torch.nn.functional.cross_entropy(logits, torch.tensor(data.labels), reduction="sum",
                                                           label_smoothing=0.1)) / LN2
    _, out = run(tmp_path, model, data, per_device_train_batch_size=8, learning_rate=0.0, label_smoothing_factor=0.1)
    assert abs(final(out) - expected) < 1e-9
    assert abs(final(out) - smoothed) > 1.0  # the smoothed training loss would have been another number


# ------------------------------------------------------------------------------------------ O10 causal LM
@pytest.mark.parametrize("nll_source", ["logits", "loss"])
def test_o10_causal_shift_padding_and_prompt_masks(tmp_path, nll_source):
    from transformers import default_data_collator

    rows = lm_rows(12)
    model = tiny_neox()
    bits, items, loss_bits = reference_lm_code(model, rows)
    cb = OnlineCodeCallback(nll_source=nll_source)
    _, out = run(tmp_path, model, lm_dataset(12), callbacks=[cb], collator=default_data_collator,
                 per_device_train_batch_size=4, learning_rate=0.0, gradient_accumulation_steps=2)
    assert final(out, "online_code_items") == items == sum(
        sum(1 for t in range(11) if r["labels"][t + 1] != -100 and r["attention_mask"][t]) for r in rows)
    assert abs(bits - loss_bits) < 1e-4 * bits  # the model's unsmoothed loss is the same code (float32 sums)
    # float32 logits: per-token −ln p carries ~1e-7 relative error, summed over ~120 tokens.
    assert final(out) == pytest.approx(bits, rel=1e-5)
    assert final(out, "online_uniform_bits") == pytest.approx(items * 6.0, abs=1e-9)  # V = 64


# --------------------------------------------------------------------------------- O11 first-pass freeze
def test_o11_first_pass_freezes_the_code(tmp_path):
    data = teacher_data(96, seed=4)
    kw = dict(per_device_train_batch_size=8, logging_steps=4)
    t1, one = run(tmp_path / "one", Logistic(20, 4), data, num_train_epochs=1, **kw)
    t3, three = run(tmp_path / "three", Logistic(20, 4), data, num_train_epochs=3, **kw)
    assert final(one) == final(three)
    logs = [e for e in t3.state.log_history if "online_code_bits" in e]
    assert [e["online_code_complete"] for e in logs if e["step"] <= 12] == [0.0] * 3  # 12 steps per epoch
    later = [e for e in logs if e["step"] > 12]
    assert later and all(e["online_code_complete"] == 1.0 and e["online_code_bits"] == final(one) for e in later)


def test_partial_first_pass_is_flagged(tmp_path):
    _, out = run(tmp_path, Logistic(20, 4), teacher_data(96), per_device_train_batch_size=8, max_steps=5)
    assert final(out, "online_code_complete") == 0.0 and final(out, "online_code_items") == 40


# ------------------------------------------------------------------------------------ O13 random labels
def test_o13_random_labels_transfer_nothing(tmp_path):
    kw = dict(per_device_train_batch_size=32, learning_rate=0.5, logging_steps=64)
    _, real = run(tmp_path / "real", Logistic(20, 4), teacher_data(2048, seed=6), **kw)
    _, rand = run(tmp_path / "rand", Logistic(20, 4), teacher_data(2048, seed=6, random_labels=True), **kw)
    uniform = 2048 * 2.0
    lit_real, lit_rand = final(real, "information_transfer_bits"), final(rand, "information_transfer_bits")
    assert abs(lit_rand) <= 0.05 * uniform
    assert lit_real - lit_rand >= 0.5 * lit_real and lit_real > 0.2 * uniform


# ------------------------------------------------------------------------------- where the values go
def test_values_reach_history_trackers_state_file_metrics_and_series(tmp_path):
    from transformers import TrainerCallback

    class Tracker(TrainerCallback):  # a report_to stand-in: user callbacks come after the callback's new place
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    tracker, cb = Tracker(), OnlineCodeCallback()
    data, evald = teacher_data(64, seed=7), teacher_data(24, seed=8)
    trainer, out = run(tmp_path, Logistic(20, 4), data, callbacks=[tracker, cb], eval_dataset=evald,
                       per_device_train_batch_size=8, logging_steps=2, eval_strategy="steps", eval_steps=4,
                       save_strategy="steps", save_steps=4, metric_for_best_model="information_transfer_bits",
                       greater_is_better=True)
    assert trainer.callback_handler.callbacks[0] is cb
    history = trainer.state.log_history
    train_logs = [e for e in history if "loss" in e]
    assert all(type(e[k]) is float for e in train_logs for k in TRAIN_KEYS)
    assert [t["online_code_bits"] for t in tracker.logs if "loss" in t] == [e["online_code_bits"] for e in train_logs]
    state = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    saved_logs = state["log_history"]
    assert [e.get("online_code_bits") for e in saved_logs] == [
        e.get("online_code_bits") for e in history[: len(saved_logs)]]
    assert any("online_code_bits" in e for e in saved_logs)
    assert all(f"train_{k}" in out.metrics for k in TRAIN_KEYS)
    # Held-out code of the evaluation set: exact, under the weights of the evaluation.
    model = trainer.model.eval()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(evald.x)["logits"], torch.tensor(evald.labels), reduction="sum")
    metrics = trainer.evaluate()
    assert metrics["eval_code_bits"] == pytest.approx(float(ce) / LN2, rel=1e-12)
    assert metrics["eval_code_items"] == 24.0
    assert metrics["eval_information_transfer_bits"] == out.metrics["train_information_transfer_bits"]
    assert trainer.state.best_metric == max(e["eval_information_transfer_bits"] for e in history if "eval_loss" in e)
    saved = json.loads((tmp_path / "hfvolume" / "code_length.json").read_text())
    assert [p["step"] for p in saved["series"]] == [e["step"] for e in train_logs]
    assert (tmp_path / "hfvolume" / "code_length.md").read_text().startswith("### Description length")


def test_config_parses_beside_training_arguments_and_the_volume_config():
    from transformers import HfArgumentParser, TrainingArguments

    from hfvolume import LocalVolumeConfig

    parser = HfArgumentParser((TrainingArguments, LocalVolumeConfig, OnlineCodeConfig))
    _, _, code = parser.parse_args_into_dataclasses(
        args=["--output_dir", "x", "--code_reference", "initial", "--num_classes", "10", "--code_strict", "true"])
    assert code == OnlineCodeConfig(code_reference="initial", num_classes=10, code_strict=True)
    with pytest.raises(ValueError, match="code_reference must be one of"):
        OnlineCodeConfig(code_reference="random")
    with pytest.raises(ValueError, match="code_reference_run"):
        OnlineCodeConfig(code_reference="learner")
    with pytest.raises(ValueError, match="num_classes must be an int ≥ 2, got 1"):
        OnlineCodeConfig(num_classes=1)
    with pytest.raises(TypeError, match="unknown OnlineCodeCallback arguments"):
        OnlineCodeCallback(cutoff=1e-2)


# ----------------------------------------------------------------------------- references and resumption
def test_initial_reference_is_the_code_under_the_starting_weights(tmp_path):
    data = teacher_data(64, seed=9)
    model = Logistic(20, 4, seed=5)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(data.x)["logits"], torch.tensor(data.labels), reduction="sum")
    _, out = run(tmp_path, model, data, callbacks=[OnlineCodeCallback(code_reference="initial")],
                 per_device_train_batch_size=8)
    assert final(out, "online_reference_bits") == pytest.approx(float(ce) / LN2, rel=1e-12)
    assert final(out, "information_transfer_bits") == pytest.approx(float(ce) / LN2 - final(out), rel=1e-12)


def test_learner_reference_of_an_identical_run_gives_zero_transfer(tmp_path):
    data = teacher_data(64, seed=10)
    kw = dict(per_device_train_batch_size=8, logging_steps=2)
    trainer, first = run(tmp_path / "a", Logistic(20, 4), data, **kw)
    cb = OnlineCodeCallback(code_reference="learner", code_reference_run=str(tmp_path / "a"))
    trainer, second = run(tmp_path / "b", Logistic(20, 4), data, callbacks=[cb], **kw)
    lits = [e["information_transfer_bits"] for e in trainer.state.log_history if "loss" in e]
    assert lits and all(v == 0.0 for v in lits)


@pytest.mark.parametrize("restore,part_logging,items", [(True, 3, 64), (False, 2, 64), (False, 3, 56)])
def test_resume_continues_the_sum(tmp_path, caplog, restore, part_logging, items):
    """Resume from checkpoint-4: from the checkpoint's exported state, or from log_history (exact when a training
    log fell on the checkpoint step; otherwise the steps after the last log are lost, with a warning)."""
    from transformers import Trainer, TrainingArguments

    data = teacher_data(64, seed=11)
    common = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=4, report_to=[],
                  disable_tqdm=True, use_cpu=True, seed=1, learning_rate=0.1, lr_scheduler_type="constant",
                  optim="sgd", restore_callback_states_from_checkpoint=restore)
    _, whole = run(tmp_path / "whole", Logistic(20, 4), data, **{**common, "logging_steps": 2})
    part = TrainingArguments(output_dir=str(tmp_path / "part"), max_steps=4, logging_steps=part_logging, **common)
    Trainer(model=Logistic(20, 4), args=part, train_dataset=data, callbacks=[OnlineCodeCallback()]).train()
    rest = TrainingArguments(output_dir=str(tmp_path / "part"), logging_steps=2, **common)
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        out = Trainer(model=Logistic(20, 4), args=rest, train_dataset=data, callbacks=[OnlineCodeCallback()]).train(
            resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert final(out, "online_code_items") == items
    lost = any("not coded" in r.getMessage() for r in caplog.records)
    assert lost == (items < 64)
    if items == 64:
        assert final(out) == pytest.approx(final(whole), rel=1e-12)


# ------------------------------------------------------------------------------------ failure isolation
class NoLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Logistic(20, 4)

    def forward(self, x, labels=None):
        return {"loss": self.inner(x, labels)["loss"]}


def test_a_failing_tap_warns_once_and_training_goes_on(tmp_path, caplog):
    data = teacher_data(32)
    _, w0 = run(tmp_path / "plain", NoLogits(), data, callbacks=[], per_device_train_batch_size=8)
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        trainer, out = run(tmp_path / "tap", NoLogits(), data, per_device_train_batch_size=8)
    assert out.metrics[f"train_{FAILED_KEY}"] == 1.0
    assert all(e.get(FAILED_KEY) == 1.0 for e in trainer.state.log_history if "loss" in e)
    assert sum("online code stopped" in r.getMessage() for r in caplog.records) == 1
    assert out.training_loss == w0.training_loss
    with pytest.raises(ValueError, match="no logits"):
        run(tmp_path / "strict", NoLogits(), data, callbacks=[OnlineCodeCallback(code_strict=True)],
            per_device_train_batch_size=8)


def test_regression_heads_and_float_labels_are_refused(tmp_path):
    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(20, 1, dtype=torch.float64)

        def forward(self, x, labels=None):
            out = self.linear(x)
            return {"loss": ((out[:, 0] - labels) ** 2).mean(), "logits": out}

    data = teacher_data(16)
    data.labels = data.labels.astype(np.float64)

    class FloatItems(Items):
        def __getitem__(self, i):
            return {"x": self.x[i], "labels": float(self.labels[i])}

    floats = FloatItems(data.labels, data.x)
    with pytest.raises(ValueError, match="regression or soft-label"):
        run(tmp_path, Regressor(), floats, callbacks=[OnlineCodeCallback(code_strict=True)],
            per_device_train_batch_size=8)


def test_loss_source_beside_a_label_smoother_is_refused_at_every_run(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        trainer, out = run(tmp_path, Logistic(20, 4), teacher_data(32), per_device_train_batch_size=8,
                           label_smoothing_factor=0.1, callbacks=[OnlineCodeCallback(nll_source="loss")])
    assert out.metrics[f"train_{FAILED_KEY}"] == 1.0
    assert any("nll_source='loss'" in r.getMessage() for r in caplog.records)


def test_each_evaluation_set_gets_its_own_held_out_code(tmp_path):
    data, a, b = teacher_data(32, seed=13), teacher_data(10, seed=14), teacher_data(6, seed=15)
    trainer, _ = run(tmp_path, Logistic(20, 4), data, per_device_train_batch_size=8,
                     eval_dataset={"a": a, "b": b}, eval_strategy="steps", eval_steps=4)
    evals = {k: v for e in trainer.state.log_history for k, v in e.items()
             if k.startswith("eval_") and k.endswith("_code_items")}
    assert evals == {"eval_a_code_items": 10.0, "eval_b_code_items": 6.0}
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "before"), report_to=[], use_cpu=True, disable_tqdm=True)
    before = Trainer(model=Logistic(20, 4), args=args, callbacks=[OnlineCodeCallback()]).evaluate(eval_dataset=a)
    model = Logistic(20, 4)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(a.x)["logits"], torch.tensor(a.labels), reduction="sum")
    assert before["eval_code_bits"] == pytest.approx(float(ce) / LN2, rel=1e-12)  # evaluated before any step
