"""Cumulant propagation: expected outputs and tail probabilities of MLPs under Gaussian inputs, without sampling.

Wu, Lecomte, Winer, Robinson, Hilton, Christiano, *Estimating the expected output of wide random MLPs more
efficiently than sampling* (arXiv 2605.05179). Pure float64 tensor code: no Hugging Face import in the core
(Hugging Face blocks are recognised by class name in :mod:`.adapters`).
"""
from __future__ import annotations

from hfvolume.cumulants.activations import Activation, wick_coefficients
from hfvolume.cumulants.adapters import mlp_parts
from hfvolume.cumulants.flops import FlopCount, forward_flops
from hfvolume.cumulants.gaussian import GaussianInput
from hfvolume.cumulants.layers import Affine, UnsupportedModelError, mlp_layers
from hfvolume.cumulants.montecarlo import monte_carlo, monte_carlo_tails
from hfvolume.cumulants.propagate import METHODS, propagate
from hfvolume.cumulants.report import InitHealthReport, init_health_report
from hfvolume.cumulants.results import CumulantResult, LayerMoments, TailProbability
from hfvolume.cumulants.tails import edgeworth_tail, expected_output, tail_probability

__all__ = [
    "Activation",
    "Affine",
    "CumulantResult",
    "FlopCount",
    "GaussianInput",
    "InitHealthReport",
    "LayerMoments",
    "METHODS",
    "TailProbability",
    "UnsupportedModelError",
    "edgeworth_tail",
    "expected_output",
    "forward_flops",
    "init_health_report",
    "mlp_layers",
    "mlp_parts",
    "monte_carlo",
    "monte_carlo_tails",
    "propagate",
    "tail_probability",
    "wick_coefficients",
]
