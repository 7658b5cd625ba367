"""The curvature of a behaviour (hfvolume.models.curvature): known answers first.

* "exact" (KL, classifier): U diag(λ) Uᵀ is the autograd Hessian of an independently written mean KL;
* every kind ("kl", "output", "loss"): ½ xᵀGx is the behaviour's own second difference (Δ(θ0+tx) + Δ(θ0−tx))/2t²
  to O(t²) — the scored positions and scaling are the behaviour's;
* "lanczos": the top eigenpairs of the exact G to 1e-6;
* the floor on a model whose null-space curvature is known in closed form: y = (xW, c|v|²) has G's null space
  exactly the v coordinates and Δ = c²t⁴ along them, so r = (ε/c²)^¼ and λ₀ = 2ε/r² = 2c√ε;
* forward passes counted as the model sees them; the model, its modes and the random states left alone;
* refusals name the knobs to use instead.
"""
from __future__ import annotations

import copy
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.curvature import DEFAULT_MAX_FORWARD_PASSES, curvature_of
from hfvolume.models.ggn import GaussNewtonProducts
from hfvolume.models.lanczos import lanczos_top
from hfvolume.models.params import ParameterView

EPS = 1e-2


def _mlp(seed: int = 0, n_in: int = 5, hidden: int = 12, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double().eval()


def _inputs(n: int, n_in: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense(curvature) -> torch.Tensor:
    u, lam = curvature.basis, curvature.eigenvalues
    return (u * lam) @ u.T + curvature.floor * (torch.eye(curvature.dim, dtype=torch.float64) - u @ u.T)


def _second_difference(behavior: ModelBehavior, x: torch.Tensor, t: float) -> float:
    """(Δ(θ0 + t x) + Δ(θ0 − t x)) / (2t²) = ½ xᵀHx + O(t²), with Δ = fn − fn(θ0)."""
    theta0 = behavior.anchor.to(torch.float64)
    values = behavior(torch.stack([theta0 + t * x, theta0 - t * x])) - behavior.anchor_value
    return float(values.sum()) / (2 * t * t)


def _random_unit(d: int, seed: int) -> torch.Tensor:
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / torch.linalg.vector_norm(x)


# ---------------------------------------------------------------------------------------------- exact answers
def test_exact_is_the_hessian_of_the_mean_kl() -> None:
    model, x = _mlp(), _inputs(30)
    behavior = ModelBehavior(model, [x[:17], x[17:]], behavior="kl")
    curvature, passes = curvature_of(behavior, model=model, cutoff=EPS, method="exact", floor=0.0)
    view = behavior.view
    log_p0 = torch.log_softmax(model(x).detach(), dim=-1)

    def mean_kl(theta: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(functional_call(model, view.unflatten(theta), (x,)), dim=-1)
        return torch.sum(log_p0.exp() * (log_p0 - log_p)) / x.shape[0]

    hessian = torch.autograd.functional.hessian(mean_kl, view.flatten(dtype=torch.float64), vectorize=True)
    scale = float(hessian.abs().max())
    torch.testing.assert_close(_dense(curvature), hessian, rtol=0, atol=1e-11 * scale)
    assert curvature.rank == 30 * 3  # N (C − 1): one null direction √p per example
    gram = curvature.basis.T @ curvature.basis
    torch.testing.assert_close(gram, torch.eye(curvature.rank, dtype=torch.float64), rtol=0, atol=1e-9)
    assert bool((curvature.eigenvalues[:-1] >= curvature.eigenvalues[1:]).all())
    assert passes == 4 and curvature.info["method"] == "exact"  # C vector-Jacobian products per example


class _PinnedLogit(nn.Module):
    """Logits (x W + b, 0): no shift of all logits leaves the softmax alone, so G can have full rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.linear = nn.Linear(5, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        return torch.cat([z, torch.zeros_like(z[:, :1])], dim=1)


def test_a_basis_spanning_every_direction_needs_no_floor() -> None:
    model = _PinnedLogit().eval()  # D = 12 < N (C − 1) = 60
    behavior = ModelBehavior(model, [_inputs(30)], behavior="kl")
    full, passes = curvature_of(behavior, model=model, cutoff=EPS, method="exact")
    assert full.rank == full.dim == 12 and full.floor == 0.0 and passes == 3
    assert full.info["floor"]["measured"] is False
    top, _ = curvature_of(behavior, model=model, cutoff=EPS, method="exact", rank=5, floor=0.0)
    torch.testing.assert_close(top.eigenvalues, full.eigenvalues[:5], rtol=0, atol=0)


def _linear_classifier_with_loss(loss: str = "ce") -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A linear model returning {"logits", "loss"} with cross-entropy ("ce", integer labels), squared error ("mse",
    one output, float labels) or binary cross-entropy ("bce", float 0/1 labels): J is constant, so the loss's
    Hessian is its Gauss–Newton part."""
    outputs = 1 if loss == "mse" else 3

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, outputs)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.linear(x)
            if loss == "ce":
                value = nn.functional.cross_entropy(logits, labels)
            elif loss == "mse":
                value = nn.functional.mse_loss(logits.squeeze(-1), labels)
            else:
                value = nn.functional.binary_cross_entropy_with_logits(logits, labels)
            return {"logits": logits, "loss": value}

    torch.manual_seed(3)
    model = Linear().double().eval()
    g = torch.Generator().manual_seed(4)
    x = _inputs(24)
    if loss == "ce":
        y = torch.randint(0, 3, (24,), generator=g)
    elif loss == "mse":
        y = torch.randn(24, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (24, 3), generator=g).to(torch.float64)
    return model, [{"x": x[:10], "labels": y[:10]}, {"x": x[10:], "labels": y[10:]}]


def _output_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()


@pytest.mark.parametrize("kind", ["kl", "output", "loss"])
def test_half_xGx_is_the_behaviours_second_difference(kind: str) -> None:
    if kind == "loss":
        model, data = _linear_classifier_with_loss()
    else:
        model, data = (_mlp(), [_inputs(20)]) if kind == "kl" else (_output_model(), [_inputs(9), _inputs(4, seed=2)])
    behavior = ModelBehavior(model, data, behavior=kind)
    d = behavior.view.n_params
    curvature, _ = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", iterations=d, rank=d,
                                floor=0.0)
    x = _random_unit(d, seed=6)
    predicted = 0.5 * float(curvature.quadratic_form(x))
    # The remainder is O(t²): from t to t/2 it shrinks fourfold, and at t = 1e-3 it is below 1e-5 relative.
    errors = [abs(_second_difference(behavior, x, t) - predicted) for t in (2e-3, 1e-3)]
    assert errors[1] <= 1e-5 * predicted
    assert errors[1] <= 0.3 * errors[0] or errors[1] <= 1e-9 * predicted


@pytest.mark.parametrize("loss_kind", ["ce", "mse", "bce"])
def test_loss_curvature_is_the_autograd_hessian_for_a_linear_model(loss_kind: str) -> None:
    model, data = _linear_classifier_with_loss(loss_kind)
    behavior = ModelBehavior(model, data, behavior="loss")
    view = behavior.view
    d = view.n_params
    curvature, passes = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", iterations=d, rank=d,
                                     floor=0.0)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params = view.unflatten(theta)
        total = sum(functional_call(model, params, (), b)["loss"] * b["x"].shape[0] for b in data)
        return total / sum(b["x"].shape[0] for b in data)

    hessian = torch.autograd.functional.hessian(loss, view.flatten(dtype=torch.float64))
    torch.testing.assert_close(_dense(curvature), hessian, rtol=0, atol=1e-12 * float(hessian.abs().max()))
    assert passes == 1 + 2 * curvature.info["iterations"]  # the anchor pass that recognises the loss


@pytest.mark.parametrize("tie", [False, True])
def test_lm_products_follow_the_scored_positions(make_neox, lm_batch, tie: bool) -> None:
    """Per-token KL with padding and labels = −100 (causal shift), tied or separate output embeddings: xᵀGx from
    the products is the behaviour's own second difference."""
    model = make_neox(dtype=torch.float64, tie=tie)
    behavior = ModelBehavior(model, lm_batch, behavior="kl")
    products = GaussNewtonProducts(behavior, model)
    x = _random_unit(behavior.view.n_params, seed=7)
    predicted = 0.5 * float(x @ products(x))
    observed = _second_difference(behavior, x, 1e-3)
    assert observed == pytest.approx(predicted, rel=1e-5)
    assert products.passes == 2


def test_hidden_state_products_see_every_embedding_row(make_bert, cls_batch) -> None:
    """BertModel "output" (last_hidden_state, padded positions not scored): the padding embedding row has no
    gradient in torch's backward but moves the outputs all the same; the products must be symmetric."""
    model = make_bert(head="none").double()
    inputs = {k: v for k, v in cls_batch.items() if k != "labels"}
    assert bool((inputs["input_ids"] == model.config.pad_token_id).any())  # row 0 is used
    behavior = ModelBehavior(model, inputs, behavior="output")

    def embedding_settings() -> list[tuple]:
        return [(m.padding_idx, m.scale_grad_by_freq, m.sparse) for m in model.modules() if isinstance(m, nn.Embedding)]

    before = embedding_settings()
    products = GaussNewtonProducts(behavior, model)
    d = behavior.view.n_params
    x, y = _random_unit(d, seed=12), _random_unit(d, seed=13)
    assert float(y @ products(x)) == pytest.approx(float(x @ products(y)), rel=1e-10)
    assert 0.5 * float(x @ products(x)) == pytest.approx(_second_difference(behavior, x, 1e-3), rel=1e-5)
    assert embedding_settings() == before and before[0][0] == model.config.pad_token_id


@pytest.mark.parametrize("case", ["causal-lm", "classifier"])
def test_cross_entropy_loss_has_the_kl_curvature(case: str, make_neox, make_bert, lm_batch, cls_batch) -> None:
    """The model's mean cross-entropy, recognised from its logits and labels, has H_n = diag p − ppᵀ: on one batch
    whose labelled positions are the KL's scored positions, the two G are the same."""
    model = make_neox(dtype=torch.float64) if case == "causal-lm" else make_bert().double()
    batch = lm_batch if case == "causal-lm" else cls_batch
    loss = GaussNewtonProducts(ModelBehavior(model, batch, behavior="loss"), model)
    kl = GaussNewtonProducts(ModelBehavior(model, batch, behavior="kl"), model)
    x = _random_unit(kl.dim, seed=14)
    torch.testing.assert_close(loss(x), kl(x), rtol=1e-9, atol=1e-12)
    assert loss.passes == 3 and kl.passes == 2


# ---------------------------------------------------------------------------------------------- lanczos
def test_lanczos_finds_the_top_eigenpairs_of_the_exact_curvature() -> None:
    model, x = _mlp(seed=2, hidden=16), _inputs(60, seed=3)
    behavior = ModelBehavior(model, [x], behavior="kl")
    exact, _ = curvature_of(behavior, model=model, cutoff=EPS, method="exact", floor=0.0)
    approx, passes = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=6, iterations=40,
                                  floor=0.0)
    assert exact.rank > 100 and approx.rank == 6 and approx.info["iterations"] == 40
    torch.testing.assert_close(approx.eigenvalues, exact.eigenvalues[:6], rtol=1e-6, atol=0)
    overlaps = (approx.basis.T @ exact.basis[:, :6]).diagonal().abs()
    gaps = (exact.eigenvalues[:6] - exact.eigenvalues[1:7]) / exact.eigenvalues[0]
    assert bool((overlaps[gaps > 1e-3] > 1 - 1e-6).all())
    assert approx.info["max_residual"] < 1e-4 * float(exact.eigenvalues[0])
    assert passes == 80  # two passes (a JVP and a VJP of the data) per step, no pilot rays


def test_lanczos_on_a_known_spectrum() -> None:
    """G = Q diag(d) Qᵀ: the residual bounds are the true residuals; a rank-5 G is exhausted after 6 steps, with
    its null Ritz value dropped."""
    d_full = torch.tensor([2.0**-i for i in range(40)], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(60, 40, generator=torch.Generator().manual_seed(15), dtype=torch.float64))
    for spectrum, steps in ((d_full, 30), (torch.cat([d_full[:5], torch.zeros(35, dtype=torch.float64)]), 30)):
        g = (q * spectrum) @ q.T
        result = lanczos_top(lambda v, g=g: g @ v, 60, iterations=steps, rank=8,
                             generator=torch.Generator().manual_seed(16), relative_floor=1e-12)
        u, lam = result.vectors, result.eigenvalues
        true_residuals = torch.linalg.vector_norm(g @ u - u * lam, dim=0)
        torch.testing.assert_close(true_residuals, result.residuals, rtol=1e-3, atol=1e-12)
        torch.testing.assert_close(lam[:5], spectrum[:5], rtol=1e-10, atol=0)
    assert result.invariant and result.products == 6 and result.eigenvalues.numel() == 5


# ---------------------------------------------------------------------------------------------- the floor
class _FlatValley(nn.Module):
    """y = (x W diag(s), c |v|²): G = (2/N) Σ x xᵀ ⊗ diag(s²) on W (s breaks the multiplicities a Krylov space
    cannot resolve), exactly 0 on v; along unit v-rays Δ = c² t⁴."""

    def __init__(self, c: float) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        self.v = nn.Parameter(torch.zeros(5, dtype=torch.float64))
        self.register_buffer("s", torch.tensor([1.0, 1.7, 2.3], dtype=torch.float64))
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quartic = self.c * (self.v * self.v).sum()
        return torch.cat([(x @ self.w) * self.s, quartic.expand(x.shape[0], 1)], dim=1)


def _valley(c: float) -> tuple[nn.Module, ModelBehavior]:
    model = _FlatValley(c).eval()
    return model, ModelBehavior(model, [_inputs(9, n_in=4, seed=9)], behavior="output")


def test_floor_is_measured_on_a_known_null_space() -> None:
    c = 1.5
    model, behavior = _valley(c)
    curvature, passes = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=12, iterations=13)
    assert curvature.rank == 12
    assert float(curvature.basis[12:].abs().max()) < 1e-12  # U spans the W coordinates only
    floor = curvature.info["floor"]
    assert floor["flags"] == ["converged"] * 8
    # Δ within rtol = 1% of ε at the radius: 2ε/r² within ½% of 2c√ε per ray, and so is their median.
    truth = 2 * c * math.sqrt(EPS)
    assert curvature.floor == pytest.approx(truth, rel=6e-3)
    assert all(lam == pytest.approx(truth, rel=6e-3) for lam in floor["curvatures"])
    assert all(r == pytest.approx((EPS / c**2) ** 0.25, rel=3e-3) for r in floor["radii"])
    assert passes == 2 * 13 + sum(floor["evaluations"])
    assert json.loads(json.dumps(curvature.info)) == curvature.info


def test_flat_pilot_rays_saturate_and_say_so() -> None:
    model, behavior = _valley(0.0)
    with pytest.warns(RuntimeWarning, match="stayed inside the region"):
        curvature, _ = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=12, iterations=13,
                                    max_radius=10.0)
    floor = curvature.info["floor"]
    assert floor["n_saturated"] == 8 and set(floor["flags"]) == {"saturated"}
    assert floor["radii"] == [10.0] * 8
    # Δ ≡ 0 along v up to the cap (the rays' rounding along W aside): nothing bounds the complement.
    assert curvature.floor < 1e-20


def test_a_float_floor_is_used_as_given() -> None:
    model, behavior = _valley(1.0)
    curvature, passes = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=12, iterations=13,
                                     floor=0.25)
    assert curvature.floor == 0.25 and curvature.info["floor"] == {"measured": False}
    assert passes == 26


def test_rank_zero_measures_an_isotropic_curvature_for_any_behaviour() -> None:
    model = _mlp()

    def callable_behavior(outputs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return (outputs**2).mean()

    behavior = ModelBehavior(model, [_inputs(8)], behavior=callable_behavior)
    curvature, passes = curvature_of(behavior, model=model, cutoff=EPS, rank=0)
    assert curvature.rank == 0 and curvature.floor > 0 and curvature.info["method"] == "none"
    assert passes == sum(curvature.info["floor"]["evaluations"])


# ---------------------------------------------------------------------------------------------- planning and cost
class _CallCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1


@pytest.mark.parametrize("kind", ["kl", "loss"])
def test_forward_passes_are_counted_as_the_model_sees_them(kind: str) -> None:
    """One model call per batch per JVP, VJP or evaluated point (the per-row loop path calls once per point)."""
    if kind == "loss":
        model, data = _linear_classifier_with_loss()
    else:
        model, data = _mlp(), [_inputs(7), _inputs(5, seed=2)]
    behavior = ModelBehavior(model, data, behavior=kind, use_vmap=False)
    counter = _CallCounter(model)
    _, passes = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=3, iterations=6)
    counter.handle.remove()
    assert counter.calls == passes * len(data)


def test_auto_plans_within_the_budget() -> None:
    model, x = _mlp(), _inputs(30)
    behavior = ModelBehavior(model, [x], behavior="kl")
    exact, passes = curvature_of(behavior, model=model, cutoff=EPS)
    assert exact.info["method"] == "exact" and passes <= DEFAULT_MAX_FORWARD_PASSES
    small, passes = curvature_of(behavior, model=model, cutoff=EPS, exact_bytes_limit=0, max_forward_passes=100)
    info = small.info
    assert info["method"] == "lanczos" and passes <= 100
    # (8 + 1) × 6 evaluations reserved for the floor (the first ray may take twice its share), two passes per
    # step, half the Ritz pairs kept.
    assert info["iterations"] == (100 - 54) // 2 and small.rank == info["iterations"] // 2
    with pytest.raises(ValueError, match="max_forward_passes"):
        curvature_of(behavior, model=model, cutoff=EPS, exact_bytes_limit=0, max_forward_passes=50)


@pytest.mark.slow
def test_a_million_parameter_lm_costs_at_most_64_directions() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=128)
    model = GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(1))
    behavior = ModelBehavior(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, behavior="kl")
    assert behavior.view.n_params >= 1_000_000
    curvature, passes = curvature_of(behavior, model=model, cutoff=EPS)
    assert passes <= 64 * 3.5 and curvature.info["method"] == "lanczos" and curvature.rank >= 10
    gram = curvature.basis.T @ curvature.basis
    torch.testing.assert_close(gram, torch.eye(curvature.rank, dtype=torch.float64), rtol=0, atol=1e-10)
    assert curvature.floor > 0 and curvature.info["floor"]["n_failed"] == 0


# ---------------------------------------------------------------------------------------------- non-interference
def test_model_modes_and_random_states_are_left_alone() -> None:
    model, x = _mlp(), _inputs(12)
    behavior = ModelBehavior(model, [x], behavior="kl")
    probe = behavior.anchor.to(torch.float64) + 0.05 * _random_unit(behavior.view.n_params, seed=11)
    before_value = behavior(probe.unsqueeze(0))
    state = copy.deepcopy(model.state_dict())
    random.seed(5)
    np.random.seed(5)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=4, iterations=10)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert torch.equal(behavior(probe.unsqueeze(0)), before_value)
    again = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=4, iterations=10)
    assert torch.equal(first[0].basis, again[0].basis) and first[0].floor == again[0].floor
    other = curvature_of(behavior, model=model, cutoff=EPS, method="lanczos", rank=4, iterations=10, seed=1)
    assert other[0].info["floor"]["radii"] != first[0].info["floor"]["radii"]


def test_basis_follows_the_behaviours_parameter_view() -> None:
    """Only the view's parameters, in its order: the last layer alone gives G's bottom-right block."""
    model, x = _mlp(), _inputs(20)
    full = ModelBehavior(model, [x], behavior="kl")
    head = ModelBehavior(model, [x], ParameterView.from_model(model, ["2.weight", "2.bias"]), behavior="kl")
    g_full, _ = curvature_of(full, model=model, cutoff=EPS, method="exact", floor=0.0)
    g_head, _ = curvature_of(head, model=model, cutoff=EPS, method="exact", floor=0.0)
    d_head = head.view.n_params
    block = _dense(g_full)[-d_head:, -d_head:]
    torch.testing.assert_close(_dense(g_head), block, rtol=0, atol=1e-12 * float(block.abs().max()))


# ---------------------------------------------------------------------------------------------- refusals
def test_unsupported_uses_are_refused_with_the_alternatives(make_neox, lm_batch) -> None:
    model = _mlp()

    def callable_behavior(outputs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return outputs.sum()

    behavior = ModelBehavior(model, [_inputs(8)], behavior=callable_behavior)
    with pytest.raises(ValueError, match=r"rank=0.*preconditioner='fisher' or 'adam'"):
        curvature_of(behavior, model=model, cutoff=EPS)
    lm = make_neox()
    lm_behavior = ModelBehavior(lm, lm_batch, behavior="kl")
    with pytest.raises(ValueError, match="method='lanczos'"):
        curvature_of(lm_behavior, model=lm, cutoff=EPS, method="exact")
    kl = ModelBehavior(model, [_inputs(8)], behavior="kl")
    with pytest.raises(ValueError, match="behavior.model"):
        curvature_of(kl, model=copy.deepcopy(model), cutoff=EPS)
    with pytest.raises(TypeError, match="ModelBehavior"):
        curvature_of(lambda t: t.sum(-1), model=model, cutoff=EPS)
    bad = [dict(method="svd"), dict(floor="median"), dict(floor=-1.0), dict(rank=-1), dict(cutoff=0.0),
           dict(pilot_rays=0), dict(rtol=1.5), dict(rank=True)]
    for kwargs in bad:
        with pytest.raises((TypeError, ValueError)):
            curvature_of(kl, model=model, **{"cutoff": EPS, **kwargs})
    with pytest.raises(ValueError, match="krylov_bytes_limit"):
        curvature_of(kl, model=model, cutoff=EPS, method="lanczos", rank=10, krylov_bytes_limit=1000)


def test_an_unrecognised_loss_is_refused() -> None:
    class Smoothed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.linear(x)
            return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)}

    model = Smoothed().double().eval()
    data = {"x": _inputs(6), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    behavior = ModelBehavior(model, data, behavior="loss")
    with pytest.raises(ValueError, match="Gauss–Newton part is unknown"):
        curvature_of(behavior, model=model, cutoff=EPS, rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvature, _ = curvature_of(behavior, model=model, cutoff=EPS, rank=0)
    assert curvature.rank == 0
