"""A tiny GPT-NeoX language model (random weights, from a config, with dropout), learnable token datasets, a Trainer
of them and a tracker stand-in, for Trainer tests: built in code, no network."""
from __future__ import annotations

import torch

VOCAB = 64


def tiny_lm_datasets(n_train: int = 32, n_eval: int = 8):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (n_train + n_eval, 1), generator=gen)
    ids = (starts + 3 * torch.arange(12)) % VOCAB  # learnable sequences
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    return Dataset.from_list(rows[:n_train]), Dataset.from_list(rows[n_train:])


def tiny_causal_lm(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.1,
                           attention_dropout=0.1)
    return GPTNeoXForCausalLM(config)


class Recorder:
    """A stand-in for a report_to tracker: keeps a copy of every log dict it is given (``.logs``). Tracker
    integrations sit before user callbacks in the Trainer's list, so give it before the callback under test."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.logs = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs or {}))

        return _Recorder()


def make_trainer(output_dir, callbacks, *, max_steps: int = 4, eval_steps: int = 2, model=None, trainer_class=None,
                 args_class=None, **extra):
    """A CPU ``Trainer`` (or ``trainer_class``) of :func:`tiny_causal_lm` on :func:`tiny_lm_datasets`, evaluating
    every ``eval_steps`` steps, logging every step, no checkpoints and no trackers unless ``extra`` (more
    ``TrainingArguments`` fields, or ``args_class``'s) says otherwise."""
    from transformers import Trainer, TrainingArguments

    train, evald = tiny_lm_datasets()
    settings = dict(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=4,
        eval_strategy="steps", eval_steps=eval_steps, logging_steps=1, save_strategy="no", report_to=[],
        learning_rate=1e-3, seed=1, data_seed=2, disable_tqdm=True, use_cpu=True,
    )
    args = (args_class or TrainingArguments)(**{**settings, **extra})
    return (trainer_class or Trainer)(model=model if model is not None else tiny_causal_lm(), args=args,
                                      train_dataset=train, eval_dataset=evald, callbacks=callbacks)
