"""The Monte Carlo baseline: sample x ~ N(μ_0, Σ_0), run the network, average.

N samples cost N × (forward FLOPs) and give each output coordinate an MSE of Var/N: the line that cumulant
propagation is compared against at equal FLOPs (arXiv 2605.05179 §5). The forward pass runs in ``dtype``
(float32 by default, for speed); every sum is float64 and shifted by the first batch's mean, so that the variance
does not lose digits to a large mean. The result depends only on ``seed`` and ``batch_size``.
"""
from __future__ import annotations

import time

import torch

from hfvolume.cumulants.flops import FlopCount, forward_flops
from hfvolume.cumulants.gaussian import GaussianInput
from hfvolume.cumulants.layers import Affine, check_layers
from hfvolume.cumulants.results import CumulantResult, LayerMoments


class _Moments:
    """Streaming float64 mean and variance of a ``[b, n]`` stream, shifted by the first batch's mean."""

    def __init__(self) -> None:
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if self.shift is None:
            self.shift = x.to(torch.float64).mean(0).to(x.dtype)
            self.s1 = torch.zeros(x.shape[1], dtype=torch.float64)
            self.s2 = torch.zeros(x.shape[1], dtype=torch.float64)
        # Deviations in the forward dtype, accumulated in float64 (sum(dtype=...) converts while summing).
        d = x - self.shift
        self.s1 += d.sum(0, dtype=torch.float64)
        self.s2 += (d * d).sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.s1 / self.count
        var = ((self.s2 - self.count * m * m) / max(self.count - 1, 1)).clamp_min(0.0)
        return self.shift.to(torch.float64) + m, var


def _sampler(inp: GaussianInput, dtype: torch.dtype):
    if inp.var is not None:
        scale = torch.sqrt(inp.var).to(dtype)
        return lambda eps: eps * scale
    # Σ = V Λ Vᵀ → x = V √Λ ε (a PSD square root; tolerates the singular covariances of real data).
    evals, evecs = torch.linalg.eigh(inp.cov)
    root = (evecs * torch.sqrt(evals.clamp_min(0.0))[None, :]).to(dtype)
    return lambda eps: eps @ root.T


def _check_counts(n_samples: int, batch_size: int) -> None:
    for name, value in (("n_samples", n_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _batches(inp: GaussianInput, n_samples: int, batch_size: int, seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(int(seed))
    sample = _sampler(inp, dtype)
    mean = inp.mean.to(dtype)
    done = 0
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        eps = torch.randn(b, inp.dim, generator=gen, dtype=dtype)
        yield mean + sample(eps)
        done += b


def _sampling_flops(inp: GaussianInput) -> int:
    return inp.dim * (2 if inp.var is not None else 2 * inp.dim + 1)


def _flops(layers: list[Affine], inp: GaussianInput, n_samples: int) -> FlopCount:
    shapes = [(layer.out_features, layer.in_features) for layer in layers]
    per = forward_flops(shapes, has_bias=[layer.bias is not None for layer in layers])
    mm = sum(2 * o * i for o, i in shapes)
    return FlopCount(matmul=n_samples * mm, elementwise=n_samples * (per - mm + _sampling_flops(inp)))


def monte_carlo(layers: list[Affine], inp: GaussianInput | None = None, n_samples: int = 65536, *,
                batch_size: int = 8192, seed: int = 0, return_layers: bool = False,
                dtype: torch.dtype = torch.float32) -> CumulantResult:
    """Sample estimate of E[f(x)] with the same result type as :func:`propagate`, plus ``stderr`` ``[out]``
    (= √(Var/N)) and per-layer ``pre_mean_stderr``. FLOPs: N × (forward pass + drawing one input)."""
    layers = check_layers(layers)
    _check_counts(n_samples, batch_size)
    inp = GaussianInput.standard(layers[0].in_features) if inp is None else inp
    if inp.dim != layers[0].in_features:
        raise ValueError(f"the input has {inp.dim} dimensions but the first layer takes {layers[0].in_features}")
    start = time.perf_counter()
    pre = [_Moments() for _ in layers]
    act = [_Moments() for _ in layers]
    weights = [(layer.weight.to(dtype), None if layer.bias is None else layer.bias.to(dtype)) for layer in layers]
    with torch.no_grad():
        for x in _batches(inp, n_samples, batch_size, seed, dtype):
            for i, layer in enumerate(layers):
                w, b = weights[i]
                z = x @ w.T if b is None else torch.addmm(b, x, w.T)
                x = z if layer.act is None else layer.act(z)
                if return_layers or i == len(layers) - 1:
                    if return_layers:
                        pre[i].add(z)
                    act[i].add(x)
    mean, var = act[-1].result()
    moments = None
    if return_layers:
        moments = []
        for p, a in zip(pre, act):
            pm, pv = p.result()
            am, av = a.result()
            moments.append(LayerMoments(pre_mean=pm, pre_var=pv, act_mean=am, act_var=av,
                                        pre_mean_stderr=torch.sqrt(pv / n_samples)))
        moments = tuple(moments)
    return CumulantResult(method="monte_carlo", mean=mean, var=var, stderr=torch.sqrt(var / n_samples),
                          n_samples=n_samples, flops=_flops(layers, inp, n_samples),
                          seconds=time.perf_counter() - start, layers=moments,
                          settings={"method": "monte_carlo", "seed": int(seed), "batch_size": batch_size,
                                    "dtype": str(dtype).replace("torch.", "")})


def monte_carlo_tails(layers: list[Affine], inp: GaussianInput | None, thresholds: torch.Tensor, *, layer: int,
                      n_samples: int, batch_size: int = 8192, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, FlopCount]:
    """Fractions of samples with z_{layer, i} > thresholds[t]: (p ``[T, n]``, stderr ``[T, n]``, FLOPs).

    thresholds: ``[T]`` (each applied to every unit) or ``[T, n]``; all counted in one pass over the samples.
    The counts are exact integers, so p is deterministic given ``seed`` and ``batch_size``.
    """
    layers = check_layers(layers)
    _check_counts(n_samples, batch_size)
    inp = GaussianInput.standard(layers[0].in_features) if inp is None else inp
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer must be in [{-len(layers)}, {len(layers) - 1}], got {layer!r}")
    layer = layer % len(layers)
    used = layers[: layer + 1]
    n_out = used[-1].out_features
    thr = torch.as_tensor(thresholds, dtype=torch.float64)
    thr = thr[:, None].expand(-1, n_out) if thr.ndim == 1 else thr
    if thr.ndim != 2 or thr.shape[1] != n_out:
        raise ValueError(f"thresholds must be [T] or [T, {n_out}], got {tuple(torch.as_tensor(thresholds).shape)}")
    counts = torch.zeros(thr.shape, dtype=torch.int64)
    thr_d = thr.to(dtype)
    weights = [(lay.weight.to(dtype), None if lay.bias is None else lay.bias.to(dtype)) for lay in used]
    with torch.no_grad():
        for x in _batches(inp, n_samples, batch_size, seed, dtype):
            for i, lay in enumerate(used):
                w, b = weights[i]
                z = x @ w.T if b is None else torch.addmm(b, x, w.T)
                if i == layer:
                    counts += (z[None, :, :] > thr_d[:, None, :]).sum(1)
                else:
                    x = z if lay.act is None else lay.act(z)
    p = counts.to(torch.float64) / n_samples
    stderr = torch.sqrt(p * (1.0 - p) / n_samples)
    flops = _flops(used, inp, n_samples) + FlopCount(0, n_samples * n_out * thr.shape[0])
    return p, stderr, flops


__all__ = ["monte_carlo", "monte_carlo_tails"]
