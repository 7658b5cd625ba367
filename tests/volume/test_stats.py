from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfvolume.volume.numerics import log_mean_exp
from hfvolume.volume.stats import (
    effective_sample_size,
    markov_lower_bound,
    running_log_mean_exp,
    std_upper_bound_factor,
    summarize_log_estimates,
)

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
arrays = st.lists(finite, min_size=1, max_size=50).map(np.array)


@settings(max_examples=200, deadline=None)
@given(arrays)
def test_ess_is_between_one_and_n(x):
    ess = effective_sample_size(x)
    assert 1.0 - 1e-9 <= ess <= x.size * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(arrays, st.floats(min_value=-1e6, max_value=1e6))
def test_ess_is_shift_invariant_and_log_mean_shifts(x, c):
    a, b = summarize_log_estimates(x), summarize_log_estimates(x + c)
    assert math.isclose(a.ess, b.ess, rel_tol=1e-6)
    assert math.isclose(b.log_mean, a.log_mean + c, rel_tol=1e-12, abs_tol=1e-9 * (1 + abs(c) + np.abs(x).max()))


def test_equal_estimates_have_full_ess_and_exact_mean():
    s = summarize_log_estimates(np.full(10, -1234.5))
    assert s.ess == pytest.approx(10.0, rel=1e-12)
    assert s.log_mean == pytest.approx(-1234.5, rel=1e-15)
    assert s.bootstrap_std == 0.0


def test_one_dominant_sample_has_ess_one():
    s = summarize_log_estimates(np.array([0.0, -1e4, -2e4, -1e5]))
    assert s.ess == pytest.approx(1.0, abs=1e-12)


def test_minus_inf_estimates_are_allowed():
    s = summarize_log_estimates(np.array([-np.inf, 0.0]))
    assert s.log_mean == pytest.approx(math.log(0.5))


def test_markov_bound():
    assert markov_lower_bound(-10.0, delta=0.05) == pytest.approx(-10.0 + math.log(0.05))
    with pytest.raises(ValueError, match="delta"):
        markov_lower_bound(0.0, delta=1.5)


def test_bootstrap_uses_no_global_rng():
    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    summarize_log_estimates(np.linspace(-5, 0, 30))
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# ------------------------------------------------------------------------------------------------- running estimate
@settings(deadline=None)
@given(st.lists(st.floats(min_value=-1e4, max_value=1e4), min_size=1, max_size=60))
def test_running_log_mean_exp_is_the_log_mean_exp_of_each_prefix(values):
    est = np.array(values)
    running = running_log_mean_exp(est)
    expected = np.array([log_mean_exp(est[: k + 1]) for k in range(est.size)])
    np.testing.assert_allclose(running, expected, rtol=1e-12, atol=1e-9)


def test_running_log_mean_exp_edge_cases():
    assert running_log_mean_exp(np.array([])).shape == (0,)
    np.testing.assert_allclose(running_log_mean_exp(np.array([-np.inf, 0.0])), [-np.inf, math.log(0.5)])
    with pytest.raises(ValueError, match="direction 2 is NaN"):
        running_log_mean_exp(np.array([0.0, 1.0, np.nan]))


# --------------------------------------------------------------------------------------- upper bound on a spread
@pytest.mark.parametrize("n", [21, 32, 64, 128, 512, 4096])
def test_std_upper_bound_factor_matches_the_chi_square_quantile(n):
    from scipy.stats import chi2

    exact = math.sqrt((n - 1) / chi2.ppf(0.05, n - 1))
    # Wilson–Hilferty's relative error on the quantile is below 1% from 20 degrees of freedom on.
    assert std_upper_bound_factor(n) == pytest.approx(exact, rel=5e-3)


def test_std_upper_bound_factor_shrinks_to_one():
    factors = [std_upper_bound_factor(n) for n in (21, 64, 256, 1024, 16384)]
    assert all(a > b > 1.0 for a, b in zip(factors, factors[1:]))
    assert std_upper_bound_factor(1) == math.inf
