"""The radius-search contract: every radius is an evaluated point, within tolerance of the cutoff or flagged."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hfvolume.volume.radius import search_radii
from hfvolume.volume.results import DirectionFlag


class Recorder:
    """A Δ(t) on K rays that remembers every (ray, t, Δ) it was asked for."""

    def __init__(self, profile, scale):
        self.profile, self.scale, self.calls = profile, np.asarray(scale, dtype=float), []

    def __call__(self, rows, ts):
        out = np.array([self.profile(self.scale[r] * t) for r, t in zip(rows, ts)])
        self.calls.extend(zip(rows.tolist(), ts.tolist(), out.tolist()))
        return out

    def evaluated(self, row):
        return {t: d for r, t, d in self.calls if r == row}


PROFILES = {
    "quadratic": lambda s: 0.5 * s * s,
    "quartic_mix": lambda s: 0.5 * s * s + 3.0 * s**4,
    "softplus": lambda s: math.log1p(math.exp(s)) - math.log(2) - 0.5 * s,  # even-ish, slope changes
    "saturating": lambda s: 1.0 - math.exp(-s * s),
}


@pytest.mark.parametrize("method", ["secant", "bisection"])
@pytest.mark.parametrize("rtol", [1e-2, 1e-4])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_returned_radius_was_evaluated_and_within_tolerance(method, rtol, profile):
    # Pins the research code's defect: it returned the *next guess* instead of the evaluated point.
    rng = np.random.default_rng(0)
    scale = np.exp(rng.uniform(-3, 3, size=12))
    fn = Recorder(PROFILES[profile], scale)
    cutoff = 0.05
    res = search_radii(fn, np.full(12, 0.3), cutoff=cutoff, rtol=rtol, cap=np.full(12, np.inf),
                       cap_flag=DirectionFlag.SATURATED, method=method)
    for k in range(12):
        seen = fn.evaluated(k)
        assert res.flag[k] == DirectionFlag.CONVERGED
        assert res.radius[k] in seen, "returned a radius where Δ was never evaluated"
        assert seen[res.radius[k]] == res.delta[k]
        assert abs(res.delta[k] - cutoff) <= rtol * cutoff
        assert res.evaluations[k] == len([c for c in fn.calls if c[0] == k])


def test_quadratic_from_good_start_takes_one_or_two_evaluations():
    fn = Recorder(PROFILES["quadratic"], np.exp(np.linspace(-1, 1, 9)))
    res = search_radii(fn, np.full(9, 0.5), cutoff=1e-2, rtol=1e-2, cap=np.full(9, np.inf),
                       cap_flag=DirectionFlag.SATURATED)
    assert res.evaluations.max() <= 2


def test_discontinuous_delta_is_flagged_failed_with_an_inside_point():
    def jump(s):
        return 0.0 if s < 1.0 else 1.0

    fn = Recorder(jump, [1.0])
    res = search_radii(fn, np.array([0.1]), cutoff=0.5, rtol=1e-2, cap=np.array([np.inf]),
                       cap_flag=DirectionFlag.SATURATED, max_evaluations=200)
    assert res.flag[0] == DirectionFlag.FAILED
    assert res.radius[0] < 1.0 and res.radius[0] in fn.evaluated(0)
    assert res.delta[0] == 0.0


def test_nan_counts_as_outside_and_is_reported():
    def nan_beyond_two(s):
        return s * s if s < 2.0 else float("nan")

    fn = Recorder(nan_beyond_two, [1.0])
    res = search_radii(fn, np.array([10.0]), cutoff=1.0, rtol=1e-3, cap=np.array([np.inf]),
                       cap_flag=DirectionFlag.SATURATED)
    assert res.flag[0] == DirectionFlag.CONVERGED
    assert res.nonfinite[0] >= 1
    assert np.isfinite(res.delta[0]) and abs(res.delta[0] - 1.0) <= 1e-3


def test_nan_before_the_cutoff_fails_without_propagating():
    def nan_beyond_two(s):
        return s * s if s < 2.0 else float("nan")

    fn = Recorder(nan_beyond_two, [1.0])
    res = search_radii(fn, np.array([0.5]), cutoff=5.0, rtol=1e-3, cap=np.array([np.inf]),
                       cap_flag=DirectionFlag.SATURATED, max_evaluations=80)
    assert res.flag[0] == DirectionFlag.FAILED
    assert res.radius[0] < 2.0 and np.isfinite(res.delta[0]) and res.nonfinite[0] >= 1


@pytest.mark.parametrize("flag", [DirectionFlag.SATURATED, DirectionFlag.UNBOUNDED])
def test_flat_delta_stops_at_the_cap(flag):
    fn = Recorder(lambda s: 0.0, [1.0, 1.0])
    res = search_radii(fn, np.array([1e-3, 1e-3]), cutoff=0.1, rtol=1e-2, cap=np.array([5.0, 1e6]), cap_flag=flag)
    assert list(res.flag) == [flag, flag]
    np.testing.assert_array_equal(res.radius, [5.0, 1e6])
    assert res.evaluations.max() < 20


def test_budget_is_respected():
    fn = Recorder(lambda s: 0.0 if s < 1 else 1.0, [1.0])
    res = search_radii(fn, np.array([0.1]), cutoff=0.5, rtol=1e-2, cap=np.array([np.inf]),
                       cap_flag=DirectionFlag.SATURATED, max_evaluations=7)
    assert res.evaluations[0] == 7 and res.flag[0] == DirectionFlag.FAILED


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="radius_method"):
        search_radii(lambda r, t: t, np.ones(1), cutoff=1.0, rtol=0.1, cap=np.ones(1),
                     cap_flag=DirectionFlag.SATURATED, method="newton")


@pytest.mark.parametrize("method", ["secant", "bisection"])
def test_lazy_caps_are_computed_only_past_their_floor_and_give_the_eager_result(method):
    # Ray 0 crosses the cutoff (s = 1) below its floor; ray 1 is flat and runs into its cap; ray 2 crosses between
    # its floor (0.5) and its cap (50).
    profiles = [lambda s: 0.5 * s * s, lambda s: 0.0, lambda s: 0.5 * s * s]
    scales = np.array([1.0, 1.0, 0.1])

    def fn(rows, ts):
        return np.array([profiles[r](scales[r] * t) for r, t in zip(rows, ts)])

    floors, caps = np.array([10.0, 2.0, 0.5]), np.array([20.0, 5.0, 50.0])
    asked: list[list[int]] = []

    def exact(rows):
        asked.append(rows.tolist())
        return caps[rows]

    kw = dict(cutoff=0.5, rtol=1e-2, cap_flag=DirectionFlag.SATURATED, method=method)
    lazy = search_radii(fn, np.full(3, 0.1), cap=floors, exact_cap=exact, **kw)
    eager = search_radii(fn, np.full(3, 0.1), cap=caps, **kw)
    assert sorted(k for call in asked for k in call) == [1, 2]  # each ray asked once, ray 0 never
    for field in ("radius", "delta", "evaluations"):
        np.testing.assert_array_equal(getattr(lazy, field), getattr(eager, field))
    assert list(lazy.flag) == list(eager.flag) == [DirectionFlag.CONVERGED, DirectionFlag.SATURATED,
                                                    DirectionFlag.CONVERGED]


def test_a_cap_below_its_floor_is_refused():
    with pytest.raises(ValueError, match="below its lower bound"):
        search_radii(lambda r, t: np.zeros(len(r)), np.ones(1), cutoff=1.0, rtol=0.1, cap=np.full(1, 2.0),
                     cap_flag=DirectionFlag.SATURATED, exact_cap=lambda rows: np.ones(len(rows)))
