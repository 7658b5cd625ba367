"""hfvolume.integrations.modelcard.series: every accepted input normalises to the same points, and the points carry
the honest-uncertainty figures (Pareto k̂, the reported ±, the running estimate), NaN for older series."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from card_series import make_result
from card_series import series3 as _series3

from hfvolume.integrations import modelcard as mc
from hfvolume.integrations.modelcard.series import NOT_RECORDED, render_digest


def test_inputs_normalise_to_the_same_series(tmp_path: Path) -> None:
    series = _series3()
    dicts = [{"step": s, **r.summary(), "settings": dict(r.settings)} for s, r in series]
    path = tmp_path / "series.json"
    path.write_text(json.dumps(dicts), encoding="utf-8")
    full = [{"step": s, **r.to_dict()} for s, r in series]
    reference = mc.series_hash(series)
    assert mc.series_hash(dicts) == reference
    assert mc.series_hash(str(path)) == reference
    assert mc.series_hash(full) == reference
    assert mc.series_hash(list(reversed(series))) == reference  # sorted by step
    points = mc.normalize_series(series)
    assert mc.series_hash([p.to_dict() for p in points]) == reference
    assert mc.normalize_series(series[0][1])[0].step == 0
    with pytest.raises(ValueError):
        mc.normalize_series([])
    with pytest.raises(ValueError, match="ess"):
        mc.normalize_series([{"step": 1, "log_volume": -1.0, "log_volume_lower_bound": -4.0}])


def test_points_carry_the_uncertainty_of_the_result() -> None:
    heavy, light = make_result(-4800.0, seed=3), make_result(-4800.0, spread=1.0)
    for result in (heavy, light):
        (point,) = mc.normalize_series(result)
        assert point.pareto_k == result.pareto_k and point.reliability == result.reliability
        assert point.running_log_volume == result.running_log_volume and len(point.running_log_volume) == 64
        # VolumePoint.to_dict() round-trips everything, the running estimate included.
        assert mc.normalize_series(point.to_dict())[0] == point
    assert heavy.pareto_k >= 0.5 and math.isnan(mc.normalize_series(heavy)[0].reported_std_bits)
    assert light.pareto_k < 0.5
    assert mc.normalize_series(light)[0].reported_std_bits == pytest.approx(
        light.reported_log_volume_std / math.log(2))


def test_series_from_an_older_version_reads_as_nan(tmp_path: Path) -> None:
    """series.json points written before k̂ existed: no pareto_k, reported std or reliability."""
    old_keys = ("log_volume", "information_content_bits", "log_volume_lower_bound", "log_volume_std", "ess",
                "norm_term", "n_params", "n_directions", "n_saturated", "n_unbounded", "n_failed", "forward_passes",
                "wall_time_s")
    result = make_result(-4800.0, spread=1.0)  # k̂ < 0.5 today, but an older file cannot know that
    point = {"step": 7, **{k: result.summary()[k] for k in old_keys}, "confidence": 0.95,
             "settings": dict(result.settings)}
    path = tmp_path / "series.json"
    path.write_text(json.dumps({"series": [point], "failures": []}), encoding="utf-8")
    (read,) = mc.normalize_series(path)
    assert math.isnan(read.pareto_k) and math.isnan(read.reported_std_bits) and read.reliability == NOT_RECORDED
    assert read.running_log_volume == ()
    section = mc.render_card_section(path)
    assert "not recorded" in section and "No ± is shown" in section


def test_render_digest_covers_what_is_drawn() -> None:
    """The series hash identifies the measurement; the digest the card and plot record also covers the running
    estimate (a summary dict lacks it), so a card drawn from less information is redrawn."""
    result = make_result(-4800.0)
    from_result = mc.normalize_series(result)
    from_summary = mc.normalize_series({**result.summary(), "confidence": result.confidence,
                                        "settings": dict(result.settings)})
    assert mc.series_hash(from_result) == mc.series_hash(from_summary)
    assert render_digest(from_result) != render_digest(from_summary)
