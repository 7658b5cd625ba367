"""Description length of the training labels: prequential (online) codes and information transfer L_IT.

* :class:`OnlineCodeCallback` / :class:`OnlineCodeConfig`: the first-pass online code read from the Trainer's own
  forward passes (each item coded by the weights before the step that trains on it), and
  ``L_IT = L_ref − L_online`` (Zhang, Li, Dou & Wu, arXiv 2009.07624), logged like any training metric.
* :func:`prequential_code_length`: the exact block-wise prequential code (Blier & Ollivier, arXiv 1802.07044;
  Voita & Titov, arXiv 2003.12298), retraining from scratch on each prefix.
* The arithmetic (:mod:`hfvolume.mdl.codelength`, :mod:`hfvolume.mdl.counting`) is plain float64 with no Hugging
  Face imports; :func:`item_nll` is the per-item code length of a batch of logits.
"""
from __future__ import annotations

from hfvolume.mdl.blockwise import prequential_code_length
from hfvolume.mdl.callback import OnlineCodeCallback, OnlineCodeConfig
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
from hfvolume.mdl.nll import ItemNll, count_items, item_nll
from hfvolume.mdl.results import PrequentialResult

__all__ = [
    "CodeLength",
    "ItemNll",
    "OnlineCodeCallback",
    "OnlineCodeConfig",
    "PrequentialResult",
    "compression",
    "count_items",
    "counting_code_bits",
    "dirichlet_code_bits",
    "doubling_boundaries",
    "information_transfer",
    "item_nll",
    "kt_code_bits",
    "laplace_code_bits",
    "nats_to_bits",
    "prequential_code_length",
    "resolve_boundaries",
    "uniform_bits",
    "voita_boundaries",
]
