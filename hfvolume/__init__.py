"""hfvolume: local volume and information content of trained networks.

The local volume of a trained network is the log-probability that a network drawn from a prior lands in the
region of parameter space that behaves like it (Scherlis & Belrose, arXiv 2501.18812). Its negative, in bits, is
the network's information content.
"""
from __future__ import annotations

import os as _os

from hfvolume.integrations.callback import LocalVolumeCallback, LocalVolumeConfig, volume_series
from hfvolume.integrations.modelcard import update_model_card
from hfvolume.mdl import OnlineCodeCallback, OnlineCodeConfig, prequential_code_length
from hfvolume.measure.local_volume import estimate_local_volume
from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.fisher import fisher_diagonal
from hfvolume.models.optim_state import adam_scales, optimizer_state_from_checkpoint
from hfvolume.models.params import ParameterView
from hfvolume.models.scales import RelativeEps
from hfvolume.volume.estimator import estimate_log_volume
from hfvolume.volume.priors import GaussianPrior, UniformPrior
from hfvolume.volume.results import DirectionFlag, VolumeResult

__version__ = "0.1.0"

# Directory of the evaluate module: ``evaluate.load(hfvolume.METRIC_PATH)`` works offline.
METRIC_PATH = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "integrations", "metrics", "local_volume")

__all__ = [
    "DirectionFlag",
    "GaussianPrior",
    "LocalVolumeCallback",
    "LocalVolumeConfig",
    "METRIC_PATH",
    "ModelBehavior",
    "OnlineCodeCallback",
    "OnlineCodeConfig",
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
    "prequential_code_length",
    "update_model_card",
    "volume_series",
]
