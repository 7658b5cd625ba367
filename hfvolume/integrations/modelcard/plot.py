"""The card's PNG: information content over training, or for one estimate the running estimate over directions.

Drawn with matplotlib's object-oriented API on the Agg canvas, so the caller's pyplot backend is never touched.
Error bars follow the card's rule: a ± (the spread between seeds) only where the Pareto k̂ of the importance
weights is below 1/2 (a finite variance, Vehtari et al., JMLR 2024, §3.2); the band up to the Markov bound is
always drawn, since that bound holds whatever the weights' tail. The PNG stores the digest of what it was drawn
from in a text chunk: an unchanged series is not redrawn (no new bytes, no new Hub commit).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from hfvolume.integrations.modelcard.render import fmt_pct
from hfvolume.integrations.modelcard.series import LN2, SeriesLike, VolumePoint, normalize_series, render_digest

#: PNG text-chunk keyword holding the digest of the drawn series.
PNG_DIGEST_KEY = "hfvolume-series-sha256"


def can_plot(points: Sequence[VolumePoint]) -> bool:
    """Whether there is something worth drawing: a series of two or more points, or one estimate with a running
    estimate over at least two directions."""
    return len(points) >= 2 or len(points[-1].running_log_volume) >= 2


def png_text_value(path: Path, key: str) -> str | None:
    """Value of a PNG text chunk (``tEXt``/``zTXt``/``iTXt``), or None if absent, unreadable or not a PNG."""
    try:
        from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib
    except ImportError:  # pragma: no cover - then the plot cannot be drawn either
        return None
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", None)  # PngImageFile reads the text chunks, other formats have none
            value = text.get(key) if isinstance(text, dict) else None
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return str(value) if value is not None else None


def plot_series(series: SeriesLike, path: str | os.PathLike[str]) -> str:
    """Draw the information content (bits) of ``series`` as a PNG at ``path``; return the path.

    Two or more points: the estimate against the global step, the band up to the Markov bound (the information
    content is below it with the stated confidence), ± error bars only where k̂ < 1/2, flagged points (ESS < 2,
    unbounded or failed directions) hollow. One point: the running estimate over the first n directions
    (``running_log_volume`` in bits) with its Markov bound, which shows whether the estimate has levelled off.
    If ``path`` already holds the plot of the same series, the file is left untouched.
    """
    write_plot(normalize_series(series), Path(path))
    return str(path)


def write_plot(points: list[VolumePoint], path: Path) -> bool:
    """Write the plot unless ``path`` already shows this series; True when the file was (re)written."""
    if not can_plot(points):
        raise ValueError(
            "nothing to plot: one estimate without its per-direction estimates (running_log_volume); pass the "
            "VolumeResult, or a series of two or more points"
        )
    digest = render_digest(points)
    if png_text_value(path, PNG_DIGEST_KEY) == digest:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting the hfvolume series needs matplotlib: pip install matplotlib "
            "(or pip install 'hfvolume[examples]')"
        ) from err

    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(points) >= 2:
        _draw_series(ax, points)
    else:
        _draw_running(ax, points[0])
    ax.set_ylabel("information content (bits)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a sibling temp file and rename, so a reader never sees half a PNG.
    tmp = path.with_name(path.name + ".tmp")
    # "Software": None drops matplotlib's version string, so the bytes do not change with an upgrade.
    fig.savefig(tmp, format="png", metadata={"Software": None, PNG_DIGEST_KEY: digest})
    os.replace(tmp, path)
    return True


def _draw_series(ax: Any, points: Sequence[VolumePoint]) -> None:
    steps = [p.step for p in points]
    bits = [p.bits for p in points]
    conf = fmt_pct(points[-1].summary["confidence"])
    ax.fill_between(steps, bits, [p.upper_bound_bits for p in points], alpha=0.25, color="tab:blue", linewidth=0,
                    label=f"up to Markov bound ({conf})")
    ax.plot(steps, bits, color="tab:blue", marker="o", markersize=4, label="estimate")
    with_std = [p for p in points if math.isfinite(p.reported_std_bits)]
    if with_std:
        ax.errorbar([p.step for p in with_std], [p.bits for p in with_std],
                    yerr=[p.reported_std_bits for p in with_std], color="tab:blue", linestyle="none", capsize=3,
                    label="± std between seeds (where k̂ < 0.5)")
    flagged = [p for p in points if p.flags()]
    if flagged:
        ax.scatter([p.step for p in flagged], [p.bits for p in flagged], s=60, facecolors="white",
                   edgecolors="tab:red", zorder=3, label="flagged (see card)")
    ax.set_xlabel("global step")
    ax.set_title("Information content over training")


def _draw_running(ax: Any, point: VolumePoint) -> None:
    n = list(range(1, len(point.running_log_volume) + 1))
    bits = [-v / LN2 for v in point.running_log_volume]
    # The Markov bound holds for the estimate from any number n of directions, with the same gap log(1/δ).
    gap = (float(point.summary["log_volume"]) - float(point.summary["log_volume_lower_bound"])) / LN2
    conf = fmt_pct(point.summary["confidence"])
    ax.fill_between(n, bits, [b + gap for b in bits], alpha=0.25, color="tab:blue", linewidth=0,
                    label=f"up to Markov bound ({conf})")
    ax.plot(n, bits, color="tab:blue", label="estimate from the first n directions")
    ax.set_xlabel("directions n")
    ax.set_title("Running estimate of the information content")


__all__ = ["PNG_DIGEST_KEY", "can_plot", "plot_series", "png_text_value", "write_plot"]
