"""ParameterView: which parameters are measured and their flat layout."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hfvolume.models.params import ParameterView, rms


def _unique_numel(model: nn.Module, pred=lambda n, p: True) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if pred(n, p))


# ------------------------------------------------------------------------------------------------ selection
def test_trainable_selects_only_requires_grad_in_model_order(make_neox):
    model = make_neox()
    for name, p in model.named_parameters():
        if name.startswith("gpt_neox.embed_in") or ".layers.0." in name:
            p.requires_grad_(False)
    view = ParameterView.from_model(model)  # default "trainable"
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(view.names) == expected
    assert not any(".layers.0." in n or "embed_in" in n for n in view.names)
    assert view.n_params == _unique_numel(model, lambda n, p: p.requires_grad)
    assert view.selection == "trainable"
    # offsets are the running sum of numels
    assert view.offsets[0] == 0
    assert all(o + k == o2 for o, k, o2 in zip(view.offsets, view.numels, view.offsets[1:]))


def test_tied_embeddings_counted_once_and_reachable_by_alias(make_neox):
    model = make_neox(tie=True)
    assert model.lm_head.weight is model.gpt_neox.embed_in.weight
    view = ParameterView.from_model(model, "all")
    assert "lm_head.weight" not in view.names and "gpt_neox.embed_in.weight" in view.names
    assert view.n_params == _unique_numel(model)  # named_parameters() dedups shared tensors
    assert dict(view.aliases) == {"gpt_neox.embed_in.weight": ("lm_head.weight",)}
    # a list naming the alias selects the shared tensor (once)
    by_alias = ParameterView.from_model(model, ["lm_head.weight", "gpt_neox.embed_in.weight"])
    assert by_alias.names == ("gpt_neox.embed_in.weight",)
    # a callable matching only the alias name selects it too
    by_fn = ParameterView.from_model(model, lambda n, p: n.startswith("lm_head"))
    assert by_fn.names == ("gpt_neox.embed_in.weight",)
    # a state dict holding only the alias key (as safetensors would after dedup) still flattens
    sd = {("lm_head.weight" if k == "gpt_neox.embed_in.weight" else k): v for k, v in model.state_dict().items()}
    sd.pop("gpt_neox.embed_in.weight", None)
    assert torch.equal(view.flatten(sd), view.flatten())


def test_all_includes_frozen(make_neox):
    model = make_neox()
    for p in model.parameters():
        p.requires_grad_(False)
    view = ParameterView.from_model(model, "all")
    assert view.names == tuple(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="requires_grad=True"):
        ParameterView.from_model(model, "trainable")


def test_names_list_and_unknown_name_suggests_closest(make_neox):
    model = make_neox()
    names = ["gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "gpt_neox.final_layer_norm.bias"]
    view = ParameterView.from_model(model, list(reversed(names)))
    assert view.names == tuple(names)  # model order, not list order
    assert view.selection == "names"
    with pytest.raises(ValueError, match=r"closest valid names.*gpt_neox\.layers\.1\.mlp\.dense_h_to_4h\.weight"):
        ParameterView.from_model(model, ["gpt_neox.layers.1.mlp.dense_h_to_4h.wieght"])
    with pytest.raises(ValueError, match="empty list"):
        ParameterView.from_model(model, [])
    with pytest.raises(TypeError, match="parameter names"):
        ParameterView.from_model(model, [3])


def test_callable_selection(make_neox):
    model = make_neox()
    view = ParameterView.from_model(model, lambda name, p: name.endswith("bias") and p.ndim == 1)
    assert view.names and all(n.endswith("bias") for n in view.names)
    assert view.selection == "callable"
    with pytest.raises(ValueError, match="selected no parameter"):
        ParameterView.from_model(model, lambda name, p: False)


def test_bad_params_type_and_string(make_neox):
    model = make_neox()
    with pytest.raises(TypeError, match="params must be"):
        ParameterView.from_model(model, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown parameter selection 'trainble'"):
        ParameterView.from_model(model, "trainble")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ParameterView.from_model("not a model")  # type: ignore[arg-type]


def test_non_float_parameter_rejected():
    model = nn.Linear(3, 2)
    model.count = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    with pytest.raises(ValueError, match=r"\['count'\] are not floating point"):
        ParameterView.from_model(model, "all")
    # excluding it works
    assert ParameterView.from_model(model, ["weight", "bias"]).n_params == 8


def test_dtype_is_widest_float():
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    model.b = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    assert ParameterView.from_model(model).dtype == torch.float32
    model.c = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    view = ParameterView.from_model(model)
    assert view.dtype == torch.float64
    assert view.dtypes == (torch.bfloat16, torch.float16, torch.float64)
    assert view.device == torch.device("cpu")


# ------------------------------------------------------------------------------------------------ layout
def test_flatten_unflatten_round_trip_bitwise(make_neox):
    model = make_neox()
    view = ParameterView.from_model(model, "all")
    flat = view.flatten()
    assert flat.shape == (view.n_params,) and flat.dtype == torch.float32
    parts = view.unflatten(flat)
    params = dict(model.named_parameters())
    for name in view.names:
        assert parts[name].shape == params[name].shape
        assert torch.equal(parts[name], params[name].detach())
        # zero-copy: the view shares flat's storage
        assert parts[name].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    rebuilt = torch.cat([parts[n].reshape(-1) for n in view.names])
    assert torch.equal(rebuilt, flat)

    g = torch.Generator().manual_seed(0)
    batch = torch.randn(3, view.n_params, generator=g)
    parts_k = view.unflatten(batch)
    for name, shape in zip(view.names, view.shapes):
        assert parts_k[name].shape == (3, *shape)
        assert parts_k[name].untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()
    for k in range(3):
        assert torch.equal(torch.cat([parts_k[n][k].reshape(-1) for n in view.names]), batch[k])
    # slices agree with offsets
    for name, sl in view.tensor_slices().items():
        assert torch.equal(batch[:, sl].reshape(3, *parts_k[name].shape[1:]), parts_k[name])


def test_flatten_is_a_copy(make_mlp):
    model = make_mlp()
    view = ParameterView.from_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = view.flatten()
    flat.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # it re-reads current values
    with torch.no_grad():
        model[0].bias.fill_(3.0)
    assert torch.equal(view.flatten()[view.tensor_slices()["0.bias"]], torch.full((64,), 3.0))


def test_unflatten_shape_errors(make_mlp):
    view = ParameterView.from_model(make_mlp())
    with pytest.raises(ValueError, match=f"D = {view.n_params}"):
        view.unflatten(torch.zeros(view.n_params + 1))
    with pytest.raises(ValueError, match=r"\[D\] or \[K, D\]"):
        view.unflatten(torch.zeros(2, 2, view.n_params))


def test_flatten_from_state_dict_and_missing_keys(make_neox):
    base, tuned = make_neox(seed=0), make_neox(seed=1)
    view = ParameterView.from_model(tuned)
    from_sd = view.flatten(base.state_dict())
    assert torch.equal(from_sd, ParameterView.from_model(base).flatten())
    assert torch.equal(view.flatten(base), from_sd)  # a model works too
    assert not torch.equal(from_sd, view.flatten())
    sd = dict(base.state_dict())
    del sd["gpt_neox.final_layer_norm.weight"], sd["gpt_neox.layers.0.attention.dense.bias"]
    with pytest.raises(ValueError, match=r"no value for 2 measured.*gpt_neox\.layers\.0\.attention\.dense\.bias"):
        view.flatten(sd)
    sd = dict(base.state_dict())
    sd["gpt_neox.final_layer_norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match="shape"):
        view.flatten(sd)
    assert view.flatten(dtype=torch.float64).dtype == torch.float64


def test_expand_per_tensor(make_mlp):
    model = make_mlp()
    view = ParameterView.from_model(model)
    values = {name: float(i + 1) for i, name in enumerate(view.names)}
    values["not.a.measured.tensor"] = 99.0  # keys outside the view are ignored
    out = view.expand_per_tensor(values)
    assert out.shape == (view.n_params,) and out.dtype == torch.float64
    for i, (name, sl) in enumerate(view.tensor_slices().items()):
        assert torch.all(out[sl] == i + 1)
    assert torch.equal(view.expand_per_tensor(0.5), torch.full((view.n_params,), 0.5, dtype=torch.float64))
    del values["2.weight"]
    with pytest.raises(ValueError, match=r"no value for 1 measured tensor.*'2\.weight'"):
        view.expand_per_tensor(values)
    with pytest.raises(TypeError, match="number or a mapping"):
        view.expand_per_tensor("0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        view.expand_per_tensor(math.nan)


def test_describe_is_json_and_rms(make_neox):
    model = make_neox(tie=True)
    view = ParameterView.from_model(model)
    d = view.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["n_params"] == view.n_params and d["tied"] == {"gpt_neox.embed_in.weight": ["lm_head.weight"]}
    assert rms(torch.tensor([3.0, 4.0])) == pytest.approx(math.sqrt(12.5))
    with pytest.raises(ValueError, match="empty"):
        rms(torch.zeros(0))


def test_view_does_not_keep_model_alive(make_mlp):
    import gc

    model = make_mlp()
    view = ParameterView.from_model(model)
    del model
    gc.collect()
    with pytest.raises(ValueError, match="no longer exists"):
        view.flatten()
