"""hfvolume.integrations.modelcard.plot: the PNG, its digest, error bars by the ± rule, the running estimate."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from card_series import make_result
from card_series import series3 as _series3
from PIL import Image

from hfvolume.integrations import modelcard as mc
from hfvolume.integrations.modelcard import plot as plot_module
from hfvolume.integrations.modelcard.series import render_digest


def test_plot_is_png_and_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "ic.png"
    assert mc.plot_series(_series3(), path) == str(path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    stamp = path.stat().st_mtime_ns
    mc.plot_series(_series3(), path)
    assert path.stat().st_mtime_ns == stamp  # same series: untouched
    mc.plot_series(_series3()[:2], path)
    assert path.read_bytes() != data


def test_png_records_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "ic.png"
    mc.plot_series(_series3(), path)
    digest = render_digest(mc.normalize_series(_series3()))
    with Image.open(path) as image:
        assert image.text[plot_module.PNG_DIGEST_KEY] == digest
    assert plot_module.png_text_value(path, plot_module.PNG_DIGEST_KEY) == digest
    (tmp_path / "not.png").write_bytes(b"not a png")
    assert plot_module.png_text_value(tmp_path / "not.png", plot_module.PNG_DIGEST_KEY) is None
    assert plot_module.png_text_value(tmp_path / "missing.png", plot_module.PNG_DIGEST_KEY) is None


class _Axes:
    """Records the calls the drawing functions make."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_error_bars_only_where_the_std_is_reported() -> None:
    light, heavy = make_result(-4800.0, spread=1.0), make_result(-4900.0, seed=3)
    points = mc.normalize_series([(1, light), (2, heavy), (3, make_result(-5000.0, spread=1.0, seed=7))])
    assert [math.isfinite(p.reported_std_bits) for p in points] == [True, False, True]
    ax = _Axes()
    plot_module._draw_series(ax, points)
    (errorbar,) = [c for c in ax.calls if c[0] == "errorbar"]
    assert list(errorbar[1][0]) == [1, 3]
    assert errorbar[2]["yerr"] == [points[0].reported_std_bits, points[2].reported_std_bits]

    ax = _Axes()
    plot_module._draw_series(ax, mc.normalize_series([(1, heavy), (2, make_result(-4900.0, seed=1))]))
    assert not [c for c in ax.calls if c[0] == "errorbar"]  # no ± anywhere: no error bars at all


def test_one_estimate_plots_its_running_estimate(tmp_path: Path) -> None:
    result = make_result(-4800.0)
    update = mc.update_model_card(result, tmp_path)
    assert update.files == ("README.md", mc.PLOT_PATH_IN_REPO)
    assert (tmp_path / mc.PLOT_PATH_IN_REPO).read_bytes().startswith(b"\x89PNG")
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "### Running estimate" in text and f"]({mc.PLOT_PATH_IN_REPO})" in text
    assert not mc.update_model_card(result, tmp_path).changed

    ax = _Axes()
    (point,) = mc.normalize_series(result)
    plot_module._draw_running(ax, point)
    (line,) = [c for c in ax.calls if c[0] == "plot"]
    assert list(line[1][0]) == list(range(1, 65))
    assert line[1][1] == pytest.approx([-v / math.log(2) for v in result.running_log_volume])
    assert line[1][1][-1] == pytest.approx(result.information_content_bits)


def test_one_estimate_without_running_estimate_has_no_plot(tmp_path: Path) -> None:
    summary_only = {**make_result(-4800.0).summary(), "confidence": 0.95}
    update = mc.update_model_card(summary_only, tmp_path)
    assert update.files == ("README.md",) and "![" not in (tmp_path / "README.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="nothing to plot"):
        mc.plot_series(summary_only, tmp_path / "x.png")


def test_card_without_matplotlib_has_no_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_matplotlib_available", lambda: False)
    with caplog.at_level("WARNING", logger="hfvolume"):
        update = mc.update_model_card(_series3(), tmp_path)
    assert update.files == ("README.md",) and "![" not in (tmp_path / "README.md").read_text(encoding="utf-8")
    assert any("matplotlib is not installed" in r.getMessage() for r in caplog.records)
