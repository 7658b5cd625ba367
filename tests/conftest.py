"""Shared tiny models (random weights, built from configs: no network) and batches for the model-layer tests."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import settings
from torch import nn

VOCAB = 64

# Property tests explore the same examples on every run: a failure is reproducible, and CI cannot turn red on an
# example no earlier run met. `pytest --hypothesis-profile=explore` searches afresh.
settings.register_profile("fixed", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile("fixed")


def _quiet() -> None:
    # transformers logs config warnings for tiny configs; they are irrelevant to the tests.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="There is a performance drop")


@pytest.fixture
def make_neox() -> Callable[..., nn.Module]:
    """Factory: a 2-layer GPT-NeoX causal LM (D ≈ 21k) in eval mode; ``tie=True`` ties lm_head to the embedding."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    _quiet()

    def make(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(seed)
        config = GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, tie_word_embeddings=tie,
        )
        return GPTNeoXForCausalLM(config).to(dtype).eval()

    return make


@pytest.fixture
def make_bert() -> Callable[..., nn.Module]:
    """Factory: a 2-layer BERT; ``head="cls"``: BertForSequenceClassification (3 labels), ``"none"``: BertModel."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    _quiet()

    def make(seed: int = 0, head: str = "cls") -> nn.Module:
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3,
        )
        cls = BertForSequenceClassification if head == "cls" else BertModel
        return cls(config).eval()

    return make


@pytest.fixture
def make_mlp() -> Callable[..., nn.Module]:
    """Factory: a 20-64-64-10 MLP (plain torch, returns a logits tensor) in eval mode."""

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
        ).eval()

    return make


@pytest.fixture
def lm_batch() -> dict[str, torch.Tensor]:
    """[3, 10] tokens; row 1 is right-padded from t = 7 (attention_mask 0, labels -100); row 2 has a 4-token
    prompt with labels -100 (so the causal shift rule changes which positions are scored)."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[2, :4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def cls_batch() -> dict[str, torch.Tensor]:
    """[4, 8] tokens for a classifier; row 3 padded from t = 5; integer class labels [4]."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (4, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}


def model_at(model: nn.Module, view, theta: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with the view's parameters set to the flat ``theta`` (reference computations)."""
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in view.unflatten(theta).items():
            params[name].copy_(value.to(params[name].dtype))
    return clone


@pytest.fixture
def at() -> Callable[..., nn.Module]:
    """The :func:`model_at` helper as a fixture."""
    return model_at


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A loopback Hub (tests/helpers/hub_server.py); the client is isolated from the user's token, cache and the
    network."""
    from hub_server import HubServer
    from huggingface_hub import constants

    from hfvolume.integrations.modelcard import hub as modelcard

    # The first request would otherwise fetch the agent-harness list from huggingface.co (user-agent telemetry).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(modelcard, "RETRY_BACKOFF_S", 0.01)
    with HubServer() as server:
        yield server
        assert server.unhandled == [], f"the client called endpoints the test hub lacks: {server.unhandled}"
