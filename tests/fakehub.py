"""A Hugging Face Hub on 127.0.0.1 for tests, speaking the wire format huggingface_hub uses.

    GET /api/models/{org}/{name}[/revision/{rev}]    {"id", "sha", "siblings": [...]}
    GET /api/models/{org}/{name}/tree/{rev}?recursive=true
        [{"type": "file", "oid", "size", "path", "lfs": {"oid", "size", "pointerSize"}}, ...]
        and {"type": "directory", ...} entries; pages of ``page_size`` linked by
        ``Link: <...>; rel="next"``
    GET|HEAD /{org}/{name}/resolve/{rev}/{path}
        small (git) files: 200 with ETag (git oid) and X-Repo-Commit;
        LFS files: 302 to ``cdn_url``/cdn/... (another origin, as on the real hub) with
        X-Linked-Etag (sha256), X-Linked-Size and X-Repo-Commit
    GET|HEAD /cdn/{org}/{name}/{path}                  LFS bytes, no auth (a signed URL)
    GET|HEAD /static/{dir}/{path}                      a plain directory (``serve_dir``)

File routes honour ``Range: bytes=N-`` (206, Content-Range; 416 past the end). Errors carry
X-Error-Code like the real hub: RepoNotFound (404), RevisionNotFound (404), EntryNotFound
(404), GatedRepo (401 without a token, 403 with a token that has no access); a token the hub
does not know gets 401 "Invalid credentials in Authorization header". Every request is
recorded in ``requests``. Faults for tests, on the GETs of a file's bytes (repo files, and
``static/<dir>`` files): ``cut`` (close the connection part-way through), ``fail`` (answer
an error status) and ``tamper`` (serve different bytes than the listing's checksum).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".model")


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # as sent, query included
    headers: dict[str, str]  # lower-cased names


@dataclass
class _File:
    size: int
    sha256: str
    oid: str  # git blob sha1
    lfs: bool


@dataclass
class _Repo:
    commit: str
    files: dict[str, _File]
    gated: bool


@dataclass
class FakeHub:
    root: Path
    page_size: int = 1000
    lfs_in_tree: bool = True  # False: a mirror whose tree listing lacks LFS checksums
    cdn_url: str = ""  # where LFS redirects point; default: this server as "localhost"
    requests: list[Seen] = field(default_factory=list)
    _repos: dict[str, _Repo] = field(default_factory=dict)
    _tokens: dict[str, set[str]] = field(default_factory=dict)
    _cuts: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _fails: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _dirs: dict[str, Path] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # --- setup -------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> str:
        """Publish ``files`` as ``repo_id``; returns the commit sha."""
        entries = {}
        for path, data in files.items():
            target = self.root / repo_id / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            entries[path] = _File(
                len(data), hashlib.sha256(data).hexdigest(), oid, path.endswith(LFS_SUFFIXES)
            )
        listing = json.dumps(sorted((p, f.oid) for p, f in entries.items())).encode()
        commit = hashlib.sha1(repo_id.encode() + listing).hexdigest()
        self._repos[repo_id] = _Repo(commit, entries, gated)
        return commit

    def grant(self, token: str, *repo_ids: str) -> None:
        """Make ``token`` valid, with access to ``repo_ids`` (gated ones included)."""
        self._tokens.setdefault(token, set()).update(repo_ids)

    def tamper(self, repo_id: str, path: str) -> None:
        """Serve other bytes of the same length; the listing keeps the old checksum."""
        target = self.root / repo_id / path
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))

    def cut(self, repo_id: str, path: str, *, after: int, times: int = 1) -> None:
        """The next ``times`` transfers of ``path`` hang up after sending ``after`` bytes."""
        self._cuts[(repo_id, path)] = [after, times]

    def fail(self, repo_id: str, path: str, *, status: int = 503, times: int = 1) -> None:
        """The next ``times`` GETs of ``path``'s bytes answer ``status``."""
        self._fails[(repo_id, path)] = [status, times]

    def serve_dir(self, name: str, directory: Path) -> str:
        """Serve ``directory`` as a plain file tree; returns its URL."""
        self._dirs[name] = directory
        return f"{self.url}/static/{name}"

    def seen(self, fragment: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if fragment in r.path]

    def file_requests(self) -> list[str]:
        """Repo paths whose bytes were asked for (resolve or CDN)."""
        out = []
        for r in self.seen("/"):
            parts = r.path.split("?")[0].split("/")
            if len(parts) > 4 and parts[3] == "resolve":
                out.append(unquote("/".join(parts[5:])))
            elif len(parts) > 4 and parts[1] == "cdn":
                out.append(unquote("/".join(parts[4:])))
        return out

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- serving -----------------------------------------------------------------------

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            self.requests.append(Seen(handler.command, handler.path, headers))

    def _take(self, faults: dict[tuple[str, str], list[int]], key: Any) -> int | None:
        with self._lock:
            fault = faults.get(key)
            if fault is None or fault[1] <= 0:
                return None
            fault[1] -= 1
            return fault[0]

    def _auth_error(self, repo_id: str, authorization: str | None) -> tuple[int, str, str] | None:
        token = (authorization or "").removeprefix("Bearer ").strip() or None
        if token is not None and token not in self._tokens:
            return 401, "", "Invalid credentials in Authorization header"
        if not self._repos[repo_id].gated or repo_id in self._tokens.get(token or "", set()):
            return None
        message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
        return (403 if token else 401), "GatedRepo", message


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            hub._record(self)
            raw_path, _, query = self.path.partition("?")
            parts = raw_path.split("/")[1:]
            if parts[:2] == ["api", "models"] and len(parts) == 4:
                self._api(f"{parts[2]}/{parts[3]}", "revision", "main", query)
            elif parts[:2] == ["api", "models"] and len(parts) >= 6:
                self._api(f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5]), query)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), parts[4:])
            elif parts[0] == "cdn" and len(parts) >= 4:
                repo_id, path = f"{parts[1]}/{parts[2]}", unquote("/".join(parts[3:]))
                self._file(hub.root / repo_id / path, {}, (repo_id, path))
            elif parts[0] == "static" and len(parts) >= 3 and parts[1] in hub._dirs:
                target = hub._dirs[parts[1]] / unquote("/".join(parts[2:]))
                if target.is_file():
                    self._file(target, {}, (f"static/{parts[1]}", "/".join(parts[2:])))
                else:
                    self._error(404, "EntryNotFound", "Entry not found")
            else:
                self._error(404, "", "Not found")

        def _repo(self, repo_id: str, revision: str) -> _Repo | None:
            repo = hub._repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            denied = hub._auth_error(repo_id, self.headers.get("Authorization"))
            if denied is not None:
                self._error(*denied)
                return None
            if revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                return None
            return repo

        def _api(self, repo_id: str, kind: str, revision: str, query: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if kind == "revision":
                siblings = [{"rfilename": p} for p in sorted(repo.files)]
                self._json({"id": repo_id, "sha": repo.commit, "siblings": siblings})
                return
            entries = _tree(repo, lfs=hub.lfs_in_tree)
            params = parse_qs(query)
            start = int(params.get("cursor", ["0"])[0])
            page = entries[start : start + hub.page_size]
            headers = {}
            if start + hub.page_size < len(entries):
                rev = quote(revision, safe="")
                after = f"recursive=true&expand=false&cursor={start + hub.page_size}"
                nxt = f"{hub.url}/api/models/{repo_id}/tree/{rev}?{after}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            self._json(page, headers)

        def _resolve(self, repo_id: str, revision: str, rest: list[str]) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            path = unquote("/".join(rest))
            entry = repo.files.get(path)
            if entry is None:
                self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
                return
            headers = {"X-Repo-Commit": repo.commit}
            if not entry.lfs:
                headers["ETag"] = f'"{entry.oid}"'
                self._file(hub.root / repo_id / path, headers, (repo_id, path))
                return
            # Another origin, like the real CDN: clients must not send the token there.
            cdn = hub.cdn_url or hub.url.replace("127.0.0.1", "localhost")
            headers |= {
                "Location": f"{cdn}/cdn/{repo_id}/{quote(path)}",
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size),
                "Content-Length": "0",
            }
            self._send(302, headers, b"")

        def _file(
            self, target: Path, headers: dict[str, str], cut_key: tuple[str, str] | None
        ) -> None:
            data = target.read_bytes()
            start, status = 0, 200
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes="):
                first = wanted[6:].split("-", 1)[0]
                start = int(first) if first.isdigit() else 0
                if start >= len(data) and data:
                    self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
                    return
                status = 206
                headers = headers | {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            body = data[start:]
            sending = cut_key is not None and self.command == "GET"
            failure = hub._take(hub._fails, cut_key) if sending else None
            if failure is not None:
                self._error(failure, "", "Service unavailable")
                return
            cut_after = hub._take(hub._cuts, cut_key) if sending else None
            if cut_after is None or cut_after >= len(body):
                self._send(status, headers, body)
                return
            # Promise the whole body, send part of it, hang up: a dropped connection.
            self.close_connection = True
            self._send(status, headers | {"Content-Length": str(len(body))}, b"", end=False)
            self.wfile.write(body[:cut_after])
            self.wfile.flush()

        def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(data).encode()
            self._send(200, {"Content-Type": "application/json"} | (headers or {}), body)

        def _error(self, status: int, code: str, message: str) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, json.dumps({"error": message}).encode())

        def _send(
            self, status: int, headers: dict[str, str], body: bytes, *, end: bool = True
        ) -> None:
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if end and self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _tree(repo: _Repo, *, lfs: bool) -> list[dict[str, Any]]:
    folders = {p.rsplit("/", 1)[0] for p in repo.files if "/" in p}
    entries: list[dict[str, Any]] = [
        {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
        for d in sorted(folders)
    ]
    for path, f in sorted(repo.files.items()):
        entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
        if f.lfs and lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        entries.append(entry)
    return entries
