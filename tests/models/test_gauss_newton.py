"""The Gauss–Newton factor of a classifier's mean KL: AᵀA equals the KL's Hessian at θ0 (a known answer: the logit
gradient of KL(p0 ‖ p) vanishes at p = p0), it predicts the KL to second order, and it leaves the model alone."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hfvolume.models.gauss_newton import (
    ExampleBatch,
    flat_trainable_parameters,
    kl_gauss_newton_factor,
    kl_gauss_newton_factor_of_batches,
)

N_EXAMPLES, N_IN, N_CLASSES = 7, 4, 3
EPS64 = torch.finfo(torch.float64).eps


def _tiny_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """4-6-3 tanh MLP: D = 4·6 + 6 + 6·3 + 3 = 51."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, 6), nn.Tanh(), nn.Linear(6, N_CLASSES)).to(dtype).eval()


def _inputs(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(N_EXAMPLES, N_IN, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _mean_kl(model: nn.Module, inputs: torch.Tensor):
    """θ ↦ mean_n KL(p_θ0(·|x_n) ‖ p_θ(·|x_n)) on flat trainable parameters (an independent reference)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log_p0 = torch.log_softmax(model(inputs).detach(), dim=-1)

    def kl(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = theta[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        log_p = torch.log_softmax(functional_call(model, params, (inputs,)), dim=-1)
        return torch.sum(log_p0.exp() * (log_p0 - log_p)) / inputs.shape[0]

    return kl


def test_factor_gives_the_exact_hessian_of_the_mean_kl() -> None:
    model, x = _tiny_mlp(), _inputs()
    theta0 = flat_trainable_parameters(model)
    assert theta0.numel() == 51
    factor = kl_gauss_newton_factor(model, x, chunk_size=3)
    assert factor.shape == (N_EXAMPLES * N_CLASSES, 51) and factor.dtype == torch.float64
    hessian = torch.autograd.functional.hessian(_mean_kl(model, x), theta0, vectorize=True)
    gauss_newton = factor.T @ factor
    scale = float(hessian.abs().max())
    # Both are float64 sums of O(N·C·D) products: agreement to a few hundred ulps of the largest entry.
    torch.testing.assert_close(gauss_newton, hessian, rtol=0, atol=1e3 * EPS64 * scale)
    # Each example's block has √p in its left null space: rank ≤ N(C − 1), attained for generic inputs.
    assert int(torch.linalg.matrix_rank(factor)) == N_EXAMPLES * (N_CLASSES - 1)


def test_quadratic_model_predicts_the_kl_to_second_order() -> None:
    model, x = _tiny_mlp(), _inputs()
    theta0 = flat_trainable_parameters(model)
    gram = kl_gauss_newton_factor(model, x)
    kl = _mean_kl(model, x)
    direction = torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    curvature = 0.5 * float(torch.sum((gram @ direction) ** 2))

    def remainder(t: float) -> float:
        return float(kl(theta0 + t * direction)) - curvature * t * t

    # KL(θ0 + t x) − ½ t² xᵀGx = c3 t³ + O(t⁴): halving t divides the remainder by 2³ (log2 ratio → 3).
    for t in (1e-2, 1e-3):
        assert math.log2(remainder(t) / remainder(t / 2)) == pytest.approx(3.0, abs=0.1)


def test_float32_model_gives_the_float64_factor_and_is_left_untouched() -> None:
    model32 = _tiny_mlp(torch.float32)
    model64 = copy.deepcopy(model32).double()
    before = {k: v.clone() for k, v in model32.state_dict().items()}
    rng = torch.get_rng_state()
    f32 = kl_gauss_newton_factor(model32, _inputs(torch.float32))
    f64 = kl_gauss_newton_factor(model64, _inputs(torch.float32).double())
    torch.testing.assert_close(f32, f64, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model32.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == torch.float32
    assert all(p.grad is None for p in model32.parameters())


def test_chunking_does_not_change_the_factor() -> None:
    model, x = _tiny_mlp(), _inputs()
    reference = kl_gauss_newton_factor(model, x, chunk_size=100)
    for chunk in (1, 2, 5):
        torch.testing.assert_close(kl_gauss_newton_factor(model, x, chunk_size=chunk), reference, rtol=1e-13, atol=0)


def test_only_trainable_parameters_are_columns() -> None:
    model, x = _tiny_mlp(), _inputs()
    full = kl_gauss_newton_factor(model, x)
    for p in model[0].parameters():
        p.requires_grad_(False)
    partial = kl_gauss_newton_factor(model, x)
    assert partial.shape == (N_EXAMPLES * N_CLASSES, 21)  # 6·3 + 3
    torch.testing.assert_close(partial, full[:, 30:], rtol=1e-13, atol=0)
    assert flat_trainable_parameters(model).numel() == 21


class _Wrapper(nn.Module):
    """A Trainer-style classifier: keyword inputs, an output object with ``.logits``, a frozen buffer."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("shift", torch.full((N_IN,), 0.25, dtype=torch.float64))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.inner(pixel_values + self.shift))


def test_mapping_inputs_and_output_objects() -> None:
    inner, x = _tiny_mlp(), _inputs()
    wrapped = _Wrapper(copy.deepcopy(inner)).eval()
    via_mapping = kl_gauss_newton_factor(wrapped, {"pixel_values": x})
    direct = kl_gauss_newton_factor(inner, x + 0.25)
    torch.testing.assert_close(via_mapping, direct, rtol=1e-13, atol=1e-16)


def test_parameter_layout_matches_the_parameter_view() -> None:
    params = pytest.importorskip("hfvolume.models.params")
    model = _tiny_mlp()
    view = params.ParameterView.from_model(model, "trainable")
    torch.testing.assert_close(flat_trainable_parameters(model), view.flatten(dtype=torch.float64), rtol=0, atol=0)


def test_invalid_uses_are_rejected() -> None:
    model, x = _tiny_mlp(), _inputs()
    with pytest.raises(ValueError, match="eval mode"):
        kl_gauss_newton_factor(copy.deepcopy(model).train(), x)
    with pytest.raises(ValueError, match="leading"):
        kl_gauss_newton_factor(_Wrapper(model).eval(), {"pixel_values": x, "labels": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"\[1, C\]"):
        kl_gauss_newton_factor(nn.Sequential(model, nn.Unflatten(1, (1, N_CLASSES))).eval(), x)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        kl_gauss_newton_factor(frozen, x)
    with pytest.raises(ValueError, match="chunk_size"):
        kl_gauss_newton_factor(model, x, chunk_size=0)
    with pytest.raises(TypeError, match="inputs"):
        kl_gauss_newton_factor(model, [x])


def test_batches_give_the_factor_of_all_their_examples() -> None:
    model, x = _tiny_mlp(), _inputs()
    whole = kl_gauss_newton_factor(model, x)
    parts = [ExampleBatch(args=(x[:3],), n_examples=3), ExampleBatch(args=(x[3:],), n_examples=4)]
    torch.testing.assert_close(kl_gauss_newton_factor_of_batches(model, parts, chunk_size=2), whole, rtol=1e-13,
                               atol=0)
    head = kl_gauss_newton_factor_of_batches(model, parts, params=["2.weight", "2.bias"])
    torch.testing.assert_close(head, whole[:, 30:], rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="params"):
        kl_gauss_newton_factor_of_batches(model, parts, params=["nope"])
    with pytest.raises(ValueError, match="ExampleBatch"):
        kl_gauss_newton_factor_of_batches(model, [])


class _Keywords(nn.Module):
    """Per-example tensors, a per-batch tensor, a non-tensor switch and labels, by position and keyword."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, offset: torch.Tensor, *, gain: torch.Tensor, use_cache: bool = True,
                labels: torch.Tensor | None = None) -> SimpleNamespace:
        assert labels is None and use_cache is False  # labels are dropped, constants passed through
        return SimpleNamespace(logits=self.inner(x * gain + offset))


def test_constant_arguments_are_passed_to_every_example() -> None:
    inner, x = _tiny_mlp(), _inputs()
    offset = torch.tensor([0.5, -0.25, 0.0, 1.0], dtype=torch.float64)  # [N_IN]: not per example
    gain = torch.linspace(0.5, 1.5, N_EXAMPLES, dtype=torch.float64).unsqueeze(1)  # per example
    batch = ExampleBatch(args=(x, offset), kwargs={"gain": gain, "use_cache": False, "labels": torch.zeros(7)},
                         n_examples=N_EXAMPLES)
    wrapped = _Keywords(copy.deepcopy(inner)).eval()
    factor = kl_gauss_newton_factor_of_batches(wrapped, [batch])
    torch.testing.assert_close(factor, kl_gauss_newton_factor(inner, x * gain + offset), rtol=1e-13, atol=1e-16)


class _Bag(nn.Module):
    """Mean of token embeddings (padding_idx = 0) → logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embedding = nn.Embedding(6, 4, padding_idx=0, dtype=torch.float64)
        with torch.no_grad():
            self.embedding.weight[0].normal_()  # a padding row that matters for the forward
        self.head = nn.Linear(4, N_CLASSES, dtype=torch.float64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(1))


def test_padding_rows_get_their_curvature() -> None:
    """The padding row moves the logits (the forward uses it) though torch's backward gives it no gradient: the
    factor is the Hessian of the KL in every coordinate, compared with a one-hot reference without padding_idx."""
    model = _Bag().eval()
    ids = torch.randint(0, 6, (9, 5), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = 0
    factor = kl_gauss_newton_factor(model, ids)
    one_hot = nn.functional.one_hot(ids, 6).to(torch.float64)
    log_p0 = torch.log_softmax(model(ids).detach(), dim=-1)

    def mean_kl(theta: torch.Tensor) -> torch.Tensor:
        w, head_w, head_b = theta[:24].view(6, 4), theta[24:36].view(3, 4), theta[36:]
        log_p = torch.log_softmax((one_hot @ w).mean(1) @ head_w.T + head_b, dim=-1)
        return torch.sum(log_p0.exp() * (log_p0 - log_p)) / ids.shape[0]

    hessian = torch.autograd.functional.hessian(mean_kl, flat_trainable_parameters(model))
    assert float(hessian[:4, :4].abs().max()) > 0  # the padding row has curvature
    torch.testing.assert_close(factor.T @ factor, hessian, rtol=0, atol=1e3 * EPS64 * float(hessian.abs().max()))
    assert model.embedding.padding_idx == 0
