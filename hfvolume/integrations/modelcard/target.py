"""Where a card update goes: a local README or a Hub repo, decided by one rule that never guesses.

In order, first match wins:

1. a ``pathlib.Path`` (any ``os.PathLike``) is local;
2. ``"hf://<namespace>/<name>"`` (or ``hf://datasets/…``, ``hf://spaces/…``) is a Hub repo;
3. a string naming an existing file or folder is local;
4. a path-like string is local: absolute, starting with ``.`` or ``~``, ending with a path separator, holding a
   backslash or more than one ``/``, or ending with ``.md``;
5. ``"<namespace>/<name>"`` that is a valid Hub repo id is a Hub repo;
6. anything else (``"my-model"``: a Hub repo id always has a namespace) is a local folder.

A local target must exist (a folder, or a README path in an existing folder); the error says it was taken as
local and how to name a Hub repo instead. Nothing local is ever sent to the network, and a token is only used for
rules 2 and 5.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hfvolume.volume.checks import check_choice

REPO_TYPES = ("model", "dataset", "space")
HF_SCHEME = "hf://"
_TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class CardTarget:
    """A resolved target: ``readme`` for a local card, or ``repo_id`` for a Hub repo; ``repo_type`` decides whether
    ``model-index`` results are written (model repos only).

    ``given`` is what the user passed (for messages); ``explicit`` is True for an ``hf://`` target (False for a
    bare ``namespace/name``, which an error message then explains).
    """

    given: str
    readme: Path | None = None
    repo_id: str | None = None
    repo_type: str = "model"
    explicit: bool = False

    @property
    def is_local(self) -> bool:
        return self.readme is not None


def resolve_target(path_or_repo_id: str | os.PathLike[str], *, repo_type: str = "model") -> CardTarget:
    """Apply the module's rule to ``path_or_repo_id``; see the module docstring.

    Raises:
        TypeError: neither a string nor a path.
        ValueError: an ``hf://`` target that is not ``hf://[<type>s/]<namespace>/<name>``, or whose type
            contradicts ``repo_type``; an unknown ``repo_type``.
    """
    check_choice("repo_type", repo_type, REPO_TYPES)
    if isinstance(path_or_repo_id, os.PathLike):
        return CardTarget(os.fspath(path_or_repo_id), readme=_readme_path(Path(path_or_repo_id)), repo_type=repo_type)
    if not isinstance(path_or_repo_id, str):
        raise TypeError(
            f"path_or_repo_id must be a path or a string, got {path_or_repo_id!r} ({type(path_or_repo_id).__name__})"
        )
    text = path_or_repo_id
    if text.startswith(HF_SCHEME):
        return _hub_target(text, repo_type)
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text) or not _is_repo_id(text):
        return CardTarget(text, readme=_readme_path(path), repo_type=repo_type)
    return CardTarget(given=text, repo_id=text, repo_type=repo_type)


def _readme_path(path: Path) -> Path:
    """The README itself: the folder's ``README.md``, or the path of an existing file or of a ``*.md`` file."""
    if path.is_dir():
        return path / "README.md"
    if path.is_file() or path.suffix.lower() == ".md":
        return path
    return path / "README.md"


def _looks_like_path(text: str) -> bool:
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.endswith(("/", os.sep))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith(".md")
    )


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not _REPO_ID_RE.fullmatch(text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_target(text: str, repo_type: str) -> CardTarget:
    parts = text[len(HF_SCHEME) :].strip("/").split("/")
    kind = repo_type
    if len(parts) == 3 and parts[0] in _TYPE_PREFIXES:
        kind = _TYPE_PREFIXES[parts.pop(0)]
        if repo_type != "model" and kind != repo_type:
            raise ValueError(f"{text!r} names a {kind} repo, but repo_type={repo_type!r}")
    repo_id = "/".join(parts)
    if len(parts) != 2 or not _is_repo_id(repo_id):
        raise ValueError(
            f"{text!r} is not a Hub repo: use 'hf://<namespace>/<name>' (or hf://datasets/… / hf://spaces/…); "
            f"pass a branch with revision=, not in the path"
        )
    return CardTarget(given=text, repo_id=repo_id, repo_type=kind, explicit=True)


def missing_local_target_message(target: CardTarget) -> str:
    """Why a local target cannot be written, and how to name a Hub repo instead."""
    folder = target.readme.parent if target.readme is not None else Path(target.given)
    return (
        f"{target.given!r} was taken as a local path, and the folder {str(folder)!r} does not exist: create it "
        f"first. For a Hub repo pass 'hf://<namespace>/<name>' (a Hub repo id always has a namespace, e.g. "
        f"'hf://user/{Path(target.given).name or 'model'}')"
    )


def hub_target_note(target: CardTarget) -> str | None:
    """For a bare ``namespace/name`` the Hub does not know: how to name a local folder instead."""
    if target.explicit or target.repo_id is None:
        return None
    return (
        f"hfvolume: {target.given!r} was taken as a Hub repo id because no local file or folder of that name "
        f"exists; for a local folder pass a pathlib.Path or './{target.given}'"
    )


__all__ = [
    "HF_SCHEME",
    "REPO_TYPES",
    "CardTarget",
    "hub_target_note",
    "missing_local_target_message",
    "resolve_target",
]
