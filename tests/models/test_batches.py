"""Tests for hfvolume.models.batches: the one walker over nested batches, and materialising data once."""
from __future__ import annotations

import random
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hfvolume.models.batches import (
    first_tensor,
    map_batch,
    materialize_batches,
    split_batch,
    take_first,
    to_device,
    walk,
)

Pair = namedtuple("Pair", ["x", "y"])


def test_walk_visits_parents_before_children_in_order():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    batch = {"a": a, "rest": [b, {"c": c}], "name": "s"}
    nodes = list(walk(batch))
    assert nodes[0] is batch and nodes[1] is a and nodes[2] is batch["rest"] and nodes[3] is b
    assert nodes[4] is batch["rest"][1] and nodes[5] is c and nodes[6] == "s" and len(nodes) == 7


def test_map_batch_rebuilds_containers_and_walks_like_structures_in_step():
    batch = {"p": Pair(torch.zeros(2), [torch.ones(2), 3]), "t": (torch.ones(1),)}
    doubled = map_batch(lambda v: v * 2 if isinstance(v, torch.Tensor) else v, batch)
    assert type(doubled) is dict and type(doubled["p"]) is Pair and type(doubled["t"]) is tuple
    assert torch.equal(doubled["p"].y[0], torch.full((2,), 2.0)) and doubled["p"].y[1] == 3  # non-tensors kept
    dims = {"p": 0, "t": None}
    seen = map_batch(lambda v, d: (type(v).__name__, d), batch, dims, depth=1)  # nested values handed over whole
    assert seen == {"p": ("Pair", 0), "t": ("tuple", None)}
    whole = map_batch(lambda v: "leaf", batch, leaf=lambda v: isinstance(v, list))
    assert whole["p"].y == "leaf" and whole["t"] == ("leaf",)


def test_take_first_slices_per_example_entries_only():
    batch = {"input_ids": torch.arange(8).reshape(4, 2), "scale": torch.tensor(3.0), "text": ["a", "b", "c", "d"],
             "pair": Pair(torch.arange(4), torch.arange(5))}
    cut = take_first(batch, 2, 4)
    assert torch.equal(cut["input_ids"], torch.arange(4).reshape(2, 2)) and cut["scale"].ndim == 0
    assert cut["text"] == ["a", "b"] and torch.equal(cut["pair"].x, torch.arange(2))
    assert torch.equal(cut["pair"].y, torch.arange(5))  # leading size 5 ≠ 4: not per example


def test_first_tensor_prefers_the_input_keys():
    labels, ids = torch.zeros(3), torch.ones(3, 5)
    assert first_tensor({"labels": labels, "input_ids": ids}) is ids
    assert first_tensor({"scalar": torch.tensor(1.0), "nested": [{"x": ids}]}) is ids
    assert first_tensor({"n": 3}) is None


def test_split_batch_and_to_device():
    x = torch.ones(2)
    assert split_batch({"a": x}) == ((), {"a": x}) and split_batch([x]) == ((x,), {}) and split_batch(x) == ((x,), {})
    with pytest.raises(TypeError, match="a batch must be"):
        split_batch("text")
    moved = to_device({"a": [x]}, torch.device("cpu"), depth=1)
    assert moved["a"][0] is x


def test_materialize_keeps_global_rng_and_truncates_to_max_examples():
    loader = DataLoader(TensorDataset(torch.arange(10.0).reshape(10, 1)), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    batches, truncated = materialize_batches(loader, torch.device("cpu"), max_examples=6)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert truncated and [b[0].shape[0] for b in batches] == [4, 2]
    with pytest.raises(ValueError, match="data is empty"):
        materialize_batches([], torch.device("cpu"))
    with pytest.raises(ValueError, match="no tensor"):
        materialize_batches([{"n": 3}], torch.device("cpu"))
