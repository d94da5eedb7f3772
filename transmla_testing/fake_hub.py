"""A local stand-in for the part of the Hugging Face Hub API that ``HfApi.create_repo`` and
``HfApi.upload_folder`` (huggingface_hub 2.x, Xet disabled) talk to, so the upload path runs for
real over HTTP on 127.0.0.1 with no network.

Routes (what the client sends, in order, for one ``upload_folder``):

* ``POST /api/repos/create``                        -> ``{"url": ...}`` or 409 when it exists
* ``POST /api/models/{repo}/branch/{branch}``       -> create a branch (``--revision``)
* ``POST /api/validate-yaml``                       -> README.md metadata check
* ``POST /api/models/{repo}/preupload/{rev}``       -> per file: "regular" or "lfs"
* ``POST /{repo}.git/info/lfs/objects/batch``       -> an upload href per LFS object
* ``PUT  /lfs-put/{secret}/{oid}``                  -> the bytes (checked against the sha256)
* ``POST /{repo}.git/info/lfs/objects/verify``      -> 200 when the object arrived
* ``POST /api/models/{repo}/commit/{rev}``          -> ndjson commit: files land in the branch
* ``GET  /api/models/{repo}[/revision/{rev}]``      -> minimal repo info

Every ``/api`` and LFS-batch call must carry ``Authorization: Bearer <token>``; the PUT href is
pre-signed (a secret in the path), as S3 URLs are. ``fail`` maps a route name to an HTTP status
the server answers instead, to inject errors mid-upload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from transmla_vllm.checkpoint_format import CONFIG_FILE

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$")),
    ("POST", "branch", re.compile(rf"^/api/models/{REPO}/branch/(?P<rev>[^/]+)$")),
    ("GET", "info", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("POST", "lfs_batch", re.compile(rf"^/{REPO}\.git/info/lfs/objects/batch$")),
    ("POST", "lfs_verify", re.compile(rf"^/{REPO}\.git/info/lfs/objects/verify$")),
    ("PUT", "lfs_put", re.compile(r"^/lfs-put/(?P<secret>\w+)/(?P<oid>[0-9a-f]{64})$")),
]
# Files the real Hub stores in LFS through its default .gitattributes (abridged) or by size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model", ".gguf", ".msgpack", ".h5")
LFS_MIN_SIZE = 10 * 1024 * 1024
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
RELATIONS = ("adapter", "merge", "quantized", "finetune")


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """Run as a context manager; ``url`` is the endpoint to give ``HfApi`` / ``HF_ENDPOINT``."""

    def __init__(self, token: str = "hf_fake_write_token", user: str = "user") -> None:
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.fail: dict[str, int] = {}
        self.put_secret = secrets.token_hex(8)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """What a download of ``repo_id`` at ``branch`` would give (LFS pointers resolved)."""
        return dict(self.repos[repo_id].branches[branch])

    def routes_called(self) -> list[str]:
        return [name for _, name in self.requests]

    # --- route handlers: (body, match) -> (status, json) ------------------------------------

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def _branch(self, repo_id: str, rev: str) -> dict[str, bytes]:
        repo = self._repo(repo_id)
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.branches[rev]

    def create(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)}

    def validate_yaml(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if not match:
            return 200, {"warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            meta = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}]}
        errors = []
        bases = meta.get("base_model")
        for base in [bases] if isinstance(bases, str) else bases or []:
            if not HUB_ID.match(str(base)):  # as the Hub: a local path is not a model id
                errors.append({"message": f'"base_model" with value "{base}" is not valid'})
        if meta.get("base_model_relation") not in (None, *RELATIONS):
            errors.append({"message": '"base_model_relation" must be one of ' + str(RELATIONS)})
        return (400, {"errors": errors}) if errors else (200, {"warnings": []})

    def preupload(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        branch = self._branch(m["repo"], unquote(m["rev"]))
        out = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\x00" in sample
            old = branch.get(f["path"])
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": None if old is None else _oid(old, lfs),
                }
            )
        return 200, {"files": out, "commitOid": secrets.token_hex(20)}

    def lfs_batch(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        self._repo(m["repo"])
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-put/{self.put_secret}/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{m['repo']}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        if m["secret"] != self.put_secret:
            raise HubError(403, "bad signature")
        if hashlib.sha256(body).hexdigest() != m["oid"]:
            raise HubError(400, "content does not match its sha256")
        self.lfs[m["oid"]] = body
        return 200, {}

    def lfs_verify(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        obj = json.loads(body)
        if obj["oid"] not in self.lfs or len(self.lfs[obj["oid"]]) != obj["size"]:
            raise HubError(404, "object not found")
        return 200, {}

    def commit(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        repo_id, rev = m["repo"], unquote(m["rev"])
        branch = self._branch(repo_id, rev)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "commit payload must start with a header")
        staged = dict(branch)
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                staged[value["path"]] = self.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                staged.pop(value["path"], None)
            else:
                raise HubError(400, f"unsupported commit operation {item['key']}")
        oid = hashlib.sha1(body).hexdigest()
        branch.clear()
        branch.update(staged)  # all or nothing, as a git commit
        self.repos[repo_id].commits.append({"oid": oid, "branch": rev, **lines[0]["value"]})
        return 200, {
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "success": True,
        }

    def branch(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        repo = self._repo(m["repo"])
        name = unquote(m["rev"])
        if name in repo.branches:
            return 409, {"error": f"Reference already exists: {name}"}
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        repo.branches[name] = dict(repo.branches[start])
        return 200, {}

    def info(self, body: bytes, m: re.Match[str]) -> tuple[int, Any]:
        repo = self._repo(m["repo"])
        rev = unquote(m["rev"] or "main")
        files = self._branch(m["repo"], rev)
        commits = [c["oid"] for c in repo.commits if c["branch"] == rev]
        return 200, {
            "id": m["repo"],
            "modelId": m["repo"],
            "private": repo.private,
            "sha": commits[-1] if commits else "0" * 40,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }


def _oid(content: bytes, lfs: bool) -> str:
    """The oid the Hub reports for a stored file: sha256 for LFS, the git blob sha1 otherwise
    (what the client compares to skip unchanged files)."""
    if lfs:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        body = self._body()  # always drain it, so the kept-alive connection stays in sync
        path = urlsplit(self.path).path
        found = next(
            (
                (name, m)
                for verb, name, pattern in ROUTES
                if verb == method and (m := pattern.match(path))
            ),
            None,
        )
        if found is None:
            self._send(404, {"error": f"no route {method} {path}"})
            return
        name, m = found
        with hub.lock:
            hub.requests.append((method, name))
            if name != "lfs_put":
                auth = self.headers.get("Authorization", "")
                hub.auth_headers.append(auth)
                if auth != f"Bearer {hub.token}":
                    self._send(
                        401,
                        {"error": "Invalid credentials in Authorization header"},
                        {"X-Error-Message": "Invalid credentials in Authorization header"},
                    )
                    return
            if name in hub.fail:
                status = hub.fail[name]
                self._send(status, {"error": f"injected failure on {name}"})
                return
            try:
                status, payload = getattr(hub, name)(body, m)
            except HubError as exc:
                headers = {"X-Error-Message": exc.message}
                if exc.code:
                    headers["X-Error-Code"] = exc.code
                self._send(exc.status, {"error": exc.message}, headers)
                return
        self._send(status, payload)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")


SOURCE_HUB_ID = "acme/tiny-qwen"
SOURCE_LICENSE = {
    "license": "other",
    "license_name": "tiny-licence",
    "license_link": "https://example.com/tiny-licence",
}


def tiny_checkpoint(root: Path, calib: Path) -> tuple[Path, Path]:
    """(source, converted) for the hub tests, made once per ``root`` (both test modules pass the
    session's base temp folder). The source is an untied Qwen2 (q / kv_a biases, lm_head) laid
    out as a huggingface_hub cache snapshot of ``acme/tiny-qwen`` with a licensed card, and the
    output is sharded so the index is exercised."""
    from converter.conversion.pipeline import ConvertOptions, convert
    from transmla_testing.models import make_model

    owner, name = SOURCE_HUB_ID.split("/")
    src = root / "hub-cache" / f"models--{owner}--{name}" / "snapshots" / ("0" * 40)
    dst = root / "hub-mla"
    if (dst / CONFIG_FILE).is_file():
        return src, dst
    make_model(src, "qwen2", tied=False, seed=3)
    meta = "".join(f"{k}: {v}\n" for k, v in SOURCE_LICENSE.items())
    (src / "README.md").write_text(f"---\n{meta}tags:\n- tiny\n---\n# tiny qwen\n")
    convert(
        ConvertOptions(
            src=str(src),
            dst=str(dst),
            rope_dim=8,
            kv_lora_rank=24,
            calib_text=str(calib),
            calib_samples=4,
            calib_seqlen=32,
            max_shard_size="60KB",
        )
    )
    return src, dst


def folder_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """(sha256, mtime) of every file under ``folder`` by relative path: equal digests mean
    nothing was added, removed, changed or even rewritten."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
