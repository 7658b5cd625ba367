"""Hugging Face MLP blocks and heads as affine-plus-activation layers (recognised by class name and structure).

Nothing here imports ``transformers``: the blocks are recognised by their class names and attributes, so the
pure core never loads it.

* ``GPT2MLP``: c_fc → act → c_proj. GPT-2's ``Conv1D`` stores its weight as ``[in, out]``, hence the transpose.
* ``BertIntermediate`` (dense → act) and ``BertLayer``'s MLP: intermediate, then ``output.dense`` without the
  residual connection and LayerNorm that ``BertOutput`` applies after it (the block as a standalone map).
* Heads made only of Linear and an activation: ``BertPooler`` (dense → tanh, applied to one token's vector),
  ``RobertaClassificationHead`` and ``ElectraClassificationHead`` (dense → act → out_proj).
"""
from __future__ import annotations

import torch
from torch import nn

from hfvolume.cumulants.activations import Activation
from hfvolume.cumulants.layers import Affine, UnsupportedModelError, activation_of


def _act(module: object, label: str) -> Activation:
    if isinstance(module, nn.Module):
        act = activation_of(module)
        if act is not None:
            return act
    name = getattr(module, "__name__", type(module).__name__)
    fn = {"relu": "relu", "gelu": "gelu", "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu"}.get(name)
    if fn is not None:
        return Activation(fn)
    raise UnsupportedModelError(f"{label} ({type(module).__name__}): activation not supported; use one of ReLU, "
                                "LeakyReLU, GELU (exact or tanh), Tanh, Sigmoid, SiLU")


def _conv1d(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    # transformers' Conv1D computes x @ weight + bias with weight [in, out].
    return module.weight.detach().T, None if module.bias is None else module.bias.detach()


def _linear(module: nn.Module, label: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, nn.Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if type(module).__name__ == "Conv1D":
        return _conv1d(module)
    raise UnsupportedModelError(f"{label} ({type(module).__name__}): expected a Linear")


def _gpt2_mlp(block: nn.Module) -> list[Affine]:
    w1, b1 = _linear(block.c_fc, "c_fc")
    w2, b2 = _linear(block.c_proj, "c_proj")
    return [Affine(w1, b1, _act(block.act, "act")), Affine(w2, b2, None)]


def _bert_intermediate(block: nn.Module) -> list[Affine]:
    w, b = _linear(block.dense, "dense")
    return [Affine(w, b, _act(block.intermediate_act_fn, "intermediate_act_fn"))]


def _bert_layer(block: nn.Module) -> list[Affine]:
    w2, b2 = _linear(block.output.dense, "output.dense")
    return _bert_intermediate(block.intermediate) + [Affine(w2, b2, None)]


def _pooler(block: nn.Module) -> list[Affine]:
    w, b = _linear(block.dense, "dense")
    return [Affine(w, b, _act(block.activation, "activation"))]


def _cls_head(act: Activation):
    def build(block: nn.Module) -> list[Affine]:
        w1, b1 = _linear(block.dense, "dense")
        w2, b2 = _linear(block.out_proj, "out_proj")
        return [Affine(w1, b1, act), Affine(w2, b2, None)]

    return build


def _electra_head(block: nn.Module) -> list[Affine]:
    act = _act(block.activation, "activation") if hasattr(block, "activation") else Activation("gelu")
    return _cls_head(act)(block)


BLOCKS = {
    "GPT2MLP": _gpt2_mlp,
    "BertIntermediate": _bert_intermediate,
    "BertLayer": _bert_layer,
    "BertPooler": _pooler,
    "RobertaClassificationHead": _cls_head(Activation("tanh")),
    "ElectraClassificationHead": _electra_head,
}


def block_layers(module: nn.Module) -> list[Affine] | None:
    """Affine layers of a recognised Hugging Face block, None if the class is not one of :data:`BLOCKS`."""
    build = BLOCKS.get(type(module).__name__)
    if build is None:
        return None
    if module.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()):
        raise UnsupportedModelError(f"{type(module).__name__}: Dropout in train mode is random; call .eval() first")
    try:
        return build(module)
    except AttributeError as err:
        raise UnsupportedModelError(f"{type(module).__name__}: unexpected structure ({err})") from err


def mlp_parts(model: nn.Module) -> list[tuple[str, list[Affine]]]:
    """Every MLP part of a model: ``[("", layers)]`` if the whole model is one, else each recognised block by its
    qualified name (e.g. ``"h.0.mlp"``, ``"encoder.layer.1"``), outermost first. Empty if there is none."""
    from hfvolume.cumulants.layers import mlp_layers

    try:
        return [("", mlp_layers(model))]
    except UnsupportedModelError:
        pass
    parts: list[tuple[str, list[Affine]]] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered):
            continue
        layers = block_layers(module)
        if layers is None and isinstance(module, nn.Sequential):
            try:
                layers = mlp_layers(module)
            except UnsupportedModelError:
                layers = None
        if layers is not None:
            parts.append((name, layers))
            covered.append(name)
    return parts


__all__ = ["BLOCKS", "block_layers", "mlp_parts"]
