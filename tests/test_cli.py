"""The `hfvolume estimate` command: bundled default, a local HF model directory, and errors."""
from __future__ import annotations

import json

import pytest
import torch

from hfvolume.cli import main
from hfvolume.results import VolumeResult


def test_bundled_default_runs_and_writes_json(tmp_path, capsys):
    rc = main(["estimate", "--demo_epochs", "2", "--n_directions", "4", "--output", str(tmp_path),
               "--progress", "false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "information content" in out and "bits" in out
    data = json.loads((tmp_path / "result.json").read_text())
    res = VolumeResult.from_dict(data["result"])
    assert res.n_params == 8970 and res.n_directions == 4


@pytest.fixture
def model_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    words = "the a cat dog sat ran on mat fast slow red blue".split()
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=32))
    path = tmp_path / "model"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\na dog ran fast\nthe red cat\nblue dog sat slow\n")
    return path, texts


def test_local_model_directory_and_text_file(model_dir, tmp_path):
    path, texts = model_dir
    out = tmp_path / "out"
    rc = main(["estimate", "--model", str(path), "--data", str(texts), "--n_directions", "3", "--batch_size", "2",
               "--output", str(out), "--progress", "false", "--working_memory", "0"])
    assert rc == 0
    data = json.loads((out / "result.json").read_text())
    assert data["run"]["model"]["task"] == "causal-lm" and data["run"]["model"]["n_examples"] == 4
    settings = data["result"]["settings"]
    assert settings["working_memory"] == 0 and settings["behavior"]["path"] == "loop"


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["estimate", "--model", str(tmp_path / "missing"), "--data", "x.txt"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_model_factory_must_return_data(capsys):
    assert main(["estimate", "--model", "torch.nn:Identity"]) == 1
    assert "return (model, data)" in capsys.readouterr().err
    assert main(["estimate", "--model", "torch.nn:Identity", "--data", "x.txt"]) == 1
    assert "does not apply" in capsys.readouterr().err


def test_execute_writes_and_prints_on_the_main_process_only(tmp_path, capsys):
    # The accelerate script calls execute() on every rank; the CLI is the is_main=True case of the same code.
    from hfvolume.cli import EstimateArguments, execute

    args = EstimateArguments(model="test_distributed:tiny_lm", n_directions=2, progress=False,
                             output=str(tmp_path / "other"))
    assert execute(args, is_main=False) == 0
    assert capsys.readouterr().out == "" and not (tmp_path / "other").exists()
    assert execute(EstimateArguments(model="test_distributed:tiny_lm", n_directions=2, progress=False,
                                     output=str(tmp_path / "main"))) == 0
    assert "information content" in capsys.readouterr().out
    written = json.loads((tmp_path / "main" / "result.json").read_text())["result"]
    assert VolumeResult.from_dict(written).n_directions == 2
