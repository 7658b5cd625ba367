"""hfvolume: local volume and information content of trained networks.

The local volume of a trained network is the log-probability that a network drawn from a prior lands in the
region of parameter space that behaves like it (Scherlis & Belrose, arXiv 2501.18812). Its negative, in bits, is
the network's information content.
"""
from __future__ import annotations

__version__ = "0.1.0"

from hfvolume.estimator import estimate_log_volume
from hfvolume.priors import GaussianPrior, UniformPrior
from hfvolume.results import DirectionFlag, VolumeResult

__all__ = [
    "DirectionFlag",
    "GaussianPrior",
    "UniformPrior",
    "VolumeResult",
    "__version__",
    "estimate_log_volume",
]
