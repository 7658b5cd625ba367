"""``mlp_layers``: accepted model forms reproduce the module's forward pass; everything else is refused by name."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hfvolume.cumulants import Affine, UnsupportedModelError, mlp_layers, mlp_parts

F64 = torch.float64


def run(layers: list[Affine], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def same_map(model: nn.Module, layers: list[Affine], x: torch.Tensor, fwd=None) -> None:
    with torch.no_grad():
        expected = (fwd or model)(x.to(torch.float32)).to(F64)
    # The module runs in float32, the layers in float64: agreement to float32 rounding of O(1) activations.
    torch.testing.assert_close(run(layers, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.2), nn.GELU(), nn.GELU(approximate="tanh"), nn.Tanh(),
                                 nn.Sigmoid(), nn.SiLU(), nn.Identity()])
def test_sequential_with_every_activation(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), act, nn.Dropout(0.5), nn.Linear(5, 3)).eval()
    layers = mlp_layers(model)
    assert [layer.out_features for layer in layers] == [5, 3]
    same_map(model, layers, torch.randn(7, 6, dtype=F64))


def test_batchnorm_in_eval_mode_is_folded():
    torch.manual_seed(1)
    bn1, bn2 = nn.BatchNorm1d(5), nn.BatchNorm1d(5)
    for bn in (bn1, bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    model = nn.Sequential(nn.Linear(4, 5), bn1, nn.ReLU(), bn2, nn.Linear(5, 2), nn.Sequential(nn.Tanh())).eval()
    layers = mlp_layers(model)
    assert len(layers) == 2
    same_map(model, layers, torch.randn(9, 4, dtype=F64))


def test_digits_classifier_is_recognised_structurally():
    try:
        from hfvolume.integrations.demo import DigitsClassifier
    except ImportError:  # pragma: no cover - before the package reorganisation
        from hfvolume.demo import DigitsClassifier
    model = DigitsClassifier().eval()
    layers = mlp_layers(model)
    assert [(a.in_features, a.out_features, a.act.name if a.act else None) for a in layers] == [
        (64, 64, "tanh"), (64, 64, "tanh"), (64, 10, None)]
    same_map(model, layers, torch.randn(5, 64, dtype=F64), fwd=lambda x: model(x).logits)


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()


def _bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=16)).eval()


def test_gpt2_mlp_block():
    model = _gpt2()
    block = model.h[0].mlp
    layers = mlp_layers(block)
    assert layers[0].act.name == "gelu_tanh" and layers[0].weight.shape == (64, 16)
    same_map(block, layers, torch.randn(4, 16, dtype=F64))


def test_bert_mlp_block_without_residual_and_layernorm():
    model = _bert()
    layer = model.encoder.layer[0]
    layers = mlp_layers(layer)
    same_map(layer, layers, torch.randn(4, 16, dtype=F64),
             fwd=lambda x: layer.output.dense(layer.intermediate(x)))
    pooler = mlp_layers(model.pooler)
    same_map(model.pooler, pooler, torch.randn(4, 16, dtype=F64), fwd=lambda x: model.pooler(x[:, None, :]))


def test_roberta_classification_head():
    from transformers import RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

    torch.manual_seed(2)
    head = RobertaClassificationHead(RobertaConfig(hidden_size=12, num_labels=3)).eval()
    same_map(head, mlp_layers(head), torch.randn(5, 12, dtype=F64), fwd=lambda x: head(x[:, None, :]))


def test_mlp_parts_of_transformers():
    gpt_parts = [name for name, _ in mlp_parts(_gpt2())]
    assert gpt_parts == ["h.0.mlp", "h.1.mlp"]
    bert_parts = [name for name, _ in mlp_parts(_bert())]
    assert bert_parts == ["encoder.layer.0", "encoder.layer.1", "pooler"]


@pytest.mark.parametrize("model,needle", [
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), r"^1 \(LayerNorm\): .*not elementwise"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 2)), r"^2 \(Tanh\): two activations"),
    (nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1)), r"^1 \(Conv1d\)"),
    (nn.Sequential(nn.Linear(4, 4), nn.Flatten()), r"^1 \(Flatten\): Flatten is only accepted as the first"),
    (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), r"^0 \(ReLU\): an activation before the first Linear"),
    (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)).train(), r"^1 \(Dropout\): .*train mode"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train(), r"^1 \(BatchNorm1d\).*train"),
])
def test_refusals_name_the_first_offending_module(model, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        mlp_layers(model)


def test_refuses_custom_modules_and_whole_transformers():
    class TwoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)

    with pytest.raises(UnsupportedModelError, match="TwoLinear: the order of its submodules"):
        mlp_layers(TwoLinear())
    with pytest.raises(UnsupportedModelError, match=r"^wte \(Embedding\): an embedding"):
        mlp_layers(_gpt2())
    with pytest.raises(TypeError):
        mlp_layers("not a module")


def test_affine_validation():
    with pytest.raises(ValueError, match="bias must have shape"):
        Affine(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown activation"):
        Affine(torch.zeros(3, 2), None, "softplus")
