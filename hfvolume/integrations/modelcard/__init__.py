"""hfvolume's section of a model card: the series, its Markdown, the front matter, the plot and the update.

Modules, each with one reason to change: :mod:`.series` (points and their normalisation), :mod:`.render` (the
section's Markdown), :mod:`.metadata` (the ``hfvolume`` tag and ``model-index`` results in the YAML front matter),
:mod:`.text` (where the section goes in a README), :mod:`.plot` (the PNG), :mod:`.target` (local path or Hub repo)
and :mod:`.hub` (writing locally or committing to the Hub, with retries).
"""
from hfvolume.integrations.modelcard.hub import (
    PLOT_PATH_IN_REPO,
    CardUpdate,
    card_from_trainer_output,
    update_model_card,
)
from hfvolume.integrations.modelcard.plot import plot_series
from hfvolume.integrations.modelcard.render import END_MARKER, SECTION_TEMPLATE, START_MARKER, render_card_section
from hfvolume.integrations.modelcard.series import VolumePoint, normalize_series, series_hash
from hfvolume.integrations.modelcard.target import resolve_target
from hfvolume.integrations.modelcard.text import update_card_text

__all__ = [
    "END_MARKER",
    "PLOT_PATH_IN_REPO",
    "SECTION_TEMPLATE",
    "START_MARKER",
    "CardUpdate",
    "VolumePoint",
    "card_from_trainer_output",
    "normalize_series",
    "plot_series",
    "render_card_section",
    "resolve_target",
    "series_hash",
    "update_card_text",
    "update_model_card",
]
