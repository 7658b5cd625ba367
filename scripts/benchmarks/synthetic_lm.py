"""The benchmarks' small language model: a GPT-NeoX trained briefly with AdamW on arithmetic progressions of tokens
modulo the vocabulary (learnable structure, generated in code: no network)."""
from __future__ import annotations

from typing import Any

import torch


def trained_progression_lm(*, vocab: int, hidden: int, layers: int, intermediate: int, n_sequences: int,
                           max_step: int, lr: float, iterations: int, train_sequences: int | None = None,
                           ) -> tuple[Any, list[dict[str, torch.Tensor]], Any]:
    """(model in eval mode, one eval batch of the last 16 sequences, its AdamW optimizer).

    ``n_sequences`` sequences of 32 tokens start at a random token and advance by a random step in [1, max_step);
    training cycles through the first ``train_sequences`` (default: all but the last 16) in batches of 16. Seeded,
    so every run trains the same model.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=intermediate, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, vocab, (n_sequences, 1), generator=gen)
    steps = torch.randint(1, max_step, (n_sequences, 1), generator=gen)
    seqs = (starts + steps * torch.arange(32)) % vocab
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n_train = n_sequences - 16 if train_sequences is None else train_sequences
    model.train()
    for i in range(iterations):
        batch = seqs[(i * 16) % n_train: (i * 16) % n_train + 16]
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    model.eval()
    evals = seqs[n_sequences - 16:n_sequences]
    return model, [{"input_ids": evals, "attention_mask": torch.ones_like(evals)}], opt
