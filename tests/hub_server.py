"""A small Hugging Face Hub-compatible HTTP server for offline tests of Hub features.

:class:`HubServer` speaks enough of the Hub's HTTP API for the real ``huggingface_hub`` client to create a repo,
push commits (regular files inline, large or binary files through the basic Git LFS transfer), list and download
files, and pin downloads to a commit. It uses only the standard library, listens on ``127.0.0.1`` and keeps its
blobs in a temporary directory that is removed when it stops.

A test helper: it lives in ``tests/`` and is not installed with sdekit. Tests import it as
``from hub_server import HubServer`` (pytest puts ``tests/`` on ``sys.path``).

Endpoints:

* ``GET /api/whoami-v2``; ``POST /api/repos/create``; ``POST /api/validate-yaml``;
* ``GET /api/{models,datasets,spaces}/{repo_id}`` and ``.../revision/{revision}`` (``siblings``, ``sha``);
* ``GET .../tree/{revision}[/{path}]`` (``recursive``), ``GET .../commits/{revision}``;
* ``POST .../preupload/{revision}`` and ``POST .../commit/{revision}`` (NDJSON: ``header``, ``file``, ``lfsFile``,
  ``deletedFile``, ``deletedFolder``);
* ``POST /[datasets/|spaces/]{repo_id}.git/info/lfs/objects/batch`` with basic upload and verify actions;
* ``HEAD``/``GET /[datasets/|spaces/]{repo_id}/resolve/{revision}/{path}`` with the headers ``hf_hub_download``
  reads (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``, ``X-Linked-Size``, ``Content-Length``).

The client must not use Xet storage, which this server does not speak: with ``hf_xet`` installed,
``huggingface_hub`` uploads LFS files through Xet whatever the server advertises, unless ``HF_HUB_DISABLE_XET`` is
set. :meth:`HubServer.client_env` gives the environment for a client subprocess and
:meth:`HubServer.configure_client` sets up the client in this process.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LFS_EXTENSIONS", "LFS_SIZE_THRESHOLD", "FailureMode", "HubServer"]

FailureMode = Literal["error", "disconnect"]
"""How :attr:`HubServer.fail_commits` breaks the commit endpoint: ``"error"`` answers HTTP 500, ``"disconnect"``
closes the connection without an answer."""

LFS_SIZE_THRESHOLD: int = 10 * 1024 * 1024
"""Files larger than this many bytes are uploaded through LFS (the Hub's 10 MB rule)."""

LFS_EXTENSIONS: frozenset[str] = frozenset(
    {".bin", ".ckpt", ".gz", ".h5", ".jpeg", ".jpg", ".msgpack", ".npy", ".npz", ".onnx", ".parquet", ".pickle"}
    | {".pkl", ".png", ".pt", ".pth", ".safetensors", ".tar", ".tgz", ".webp", ".zip", ".zst"}
)
"""File extensions that always go through LFS, whatever their size; so do files whose first bytes contain NUL."""

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_API = re.compile(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?")
_LFS_BATCH = re.compile(r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch")
_RESOLVE = re.compile(r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)")
_LFS_UPLOAD = re.compile(r"/_hub_server/lfs/([0-9a-f]{64})/([0-9]+)/([0-9a-f]{64})")
_LFS_VERIFY = "/_hub_server/lfs-verify"
_BAD_CREDENTIALS = "Invalid credentials in Authorization header"  # the Hub's wording; the client keys on it
_PATCHED_CONSTANTS = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET")
_PATCHED_CONSTANTS += ("HF_HUB_DISABLE_TELEMETRY",)


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _upload_mode(path: str, size: int, sample: bytes) -> str:
    if size == 0:  # the client commits empty files inline whatever the answer
        return "regular"
    if size > LFS_SIZE_THRESHOLD or Path(path).suffix.lower() in LFS_EXTENSIONS or b"\0" in sample:
        return "lfs"
    return "regular"


def _gitattributes() -> bytes:
    lines = [f"*{ext} filter=lfs diff=lfs merge=lfs -text" for ext in sorted(LFS_EXTENSIONS)]
    return ("\n".join(lines) + "\n").encode()


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class _Disconnect(Exception):
    """Drop the connection without answering."""


@dataclass(frozen=True)
class _Entry:
    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob id: of the content, or of the LFS pointer for LFS files

    def preupload_oid(self) -> str:
        """What the client compares its local file against: the sha256 for LFS, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.oid

    def lfs_info(self) -> dict[str, Any] | None:
        if not self.lfs:
            return None
        return {"oid": self.sha256, "size": self.size, "pointerSize": len(_lfs_pointer(self.sha256, self.size))}


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Entry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def url_path(self) -> str:
        return _URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> _Commit:
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/"):
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..", ".git") for part in parts) or parts[0] == ".cache":
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _folder_oid(files: dict[str, _Entry], folder: str) -> str:
    listing = "".join(f"{path}\0{entry.oid}\n" for path, entry in sorted(files.items()) if path.startswith(folder))
    return hashlib.sha1(listing.encode()).hexdigest()


class _Store:
    """Repos, commits and content-addressed blobs; every method is safe to call from several threads."""

    def __init__(self, root: Path):
        self.objects = root / "objects"
        self.objects.mkdir()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lock = threading.Lock()

    # -- blobs ---------------------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has_blob(self, sha256: Any, size: int | None = None) -> bool:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            return False
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        if not self.has_blob(sha256):
            with tempfile.NamedTemporaryFile(dir=self.objects, delete=False) as tmp:
                tmp.write(content)
            os.replace(tmp.name, self.blob_path(sha256))
        return sha256

    def put_stream(self, chunks: Iterator[bytes], sha256: str, size: int) -> None:
        """Store a streamed upload as ``sha256``, checking its size and hash."""
        digest, received = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=self.objects, delete=False) as tmp:
            for chunk in chunks:
                digest.update(chunk)
                received += len(chunk)
                tmp.write(chunk)
        if received != size or digest.hexdigest() != sha256:
            os.unlink(tmp.name)
            raise _HubError(400, f"Uploaded object does not match its oid/size (got {received} bytes).")
        os.replace(tmp.name, self.blob_path(sha256))

    # -- repos ---------------------------------------------------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise _HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = _Repo(repo_type, repo_id, private, _now())
            attributes = _gitattributes()
            entry = _Entry(self.put_blob(attributes), len(attributes), False, _git_blob_oid(attributes))
            self._add_commit(repo, "main", "initial commit", "", {".gitattributes": entry})
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def _add_commit(self, repo: _Repo, branch: str, title: str, message: str, files: dict[str, _Entry]) -> _Commit:
        parent = repo.branches.get(branch)
        date = _now()
        seed = json.dumps(
            [parent, title, message, date, len(repo.commits), sorted((p, e.oid) for p, e in files.items())]
        )
        commit = _Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, date, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def commit(self, repo: _Repo, branch: str, lines: list[dict[str, Any]]) -> _Commit:
        """Apply one NDJSON commit payload to ``branch``: all of it or, on any error, none of it."""
        if not all(isinstance(line, dict) for line in lines):
            raise _HubError(400, "Every line of the commit payload must be a JSON object.")
        if not lines or lines[0].get("key") != "header" or not isinstance(lines[0].get("value"), dict):
            raise _HubError(400, "The commit payload must start with a header line.")
        header = lines[0]["value"]
        title = header.get("summary")
        if not isinstance(title, str) or not title:
            raise _HubError(400, "The commit header needs a non-empty summary.")
        staged: list[tuple[str, str, _Entry | None]] = []  # (kind, path, entry)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value")
            if not isinstance(value, dict):
                raise _HubError(400, f"Malformed commit operation: {line!r}")
            path = value.get("path")
            path = _check_path(path.rstrip("/") if key == "deletedFolder" and isinstance(path, str) else path)
            if key == "file":
                if value.get("encoding") != "base64" or not isinstance(value.get("content"), str):
                    raise _HubError(400, f"{path}: file content must be a base64 string.")
                try:
                    content = base64.b64decode(value["content"], validate=True)
                except ValueError as err:
                    raise _HubError(400, f"{path}: content is not base64: {err}") from err
                if _upload_mode(path, len(content), content[:512]) == "lfs":
                    raise _HubError(400, f"{path}: large or binary files must be uploaded with LFS.")
                staged.append(
                    ("add", path, _Entry(self.put_blob(content), len(content), False, _git_blob_oid(content)))
                )
            elif key == "lfsFile":
                sha256, size = value.get("oid"), value.get("size")
                if not self.has_blob(sha256):
                    raise _HubError(400, f"{path}: LFS object {sha256} was never uploaded.")
                actual = self.blob_path(sha256).stat().st_size
                if size is not None and size != actual:
                    raise _HubError(400, f"{path}: LFS object {sha256} has {actual} bytes, not {size}.")
                staged.append(("add", path, _Entry(sha256, actual, True, _git_blob_oid(_lfs_pointer(sha256, actual)))))
            elif key in ("deletedFile", "deletedFolder"):
                staged.append((key, path, None))
            else:
                raise _HubError(400, f"Unknown commit operation: {key!r}")
        with self.lock:
            if branch not in repo.branches:
                raise _HubError(404, f"Cannot commit to {branch!r}: not a branch.", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise _HubError(412, f"The branch {branch!r} is at {head.oid}, not at parentCommit {parent}.")
            files = dict(head.files)
            for kind, path, entry in staged:
                if entry is not None:
                    files[path] = entry
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HubError(404, f"Cannot delete {path}: no such file.", "EntryNotFound")
                else:
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise _HubError(404, f"Cannot delete folder {path}: no such folder.", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            return self._add_commit(repo, branch, title, header.get("description") or "", files)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the :class:`HubServer` that owns the listening socket."""

    server: _HTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to desynchronize when a request fails
    query: dict[str, str]
    body_read: bool

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
        """Silence the per-request log lines on stderr."""

    def do_GET(self) -> None:
        """Answer a GET request."""
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        """Answer a HEAD request."""
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        """Answer a POST request."""
        self._dispatch("POST")

    def do_PUT(self) -> None:
        """Answer a PUT request."""
        self._dispatch("PUT")

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        self.body_read = False
        hub._log(method, split.path)
        try:
            self._route(method, split.path)
        except _Disconnect:
            self.close_connection = True
        except _HubError as err:
            self._drain()
            self._send_json(err.status, {"error": err.message}, err.headers, error=err)
        except Exception as err:  # pragma: no cover - a bug in the server must not hang the client
            self._drain()
            self._send_json(500, {"error": f"Internal server error: {type(err).__name__}: {err}"})

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body, decoded from ``Content-Length`` or chunked transfer encoding."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise _Disconnect
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                raise _Disconnect
            remaining -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        self.body_read = True
        return b"".join(self._body_chunks())

    def _drain(self) -> None:
        if not self.body_read and self.command in ("POST", "PUT"):
            with contextlib.suppress(Exception):
                self._body()

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"null")
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Request body is not valid JSON: {err}") from err

    def _send(
        self, status: int, headers: dict[str, str], body: bytes | BinaryIO = b"", length: int | None = None
    ) -> None:
        self.send_response(status)
        size = len(body) if isinstance(body, bytes) else length
        for name, value in {"Content-Length": str(size), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if isinstance(body, bytes):
            self.wfile.write(body)
        else:
            shutil.copyfileobj(body, self.wfile, _CHUNK)

    def _send_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, error: _HubError | None = None
    ) -> None:
        headers = {"Content-Type": "application/json", **(headers or {})}
        if error is not None:
            message = error.message.encode("ascii", "replace").decode()
            headers["X-Error-Message"] = _BAD_CREDENTIALS if error.status == 401 else message
            if error.code is not None:
                headers["X-Error-Code"] = error.code
        self._send(status, headers, json.dumps(payload).encode())

    def _authorize(self) -> None:
        """Check ``Authorization: Bearer <token>`` when the server requires a token."""
        token = self.server.hub.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        if not given:
            raise _HubError(401, "This Hub server requires a token: send `Authorization: Bearer <token>`.")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise _HubError(401, "Invalid token: the Authorization header does not carry this server's token.")

    # -- routes --------------------------------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> None:
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            self._body()
            return self._send_json(200, {"errors": [], "warnings": []})
        if (match := _LFS_UPLOAD.fullmatch(path)) and method == "PUT":
            return self._lfs_upload(match[1], int(match[2]), match[3])
        if path == _LFS_VERIFY and method == "POST":
            return self._lfs_verify()
        if (match := _LFS_BATCH.fullmatch(path)) and method == "POST":
            return self._lfs_batch(self._repo(match[1] or "models", match[2], match[3]))
        if (match := _RESOLVE.fullmatch(path)) and method in ("GET", "HEAD"):
            repo = self._repo(match[1] or "models", match[2], match[3])
            return self._resolve(repo, unquote(match[4]), unquote(match[5]))
        if match := _API.fullmatch(path):
            return self._repo_api(method, self._repo(match[1], match[2], match[3]), match[4] or "")
        raise _HubError(404, f"No such endpoint: {method} {path}")

    def _repo(self, kind: str, namespace: str, name: str) -> _Repo:
        return self.server.hub._store.repo(_REPO_TYPES[kind], f"{unquote(namespace)}/{unquote(name)}")

    def _repo_api(self, method: str, repo: _Repo, rest: str) -> None:
        action, _, tail = rest.partition("/")
        if method == "GET" and action in ("", "revision"):
            return self._repo_info(repo, unquote(tail) if action else "main")
        if method == "GET" and action == "tree":
            revision, _, folder = tail.partition("/")
            return self._tree(repo, unquote(revision), unquote(folder))
        if method == "GET" and action == "commits":
            return self._commits(repo, unquote(tail))
        if method == "POST" and action == "preupload":
            return self._preupload(repo, unquote(tail))
        if method == "POST" and action == "commit":
            return self._commit(repo, unquote(tail))
        if action in ("xet-write-token", "xet-read-token"):
            raise _HubError(
                501,
                "This Hub server does not support Xet storage: disable it in the client with HF_HUB_DISABLE_XET=1 "
                "(see HubServer.client_env / HubServer.configure_client).",
            )
        raise _HubError(404, f"No such endpoint: {method} {self.path}")

    def _whoami(self) -> None:
        hub = self.server.hub
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise _HubError(401, "whoami needs a token: send `Authorization: Bearer <token>`.")
        self._authorize()
        access = {"displayName": "hub-server", "role": "write"}
        self._send_json(
            200,
            {
                "type": "user",
                "name": hub.username,
                "fullname": hub.username,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": access},
            },
        )

    def _create_repo(self) -> None:
        self._authorize()
        payload = self._json_body()
        if not isinstance(payload, dict):
            raise _HubError(400, "Expected a JSON object.")
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise _HubError(400, f"Unsupported repo type: {repo_type!r}")
        namespace, name = payload.get("organization") or self.server.hub.username, payload.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or not _NAME.fullmatch(str(namespace)):
            raise _HubError(400, f"Invalid repo name: {namespace}/{name}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo_id, url = f"{namespace}/{name}", f"{self.server.hub.url}/{_URL_PREFIXES[repo_type]}{namespace}/{name}"
        try:
            self.server.hub._store.create_repo(repo_type, repo_id, private)
        except _HubError as err:
            self._send_json(409, {"error": err.message, "url": url}, error=err)
            return
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, repo: _Repo, revision: str) -> None:
        commit = repo.resolve(revision)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid, lfs=entry.lfs_info())
            siblings.append(sibling)
        namespace = repo.repo_id.split("/")[0]
        info = {
            "id": repo.repo_id,
            "author": namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        self._send_json(200, info)

    def _tree(self, repo: _Repo, revision: str, folder: str) -> None:
        commit = repo.resolve(revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        files, folders = [], set()
        for path, entry in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
                if entry.lfs:
                    item["lfs"] = entry.lfs_info()
                files.append(item)
        if prefix and not files and not folders:
            raise _HubError(404, f"Folder {folder!r} not found at {revision}.", "EntryNotFound")
        dirs = [{"type": "directory", "oid": _folder_oid(commit.files, p + "/"), "path": p} for p in folders]
        self._send_json(200, sorted(dirs + files, key=lambda item: item["path"]))

    def _commits(self, repo: _Repo, revision: str) -> None:
        commit: _Commit | None = repo.resolve(revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": self.server.hub.username}],
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send_json(200, history)

    def _preupload(self, repo: _Repo, revision: str) -> None:
        self._authorize()
        payload = self._json_body()
        current = repo.resolve(revision).files
        if not isinstance(payload, dict) or not isinstance(payload.get("files"), list):
            raise _HubError(400, "Expected {'files': [{'path', 'size', 'sample'}, ...]}.")
        answers = []
        for item in payload["files"]:
            if not isinstance(item, dict) or not isinstance(item.get("size"), int):
                raise _HubError(400, f"Malformed preupload entry: {item!r}")
            path = _check_path(item.get("path"))
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=True)
            except ValueError as err:
                raise _HubError(400, f"{path}: sample is not base64: {err}") from err
            answer = {"path": path, "uploadMode": _upload_mode(path, item["size"], sample), "shouldIgnore": False}
            if path in current:
                answer["oid"] = current[path].preupload_oid()
            answers.append(answer)
        self._send_json(200, {"files": answers, "commitOid": repo.resolve(revision).oid})

    def _commit(self, repo: _Repo, revision: str) -> None:
        self._authorize()
        body = self._body()
        hub = self.server.hub
        if hub.fail_commits == "disconnect":
            raise _Disconnect
        if hub.fail_commits == "error":
            raise _HubError(500, "Simulated server failure (HubServer.fail_commits='error'); nothing was committed.")
        if self.query.get("create_pr"):
            raise _HubError(400, "This Hub server does not support pull requests.")
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Commit payload is not valid NDJSON: {err}") from err
        commit = hub._store.commit(repo, revision, lines)
        url = f"{hub.url}/{repo.url_path}/commit/{commit.oid}"
        self._send_json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""})

    def _lfs_batch(self, repo: _Repo) -> None:
        self._authorize()
        payload = self._json_body()
        if not isinstance(payload, dict) or payload.get("operation") != "upload":
            raise _HubError(400, "Only the LFS 'upload' operation is supported.")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise _HubError(400, "Only the 'basic' LFS transfer is supported.")
        hub, objects = self.server.hub, []
        for obj in payload.get("objects", []):
            sha256, size = obj.get("oid"), obj.get("size")
            if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "oid must be a sha256 and size a non-negative integer"}
                objects.append({"oid": str(sha256), "size": size if isinstance(size, int) else 0, "error": error})
                continue
            item: dict[str, Any] = {"oid": sha256, "size": size, "authenticated": True}
            if not hub._store.has_blob(sha256, size):
                item["actions"] = {
                    "upload": {"href": f"{hub.url}/_hub_server/lfs/{sha256}/{size}/{hub._sign(sha256, size)}"},
                    "verify": {"href": f"{hub.url}{_LFS_VERIFY}"},
                }
            objects.append(item)
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, sha256: str, size: int, signature: str) -> None:
        hub = self.server.hub
        if not hmac.compare_digest(signature, hub._sign(sha256, size)):
            raise _HubError(403, "Invalid upload signature.")
        self.body_read = True
        hub._store.put_stream(self._body_chunks(), sha256, size)
        self._send(200, {"ETag": f'"{sha256}"'})

    def _lfs_verify(self) -> None:
        self._authorize()
        payload = self._json_body()
        if not isinstance(payload, dict) or not self.server.hub._store.has_blob(
            payload.get("oid"), payload.get("size")
        ):
            raise _HubError(404, f"LFS object not found: {payload!r}")
        self._send_json(200, {"success": True})

    def _resolve(self, repo: _Repo, revision: str, path: str) -> None:
        commit = repo.resolve(revision)
        entry = commit.files.get(path)
        if entry is None:
            raise _HubError(404, f"{path} not found at {revision}.", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid, "Accept-Ranges": "none"}
        if entry.lfs:
            headers.update({"ETag": f'"{entry.sha256}"', "X-Linked-Etag": f'"{entry.sha256}"'})
            headers["X-Linked-Size"] = str(entry.size)
        else:
            headers["ETag"] = f'"{entry.oid}"'
        with open(self.server.hub._store.blob_path(entry.sha256), "rb") as blob:
            self._send(200, headers, blob, entry.size)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: HubServer):
        super().__init__(address, _Handler)
        self.hub = hub


class HubServer:
    """A Hub-compatible HTTP server on ``127.0.0.1``, for tests; a context manager that starts and stops it.

    Args:
        token: if set, write endpoints (repo creation, preupload, LFS batch and verify, commit) and ``whoami``
            answer HTTP 401 unless the request carries ``Authorization: Bearer <token>``. Reads are always open.
        username: the account the token belongs to; repos created without an organization go under it.
        fail_commits: make the commit endpoint fail (see :data:`FailureMode`); settable at any time.
        port: the port to listen on; ``0`` picks a free one.

    Repos start with an ``initial commit`` holding a ``.gitattributes``, as on the Hub. Every commit is a full
    snapshot, so any commit sha is a valid ``revision``; ``main`` is the only branch. A file goes through LFS if it
    is larger than :data:`LFS_SIZE_THRESHOLD`, has an extension in :data:`LFS_EXTENSIONS` or looks binary.

    Example::

        with HubServer(token="secret") as server:
            api = HfApi(endpoint=server.url, token=server.token)
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        username: str = "hub-user",
        fail_commits: FailureMode | None = None,
        port: int = 0,
    ) -> None:
        self.token: str | None = token
        """The token write requests must carry, or ``None`` for an open server."""
        self.username: str = username
        """The account name ``whoami`` reports and the default namespace of new repos."""
        self.fail_commits: FailureMode | None = fail_commits
        """When set, the commit endpoint fails this way instead of committing."""
        self._port = port
        self._secret = secrets.token_bytes(32)
        self._requests: list[tuple[str, str]] = []
        self._log_lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._store: _Store

    @property
    def url(self) -> str:
        """The server's base URL, e.g. ``http://127.0.0.1:54321``; use it as ``endpoint`` or ``HF_ENDPOINT``."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not running; call start() or use it as a context manager.")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request received so far, as ``(method, path)`` pairs without the query string."""
        with self._log_lock:
            return list(self._requests)

    def start(self) -> HubServer:
        """Start serving in a background thread, on a fresh empty store; returns the server itself."""
        if self._httpd is not None:
            raise RuntimeError("HubServer is already running.")
        self._tmp = tempfile.TemporaryDirectory(prefix="sdekit-hub-")
        self._store = _Store(Path(self._tmp.name))
        self._httpd = _HTTPServer(("127.0.0.1", self._port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="HubServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and delete every repo and blob; does nothing if the server is not running."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._tmp is not None:
            self._tmp.cleanup()
        self._httpd = self._thread = self._tmp = None

    def __enter__(self) -> HubServer:
        """Start the server (see :meth:`start`)."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server (see :meth:`stop`)."""
        self.stop()

    def client_env(self) -> dict[str, str]:
        """Environment variables that point a ``huggingface_hub`` client in a subprocess at this server.

        ``HF_ENDPOINT`` is the server URL, ``HF_HUB_OFFLINE=0`` overrides an offline test environment,
        ``HF_HUB_DISABLE_XET=1`` keeps uploads on the plain HTTP / basic LFS path, ``HF_HUB_DISABLE_TELEMETRY=1``
        spares the client its user-agent probing (an ``/api/agent-harnesses`` lookup), and ``HF_TOKEN`` is the
        server token if it has one.
        Merge them into a copy of ``os.environ``; point ``HF_HOME`` at a temporary directory to keep the cache apart.
        """
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        if self.token is not None:
            env["HF_TOKEN"] = self.token
        return env

    @contextlib.contextmanager
    def configure_client(self) -> Iterator[None]:
        """Point the ``huggingface_hub`` client in this process at the server, for the duration of a ``with`` block.

        ``huggingface_hub`` reads its environment once, at import, into ``huggingface_hub.constants``; this patches
        those values (endpoint, download URL template, offline mode off, Xet and telemetry off) and the endpoint of
        the module-level default client behind ``huggingface_hub.upload_folder`` and friends, and restores them on
        exit. ``HfApi`` objects created earlier keep their endpoint. The token is not set: pass
        ``token=server.token``.
        """
        from huggingface_hub import constants, hf_api

        saved = {name: getattr(constants, name) for name in _PATCHED_CONSTANTS}
        saved_endpoint = hf_api.api.endpoint
        try:
            constants.ENDPOINT = hf_api.api.endpoint = self.url
            constants.HUGGINGFACE_CO_URL_TEMPLATE = self.url + "/{repo_id}/resolve/{revision}/{filename}"
            constants.HF_HUB_OFFLINE = False
            constants.HF_HUB_DISABLE_XET = True
            constants.HF_HUB_DISABLE_TELEMETRY = True
            yield
        finally:
            for name, value in saved.items():
                setattr(constants, name, value)
            hf_api.api.endpoint = saved_endpoint

    def _log(self, method: str, path: str) -> None:
        with self._log_lock:
            self._requests.append((method, path))

    def _sign(self, sha256: str, size: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{size}".encode(), hashlib.sha256).hexdigest()
