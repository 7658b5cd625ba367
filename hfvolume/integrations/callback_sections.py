"""The other measures of a run that the volume callback carries into the model card: the initialisation-health
report (cumulant propagation at train begin) and the online code length of an :class:`hfvolume.OnlineCodeCallback`
in the same Trainer, with the two-panel plot of information content and information transfer over training."""
from __future__ import annotations

import logging
import os
from typing import Any

from hfvolume.models.state import preserved_state

logger = logging.getLogger("hfvolume")

INFORMATION_PLOT_FILE = "hfvolume/information.png"  # two panels: information content and L_IT over training


def report_init_health(model: Any, *, trainer: Any, state: Any, strict: bool) -> Any:
    """Cumulant propagation through the model's MLP parts, logged through the Trainer (keys ``init_*``) on the main
    process; returns the report, or None for a model without MLP parts or on an error (reported; training goes on,
    ``strict`` re-raises). Deterministic and sampling-free, so it moves no random state."""
    from hfvolume.cumulants import UnsupportedModelError, init_health_report

    try:
        with preserved_state(model):
            report = init_health_report(model)
    except UnsupportedModelError as err:
        logger.info("hfvolume: no initialisation-health report: %s", err)
        return None
    except Exception as err:  # noqa: BLE001 - a diagnostic must never stop training
        if strict:
            raise
        logger.warning("hfvolume: initialisation-health report failed: %s: %s (training continues)",
                       type(err).__name__, err)
        return None
    if not report.parts:
        logger.info("hfvolume: no initialisation-health report: the model has no MLP part")
        return None
    values = report.to_dict()
    logger.info("hfvolume: initialisation health: std of E[f] %.4g, dead units %.3f, linear units %.3f",
                values["init_expected_output_std"], values["init_dead_unit_fraction"],
                values["init_linear_unit_fraction"])
    if trainer is not None and state.is_world_process_zero:
        trainer.log(values)
    return report


def extra_card_content(callback: Any, output_dir: str | os.PathLike[str], series: list[dict[str, Any]], *,
                       plot: bool) -> tuple[tuple[str, ...], tuple[dict[str, Any], ...]]:
    """Markdown sub-sections for hfvolume's card section and their ``model-index`` results: ``callback.init_health``
    (if any) and the online code of an :class:`hfvolume.OnlineCodeCallback` in the same Trainer (its code length,
    L_IT and compression, with the two-panel plot, written through ``callback._save`` so a file problem never
    stops training)."""
    sections: list[str] = []
    results: list[dict[str, Any]] = []
    if callback.init_health is not None:
        sections.append(callback.init_health.to_markdown())
    code = _online_code_callback(callback._trainer)
    if code is not None:
        from hfvolume.mdl.card import model_index_entries

        sections.append(_online_code_section(callback, code, output_dir, series, plot=plot))
        results.extend(model_index_entries(code.summary()))
    return tuple(x for x in sections if x), tuple(results)


def _online_code_callback(trainer: Any) -> Any:
    from hfvolume.mdl import OnlineCodeCallback

    handler = getattr(trainer, "callback_handler", None)
    found = [cb for cb in getattr(handler, "callbacks", ()) if isinstance(cb, OnlineCodeCallback)]
    return found[0] if found else None


def _online_code_section(callback: Any, code: Any, output_dir: str | os.PathLike[str],
                         series: list[dict[str, Any]], *, plot: bool) -> str:
    from hfvolume.mdl.card import plot_information, render_code_section

    plot_rel = None
    code_points = [p for p in code.series if "information_transfer_bits" in p]
    if plot and code_points:
        target = os.path.join(output_dir, INFORMATION_PLOT_FILE)
        drawn = callback._save("the information plot", lambda: plot_information(series, code_points, target))
        plot_rel = INFORMATION_PLOT_FILE if drawn else None
    return render_code_section(code.summary(), plot_path=plot_rel)


__all__ = ["INFORMATION_PLOT_FILE", "extra_card_content", "report_init_health"]
