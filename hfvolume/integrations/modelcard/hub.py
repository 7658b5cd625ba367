"""Writing the card: a local README (and its plot), or one Hub commit guarded by ``parent_commit`` and retried.

The retried unit on the Hub is a whole read-modify-commit round, not one HTTP request: after a conflict (HTTP 412,
someone committed since we read the card) or a lost response the card must be re-read, so that the update is
re-applied on top of the current head and a commit that did land is not made twice. That is why this module keeps
its own loop instead of huggingface_hub's ``http_backoff``, which retries a single request (and which
``create_commit`` deliberately does not use for the commit itself). What counts as transient (status codes and
connection errors) and the backoff schedule (doubling, capped) are huggingface_hub's.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from hfvolume.integrations.modelcard.metadata import HFVOLUME_TAG
from hfvolume.integrations.modelcard.plot import can_plot, write_plot
from hfvolume.integrations.modelcard.render import fmt, fmt_khat, version
from hfvolume.integrations.modelcard.series import SeriesLike, VolumePoint, normalize_series, render_digest
from hfvolume.integrations.modelcard.target import (
    CardTarget,
    hub_target_note,
    missing_local_target_message,
    resolve_target,
)
from hfvolume.integrations.modelcard.text import existing_model_name, section_digest, update_card_text
from hfvolume.volume.checks import check_bool, check_int

if TYPE_CHECKING:  # pragma: no cover - typing only
    from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

#: Where the plot goes, relative to the card (local directory or repo root); the card links to it relatively.
PLOT_PATH_IN_REPO = "hfvolume/information_content.png"
#: First wait before retrying a transient Hub error (doubles each retry, capped at :data:`RETRY_BACKOFF_MAX_S`).
#: Tests lower it.
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 8.0


@dataclass(frozen=True)
class CardUpdate:
    """What :func:`update_model_card` did.

    Attributes:
        where: the README path (local) or the repo URL (Hub).
        changed: whether anything was written or committed.
        files: the paths (relative to the card's folder / repo root) that were written or committed.
        commit_url, commit_oid: the Hub commit (None for local updates and no-ops).
        pr_url: the pull request opened with ``create_pr=True``.
    """

    where: str
    changed: bool
    files: tuple[str, ...] = ()
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None


@dataclass(frozen=True)
class _CardOptions:
    """What the card says besides the series (see :func:`update_model_card`)."""

    plot: bool
    model_name: str | None
    task_type: str | None
    dataset_type: str | None
    dataset_name: str | None
    repo_type: str
    extra_sections: tuple[str, ...] = ()
    extra_results: tuple[Mapping[str, Any], ...] = ()

    def plot_path(self, points: list[VolumePoint]) -> str | None:
        return PLOT_PATH_IN_REPO if self.plot and can_plot(points) else None

    def card(self, old: str | None, points: list[VolumePoint], default_name: str) -> str:
        return update_card_text(
            old,
            points,
            plot_path=self.plot_path(points),
            model_name=self.model_name or existing_model_name(old) or default_name,
            task_type=self.task_type,
            dataset_type=self.dataset_type,
            dataset_name=self.dataset_name,
            repo_type=self.repo_type,
            extra_sections=self.extra_sections,
            extra_results=self.extra_results,
        )


def _plot_available(plot: bool) -> bool:
    """``plot``, unless matplotlib (an optional extra) is missing: then the card goes without a plot, with a warning,
    rather than the update failing. ``plot_series`` itself still raises ImportError."""
    if not plot:
        return False
    from transformers.utils import is_matplotlib_available

    if is_matplotlib_available():
        return True
    logger.warning("hfvolume: matplotlib is not installed, so the model card gets no plot (pip install matplotlib)")
    return False


@dataclass(frozen=True)
class _HubOptions:
    """How to talk to the Hub (see :func:`update_model_card`). The token stays out of the repr."""

    token: str | bool | None = field(repr=False)
    create_pr: bool
    revision: str | None
    commit_message: str | None
    max_retries: int
    endpoint: str | None
    cache_dir: str | os.PathLike[str] | None


def update_model_card(
    result_or_series: SeriesLike,
    path_or_repo_id: str | os.PathLike[str],
    *,
    repo_type: str = "model",
    token: str | bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    plot: bool = True,
    model_name: str | None = None,
    task_type: str | None = None,
    dataset_name: str | None = None,
    dataset_type: str | None = None,
    commit_message: str | None = None,
    max_retries: int = 3,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    extra_sections: Sequence[str] = (),
    extra_results: Sequence[Mapping[str, Any]] = (),
) -> CardUpdate:
    """Put hfvolume's section, tag and ``model-index`` results into a model card, locally or on the Hub.

    Which one: :mod:`hfvolume.integrations.modelcard.target`. A ``Path``, an existing file or folder, or a path-like
    string (``"out/"``, an absolute path, ``"card.md"``) is local; ``"hf://user/model"`` or a bare
    ``"user/model"`` that exists nowhere locally is a Hub repo; ``"my-model"`` (no namespace) is a local folder.

    Local: read the README (or start a new card), update it with :func:`update_card_text`, write the plot next to
    it at :data:`PLOT_PATH_IN_REPO` (``plot=True``: a series of two or more points, or one estimate's running
    estimate), and write only what changed. The folder must exist.

    Hub: read the revision's commit sha and its README (a missing README starts a new card), and if the card or the
    plot changed push **one** commit (README.md and the PNG) with ``parent_commit=<that sha>``. If someone committed
    in between, the Hub refuses (HTTP 412): the card is re-read and the update re-applied on top, up to
    ``max_retries`` times; transient errors (huggingface_hub's retry status codes, connection errors) are retried
    with exponential backoff within the same budget. ``create_pr=True`` opens a pull request instead of committing
    to the branch. In offline mode (``HF_HUB_OFFLINE=1``) this is a no-op that logs a warning. The token is passed
    to huggingface_hub and never logged.

    Args:
        result_or_series: a result or a series (see :func:`normalize_series`); the last point is the headline.
        path_or_repo_id: a local folder / README path, or a Hub repo (``"hf://user/model"``, ``"user/model"``).
            The repo must exist.
        repo_type: Hub repo type; ``model-index`` results are written for model repos only.
        token: Hub token (default: the locally saved one).
        create_pr: open a pull request instead of committing to ``revision``.
        revision: the branch to read and update (default: the repo's default branch).
        plot: write the plot (needs matplotlib; without it the card has no plot and a warning says so).
        model_name: name of the ``model-index`` entry and the card's title (default: existing entry, repo or
            directory name).
        task_type, dataset_name, dataset_type: the ``model-index`` task and dataset (see :func:`update_card_text`).
        commit_message: Hub commit title (default names the step).
        max_retries: retries after a conflict or a transient error (attempts = ``max_retries + 1``).
        endpoint: Hub endpoint (default: huggingface_hub's, i.e. ``HF_ENDPOINT`` at import time).
        cache_dir: where the README download is cached (default: a temporary directory removed afterwards).
        extra_sections: Markdown sub-sections of other measures of the same run (e.g. the online code length from
            :class:`hfvolume.OnlineCodeCallback`), placed at the end of hfvolume's section.
        extra_results: their ``model-index`` results, as ``EvalResult`` keyword dicts without task and dataset.

    Returns:
        A :class:`CardUpdate`. ``changed=False`` means nothing was written or committed.

    Raises:
        FileNotFoundError: a local target whose folder does not exist (the message says it was taken as local).
        ValueError, TypeError: a bad argument, named in the message.
    """
    max_retries = check_int("max_retries", max_retries, minimum=0, wrong_type=ValueError)
    target = resolve_target(path_or_repo_id, repo_type=repo_type)
    # An hf://datasets/… target sets the repo type, which decides whether model-index results are written.
    options = _CardOptions(_plot_available(check_bool("plot", plot)), model_name, task_type, dataset_type,
                           dataset_name, target.repo_type, tuple(extra_sections), tuple(extra_results))
    points = normalize_series(result_or_series)
    if target.readme is not None:
        return _update_local(points, target.readme, target, options)
    hub = _HubOptions(token, check_bool("create_pr", create_pr), revision, commit_message, max_retries, endpoint,
                      cache_dir)
    try:
        return _update_hub(points, target, options, hub)
    except Exception as err:
        note = hub_target_note(target)
        if note and _status(err) in (401, 403, 404) and hasattr(err, "add_note"):
            err.add_note(note)
        raise


def _update_local(points: list[VolumePoint], readme: Path, target: CardTarget, options: _CardOptions) -> CardUpdate:
    if not readme.parent.is_dir():
        raise FileNotFoundError(missing_local_target_message(target))
    old: str | None = None
    if readme.is_file():
        # newline="" keeps \r\n as is, so a CRLF card is not rewritten with \n.
        with open(readme, encoding="utf-8", newline="") as f:
            old = f.read()
    new = options.card(old, points, readme.parent.resolve().name)
    files: list[str] = []
    if new != old:
        tmp = readme.with_name(readme.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(new)
        os.replace(tmp, readme)
        files.append(readme.name)
    plot_rel = options.plot_path(points)
    if plot_rel and write_plot(points, readme.parent / plot_rel):
        files.append(plot_rel)
    if files:
        logger.info("hfvolume: updated %s in %s", ", ".join(files), readme.parent)
    return CardUpdate(where=str(readme), changed=bool(files), files=tuple(files))


def _is_offline() -> bool:
    # Called at update time, not import time: users and tests flip huggingface_hub.constants.HF_HUB_OFFLINE after
    # importing, and is_offline_mode() reads that constant (older huggingface_hub versions lack the helper).
    from huggingface_hub import constants

    return bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def _transient_statuses() -> frozenset[int]:
    """The HTTP statuses huggingface_hub's own ``http_backoff`` retries (429 and 5xx gateway errors)."""
    from huggingface_hub.utils import _http

    return frozenset(getattr(_http, "_DEFAULT_RETRY_ON_STATUS_CODES", (408, 429, 500, 502, 503, 504)))


def _transient_exceptions() -> tuple[type[BaseException], ...]:
    """Connection-level errors worth retrying: huggingface_hub's ``http_backoff`` defaults (timeouts, network and
    protocol errors of its HTTP client), plus the builtin connection errors. ``OfflineModeIsEnabled`` subclasses
    ConnectionError but is not transient: :func:`_update_hub` catches it first."""
    from huggingface_hub.utils import _http

    return (ConnectionError, TimeoutError, *getattr(_http, "_DEFAULT_RETRY_ON_EXCEPTIONS", ()))


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _hub_api(endpoint: str | None, token: str | bool | None) -> "HfApi":
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name=HFVOLUME_TAG, library_version=version())


def _wait_before(attempt: int, last_error: BaseException | None, repo_id: str) -> None:
    if last_error is not None and _status(last_error) == 412:
        logger.info("hfvolume: %s changed while updating its card; re-reading (retry %d)", repo_id, attempt)
        return
    wait = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S)
    logger.warning(
        "hfvolume: transient error updating the card of %s (%s); retry %d in %.2g s",
        repo_id,
        type(last_error).__name__,
        attempt,
        wait,
    )
    time.sleep(wait)


def _update_hub(points: list[VolumePoint], target: CardTarget, options: _CardOptions, hub: _HubOptions) -> CardUpdate:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    repo_id = str(target.repo_id)
    if _is_offline():
        logger.warning("hfvolume: offline mode (HF_HUB_OFFLINE) is enabled; not updating the model card of %s", repo_id)
        return CardUpdate(where=repo_id, changed=False)
    api = _hub_api(hub.endpoint, hub.token)
    prefix = "" if options.repo_type == "model" else options.repo_type + "s/"
    where = f"{api.endpoint.rstrip('/')}/{prefix}{repo_id}"
    transient, transient_statuses = _transient_exceptions(), _transient_statuses()
    maybe_committed = False  # a commit whose response was lost may have landed: see _hub_attempt's no-op branch
    last_error: BaseException | None = None
    with tempfile.TemporaryDirectory(prefix="hfvolume-card-") as tmp:
        round_ = _HubRound(api, repo_id, where, options, hub, Path(tmp))
        for attempt in range(hub.max_retries + 1):
            if attempt:
                _wait_before(attempt, last_error, repo_id)
            try:
                return round_.run(points, maybe_committed=maybe_committed)
            except OfflineModeIsEnabled:
                logger.warning("hfvolume: offline mode is enabled; not updating the model card of %s", repo_id)
                return CardUpdate(where=where, changed=False)
            except HfHubHTTPError as err:
                status = _status(err)
                if status == 412 and not hub.create_pr:
                    last_error = err  # refused: nothing landed, re-read and re-apply
                    continue
                if status not in transient_statuses:
                    raise
                last_error = err
            except transient as err:
                last_error = err
            maybe_committed = maybe_committed or bool(getattr(last_error, "_hfvolume_during_commit", False))
    raise RuntimeError(
        f"hfvolume: could not update the model card of {repo_id} after {hub.max_retries + 1} attempts; "
        f"last error: {type(last_error).__name__}: {last_error}"
    ) from last_error


@dataclass(frozen=True)
class _HubRound:
    """One read-modify-commit round against the Hub; raises the client's errors for the retry loop."""

    api: "HfApi"
    repo_id: str
    where: str
    options: _CardOptions
    hub: _HubOptions
    workdir: Path

    def run(self, points: list[VolumePoint], *, maybe_committed: bool) -> CardUpdate:
        from huggingface_hub import CommitOperationAdd

        sha, files_in_repo, old = self._read()
        new = self.options.card(old, points, self.repo_id.split("/")[-1])
        operations = []
        if new != old:
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=new.encode("utf-8")))
        plot_rel = self.options.plot_path(points)
        if plot_rel:
            # The card records the render digest: an unchanged digest with the PNG present means the plot is current.
            plot_missing = files_in_repo is not None and plot_rel not in files_in_repo
            if plot_missing or section_digest(old) != render_digest(points)[:16]:
                png = self.workdir / "information_content.png"
                write_plot(points, png)  # drawn once per update: a retry finds the same digest and reuses it
                operations.append(CommitOperationAdd(path_in_repo=plot_rel, path_or_fileobj=png.read_bytes()))
        if not operations:
            logger.info("hfvolume: the model card of %s is up to date", self.repo_id)
            # After a lost commit response, "nothing to do" may mean our own commit landed: report it as a change.
            return CardUpdate(where=self.where, changed=maybe_committed, commit_oid=sha if maybe_committed else None)
        return self._commit(points[-1], operations, sha)

    def _read(self) -> tuple[str, set[str] | None, str | None]:
        """The revision's commit sha, its file list (None if the server omits it) and its README (None if none)."""
        from huggingface_hub.errors import EntryNotFoundError

        info = self.api.repo_info(self.repo_id, repo_type=self.options.repo_type, revision=self.hub.revision)
        siblings = getattr(info, "siblings", None)
        files_in_repo = {s.rfilename for s in siblings} if siblings is not None else None
        if files_in_repo is not None and "README.md" not in files_in_repo:
            return info.sha, files_in_repo, None
        cache = Path(self.hub.cache_dir) if self.hub.cache_dir is not None else self.workdir / "cache"
        try:
            # Download at the commit sha (not the branch name): the card we edit is exactly the parent commit's.
            local = self.api.hf_hub_download(
                self.repo_id, "README.md", repo_type=self.options.repo_type, revision=info.sha, cache_dir=cache
            )
        except EntryNotFoundError:
            return info.sha, files_in_repo, None
        with open(local, encoding="utf-8", newline="") as f:
            return info.sha, files_in_repo, f.read()

    def _commit(self, last: VolumePoint, operations: list, sha: str) -> CardUpdate:
        message = self.hub.commit_message or f"Update hfvolume section of the model card (step {last.step})"
        description = (
            f"Information content at most {fmt(last.upper_bound_bits)} bits with "
            f"{fmt(100 * last.summary['confidence'], 3)}% confidence (point estimate {fmt(last.bits)} bits, "
            f"Pareto k̂ {fmt_khat(last.pareto_k)}), written by hfvolume {version()}."
        )
        try:
            commit = self.api.create_commit(
                self.repo_id,
                operations,
                commit_message=message,
                commit_description=description,
                repo_type=self.options.repo_type,
                revision=self.hub.revision,
                create_pr=self.hub.create_pr,
                parent_commit=sha,
            )
        except Exception as err:
            # Mark errors raised once the commit request may have reached the server (see maybe_committed).
            try:
                err._hfvolume_during_commit = True  # type: ignore[attr-defined]
            except AttributeError:  # pragma: no cover - exceptions with __slots__
                pass
            raise
        paths = tuple(op.path_in_repo for op in operations)
        logger.info("hfvolume: committed %s to %s", ", ".join(paths), self.repo_id)
        return CardUpdate(
            where=self.where,
            changed=True,
            files=paths,
            commit_url=getattr(commit, "commit_url", None),
            commit_oid=getattr(commit, "oid", None),
            pr_url=getattr(commit, "pr_url", None),
        )


def card_from_trainer_output(
    output_dir: str | os.PathLike[str],
    series: SeriesLike,
    *,
    model_name: str | None = None,
    plot: bool = True,
    task_type: str | None = None,
    dataset_type: str | None = None,
    dataset_name: str | None = None,
    extra_sections: Sequence[str] = (),
    extra_results: Sequence[Mapping[str, Any]] = (),
) -> CardUpdate:
    """(Re)write hfvolume's section into ``output_dir/README.md`` after the Trainer (re)generated that file.

    ``Trainer.push_to_hub`` calls ``create_model_card``, which overwrites ``output_dir/README.md``, and then
    uploads the folder. Call this after the Trainer wrote the card and before the folder is uploaded (or update the
    Hub card afterwards with :func:`update_model_card` on the repo id). It keeps the Trainer's text and metadata,
    adds the section, the ``hfvolume`` tag and the ``model-index`` results, and writes the plot to
    ``output_dir/hfvolume/information_content.png`` so the folder upload carries it. Rank 0 only. Idempotent.

    ``series`` is whatever :func:`normalize_series` accepts, e.g. the callback's list of ``(global_step, result)``
    pairs or the path of the JSON file it keeps.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"Trainer output_dir does not exist: {output_dir}")
    return update_model_card(
        series,
        output_dir,
        plot=plot,
        model_name=model_name,
        task_type=task_type,
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        extra_sections=extra_sections,
        extra_results=extra_results,
    )


__all__ = [
    "PLOT_PATH_IN_REPO",
    "RETRY_BACKOFF_S",
    "CardUpdate",
    "card_from_trainer_output",
    "update_model_card",
]
