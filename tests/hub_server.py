"""An in-memory stand-in for the Hugging Face Hub HTTP API, for tests without internet.

It answers the endpoints that unmodified ``huggingface_hub`` / ``transformers`` / ``datasets`` client
code uses to create a model or dataset repo, commit files (NDJSON, every file a "regular" git blob, no
LFS or Xet) and download them again by branch or commit sha (``hf_hub_download``, ``snapshot_download``,
``from_pretrained(..., trust_remote_code=True)``, ``datasets.load_dataset``, streamed or not)::

    with LocalHub() as hub:
        env = hub_env(hub.url, tmp_path / "hf-home")
        subprocess.run([sys.executable, "client.py"], env=env, check=True)
        assert "config.json" in hub.files("local-user/toy")

``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported, so client code runs in a subprocess
whose environment comes from :func:`hub_env`. Like the real Hub, a new repo starts with one
"initial commit" holding ``.gitattributes``. Requests the server does not know get a 404 with a JSON
error and are kept in :meth:`LocalHub.unknown_requests`. Run ``python tests/hub_server.py --port N``
to serve from another process: the first line printed is the base URL.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["Commit", "HubError", "HubStore", "LocalHub", "Repo", "git_blob_oid", "hub_env"]

DEFAULT_USER = "local-user"
DEFAULT_BRANCH = "main"
# The Hub's initial commit writes LFS rules; LocalHub still keeps every file as a regular blob.
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
"""
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_XET_CACHE",
               "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH")


def hub_env(url: str, home: str | os.PathLike[str]) -> dict[str, str]:
    """A copy of ``os.environ`` that points huggingface_hub / transformers at the server at ``url``.

    Sets ``HF_ENDPOINT``, a dummy ``HF_TOKEN``, ``HF_HOME=home`` (so caches, remote-code modules and
    tokens live there) and ``HF_HUB_DISABLE_TELEMETRY``; removes the offline switches and any cache
    location that would bypass ``home``; adds the loopback host to ``NO_PROXY``.
    """
    env = dict(os.environ)
    for name in _OFFLINE_VARS + _CACHE_VARS:
        env.pop(name, None)
    env.update(HF_ENDPOINT=url.rstrip("/"), HF_TOKEN="hf_local_dummy_token", HF_HOME=str(home),
               HF_HUB_DISABLE_TELEMETRY="1")
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name), "127.0.0.1", "localhost"]))
    return env


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as a regular file's ``oid`` and ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Commit:
    """One immutable revision: the whole file tree as it stands after the commit."""

    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]


REPO_TYPES = ("model", "dataset")


@dataclass
class Repo:
    """A model or dataset repo: its commits (oldest first) and branches (name -> commit sha)."""

    repo_id: str
    private: bool
    created_at: str
    repo_type: str = "model"
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)

    def commit_by_sha(self, sha: str) -> Commit | None:
        return next((c for c in self.commits if c.sha == sha), None)


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's ``X-Error-Code`` when it has one."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class HubStore:
    """The in-memory repos, safe to use from the server's request threads."""

    def __init__(self, user: str = DEFAULT_USER) -> None:
        self.user = user
        self._repos: dict[tuple[str, str], Repo] = {}  # (repo type, repo id) -> repo
        self._lock = threading.RLock()
        self._counter = itertools.count()

    def create_repo(self, repo_id: str, private: bool = False, repo_type: str = "model") -> Repo:
        """A new repo with the Hub's initial commit; ``HubError(409)`` if it exists."""
        _check_repo_id(repo_id)
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"LocalHub hosts {' and '.join(REPO_TYPES)} repos only, not {repo_type!r}")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = self._repos[repo_type, repo_id] = Repo(repo_id, private, _now(), repo_type)
            self._add_commit(repo, DEFAULT_BRANCH, None, "initial commit", "", {".gitattributes": GITATTRIBUTES})
            return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                raise HubError(404, "Repository not found", "RepoNotFound")
            return self._repos[repo_type, repo_id]

    def history(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """The repo's commits, oldest first."""
        with self._lock:
            return list(self.repo(repo_id, repo_type).commits)

    def resolve(self, repo_id: str, revision: str, repo_type: str = "model") -> Commit:
        """The commit a branch name or a full commit sha points at."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            sha = repo.branches.get(revision, revision)
            commit = repo.commit_by_sha(sha)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

    def commit(self, repo_id: str, branch: str, operations: list[dict[str, Any]], repo_type: str = "model") -> Commit:
        """Apply NDJSON commit ``operations`` (header first) to ``branch`` and return the new commit."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)",
                               "RevisionNotFound")
            head = repo.commit_by_sha(repo.branches[branch])
            assert head is not None
            header = operations[0].get("value", {}) if operations and operations[0].get("key") == "header" else None
            if header is None:
                raise HubError(400, "The commit payload must start with a header line")
            parent = header.get("parentCommit")
            if parent and parent != head.sha:
                raise HubError(412, f"A commit has happened since {parent}: the head of {branch} is {head.sha}")
            files = dict(head.files)
            for op in operations[1:]:
                _apply(files, op.get("key", ""), op.get("value", {}))
            return self._add_commit(repo, branch, head.sha, header.get("summary") or "",
                                    header.get("description") or "", files)

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, title: str, message: str,
                    files: dict[str, bytes]) -> Commit:
        identity = json.dumps([repo.repo_type, repo.repo_id, branch, parent, next(self._counter), title, message,
                               sorted((p, git_blob_oid(b)) for p, b in files.items())])
        commit = Commit(hashlib.sha1(identity.encode()).hexdigest(), parent, title,
                        f"{title}\n\n{message}".strip(), _now(), files)
        repo.commits.append(commit)
        repo.branches[branch] = commit.sha
        return commit


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'")


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in path.rstrip("/").split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _apply(files: dict[str, bytes], key: str, value: dict[str, Any]) -> None:
    """One commit operation, applied in place to a file tree."""
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
        files[_check_path(value["path"])] = base64.b64decode(value["content"])
    elif key == "deletedFile":
        if value["path"] not in files:
            raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
        del files[value["path"]]
    elif key == "deletedFolder":
        prefix = value["path"].rstrip("/") + "/"
        doomed = [p for p in files if p.startswith(prefix)]
        if not doomed:
            raise HubError(404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound")
        for p in doomed:
            del files[p]
    elif key == "lfsFile":
        raise HubError(400, "LocalHub stores regular files only (preupload never asks for LFS)")
    else:
        raise HubError(400, f"Unknown commit operation {key!r}")


def _tree_entries(commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
    """The ``/tree`` listing of ``path`` ("" is the root): files and folders, sorted by path."""
    prefix = path.rstrip("/") + "/" if path else ""
    if path and path in commit.files:
        raise HubError(404, f"{path} is a file, not a folder", "EntryNotFound")
    below = {p: b for p, b in commit.files.items() if p.startswith(prefix)}
    if path and not below:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
    entries: dict[str, dict[str, Any]] = {}
    for p, content in below.items():
        parts = p[len(prefix):].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):
            folder = prefix + "/".join(parts[:i])
            entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0})
        if recursive or len(parts) == 1:
            entries[p] = {"type": "file", "path": p, "size": len(content), "oid": git_blob_oid(content)}
    for folder, entry in entries.items():
        if entry["type"] == "directory":
            inside = sorted((p, git_blob_oid(b)) for p, b in below.items() if p.startswith(folder + "/"))
            entry["oid"] = hashlib.sha1(json.dumps(inside).encode()).hexdigest()
    return [entries[p] for p in sorted(entries)]


def _last_commit(repo: Repo, commit: Commit, path: str) -> dict[str, str]:
    """The newest commit at or before ``commit`` that changed ``path`` (a file or a folder)."""

    def snapshot(c: Commit) -> list[tuple[str, bytes]]:
        return sorted((p, b) for p, b in c.files.items() if p == path or p.startswith(path + "/"))

    current = commit
    while current.parent is not None:
        parent = repo.commit_by_sha(current.parent)
        assert parent is not None
        if snapshot(parent) != snapshot(current):
            break
        current = parent
    return {"id": current.sha, "title": current.title, "date": current.date}


def _front_matter_scalars(readme: bytes | None) -> dict[str, str]:
    """``key: value`` scalars of a model card's YAML front matter (enough for ``pipeline_tag`` & co)."""
    lines = (readme or b"").decode("utf-8", "replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    found: dict[str, str] = {}
    for line in itertools.takewhile(lambda s: s.strip() != "---", lines[1:]):
        key, sep, value = line.partition(":")
        if sep and key == key.strip() and value.strip() and not value.strip().startswith(("[", "{", "|", ">")):
            found[key] = value.strip().strip("'\"")
    return found


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: LocalHub


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the matching :class:`LocalHub` method."""

    server: _Server  # the attribute http.server sets, narrowed to reach the hub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the hub keeps its own request log."""

    def do_GET(self) -> None:
        self.server.hub._handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, "HEAD")

    def do_POST(self) -> None:
        self.server.hub._handle(self, "POST")

    def do_PUT(self) -> None:
        self.server.hub._handle(self, "PUT")

    def do_DELETE(self) -> None:
        self.server.hub._handle(self, "DELETE")

    def read_body(self) -> bytes:
        """The request body, by ``Content-Length`` or chunked transfer encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


class LocalHub:
    """A Hub server on ``127.0.0.1`` holding model repos in memory; a context manager.

    ``start()`` returns the base URL (also ``self.url``); ``commits(repo_id)`` lists commit shas
    oldest first (the first is the repo's initial commit); ``files(repo_id, rev)`` returns the tree
    at a branch or sha. ``page_size`` caps ``/tree`` pages (followed through ``Link`` headers).
    """

    def __init__(self, user: str = DEFAULT_USER, page_size: int = 1000) -> None:
        self.store = HubStore(user)
        self.page_size = page_size
        self.url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._log: list[str] = []
        self._unknown: list[str] = []
        self._log_lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------------

    def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Bind ``host:port`` (0: a free port), serve from a daemon thread and return the base URL."""
        if self._server is not None:
            return self.url
        self._server = _Server((host, port), _Handler)
        self._server.hub = self
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket (the store stays readable)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def create_repo(self, repo_id: str, private: bool = False, repo_type: str = "model") -> None:
        """Create a repo directly (as ``HfApi.create_repo`` would)."""
        self.store.create_repo(repo_id, private, repo_type)

    def upload(self, repo_id: str, files: dict[str, bytes], message: str = "upload",
               repo_type: str = "model") -> str:
        """Commit ``files`` (path -> content) to the main branch directly; returns the commit sha."""
        operations = [{"key": "header", "value": {"summary": message}}]
        operations += [{"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode()}}
                       for path, content in files.items()]
        return self.store.commit(repo_id, DEFAULT_BRANCH, operations, repo_type).sha

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """The repo's commit shas, oldest first."""
        return [c.sha for c in self.store.history(repo_id, repo_type)]

    def files(self, repo_id: str, rev: str = DEFAULT_BRANCH, repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of every file at a branch or commit sha."""
        return dict(self.store.resolve(repo_id, rev, repo_type).files)

    def requests(self) -> list[str]:
        """Every request so far, as ``"METHOD /path -> status"``."""
        with self._log_lock:
            return list(self._log)

    def unknown_requests(self) -> list[str]:
        """Requests no route matched (404) or that failed inside LocalHub (500): what a client lacked."""
        with self._log_lock:
            return list(self._unknown)

    # -- request handling ---------------------------------------------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        body = handler.read_body()
        known = True
        try:
            response = self._route(method, segments, query, body, handler)
            if response is None:
                known = False
                response = _json({"error": f"LocalHub has no route for {method} {split.path}"}, 404)
        except HubError as e:
            headers = {"X-Error-Message": e.message.encode("ascii", "backslashreplace").decode()}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            response = _json({"error": e.message}, e.status, headers)
        except (KeyError, TypeError, ValueError) as e:
            response = _json({"error": f"Bad request: {e!r}"}, 400)
        except Exception as e:  # a LocalHub bug: answer it, and keep it for the test to print
            known = False
            response = _json({"error": f"LocalHub failed: {e!r}"}, 500)
        line = f"{method} {handler.path} -> {response.status}"
        with self._log_lock:
            self._log.append(line)
            if not known:
                self._unknown.append(line)
        handler.send_response(response.status)
        for name, value in response.headers.items():
            handler.send_header(name, value)
        if "Content-Length" not in response.headers:
            handler.send_header("Content-Length", str(len(response.body)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(response.body)

    def _route(self, method: str, seg: list[str], query: dict[str, str], body: bytes,
               handler: _Handler) -> _Response | None:
        """The answer to a request, or None when no route matches."""
        model_file = seg[:1] not in (["api"], ["datasets"]) and len(seg) >= 5 and seg[2] == "resolve"
        if method in ("GET", "HEAD") and model_file:
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), method, "model")
        if method in ("GET", "HEAD") and seg[:1] == ["datasets"] and len(seg) >= 6 and seg[3] == "resolve":
            return self._resolve(f"{seg[1]}/{seg[2]}", seg[4], "/".join(seg[5:]), method, "dataset")
        if seg[:1] != ["api"]:
            return None
        if method == "GET" and seg[1:] == ["whoami-v2"]:
            self._require_token(handler)
            return _json(self._whoami())
        if method == "POST" and seg[1:] == ["repos", "create"]:
            self._require_token(handler)
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and seg[1:] == ["validate-yaml"]:
            return _json({"errors": [], "warnings": []})
        if method == "GET" and len(seg) == 4 and seg[1] == "organizations" and seg[3] == "overview":
            # No organizations here. bitsandbytes' CPU backend asks for kernels-community's when imported
            # (a trust check by the `kernels` package before it fetches a kernel) and falls back without it.
            raise HubError(404, f"Organization '{seg[2]}' not found")
        if len(seg) < 4 or seg[1] not in ("models", "datasets"):
            return None
        repo_type, repo_id, rest = seg[1][:-1], f"{seg[2]}/{seg[3]}", seg[4:]
        if method == "GET" and not rest:
            return self._repo_info(repo_id, DEFAULT_BRANCH, repo_type)
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            return self._repo_info(repo_id, rest[1], repo_type)
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            return self._tree(repo_id, rest[1], "/".join(rest[2:]).strip("/"), query, repo_type)
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            return self._paths_info(repo_id, rest[1], parse_qs(body.decode()), repo_type)
        if method == "POST" and len(rest) == 2 and rest[0] in ("preupload", "commit"):
            self._require_token(handler)
            if query.get("create_pr") in ("1", "true", "True"):
                return None  # pull requests are not modelled: log the request as unknown
            if rest[0] == "preupload":
                return self._preupload(repo_id, rest[1], json.loads(body), repo_type)
            return self._commit(repo_id, rest[1], body, repo_type)
        return None

    @staticmethod
    def _require_token(handler: _Handler) -> None:
        if not handler.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _whoami(self) -> dict[str, Any]:
        user = self.store.user
        return {"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                "fullname": user, "email": f"{user}@localhost", "emailVerified": True, "isPro": False,
                "orgs": [], "auth": {"type": "access_token",
                                     "accessToken": {"displayName": "local", "role": "write"}}}

    def _create_repo(self, payload: dict[str, Any]) -> _Response:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.store.user}/{payload['name']}"
        url = f"{self.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        try:
            self.store.create_repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")),
                                   repo_type)
        except HubError as e:
            if e.status != 409:
                raise
            return _json({"error": e.message, "url": url}, 409)
        return _json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _repo_info(self, repo_id: str, revision: str, repo_type: str) -> _Response:
        repo = self.store.repo(repo_id, repo_type)
        commit = self.store.resolve(repo_id, revision, repo_type)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [],
            "siblings": [{"rfilename": p, "size": len(b), "blobId": git_blob_oid(b)}
                         for p, b in sorted(commit.files.items())],
        }
        if repo_type == "dataset":
            return _json(info)
        info["modelId"] = repo_id
        try:
            config = json.loads(commit.files.get("config.json", b"null"))
        except ValueError:
            config = None
        if isinstance(config, dict):
            info["config"] = {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}
            info["tags"] += ["custom_code"] if "auto_map" in config else []
        card = _front_matter_scalars(commit.files.get("README.md"))
        info.update({k: card[k] for k in ("pipeline_tag", "library_name") if k in card})
        return _json(info)

    def _tree(self, repo_id: str, revision: str, path: str, query: dict[str, str], repo_type: str) -> _Response:
        repo = self.store.repo(repo_id, repo_type)
        commit = self.store.resolve(repo_id, revision, repo_type)
        entries = _tree_entries(commit, path, query.get("recursive", "").lower() in ("1", "true"))
        expand = query.get("expand", "").lower() in ("1", "true")
        size = min(self.page_size, 50) if expand else self.page_size
        start = int(query.get("cursor") or 0)
        page = entries[start:start + size]
        if expand:
            page = [{**e, "lastCommit": _last_commit(repo, commit, e["path"])} for e in page]
        headers = {}
        if start + size < len(entries):
            encoded_path = "/" + quote(path, safe="") if path else ""
            next_url = (f"{self.url}/api/{repo_type}s/{repo_id}/tree/{quote(revision, safe='')}{encoded_path}?"
                        + urlencode({**query, "cursor": start + size}))
            headers["Link"] = f'<{next_url}>; rel="next"'
        return _json(page, headers=headers)

    def _paths_info(self, repo_id: str, revision: str, form: dict[str, list[str]], repo_type: str) -> _Response:
        """``paths-info``: the entries (files and folders) at the given paths; unknown paths are left out."""
        commit = self.store.resolve(repo_id, revision, repo_type)
        entries = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append({"type": "file", "path": path, "size": len(commit.files[path]),
                                "oid": git_blob_oid(commit.files[path])})
            elif any(p.startswith(path + "/") for p in commit.files):
                inside = sorted((p, git_blob_oid(b)) for p, b in commit.files.items() if p.startswith(path + "/"))
                entries.append({"type": "directory", "path": path, "size": 0,
                                "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest()})
        return _json(entries, headers={"X-Repo-Commit": commit.sha})

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any], repo_type: str) -> _Response:
        commit = self.store.resolve(repo_id, revision, repo_type)
        files = []
        for item in payload["files"]:
            existing = commit.files.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_oid(existing) if existing is not None else None})
        return _json({"files": files, "commitOid": commit.sha})

    def _commit(self, repo_id: str, revision: str, body: bytes, repo_type: str) -> _Response:
        operations = [json.loads(line) for line in body.splitlines() if line.strip()]
        commit = self.store.commit(repo_id, revision, operations, repo_type)
        url = f"{self.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}/commit/{commit.sha}"
        return _json({"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": "",
                      "pullRequestUrl": None})

    def _resolve(self, repo_id: str, revision: str, path: str, method: str, repo_type: str) -> _Response:
        commit = self.store.resolve(repo_id, revision, repo_type)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.sha)
        content = commit.files[path]
        name = path.rsplit("/", 1)[-1]
        headers = {
            "Content-Type": "application/octet-stream", "Content-Length": str(len(content)),
            "ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "none",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}",
        }
        return _Response(200, b"" if method == "HEAD" else content, headers)


def main() -> None:
    """Serve until interrupted; print the base URL first (one line, flushed) for a parent process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--user", default=DEFAULT_USER, help="the name whoami answers and the default namespace")
    parser.add_argument("--repo", action="append", default=[], help="a repo id to create at start (repeatable)")
    args = parser.parse_args()
    hub = LocalHub(user=args.user)
    for repo_id in args.repo:
        hub.create_repo(repo_id)
    print(hub.start(args.port, args.host), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        threading.Event().wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        hub.stop()
        for line in hub.unknown_requests():
            print(f"unknown request: {line}", flush=True)


if __name__ == "__main__":
    main()

