"""estimate_local_volume on tiny Hugging Face and torch models: correctness plumbing and non-interference."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from hfvolume import VolumeResult, estimate_local_volume


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_bitwise_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for k, v in after.items():
        assert torch.equal(v.detach(), before[k]), f"{k} changed"
        assert v.grad is None, f"{k} has a gradient"


def quick(model, data, **kw):
    kw.setdefault("n_directions", 6)
    kw.setdefault("progress", False)
    return estimate_local_volume(model, data, **kw)


def test_causal_lm_kl_with_padding_and_labels(make_neox, lm_batch):
    model = make_neox()
    res = quick(model, [lm_batch])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert res.n_params == n_trainable
    assert math.isfinite(res.log_volume) and res.log_volume < 0
    assert res.n_failed == 0
    assert res.settings["behavior"]["behavior"] == "kl"
    assert all(abs(d - 1e-2) <= 1e-4 for d, f in zip(res.deltas, res.flags) if f == "converged")


def test_classifier_kl(make_bert, cls_batch):
    res = quick(make_bert(), [cls_batch], cutoff=0.05)
    assert math.isfinite(res.log_volume) and res.settings["behavior"]["n_scored"] == 4


def test_non_interference_mode_rng_and_weights(make_neox, lm_batch):
    model = make_neox().train()
    model.gpt_neox.layers[0].eval()  # a mixed-mode model keeps every submodule's own flag
    before = snapshot(model)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    quick(model, [lm_batch])
    assert_bitwise_same(model, before)
    assert model.training and not model.gpt_neox.layers[0].training and model.gpt_neox.layers[1].training
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    np.testing.assert_array_equal(np.random.get_state()[1], states[2])


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_estimate_leaves_the_model_untouched(make_mlp, exc):
    model = make_mlp().train()
    before = snapshot(model)
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def behaviour(outputs, batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise exc("boom")
        return outputs.pow(2).mean()

    rng = torch.get_rng_state()
    with pytest.raises(exc, match="boom"):
        quick(model, [(x,)], behavior=behaviour, cutoff=1e-3)
    assert_bitwise_same(model, before)
    assert model.training and torch.equal(torch.get_rng_state(), rng)


def test_same_results_whatever_the_direction_batching(make_neox, lm_batch):
    model = make_neox()
    a = quick(model, [lm_batch], directions_per_batch=1, n_directions=7)
    b = quick(model, [lm_batch], directions_per_batch=5, n_directions=7)
    assert a.log_estimates == b.log_estimates and a.radii == b.radii


def test_only_trainable_parameters_are_measured(make_neox, lm_batch):
    model = make_neox()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("lm_head"))
    res = quick(model, [lm_batch])
    assert res.n_params == model.lm_head.weight.numel()
    assert res.settings["parameters"]["n_tensors"] == 1


def test_prior_centred_on_a_base_model_and_per_tensor_sigma(make_mlp):
    base, tuned = make_mlp(0), make_mlp(0)
    with torch.no_grad():
        tuned[4].weight.add_(0.01)
    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(1))
    centred = quick(tuned, [(x,)], prior_mean=base)
    origin = quick(tuned, [(x,)])
    assert centred.norm_term > origin.norm_term  # the base is much closer than the origin
    sig = {name: 0.1 for name, _ in tuned.named_parameters()}
    per_tensor = quick(tuned, [(x,)], sigma=sig)
    assert per_tensor.settings["prior"]["sigma"] == pytest.approx(0.1)


def test_adam_at_step_zero_equals_naive_exactly_and_trained_adam_runs(make_mlp):
    model = make_mlp()
    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    naive = quick(model, [(x,)])
    step0 = quick(model, [(x,)], preconditioner="adam", optimizer=opt)
    assert step0.log_estimates == naive.log_estimates
    # A few steps on a copy, so the measured weights stay the same.
    trained = make_mlp()
    opt2 = torch.optim.Adam(trained.parameters(), lr=1e-3)
    for _ in range(3):
        opt2.zero_grad()
        trained(x).pow(2).mean().backward()
        opt2.step()
    res = quick(trained.eval(), [(x,)], preconditioner="adam", optimizer=opt2, mixture=0.25)
    assert res.settings["proposal"]["name"] == "adam" and math.isfinite(res.log_volume)


def test_fisher_preconditioner_runs(make_mlp):
    x = torch.randn(24, 20, generator=torch.Generator().manual_seed(3))
    res = quick(make_mlp(), [(x,)], preconditioner="fisher", preconditioner_options={"n_samples": 2})
    assert res.settings["proposal"]["name"] == "fisher" and math.isfinite(res.log_volume)


def test_working_memory_zero_evaluates_one_direction_at_a_time_in_place(make_mlp):
    # working_memory=0: no [K, D] buffers and no vmapped activations; each point is written into the weights and
    # restored from the anchor copy. For this MLP the un-vmapped forward is bitwise the vmapped one (see
    # test_rows_bitwise_independent_of_batching), so the whole estimate is identical to the default's.
    model = make_mlp()
    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(4))
    before = snapshot(model)
    lean = quick(model, [(x,)], working_memory=0, n_directions=6)
    assert_bitwise_same(model, before)
    default = quick(model, [(x,)], n_directions=6)
    assert lean.settings["behavior"]["path"] == "loop" and default.settings["behavior"]["path"] == "vmap"
    assert lean.settings["working_memory"] == 0 and lean.settings["behavior"]["path_reason"] == "use_vmap=False"
    assert lean.log_estimates == default.log_estimates and lean.radii == default.radii
    assert lean.forward_passes == default.forward_passes


def test_json_round_trip(make_mlp):
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(4))
    res = quick(make_mlp(), [(x,)])
    assert VolumeResult.from_json(res.to_json()) == res


def test_loss_and_output_behaviours(make_bert, cls_batch):
    loss = quick(make_bert(), [cls_batch], behavior="loss", cutoff=0.05)
    out = quick(make_bert(head="none"), [cls_batch], behavior="output", cutoff=1e-2)
    assert math.isfinite(loss.log_volume) and math.isfinite(out.log_volume)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"cutoff": 0.0}, ValueError, "cutoff"),
        ({"cutoff": -1.0}, ValueError, "cutoff"),
        ({"behavior": "entropy"}, ValueError, "behavior"),
        ({"prior": "laplace"}, ValueError, "prior"),
        ({"preconditioner": "shampoo"}, ValueError, "preconditioner"),
        ({"preconditioner": "adam"}, ValueError, "optimizer"),
        ({"params": []}, ValueError, "nothing to measure"),
        ({"sigma": "median"}, ValueError, "sigma"),
        ({"working_memory": -1}, ValueError, "working_memory"),
        ({"working_memory": 2.5e7}, ValueError, "working_memory"),
        ({"directions_per_batch": 0}, ValueError, "directions_per_batch"),
    ],
)
def test_bad_input_fails_fast(make_mlp, kwargs, exc, match):
    x = torch.randn(8, 20)
    with pytest.raises(exc, match=match):
        quick(make_mlp(), [(x,)], **kwargs)


def test_empty_data_no_logits_and_nonfinite_anchor(make_mlp, make_bert, cls_batch):
    with pytest.raises(ValueError, match="empty|no batches"):
        quick(make_mlp(), [])
    with pytest.raises(ValueError, match="logits"):
        quick(make_bert(head="none"), [cls_batch], behavior="kl")
    model = make_mlp()
    with torch.no_grad():
        model[4].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="finite"):
        quick(model, [(torch.randn(4, 20),)])
    with pytest.raises(TypeError, match="Module"):
        quick("not a model", [(torch.randn(4, 20),)])
