"""The `hfvolume estimate` command: bundled default, a local HF model directory, and errors."""
from __future__ import annotations

import json

import pytest
import torch

from hfvolume.integrations.cli import main
from hfvolume.volume.results import VolumeResult


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
    from hfvolume.integrations.cli import EstimateArguments, execute

    args = EstimateArguments(model="problems:tiny_lm", n_directions=2, progress=False,
                             output=str(tmp_path / "other"))
    assert execute(args, is_main=False) == 0
    assert capsys.readouterr().out == "" and not (tmp_path / "other").exists()
    assert execute(EstimateArguments(model="problems:tiny_lm", n_directions=2, progress=False,
                                     output=str(tmp_path / "main"))) == 0
    assert "information content" in capsys.readouterr().out
    written = json.loads((tmp_path / "main" / "result.json").read_text())["result"]
    assert VolumeResult.from_dict(written).n_directions == 2


# ------------------------------------------------------------------------------------------ input shapes and errors
@pytest.mark.parametrize("content,expected", [
    (["one text", "two texts"], ["one text", "two texts"]),
    ([{"text": "a"}, {"text": "b"}], ["a", "b"]),
    ({"text": ["a", "b", " "]}, ["a", "b"]),
])
def test_json_shapes_that_are_understood(tmp_path, content, expected):
    from hfvolume.integrations.texts import read_texts

    path = tmp_path / "data.json"
    path.write_text(json.dumps(content))
    assert read_texts(str(path), limit=10) == expected


@pytest.mark.parametrize("content,message", [
    ({"rows": [{"text": "the cat"}]}, "list of strings under 'text'"),  # was measured on the key name "rows"
    ({"text": "the cat sat"}, "list of strings under 'text'"),  # was 11 one-character texts
    ([{"body": "x"}], "item 0 has no field 'text'"),
    ([["nested"]], "item 0 is a list"),
    (42, "the JSON value is a int"),
])
def test_json_shapes_that_are_refused_name_the_accepted_ones(tmp_path, content, message):
    from hfvolume.integrations.texts import read_texts

    path = tmp_path / "data.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="accepted: .txt") as info:
        read_texts(str(path), limit=10)
    assert message in str(info.value)


def test_jsonl_rows_without_the_field_and_invalid_lines(tmp_path):
    from hfvolume.integrations.texts import read_texts

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n\n{"other": "x"}\n')
    with pytest.raises(ValueError, match="line 3 has no field 'text'"):
        read_texts(str(path), limit=10)
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_texts(str(path), limit=10)
    path.write_text('"a plain string"\n{"text": "an object"}\n')
    assert read_texts(str(path), limit=10) == ["a plain string", "an object"]


def test_user_errors_are_one_line_with_exit_1(model_dir, tmp_path, capsys):
    path, _ = model_dir
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert main(["estimate", "--model", str(path), "--data", str(bad), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [line for line in errors if line.startswith("hfvolume estimate: error: ")] and len(errors) == 1
    assert "line 1 has no field 'text'" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    texts = tmp_path / "t.txt"
    texts.write_text("the cat\n")
    assert main(["estimate", "--model", str(broken), "--data", str(texts), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot read the model configuration" in errors[0] and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--max_length", "0"], ["--n_directions", "-3"], ["--bogus", "1"],
                                  ["--cutoff", "0"], ["--mixture", "1.5"]])
def test_usage_errors_exit_2_like_argparse(argv, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert "hfvolume estimate: error:" in err and "Traceback" not in err


def test_unwritable_output_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    from hfvolume.integrations import cli

    def must_not_run(args):
        raise AssertionError("the estimate ran although its result could not be written")

    monkeypatch.setattr(cli, "run_estimate", must_not_run)
    occupied = tmp_path / "a-file"
    occupied.write_text("x")
    assert main(["estimate", "--output", str(occupied)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    (tmp_path / "out" / "result.json").mkdir(parents=True)
    assert main(["estimate", "--output", str(tmp_path / "out")]) == 1
    assert "result.json there is a directory" in capsys.readouterr().err


def test_version_and_module_entry_point(capsys):
    import subprocess
    import sys

    import hfvolume

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hfvolume {hfvolume.__version__}"
    done = subprocess.run([sys.executable, "-m", "hfvolume", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"hfvolume {hfvolume.__version__}"
    assert main(["frobnicate"]) == 2


def test_summary_withholds_the_bootstrap_spread_when_the_tail_is_heavy(capsys):
    from hfvolume.integrations.cli import format_summary

    rng = __import__("numpy").random.default_rng(0)
    est = tuple(float(x) for x in rng.normal(-5000.0, 800.0, 64))  # one direction decides, as on real nets
    n = len(est)
    result = VolumeResult(
        log_volume=max(est), information_content_bits=0.0, log_volume_lower_bound=max(est) - 3.0, confidence=0.95,
        ess=1.0, log_volume_std=123.0, norm_term=0.0, n_params=10, n_directions=n, forward_passes=n,
        wall_time_s=0.1, log_estimates=est, radii=(1.0,) * n, deltas=(0.0,) * n, log_weights=(0.0,) * n,
        flags=("converged",) * n, evaluations=(1,) * n, nonfinite=(0,) * n)
    text = format_summary(result)
    assert result.pareto_k > 0.7 and "unreliable" in text
    assert "± 123" not in text and "no ± reported" in text and "no finite variance" in text


def test_cumulants_subcommand_is_dispatched(tmp_path, capsys):
    assert main(["cumulants", "--model", str(tmp_path / "missing")]) == 1
    assert "hfvolume cumulants: error:" in capsys.readouterr().err
    assert main(["cumulants", "--bogus"]) == 2
    assert main(["--help"]) == 0 and "cumulants" in capsys.readouterr().out
