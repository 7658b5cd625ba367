"""Turning an ``nn.Module`` into the list of affine-plus-activation layers that cumulant propagation works on.

Accepted (everything else raises :class:`UnsupportedModelError` naming the first offending module and why):

* ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` and elementwise activations (``ReLU``,
  ``LeakyReLU``, ``GELU`` exact or tanh, ``Tanh``, ``Sigmoid``, ``SiLU``, ``Identity``), an optional leading
  ``nn.Flatten``, ``Dropout`` in eval mode (the identity), and ``BatchNorm1d`` in eval mode (an affine map, folded
  into the neighbouring Linear);
* a module whose only child holding parameters is such a Sequential (hfvolume's digits classifier);
* Hugging Face MLP blocks and heads (see :mod:`hfvolume.cumulants.adapters`).

Residual connections, attention and input-dependent normalisation (LayerNorm) are outside the method: the
propagation needs an MLP whose layers are affine maps followed by one elementwise function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfvolume.cumulants.activations import Activation, as_activation


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) is not an MLP this method can propagate through; the message says which."""


@dataclass(frozen=True)
class Affine:
    """One layer x ↦ act(weight @ x + bias): weight ``[out, in]`` float64, bias ``[out]`` float64 or None,
    act an :class:`Activation` or None (identity, e.g. the output layer)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    act: Activation | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, torch.Tensor) or self.weight.ndim != 2:
            raise ValueError(f"weight must be a 2-D tensor [out, in], got {getattr(self.weight, 'shape', None)}")
        object.__setattr__(self, "weight", self.weight.detach().to(torch.float64).clone())
        if self.bias is not None:
            if tuple(self.bias.shape) != (self.weight.shape[0],):
                raise ValueError(f"bias must have shape ({self.weight.shape[0]},), got {tuple(self.bias.shape)}")
            object.__setattr__(self, "bias", self.bias.detach().to(torch.float64).clone())
        if self.act is not None:
            act = as_activation(self.act)
            object.__setattr__(self, "act", None if act.is_identity else act)
        finite = bool(torch.isfinite(self.weight).all())
        if not finite or (self.bias is not None and not bool(torch.isfinite(self.bias).all())):
            raise ValueError("weight and bias must be finite")

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Forward on a batch ``[b, in]`` in x's dtype."""
        z = x @ self.weight.to(x.dtype).T
        if self.bias is not None:
            z = z + self.bias.to(x.dtype)
        return z if self.act is None else self.act(z)


def check_layers(layers: list[Affine]) -> list[Affine]:
    """Validate a layer list: non-empty, :class:`Affine` items, matching widths."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError("layers must be a non-empty list of Affine")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Affine):
            raise TypeError(f"layers[{i}] must be an Affine, got {type(layer).__name__}")
        if i and layer.in_features != layers[i - 1].out_features:
            raise ValueError(f"layers[{i}] takes {layer.in_features} inputs but layers[{i - 1}] gives "
                             f"{layers[i - 1].out_features}")
    return list(layers)


def activation_of(module: nn.Module) -> Activation | None:
    """The :class:`Activation` of an elementwise activation module (torch or Hugging Face), None if not one."""
    if isinstance(module, nn.ReLU):
        return Activation("relu")
    if isinstance(module, nn.LeakyReLU):
        return Activation("leaky_relu", float(module.negative_slope))
    if isinstance(module, nn.GELU):
        return Activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    if isinstance(module, nn.Tanh):
        return Activation("tanh")
    if isinstance(module, nn.Sigmoid):
        return Activation("sigmoid")
    if isinstance(module, nn.SiLU):
        return Activation("silu")
    name = type(module).__name__
    # Hugging Face's activation classes (transformers.activations), recognised without importing transformers.
    hf = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
          "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "AccurateGELUActivation": "gelu_tanh",
          "SiLUActivation": "silu"}
    if name in hf:
        return Activation(hf[name])
    return None


_WHY = {
    "LayerNorm": "it normalises each input by that input's own mean and variance, so it is not elementwise",
    "RMSNorm": "it normalises each input by that input's own scale, so it is not elementwise",
    "Embedding": "an embedding lookup takes token ids, not Gaussian vectors",
}


def _why(module: nn.Module) -> str:
    name = type(module).__name__
    if name in _WHY:
        return _WHY[name]
    if "Attention" in name:
        return "attention is input-dependent mixing, outside the MLP family this method covers"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "convolutions are linear but are not supported here: flatten them into a Linear first"
    return ("not a Linear, an elementwise activation, Dropout, Identity or eval-mode BatchNorm1d; residual "
            "connections, attention and input-dependent normalisation are outside this method")


class _Builder:
    """Accumulates Affine layers from a flat stream of modules, folding BatchNorm and checking the order."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor | None] = []
        self.acts: list[Activation | None] = []
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # BatchNorm after an activation: (scale, shift)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach().to(torch.float64)
        bias = None if bias is None else bias.detach().to(torch.float64)
        if self.pending is not None:
            # W (s ⊙ x + t) + b = (W diag s) x + (W t + b).
            scale, shift = self.pending
            bias = weight @ shift + (bias if bias is not None else 0.0)
            weight = weight * scale[None, :]
            self.pending = None
        self.weights.append(weight)
        self.biases.append(bias)
        self.acts.append(None)

    def activation(self, act: Activation, label: str) -> None:
        if self.pending is not None:
            # BatchNorm between an activation and this one: an identity Linear carries the folded affine map.
            self.linear(torch.eye(self.pending[0].shape[0], dtype=torch.float64), None)
        elif not self.weights:
            raise UnsupportedModelError(f"{label}: an activation before the first Linear; start with a Linear")
        elif self.acts[-1] is not None:
            raise UnsupportedModelError(f"{label}: two activations in a row cannot be expanded as one elementwise "
                                        "function around a Gaussian; insert a Linear between them")
        self.acts[-1] = act

    def batchnorm(self, module: nn.BatchNorm1d, label: str) -> None:
        if module.training:
            raise UnsupportedModelError(f"{label}: BatchNorm1d in train mode normalises by batch statistics; "
                                        "call model.eval() first")
        if module.running_mean is None or module.running_var is None:
            raise UnsupportedModelError(f"{label}: BatchNorm1d without running statistics is not affine")
        scale = 1.0 / torch.sqrt(module.running_var.detach().to(torch.float64) + module.eps)
        shift = -module.running_mean.detach().to(torch.float64) * scale
        if module.affine:
            gamma = module.weight.detach().to(torch.float64)
            scale, shift = scale * gamma, shift * gamma + module.bias.detach().to(torch.float64)
        if self.weights and self.acts[-1] is None and self.pending is None:
            # Directly after a Linear: fold into it, diag(s) (W x + b) + t.
            self.weights[-1] = self.weights[-1] * scale[:, None]
            b = self.biases[-1]
            self.biases[-1] = (b * scale if b is not None else torch.zeros_like(scale)) + shift
        elif self.pending is None:
            self.pending = (scale, shift)
        else:
            s0, t0 = self.pending
            self.pending = (s0 * scale, t0 * scale + shift)

    def finish(self) -> list[Affine]:
        if self.pending is not None:
            # A trailing BatchNorm: an identity Linear applies it (linear() consumes the pending map).
            self.linear(torch.eye(self.pending[0].shape[0], dtype=torch.float64), None)
        if not self.weights:
            raise UnsupportedModelError("the model has no Linear layer")
        return [Affine(w, b, a) for w, b, a in zip(self.weights, self.biases, self.acts)]


def _flatten_sequential(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in seq.named_children():
        label = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            out.extend(_flatten_sequential(child, label))
        else:
            out.append((label, child))
    return out


def sequential_layers(seq: nn.Sequential, *, prefix: str = "") -> list[Affine]:
    """Affine layers of an ``nn.Sequential`` of Linear and elementwise activations (see the module docstring)."""
    builder = _Builder()
    modules = _flatten_sequential(seq, prefix)
    for pos, (label, module) in enumerate(modules):
        kind = type(module).__name__
        where = f"{label} ({kind})"
        if isinstance(module, nn.Linear):
            builder.linear(module.weight, module.bias)
        elif (act := activation_of(module)) is not None:
            builder.activation(act, where)
        elif isinstance(module, nn.Identity):
            continue
        elif isinstance(module, nn.Dropout):
            if module.training and module.p > 0:
                raise UnsupportedModelError(f"{where}: Dropout in train mode is random; call model.eval() first")
        elif isinstance(module, nn.Flatten):
            if pos != 0:
                raise UnsupportedModelError(f"{where}: Flatten is only accepted as the first module")
        elif isinstance(module, nn.BatchNorm1d):
            builder.batchnorm(module, where)
        else:
            raise UnsupportedModelError(f"{where}: {_why(module)}")
    return builder.finish()


def mlp_layers(model: nn.Module) -> list[Affine]:
    """The model as ``[Affine, ...]`` (weights copied to float64), or :class:`UnsupportedModelError`.

    Accepts an ``nn.Sequential`` MLP, a module whose parameters all sit in one Sequential child (hfvolume's
    digits classifier), Hugging Face GPT-2 / BERT MLP blocks and Linear-plus-activation heads.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Sequential):
        return sequential_layers(model)
    if isinstance(model, nn.Linear):
        return [Affine(model.weight, model.bias, None)]
    from hfvolume.cumulants.adapters import block_layers

    layers = block_layers(model)
    if layers is not None:
        return layers
    children = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
    own = [n for n, _ in model.named_parameters(recurse=False)]
    if len(children) == 1 and not own and isinstance(children[0][1], nn.Sequential):
        return sequential_layers(children[0][1], prefix=children[0][0])
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        if not isinstance(module, (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten, nn.BatchNorm1d)) \
                and activation_of(module) is None and any(True for _ in module.parameters(recurse=False)) \
                or type(module).__name__ in _WHY or "Attention" in type(module).__name__:
            raise UnsupportedModelError(f"{name} ({type(module).__name__}): {_why(module)}")
    raise UnsupportedModelError(
        f"{type(model).__name__}: the order of its submodules is fixed by its own forward(), which this method "
        "cannot read; pass an nn.Sequential of Linear and elementwise activations (or the Sequential inside it)")


__all__ = ["Affine", "UnsupportedModelError", "activation_of", "check_layers", "mlp_layers", "sequential_layers"]
