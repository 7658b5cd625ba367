"""``preconditioner="ggn"`` end to end on a tiny MLP: the curvature-tilted proposal is built from the model, its cost
is counted, its settings are recorded, and the model and the caller's random state are left exactly as they were."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from hfvolume import estimate_local_volume


def data() -> list[tuple[torch.Tensor]]:
    return [(torch.randn(24, 20, generator=torch.Generator().manual_seed(3)),)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def ggn(model: nn.Module, **kw):
    kw.setdefault("n_directions", 8)
    return estimate_local_volume(model, data(), preconditioner="ggn", progress=False, **kw)


def test_model_modes_and_random_states_are_restored_bit_for_bit(make_mlp):
    model = make_mlp().train()
    model[2].eval()  # a mixed-mode model keeps every submodule's own flag
    before = snapshot(model)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    ggn(model)
    after = model.state_dict(keep_vars=True)
    for k, v in after.items():
        assert torch.equal(v.detach(), before[k]), f"{k} changed"
        assert v.grad is None, f"{k} has a gradient"
    assert model.training and not model[2].training and model[0].training
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    np.testing.assert_array_equal(np.random.get_state()[1], states[2])


def test_settings_record_the_tilt_rank_and_floor_and_passes_include_the_curvature(make_mlp):
    res = ggn(make_mlp(), preconditioner_options={"floor_shape": "isotropic", "pilot_rays": 4})
    proposal = res.settings["proposal"]
    assert proposal["name"] == "ggn"
    assert proposal["rank"] > 0 and proposal["rank"] == proposal["curvature"]["rank"]
    assert proposal["floor"] > 0 and proposal["floor"] == pytest.approx(proposal["curvature"]["floor"]["value"])
    assert proposal["saddlepoint"] < 0 and proposal["s_used"] == pytest.approx(10.0 * proposal["saddlepoint"])
    assert proposal["floor_shape"] == "isotropic" and proposal["mixture"] == 0.0
    spent = proposal["curvature_forward_passes"]
    assert spent == proposal["curvature"]["forward_passes"]["total"] > 0
    # The core counts one pass per evaluated point plus the anchor's; the curvature's passes come on top.
    assert res.forward_passes == sum(res.evaluations) + 1 + spent
    assert math.isfinite(res.log_volume) and res.n_failed == 0
    json.dumps(res.to_dict())


def test_floor_shapes_tilt_and_mixture(make_mlp):
    model = make_mlp()
    fisher = ggn(model, mixture=0.25, preconditioner_options={"tilt": 1.0, "pilot_rays": 2})
    proposal = fisher.settings["proposal"]
    assert proposal["floor_shape"] == "diagonal" and proposal["floor_shape_source"]["name"] == "fisher"
    assert proposal["mixture"] == 0.25 and proposal["tilt"] == 1.0
    assert proposal["curvature_forward_passes"] == proposal["curvature"]["forward_passes"]["total"] + 1
    assert max(fisher.log_weights) <= math.log(4.0) + 1e-9
    # With an optimizer the floor's shape comes from Adam's second moments (no forward passes).
    trained = make_mlp()
    opt = torch.optim.Adam(trained.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        trained(data()[0][0]).pow(2).mean().backward()
        opt.step()
    adam = ggn(trained.eval(), optimizer=opt, preconditioner_options={"pilot_rays": 2})
    assert adam.settings["proposal"]["floor_shape_source"]["name"] == "adam"
    assert adam.settings["proposal"]["curvature_forward_passes"] == (
        adam.settings["proposal"]["curvature"]["forward_passes"]["total"])


def test_same_results_whatever_the_direction_batching(make_mlp):
    model = make_mlp()
    options = {"floor_shape": "isotropic", "pilot_rays": 2}
    one = ggn(model, directions_per_batch=1, preconditioner_options=options)
    many = ggn(model, directions_per_batch=5, preconditioner_options=options)
    assert one.log_estimates == many.log_estimates and one.log_weights == many.log_weights


@pytest.mark.parametrize("options, exc, match", [
    ({"bogus": 1}, ValueError, "unknown preconditioner_options"),
    ({"tilt": -1.0}, ValueError, "tilt"),
    ({"floor_shape": "hessian"}, ValueError, "floor_shape"),
    ({"floor_shape": "adam"}, ValueError, "optimizer"),
])
def test_bad_options_fail_fast(make_mlp, options, exc, match):
    with pytest.raises(exc, match=match):
        ggn(make_mlp(), preconditioner_options=options)


def test_uniform_prior_is_refused_with_the_alternative(make_mlp):
    with pytest.raises(ValueError, match="diagonal proposal"):
        ggn(make_mlp(), prior="uniform", preconditioner_options={"floor_shape": "isotropic", "pilot_rays": 2})


def test_a_prebuilt_curvature_proposal_is_used_as_given(make_mlp):
    from hfvolume.measure.options import resolve_curvature_proposal
    from hfvolume.models.behavior import ModelBehavior

    model = make_mlp()
    options = {"floor_shape": "isotropic", "pilot_rays": 2}
    inline = ggn(model, preconditioner_options=options)
    fn = ModelBehavior(model, data())
    spec, cost = resolve_curvature_proposal(fn.view, model=model, behavior=fn, cutoff=1e-2, mixture=0.0,
                                            options=options)
    reused = estimate_local_volume(model, data(), preconditioner=spec, n_directions=8, progress=False)
    assert reused.log_estimates == inline.log_estimates
    assert reused.forward_passes + cost == inline.forward_passes  # paid once, when it was built
    with pytest.raises(ValueError, match="prebuilt CurvatureProposal"):
        estimate_local_volume(model, data(), preconditioner=spec, mixture=0.5, progress=False)
