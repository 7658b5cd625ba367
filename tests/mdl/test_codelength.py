"""Core arithmetic of prequential codes against closed forms (oracles O1–O6 on the arithmetic; no Trainer).

The counting learner's online code has the Dirichlet-multinomial closed form; coding in groups and block-wise
prequential codes are exact finite sums. Tolerances are float64 accumulation errors: a sum of N terms of size
≲ log2(N) bits carries ≲ N·ε·log2(N) absolute error (ε = 2⁻⁵²), i.e. ~1e-11 bits for N = 1000.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfvolume.mdl.codelength import (
    CodeLength,
    compression,
    doubling_boundaries,
    information_transfer,
    nats_to_bits,
    resolve_boundaries,
    uniform_bits,
    voita_boundaries,
)
from hfvolume.mdl.counting import counting_code_bits, dirichlet_code_bits, kt_code_bits, laplace_code_bits
from hfvolume.mdl.results import PrequentialResult

P = [0.3, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03]


def seeded_sequences() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 1000 seeded labels, their permutation, and the 10^5 labels drawn next from the same generator."""
    rng = np.random.default_rng(0)
    y = rng.choice(10, 1000, p=P)
    permuted = rng.permutation(y)
    return y, permuted, rng.choice(10, 100_000, p=P)


def test_o1_uniform_code_values():
    assert uniform_bits(1000, 10) == 3321.928094887362
    assert uniform_bits(1, 50_257) == 15.617036934287741
    assert information_transfer(uniform_bits(1000, 10), uniform_bits(1000, 10)) == 0.0
    assert compression(uniform_bits(1000, 10), uniform_bits(1000, 10)) == 1.0
    assert nats_to_bits(math.log(8.0)) == pytest.approx(3.0, abs=1e-15)


def test_o2_laplace_hand_cases_and_seeded_sequence():
    assert laplace_code_bits([2, 1]) == pytest.approx(math.log2(12), abs=1e-12)  # y = (0, 0, 1)
    assert laplace_code_bits([2, 1]) == pytest.approx(3.584962500721156, abs=1e-12)
    assert laplace_code_bits([2, 2]) == pytest.approx(4.906890595608519, abs=1e-12)  # log2 30
    assert counting_code_bits([0, 0, 1], num_classes=2, alpha=1.0) == pytest.approx(math.log2(12), abs=1e-13)
    y, _, _ = seeded_sequences()
    closed = laplace_code_bits(np.bincount(y, minlength=10))
    sequential = counting_code_bits(y, num_classes=10, alpha=1.0)
    assert closed == pytest.approx(2990.811065254262, abs=1e-9)
    assert sequential == pytest.approx(2990.8110652542646, abs=1e-9)
    assert abs(closed - sequential) < 1e-10


def test_o3_kt_values_and_regret_asymptote():
    assert kt_code_bits([2, 1]) == pytest.approx(4.0, abs=1e-13)
    assert counting_code_bits([0, 0, 1], num_classes=2, alpha=0.5) == pytest.approx(4.0, abs=1e-13)
    y, _, _ = seeded_sequences()
    counts = np.bincount(y, minlength=10)
    sequential = counting_code_bits(y, num_classes=10, alpha=0.5)
    assert sequential == pytest.approx(2994.4108432368885, abs=1e-9)
    assert kt_code_bits(counts) == pytest.approx(sequential, abs=1e-10)
    empirical = -sum(c * math.log2(c / 1000) for c in counts if c)
    asymptote = 9 / 2 * math.log2(1000 / (2 * math.pi)) + math.log2(math.pi**5 / math.gamma(5))
    assert sequential - empirical == pytest.approx(36.61, abs=5e-3)
    assert asymptote == pytest.approx(36.59, abs=5e-3)


def test_o4_grouped_code_depends_on_grouping():
    assert counting_code_bits([0, 0, 1, 1], num_classes=2, alpha=1.0, boundaries=[2, 4]) == pytest.approx(6.0, 1e-15)
    # Groups {0, 1}, {0, 1}: the second group is coded by counts (1, 1): 2 + 2 bits.
    assert counting_code_bits([0, 1, 0, 1], num_classes=2, alpha=1.0, boundaries=[2, 4]) == pytest.approx(4.0, 1e-15)


def test_o5_exchangeability():
    y, permuted, _ = seeded_sequences()
    a = counting_code_bits(y, num_classes=10, alpha=1.0)
    b = counting_code_bits(permuted, num_classes=10, alpha=1.0)
    assert abs(a - b) < 1e-10
    assert b == pytest.approx(2990.811065254262, abs=1e-9)


def test_o6_blockwise_voita_schedule_values():
    _, _, y = seeded_sequences()
    bounds = voita_boundaries(100_000)
    assert bounds == (100, 200, 400, 800, 1600, 3200, 6250, 12500, 25000, 50000, 100000)
    block = counting_code_bits(y, num_classes=10, alpha=1.0, boundaries=bounds)
    online = counting_code_bits(y, num_classes=10, alpha=1.0)
    assert block == pytest.approx(291_320.767, abs=5e-4)
    assert online == pytest.approx(291_282.442, abs=5e-4)
    assert uniform_bits(100_000, 10) == pytest.approx(332_192.809, abs=5e-4)
    assert compression(uniform_bits(100_000, 10), block) == pytest.approx(1.1403, abs=5e-5)
    # The first block is sent uniformly: 100 · log2 10 bits.
    assert counting_code_bits(y[:100], num_classes=10, alpha=1.0, boundaries=[100]) == pytest.approx(
        uniform_bits(100, 10), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.sampled_from([0.5, 1.0, 2.5]))
def test_sequential_sum_equals_closed_form(labels, alpha):
    counts = np.bincount(labels, minlength=5)
    assert counting_code_bits(labels, num_classes=5, alpha=alpha) == pytest.approx(
        dirichlet_code_bits(counts, alpha=alpha), rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=40), st.data())
def test_singleton_groups_are_the_online_code_and_one_group_is_uniform(labels, data):
    n = len(labels)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=5)))) + [n]
    grouped = counting_code_bits(labels, num_classes=3, alpha=1.0, boundaries=cuts)
    # Coding group by group equals the sum of the groups coded one after another from the counts before each.
    counts = np.zeros(3)
    by_hand, start = 0.0, 0
    for stop in cuts:
        for y in labels[start:stop]:
            by_hand -= math.log2((counts[y] + 1.0) / (counts.sum() + 3.0))
        counts += np.bincount(labels[start:stop], minlength=3)
        start = stop
    assert grouped == pytest.approx(by_hand, rel=1e-12)
    singles = counting_code_bits(labels, num_classes=3, alpha=1.0, boundaries=list(range(1, n + 1)))
    assert singles == pytest.approx(counting_code_bits(labels, num_classes=3, alpha=1.0), abs=1e-12)
    # One group: every item coded uniformly.
    assert counting_code_bits(labels, num_classes=3, alpha=1.0, boundaries=[n]) == pytest.approx(
        uniform_bits(n, 3), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 10**7))
def test_voita_boundaries_are_increasing_and_end_at_n(n):
    b = voita_boundaries(n)
    assert b[-1] == n and all(x < y for x, y in zip(b, b[1:])) and b[0] >= 1 and len(b) <= 11


def test_boundary_specifications():
    assert doubling_boundaries(1347, first=20) == (20, 40, 80, 160, 320, 640, 1347)
    assert resolve_boundaries([10, 20], 40) == (10, 20, 40)
    assert resolve_boundaries([0.25, 0.5, 1.0], 40) == (10, 20, 40)
    assert resolve_boundaries("doubling", 640) == (10, 20, 40, 80, 160, 320, 640)
    assert voita_boundaries(1347)[:3] == (1, 3, 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        resolve_boundaries([20, 10], 40)
    with pytest.raises(ValueError, match=r"\[1, 40\]"):
        resolve_boundaries([0, 10], 40)
    with pytest.raises(TypeError, match="all ints"):
        resolve_boundaries([1, 0.5], 40)
    with pytest.raises(ValueError, match="'fibonacci'"):
        resolve_boundaries("fibonacci", 40)
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        resolve_boundaries([1.0], 40)


def test_input_validation_names_the_value():
    with pytest.raises(ValueError, match="num_classes must be ≥ 2, got 1"):
        uniform_bits(3, 1)
    with pytest.raises(ValueError, match="code_bits=0.0"):
        compression(10.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        information_transfer(math.nan, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_code_bits([1, 2], alpha=0.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        counting_code_bits([0, 2], num_classes=2, alpha=1.0)
    with pytest.raises(ValueError, match="items must be ≥ 0"):
        CodeLength(1.0, -1.0)


def test_code_length_merges_and_converts():
    total = CodeLength(math.log(2.0) * 3, 2.0) + CodeLength(math.log(2.0), 1.0)
    assert total.items == 3.0 and total.bits == pytest.approx(4.0, abs=1e-15)
    assert total.bits_per_item == pytest.approx(4.0 / 3.0, abs=1e-15)
    with pytest.raises(ValueError, match="no items"):
        CodeLength().bits_per_item


def test_prequential_result_json_round_trip():
    result = PrequentialResult(
        boundaries=(2, 4), block_items=(2.0, 2.0), first_block_bits=2.0, block_bits=(1.5,), total_bits=3.5,
        uniform_bits=4.0, reference="uniform", reference_bits=4.0, information_transfer_bits=0.5,
        compression=4.0 / 3.5, selection_bits=0.0, seconds_per_block=(0.1,), num_classes=2,
        settings={"order_seed": 0},
    )
    assert PrequentialResult.from_json(result.to_json()) == result
    assert result.n_items == 4 and result.bits_per_item == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="inconsistent lengths"):
        PrequentialResult(**{**result.to_dict(), "block_bits": (1.0, 2.0)})
