"""A local stand-in for the Hugging Face Hub's HTTP API: what ``create_repo`` and ``upload_folder`` call.

``HubStandIn`` serves on 127.0.0.1 in a thread and records every request (method, path, query, headers, body).
Point huggingface_hub at it with ``HF_ENDPOINT=stand_in.url`` in the environment of a process that has not imported
huggingface_hub yet (it reads the variable at import), and ``HF_HUB_DISABLE_XET=1``: the stand-in speaks the
LFS protocol, not Xet's (hf_xet's chunk store is a protocol of its own).

Routes (read from huggingface_hub's hf_api.py, _commit_api.py and lfs.py):

- ``POST /api/repos/create``: a model repo under ``organization`` or the token's user; 409 when it exists.
- ``GET /api/whoami-v2``, ``GET /api/models/{repo}[/revision/{rev}]``: the user, the repo.
- ``POST /api/validate-yaml``: the README front matter; like the Hub, a ``base_model`` that is not a repo id is
  an error (the Hub refuses such a card).
- ``POST /api/models/{repo}/preupload/{rev}``: each file's upload mode, ``lfs`` as the Hub decides it: a name the
  Hub's default ``.gitattributes`` tracks, 10 MB or more, or a binary sample (a NUL byte).
- ``POST /{repo}.git/info/lfs/objects/batch`` then ``PUT /lfs-upload/{oid}`` (the "storage" URL, sent without
  the Hub's headers, as S3 is) and ``POST /{repo}.git/info/lfs/objects/verify``: the large files; the PUT's sha256
  must be the oid.
- ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (header, ``file`` with base64 content, ``lfsFile``
  naming an uploaded oid); ``fail_commits`` answers that many commits with 500 first.

Every route but the storage PUT (and ``GET /api/agent-harnesses``, a registry huggingface_hub fetches without
credentials to name the AI agent it runs under) needs ``Authorization: Bearer <token>``; anything else is answered
404 and kept in ``unknown``. Test-only code: bodies are kept in memory.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

USER = "me"
LARGE_FILE_BYTES = 10 * 1024 * 1024
# The patterns of the .gitattributes the Hub puts in a new model repo (all tracked by LFS).
GITATTRIBUTES_LFS = ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
                     "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
                     "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
                     "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int = 0


@dataclass
class Committed:
    """One file of a commit: ``regular`` with its bytes, or ``lfs`` with its oid and size."""

    mode: str
    size: int
    content: bytes | None = None
    oid: str | None = None


@dataclass
class Commit:
    repo: str
    summary: str
    files: dict[str, Committed]
    oid: str


@dataclass
class Repo:
    repo_id: str
    commits: list[Commit] = field(default_factory=list)


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """``lfs`` or ``regular``, as the Hub answers a preupload (see the module docstring)."""
    name = path.rsplit("/", 1)[-1]
    tracked = any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(path, pattern) for pattern in GITATTRIBUTES_LFS)
    return "lfs" if tracked or size >= LARGE_FILE_BYTES or b"\0" in sample else "regular"


class HubStandIn:
    """The stand-in server; a context manager (``with HubStandIn(token) as hub:``)."""

    def __init__(self, token: str):
        self.token = token
        self.requests: list[Recorded] = []
        self.unknown: list[Recorded] = []
        self.errors: list[str] = []  # the stand-in's own failures (a bug here, not in the client)
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, int] = {}  # LFS oid -> size, once its PUT checked out
        self.fail_commits = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str) -> dict[str, Committed]:
        """The repo's files after all its commits."""
        merged: dict[str, Committed] = {}
        for commit in self.repos[repo_id].commits:
            merged.update(commit.files)
        return merged

    # ------------------------------------------------------------------ routes

    def route(self, request: Recorded) -> tuple[int, dict, dict[str, str]]:
        """(status, JSON answer, extra headers) for a request."""
        method, path = request.method, request.path
        upload = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if method == "PUT" and upload:
            return self._store_object(upload.group(1), request.body)
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's unauthenticated telemetry
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        routes = [
            ("POST", r"/api/repos/create", self._create),
            ("GET", r"/api/whoami-v2", lambda r: (200, {"name": USER, "type": "user", "orgs": []}, {})),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>.+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>.+)/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("POST", r"/(?P<repo>.+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", r"/(?P<repo>.+)\.git/info/lfs/objects/verify", self._lfs_verify),
        ]
        for route_method, pattern, answer in routes:
            match = re.fullmatch(pattern, path)
            if method == route_method and match:
                return answer(request, **match.groupdict()) if match.groupdict() else answer(request)
        with self._lock:
            self.unknown.append(request)
        return 404, {"error": f"stand-in: no route for {method} {path}"}, {}

    def _repo(self, repo: str) -> Repo | None:
        return self.repos.get(repo)

    def _missing(self, repo: str) -> tuple[int, dict, dict[str, str]]:
        return 404, {"error": f"Repository Not Found for url: {repo}"}, {"X-Error-Code": "RepoNotFound"}

    def _create(self, request: Recorded) -> tuple[int, dict, dict[str, str]]:
        payload = json.loads(request.body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            self.repos[repo_id] = Repo(repo_id)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, request: Recorded) -> tuple[int, dict, dict[str, str]]:
        content = json.loads(request.body)["content"]
        parts = content.split("---", 2)
        try:
            meta = yaml.safe_load(parts[1]) if content.startswith("---") and len(parts) == 3 else {}
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, {}
        errors = []
        base = (meta or {}).get("base_model")
        for value in base if isinstance(base, list) else [base] if base is not None else []:
            if not isinstance(value, str) or not _REPO_ID.match(value):
                errors.append({"message": f'"base_model" with value "{value}" is not valid. Use a model id from '
                                          "https://hf.co/models."})
        return (400 if errors else 200), {"errors": errors, "warnings": []}, {}

    def _preupload(self, request: Recorded, repo: str, rev: str) -> tuple[int, dict, dict[str, str]]:
        if self._repo(repo) is None:
            return self._missing(repo)
        files = []
        for entry in json.loads(request.body)["files"]:
            sample = base64.b64decode(entry["sample"])
            files.append({"path": entry["path"], "uploadMode": upload_mode(entry["path"], entry["size"], sample),
                          "shouldIgnore": False, "oid": None})
        return 200, {"files": files, "commitOid": "0" * 40}, {}

    def _lfs_batch(self, request: Recorded, repo: str) -> tuple[int, dict, dict[str, str]]:
        if self._repo(repo) is None:
            return self._missing(repo)
        objects = []
        for item in json.loads(request.body)["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.objects:
                answer["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}"},
                                     "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify",
                                                "header": {}}}
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _store_object(self, oid: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "stand-in: the uploaded bytes do not hash to the oid"}, {}
        with self._lock:
            self.objects[oid] = len(body)
        return 200, {}, {"ETag": f'"{oid[:32]}"'}

    def _lfs_verify(self, request: Recorded, repo: str) -> tuple[int, dict, dict[str, str]]:
        item = json.loads(request.body)
        if self.objects.get(item["oid"]) != item["size"]:
            return 404, {"error": "stand-in: object not uploaded"}, {}
        return 200, {}, {}

    def _commit(self, request: Recorded, repo: str, rev: str) -> tuple[int, dict, dict[str, str]]:
        if self._repo(repo) is None:
            return self._missing(repo)
        with self._lock:
            if self.fail_commits > 0:
                self.fail_commits -= 1
                return 500, {"error": "stand-in: the commit failed (injected)"}, {}
        summary, files = "", {}
        for line in request.body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = Committed("regular", len(content), content=content)
            elif item["key"] == "lfsFile":
                size = self.objects.get(value["oid"])
                if size is None or value.get("size", size) != size:
                    return 422, {"error": f"stand-in: {value['path']}: LFS object {value['oid']} was not uploaded"}, {}
                files[value["path"]] = Committed("lfs", self.objects[value["oid"]], oid=value["oid"])
            else:
                return 400, {"error": f"stand-in: unexpected commit line {item['key']!r}"}, {}
        oid = hashlib.sha1(request.body).hexdigest()
        with self._lock:
            self.repos[repo].commits.append(Commit(repo, summary, files, oid))
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}, {}

    def _info(self, request: Recorded, repo: str, rev: str | None = None) -> tuple[int, dict, dict[str, str]]:
        found = self._repo(repo)
        if found is None:
            return self._missing(repo)
        sha = found.commits[-1].oid if found.commits else "0" * 40
        siblings = [{"rfilename": name} for name in (self.files(repo) if found.commits else {})]
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings}, {}


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            request = Recorded(self.command, parts.path, parse_qs(parts.query),
                               {name.lower(): value for name, value in self.headers.items()}, _read_body(self))
            try:
                status, answer, headers = hub.route(request)
            except Exception as error:  # a stand-in bug: answer, and keep it for the test to see
                hub.errors.append(f"{request.method} {request.path}: {type(error).__name__}: {error}")
                status, answer, headers = 500, {"error": f"stand-in failure: {error}"}, {}
            request.status = status
            with hub._lock:
                hub.requests.append(request)
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    return Handler
