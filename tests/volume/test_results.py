"""What a result says about its own reliability: Pareto k̂, the running estimate, and when a ± is reported."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hfvolume import estimate_log_volume
from hfvolume.volume.results import VolumeResult
from hfvolume.volume.stats import std_upper_bound_factor


def _result(log_estimates, *, std: float = 1.5) -> VolumeResult:
    est = tuple(float(x) for x in log_estimates)
    n = len(est)
    return VolumeResult(
        log_volume=float(np.log(np.mean(np.exp(np.array(est) - max(est))))) + max(est),
        information_content_bits=0.0, log_volume_lower_bound=0.0, confidence=0.95, ess=1.0, log_volume_std=std,
        norm_term=0.0, n_params=3, n_directions=n, forward_passes=n, wall_time_s=0.0, log_estimates=est,
        radii=(1.0,) * n, deltas=(0.0,) * n, log_weights=(0.0,) * n, flags=("converged",) * n,
        evaluations=(1,) * n, nonfinite=(0,) * n)


def test_too_few_directions_withhold_the_spread():
    r = _result(np.linspace(-3.0, 0.0, 16))
    assert math.isnan(r.pareto_k) and r.reliability == "too_few_samples"
    assert math.isnan(r.reported_log_volume_std) and "too few" in r.std_withheld_reason


def test_heavy_tails_withhold_the_spread():
    # Log estimates spread over thousands of nats, as on real networks: one direction decides the mean.
    r = _result(np.random.default_rng(0).normal(-5000.0, 800.0, 128))
    assert r.pareto_k > 0.7 and r.reliability == "unreliable"
    assert math.isnan(r.reported_log_volume_std) and "no finite variance" in r.std_withheld_reason
    assert "far too low" in r.pareto.message


def test_light_tails_report_an_upper_bound_on_the_spread():
    r = _result(np.random.default_rng(1).normal(0.0, 0.05, 128), std=0.02)
    assert r.pareto_k < 0.5 and r.std_withheld_reason is None
    assert r.reported_log_volume_std == pytest.approx(0.02 * std_upper_bound_factor(128))
    assert r.reported_log_volume_std > r.log_volume_std


def test_summary_and_serialisation_carry_the_diagnostics():
    r = _result(np.random.default_rng(2).normal(-50.0, 5.0, 64))
    summary = r.summary()
    assert summary["pareto_k"] == r.pareto_k and summary["reliability"] == r.reliability
    assert VolumeResult.from_dict(r.to_dict()) == r  # derived values are not stored fields
    assert f"pareto_k={r.pareto_k:.3g}" in repr(r)


def test_running_estimate_ends_at_the_estimate():
    h = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    anchor = torch.zeros(3, dtype=torch.float64)
    result = estimate_log_volume(lambda t: 0.5 * (t * t * h).sum(-1), anchor, cutoff=0.1, prior="uniform",
                                 n_directions=40, batched=True, batch_size=8, progress=False)
    running = result.running_log_volume
    assert len(running) == 40 and running[-1] == pytest.approx(result.log_volume, abs=1e-9)
    assert running[0] == result.log_estimates[0]
