"""Test data for the model-card tests: self-consistent VolumeResults with the estimator's real settings shape.

``make_result`` computes the summary from per-direction log estimates as the estimator does (log-mean-exp, ESS,
Markov bound, bootstrap std), and its ``settings`` have exactly the keys and nesting ``estimate_local_volume``
records (``settings["behavior"]["behavior"]`` names the behaviour; ``settings["parameters"]["tensors"]`` lists every
measured tensor), so the card code is tested on the shape real runs produce.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from hfvolume.volume.results import VolumeResult

TOKEN = "hf_TESTsecretTOKEN0123456789abcdef"

# The 64-64-64-10 digits MLP's tensors (D = 8,970), as ParameterView.describe() lists them.
DIGITS_TENSORS = (("mlp.0.weight", [64, 64]), ("mlp.0.bias", [64]), ("mlp.2.weight", [64, 64]), ("mlp.2.bias", [64]),
                  ("mlp.4.weight", [10, 64]), ("mlp.4.bias", [10]))


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))


def real_settings(*, seed: int, n: int, n_params: int, delta: float, prior_info: dict[str, Any],
                  tensors: tuple[tuple[str, list[int]], ...] = DIGITS_TENSORS) -> dict[str, Any]:
    """Settings with the shape estimate_local_volume records (values of the digits MLP's main job)."""
    return {
        "seed": seed,
        "cutoff": 0.01,
        "rtol": 0.05,
        "prior": prior_info,
        "proposal": {"name": "isotropic", "mixture": 0.0},
        "radius_method": "secant",
        "n_params": n_params,
        "n_directions": n,
        "initial_radius": 0.1181,
        "max_evaluations": 64,
        "delta": delta,
        "dtype": "float32",
        "world_size": 1,
        "behavior": {
            "behavior": "kl", "n_batches": 4, "n_examples": 449, "n_scored": 449, "max_batches": None,
            "max_examples": None, "last_batch_truncated": False, "causal_lm_label_shift": False, "anchor_value": 0.0,
            "anchor_cache": "device", "anchor_cache_bytes": 17960, "path": "vmap", "path_reason": None,
            "vmap_error": None, "directions_per_pass": 64, "pad_chunks": False, "row_bytes_estimate": 131072,
            "row_invariance_check": "passed", "compute_dtype": "float32", "n_params": n_params, "forward_passes": 6,
        },
        "parameters": {
            "n_params": n_params, "n_tensors": len(tensors), "dtype": "float32", "device": "cpu",
            "selection": "trainable",
            "tensors": [{"name": name, "shape": shape, "numel": int(np.prod(shape)), "dtype": "float32"}
                        for name, shape in tensors],
            "tied": {},
        },
        "working_memory": 33554432,
    }


def make_result(
    log_volume: float,
    *,
    spread: float = 2.0,
    n: int = 64,
    n_params: int = 8970,
    seed: int = 0,
    n_unbounded: int = 0,
    n_failed: int = 0,
    n_saturated: int = 0,
    delta: float = 0.05,
    prior: str = "gaussian",
    tensors: tuple[tuple[str, list[int]], ...] = DIGITS_TENSORS,
) -> VolumeResult:
    """A self-consistent VolumeResult: the summary is computed from per-direction log estimates drawn around
    ``log_volume`` (log-mean-exp, ESS, Markov bound, bootstrap std), as the estimator would."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, spread, n)
    est = noise - (_logsumexp(noise) - math.log(n)) + log_volume  # log-mean-exp(est) == log_volume exactly
    lme = _logsumexp(est) - math.log(n)
    ess = math.exp(2 * _logsumexp(est) - _logsumexp(2 * est))
    boot = [_logsumexp(est[rng.integers(0, n, n)]) - math.log(n) for _ in range(200)]
    flags = ["converged"] * n
    for i in range(n_unbounded):
        flags[i] = "unbounded"
    for i in range(n_failed):
        flags[n - 1 - i] = "failed"
    for i in range(n_saturated):
        flags[n_unbounded + i] = "saturated"
    evaluations = tuple(int(v) for v in rng.integers(6, 14, n))
    prior_info = (
        {"name": "gaussian", "sigma": 0.1317, "sigma_rms": 0.1317, "mean": "origin"}
        if prior == "gaussian"
        else {"name": "uniform", "max_radius": 100.0}
    )
    return VolumeResult(
        log_volume=lme,
        information_content_bits=-lme / math.log(2),
        log_volume_lower_bound=lme - math.log(1 / delta),
        confidence=1 - delta,
        ess=ess,
        log_volume_std=float(np.std(boot)),
        norm_term=-n_params / 2 if prior == "gaussian" else 0.0,
        n_params=n_params,
        n_directions=n,
        forward_passes=sum(evaluations) + 1,
        wall_time_s=round(0.02 * sum(evaluations), 2),
        log_estimates=tuple(float(v) for v in est),
        radii=tuple(float(v) for v in rng.uniform(0.5, 3.0, n)),
        deltas=tuple(float(v) for v in rng.uniform(0.0095, 0.0105, n)),
        log_weights=(0.0,) * n,
        flags=tuple(flags),
        evaluations=evaluations,
        nonfinite=(0,) * n,
        settings=real_settings(seed=seed, n=n, n_params=n_params, delta=delta, prior_info=prior_info,
                               tensors=tensors),
    )


def example_series() -> list[tuple[int, VolumeResult]]:
    """A made-up but plausible series for the 64-64-64-10 digits MLP (D = 8,970, Gaussian prior at σ = RMS of the
    weights, so the norm term is −D/2): the volume shrinks as training pins the network down. The early points carry
    flags (a failed direction, ESS < 2), to show how they are reported."""
    remainder = {100: -310.0, 200: -455.0, 400: -610.0, 800: -742.0, 1600: -838.0}
    spread = {100: 5.5, 200: 3.0, 400: 2.6, 800: 2.2, 1600: 2.0}
    return [
        (
            step,
            make_result(-8970 / 2 + rem, spread=spread[step], seed=step, n_failed=1 if step == 100 else 0,
                        n_saturated=2 if step >= 800 else 0),
        )
        for step, rem in remainder.items()
    ]


def series3() -> list[tuple[int, VolumeResult]]:
    return [(10, make_result(-4700.0, seed=1)), (20, make_result(-4800.0, seed=2)), (30, make_result(-4900.0, seed=3))]


USER_CARD = """---
license: mit
language: en
tags:
- vision
- digits
datasets:
- digits
pipeline_tag: image-classification
custom_field:
  nested: [1, 2, 3]
  note: keep me
model-index:
- name: my-digits-net
  results:
  - task:
      type: image-classification
      name: Image Classification
    dataset:
      type: digits
      name: Digits
      split: test
    metrics:
    - type: accuracy
      value: 0.973
      name: Test accuracy
---

# My digits net

Some *user* text that hfvolume must keep, byte for byte.

## Training

Trained for a while.
"""


def body(card: str) -> str:
    """The card's text after its front matter (``\\n`` line endings)."""
    match = re.match(r"^\s*---\n.*?\n---\n", card, re.S)
    assert match
    return card[match.end() :]


def front_matter(card: str) -> str:
    """The card's YAML front matter, without the ``---`` lines."""
    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---\r?\n", card, re.S)
    assert match
    return match.group(1)


__all__ = [
    "DIGITS_TENSORS",
    "TOKEN",
    "USER_CARD",
    "body",
    "example_series",
    "front_matter",
    "make_result",
    "real_settings",
    "series3",
]
