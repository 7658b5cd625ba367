"""item_nll: the per-item code length of a batch of logits (scored-position rules, chunking, mixture, multi-label),
and the eval-mode dataset pass of the "initial" reference (no trace left on modes or RNG)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mdl_problems import Logistic, teacher_data

from hfvolume.mdl.evaluation import dataset_code, preserved_rng_and_modes, rank_batches
from hfvolume.mdl.nll import count_items, item_nll
from hfvolume.models.outputs import scored_position_mask


def lm_batch(seed: int = 0, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, vocab, generator=g)
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels[1, 5:] = -100
    labels[2, :2] = -100
    return logits, {"labels": labels, "attention_mask": mask}


def test_classifier_rows_are_cross_entropy_and_ignore_minus_100():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, -100, 1, 2])
    out = item_nll(logits, {"labels": labels}, per_row=True)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
    assert torch.equal(out.nats, expected) and out.nats.dtype == torch.float64
    assert out.items.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0] and out.num_classes == 4
    total = item_nll(logits, {"labels": labels})
    assert total.nats.dim() == 0 and float(total.nats) == pytest.approx(float(expected.sum()), rel=1e-15)


def test_causal_shift_uses_the_kl_behaviours_scored_positions():
    logits, batch = lm_batch()
    out = item_nll(logits, batch, causal=True, per_row=True)
    mask = scored_position_mask(batch, (3, 7), device=torch.device("cpu"), causal=True, encoder_decoder=False)
    assert out.items.tolist() == mask.sum(1).double().tolist()
    assert not mask[:, -1].any()  # the last position has no next label
    target = torch.full((3, 7), -100)
    target[:, :-1] = batch["labels"][:, 1:]
    target[~mask] = -100
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), reduction="none")
    assert torch.allclose(out.nats, ce.double().reshape(3, 7).sum(1), rtol=1e-12, atol=0)
    # Non-causal (token classification): labels align with the logits.
    plain = item_nll(logits, batch, causal=False, per_row=True)
    assert plain.items.tolist() == [7.0, 5.0, 5.0]
    # shift_labels are used as given.
    shifted = item_nll(logits, {**batch, "shift_labels": target}, causal=True, per_row=True)
    assert torch.equal(shifted.nats, out.nats)
    assert float(count_items(logits, batch, causal=True)) == float(mask.sum())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_chunking_does_not_change_the_values(working_memory, dtype):
    logits, batch = lm_batch(seed=working_memory % 7)
    logits = logits.to(dtype)
    one = item_nll(logits, batch, causal=True, per_row=True, working_memory=2**30)
    chunked = item_nll(logits, batch, causal=True, per_row=True, working_memory=working_memory)
    # Each position's −ln p is computed alone (a row of a chunk), then summed in the same order: equal bits.
    assert torch.equal(one.nats, chunked.nats) and torch.equal(one.items, chunked.items)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 0.9), st.floats(0.0, 30.0))
def test_mixture_caps_the_cost_of_any_item(eps, scale):
    logits, batch = lm_batch(seed=3)
    out = item_nll(logits * scale, batch, causal=True, per_row=True, mixture=eps)
    per_item = out.nats / out.items
    # float32 logits: each item's value carries a relative rounding error of a few float32 ulps.
    assert torch.all(per_item <= math.log(11 / eps) * (1 + 1e-6))
    plain = item_nll(logits * scale, batch, causal=True, per_row=True)
    # (1 − ε) p + ε / C ≥ (1 − ε) p: at most −ln(1 − ε) nats more than the plain code per item.
    assert torch.all(out.nats <= (plain.nats + out.items * -math.log1p(-eps)) * (1 + 1e-6))


def test_multi_label_is_independent_bernoullis():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3, generator=g)
    labels = (torch.rand(4, 3, generator=g) > 0.5).float()
    out = item_nll(logits, {"labels": labels}, multi_label=True, per_row=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").double().sum(1)
    assert torch.allclose(out.nats, bce, rtol=1e-12) and out.items.tolist() == [3.0] * 4 and out.num_classes == 2
    zero = item_nll(torch.zeros(4, 3, dtype=torch.float64), {"labels": labels}, multi_label=True)
    assert float(zero.nats) / math.log(2) == pytest.approx(12.0, rel=1e-12)  # 1 bit per label is uniform


def test_bad_inputs_are_refused_with_the_value():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="regression or soft-label"):
        item_nll(logits, {"labels": torch.tensor([0.5, 1.0])})
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) do not match logits of shape \(2, 3\)"):
        item_nll(logits, {"labels": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match="C ≥ 2"):
        item_nll(torch.zeros(2, 1), {"labels": torch.tensor([0, 0])})
    with pytest.raises(ValueError, match="no labels"):
        item_nll(logits, {})
    with pytest.raises(ValueError, match="mixture must be in"):
        item_nll(logits, {"labels": torch.tensor([0, 1])}, mixture=1.0)
    with pytest.raises(ValueError, match="working_memory .* got -1"):
        item_nll(logits, {"labels": torch.tensor([0, 1])}, working_memory=-1)


def test_dataset_pass_shares_batches_over_ranks_and_leaves_no_trace():
    data = teacher_data(50, seed=1)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    model.train()
    logistic = Logistic(20, 4)
    logistic.train()
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    kind = lambda m: (False, False, False)  # noqa: E731
    whole = dataset_code(logistic, data, None, batch_size=8, device=torch.device("cpu"), kind=kind)
    parts = [dataset_code(logistic, data, None, batch_size=8, device=torch.device("cpu"), kind=kind, rank=r, world=3)
             for r in range(3)]
    assert logistic.training  # flags restored
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert float(sum(p[1] for p in parts)) == float(whole[1]) == 50.0
    assert float(sum(p[0] for p in parts)) == pytest.approx(float(whole[0]), rel=1e-13)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(logistic(data.x)["logits"], torch.tensor(data.labels), reduction="sum")
    assert float(whole[0]) == pytest.approx(float(ce), rel=1e-12)
    # 7 batches over 3 ranks: every rank runs 3 forwards (FSDP's collectives pair up), real batches 3, 2, 2.
    assert [rank_batches(50, 8, r, 3)[1] for r in range(3)] == [3, 3, 3]
    assert [len(rank_batches(50, 8, r, 3)[0]) for r in range(3)] == [3, 2, 2]
    with preserved_rng_and_modes(model):
        model.eval()
        torch.rand(3)
    assert model.training and torch.equal(torch.get_rng_state(), states[0])
