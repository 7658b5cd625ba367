"""Evaluation texts from a file: the shapes ``hfvolume estimate --data`` understands, and nothing else.

Accepted:

* ``.txt``: one text per non-empty line;
* ``.jsonl``: one JSON object per line, each with the text field (``--text_field``, default ``"text"``), or one
  JSON string per line;
* ``.json``: a list of strings, a list of objects with the text field, or an object whose text field is a list of
  strings (a column);
* a directory saved with ``datasets.Dataset.save_to_disk`` (its first split if it is a ``DatasetDict``), with a
  column named by the text field.

Anything else is refused with an error that names these shapes: a file measured on the wrong texts (a key name, the
characters of one string) would give a confident number about nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ACCEPTED = (
    ".txt (one text per line), .jsonl (one object with the text field, or one string, per line), .json (a list of "
    "strings, a list of objects with the text field, or an object whose text field is a list of strings), or a "
    "directory saved with datasets' save_to_disk"
)


def _bad_shape(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; accepted: {ACCEPTED}")


def _text_of(row: Any, field: str, path: Path, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if field not in row:
            raise _bad_shape(path, f"{where} has no field {field!r} (fields: {sorted(row)[:8]}; choose one with "
                                   "--text_field)")
        value = row[field]
        if not isinstance(value, str):
            raise _bad_shape(path, f"{where}: field {field!r} is a {type(value).__name__}, not a string")
        return value
    raise _bad_shape(path, f"{where} is a {type(row).__name__}, not a string or an object")


def _parse_json(raw: str, path: Path, where: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {where} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})")


def _json_texts(path: Path, field: str) -> list[str]:
    data = _parse_json(path.read_text(encoding="utf-8"), path, "the file")
    if isinstance(data, list):
        return [_text_of(row, field, path, f"item {i}") for i, row in enumerate(data)]
    if isinstance(data, dict):
        column = data.get(field)
        if isinstance(column, list) and all(isinstance(t, str) for t in column):
            return list(column)
        raise _bad_shape(path, f"a JSON object must hold a list of strings under {field!r}; it has keys "
                               f"{sorted(data)[:8]}")
    raise _bad_shape(path, f"the JSON value is a {type(data).__name__}")


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            where = f"line {number}"
            texts.append(_text_of(_parse_json(line, path, where), field, path, where))
    return texts


def _dataset_texts(path: Path, field: str, limit: int) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if field not in ds.column_names:
        raise ValueError(f"dataset at {path} has no column {field!r} (columns: {ds.column_names})")
    return list(ds[field][:limit])


def read_texts(path: str, *, text_field: str = "text", limit: int) -> list[str]:
    """Up to ``limit`` non-empty texts from ``path`` (one of the accepted shapes above)."""
    p = Path(path)
    if p.is_dir():
        texts = _dataset_texts(p, text_field, limit)
    elif not p.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    elif p.suffix == ".txt":
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    elif p.suffix == ".json":
        texts = _json_texts(p, text_field)
    elif p.suffix == ".jsonl":
        texts = _jsonl_texts(p, text_field)
    else:
        raise ValueError(f"unsupported data file {path}; accepted: {ACCEPTED}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()][:limit]
    if not texts:
        raise ValueError(f"no texts found in {path}")
    return texts


__all__ = ["ACCEPTED", "read_texts"]
