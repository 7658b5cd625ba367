"""``hfvolume prequential`` (run_cli): a local tiny model directory and a JSON-lines data file, no network."""
from __future__ import annotations

import json

import pytest
import torch

from hfvolume.mdl import PrequentialResult
from hfvolume.mdl.cli import parse_boundaries, run_cli


def _write_classifier(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model_dir = tmp_path / "model"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(60):
        label = i % 3
        ids = (torch.randint(0, 10, (6,), generator=g) + 10 * label).tolist()  # the label is in the tokens
        rows.append({"input_ids": ids, "attention_mask": [1] * 6, "label": label})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return model_dir, data


@pytest.mark.slow
def test_cli_writes_the_result_and_the_card_section(tmp_path, capsys):
    model_dir, data = _write_classifier(tmp_path)
    out = tmp_path / "out"
    status = run_cli(["--model", str(model_dir), "--data", str(data), "--output", str(out), "--boundaries",
                      "10,20,40", "--epochs", "2", "--batch_size", "8", "--learning_rate", "1e-3", "--cpu"])
    assert status == 0, capsys.readouterr().err
    result = PrequentialResult.from_json((out / "prequential.json").read_text())
    assert result.boundaries == (10, 20, 40, 60) and result.num_classes == 3
    assert result.block_items == (10.0, 10.0, 20.0, 20.0)
    assert result.selection_bits > 0  # early stopping compared 2 checkpoints per block
    assert "Block-wise prequential code" in (out / "hfvolume" / "prequential.md").read_text()
    assert "bits/item" in capsys.readouterr().out


def test_cli_errors_exit_with_status_1(tmp_path, capsys):
    model_dir, _ = _write_classifier(tmp_path)
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    assert run_cli(["--model", str(model_dir), "--data", str(bad)]) == 1
    assert "--data must end with one of" in capsys.readouterr().err
    assert parse_boundaries("voita") == "voita"
    assert parse_boundaries("10, 20") == [10, 20] and parse_boundaries("0.5,1.0") == [0.5, 1.0]
    with pytest.raises(ValueError, match="'1/2'"):
        parse_boundaries("1/2")
