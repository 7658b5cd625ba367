"""Initialisation-health report and the ``hfvolume cumulants`` command on tiny models built in code (offline)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hfvolume.cumulants import GaussianInput, mlp_layers, propagate
from hfvolume.cumulants.report import InitHealthReport, init_health_report, run_cli


def _mlp(bias: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.fill_(bias)
    return model


@pytest.mark.parametrize("bias,dead,linear", [(-1.0, 1.0, 0.0), (1.0, 0.0, 1.0)])
def test_dead_and_linear_units(bias, dead, linear):
    # Pre-activations N(±1, ~1e-3): P(z > 0) is 0 or 1 to within far less than 1e-3.
    report = init_health_report(_mlp(bias))
    (part,) = report.parts
    assert part.name == "" and part.widths == (8, 16, 4)
    (layer,) = part.layers
    assert (layer.dead_fraction, layer.linear_fraction) == (dead, linear)
    d = report.to_dict()
    assert all(type(v) is float and math.isfinite(v) for v in d.values())
    assert d["init_dead_unit_fraction"] == dead and d["init_part/model/layer0/dead_fraction"] == dead
    res = propagate(mlp_layers(_mlp(bias)), None, "mean_field")
    assert d["init_expected_output_std"] == pytest.approx(float(res.mean.std(unbiased=False)), rel=1e-12)
    assert "| model | 8-16-4 | standard |" in report.to_markdown()


def test_report_uses_data_input_when_it_fits_and_restores_train_mode():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 4)).train()
    inp = GaussianInput.from_data([torch.randn(50, 8, generator=torch.Generator().manual_seed(1))])
    report = init_health_report(model, inp=inp, method="kprop")
    assert report.parts[0].input == "data" and model.training and model[1].training


def test_report_on_gpt2_finds_every_mlp_block():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    report = init_health_report(model)
    assert [p.name for p in report.parts] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert report.to_dict()["init_mlp_parts"] == 2.0


def test_report_without_mlp_parts():
    report = init_health_report(nn.Sequential(nn.Embedding(4, 3)))
    assert report.parts == () and report.to_dict() == {"init_mlp_parts": 0.0}
    assert "no MLP part" in report.to_markdown()
    assert isinstance(report, InitHealthReport)


def test_cli_on_saved_sequential_and_gpt2(tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    (tmp_path / "mlp").mkdir()
    state = {f"mlp.{k}": v.contiguous() for k, v in mlp.state_dict().items()}
    save_file(state, str(tmp_path / "mlp" / "model.safetensors"))
    out = tmp_path / "out.json"
    assert run_cli(["--model", str(tmp_path / "mlp"), "--method", "kprop", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    expected = propagate(mlp_layers(mlp), None, "kprop")
    assert payload["parts"][0]["expected_output"] == pytest.approx(expected.mean.tolist(), rel=1e-6, abs=1e-7)
    GPT2Model(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "gpt2")
    assert run_cli(["--model", str(tmp_path / "gpt2")]) == 0
    assert "h.0.mlp: widths 16-64-16" in capsys.readouterr().out
    assert run_cli(["--model", str(tmp_path / "missing")]) == 1  # a user error, as in `hfvolume estimate`
