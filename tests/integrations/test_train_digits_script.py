"""scripts/train_digits.py (the README's main job) on a short run: outputs, printed lines, the no-callback mode."""
from __future__ import annotations

import json

import pytest
from script_loader import loaded_script


@pytest.fixture(scope="module")
def script():
    with loaded_script("train_digits") as module:
        yield module


def test_short_run_writes_series_plot_and_card(script, tmp_path, capsys):
    out = tmp_path / "run"
    summary = script.main(["--output_dir", str(out), "--epochs", "2", "--evaluations", "2", "--n_directions", "4"])
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "information content" in line and "bits" in line]
    assert len(lines) == 2
    series = json.loads((out / "hfvolume" / "series.json").read_text())["series"]
    assert [p["step"] for p in series] == [p["step"] for p in summary["series"]] and len(series) == 2
    assert all(p["n_directions"] == 4 and p["information_content_bits"] > 0 for p in series)
    assert (out / "hfvolume" / "information_content.png").read_bytes().startswith(b"\x89PNG")
    card = (out / "README.md").read_text()
    assert "<!-- hfvolume:start -->" in card
    assert (out / "model.safetensors").is_file()
    # Both measures: L_IT in the printed lines, the two-panel plot, and the online code inside hfvolume's section.
    assert all("L_IT" in line for line in lines)
    assert (out / "hfvolume" / "information.png").read_bytes().startswith(b"\x89PNG")
    section = card.split("<!-- hfvolume:start -->", 1)[1].split("<!-- hfvolume:end -->", 1)[0]
    assert "L_IT" in section and "](hfvolume/information.png)" in section
    assert "± nan" not in printed and "± nan" not in card
    from huggingface_hub import metadata_load

    types = [m["type"] for r in metadata_load(out / "README.md")["model-index"][0]["results"] for m in r["metrics"]]
    assert {"information_content", "log_volume", "online_code_length", "information_transfer",
            "compression_ratio"} <= set(types)


def test_without_callback_and_bad_arguments(script, tmp_path):
    out = tmp_path / "plain"
    summary = script.main(["--output_dir", str(out), "--epochs", "1", "--evaluations", "1", "--no_volume"])
    assert "series" not in summary and not (out / "hfvolume").exists()
    with pytest.raises(ValueError, match="epochs"):
        script.main(["--output_dir", str(out), "--epochs", "0"])
