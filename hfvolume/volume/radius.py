"""Radius search along rays: ρ(w), the first radius where Δ(θ0 + t w) reaches the cutoff ε.

ρ(w) is the upper limit of the ray integral f(w) = |S^{D−1}| ∫_0^{ρ(w)} p(θ0 + t w) t^{D−1} dt of the local
volume (Scherlis & Belrose 2025, arXiv 2501.18812), and the polar Jacobian t^{D−1} turns a relative error r in ρ
into an error of about D·r nats in log f(w): returning a radius that was never evaluated (say the next guess of a
bisection, up to 2× too large) costs up to D·ln 2 nats for that direction.

Contract: every returned radius is a point where Δ **was evaluated**, and either |Δ − ε| ≤ rtol·ε there
(``converged``), or the ray is flagged: ``saturated`` / ``unbounded`` (still inside at the prior's cap), or
``failed`` (no such point found within the budget, e.g. Δ jumps over the cutoff; the last evaluated point inside
the region is returned, so the estimate is conservative). The search never returns an unevaluated guess.

Methods:
* ``secant`` (default): near θ0, Δ ≈ ½ t² wᵀHw, so log Δ is close to linear in log t with slope 2. Steps are
  taken in (log t, log Δ − log ε): slope-2 (or measured-slope) extrapolation until the crossing is bracketed, then
  Illinois false position (Dowell & Jarratt 1971, BIT 11) with a bisection safeguard. Quadratic rays converge in
  1–2 evaluations from a good start.
* ``bisection``: the research code's method, kept as a baseline — double (or halve) t until the crossing is
  bracketed, then bisect in t.

NaN/inf values of Δ count as outside the region; they are counted per ray and never enter an estimate.
Many rays advance in lockstep so that each round is one batched call of the behaviour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from hfvolume.volume.checks import check_choice
from hfvolume.volume.results import DirectionFlag

RadiusMethod = Literal["secant", "bisection"]
RADIUS_METHODS = ("secant", "bisection")

_MAX_LOG_STEP = math.log(100.0)  # never move more than ×100 in one extrapolation step
_MIN_LOG_STEP = math.log(1.0 + 1e-3)
_FLAT_LOG_STEP = math.log(10.0)  # step when Δ ≤ 0 gives no slope information
_NONFINITE_LOG_STEP = math.log(4.0)
_MIN_BRACKET = 1e-12  # relative bracket width in t below which Δ is treated as discontinuous
_SLOPE_RANGE = (0.5, 8.0)


@dataclass(frozen=True)
class RadiusSearchResult:
    """Per-ray outcome of a radius search; every array has shape ``[K]``."""

    radius: np.ndarray  # float64, where Δ was evaluated (0 when no inside point was ever found)
    delta: np.ndarray  # float64, Δ at that radius
    flag: np.ndarray  # object array of DirectionFlag
    evaluations: np.ndarray  # int64, calls of Δ used by the ray
    nonfinite: np.ndarray  # int64, NaN/inf values met


class _Ray:
    """State of one ray's search; pure Python because K is small and the forward passes dominate."""

    def __init__(self, t0: float, cutoff: float, rtol: float, cap: float, method: str, max_evaluations: int,
                 cap_exact: bool = True):
        self.log_eps = math.log(cutoff)
        self.cutoff, self.rtol, self.method, self.max_evaluations = cutoff, rtol, method, max_evaluations
        # cap_exact=False: `cap` is only a lower bound of the true cap, to be replaced (set_cap) before any point
        # at or beyond it is evaluated.
        self.cap, self.cap_exact = cap, cap_exact
        self.proposed = t0  # next radius before clamping to the cap
        self.lo: tuple[float, float, float] | None = None  # (t, f = log Δ − log ε, Δ) inside, largest so far
        self.hi: tuple[float, float] | None = None  # (t, f) outside, smallest so far; f = inf for NaN/inf
        self.prev_lo: tuple[float, float] | None = None
        self.prev_hi: tuple[float, float] | None = None
        self.illinois_side = 0  # +1 / −1: side replaced last; repeated side → halve the other side's f
        self.illinois_scale = 1.0
        self.evaluations = 0
        self.nonfinite = 0
        self.done = False
        self.flag = DirectionFlag.FAILED
        self.radius, self.delta = 0.0, 0.0

    @property
    def next_t(self) -> float:
        return min(self.proposed, self.cap)

    @property
    def needs_cap(self) -> bool:
        return not self.cap_exact and self.proposed >= self.cap

    def set_cap(self, cap: float) -> None:
        self.cap, self.cap_exact = cap, True

    def _finish(self, flag: DirectionFlag, t: float, delta: float) -> None:
        self.done, self.flag, self.radius, self.delta = True, flag, t, delta

    def _fail(self) -> None:
        t, _, delta = self.lo if self.lo is not None else (0.0, -math.inf, 0.0)
        self._finish(DirectionFlag.FAILED, t, delta)

    def update(self, t: float, delta: float, cap_flag: DirectionFlag) -> None:
        self.evaluations += 1
        if not math.isfinite(delta):
            self.nonfinite += 1
            outside, f = True, math.inf
        elif abs(delta - self.cutoff) <= self.rtol * self.cutoff:
            self._finish(DirectionFlag.CONVERGED, t, delta)
            return
        else:
            outside = delta > self.cutoff
            f = math.log(delta) - self.log_eps if delta > 0 else -math.inf
        if outside:
            if self.hi is None or t < self.hi[0]:
                self.prev_hi, self.hi = self.hi, (t, f)
            side = +1
        else:
            if t >= self.cap:
                self._finish(cap_flag, t, delta)
                return
            if self.lo is None or t > self.lo[0]:
                self.prev_lo = None if self.lo is None else self.lo[:2]
                self.lo = (t, f, delta)
            side = -1
        self.illinois_scale = 0.5 * self.illinois_scale if side == self.illinois_side else 1.0
        self.illinois_side = side
        if self.evaluations >= self.max_evaluations:
            self._fail()
            return
        if self.lo is not None and self.hi is not None and self.hi[0] - self.lo[0] <= _MIN_BRACKET * self.hi[0]:
            self._fail()
            return
        self.proposed = self._propose()

    # ------------------------------------------------------------------------------------------ proposals
    def _propose(self) -> float:
        return self._propose_bisection() if self.method == "bisection" else self._propose_secant()

    def _propose_bisection(self) -> float:
        if self.hi is None:
            return 2.0 * self.lo[0]  # type: ignore[index]
        if self.lo is None:
            return 0.5 * self.hi[0]
        return 0.5 * (self.lo[0] + self.hi[0])

    @staticmethod
    def _slope(p: tuple[float, float] | None, q: tuple[float, float]) -> float:
        if p is None or not (math.isfinite(p[1]) and math.isfinite(q[1])) or p[0] == q[0]:
            return 2.0  # Δ ≈ ½ t² wᵀHw near the anchor
        s = (q[1] - p[1]) / (math.log(q[0]) - math.log(p[0]))
        return min(max(s, _SLOPE_RANGE[0]), _SLOPE_RANGE[1]) if math.isfinite(s) and s > 0 else 2.0

    def _propose_secant(self) -> float:
        lo, hi = self.lo, self.hi
        if hi is None:  # only inside points: extrapolate upwards
            assert lo is not None
            t, f = lo[0], lo[1]
            if not math.isfinite(f):
                return t * math.exp(_FLAT_LOG_STEP)
            step = -f / self._slope(self.prev_lo, lo[:2])
            return t * math.exp(min(max(step, _MIN_LOG_STEP), _MAX_LOG_STEP))
        if lo is None:  # only outside points: extrapolate downwards
            t, f = hi
            if not math.isfinite(f):
                return t * math.exp(-_NONFINITE_LOG_STEP)
            step = f / self._slope(self.prev_hi, hi)
            return t * math.exp(-min(max(step, _MIN_LOG_STEP), _MAX_LOG_STEP))
        x_lo, x_hi = math.log(lo[0]), math.log(hi[0])
        f_lo, f_hi = lo[1], hi[1]
        if not (math.isfinite(f_lo) and math.isfinite(f_hi)):
            return math.exp(0.5 * (x_lo + x_hi))
        # Illinois: the side kept twice in a row has its f halved, so the bracket shrinks from both ends.
        if self.illinois_side == +1:
            f_lo *= self.illinois_scale
        else:
            f_hi *= self.illinois_scale
        x = x_lo - f_lo * (x_hi - x_lo) / (f_hi - f_lo)
        width = x_hi - x_lo
        x = min(max(x, x_lo + 1e-3 * width), x_hi - 1e-3 * width)
        return math.exp(x)


def search_radii(
    evaluate: Callable[[np.ndarray, np.ndarray], np.ndarray],
    t_start: np.ndarray,
    *,
    cutoff: float,
    rtol: float,
    cap: np.ndarray,
    cap_flag: DirectionFlag,
    method: RadiusMethod = "secant",
    max_evaluations: int = 64,
    exact_cap: Callable[[np.ndarray], np.ndarray] | None = None,
) -> RadiusSearchResult:
    """Find ρ for K rays in lockstep.

    evaluate(rows, t): Δ at θ0 + t_j·w_{rows_j} for ``[k]`` ray indices and ``[k]`` radii → ``[k]`` float64.
    t_start, cap: ``[K]`` first radius tried and largest radius searched.
    cap_flag: flag for a ray still inside at its cap (``saturated`` or ``unbounded``).
    exact_cap: when given, ``cap`` is only a lower bound of each ray's cap and ``exact_cap(rays)`` (``[k]`` ray
        indices → ``[k]`` caps ≥ those bounds) is called, for the rays that need it, before a point at or beyond
        the bound is evaluated. The Gaussian prior's cap costs a quadrature and a root search per ray, while
        rays almost always cross the cutoff far below a cheap bound (the integrand's peak), so it is rarely needed.
    """
    check_choice("radius_method", method, RADIUS_METHODS)
    t_start = np.asarray(t_start, dtype=np.float64)
    cap = np.asarray(cap, dtype=np.float64)
    rays = [_Ray(float(t0), cutoff, rtol, float(c), method, max_evaluations, cap_exact=exact_cap is None)
            for t0, c in zip(t_start, cap)]
    while True:
        active = np.array([k for k, r in enumerate(rays) if not r.done], dtype=np.int64)
        if active.size == 0:
            break
        capless = np.array([k for k in active if rays[k].needs_cap], dtype=np.int64)
        if capless.size:
            caps = np.asarray(exact_cap(capless), dtype=np.float64).reshape(-1)  # type: ignore[misc]
            for k, c in zip(capless, caps):
                if not c >= rays[k].cap:
                    raise ValueError(f"exact cap {c!r} of ray {k} is below its lower bound {rays[k].cap!r}")
                rays[k].set_cap(float(c))
        ts = np.array([rays[k].next_t for k in active], dtype=np.float64)
        values = np.asarray(evaluate(active, ts), dtype=np.float64).reshape(-1)
        if values.shape != ts.shape:
            raise ValueError(f"behaviour returned {values.shape[0]} values for {ts.shape[0]} points")
        for k, t, v in zip(active, ts, values):
            rays[k].update(float(t), float(v), cap_flag)
    return RadiusSearchResult(
        radius=np.array([r.radius for r in rays], dtype=np.float64),
        delta=np.array([r.delta for r in rays], dtype=np.float64),
        flag=np.array([r.flag for r in rays], dtype=object),
        evaluations=np.array([r.evaluations for r in rays], dtype=np.int64),
        nonfinite=np.array([r.nonfinite for r in rays], dtype=np.int64),
    )


__all__ = ["RADIUS_METHODS", "RadiusMethod", "RadiusSearchResult", "search_radii"]
