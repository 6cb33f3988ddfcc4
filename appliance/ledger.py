"""The usage ledger and the refusals the audit log keeps, written by the gateway.

One row per request: when, which key, which model, where it ran (a replica, or a cloud
provider with the reason and the cost), tokens in and out, time to first token,
duration, status and request id. Each gateway process appends its rows as
JSON lines to a spool file of its own, one write(2) per row, *before* the last byte of the
answer goes to the client: a gateway killed at any point has every answered request's row
in the kernel's hands. A thread moves the spool into `state.db` about once a second, in
one transaction per batch, keyed by each row's own id (so a move repeated after a crash
adds nothing), and takes over the spool files of processes that died. When a row cannot
be written (a full disk) it waits in memory (up to `BACKLOG_MAX`) and is written later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from appliance.control.runtime import pid_alive

log = logging.getLogger("appliance.ledger")

BACKLOG_MAX = 100_000
Kind = Literal["usage", "refusal"]


@dataclass
class UsageRow:
    """One request, as the ledger keeps it (filled in as the request goes)."""

    request_id: str
    path: str
    ts: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    key: str | None = None
    model: str | None = None
    replica: str | None = None
    client: str | None = None
    stream: bool = False
    status: int = 0
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    upstream: str | None = None  # the cloud provider that answered; None: local
    upstream_reason: str | None = None
    cost: float | None = None  # the provider's price for it (appliance.burst)

    def to_json(self) -> bytes:
        # orjson serializes the dataclass natively (under 1 us; `asdict` took 15-20 us of
        # every request); the kind goes in front of its fields.
        return b'{"kind":"usage",' + orjson.dumps(self)[1:]


def refusal_line(
    actor: str, action: str, target: str | None, detail: dict[str, Any], source: str | None
) -> bytes:
    """A refused request, for the audit log (it goes through the spool like usage)."""
    return orjson.dumps(
        {
            "kind": "refusal",
            "id": uuid.uuid4().hex,
            "ts": time.time(),
            "actor": actor,
            "action": action,
            "target": target,
            "detail": detail,
            "source": source,
        }
    )


class Spool:
    """This process's spool file: rows appended now, moved into state.db later."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque(maxlen=BACKLOG_MAX)
        self._fd: int | None = None
        self._seq = 0

    @property
    def current(self) -> Path:
        return self.directory / f"{self.name}-{os.getpid()}.jsonl"

    def write(self, line: bytes) -> None:
        """Append one JSON line; never raises (a failed write waits in the backlog)."""
        with self._lock:
            self._backlog.append(line + b"\n")
            try:
                if self._fd is None:
                    self._fd = os.open(self.current, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                while self._backlog:
                    os.write(self._fd, self._backlog[0])
                    self._backlog.popleft()
            except OSError:
                self._close()

    def seal(self) -> Path | None:
        """Close the current file for moving (a new one is started at the next write)."""
        with self._lock:
            if self._fd is None:
                return None
            self._close()
            self._seq += 1
            sealed = self.current.with_suffix(f".{self._seq}.ready")
            try:
                os.replace(self.current, sealed)
            except FileNotFoundError:
                return None
            return sealed

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _owner_pid(path: Path) -> int | None:
    stem = path.name.split(".", 1)[0]
    pid = stem.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None


def body_line(row: UsageRow, days: int, request: bytes, response: bytes) -> bytes:
    """A prompt and its answer, for a key that keeps them (`log_bodies_days`)."""
    return orjson.dumps(
        {
            "kind": "body",
            "id": row.id,
            "ts": row.ts,
            "expires_at": row.ts + days * 86400,
            "request_id": row.request_id,
            "key": row.key,
            "model": row.model,
            "request": request.decode(errors="replace"),
            "response": response.decode(errors="replace"),
        }
    )


def read_spool_file(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The rows of one spool file by kind (usage, refusal, body); a torn last line (a kill
    mid-write) is skipped: that request was not answered yet."""
    kinds: dict[str, list[dict[str, Any]]] = {"usage": [], "refusal": [], "body": []}
    for line in path.read_bytes().splitlines():
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        kinds.get(row.pop("kind", "usage"), kinds["usage"]).append(row)
    return kinds


class Mover:
    """Moves spool files into state.db, in a thread of the process that owns the spool."""

    def __init__(self, spool: Spool, store: Any, interval_s: float = 1.0) -> None:
        self.spool = spool
        self.store = store  # appliance.state.State: insert_usage, append_audit
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-mover", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.move_once()  # what the last second wrote

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.move_once()

    def move_once(self) -> int:
        """Move every file that is ready (ours, and those of dead processes); rows moved."""
        self.spool.seal()
        moved = 0
        for path in sorted(self.spool.directory.glob("*.jsonl")) + sorted(
            self.spool.directory.glob("*.ready")
        ):
            owner = _owner_pid(path)
            if path.suffix == ".jsonl" and owner is not None and pid_alive(owner):
                continue  # a live process is still writing it
            try:
                rows = read_spool_file(path)
            except FileNotFoundError:
                continue  # another gateway process moved it first
            try:
                if rows["usage"]:
                    self.store.insert_usage(rows["usage"])
                if rows["refusal"]:
                    self.store.append_audit(rows["refusal"])
                if rows["body"]:
                    self.store.insert_bodies(rows["body"])
            except Exception as exc:  # a full disk, a locked file: the file waits
                log.warning("ledger: could not move %s yet: %r", path.name, exc)
                break
            path.unlink(missing_ok=True)
            moved += sum(len(v) for v in rows.values())
        return moved
