"""Tests for hfvolume.models.optim_state: Adam-state proposal scales p = 1/(ν̂^γ + η) and Trainer checkpoint mapping."""
from __future__ import annotations

import copy
import functools
import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hfvolume.models.optim_state import (
    DEFAULT_ADAM_EPS,
    DEFAULT_ADAM_EXPONENT,
    NamedOptimizerState,
    adam_scales,
    optimizer_state_from_checkpoint,
    trainer_decay_parameter_names,
)
from hfvolume.models.scales import RelativeEps, median_positive


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """A few full-batch steps; returns the gradient of every step (for the hand-computed moments)."""
    x, y = _data()
    names = dict(model.named_parameters())
    history = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        history.append({n: p.grad.detach().clone() for n, p in names.items() if p.grad is not None})
        opt.step()
    return history


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_scales_equal_hand_computed_formula(cls):
    torch.manual_seed(0)
    model = TinyNet()
    betas, steps = (0.8, 0.95), 4
    opt = cls(model.parameters(), lr=1e-2, betas=betas)
    history = _train(model, opt, steps)
    named = dict(model.named_parameters())
    gamma, eta = 0.5, 1e-5
    scales, info = adam_scales(opt, named, exponent=gamma, eps=eta, dtype=torch.float64)
    scales_m, info_m = adam_scales(opt, named, moment="exp_avg", exponent=gamma, eps=eta, dtype=torch.float64)
    assert info["name"] == "adam" and info_m["name"] == "adam-m"
    assert info["step"] == steps and info["n_fallback_tensors"] == 0
    for name, p in named.items():
        # Moments recomputed from the recorded gradients (float64), independent of the optimizer's own buffers.
        nu = torch.zeros_like(p, dtype=torch.float64)
        m = torch.zeros_like(p, dtype=torch.float64)
        for g in history:
            nu = betas[1] * nu + (1 - betas[1]) * g[name].double() ** 2
            m = betas[0] * m + (1 - betas[0]) * g[name].double()
        nu_hat = nu / (1 - betas[1] ** steps)
        m_hat = m.abs() / (1 - betas[0] ** steps)
        # The optimizer accumulates in float32: agreement to float32 rounding of ν (relative ~1e-6).
        torch.testing.assert_close(scales[name], 1 / (nu_hat**gamma + eta), rtol=1e-5, atol=0)
        torch.testing.assert_close(scales_m[name], 1 / (m_hat**gamma + eta), rtol=1e-5, atol=0)
        # And bit-for-bit the formula applied to the optimizer's own state.
        state = opt.state[p]
        exact = 1 / ((state["exp_avg_sq"].double() / (1 - betas[1] ** float(state["step"]))) ** gamma + eta)
        assert torch.equal(scales[name], exact)
        assert scales[name].shape == p.shape and scales[name].device.type == "cpu"
    default, _ = adam_scales(opt, named)
    assert all(v.dtype == torch.float32 for v in default.values())


def test_accelerated_optimizer_gives_identical_scales():
    from accelerate import Accelerator

    torch.manual_seed(1)
    try:
        accelerator = Accelerator(cpu=True)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = accelerator.prepare(model, opt)
        assert type(opt).__name__ == "AcceleratedOptimizer"
        x, y = _data()
        for _ in range(3):
            opt.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
        named = dict(accelerator.unwrap_model(model).named_parameters())
        wrapped, info_w = adam_scales(opt, named)
        inner, info_i = adam_scales(opt.optimizer, named)
        assert info_w == info_i and info_w["step"] == 3
        for name in named:
            assert torch.equal(wrapped[name], inner[name])
    finally:
        _reset_accelerate()


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """A real tiny Trainer run (BERT classifier, 3 AdamW steps) with a checkpoint written at step 3."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("trainer")
    with torch.random.fork_rng():  # Trainer seeds the global RNG; keep other tests independent of it
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=3,
        )
        model = BertForSequenceClassification(config)
        # A frozen parameter: not in the optimizer, so it must be skipped by the index mapping.
        model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 40, (24, 8), generator=g)
        mask = torch.ones(24, 8, dtype=torch.long)
        mask[::3, 6:] = 0
        labels = torch.randint(0, 3, (24,), generator=g)
        data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(24)]
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=3,
            save_strategy="steps",
            save_steps=3,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            weight_decay=0.1,
            adam_beta2=0.98,
            report_to=[],
            use_cpu=True,
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        try:
            trainer = Trainer(model=model, args=args, train_dataset=data)
            trainer.train()
        finally:
            _reset_accelerate()
    return trainer, model, out / "checkpoint-3"


def test_trainer_checkpoint_matches_live_optimizer(trainer_run):
    trainer, model, checkpoint = trainer_run
    named = dict(model.named_parameters())
    live, info_live = _quiet(adam_scales, trainer.optimizer, named)
    state = optimizer_state_from_checkpoint(checkpoint, model)
    assert isinstance(state, dict) and isinstance(state, NamedOptimizerState)
    saved, info_saved = _quiet(adam_scales, state, named)
    # The checkpoint holds the very tensors the live optimizer had after step 3, and both paths apply the same
    # float64 formula to them, so the scales agree bit for bit.
    assert info_live == info_saved
    assert info_live["step"] == 3 and info_live["n_fallback_tensors"] == 1  # the frozen position embeddings
    for name in named:
        assert torch.equal(live[name], saved[name]), name
    # The decay / no-decay split: group 1 (weight_decay 0) holds biases and LayerNorm weights.
    assert len(state.groups) == 2
    decay, no_decay = state.groups
    assert all(state.hyperparameters[n]["weight_decay"] == 0.1 for n in decay)
    assert all(state.hyperparameters[n]["weight_decay"] == 0.0 for n in no_decay)
    assert "bert.embeddings.LayerNorm.weight" in no_decay and "classifier.bias" in no_decay
    assert all("bias" in n or "LayerNorm" in n for n in no_decay)
    assert "classifier.weight" in decay and "bert.embeddings.position_embeddings.weight" not in decay + no_decay
    assert tuple(state.hyperparameters["classifier.weight"]["betas"]) == (0.9, 0.98)
    # The mapping agrees with the live optimizer's groups, parameter by parameter.
    by_id = {id(p): n for n, p in named.items()}
    live_groups = [[by_id[id(p)] for p in g["params"]] for g in trainer.optimizer.param_groups]
    assert live_groups == state.groups
    assert sorted(trainer_decay_parameter_names(model)) == sorted(
        n for n in named if n not in no_decay
    )


def test_checkpoint_errors(trainer_run, tmp_path):
    trainer, model, checkpoint = trainer_run
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        optimizer_state_from_checkpoint(tmp_path, model)
    # Wrong freezing: the saved group sizes no longer match.
    other = copy.deepcopy(model)
    other.bert.embeddings.position_embeddings.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="sizes"):
        optimizer_state_from_checkpoint(checkpoint, other)
    # Same parameter count per group but one shape differs: the error names the parameter.
    torch.manual_seed(0)
    a = TinyNet()
    opt = torch.optim.AdamW(
        [{"params": [a.fc1.weight, a.fc2.weight]}, {"params": [a.fc1.bias, a.norm.weight, a.norm.bias, a.fc2.bias]}]
    )
    _train(a, opt, 1)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    b = TinyNet()
    b.fc2.weight = nn.Parameter(torch.zeros(3, 7 * 1).T.contiguous())  # [7, 3] instead of [3, 7]
    with pytest.raises(ValueError, match="fc2.weight"):
        optimizer_state_from_checkpoint(tmp_path, b)
    good = optimizer_state_from_checkpoint(tmp_path, a)
    assert good.groups == [["fc1.weight", "fc2.weight"], ["fc1.bias", "norm.weight", "norm.bias", "fc2.bias"]]


def test_single_group_checkpoint_and_named_state_dict(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    named = dict(model.named_parameters())
    live, _ = adam_scales(opt, named)
    with pytest.raises(ValueError, match="sizes"):
        optimizer_state_from_checkpoint(tmp_path, model)  # one group, but the Trainer split expects two
    state = optimizer_state_from_checkpoint(tmp_path / "optimizer.pt", named, weight_decay_split=False)
    for name, s in adam_scales(state, named)[0].items():
        assert torch.equal(s, live[name])
    # torch saves param_names for optimizers built from named_parameters(); those are used directly.
    model2 = TinyNet()
    opt2 = torch.optim.Adam(list(model2.named_parameters())[::-1], lr=1e-2)
    _train(model2, opt2, 2)
    torch.save(opt2.state_dict(), tmp_path / "optimizer.pt")
    state2 = optimizer_state_from_checkpoint(tmp_path, model2)
    named2 = dict(model2.named_parameters())
    for name, s in adam_scales(state2, named2)[0].items():
        assert torch.equal(s, adam_scales(opt2, named2)[0][name])


def test_step_zero_is_exactly_isotropic():
    torch.manual_seed(0)
    model = TinyNet()
    named = dict(model.named_parameters())
    eta = 1e-5
    # Never stepped: no state at all → every tensor falls back, all scales 1.
    opt = torch.optim.Adam(model.parameters())
    with pytest.warns(UserWarning, match="6 of 6"):
        scales, info = adam_scales(opt, named, eps=eta)
    assert info["n_fallback_tensors"] == 6 and info["step"] is None
    assert all(bool((s == 1).all()) for s in scales.values())
    # A step with zero gradients: ν ≡ 0 → exactly 1/η everywhere, including the fallback of a tensor with no state.
    opt = torch.optim.Adam([p for n, p in named.items() if n != "fc2.bias"], lr=0.0)
    for n, p in named.items():
        p.grad = None if n == "fc2.bias" else torch.zeros_like(p)
    opt.step()
    with pytest.warns(UserWarning, match="1 of 6"):
        scales, info = adam_scales(opt, named, eps=eta)
    flat = torch.cat([s.reshape(-1) for s in scales.values()])
    assert bool((flat == flat[0]).all()) and float(flat[0]) == pytest.approx(1 / eta, rel=1e-7)
    # A state whose step counter is 0 (loaded state, nothing accumulated): 0/0 must read as ν̂ = 0, not NaN.
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = torch.tensor(0.0)
    names = [[n for n in named if n != "fc2.bias"]]
    scales0, info0 = _quiet(adam_scales, NamedOptimizerState.from_state_dict(sd, names), named, eps=eta)
    assert info0["step"] == 0
    assert all(torch.equal(scales0[n], scales[n]) for n in named)
    try:
        from hfvolume.volume.proposals import normalize_log_scales
    except ImportError:  # the core is another module; the property above is what it relies on
        return
    assert normalize_log_scales(flat, flat.numel()) is None  # the core sees the isotropic proposal


def test_sgd_and_mixed_fallbacks():
    torch.manual_seed(0)
    model = TinyNet()
    named = dict(model.named_parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, 2)
    with pytest.warns(UserWarning, match="no second moment"):
        scales, info = adam_scales(sgd, named)
    assert info["n_fallback_tensors"] == 6
    assert all(bool((s == 1).all()) for s in scales.values())
    # Adam on the weights only: the biases/norm fall back to the geometric mean of the weights' scales.
    adam = torch.optim.Adam([model.fc1.weight, model.fc2.weight], lr=1e-2)
    _train(model, adam, 2)
    with pytest.warns(UserWarning, match="4 of 6"):
        mean_scales, info = adam_scales(adam, named, dtype=torch.float64)
    known = torch.cat([mean_scales["fc1.weight"].reshape(-1), mean_scales["fc2.weight"].reshape(-1)])
    gm = math.exp(float(torch.log(known).mean()))
    assert float(mean_scales["fc1.bias"][0]) == pytest.approx(gm, rel=1e-12)
    assert bool((mean_scales["norm.weight"] == mean_scales["fc1.bias"][0]).all())
    with pytest.warns(UserWarning):
        one_scales, _ = adam_scales(adam, named, fallback="one")
    assert bool((one_scales["fc2.bias"] == 1).all())


def test_adafactor_factored_state():
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    model = TinyNet()
    opt = Adafactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    _train(model, opt, 3)
    named = dict(model.named_parameters())
    scales, info = adam_scales(opt, named, eps=1e-5, dtype=torch.float64)
    assert info["n_fallback_tensors"] == 0 and info["n_adafactor_tensors"] == 6
    st_ = opt.state[model.fc1.weight]
    row, col = st_["exp_avg_sq_row"].double(), st_["exp_avg_sq_col"].double()
    nu = torch.outer(row, col) / row.mean()
    torch.testing.assert_close(scales["fc1.weight"], 1 / (nu.sqrt() + 1e-5), rtol=1e-12, atol=0)
    torch.testing.assert_close(scales["fc1.bias"], 1 / (opt.state[model.fc1.bias]["exp_avg_sq"].double().sqrt() + 1e-5))
    # Adafactor's exp_avg averages normalised updates, not gradients: not used for moment="exp_avg".
    with pytest.warns(UserWarning, match="no first moment"):
        adam_scales(opt, named, moment="exp_avg")


@functools.lru_cache(maxsize=1)
def _trained_state() -> tuple[dict[str, nn.Parameter], dict]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    return dict(model.named_parameters()), opt.state_dict()


@settings(max_examples=40, deadline=None)
@given(c=st.floats(min_value=1e-4, max_value=1e4), gamma=st.floats(min_value=0.0, max_value=1.0))
def test_nu_scaling_gives_a_constant_factor(c, gamma):
    """ν → cν with η → c^γ η multiplies every scale by c^{−γ} (a constant factor), which the core normalises away."""
    named, sd = _trained_state()
    names = [[n for n in named]]
    base = NamedOptimizerState.from_state_dict(sd, names)
    scaled_sd = copy.deepcopy(sd)
    for entry in scaled_sd["state"].values():
        entry["exp_avg_sq"] = entry["exp_avg_sq"].double() * c
    scaled = NamedOptimizerState.from_state_dict(scaled_sd, names)
    eta = 1e-5
    a, _ = adam_scales(base, named, exponent=gamma, eps=eta, dtype=torch.float64)
    b, _ = adam_scales(scaled, named, exponent=gamma, eps=eta * c**gamma, dtype=torch.float64)
    for n in named:
        torch.testing.assert_close(b[n], a[n] * c ** (-gamma), rtol=1e-12, atol=0)


def test_plain_mapping_needs_betas_and_works_with_them():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    _train(model, opt, 2)
    named = dict(model.named_parameters())
    plain = {n: dict(opt.state[p]) for n, p in named.items()}
    with pytest.raises(ValueError, match="betas"):
        adam_scales(plain, named)
    got, _ = adam_scales(plain, named, betas=(0.9, 0.99))
    ref, _ = adam_scales(opt, named)
    assert all(torch.equal(got[n], ref[n]) for n in named)


def test_bad_inputs():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match="exponent"):
        adam_scales(opt, named, exponent=-0.5)
    with pytest.raises(ValueError, match="eps"):
        adam_scales(opt, named, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        adam_scales(opt, named, eps=float("nan"))
    with pytest.raises(TypeError, match="exponent"):
        adam_scales(opt, named, exponent="0.5")
    with pytest.raises(ValueError, match="'bogus'"):
        adam_scales(opt, named, moment="bogus")
    with pytest.raises(ValueError, match="'median'"):
        adam_scales(opt, named, fallback="median")
    with pytest.raises(TypeError, match="optimizer"):
        adam_scales(42, named)
    with pytest.raises(TypeError, match="state_dict"):
        adam_scales(opt.state_dict(), named)
    with pytest.raises(TypeError, match="named_params"):
        adam_scales(opt, list(named.items()))
    # η = 0 with ν = 0 would divide by zero: refused with a message naming a tensor.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt0 = torch.optim.Adam(model.parameters(), lr=0.0)
    opt0.step()
    with pytest.raises(ValueError, match="eps = 0"):
        adam_scales(opt0, named, eps=0.0)
    # A corrupt (negative) second moment is refused, naming the tensor.
    opt0.state[model.fc1.bias]["exp_avg_sq"].fill_(-1.0)
    with pytest.raises(ValueError, match="fc1.bias"):
        adam_scales(opt0, named)


# ----------------------------------------------------------------------------------------------- relative η


def _nu_hat(opt: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in named.items():
        state, beta2 = opt.state[p], opt.param_groups[0]["betas"][1]
        out[name] = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
    return out


def test_relative_eps_is_the_factor_times_the_median_of_positive_moments():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    with torch.no_grad():  # a dead coordinate (ν̂ = 0) must not enter the median
        opt.state[model.fc1.weight]["exp_avg_sq"][0, :] = 0.0
    named = dict(model.named_parameters())
    nu = _nu_hat(opt, named)
    flat = torch.cat([v.reshape(-1) for v in nu.values()])
    median = float(flat[flat > 0].median())
    gamma, r = 0.5, 1e-2
    scales, info = adam_scales(opt, named, exponent=gamma, eps=RelativeEps(r), dtype=torch.float64)
    eta = r * median**gamma
    assert info["eps_relative"] == r and info["eps_reference"] == pytest.approx(median**gamma, rel=1e-15)
    assert info["eps"] == pytest.approx(eta, rel=1e-15)
    for name in named:
        torch.testing.assert_close(scales[name], 1 / (nu[name] ** gamma + eta), rtol=1e-14, atol=0)
    # An absolute η is recorded as given, with no relative part.
    _, info_abs = adam_scales(opt, named, eps=1e-5)
    assert info_abs["eps"] == 1e-5 and info_abs["eps_relative"] is None and info_abs["eps_reference"] is None
    # The library defaults are what adam_scales uses when nothing is given.
    default, info_default = adam_scales(opt, named, dtype=torch.float64)
    explicit, info_explicit = adam_scales(opt, named, exponent=DEFAULT_ADAM_EXPONENT, eps=DEFAULT_ADAM_EPS,
                                          dtype=torch.float64)
    assert info_default == info_explicit and all(torch.equal(default[n], explicit[n]) for n in named)


@settings(max_examples=40, deadline=None)
@given(
    c=st.floats(min_value=1e-6, max_value=1e6),
    gamma=st.floats(min_value=0.0, max_value=1.0),
    r=st.sampled_from([1e-3, 1e-2, 1.0, 10.0]),
)
def test_relative_eps_makes_scaling_nu_change_nothing(c, gamma, r):
    """Invariance: ν → cν at fixed γ and a relative η leaves the normalised proposal unchanged."""
    from hfvolume.volume.proposals import normalize_log_scales

    named, sd = _trained_state()
    names = [[n for n in named]]
    scaled_sd = copy.deepcopy(sd)
    for entry in scaled_sd["state"].values():
        entry["exp_avg_sq"] = entry["exp_avg_sq"].double() * c
    base = NamedOptimizerState.from_state_dict(sd, names)
    scaled = NamedOptimizerState.from_state_dict(scaled_sd, names)
    a, info_a = adam_scales(base, named, exponent=gamma, eps=RelativeEps(r), dtype=torch.float64)
    b, info_b = adam_scales(scaled, named, exponent=gamma, eps=RelativeEps(r), dtype=torch.float64)
    assert info_b["eps_reference"] == pytest.approx(info_a["eps_reference"] * c**gamma, rel=1e-12)
    for n in named:
        torch.testing.assert_close(b[n], a[n] * c ** (-gamma), rtol=1e-12, atol=0)
    flat_a = torch.cat([a[n].reshape(-1) for n in named])
    flat_b = torch.cat([b[n].reshape(-1) for n in named])
    log_a, log_b = normalize_log_scales(flat_a, flat_a.numel()), normalize_log_scales(flat_b, flat_b.numel())
    # γ = 0 (or so small that ν^γ rounds to 1): constant scales, an isotropic proposal (None). Scaling ν can then
    # leave last-bit differences between coordinates that are still isotropic to 1e-12.
    zeros = torch.zeros(flat_a.numel(), dtype=torch.float64)
    torch.testing.assert_close(zeros if log_b is None else log_b, zeros if log_a is None else log_a, rtol=0,
                               atol=1e-12)


def test_relative_eps_with_zero_state_is_exactly_isotropic():
    torch.manual_seed(0)
    model = TinyNet()
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    opt.step()
    scales, info = adam_scales(opt, named, eps=RelativeEps(1e-2))
    assert info["eps_reference"] == 1.0 and info["eps"] == 1e-2  # no positive ν̂: reference 1
    flat = torch.cat([s.reshape(-1) for s in scales.values()])
    assert bool((flat == flat[0]).all())
    with pytest.raises(ValueError, match="eps = 0"):
        adam_scales(opt, named, eps=RelativeEps(0.0))


def test_relative_eps_validation_and_median_subsampling():
    with pytest.raises(ValueError, match="RelativeEps.factor"):
        RelativeEps(-1.0)
    with pytest.raises(ValueError, match="RelativeEps.factor"):
        RelativeEps(float("inf"))
    with pytest.raises(TypeError, match="RelativeEps.factor"):
        RelativeEps("1e-2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="eps"):
        adam_scales(torch.optim.Adam(TinyNet().parameters()), dict(TinyNet().named_parameters()), eps="1e-2")
    assert median_positive([torch.zeros(3)]) is None
    assert median_positive([torch.tensor([0.0, 3.0, 1.0]), torch.tensor([[2.0, 0.0]])]) == 2.0  # lower median
    # Above the cap: an even stride through a shuffled 1..N has its median's rank within k binomial standard errors
    # of N/2 (the stride picks n = N/stride entries of a random permutation).
    n_total, cap = 100_000, 1_000
    values = torch.randperm(n_total, generator=torch.Generator().manual_seed(0)).double() + 1
    got = median_positive([values[:40_000], values[40_000:]], max_elements=cap)
    n = sum(math.ceil(k / math.ceil(n_total / cap)) for k in (40_000, 60_000))
    assert abs(got / n_total - 0.5) < 4 * 0.5 / math.sqrt(n) + 1 / n
    assert got == median_positive([values[:40_000], values[40_000:]], max_elements=cap)  # deterministic


def test_relative_eps_through_estimate_local_volume():
    from hfvolume import estimate_local_volume

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    model.eval()
    x, _ = _data()
    common = dict(n_directions=4, progress=False, seed=3)
    result = estimate_local_volume(model, [(x,)], preconditioner="adam", optimizer=opt,
                                   preconditioner_options={"exponent": 0.25, "eps": RelativeEps(0.1)}, **common)
    proposal = result.settings["proposal"]
    assert proposal["eps_relative"] == 0.1 and proposal["exponent"] == 0.25
    named = dict(model.named_parameters())
    _, info = adam_scales(opt, named, exponent=0.25, eps=RelativeEps(0.1))
    assert proposal["eps"] == info["eps"]
    json.dumps(result.to_dict())  # the description stays JSON-safe


def test_has_adam_state_through_wrappers():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from hfvolume.models.optim_state import has_adam_state

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    assert not has_adam_state(opt) and not has_adam_state(torch.optim.SGD([p], lr=0.1))
    p.grad = torch.ones(3)
    opt.step()
    try:
        wrapped = Accelerator(cpu=True).prepare(opt)
        assert type(wrapped).__name__ == "AcceleratedOptimizer"
        assert has_adam_state(opt) and has_adam_state(wrapped)
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    assert not has_adam_state(opt, moment="momentum_buffer")


def test_without_bias_correction_eta_is_added_to_the_raw_average():
    """The research code's convention: p = 1/(ν^γ + η) with Adam's raw ν = (1 − β2^step)·ν̂."""
    named, sd = _trained_state()
    state = NamedOptimizerState.from_state_dict(sd, [[n for n in named]])
    corrected, info_c = adam_scales(state, named, exponent=0.5, eps=1e-5, dtype=torch.float64)
    raw, info_r = adam_scales(state, named, exponent=0.5, eps=1e-5, bias_correction=False, dtype=torch.float64)
    assert info_c["bias_correction"] is True and info_r["bias_correction"] is False
    for name, entry in zip(named, sd["state"].values()):
        step = float(entry["step"])
        nu = entry["exp_avg_sq"].double()
        torch.testing.assert_close(raw[name], 1.0 / (nu.sqrt() + 1e-5), rtol=1e-12, atol=0)
        nu_hat = nu / (1 - 0.999**step)
        torch.testing.assert_close(corrected[name], 1.0 / (nu_hat.sqrt() + 1e-5), rtol=1e-12, atol=0)
    # A relative η: the factor (1 − β2^step)^γ cancels after normalisation, so both conventions give one proposal.
    rel_c, _ = adam_scales(state, named, eps=RelativeEps(1.0), dtype=torch.float64)
    rel_r, _ = adam_scales(state, named, eps=RelativeEps(1.0), bias_correction=False, dtype=torch.float64)
    ratio = torch.cat([(rel_c[n] / rel_r[n]).reshape(-1) for n in named])
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-12, atol=0)
