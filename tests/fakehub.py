"""A small in-process Hub API for tests: the routes huggingface_hub 2.4.0 (our pin in
constraints.txt) uses for create_repo, create_commit / upload_folder (with deletes),
list_repo_files / list_repo_tree, list_repo_commits, repo_info, hf_hub_download,
snapshot_download and model-card validation.

Hand-written because the Hub has no local server and huggingface_hub ships no test double;
the real client runs against it, so its URL building, commit encoding and card code are
exercised. Repos live in a temp dir, git-free: every commit is a folder holding that
commit's whole tree, and a repo's history is a list of commits. Every file is answered as a
"regular" upload, so no LFS or xet path is taken.

Fault injection: `hub.fail(pattern, nth=2, times=1)` answers the nth request whose
"METHOD path" matches the regex `pattern` (and the `times - 1` matching requests after it)
with a 500.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import yaml

BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def git_blob_sha(data: bytes) -> str:
    """The git blob id, which the client compares against to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    date: str
    folder: Path  # the commit's whole tree


@dataclass
class Repo:
    repo_type: str  # "model" | "dataset"
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)  # oldest first

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in ("main", "HEAD"):
            return self.commits[-1]
        for c in self.commits:
            if c.oid == revision or (len(revision) >= 7 and c.oid.startswith(revision)):
                return c
        return None


@dataclass
class Fault:
    pattern: re.Pattern
    nth: int
    times: int
    seen: int = 0


class FakeHub:
    """The state behind the server: repos, request log, faults, the accepted token."""

    def __init__(self, root: Path, token: str | None = None):
        self.root = Path(root)
        self.token = token  # when set, writes need "Authorization: Bearer <token>"
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[str] = []  # "METHOD path" of every request, in order
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.url = ""

    def fail(self, pattern: str, nth: int = 1, times: int = 1) -> None:
        self.faults.append(Fault(re.compile(pattern), nth, times))

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        repo = self.repos.get((repo_type, repo_id))
        return list(repo.commits) if repo else []

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        head = self.commits(repo_id, repo_type)[-1]
        return {str(p.relative_to(head.folder)): p.read_bytes()
                for p in sorted(head.folder.rglob("*")) if p.is_file()}

    # ------------------------------------------------------------------------------ state
    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return False
            repo = Repo(repo_type, repo_id, private)
            self.repos[(repo_type, repo_id)] = repo
            self._commit(repo, "initial commit", "", {".gitattributes": b"*.safetensors "
                                                      b"filter=lfs diff=lfs merge=lfs -text\n"},
                         set())
            return True

    def _commit(self, repo: Repo, title: str, message: str, adds: dict[str, bytes],
                deletes: set[str]) -> Commit:
        parent = repo.commits[-1] if repo.commits else None
        digest = hashlib.sha1((parent.oid if parent else "").encode() + title.encode()
                              + repr(sorted((k, git_blob_sha(v)) for k, v in adds.items()))
                              .encode() + repr(sorted(deletes)).encode()
                              + str(time.time_ns()).encode())
        oid = digest.hexdigest()
        folder = self.root / repo.repo_type / repo.repo_id / oid
        if parent:
            shutil.copytree(parent.folder, folder)
        else:
            folder.mkdir(parents=True)
        for path in deletes:
            target = folder / path
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for path, data in adds.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        commit = Commit(oid, title, message,
                        time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), folder)
        repo.commits.append(commit)
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes | dict | list | None = None,
              headers: dict | None = None, head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        body = body or b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None,
               head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        if not self.hub.token:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        self.hub.requests.append(f"{method} {path}")
        body = self._body() if method == "POST" else b""
        for fault in self.hub.faults:
            if fault.pattern.search(f"{method} {path}"):
                fault.seen += 1
                if fault.nth <= fault.seen < fault.nth + fault.times:
                    return self._error(500, "injected failure")
        try:
            self._route(method, path, query, body)
        except BrokenPipeError:
            pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # --------------------------------------------------------------------------- routes
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        hub = self.hub
        if method == "GET" and path == "/api/whoami-v2":
            if not self._authorized() or not hub.token:
                return self._error(401, "Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": "tester", "orgs": [],
                                    "auth": {"accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/repos/create":
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            data = json.loads(body)
            repo_type = data.get("type") or "model"
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") \
                else f"tester/{data['name']}"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            private = data.get("visibility") == "private" or bool(data.get("private"))
            if not hub.create_repo(repo_type, repo_id, private):
                return self._send(409, {"error": "You already created this repo", "url": url})
            return self._send(200, {"url": url, "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(.*))?$", path)
        if m:
            return self._api_repo(method, m.group(1)[:-1], m.group(2), m.group(3) or "",
                                  query, body)
        m = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(method, "dataset" if m.group(1) else "model", m.group(2),
                                 m.group(3), m.group(4))
        self._error(404, f"no route for {method} {path}")

    def _repo(self, repo_type: str, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _commit_or_404(self, repo: Repo, revision: str, head: bool = False) -> Commit | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
        return commit

    def _api_repo(self, method: str, repo_type: str, repo_id: str, rest: str, query: dict,
                  body: bytes) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        if method == "GET" and (rest == "" or rest.startswith("revision/")):
            commit = self._commit_or_404(repo, rest[len("revision/"):] or "main")
            if commit:
                files = [str(p.relative_to(commit.folder)) for p in
                         sorted(commit.folder.rglob("*")) if p.is_file()]
                self._send(200, {"id": repo_id, "_id": repo_id, "sha": commit.oid,
                                 "private": repo.private, "lastModified": commit.date,
                                 "siblings": [{"rfilename": f} for f in files],
                                 "tags": [], "downloads": 0, "likes": 0})
            return
        m = re.match(r"^tree/([^/]+)/?(.*)$", rest)
        if method == "GET" and m:
            commit = self._commit_or_404(repo, m.group(1))
            if commit is None:
                return
            base = commit.folder / m.group(2) if m.group(2) else commit.folder
            if not base.is_dir():
                return self._error(404, "Entry not found", "EntryNotFound")
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            found = sorted(base.rglob("*") if recursive else base.iterdir())
            out = []
            for p in found:
                rel = str(p.relative_to(commit.folder))
                if p.is_dir():
                    out.append({"type": "directory", "path": rel, "oid": "0" * 40, "size": 0})
                else:
                    data = p.read_bytes()
                    out.append({"type": "file", "path": rel, "size": len(data),
                                "oid": git_blob_sha(data)})
            return self._send(200, out)
        m = re.match(r"^commits/([^/]+)$", rest)
        if method == "GET" and m:
            commit = self._commit_or_404(repo, m.group(1))
            if commit is None:
                return
            history = repo.commits[:repo.commits.index(commit) + 1]
            return self._send(200, [{"id": c.oid, "title": c.title, "message": c.message,
                                     "authors": [{"user": "tester"}], "date": c.date}
                                    for c in reversed(history)])
        m = re.match(r"^preupload/([^/]+)$", rest)
        if method == "POST" and m:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            commit = self._commit_or_404(repo, m.group(1))
            if commit is None:
                return
            files = []
            for f in json.loads(body)["files"]:
                existing = commit.folder / f["path"]
                files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                              "oid": git_blob_sha(existing.read_bytes())
                              if existing.is_file() else None})
            return self._send(200, {"files": files, "commitOid": commit.oid})
        m = re.match(r"^commit/([^/]+)$", rest)
        if method == "POST" and m:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            return self._commit(repo, m.group(1), body)
        self._error(404, f"no route for {method} {repo_type} {rest}")

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        head = self._commit_or_404(repo, revision)
        if head is None:
            return
        header, adds, deletes = {}, {}, set()
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "only base64 file content is supported")
                adds[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                target = head.folder / value["path"]
                if not target.exists():
                    return self._error(404, "A file with this name doesn't exist",
                                       "EntryNotFound")
                deletes.add(value["path"].rstrip("/"))
            else:  # lfsFile, copies: never asked for, since every file is "regular"
                return self._error(400, f"unsupported commit operation {item['key']}")
        with self.hub.lock:
            if header.get("parentCommit") and header["parentCommit"] != repo.commits[-1].oid:
                return self._error(412, "A commit has happened since. Please refresh and try "
                                        "again.")
            commit = self.hub._commit(repo, header.get("summary", ""),
                                      header.get("description", ""), adds, deletes)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._send(200, {"success": True, "commitOid": commit.oid,
                         "commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/"
                                      f"{commit.oid}"})

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str,
                 file: str) -> None:
        head = method == "HEAD"
        repo = self._repo(repo_type, repo_id, head=head)
        if repo is None:
            return
        commit = self._commit_or_404(repo, revision, head=head)
        if commit is None:
            return
        target = commit.folder / file
        if not target.is_file():
            return self._error(404, "Entry not found", "EntryNotFound", head=head)
        data = target.read_bytes()
        self._send(200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha(data)}"',
                               "Content-Type": "application/octet-stream"}, head=head)

    def _validate_yaml(self, data: dict) -> None:
        """The checks of the Hub's model-card metadata validation that our cards rely on."""
        errors = []
        content = data.get("content", "")
        m = re.match(r"^---\n(.*?)\n---", content, re.S)
        meta = {}
        if m:
            try:
                meta = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError as e:
                errors.append(f"invalid YAML: {e}")
        base = meta.get("base_model")
        if base is not None:
            ids = base if isinstance(base, list) else [base]
            for b in ids:
                if not (isinstance(b, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", b)):
                    errors.append(f'"base_model" must be a Hub model id, got {b!r}')
        relation = meta.get("base_model_relation")
        if relation is not None:
            if relation not in BASE_MODEL_RELATIONS:
                errors.append(f'"base_model_relation" must be one of {BASE_MODEL_RELATIONS}')
            if base is None:
                errors.append('"base_model_relation" needs "base_model"')
        for key in ("tags", "datasets"):
            if key in meta and not (isinstance(meta[key], list)
                                    and all(isinstance(t, str) for t in meta[key])):
                errors.append(f'"{key}" must be a list of strings')
        for model in meta.get("model-index") or []:
            if not isinstance(model, dict) or "name" not in model:
                errors.append('"model-index" entries need a "name"')
                continue
            for result in model.get("results", []):
                if "task" not in result or "dataset" not in result or "metrics" not in result:
                    errors.append('"model-index" results need task, dataset and metrics')
                for metric in result.get("metrics", []):
                    if "type" not in metric or "value" not in metric:
                        errors.append('"model-index" metrics need type and value')
        if errors:
            return self._send(400, {"errors": [{"message": e} for e in errors]})
        self._send(200, {"errors": [], "warnings": []})


def start(root: Path, token: str | None = None) -> tuple[FakeHub, ThreadingHTTPServer]:
    hub = FakeHub(root, token)
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server
