"""`hfvolume estimate --preconditioner adam` on a real Trainer ``checkpoint-N`` directory (optimizer.pt)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from hfvolume.integrations.cli import main, tokenized_batches
from hfvolume.measure.local_volume import estimate_local_volume
from hfvolume.models.optim_state import DEFAULT_ADAM_EPS, DEFAULT_ADAM_EXPONENT
from hfvolume.models.scales import RelativeEps
from hfvolume.volume.results import VolumeResult

WORDS = "the a cat dog sat ran on mat fast slow red blue".split()
TEXTS = ["the cat sat on the mat", "a dog ran fast", "the red cat", "blue dog sat slow", "a cat ran on a mat"]
STEPS = 3


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-NeoX + word-level tokenizer trained by a real ``transformers.Trainer`` for 3 AdamW steps."""
    return _train(tmp_path_factory.mktemp("cli_checkpoint"))


@pytest.fixture(scope="module")
def frozen_checkpoint(tmp_path_factory):
    """The same run with the input embedding frozen (not in the optimizer's groups)."""
    return _train(tmp_path_factory.mktemp("cli_frozen"), frozen="gpt_neox.embed_in")


def _train(root, frozen: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    with torch.random.fork_rng():  # Trainer seeds the global RNG; keep other tests independent of it
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=32))
        for name, p in model.named_parameters():
            p.requires_grad_(frozen is None or not name.startswith(frozen))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 2 + len(WORDS), (16, 8), generator=g)
        train = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids[i]}
                 for i in range(16)]
        args = TrainingArguments(
            output_dir=str(root / "run"), max_steps=STEPS, save_strategy="steps", save_steps=STEPS,
            per_device_train_batch_size=8, learning_rate=1e-3, weight_decay=0.1, adam_beta2=0.98, report_to=[],
            use_cpu=True, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )
        try:
            trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
            trainer.train()
        finally:
            _reset_accelerate()
    texts = root / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    path = root / "run" / f"checkpoint-{STEPS}"
    assert (path / "optimizer.pt").is_file() and (path / "config.json").is_file()
    return trainer, tokenizer, path, texts


def _in_process(trainer, tokenizer, n_directions: int, mixture: float) -> VolumeResult:
    """The same estimate through the Python API, with the *live* optimizer of the run (not the saved file)."""
    data = tokenized_batches(tokenizer, TEXTS, batch_size=2, max_length=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_local_volume(trainer.model, data, n_directions=n_directions, preconditioner="adam",
                                     optimizer=trainer.optimizer, mixture=mixture, seed=5, progress=False)


@pytest.mark.parametrize("mixture", [0.0, 0.25])
def test_cli_adam_from_checkpoint_equals_the_python_api_with_the_live_optimizer(checkpoint, tmp_path, mixture):
    trainer, tokenizer, path, texts = checkpoint
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["estimate", "--model", str(path), "--data", str(texts), "--n_directions", "4", "--batch_size",
                   "2", "--preconditioner", "adam", "--mixture", str(mixture), "--seed", "5", "--output", str(out),
                   "--progress", "false"])
    assert rc == 0
    saved = json.loads((out / "result.json").read_text())
    result = VolumeResult.from_dict(saved["result"])
    proposal = result.settings["proposal"]
    expected_eps = DEFAULT_ADAM_EPS.factor if isinstance(DEFAULT_ADAM_EPS, RelativeEps) else DEFAULT_ADAM_EPS
    assert proposal["name"] == "adam" and proposal["moment"] == "exp_avg_sq"
    assert proposal["exponent"] == DEFAULT_ADAM_EXPONENT
    assert (proposal["eps_relative"] if isinstance(DEFAULT_ADAM_EPS, RelativeEps) else proposal["eps"]) == expected_eps
    assert proposal["step"] == STEPS and proposal["n_fallback_tensors"] == 0 and proposal["mixture"] == mixture
    # The checkpoint holds the live optimizer's tensors and the saved weights are the trained ones, so the CLI's
    # numbers equal the Python API's with the live optimizer, direction by direction.
    ref = _in_process(trainer, tokenizer, 4, mixture)
    assert ref.settings["proposal"] == proposal
    assert result.log_estimates == ref.log_estimates and result.log_weights == ref.log_weights
    assert result.log_volume == ref.log_volume
    assert any(w != 0.0 for w in result.log_weights)  # an actual (non-isotropic) proposal was used


def test_cli_adam_without_optimizer_file_is_a_clear_error(checkpoint, tmp_path, capsys):
    _, tokenizer, path, texts = checkpoint
    from transformers import AutoModelForCausalLM

    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(path, local_files_only=True).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    rc = main(["estimate", "--model", str(plain), "--data", str(texts), "--n_directions", "2", "--preconditioner",
               "adam", "--output", str(tmp_path / "out"), "--progress", "false"])
    assert rc == 1
    assert "no optimizer.pt" in capsys.readouterr().err


def test_cli_adam_settings_and_frozen_parameters(frozen_checkpoint, tmp_path, capsys):
    trainer, _, path, texts = frozen_checkpoint
    common = ["estimate", "--model", str(path), "--data", str(texts), "--n_directions", "2", "--batch_size", "2",
              "--preconditioner", "adam", "--progress", "false"]
    # Reloaded, every parameter is trainable: the optimizer's groups do not fit them.
    assert main([*common, "--output", str(tmp_path / "a")]) == 1
    assert "group" in capsys.readouterr().err
    out = tmp_path / "b"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([*common, "--trainable", "^(?!gpt_neox\\.embed_in)", "--adam_exponent", "0.25",
                   "--adam_eps_relative", "0.3", "--output", str(out)])
    assert rc == 0
    result = VolumeResult.from_dict(json.loads((out / "result.json").read_text())["result"])
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert result.n_params == trained < sum(p.numel() for p in trainer.model.parameters())
    proposal = result.settings["proposal"]
    assert proposal["exponent"] == 0.25 and proposal["eps_relative"] == 0.3 and proposal["n_fallback_tensors"] == 0
    assert main([*common[:-4], "--adam_exponent", "0.25", "--output", str(tmp_path / "c"), "--progress",
                 "false"]) == 1
    assert "need --preconditioner adam" in capsys.readouterr().err
    assert main([*common, "--trainable", "nomatch", "--output", str(tmp_path / "d")]) == 1
    assert "matches no parameter" in capsys.readouterr().err
