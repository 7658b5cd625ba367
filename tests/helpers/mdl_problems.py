"""Learners and data with known code lengths, for the online-code and block-wise tests (and their 2-process
worker). Everything is built from seeds and configs: no network."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn


class CountingLearner(nn.Module):
    """The additive-rule counting learner as a Trainer model: ``p(c) = (n_c + α) / (n + Cα)``, float64 logits.

    ``forward(x, labels)`` returns the logits of the counts seen so far for every row, **then** (train mode only)
    adds the batch's labels to the counts: a batch is coded by the counts before it, like an optimizer step. The
    dummy parameter gives the optimizer something to hold (its gradient is 0).
    """

    def __init__(self, num_classes: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        c = self.counts.numel()
        log_p = torch.log((self.counts + self.alpha) / (self.counts.sum() + c * self.alpha))
        logits = log_p.expand(x.shape[0], c) + 0.0 * self.dummy
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
            if self.training:
                self.counts += torch.bincount(labels, minlength=c).to(torch.float64)
        return {"loss": loss, "logits": logits}


class Items(torch.utils.data.Dataset):
    """``{"x": [d] float64, "labels": int}`` items (for the counting learner x is a dummy ``[1]`` zero)."""

    def __init__(self, labels: np.ndarray, x: np.ndarray | None = None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.x = torch.zeros(len(self.labels), 1, dtype=torch.float64) if x is None else torch.as_tensor(x)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": int(self.labels[i])}


class Logistic(nn.Module):
    """Multinomial logistic regression in float64 (exact sums: round-off far below the tests' tolerances)."""

    def __init__(self, d: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(problem_type=None)  # the Trainer's label smoother reads model.config
        gen = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(d, num_classes, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(num_classes, d, generator=gen, dtype=torch.float64) * 0.01)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.linear(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def teacher_data(n: int, d: int = 20, num_classes: int = 4, *, seed: int = 0, random_labels: bool = False) -> Items:
    """x ~ N(0, I_d); labels from a fixed random linear teacher (argmax of W x), or uniform at random."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = np.random.default_rng(1234).normal(size=(d, num_classes))
    y = rng.integers(0, num_classes, n) if random_labels else np.argmax(x @ w, axis=1)
    return Items(y, torch.tensor(x, dtype=torch.float64))


def tiny_neox(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout=dropout,
                           attention_dropout=dropout)
    return GPTNeoXForCausalLM(config)


def lm_rows(n: int, length: int = 12, *, seed: int = 0) -> list[dict[str, list[int]]]:
    """Learnable token rows; every third row right-padded (attention 0, label −100) and every fourth with a
    3-token prompt whose labels are −100 (so the causal shift changes which positions are scored)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 64, (n, 1), generator=gen)
    ids = ((starts + 3 * torch.arange(length)) % 64).tolist()
    rows = []
    for i, row in enumerate(ids):
        mask, labels = [1] * length, list(row)
        if i % 3 == 1:
            cut = length - 1 - i % 5
            mask[cut:] = [0] * (length - cut)
            labels[cut:] = [-100] * (length - cut)
        if i % 4 == 2:
            labels[:3] = [-100] * 3
        rows.append({"input_ids": row, "attention_mask": mask, "labels": labels})
    return rows


def lm_dataset(n: int, *, seed: int = 0) -> Any:
    from datasets import Dataset

    return Dataset.from_list(lm_rows(n, seed=seed))


def reference_lm_code(model: nn.Module, rows: list[dict[str, list[int]]]) -> tuple[float, float, float]:
    """(bits from shifted cross-entropy, scored items, bits from the model's own loss × items), eval mode."""
    bits = items = loss_bits = 0.0
    model.eval()
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            mask = torch.tensor([r["attention_mask"]])
            labels = torch.tensor([r["labels"]])
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            target = labels[:, 1:].clone()
            target[mask[:, :-1] == 0] = -100  # the KL behaviour's rule: position t needs attention_mask[t]
            ce = nn.functional.cross_entropy(out.logits[0, :-1].double(), target[0], ignore_index=-100, reduction="sum")
            n = float((target != -100).sum())
            bits += float(ce) / math.log(2)
            items += n
            loss_bits += float(out.loss.double()) * n / math.log(2)
    return bits, items, loss_bits
