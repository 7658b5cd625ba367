"""The card pieces: table rows, caveats, model-index entries and the two-panel plot, from plain data."""
from __future__ import annotations

import importlib.util
import math

import pytest

from hfvolume.mdl.card import (
    CAVEATS,
    HEADING,
    METRIC_COMPRESSION,
    METRIC_INFORMATION_TRANSFER,
    METRIC_ONLINE_CODE,
    METRIC_PREQUENTIAL_CODE,
    code_table_rows,
    model_index_entries,
    plot_information,
    render_code_section,
)
from hfvolume.mdl.results import PrequentialResult

SUMMARY = {"online_code_bits": 4333.0, "online_code_items": 1347.0, "online_code_bits_per_item": 4333.0 / 1347,
           "online_uniform_bits": 1347 * math.log2(10), "online_compression": 1347 * math.log2(10) / 4333.0,
           "information_transfer_bits": 1347 * math.log2(10) - 4333.0, "online_code_complete": 1.0,
           "reference": "uniform", "num_classes": 10, "failed": False}
BLOCKS = PrequentialResult(
    boundaries=(20, 1347), block_items=(20.0, 1327.0), first_block_bits=20 * math.log2(10), block_bits=(800.0,),
    total_bits=20 * math.log2(10) + 800.0, uniform_bits=1347 * math.log2(10), reference="uniform",
    reference_bits=1347 * math.log2(10), information_transfer_bits=1347 * math.log2(10) - 20 * math.log2(10) - 800,
    compression=1347 * math.log2(10) / (20 * math.log2(10) + 800.0), selection_bits=5.3, seconds_per_block=(1.0,),
    num_classes=10,
)


def test_section_has_the_table_and_every_caveat():
    text = render_code_section(SUMMARY, prequential=BLOCKS.to_dict(), plot_path="hfvolume/information.png")
    assert text.startswith(HEADING)
    assert "| Online code (bits) | 4,333 |" in text
    assert "| First pass complete | yes |" in text
    assert "Block-wise prequential code (bits; boundaries 20, 1347)" in text
    assert "![Information content and information transfer over training](hfvolume/information.png)" in text
    assert all(c in text for c in CAVEATS)
    assert "not the total information" in text
    rows = dict(code_table_rows(SUMMARY))
    assert rows["L_IT, online (reference: uniform, bits)"] == "141.6"


def test_model_index_entries_prefer_the_block_wise_code():
    online = model_index_entries(SUMMARY)
    assert [e["metric_type"] for e in online] == [METRIC_ONLINE_CODE, METRIC_INFORMATION_TRANSFER, METRIC_COMPRESSION]
    assert online[0]["metric_value"] == 4333.0 and online[0]["metric_args"]["complete"] is True
    blocks = model_index_entries(SUMMARY, BLOCKS)
    assert blocks[0]["metric_type"] == METRIC_PREQUENTIAL_CODE
    assert blocks[1]["metric_value"] == round(BLOCKS.information_transfer_bits, 6)
    partial = model_index_entries({**SUMMARY, "information_transfer_bits": None, "online_compression": math.nan})
    assert [e["metric_type"] for e in partial] == [METRIC_ONLINE_CODE]  # undefined values are left out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_two_panel_plot(tmp_path):
    volume = [{"step": s, "information_content_bits": 40_000.0 + s} for s in (10, 20, 30)]
    code = [{"step": s, "information_transfer_bits": float(s)} for s in (5, 10, 15, 20, 25, 30)]
    assert plot_information(volume, code, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_information([], [], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
