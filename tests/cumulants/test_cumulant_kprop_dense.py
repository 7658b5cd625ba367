"""The factorised K = 3 propagation against a dense, loop-by-loop implementation of the same diagram sums.

The dense reference stores the third cumulant as a full [n, n, n] tensor and writes every entry of the activation
cumulants from its diagram formula (arXiv 2605.05179 §3, cost ≤ 2 diagrams), so it shares no bookkeeping with the
factorised code: the rank-n corrections for repeated indices, the path factors and the slice extraction.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from hfvolume.cumulants import Affine, GaussianInput, propagate
from hfvolume.cumulants.activations import wick_table


def _pair(w, p, q, i, j, c, k3, k4_iijj):
    return (w[p - 1, 1, i] * w[q - 1, 1, j] * c[i, j]
            + w[p - 1, 2, i] * w[q - 1, 2, j] * (c[i, j] ** 2 / 2 + k4_iijj / 4)
            + (k3[i, i, j] * w[p - 1, 2, i] * w[q - 1, 1, j] + k3[i, j, j] * w[p - 1, 1, i] * w[q - 1, 2, j]) / 2)


def _dense_nonlinear(act, mu, c, k3, a4, metric):
    n = mu.shape[0]
    g = torch.diagonal(metric)
    w = wick_table(act, mu, torch.diagonal(c), k_max=4, p_max=4)
    t3 = torch.tensor([k3[i, i, i] for i in range(n)], dtype=torch.float64)
    q4 = a4 * g * g
    m = [w[p, 0] + t3 * w[p, 3] / 6 + q4 * w[p, 4] / 24 for p in range(4)]
    mean = m[0]
    k2 = m[1] - m[0] ** 2
    k3d = m[2] - 3 * m[1] * m[0] + 2 * m[0] ** 3
    k4d = m[3] - 4 * m[2] * m[0] - 3 * m[1] ** 2 + 12 * m[1] * m[0] ** 2 - 6 * m[0] ** 4
    cov = torch.diag(k2.clamp_min(0.0))  # the method floors a variance the corrections push below 0
    k21 = torch.zeros(n, n, dtype=torch.float64)
    trace = float(k4d.sum())
    for i, j in itertools.permutations(range(n), 2):
        q22 = a4 * (g[i] * g[j] + 2 * metric[i, j] ** 2) / 3
        p11 = _pair(w, 1, 1, i, j, c, k3, q22)
        cov[i, j] = p11
        k21[i, j] = _pair(w, 2, 1, i, j, c, k3, q22) - 2 * mean[i] * p11
    for i, j in itertools.permutations(range(n), 2):
        q22 = a4 * (g[i] * g[j] + 2 * metric[i, j] ** 2) / 3
        p22 = _pair(w, 2, 2, i, j, c, k3, q22)
        trace += float(p22 - 2 * mean[j] * k21[i, j] - 2 * mean[i] * k21[j, i] - 2 * cov[i, j] ** 2
                       - 4 * mean[i] * mean[j] * cov[i, j])
    out3 = torch.zeros(n, n, n, dtype=torch.float64)
    w1, w2 = w[0, 1], w[0, 2]
    for i, j, k in itertools.product(range(n), repeat=3):
        if len({i, j, k}) == 3:
            out3[i, j, k] = (w1[i] * w1[j] * w1[k] * k3[i, j, k] + c[i, j] * c[j, k] * w1[i] * w2[j] * w1[k]
                             + c[j, i] * c[i, k] * w1[j] * w2[i] * w1[k] + c[i, k] * c[k, j] * w1[i] * w2[k] * w1[j])
        elif i == j == k:
            out3[i, j, k] = k3d[i]
        else:
            a, b = (i, k) if i == j else (i, j) if i == k else (j, i)  # (repeated, single)
            out3[i, j, k] = k21[a, b]
    return mean, cov, out3, 3 * trace / (n * (n + 2)), t3, q4


def dense_kprop(layers, inp):
    mu, c = inp.mean, inp.covariance()
    n0 = mu.shape[0]
    k3 = torch.zeros(n0, n0, n0, dtype=torch.float64)
    a4, metric = 0.0, torch.eye(n0, dtype=torch.float64)
    firsts = []
    for layer in layers:
        w = layer.weight
        mu = w @ mu + (layer.bias if layer.bias is not None else 0)
        c = w @ c @ w.T
        k3 = torch.einsum("ia,jb,kc,abc->ijk", w, w, w, k3)
        metric = w @ metric @ w.T
        if layer.act is None:
            t3 = torch.tensor([k3[i, i, i] for i in range(mu.shape[0])], dtype=torch.float64)
            q4 = a4 * torch.diagonal(metric) ** 2
            firsts.append((t3, q4))
            continue
        mu, c, k3, a4, t3, q4 = _dense_nonlinear(layer.act, mu, c, k3, a4, metric)
        metric = torch.eye(mu.shape[0], dtype=torch.float64)
        firsts.append((t3, q4))
    return mu, c, firsts


def _net(acts, n, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for act in acts:
        w = torch.randn(n, n, generator=g, dtype=torch.float64) * math.sqrt(1.5 / n)
        b = 0.3 * torch.randn(n, generator=g, dtype=torch.float64) if bias else None
        layers.append(Affine(w, b, act))
    return layers


@pytest.mark.parametrize("acts", [("relu", "relu", "relu", None), ("tanh", "gelu", None), ("relu", None, "relu", None)])
def test_factorised_kprop_equals_dense_reference(acts):
    n = 5
    layers = _net(acts, n, seed=7)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    mean = 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    inp = GaussianInput(mean=mean, cov=a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64))
    res = propagate(layers, inp, "kprop", return_layers=True)
    mu, c, per_layer = dense_kprop(layers, inp)
    torch.testing.assert_close(res.mean, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.cov, c, rtol=1e-12, atol=1e-12)
    for mom, (t3, q4) in zip(res.layers, per_layer):
        torch.testing.assert_close(mom.pre_third, t3, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(mom.pre_fourth, q4, rtol=1e-11, atol=1e-13)
