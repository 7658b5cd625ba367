"""The bundled default: a 64-64-64-10 MLP trained on scikit-learn's digits (the paper's small experiment).

No network: scikit-learn ships the 1,797 8×8 digit images. Training uses a private torch.Generator so that
running the demo never touches the caller's global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class DigitsData:
    """Standardised digits features ``[N, 64]`` float32 and labels ``[N]`` int64, split into train and eval."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor


def load_digits_data(*, eval_fraction: float = 0.25, seed: int = 0, corrupt_fraction: float = 0.0) -> DigitsData:
    """scikit-learn's digits, standardised, with an optional fraction of training labels replaced at random.

    corrupt_fraction: share of *training* labels replaced by uniformly random classes (a "poisoned" net, which
    should come out with a smaller local volume than a clean one, as Scherlis & Belrose report).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits demo needs scikit-learn: pip install 'hfvolume[examples]'") from err
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"corrupt_fraction must be in [0, 1], got {corrupt_fraction!r}")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    n_eval = int(round(eval_fraction * len(y)))
    ev, tr = order[:n_eval], order[n_eval:]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    y_train = y[tr].clone()
    if corrupt_fraction > 0:
        flip = torch.rand(len(tr), generator=gen) < corrupt_fraction
        y_train[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    return DigitsData(x[tr], y_train, x[ev], y[ev])


def digits_mlp(*, seed: int = 0, hidden: int = 64, depth: int = 2) -> nn.Sequential:
    """The ``64-64-64-10`` tanh MLP (input, ``depth`` hidden layers, output; D = 8,970 at the defaults)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                module.weight.copy_(torch.empty_like(module.weight).uniform_(-bound, bound, generator=gen))
                module.bias.copy_(torch.empty_like(module.bias).uniform_(-bound, bound, generator=gen))
    return model


class DigitsClassifier(nn.Module):
    """The digits MLP behind a Trainer-style interface: ``forward(pixel_values [b, 64], labels [b] | None)`` returns
    a ``SequenceClassifierOutput`` with ``logits`` ``[b, 10]`` and, given labels, the mean cross-entropy ``loss``."""

    def __init__(self, *, seed: int = 0, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.mlp = digits_mlp(seed=seed, hidden=hidden, depth=depth)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.mlp(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def digits_datasets(*, seed: int = 0, corrupt_fraction: float = 0.0) -> tuple[Any, Any]:
    """(train, eval) ``datasets.Dataset`` with columns ``pixel_values`` (64 floats) and ``labels`` (int), torch
    format: what :class:`DigitsClassifier` and ``transformers.default_data_collator`` expect."""
    from datasets import Dataset

    data = load_digits_data(seed=seed, corrupt_fraction=corrupt_fraction)
    out = []
    for x, y in ((data.x_train, data.y_train), (data.x_eval, data.y_eval)):
        ds = Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()})
        ds.set_format("torch")
        out.append(ds)
    return out[0], out[1]


@dataclass
class TrainedDigits:
    model: nn.Sequential
    optimizer: torch.optim.Adam
    initial_parameters: dict[str, torch.Tensor]
    data: DigitsData
    train_accuracy: float
    eval_accuracy: float

    def eval_batches(self, batch_size: int = 256) -> list[tuple[torch.Tensor]]:
        """Evaluation inputs as a list of 1-tuples ``([b, 64],)``: the model's forward takes one tensor."""
        x = self.data.x_eval
        return [(x[i : i + batch_size],) for i in range(0, len(x), batch_size)]


def train_digits_mlp(
    *, epochs: int = 30, lr: float = 1e-3, batch_size: int = 64, seed: int = 0, corrupt_fraction: float = 0.0
) -> TrainedDigits:
    """Train the digits MLP with Adam (a few seconds on a CPU); returns the model, optimizer and data."""
    data = load_digits_data(seed=seed, corrupt_fraction=corrupt_fraction)
    model = digits_mlp(seed=seed)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        train_acc = float((model(data.x_train).argmax(1) == data.y_train).float().mean())
        eval_acc = float((model(data.x_eval).argmax(1) == data.y_eval).float().mean())
    return TrainedDigits(model, opt, initial, data, train_acc, eval_acc)


__all__ = [
    "DigitsClassifier",
    "DigitsData",
    "TrainedDigits",
    "digits_datasets",
    "digits_mlp",
    "load_digits_data",
    "train_digits_mlp",
]
