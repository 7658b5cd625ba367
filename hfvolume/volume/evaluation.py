"""Calling the user's behaviour at points θ0 + t·w along rays, and counting the calls.

The estimator only ever needs Δ(θ0 + t w) = fn(θ0 + t w) − fn(θ0) for a few rays at a time. :class:`BehaviorCalls`
wraps ``fn`` (batched or one point per call), returns float64 and counts forward passes; :class:`RayPoints` forms
the points of one batch of rays in a reusable buffer, or lets a behaviour that can perturb its own weights
(``fn.evaluate_along``) do it without one.
"""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

#: The behaviour: ``fn([D]) → scalar``, or with ``batched=True`` ``fn([K, D]) → [K]``.
Behavior = Callable[[torch.Tensor], Union[torch.Tensor, float]]


class BehaviorCalls:
    """Calls the user's fn on ``[k, D]`` points (batched or one row at a time) and returns float64 values.

    ``calls`` counts the points evaluated (the forward passes of the result).
    """

    def __init__(self, fn: Behavior, batched: bool):
        self.fn, self.batched, self.calls = fn, batched, 0

    def __call__(self, points: torch.Tensor) -> np.ndarray:
        """``[k]`` float64 values of fn at the ``[k, D]`` rows of ``points``, under ``torch.no_grad()``."""
        with torch.no_grad():
            if self.batched:
                out = torch.as_tensor(self.fn(points)).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
                if out.numel() != points.shape[0]:
                    raise ValueError(
                        f"batched fn returned {out.numel()} values for {points.shape[0]} points; expected shape [K]"
                    )
            else:
                vals = []
                for row in points:
                    v = torch.as_tensor(self.fn(row)).detach().to(device="cpu", dtype=torch.float64)
                    if v.numel() != 1:
                        raise ValueError(f"fn must return a scalar, got a value of shape {tuple(v.shape)}")
                    vals.append(v.reshape(()))
                out = torch.stack(vals)
        self.calls += points.shape[0]
        return out.numpy()

    def along(self, theta0: torch.Tensor, w: torch.Tensor, rows: np.ndarray, ts: np.ndarray) -> np.ndarray | None:
        """Values at θ0 + ts[j]·w[rows[j]] from ``fn.evaluate_along(θ0, [1, D] direction, [t])`` when a batched
        fn offers it and accepts (one row per call: a view of ``w``, never a gathered copy), else None."""
        method = getattr(self.fn, "evaluate_along", None) if self.batched else None
        if method is None:
            return None
        values = []
        with torch.no_grad():
            for r, t in zip(rows.tolist(), ts.tolist()):
                out = method(theta0, w[r : r + 1], [float(t)])
                if out is None:
                    if values:
                        raise RuntimeError("evaluate_along accepted some rows of a round and declined others")
                    return None
                out = torch.as_tensor(out).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
                if out.numel() != 1:
                    raise ValueError(f"evaluate_along returned {out.numel()} values for 1 point")
                values.append(float(out[0]))
                self.calls += 1
        return np.asarray(values, dtype=np.float64)


class RayPoints:
    """Δ along the ``[K, D]`` unit directions ``w`` of one batch: the ``evaluate`` callback of the radius search.

    Points are formed in one ``[K, D]`` buffer, refilled every round, because fresh D-sized allocations each round
    cost more (page faults) than the arithmetic for large models; θ0 itself is never written to, so repeated
    perturbations cannot drift. The buffer is allocated on the first round that needs it: a behaviour that
    evaluates θ0 + t·w itself (``evaluate_along``) is asked first and spares it.
    """

    def __init__(self, behavior: BehaviorCalls, theta0: torch.Tensor, w: torch.Tensor, f0: float):
        self.behavior, self.theta0, self.w, self.f0 = behavior, theta0, w, f0
        self._points: torch.Tensor | None = None

    def __call__(self, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """``[k]`` values Δ = fn(θ0 + ts[j]·w[rows[j]]) − fn(θ0), float64."""
        along = self.behavior.along(self.theta0, self.w, rows, ts)
        if along is not None:
            return along - self.f0
        if self._points is None:
            self._points = torch.empty_like(self.w)
        for j, (r, t) in enumerate(zip(rows.tolist(), ts.tolist())):
            torch.add(self.theta0, self.w[r], alpha=t, out=self._points[j])
        return self.behavior(self._points[: len(rows)]) - self.f0


__all__ = ["Behavior", "BehaviorCalls", "RayPoints"]
