"""Card text in, card text out: where hfvolume's section goes in a README and how the front matter is kept.

The section sits between :data:`START_MARKER` and :data:`END_MARKER`, each on a line of its own and outside any
fenced code block: a card that quotes the markers in a ```` ``` ```` or ``~~~`` fence (CommonMark §4.5) shows them
as content, and they are left alone. Everything outside the section is kept byte for byte, with two exceptions,
both needed for the Hub to see the metadata at all (its front-matter pattern, which huggingface_hub copies as
``REGEX_YAML_BLOCK``, matches neither): a UTF-8 byte-order mark before the text is dropped, as huggingface_hub's
own ``metadata_save`` does, and a card with CR-only (classic Mac) line endings is rewritten with ``\\n``.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from hfvolume.integrations.modelcard.metadata import (
    default_model_name,
    dump_front_matter,
    edit_front_matter,
    updated_metadata,
)
from hfvolume.integrations.modelcard.render import END_MARKER, START_MARKER, render_card_section
from hfvolume.integrations.modelcard.series import SeriesLike, normalize_series

_BOM = "\ufeff"
_DIGEST_RE = re.compile(r"card-sha256=([0-9a-f]{16,64})")
# A fence opener (CommonMark §4.5): up to 3 spaces, then 3+ backticks (info string without backticks) or tildes.
_LINE_RE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
_FENCE_OPEN_RE = re.compile(r"^ {0,3}(`{3,}(?=[^`]*$)|~{3,})")


def line_ending(text: str) -> str:
    """The card's line ending, by the rule huggingface_hub (and the Hub) use to avoid noisy diffs.

    A copy of ``huggingface_hub.repocard._detect_line_ending``: that function is private, so not a stable API.
    """
    cr, lf, crlf = text.count("\r"), text.count("\n"), text.count("\r\n")
    if cr + lf == 0:
        return "\n"
    if crlf == cr and crlf == lf:
        return "\r\n"
    return "\r" if cr > lf else "\n"


def normalized_card_text(card_text: str) -> tuple[str, str]:
    """``(text, eol)``: the card without a leading byte-order mark, and CR-only line endings turned into ``\\n``.

    The Hub's front-matter pattern recognises neither a block behind a BOM nor one closed by a lone ``\\r``: the
    metadata of such a card is invisible to the Hub, and each update would add another front matter.
    """
    text = card_text[1:] if card_text.startswith(_BOM) else card_text
    eol = line_ending(text) if text else "\n"
    if eol == "\r":
        text, eol = text.replace("\r\n", "\n").replace("\r", "\n"), "\n"
    return text, eol


def _lines(text: str) -> list[tuple[int, str]]:
    """``(offset, line without its line break)`` for each line of ``text``. Only ``\r\n``, ``\r`` and ``\n`` end a
    line, as in Markdown (``str.splitlines`` would also split at form feeds and Unicode line separators)."""
    return [(m.start(), m.group(0).rstrip("\r\n")) for m in _LINE_RE.finditer(text)]


def find_markers(body: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]], str | None]:
    """Spans of the start and end markers outside fenced code, and the fence still open at the end (or None).

    A marker counts only on a line of its own, at column 0, outside a fence; a span excludes the line break, so
    replacing the section keeps the card's line endings.
    """
    starts: list[tuple[int, int]] = []
    ends: list[tuple[int, int]] = []
    fence: str | None = None
    for offset, line in _lines(body):
        if fence is not None:
            # A closing fence: up to 3 spaces, the opener's character at least as many times, then only blanks.
            rest = line.lstrip(" ")
            run = rest.rstrip(" \t")
            if len(line) - len(rest) <= 3 and len(run) >= len(fence) and set(run) == {fence[0]}:
                fence = None
            continue
        opened = _FENCE_OPEN_RE.match(line)
        if opened:
            fence = opened.group(1)
            continue
        content = line.rstrip(" \t")
        if content == START_MARKER:
            starts.append((offset, offset + len(content)))
        elif content == END_MARKER:
            ends.append((offset, offset + len(content)))
    return starts, ends, fence


def replace_section(body: str, section: str, eol: str) -> str:
    """``body`` with its hfvolume section replaced by ``section``, or ``section`` appended after the user's text."""
    starts, ends, open_fence = find_markers(body)
    if starts and ends and ends[0][0] > starts[0][0]:
        return body[: starts[0][0]] + section + body[ends[0][1] :]
    if starts or ends:
        raise ValueError(
            f"the model card has a broken hfvolume section (a {START_MARKER!r} without a matching {END_MARKER!r}, "
            f"or the reverse); remove the stray marker and update again"
        )
    # No section yet: append it after the user's text, separated by a blank line.
    if body and not body.endswith(("\n", "\r")):
        body += eol
    if open_fence is not None:
        # The text ends inside a code block that runs to the end of the card: close it, or the section would be
        # rendered as code (and its markers not found next time).
        body += open_fence + eol
    if body.strip():
        body += eol
    return body + section + eol


def section_digest(card_text: str | None) -> str | None:
    """The digest recorded in a card's hfvolume section (what the section and plot were drawn from), if any."""
    if not card_text:
        return None
    starts, _, _ = find_markers(card_text)
    if not starts:
        return None
    match = _DIGEST_RE.search(card_text, starts[0][1])
    return match.group(1) if match else None


def _split_front_matter(text: str) -> tuple[Any, dict[str, Any], str]:
    """``(match, metadata, body)``; ``match`` is huggingface_hub's (the Hub's) front-matter match or None."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text)
    if not match:
        return None, {}, text
    meta = yaml.safe_load(match.group(2))
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError("the model card's metadata block is not a YAML mapping; fix it before updating")
    return match, meta, text[match.end() :]


def existing_model_name(card_text: str | None) -> str | None:
    """Name of the card's first ``model-index`` entry, so our results join it instead of renaming the model."""
    if not card_text:
        return None
    import yaml

    try:
        _, meta, _ = _split_front_matter(normalized_card_text(card_text)[0])
    except (ValueError, yaml.YAMLError):
        return None
    return default_model_name(meta)


def update_card_text(
    card_text: str | None,
    result_or_series: SeriesLike,
    *,
    plot_path: str | None = None,
    model_name: str | None = None,
    task_type: str | None = None,
    dataset_type: str | None = None,
    dataset_name: str | None = None,
    repo_type: str = "model",
    extra_sections: Sequence[str] = (),
    extra_results: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Return ``card_text`` with hfvolume's section, tag and (model repos) ``model-index`` results updated.

    A pure function (no I/O). ``card_text=None`` starts a new card. Everything else in the card is kept: the text
    outside the markers byte for byte (a leading BOM is dropped and CR-only line endings become ``\\n``, see the
    module docstring), and in the front matter every line outside the ``tags`` and ``model-index`` keys, comments
    and anchors included. When the metadata does not change, the front matter is kept verbatim.

    Defaults for the ``model-index`` entry: see :func:`~hfvolume.integrations.modelcard.metadata.updated_metadata`;
    ``model_name`` = the name of the card's first ``model-index`` entry, ``"model"``. Pass them explicitly when the
    behaviour was measured on other data than the card's evaluation.

    Raises:
        ValueError: the card's metadata is not a mapping, or it has a start marker without an end marker (or the
            reverse) — rather than guess and delete the user's text.
    """
    points = normalize_series(result_or_series)
    text, eol = normalized_card_text(card_text or "")
    match, meta, body = _split_front_matter(text)
    model_name = model_name or default_model_name(meta) or "model"

    section = render_card_section(points, plot_path=plot_path, model_name=model_name,
                                  extra_sections=extra_sections).replace("\n", eol)
    if card_text is None:
        body = f"{eol}# {model_name}{eol}{eol}{section}{eol}"
    else:
        body = replace_section(body, section, eol)

    new_meta = updated_metadata(meta, points[-1], model_name=model_name, task_type=task_type,
                                dataset_type=dataset_type, dataset_name=dataset_name, repo_type=repo_type,
                                extra_results=extra_results)
    if match is None:
        return f"---{eol}{dump_front_matter(new_meta, eol)}---{eol}" + body
    yaml_text = edit_front_matter(match.group(2), meta, new_meta, eol)
    return text[: match.start(2)] + yaml_text + text[match.end(2) : match.end()] + body


__all__ = [
    "existing_model_name",
    "find_markers",
    "line_ending",
    "normalized_card_text",
    "replace_section",
    "section_digest",
    "update_card_text",
]
