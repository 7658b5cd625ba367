"""Model-card pieces for the code length: the sub-section's table and caveats (markdown), ``model-index`` entries
and the two-panel plot (information content and L_IT over training steps), all as plain data.

The card module owns the README (markers, upserts, YAML); it places :func:`render_code_section` inside hfvolume's
section and turns :func:`model_index_entries` into ``EvalResult`` objects. Inputs are the plain dicts the callback
writes (:meth:`hfvolume.mdl.OnlineCodeCallback.summary`, ``hfvolume/code_length.json``) and, optionally, a
:class:`hfvolume.mdl.PrequentialResult` (or its ``to_dict()``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from hfvolume.mdl.results import PrequentialResult

HEADING = "### Description length of the training labels"
METRIC_ONLINE_CODE = "online_code_length"
METRIC_PREQUENTIAL_CODE = "prequential_code_length"
METRIC_INFORMATION_TRANSFER = "information_transfer"
METRIC_COMPRESSION = "compression_ratio"

#: What the numbers are and are not; printed in the card under the table.
CAVEATS = (
    "The online code is read from the first training pass: each item is coded by the weights before the optimizer "
    "step that trains on it. It depends on the data order, the batch grouping, the learning-rate schedule and the "
    "seed.",
    "A code length is an upper bound on the description length of the labels given the inputs; it does not count "
    "the description of the learner itself (architecture, optimizer, schedule).",
    "Totals grow with the number of items N: compare datasets of different sizes per item (bits/item), not in total.",
    "L_IT (information transfer) = reference code − prequential code: information that generalises to the next, "
    "not yet seen items. It is ≈ 0 for labels that are independent of the inputs. It is not the total information "
    "the weights hold about the data: the information content (−log2 of the local volume) counts memorised bits "
    "too, so the two move apart when labels are noisy. Do not subtract one from the other.",
    "A one-pass online code is a much looser bound than the block-wise prequential code (which retrains a model on "
    "each prefix); the table says which one each number is.",
)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    value = float(x)
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e15:
        decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value))))) if value else 0
        return f"{value:,.{decimals}f}"
    return f"{value:.{digits - 1}e}"


def _as_result(prequential: PrequentialResult | Mapping[str, Any] | None) -> PrequentialResult | None:
    if prequential is None or isinstance(prequential, PrequentialResult):
        return prequential
    return PrequentialResult.from_dict(prequential)


def code_table_rows(
    summary: Mapping[str, Any], prequential: PrequentialResult | Mapping[str, Any] | None = None
) -> list[tuple[str, str]]:
    """(quantity, value) rows of the table: items, first pass complete, online code (bits, bits/item), uniform
    code, compression, reference and L_IT (when ``summary`` has an online code); the block-wise code's rows when
    ``prequential`` is given."""
    items = summary.get("online_code_items")
    rows: list[tuple[str, str]] = [] if summary.get("online_code_bits") is None else [
        ("Items coded (first pass)", _fmt(items, 6) if items is not None else "–"),
        ("First pass complete", _fmt(bool(summary.get("online_code_complete", 0.0)))),
        ("Online code (bits)", _fmt(summary.get("online_code_bits"))),
        ("Online code (bits/item)", _fmt(summary.get("online_code_bits_per_item"))),
        ("Uniform code (bits)", _fmt(summary.get("online_uniform_bits"))),
        ("Compression (uniform / online)", _fmt(summary.get("online_compression"))),
        (f"L_IT, online (reference: {summary.get('reference', 'uniform')}, bits)",
         _fmt(summary.get("information_transfer_bits"))),
    ]
    result = _as_result(prequential)
    if result is not None:
        schedule = ", ".join(str(t) for t in result.boundaries)
        rows += [
            (f"Block-wise prequential code (bits; boundaries {schedule})", _fmt(result.total_bits)),
            ("Block-wise code (bits/item)", _fmt(result.bits_per_item)),
            ("Compression (uniform / block-wise)", _fmt(result.compression)),
            (f"L_IT, block-wise (reference: {result.reference}, bits)", _fmt(result.information_transfer_bits)),
            ("Model-selection cost, not included (bits)", _fmt(result.selection_bits)),
        ]
    return rows


def caveats_text() -> str:
    """The caveats as a markdown bullet list."""
    return "\n".join(f"- {c}" for c in CAVEATS)


def render_code_section(
    summary: Mapping[str, Any],
    *,
    prequential: PrequentialResult | Mapping[str, Any] | None = None,
    plot_path: str | None = None,
) -> str:
    """The sub-section's markdown: heading, table, optional plot (``plot_path`` relative to the card), caveats."""
    rows = code_table_rows(summary, prequential)
    table = "\n".join(["| Quantity | Value |", "|---|---:|"] + [f"| {q} | {v} |" for q, v in rows])
    parts = [HEADING, "", table, ""]
    if summary.get("failed"):
        parts += ["The online code failed during training (see the run's log); the values above are partial.", ""]
    if plot_path:
        parts += [f"![Information content and information transfer over training]({plot_path})", ""]
    parts += [caveats_text(), ""]
    return "\n".join(parts)


def model_index_entries(
    summary: Mapping[str, Any], prequential: PrequentialResult | Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """``model-index`` metrics as ``EvalResult`` keyword dicts (``metric_type``, ``metric_name``,
    ``metric_value``, ``metric_args``): the code length, L_IT and the compression; from the block-wise code when
    given (it is the tighter bound), else from the online code. Undefined values are left out."""
    result = _as_result(prequential)
    if result is not None:
        source = {"code": result.total_bits, "lit": result.information_transfer_bits,
                  "compression": result.compression, "reference": result.reference, "items": result.n_items,
                  "metric": METRIC_PREQUENTIAL_CODE, "name": "Block-wise prequential code length (bits)",
                  "extra": {"boundaries": list(result.boundaries), "selection_bits": result.selection_bits}}
    else:
        source = {"code": summary.get("online_code_bits"), "lit": summary.get("information_transfer_bits"),
                  "compression": summary.get("online_compression"), "reference": summary.get("reference"),
                  "items": summary.get("online_code_items"), "metric": METRIC_ONLINE_CODE,
                  "name": "Online code length, first pass (bits)",
                  "extra": {"complete": bool(summary.get("online_code_complete", 0.0))}}
    common = {"library": "hfvolume", "items": source["items"], "reference": source["reference"]}
    entries = [
        (source["metric"], source["name"], source["code"], {"unit": "bits", **source["extra"]}),
        (METRIC_INFORMATION_TRANSFER, "Information transfer L_IT (bits)", source["lit"], {"unit": "bits"}),
        (METRIC_COMPRESSION, "Compression (uniform / code)", source["compression"], {}),
    ]
    return [{"metric_type": t, "metric_name": n, "metric_value": round(float(v), 6),
             "metric_args": {**common, **extra}}
            for t, n, v, extra in entries if v is not None and math.isfinite(float(v))]


def plot_information(
    volume_points: Sequence[Mapping[str, Any]],
    code_points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> bool:
    """Two stacked panels on one step axis: information content (−log2 volume, bits; points with ``step`` and
    ``information_content_bits``) and L_IT (bits; points with ``step`` and ``information_transfer_bits``).
    Returns False, writing nothing, without matplotlib or without points."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    vol = [(p["step"], p["information_content_bits"]) for p in volume_points
           if p.get("information_content_bits") is not None]
    lit = [(p["step"], p["information_transfer_bits"]) for p in code_points
           if p.get("information_transfer_bits") is not None]
    if not vol and not lit:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(6.4, 5.2))
    try:
        for ax, pts, label in ((top, vol, "information content\n−log2 volume (bits)"),
                               (bottom, lit, "information transfer\nL_IT (bits)")):
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", markersize=3)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        bottom.axhline(0.0, color="grey", linewidth=0.8)
        bottom.set_xlabel("training step")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return True


__all__ = [
    "CAVEATS",
    "HEADING",
    "METRIC_COMPRESSION",
    "METRIC_INFORMATION_TRANSFER",
    "METRIC_ONLINE_CODE",
    "METRIC_PREQUENTIAL_CODE",
    "caveats_text",
    "code_table_rows",
    "model_index_entries",
    "plot_information",
    "render_code_section",
]
