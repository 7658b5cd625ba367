"""Seeded directions and importance-sampling proposals (:mod:`hfvolume.volume.proposals`).

Direction i depends only on (seed, i), whatever slice of its coordinates is drawn; the defensive mixture
q = α + (1 − α)·q_ACG bounds every importance weight 1/q by 1/α.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hfvolume.volume.proposals import Proposal, gaussian_direction


def test_direction_slices_match_the_whole_vector():
    d = 3 * (1 << 16) + 17
    full = gaussian_direction(5, d, seed=2)
    part = gaussian_direction(5, d, seed=2, start=70_000, stop=140_001)
    assert torch.equal(full[70_000:140_001], part)


def test_mixture_weights_are_bounded_by_one_over_alpha():
    d = 50
    s = torch.exp(torch.linspace(-3, 3, d, dtype=torch.float64))
    prop = Proposal(torch.log(s) - torch.log(s).mean(), 0.25)
    _, lw = prop.draw(list(range(40)), d, seed=0, dtype=torch.float64, device="cpu")
    assert np.all(lw <= math.log(1 / 0.25) + 1e-12)
