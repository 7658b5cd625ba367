"""The card's YAML front matter: the ``hfvolume`` tag and hfvolume's ``model-index`` results.

Two top-level keys are hfvolume's to change: ``tags`` (the ``hfvolume`` tag is added, other tags stay) and
``model-index`` (hfvolume's own results, metric types ``information_content`` and ``log_volume`` with
``args.library: hfvolume``, are replaced; every other entry stays). The rest of the front matter is kept as text,
comments, anchors and formatting included: only the lines of the keys that change are rewritten
(:func:`edit_front_matter`). The ``hfvolume`` tag is appended to a block list as one more line.

The ``model-index`` entries carry what the Hub and Papers-with-Code read: the value, the name, a ``config`` string
naming what the number depends on (behaviour, cutoff, prior), and a few ``args``: the Markov bound, the Pareto k̂
with its verdict, the number of directions, the ± (spread between seeds) only where k̂ < 1/2 (see
:mod:`hfvolume.integrations.modelcard.render`). The full settings are in the card's body, not here.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Mapping, Sequence

from hfvolume.integrations.modelcard.render import behavior_name, fmt_value
from hfvolume.integrations.modelcard.series import VolumePoint

logger = logging.getLogger(__name__)

HFVOLUME_TAG = "hfvolume"
METRIC_INFORMATION_CONTENT = "information_content"
METRIC_LOG_VOLUME = "log_volume"
# The keys this module may change; any other difference means a bug, and the front matter is re-dumped as a whole.
_OUR_KEYS = ("tags", "model-index")


# ------------------------------------------------------------------------------------------- model-index results
def settings_config(settings: Mapping[str, Any]) -> str:
    """A short ``metric_config`` string naming what the number depends on, e.g. ``kl, cutoff=0.01, gaussian prior``."""
    parts = []
    name = behavior_name(settings)
    if name:
        parts.append(name)
    if "cutoff" in settings:
        parts.append(f"cutoff={fmt_value(settings['cutoff'])}")
    prior = settings.get("prior")
    prior_name = prior.get("name") if isinstance(prior, Mapping) else prior
    if prior_name:
        parts.append(f"{prior_name} prior")
    return ", ".join(parts) or "default"


def _round6(x: Any) -> Any:
    """Metadata numbers: 6 significant digits (stable YAML); non-finite floats as strings (JSON has no inf)."""
    if isinstance(x, bool) or not isinstance(x, float):
        return x
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return float(f"{x:.6g}")


def _essential_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings two numbers must share to be compared (the ``config`` string, as data)."""
    prior = settings.get("prior")
    out = {
        "behavior": behavior_name(settings),
        "cutoff": settings.get("cutoff"),
        "prior": prior.get("name") if isinstance(prior, Mapping) else prior,
    }
    return {k: _round6(v) for k, v in out.items() if v is not None}


def _metric_args(point: VolumePoint, unit: str) -> dict[str, Any]:
    """A metric's ``args``: the bound, its confidence, k̂ and its verdict, the directions, a ± only if k̂ < 1/2."""
    s = point.summary
    args: dict[str, Any] = {"library": HFVOLUME_TAG, "unit": unit, "step": point.step}
    if unit == "bits":
        args["upper_bound"] = _round6(point.upper_bound_bits)
    else:
        args["lower_bound"] = _round6(s["log_volume_lower_bound"])
    args["confidence"] = _round6(s["confidence"])
    if math.isfinite(point.pareto_k):  # NaN: too few directions or not recorded; the verdict says which
        args["pareto_k"] = _round6(point.pareto_k)
    args["reliability"] = point.reliability
    args["n_directions"] = int(s["n_directions"])
    std = point.reported_std_bits if unit == "bits" else float(s["reported_log_volume_std"])
    if math.isfinite(std):
        args["std"] = _round6(std)
    return args


def our_model_index_results(
    point: VolumePoint, *, model_name: str, task_type: str, dataset_type: str, dataset_name: str,
    extra_results: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The ``results`` entries hfvolume contributes to ``model-index``, built with huggingface_hub's EvalResult.

    ``extra_results``: other measures of the same run (e.g. the online code length and L_IT), as ``EvalResult``
    keyword dicts without the task and dataset (``metric_type``, ``metric_name``, ``metric_value``,
    ``metric_args`` with ``library: hfvolume``)."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    config = settings_config(point.settings)
    info_args = {**_metric_args(point, "bits"), "settings": _essential_settings(point.settings)}
    log_args = {**_metric_args(point, "nats"), "norm_term": _round6(point.summary["norm_term"])}
    dataset = {"task_type": task_type, "dataset_type": dataset_type, "dataset_name": dataset_name}
    results = [
        EvalResult(**dataset, metric_type=METRIC_INFORMATION_CONTENT, metric_name="Information content (bits)",
                   metric_value=_round6(point.bits), metric_config=config, metric_args=info_args),
        EvalResult(**dataset, metric_type=METRIC_LOG_VOLUME, metric_name="Log local volume (nats)",
                   metric_value=_round6(point.summary["log_volume"]), metric_config=config, metric_args=log_args),
        *(EvalResult(**dataset, **extra) for extra in extra_results),
    ]
    return eval_results_to_model_index(model_name, results)[0]["results"]


def _is_ours(metric: Any) -> bool:
    """A metric hfvolume wrote: its args name the library (the volume's two types, and the other measures' results
    a run added; all are replaced together, so a measure a later run dropped does not linger)."""
    return (
        isinstance(metric, Mapping)
        and isinstance(metric.get("args"), Mapping)
        and metric["args"].get("library") == HFVOLUME_TAG
        and isinstance(metric.get("type"), str)
    )


def upsert_model_index(model_index: Any, ours: list[dict[str, Any]], model_name: str) -> list[Any]:
    """Replace hfvolume's previous results in ``model-index`` by ``ours``; every other entry stays as it is.

    Our results go where the previous ones were (so re-running does not reorder the list), else into the entry named
    ``model_name``, else into the first entry.
    """
    if not isinstance(model_index, list) or not model_index:
        return [{"name": model_name, "results": ours}]
    new_index: list[Any] = []
    insert_at: tuple[int, int] | None = None
    for e_idx, entry in enumerate(model_index):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("results"), list):
            new_index.append(copy.deepcopy(entry))
            continue
        kept = []
        for result in entry["results"]:
            metrics = result.get("metrics") if isinstance(result, Mapping) else None
            if isinstance(metrics, list) and any(_is_ours(m) for m in metrics):
                if insert_at is None:
                    insert_at = (e_idx, len(kept))
                others = [copy.deepcopy(m) for m in metrics if not _is_ours(m)]
                if others:  # a result shared with someone else's metrics keeps theirs
                    kept.append({**copy.deepcopy(result), "metrics": others})
            else:
                kept.append(copy.deepcopy(result))
        new_index.append({**copy.deepcopy(entry), "results": kept})
    if insert_at is None:
        names = [e.get("name") if isinstance(e, Mapping) else None for e in new_index]
        e_idx = names.index(model_name) if model_name in names else 0
        if not isinstance(new_index[e_idx], Mapping) or not isinstance(new_index[e_idx].get("results"), list):
            return new_index + [{"name": model_name, "results": ours}]
        insert_at = (e_idx, len(new_index[e_idx]["results"]))
    e_idx, r_idx = insert_at
    new_index[e_idx]["results"][r_idx:r_idx] = ours
    return new_index


def _first_other_result(model_index: Any) -> Mapping[str, Any]:
    """The first ``model-index`` result that is not hfvolume's (for default task and dataset), or ``{}``."""
    for entry in model_index if isinstance(model_index, list) else []:
        results = entry.get("results") if isinstance(entry, Mapping) else None
        for result in results if isinstance(results, list) else []:
            metrics = result.get("metrics") if isinstance(result, Mapping) else None
            if isinstance(metrics, list) and metrics and not all(_is_ours(m) for m in metrics):
                return result
    return {}


def default_model_name(meta: Mapping[str, Any]) -> str | None:
    """Name of the first ``model-index`` entry, so our results join it instead of renaming the model."""
    index = meta.get("model-index")
    if isinstance(index, list) and index and isinstance(index[0], Mapping) and index[0].get("name"):
        return str(index[0]["name"])
    return None


def updated_metadata(
    meta: Mapping[str, Any],
    point: VolumePoint,
    *,
    model_name: str,
    task_type: str | None,
    dataset_type: str | None,
    dataset_name: str | None,
    repo_type: str,
    extra_results: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """``meta`` with the ``hfvolume`` tag and (model repos) hfvolume's ``model-index`` results for ``point``.

    Defaults, first match wins: ``task_type`` = the card's ``pipeline_tag``, the task of the first other
    ``model-index`` result, ``"other"``; ``dataset_type`` = the first of the card's ``datasets``, the dataset of the
    first other result (with its name), ``"custom"``; ``dataset_name`` = ``dataset_type``.
    """
    new_meta = copy.deepcopy(dict(meta))
    tags = new_meta.get("tags")
    if tags is None:
        new_meta["tags"] = [HFVOLUME_TAG]
    elif isinstance(tags, str):
        new_meta["tags"] = [tags] if tags == HFVOLUME_TAG else [tags, HFVOLUME_TAG]
    elif isinstance(tags, list) and HFVOLUME_TAG not in tags:
        new_meta["tags"] = tags + [HFVOLUME_TAG]
    if repo_type != "model":
        return new_meta
    existing_index = meta.get("model-index")
    datasets = meta.get("datasets")
    first_dataset = datasets[0] if isinstance(datasets, list) and datasets else datasets
    other = _first_other_result(existing_index)
    other_task = other.get("task") if isinstance(other.get("task"), Mapping) else {}
    other_dataset = other.get("dataset") if isinstance(other.get("dataset"), Mapping) else {}
    pipeline_tag = meta.get("pipeline_tag")
    task_type = (
        task_type
        or (pipeline_tag if isinstance(pipeline_tag, str) else None)
        or (other_task.get("type") if isinstance(other_task.get("type"), str) else None)
        or "other"
    )
    if dataset_type is None:
        if isinstance(first_dataset, str):
            dataset_type = first_dataset
        elif isinstance(other_dataset.get("type"), str):
            dataset_type = other_dataset["type"]
            if dataset_name is None and isinstance(other_dataset.get("name"), str):
                dataset_name = other_dataset["name"]
        else:
            dataset_type = "custom"
    dataset_name = dataset_name or dataset_type
    ours = our_model_index_results(
        point, model_name=model_name, task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name,
        extra_results=extra_results,
    )
    new_meta["model-index"] = upsert_model_index(existing_index, ours, model_name)
    return new_meta


# ------------------------------------------------------------------------------------------- the YAML text
def dump_front_matter(meta: Mapping[str, Any], eol: str) -> str:
    """The whole YAML block in huggingface_hub's style (key order kept), ending with ``eol``."""
    from huggingface_hub.utils import yaml_dump

    return yaml_dump(dict(meta), sort_keys=False, line_break=eol)


def edit_front_matter(yaml_text: str, meta: Mapping[str, Any], new_meta: Mapping[str, Any], eol: str) -> str:
    """``yaml_text`` (the YAML between the ``---`` lines) changed to describe ``new_meta``, touching only the lines
    of the top-level keys that change; everything else (comments, anchors, quoting, blank lines) stays as it was.

    A changed key's entry is re-dumped in place (its trailing comment lines stay), a missing key is appended at the
    end, and the ``hfvolume`` tag is added to a block list as one more item line. When that cannot be done safely
    (unparsable or unusual YAML, an anchor the rewritten key defines and another key uses), the whole block is
    re-dumped from ``new_meta`` and a warning says that comments and anchors of the front matter were lost.
    """
    import yaml

    changed = [k for k in new_meta if k not in meta or new_meta[k] != meta[k]]
    if not changed:
        return yaml_text
    edited = None
    if set(changed) <= set(_OUR_KEYS):
        try:
            edited = _edit_entries(yaml_text, new_meta, changed, eol)
            if edited is not None and yaml.safe_load(edited) != dict(new_meta):
                edited = None
        except yaml.YAMLError:
            edited = None
    if edited is None:
        logger.warning(
            "hfvolume: could not edit the model card's front matter in place; rewrote it as a whole, so its YAML "
            "comments and anchors are lost"
        )
        return dump_front_matter(new_meta, eol).rstrip("\r\n")
    return edited


def _edit_entries(yaml_text: str, new_meta: Mapping[str, Any], changed: list[str], eol: str) -> str | None:
    import yaml

    root = yaml.compose(yaml_text, Loader=yaml.SafeLoader)
    if root is not None and not isinstance(root, yaml.MappingNode):
        return None
    pairs = root.value if root is not None else []  # None: nothing but comments and blank lines
    keys = [k for k, _ in pairs]
    if not all(isinstance(k, yaml.ScalarNode) for k in keys):
        return None
    names = [k.value for k in keys]
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied from the end
    appended = []
    for key in changed:
        if names.count(key) > 1:
            return None  # duplicate key: which one the parser keeps is not ours to guess
        if key not in names:
            appended.append(_dump_entry(key, new_meta[key], eol))
            continue
        i = names.index(key)
        start = keys[i].start_mark.index
        end = _entry_end(yaml_text, start, keys[i + 1].start_mark.index if i + 1 < len(keys) else len(yaml_text))
        value_node = pairs[i][1]
        insert = _tag_insertion(yaml_text, value_node, new_meta[key], eol) if key == "tags" else None
        edits.append(insert or (start, end, _dump_entry(key, new_meta[key], eol)))
    text = yaml_text
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    for entry in appended:
        text = (text + eol if text.strip() else "") + entry
    return text


def _entry_end(text: str, start: int, next_start: int) -> int:
    """End of the entry that starts at ``start``: before the next key, minus trailing blank and comment-only lines
    (a comment above a key belongs to that key) and the final line break."""
    lines = text[start:next_start].splitlines(keepends=True)
    while len(lines) > 1 and (not lines[-1].strip() or lines[-1].lstrip().startswith("#")):
        lines.pop()
    return start + len("".join(lines).rstrip("\r\n"))


def _dump_entry(key: str, value: Any, eol: str) -> str:
    return dump_front_matter({key: value}, eol).rstrip("\r\n")


def _tag_insertion(text: str, node: Any, new_tags: Any, eol: str) -> tuple[int, int, str] | None:
    """Add ``- hfvolume`` after the last item of a block list of one-line tags, in that list's indentation."""
    import yaml

    items = node.value if isinstance(node, yaml.SequenceNode) else None
    if not items or text[node.start_mark.index] == "[" or new_tags != [i.value for i in items] + [HFVOLUME_TAG]:
        return None
    last = items[-1]
    if not all(isinstance(i, yaml.ScalarNode) for i in items) or last.start_mark.line != last.end_mark.line:
        return None
    line_start = text.rfind("\n", 0, last.start_mark.index) + 1
    prefix = text[line_start : last.start_mark.index]
    if prefix.strip() != "-":
        return None
    line_end = len(text)
    for stop in ("\r", "\n"):
        found = text.find(stop, last.end_mark.index)
        if found != -1:
            line_end = min(line_end, found)
    return line_end, line_end, f"{eol}{prefix}{HFVOLUME_TAG}"


__all__ = [
    "HFVOLUME_TAG",
    "METRIC_INFORMATION_CONTENT",
    "METRIC_LOG_VOLUME",
    "default_model_name",
    "dump_front_matter",
    "edit_front_matter",
    "our_model_index_results",
    "settings_config",
    "updated_metadata",
    "upsert_model_index",
]
