r"""A small, honest test double of the Hugging Face Hub HTTP API, served on 127.0.0.1.

It implements the subset that `huggingface_hub` calls for the operations this library uses:
repo create, model info by revision, file resolve/download (HEAD, GET, Range) with ETags and
`X-Repo-Commit`, preupload, the LFS batch API and basic PUT upload, commit (NDJSON) to a branch
or as a pull request (`refs/pr/N`). Repos live on disk. Like the real Hub it rejects writes
without a valid token, unknown revisions and repos, and commits whose `parentCommit` is stale.

Fault injection: `hub.fail_uploads = n` makes the next n LFS uploads drop the connection halfway.
A fault plan does more, per test: `hub.fault(r"/resolve/.*model\.safetensors$", times=2, status=500)`
answers the next 2 matching requests with HTTP 500 (any status; `retry_after=` adds a `Retry-After`
header, as for 429), `cut_after=n` sends the response's headers and only its first n body bytes and
then drops the connection, `flip_byte=k` serves a file with one bit of its byte k flipped while the
ETags and the LFS sha256 metadata stay those of the original (silent corruption). `method=` and
`ranged=` (True: only Range requests, False: only whole-file ones) narrow what matches; a request
takes the first matching fault that has times left. `hub.faults` lists them (`hits` counts uses).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, str]  # path -> blob sha256
    message: str
    lfs: set[str] = field(default_factory=set)  # paths committed as LFS files

    def is_lfs(self, path: str) -> bool:
        return path in self.lfs or path.endswith(".safetensors")


@dataclass
class Fault:
    """One entry of a fault plan: the next `times` requests whose path matches `path` (a regular
    expression searched in the unquoted URL path) fail in the way given."""

    path: str
    times: int = 1
    method: str | None = None  # "GET", "HEAD", "POST", "PUT"; None: any
    ranged: bool | None = None  # True: only requests with a Range header; False: only without
    status: int | None = None  # answer with this HTTP status (and no work done)
    retry_after: str | int | None = None  # with `status`: a Retry-After header
    cut_after: int | None = None  # do the work, send headers and this many body bytes, then drop
    flip_byte: int | None = None  # serve a file with one bit of this byte offset flipped
    hits: int = 0

    def matches(self, method: str, path: str, ranged: bool) -> bool:
        return (self.times > 0 and (self.method is None or self.method == method)
                and (self.ranged is None or self.ranged == ranged) and re.search(self.path, path) is not None)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as `blobId` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0


class LocalHub:
    def __init__(self, root: Path, token: str) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.fail_uploads = 0
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []  # (method, path, range header)
        handler = _make_handler(self)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> LocalHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ faults
    def fault(self, path: str, *, times: int = 1, method: str | None = None, ranged: bool | None = None,
              status: int | None = None, retry_after: str | int | None = None, cut_after: int | None = None,
              flip_byte: int | None = None) -> Fault:
        """Add a fault to the plan (see the module docstring); returns it (its `hits` count uses)."""
        f = Fault(path, times, method, ranged, status, retry_after, cut_after, flip_byte)
        with self.lock:
            self.faults.append(f)
        return f

    def take_fault(self, method: str, path: str, ranged: bool) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.matches(method, path, ranged):
                    f.times -= 1
                    f.hits += 1
                    return f
        return None

    # ------------------------------------------------------------------ storage
    def blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.blob_path(sha)
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.rename(p)
        return sha

    def resolve(self, repo: Repo, revision: str) -> Commit | None:
        oid = repo.refs.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        return repo.commits.get(oid) if oid else None

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id, private)
            init = Commit(hashlib.sha1(f"init {repo_id} {time.time_ns()}".encode()).hexdigest(), None, {}, "initial commit")
            gitattributes = self.put_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            init.files[".gitattributes"] = gitattributes
            repo.commits[init.oid] = init
            repo.refs["main"] = init.oid
            self.repos[repo_id] = repo
            return repo


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # -------------------------------------------------------------- helpers
        _cut: int | None = None
        _flip: int | None = None

        def _begin(self, path: str) -> bool:
            """Record the request and apply the fault plan; False when a fault already answered it."""
            ranged = bool(self.headers.get("range"))
            hub.requests.append((self.command, path, self.headers.get("range", "")))
            fault = hub.take_fault(self.command, path, ranged)
            self._cut = fault.cut_after if fault else None
            self._flip = fault.flip_byte if fault else None
            if fault is None or fault.status is None:
                return True
            self._body()  # drain the request so that the answer is read as one
            headers = {"Connection": "close"}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
            self.close_connection = True
            self._error(fault.status, f"injected fault: HTTP {fault.status}", None, headers)
            return False

        def _authorized(self) -> bool:
            return self.headers.get("authorization", "") == f"Bearer {hub.token}"

        def _body(self) -> bytes:
            n = int(self.headers.get("content-length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, payload: Any = None, headers: dict[str, str] | None = None, body: bytes | None = None) -> None:
            data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if body is None and payload is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if self._cut is not None and self._cut < len(data):  # injected: drop the connection mid-body
                self.wfile.write(data[: self._cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data)

        def _error(self, code: int, msg: str, error_code: str | None = None, extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Message": msg, **(extra or {})}
            if error_code:
                headers["X-Error-Code"] = error_code
            self._send(code, {"error": msg}, headers)

        def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if write and not self._authorized():
                self._error(401, "Invalid credentials in Authorization header")
                return None
            return repo

        # -------------------------------------------------------------- routes
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            if not self._begin(path):
                return
            # data set repos share the store with model repos (one namespace, as the tests use it)
            if path.startswith("/api/datasets/"):
                path = "/api/models/" + path[len("/api/datasets/"):]
            elif path.startswith("/datasets/") and "/resolve/" in path:
                path = path[len("/datasets"):]
            if path.startswith("/api/models/"):
                rest = path[len("/api/models/") :]
                if "/tree/" in rest:
                    repo_id, revision = rest.split("/tree/", 1)
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    sub = ""
                    if revision not in repo.refs and revision not in repo.commits and "/" in revision:
                        revision, sub = revision.split("/", 1)  # tree/{rev}/{path}
                    commit = hub.resolve(repo, revision)
                    if commit is None:
                        self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                        return
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                    prefix = sub.strip("/") + "/" if sub.strip("/") else ""
                    entries = []
                    dirs: set[str] = set()
                    for p, sha in sorted(commit.files.items()):
                        if not p.startswith(prefix):
                            continue
                        tail = p[len(prefix):]
                        if not recursive and "/" in tail:
                            dirs.add(prefix + tail.split("/", 1)[0])
                            continue
                        if recursive:
                            parts = tail.split("/")[:-1]
                            dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
                        size = hub.blob_path(sha).stat().st_size
                        e: dict[str, Any] = {"type": "file", "path": p, "size": size, "oid": sha}
                        if commit.is_lfs(p):
                            e["lfs"] = {"oid": sha, "size": size, "pointerSize": 134}
                        entries.append(e)
                    entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
                    if sub and not entries:
                        self._error(404, f"Entry not found: {sub}", "EntryNotFound")
                        return
                    self._send(200, entries)
                    return
                if "/revision/" in rest:
                    repo_id, revision = rest.split("/revision/", 1)
                else:
                    repo_id, revision = rest, "main"
                repo = self._repo(repo_id)
                if repo is None:
                    return
                commit = hub.resolve(repo, revision)
                if commit is None:
                    self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                    return
                siblings = [{"rfilename": p, "size": hub.blob_path(s).stat().st_size} for p, s in sorted(commit.files.items())]
                if parse_qs(url.query).get("blobs", ["false"])[0].lower() == "true":  # files_metadata=True
                    for sib in siblings:  # like the Hub: LFS files give their sha256, others their git oid
                        sha = commit.files[sib["rfilename"]]
                        if commit.is_lfs(sib["rfilename"]):
                            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {sib['size']}\n"
                            sib["blobId"] = git_blob_sha1(pointer.encode())
                            sib["lfs"] = {"sha256": sha, "size": sib["size"], "pointerSize": len(pointer)}
                        else:
                            sib["blobId"] = git_blob_sha1(hub.blob_path(sha).read_bytes())
                self._send(200, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                                 "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})
                return
            if "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                revision, _, filename = rest.partition("/")
                if revision == "refs" and filename.startswith("pr/"):  # refs/pr/N
                    num, _, filename = filename[3:].partition("/")
                    revision = f"refs/pr/{num}"
                repo = self._repo(repo_id)
                if repo is None:
                    return
                commit = hub.resolve(repo, revision)
                if commit is None:
                    self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                    return
                sha = commit.files.get(filename)
                if sha is None:
                    self._error(404, f"Entry not found: {filename}", "EntryNotFound")
                    return
                data = hub.blob_path(sha).read_bytes()
                if self._flip is not None and 0 <= self._flip < len(data):  # injected: silent corruption
                    flipped = bytearray(data)
                    flipped[self._flip] ^= 0x01
                    data = bytes(flipped)
                headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
                if commit.is_lfs(filename):
                    headers["X-Linked-Etag"] = f'"{sha}"'
                    headers["X-Linked-Size"] = str(len(data))
                rng = self.headers.get("range")
                if rng and rng.startswith("bytes="):
                    start_s, _, end_s = rng[6:].partition("-")
                    start = int(start_s)
                    end = min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    self._send(206, headers=headers, body=data[start : end + 1])
                    return
                self._send(200, headers=headers, body=data)
                return
            self._error(404, f"not implemented in the local hub: GET {path}")

        def do_PUT(self) -> None:
            path = unquote(urlparse(self.path).path)
            if not self._begin(path):
                return
            if path.startswith("/lfs-upload/"):
                oid = path.rsplit("/", 1)[1]
                n = int(self.headers.get("content-length") or 0)
                if hub.fail_uploads > 0:
                    hub.fail_uploads -= 1
                    self.rfile.read(n // 2)
                    self.close_connection = True
                    self.connection.shutdown(2)  # drop the connection mid-upload
                    return
                data = self.rfile.read(n)
                if hashlib.sha256(data).hexdigest() != oid:
                    self._error(400, "sha256 mismatch")
                    return
                hub.put_blob(data)
                self._send(200, {})
                return
            self._error(404, f"not implemented in the local hub: PUT {path}")

        def do_POST(self) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            if not self._begin(path):
                return
            body = self._body()
            if path == "/api/validate-yaml":
                self._validate_yaml(json.loads(body))
                return
            if path == "/api/repos/create":
                if not self._authorized():
                    self._error(401, "Invalid credentials in Authorization header")
                    return
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                if "/" not in repo_id:
                    repo_id = f"user/{repo_id}"
                existed = repo_id in hub.repos
                hub.create_repo(repo_id, bool(req.get("private")))
                if existed:
                    msg = "You already created this model repo"
                    self._send(409, {"error": msg, "url": f"{hub.endpoint}/{repo_id}"}, {"X-Error-Message": msg})
                    return
                self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                return
            if path.endswith(".git/info/lfs/objects/batch"):
                repo_id = path.lstrip("/")[: -len(".git/info/lfs/objects/batch")]
                if self._repo(repo_id, write=True) is None:
                    return
                req = json.loads(body)
                objects = []
                for o in req["objects"]:
                    entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"]}
                    if not hub.blob_path(o["oid"]).exists():
                        entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{repo_id}/{o['oid']}"}}
                    objects.append(entry)
                self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})
                return
            if path.startswith("/api/models/") and "/preupload/" in path:
                repo_id, revision = path[len("/api/models/") :].split("/preupload/", 1)
                repo = self._repo(repo_id, write=True)
                if repo is None:
                    return
                req = json.loads(body)
                files = []
                for f in req["files"]:
                    sample = base64.b64decode(f["sample"])
                    lfs = f["path"].endswith((".safetensors", ".bin")) or b"\x00" in sample
                    files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
                self._send(200, {"files": files, "commitOid": repo.refs.get(revision)})
                return
            if path.startswith("/api/models/") and "/commit/" in path:
                repo_id, revision = path[len("/api/models/") :].split("/commit/", 1)
                repo = self._repo(repo_id, write=True)
                if repo is None:
                    return
                self._commit(repo, revision, body, create_pr=query.get("create_pr", ["0"])[0] in ("1", "true"))
                return
            self._error(404, f"not implemented in the local hub: POST {path}")

        def _validate_yaml(self, req: dict[str, Any]) -> None:
            """The Hub's README metadata checks that matter here (a subset of its JSON schema)."""
            import re

            import yaml

            content = req.get("content", "")
            errors: list[str] = []
            m = re.match(r"^---\n(.*?)\n---", content, re.S)
            meta: Any = {}
            if m:
                try:
                    meta = yaml.safe_load(m.group(1)) or {}
                except yaml.YAMLError as e:
                    errors.append(f"YAML parse error: {e}")
            if not isinstance(meta, dict):
                errors.append("metadata must be a YAML mapping")
                meta = {}
            repo_re = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
            base = meta.get("base_model")
            for b in [base] if isinstance(base, str) else (base or []):
                if not isinstance(b, str) or not repo_re.match(b):
                    errors.append(f'"base_model" must be a valid repo id, got {b!r}')
            rel = meta.get("base_model_relation")
            if rel is not None and rel not in ("adapter", "merge", "quantized", "finetune"):
                errors.append(f'"base_model_relation" must be one of adapter, merge, quantized, finetune, got {rel!r}')
            if rel is not None and base is None:
                errors.append('"base_model_relation" requires "base_model"')
            tags = meta.get("tags")
            if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
                errors.append('"tags" must be a list of strings')
            for key in ("library_name", "license", "pipeline_tag"):
                if key in meta and not isinstance(meta[key], str):
                    errors.append(f'"{key}" must be a string')
            mi = meta.get("model-index")
            if mi is not None and (
                not isinstance(mi, list)
                or not all(isinstance(x, dict) and "name" in x and isinstance(x.get("results"), list) for x in mi)
            ):
                errors.append('"model-index" must be a list of {name, results: [...]}')
            if errors:
                self._send(400, {"errors": [{"message": e} for e in errors], "warnings": []})
            else:
                self._send(200, {"errors": [], "warnings": []})

        def _commit(self, repo: Repo, revision: str, body: bytes, create_pr: bool) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next((x["value"] for x in lines if x["key"] == "header"), {})
            with hub.lock:
                base = hub.resolve(repo, revision)
                if base is None:
                    self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                    return
                parent = header.get("parentCommit")
                if parent and parent != base.oid:
                    self._error(412, f"A commit has happened since. Please refresh and try again. (parent {parent} is not {base.oid})")
                    return
                files = dict(base.files)
                lfs = set(base.lfs)
                for item in lines:
                    v = item["value"]
                    if item["key"] == "file":
                        content = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                        files[v["path"]] = hub.put_blob(content)
                        lfs.discard(v["path"])
                    elif item["key"] == "lfsFile":
                        if not hub.blob_path(v["oid"]).exists():
                            self._error(422, f"LFS file {v['path']} ({v['oid']}) was not uploaded")
                            return
                        files[v["path"]] = v["oid"]
                        lfs.add(v["path"])
                    elif item["key"] == "deletedFile":
                        files.pop(v["path"], None)
                        lfs.discard(v["path"])
                oid = hashlib.sha1(json.dumps([base.oid, sorted(files.items()), header.get("summary")]).encode()).hexdigest()
                repo.commits[oid] = Commit(oid, base.oid, files, header.get("summary", ""), lfs)
                pr_url = None
                if create_pr:
                    repo.prs += 1
                    repo.refs[f"refs/pr/{repo.prs}"] = oid
                    pr_url = f"{hub.endpoint}/{repo.repo_id}/discussions/{repo.prs}"
                else:
                    repo.refs[revision] = oid
            self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}",
                             "pullRequestUrl": pr_url})

    return Handler


def point_hf_at(hub: LocalHub, home: Path, monkeypatch: Any, **extra_env: str) -> dict[str, str]:
    """Point huggingface_hub (env and its already-read constants) at `hub`, with a fresh HF home
    under `home`; returns the environment set (for subprocesses)."""
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": hub.token or "", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(home / "hf-home"), "HF_HUB_CACHE": str(home / "hf-home" / "hub"),
           "HF_HUB_DISABLE_TELEMETRY": "1", **extra_env}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    return env
