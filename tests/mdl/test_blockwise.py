"""prequential_code_length end to end through the Trainer: the block-wise Voita-schedule value of a counting
learner (O6), early stopping's held-out split and selection cost, the references, the uniform mixture's bound."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mdl_problems import CountingLearner, Items, Logistic, teacher_data

from hfvolume.mdl import PrequentialResult, prequential_code_length
from hfvolume.mdl.blockwise import _held_out
from hfvolume.mdl.counting import counting_code_bits

P = [0.3, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03]


def recipe(tmp_path, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=64, per_device_eval_batch_size=256,
                    num_train_epochs=1, report_to=[], disable_tqdm=True, use_cpu=True, seed=3, optim="sgd",
                    learning_rate=0.5, logging_strategy="no")
    return TrainingArguments(**{**settings, **overrides})


def in_transmission_order(labels: np.ndarray, order_seed: int = 0) -> Items:
    """A dataset whose transmission order (the function's seeded permutation) is ``labels`` as given."""
    order = np.random.default_rng(order_seed).permutation(len(labels))
    stored = np.empty_like(labels)
    stored[order] = labels
    return Items(stored)


@pytest.mark.slow
def test_o6_voita_schedule_counting_learner_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    rng.permutation(rng.choice(10, 1000, p=P))  # the draws before O6's sequence (O2 and O5)
    y = rng.choice(10, 100_000, p=P)
    result = prequential_code_length(lambda: CountingLearner(10, 1.0), in_transmission_order(y),
                                     args=recipe(tmp_path, per_device_train_batch_size=4096,
                                                 per_device_eval_batch_size=8192), early_stopping=0.0)
    assert result.boundaries == (100, 200, 400, 800, 1600, 3200, 6250, 12500, 25000, 50000, 100000)
    assert abs(result.total_bits - 291_320.767) < 5e-4
    assert abs(result.total_bits - counting_code_bits(y, num_classes=10, alpha=1.0,
                                                      boundaries=result.boundaries)) < 1e-6
    assert result.uniform_bits == pytest.approx(332_192.809, abs=5e-4)
    assert result.compression == pytest.approx(1.1403, abs=5e-5)
    assert result.first_block_bits == pytest.approx(100 * math.log2(10), abs=1e-9)
    assert result.selection_bits == 0.0 and result.reference == "uniform"
    assert result.information_transfer_bits == pytest.approx(result.uniform_bits - result.total_bits, abs=1e-9)


@pytest.mark.slow
def test_small_schedule_matches_the_closed_form_and_restores_the_rng(tmp_path):
    y = np.random.default_rng(1).choice(10, 400, p=P)
    before = torch.get_rng_state()
    result = prequential_code_length(lambda: CountingLearner(10, 1.0), in_transmission_order(y),
                                     args=recipe(tmp_path), boundaries="doubling", early_stopping=0.0)
    assert torch.equal(torch.get_rng_state(), before)
    assert result.boundaries == (6, 12, 24, 48, 96, 192, 400)
    expected = counting_code_bits(y, num_classes=10, alpha=1.0, boundaries=result.boundaries)
    assert abs(result.total_bits - expected) < 1e-9
    assert result.block_items == (6.0, 6.0, 12.0, 24.0, 48.0, 96.0, 208.0)
    assert len(result.block_bits) == len(result.seconds_per_block) == 6
    assert PrequentialResult.from_json(result.to_json()) == result


def test_early_stopping_holds_out_part_of_each_prefix(tmp_path):
    y = np.random.default_rng(2).choice(10, 200, p=P)
    result = prequential_code_length(lambda: CountingLearner(10, 1.0), in_transmission_order(y),
                                     args=recipe(tmp_path), boundaries=[20, 40, 80], early_stopping=0.1)
    # The block after prefix t_i is coded by the counts of the prefix minus its held-out items.
    total = 20 * math.log2(10)
    for job, (start, stop) in enumerate(zip(result.boundaries, result.boundaries[1:]), start=1):
        held = _held_out(start, 0.1, 0, job)
        assert len(held) == round(0.1 * start)
        counts = np.bincount(np.delete(y[:start], held), minlength=10)
        log_p = np.log2((counts + 1.0) / (counts.sum() + 10.0))
        total -= float(np.bincount(y[start:stop], minlength=10) @ log_p)
    assert abs(result.total_bits - total) < 1e-9
    assert result.selection_bits == 0.0  # one epoch: one checkpoint per block, nothing to choose
    # A step floor on small prefixes (one step per epoch): evaluations are capped at `checkpoints`, evenly spaced.
    capped = prequential_code_length(lambda: CountingLearner(10, 1.0), in_transmission_order(y),
                                     args=recipe(tmp_path), boundaries=[20, 40, 80], early_stopping=0.1,
                                     min_steps=50, checkpoints=5)
    assert capped.selection_bits == pytest.approx(3 * math.log2(5), abs=1e-12)


def test_selection_cost_and_initial_reference_with_a_trained_model(tmp_path):
    data = teacher_data(160, seed=4)
    result = prequential_code_length(lambda: Logistic(20, 4), data, args=recipe(tmp_path, num_train_epochs=3,
                                                                                 per_device_train_batch_size=8),
                                     boundaries=[20, 40, 80], code_reference="initial", early_stopping=0.2)
    assert result.selection_bits == pytest.approx(3 * math.log2(3), abs=1e-12)  # 3 evaluations per block
    model = Logistic(20, 4)  # model_init's weights (seeded inside the model)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(data.x)["logits"], torch.tensor(data.labels), reduction="sum")
    assert result.reference == "initial"
    assert result.reference_bits == pytest.approx(float(ce) / math.log(2), rel=1e-12)
    assert result.information_transfer_bits == pytest.approx(result.reference_bits - result.total_bits, rel=1e-12)
    assert result.total_bits < result.uniform_bits  # the teacher's labels are learnable


@pytest.mark.slow
def test_learner_reference_and_the_mixture_bound(tmp_path):
    y = np.random.default_rng(5).choice(10, 300, p=P)
    data = in_transmission_order(y)
    kw = dict(args=recipe(tmp_path), boundaries=[30, 60, 120], early_stopping=0.0)
    laplace = prequential_code_length(lambda: CountingLearner(10, 1.0), data, **kw)
    # An overconfident learner (α = 1e-4): unseen classes cost ~log2(1e4·n) bits each...
    sharp = prequential_code_length(lambda: CountingLearner(10, 1e-4), data, **kw, code_reference=laplace)
    assert sharp.reference == "learner"
    assert sharp.information_transfer_bits == pytest.approx(laplace.total_bits - sharp.total_bits, abs=1e-9)
    # ... and the ε-mixture caps every item at log2(C / ε) bits.
    mixed = prequential_code_length(lambda: CountingLearner(10, 1e-4), data, **kw, uniform_mixture=0.1)
    coded = sum(mixed.block_items[1:])
    assert mixed.total_bits - mixed.first_block_bits <= coded * math.log2(10 / 0.1)
    with pytest.raises(ValueError, match="boundaries"):
        prequential_code_length(lambda: CountingLearner(10, 1.0), data, args=recipe(tmp_path),
                                boundaries=[30, 150], early_stopping=0.0, code_reference=laplace)


def test_argument_validation_names_the_value(tmp_path):
    data = Items(np.zeros(10, dtype=np.int64))
    make = lambda: CountingLearner(2)  # noqa: E731
    with pytest.raises(ValueError, match="early_stopping .* got 1.0"):
        prequential_code_length(make, data, args=recipe(tmp_path), early_stopping=1.0)
    with pytest.raises(ValueError, match="uniform_mixture .* got -0.1"):
        prequential_code_length(make, data, args=recipe(tmp_path), uniform_mixture=-0.1)
    with pytest.raises(ValueError, match="code_reference .* got 'random'"):
        prequential_code_length(make, data, args=recipe(tmp_path), code_reference="random")
    with pytest.raises(ValueError, match="at least 2 items"):
        prequential_code_length(make, Items(np.zeros(1, dtype=np.int64)), args=recipe(tmp_path))
