"""Float64 log-space numerics shared by the functional core: ball constants, log-space helpers, chunked sums.

Everything here works in natural-log space (results in nats) with float64 inputs and outputs, because the
quantities involved reach ±1e10 nats for billion-parameter models and overflow any linear-space representation.
Reductions over ``[D]`` parameter vectors go a cache-sized chunk at a time, so that none needs a D-sized float64
copy of a float32 vector. The Gaussian prior's ray integral has its own module, :mod:`hfvolume.volume.ray_integral`.
"""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import numpy.typing as npt
import torch

from hfvolume.volume.checks import check_int

_FINITE_CHUNK = 1 << 16


def all_finite(x: torch.Tensor) -> bool:
    """``torch.isfinite(x).all()`` a chunk at a time: on CPU, isfinite builds |x| and two masks, about 1.5× the
    size of x at once, which for a large model's parameter vector would be a temporary as large as the model."""
    flat = x.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


ArrayLike = Union[float, int, npt.ArrayLike]
# Elementwise helpers return a numpy float64 scalar for scalar input and an ndarray otherwise.
FloatOrArray = Union[np.float64, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Ball and sphere constants
# ----------------------------------------------------------------------------------------------------------------


def _check_dimension(d: Any) -> int:
    # ValueError for every bad dimension, a wrong type included: these functions have always raised it. bool is
    # refused although Python counts it as an int: a dimension of True is certainly a bug upstream.
    return check_int("dimension", d, minimum=1, wrong_type=ValueError)


def log_unit_ball_volume(d: int) -> float:
    """log V_d, the log-volume (nats) of the unit ball in R^d.

    V_d = π^{d/2} / Γ(d/2 + 1), so log V_d = (d/2) log π − lgamma(d/2 + 1). math.lgamma keeps it accurate to a few
    ulp relative for any d (the tests compare with mpmath up to d = 1e12); the uniform prior's ray mass is
    V_D ρ^D, and |S^{D−1}| = D·V_D is the polar Jacobian's constant.

    Raises ValueError (naming the value) if d is not an int or d < 1.
    """
    d = _check_dimension(d)
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def log_sphere_area(d: int) -> float:
    """log |S^{d-1}|, the log surface area (nats) of the unit sphere in R^d: log d + log V_d."""
    d = _check_dimension(d)
    return math.log(d) + log_unit_ball_volume(d)


# ----------------------------------------------------------------------------------------------------------------
# Log-space helpers
# ----------------------------------------------------------------------------------------------------------------


def first_index(mask: np.ndarray) -> tuple[int, ...]:
    """The index tuple of the first True entry of ``mask`` (for error messages that name a bad element)."""
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _as_f64(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    nan = np.isnan(arr)
    if nan.any():
        raise ValueError(f"{name} contains NaN at index {first_index(nan)}")
    return arr


def _ret(x: np.ndarray) -> FloatOrArray:
    # Scalars in -> numpy float64 scalar out; arrays keep their shape.
    return x[()] if x.ndim == 0 else x


def log1mexp(x: ArrayLike) -> FloatOrArray:
    """log(1 − e^x) for x ≤ 0, elementwise, float64 (nats).

    Switches between log(−expm1(x)) (x near 0, where 1 − e^x cancels) and log1p(−e^x) (x very negative,
    where e^x underflows relative to 1) at x = −log 2 (Mächler 2012). Returns −inf at x = 0 and 0 at −inf.
    Raises ValueError for x > 0 or NaN, naming the first bad index.
    """
    x = _as_f64(x, "x")
    bad = x > 0
    if bad.any():
        i = first_index(bad)
        raise ValueError(f"log1mexp needs x <= 0; x[{i}] = {float(x[i])!r}")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        near = x > -math.log(2.0)
        out = np.where(near, np.log(-np.expm1(np.where(near, x, -1.0))), np.log1p(-np.exp(np.where(near, -1.0, x))))
    return _ret(np.asarray(out, dtype=np.float64))


def logsubexp(a: ArrayLike, b: ArrayLike) -> FloatOrArray:
    """log(e^a − e^b) for a ≥ b, elementwise with broadcasting, float64 (nats).

    Computed as a + log1mexp(b − a), so it keeps full relative precision when a and b are close.
    a = b gives −inf (including a = b = −inf). Raises ValueError when a < b, a = b = +inf, or on NaN.
    """
    a = _as_f64(a, "a")
    b = _as_f64(b, "b")
    a, b = np.broadcast_arrays(a, b)
    bad = (a < b) | (np.isposinf(a) & np.isposinf(b))
    if bad.any():
        i = first_index(bad)
        raise ValueError(
            f"logsubexp needs a >= b (and not both +inf); a[{i}] = {float(a[i])!r}, b[{i}] = {float(b[i])!r}"
        )
    with np.errstate(invalid="ignore"):
        diff = np.where(a == b, 0.0, b - a)  # avoids (-inf) - (-inf)
        diff = np.where(np.isposinf(a), -np.inf, diff)
    out = np.where(a == b, -np.inf, a + np.asarray(log1mexp(diff)))
    return _ret(np.asarray(out, dtype=np.float64))


def log_erfc(x: ArrayLike) -> FloatOrArray:
    """log erfc(x), elementwise, float64 (nats), accurate for all real x.

    For x ≥ 0 uses log erfc(x) = log erfcx(x) − x² (erfcx(x) = e^{x²} erfc(x) ~ 1/(x√π) never underflows);
    for x < 0, erfc(x) = 1 + erf(|x|) ∈ (1, 2] has no cancellation and is logged directly.
    Raises ValueError on NaN.
    """
    x = _as_f64(x, "x")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
    pos = xt >= 0
    xp = torch.where(pos, xt, torch.zeros_like(xt))
    xn = torch.where(pos, torch.zeros_like(xt), xt)
    lp = torch.log(torch.special.erfcx(xp)) - xp * xp
    ln = torch.log(torch.special.erfc(xn))
    out = torch.where(pos, lp, ln).numpy().reshape(x.shape)
    return _ret(np.asarray(out, dtype=np.float64))


def log_mean_exp(x: ArrayLike, axis: int = -1) -> FloatOrArray:
    """log(mean(exp(x))) along ``axis`` in float64 (nats); the shape is x's with ``axis`` removed.

    Shifts by the maximum so no term overflows. −inf entries contribute zero; a slice that is all −inf gives
    −inf; a slice containing +inf gives +inf. Raises ValueError naming the first NaN index (NaN would
    otherwise silently poison an estimate) or for an empty axis.
    """
    x = _as_f64(x, "x")
    if x.ndim == 0:
        x = x.reshape(1)
    if x.shape[axis] == 0:
        raise ValueError("log_mean_exp over an empty axis")
    m = np.max(x, axis=axis, keepdims=True)
    finite_m = np.isfinite(m)
    shift = np.where(finite_m, m, 0.0)
    with np.errstate(divide="ignore"):
        s = np.sum(np.exp(x - shift), axis=axis, keepdims=True)
        out = np.where(finite_m, shift + np.log(s) - math.log(x.shape[axis]), m)
    return _ret(np.squeeze(out, axis=axis).astype(np.float64))


# Chunk length of float64 reductions over [D] vectors: cache-sized, and no D-sized float64 temporary.
NORM_CHUNK = 1 << 16


def sum_squares_f64(x: torch.Tensor) -> float:
    """Σ x_i² accumulated in float64 over cache-sized chunks of a 1-D tensor.

    Direction norms must be accurate to well below 1/D: a unit direction off by a factor (1 + ε) shifts the
    polar-coordinate Jacobian t^{D−1} by e^{Dε}. Upcasting the whole vector would cost a D-sized float64 copy.
    """
    total = 0.0
    for start in range(0, x.numel(), NORM_CHUNK):
        c = x[start : start + NORM_CHUNK].to(dtype=torch.float64)
        total += float(torch.dot(c, c))
    return total


__all__ = [
    "NORM_CHUNK",
    "all_finite",
    "first_index",
    "log1mexp",
    "log_erfc",
    "log_mean_exp",
    "log_sphere_area",
    "log_unit_ball_volume",
    "logsubexp",
    "sum_squares_f64",
]
