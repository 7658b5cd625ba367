"""A minimal Hugging Face Hub look-alike on 127.0.0.1 for testing the real ``huggingface_hub`` client offline.

Only the endpoints the client calls for reading and updating a model card are implemented (found by reading
huggingface_hub 2.4's ``hf_api.py``, ``_commit_api.py`` and ``file_download.py`` and checked against the request log
of this server while the client runs):

=========================================================  ===================================================
``POST /api/repos/create``                                   ``HfApi.create_repo``; 409 if the repo exists
``GET  /api/{type}s/{ns}/{name}[/revision/{rev}]``           ``HfApi.repo_info`` / ``model_info``: ``sha``, ``siblings``
``HEAD|GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path}``     ``hf_hub_download``: ETag, X-Repo-Commit, Content-Length
``POST /api/validate-yaml``                                  ``create_commit`` with a README.md (checks ``model-index``)
``POST /api/{type}s/{ns}/{name}/preupload/{rev}``            upload mode ("regular" only) and the remote blob oid
``POST /api/{type}s/{ns}/{name}/commit/{rev}[?create_pr=1]`` ndjson commit; ``parentCommit`` mismatch → 412
=========================================================  ===================================================

Revisions in URLs are percent-encoded by the client (``refs%2Fpr%2F1``). Errors carry the ``X-Error-Code`` header the
client maps to its exception classes (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

State is in memory: repo → refs (branch / PR ref → commit oid) and commits (oid → parent, message, files).
Test hooks: :meth:`HubServer.commits`, :meth:`HubServer.fail_next_commits` (transient 5xx),
:meth:`HubServer.inject_concurrent_commit` (someone else commits just before the next commit request is handled),
:meth:`HubServer.push` (seed files), :meth:`HubServer.read_file`, :meth:`HubServer.prs`, :attr:`HubServer.requests`
(method, path, Authorization header seen) and :attr:`HubServer.unhandled` (requests to endpoints this server does
not know — a test should assert it is empty).

Not implemented: LFS/Xet uploads (preupload answers "regular" and refuses files over 10 MB), copies, listing
commits/trees, discussions other than the PR a ``create_pr`` commit opens, auth checks (the token is only recorded).

Usage::

    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token="hf_test")
        api.create_repo("user/model")
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from huggingface_hub.repocard import REGEX_YAML_BLOCK as _YAML_BLOCK  # the Hub server's own pattern, per the client

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_MAX_REGULAR_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id, which the Hub returns as ETag and preupload ``oid`` for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class PullRequest:
    num: int
    ref: str
    target: str
    title: str
    status: str = "open"


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: list[PullRequest] = field(default_factory=list)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        return self.commits.get(rev) if re.fullmatch(r"[0-9a-f]{40}", rev) else None

    def history(self, rev: str = "main") -> list[Commit]:
        """Commits reachable from ``rev``, oldest first."""
        out, commit = [], self.resolve(rev)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out[::-1]


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, dict(extra or {})


class HubServer:
    """The server and its state. Start with ``with HubServer() as hub`` (or :meth:`start` / :meth:`stop`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._counter = 0
        self._fail_commits: list[int] = []
        self._concurrent: list[tuple[str, str, Callable[[dict[str, bytes]], dict[str, bytes]], str]] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "HubServer":
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---------------------------------------------------------------------------------------------- hooks
    def create_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """Create a repo directly (as ``POST /api/repos/create`` does): one initial commit with .gitattributes."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                raise _HubError(409, "You already created this model repo")
            repo = Repo(repo_id, repo_type)
            self._repos[key] = repo
            self._new_commit(repo, "main", None, "initial commit", {".gitattributes": b"*.bin filter=lfs\n"})
            return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self._repos[(repo_type, repo_id)]

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """The commits reachable from ``revision`` (oldest first), initial commit included."""
        with self._lock:
            return self.repo(repo_id, repo_type).history(revision)

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes | None:
        with self._lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            return None if commit is None else commit.files.get(path)

    def push(self, repo_id: str, files: Mapping[str, bytes | str], message: str = "user edit") -> str:
        """Commit ``files`` on main as another user would; returns the new oid."""
        with self._lock:
            repo = self.repo(repo_id)
            head = repo.resolve("main")
            new_files = dict(head.files) if head else {}
            new_files.update({k: v.encode() if isinstance(v, str) else v for k, v in files.items()})
            return self._new_commit(repo, "main", head.oid if head else None, message, new_files).oid

    def fail_next_commits(self, n: int, status: int = 500) -> None:
        """The next ``n`` commit requests fail with ``status`` before touching the repo (transient errors)."""
        with self._lock:
            self._fail_commits.extend([status] * n)

    def inject_concurrent_commit(
        self,
        repo_id: str,
        edit: Callable[[dict[str, bytes]], dict[str, bytes]],
        message: str = "concurrent edit",
        revision: str = "main",
    ) -> None:
        """Just before the next commit request to ``repo_id`` is handled, commit ``edit(files)`` on ``revision``.

        This is the race ``parent_commit`` guards against: the client read the old head, someone else pushed.
        """
        with self._lock:
            self._concurrent.append((repo_id, revision, edit, message))

    def prs(self, repo_id: str) -> list[PullRequest]:
        with self._lock:
            return list(self.repo(repo_id).prs)

    # -------------------------------------------------------------------------------------------- internals
    def _new_commit(self, repo: Repo, ref: str, parent: str | None, message: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        digest = hashlib.sha1()
        digest.update(f"{self._counter}\0{parent}\0{message}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = Commit(digest.hexdigest(), parent, message, dict(files))
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit


def _validate_card(content: str) -> list[str]:
    """The checks of ``/api/validate-yaml`` we care about: YAML parses to a mapping; model-index is well formed."""
    match = _YAML_BLOCK.search(content)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        return [f"Invalid YAML: {err}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["YAML metadata must be a mapping"]
    errors = []
    index = meta.get("model-index")
    if index is None:
        return errors
    if not isinstance(index, list):
        return ['"model-index" must be an array']
    for i, entry in enumerate(index):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(entry.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance(result, dict):
                errors.append(f'"{where}" must be an object')
                continue
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append(f'"{where}.task.type" is required')
            dataset = result.get("dataset") or {}
            for key in ("type", "name"):
                if not isinstance(dataset.get(key), str):
                    errors.append(f'"{where}.dataset.{key}" is required')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty array')
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str):
                    errors.append(f'"{where}.metrics[{k}].type" is required')
                elif metric.get("value") is None:
                    errors.append(f'"{where}.metrics[{k}].value" is required')
    return errors


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response sets Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        pass  # quiet: the request log lives in hub.requests

    # ------------------------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: Mapping[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body = self._body() if method in ("POST", "PUT") else b""
        self.hub.requests.append((method, parts.path, self.headers.get("Authorization")))
        try:
            with self.hub._lock:
                handled = self._route(method, parts.path, query, body)
            if not handled:
                self.hub.unhandled.append((method, parts.path))
                self._json(404, {"error": f"test hub: no route for {method} {parts.path}"})
        except _HubError as err:
            headers = {"X-Error-Message": err.message, **err.extra}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message}, headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # ---------------------------------------------------------------------------------------------- routes
    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> bool:
        # Split the raw path first, then unquote each segment: a revision such as refs%2Fpr%2F1 holds slashes.
        seg = [unquote(s) for s in path.strip("/").split("/")]
        if method == "POST" and seg == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and seg == ["api", "validate-yaml"]:
            payload = json.loads(body or b"{}")
            errors = _validate_card(payload.get("content", ""))
            status = 400 if errors else 200
            self._json(status, {"errors": [{"message": e} for e in errors], "warnings": []})
            return True
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in _REPO_TYPES:
            repo_type, repo_id, rest = _REPO_TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
            if method == "GET" and not rest:
                return self._repo_info(repo_type, repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._repo_info(repo_type, repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_type, repo_id, rest[1], json.loads(body or b"{}"))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_type, repo_id, rest[1], body, query.get("create_pr") == "1")
            return False
        # File download: /{ns}/{name}/resolve/{rev}/{path} (models) or /{datasets|spaces}/{ns}/{name}/resolve/...
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = _REPO_TYPES[seg[0]], seg[1:]
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve_file(repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), method == "HEAD")
        return False

    def _create_repo(self, payload: Mapping[str, Any]) -> bool:
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        repo_id = f"{org}/{name}" if org else f"user/{name}"
        self.hub.create_repo(repo_id, repo_type)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json(200, {"url": f"{self.hub.url}/{prefix}{repo_id}", "name": repo_id})
        return True

    def _repo_info(self, repo_type: str, repo_id: str, rev: str) -> bool:
        repo = self.hub._get_repo(repo_type, repo_id)
        commit = self.hub._resolve(repo, rev)
        siblings = [
            {"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)} for p, d in sorted(commit.files.items())
        ]
        self._json(200, {"id": repo_id, "sha": commit.oid, "private": False, "siblings": siblings, "tags": []})
        return True

    def _resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str, head: bool) -> bool:
        repo = self.hub._get_repo(repo_type, repo_id)
        commit = self.hub._resolve(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit.oid,
        }
        self._send(200, data, headers, head=head)
        return True

    def _preupload(self, repo_type: str, repo_id: str, rev: str, payload: Mapping[str, Any]) -> bool:
        repo = self.hub._get_repo(repo_type, repo_id)
        commit = self.hub._resolve(repo, rev)
        files = []
        for item in payload.get("files", []):
            if int(item.get("size", 0)) > _MAX_REGULAR_SIZE:
                raise _HubError(400, "test hub: LFS uploads are not supported")
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        self._json(200, {"files": files, "commitOid": commit.oid})
        return True

    def _commit(self, repo_type: str, repo_id: str, rev: str, body: bytes, create_pr: bool) -> bool:
        hub = self.hub
        repo = hub._get_repo(repo_type, repo_id)
        if hub._fail_commits:
            status = hub._fail_commits.pop(0)
            raise _HubError(status, "test hub: injected transient error")
        for item in [c for c in hub._concurrent if c[0] == repo_id]:
            hub._concurrent.remove(item)
            _, ref, edit, message = item
            head = hub._resolve(repo, ref)
            hub._new_commit(repo, ref, head.oid, message, edit(dict(head.files)))

        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "test hub: the first ndjson line must be the header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        ops = lines[1:]

        if create_pr:
            if rev not in repo.refs:
                raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            base = self._find_commit(repo, parent) if parent else repo.resolve(rev)
            num = len(repo.prs) + 1
            ref = f"refs/pr/{num}"
            commit = hub._new_commit(repo, ref, base.oid, header["summary"], self._apply(base.files, ops))
            repo.prs.append(PullRequest(num, ref, rev, header["summary"]))
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            self._json(
                200,
                {
                    "commitOid": commit.oid,
                    "commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{commit.oid}",
                    "pullRequestUrl": f"{hub.url}/{prefix}{repo_id}/discussions/{num}",
                },
            )
            return True

        if rev not in repo.refs:  # commits go to branches only
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = repo.resolve(rev)
        if parent is not None and not head.oid.startswith(parent.lower()):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = hub._new_commit(repo, rev, head.oid, header["summary"], self._apply(head.files, ops))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json(
            200,
            {"commitOid": commit.oid, "commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{commit.oid}", "success": True},
        )
        return True

    @staticmethod
    def _find_commit(repo: Repo, prefix: str) -> Commit:
        matches = [c for oid, c in repo.commits.items() if oid.startswith(prefix.lower())]
        if len(matches) != 1:
            raise _HubError(404, f"Invalid rev id: {prefix}", "RevisionNotFound")
        return matches[0]

    @staticmethod
    def _apply(files: Mapping[str, bytes], ops: list[Mapping[str, Any]]) -> dict[str, bytes]:
        out = dict(files)
        for op in ops:
            key, value = op.get("key"), op.get("value") or {}
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"test hub: unsupported encoding {value.get('encoding')!r}")
                out[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in out:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del out[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in out if p.startswith(folder)]:
                    del out[path]
            else:
                raise _HubError(400, f"test hub: unsupported commit operation {key!r}")
        return out


__all__ = ["Commit", "HubServer", "PullRequest", "Repo", "git_blob_sha1"]
