"""hfvolume: local volume and information content of trained networks.

The local volume of a trained network is the log-probability that a network drawn from a prior lands in the
region of parameter space that behaves like it (Scherlis & Belrose, arXiv 2501.18812). Its negative, in bits, is
the network's information content.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# Directory of the evaluate module: ``evaluate.load(hfvolume.METRIC_PATH)`` works offline.
METRIC_PATH = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "metrics", "local_volume")

from hfvolume.behaviors import ModelBehavior
from hfvolume.callback import LocalVolumeCallback, LocalVolumeConfig, volume_series
from hfvolume.estimator import estimate_log_volume
from hfvolume.fisher import fisher_diagonal
from hfvolume.local_volume import estimate_local_volume
from hfvolume.modelcard import update_model_card
from hfvolume.optim_state import RelativeEps, adam_scales, optimizer_state_from_checkpoint
from hfvolume.params import ParameterView
from hfvolume.priors import GaussianPrior, UniformPrior
from hfvolume.results import DirectionFlag, VolumeResult

__all__ = [
    "DirectionFlag",
    "GaussianPrior",
    "LocalVolumeCallback",
    "LocalVolumeConfig",
    "METRIC_PATH",
    "ModelBehavior",
    "ParameterView",
    "RelativeEps",
    "UniformPrior",
    "VolumeResult",
    "__version__",
    "adam_scales",
    "estimate_local_volume",
    "estimate_log_volume",
    "fisher_diagonal",
    "optimizer_state_from_checkpoint",
    "update_model_card",
    "volume_series",
]
