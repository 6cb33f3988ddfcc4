"""Appliance state in one embedded SQLite file: deployed models and API keys.

Each call opens a short-lived connection so that the CLI, the supervisor and the
gateway can share the file safely (WAL mode). API keys are stored as SHA-256 digests;
the key itself is shown once, at creation, and never stored or logged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    model       TEXT PRIMARY KEY,
    engine      TEXT NOT NULL,
    plan        TEXT NOT NULL,
    added_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    prefix      TEXT NOT NULL,
    digest      TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
-- A name is taken only while its key is active: revoking frees it for a new key.
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys(name)
    WHERE revoked_at IS NULL;
"""

KEY_PREFIX = "sk-app-"
SCHEMA_VERSION = 1


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a state file written by an older release up to SCHEMA_VERSION."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    row = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'api_keys'").fetchone()
    if row and "UNIQUE," in row[0].replace(" ", "").replace("NOTNULLUNIQUE", "UNIQUE"):
        # 0 -> 1: key names were unique forever; now only among active keys.
        conn.executescript(
            """
            ALTER TABLE api_keys RENAME TO api_keys_v0;
            CREATE TABLE api_keys (
                id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                prefix TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
                created_at REAL NOT NULL, revoked_at REAL
            );
            INSERT INTO api_keys SELECT id, name, prefix, digest, created_at, revoked_at
                FROM api_keys_v0;
            DROP TABLE api_keys_v0;
            """
        )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _state_error(path: Path, exc: Exception) -> ApplianceError:
    """What a person can do about a state file that cannot be read or written."""
    text = str(exc)
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    # SQLite reports a full disk as "database or disk is full", or, when the WAL index
    # cannot grow, as a plain "disk I/O error": the free space tells.
    full = "full" in text or getattr(exc, "errno", None) == errno.ENOSPC
    if full or (free is not None and free < 1024 * 1024):
        left = f"{free} bytes free" if free is not None else "no space"
        hint = (
            f"The disk holding {path.parent} is full ({left}; `df -h {path.parent}`): free "
            "space. Nothing was changed, and the appliance goes on with what it last read."
        )
    elif "locked" in text:
        hint = "Another process holds the state file; try again in a moment."
    else:
        hint = f"Check that {path} is readable and writable by this user."
    return ApplianceError(f"the state file {path} could not be used: {text}", hint=hint)


@dataclass(frozen=True)
class Deployment:
    model: str
    engine: str
    plan: dict[str, Any]
    added_at: float


@dataclass(frozen=True)
class ApiKey:
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            conn = sqlite3.connect(self.path, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise _state_error(self.path, exc) from None
        try:
            if new:
                # Key digests and usage: for the appliance's user only (SQLite gives its
                # -wal and -shm files the same mode).
                self.path.chmod(0o600)
            if not self._ready:
                # Once per process: a reader on a full disk must not need to write.
                conn.execute("PRAGMA journal_mode=WAL")
                _migrate(conn)
                conn.executescript(SCHEMA)
                self._ready = True
            with conn:
                yield conn
        except sqlite3.OperationalError as exc:
            raise _state_error(self.path, exc) from None
        finally:
            conn.close()

    # Deployments: the models the appliance should be serving.

    def add_deployment(self, model: str, engine: str, plan: dict[str, Any]) -> None:
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO deployments(model, engine, plan, added_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(model) DO UPDATE SET engine=excluded.engine, plan=excluded.plan",
                (model, engine, json.dumps(plan, sort_keys=True), time.time()),
            )

    def remove_deployment(self, model: str) -> bool:
        with self._connect() as conn:
            return conn.execute("DELETE FROM deployments WHERE model = ?", (model,)).rowcount > 0

    def deployments(self) -> list[Deployment]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT model, engine, plan, added_at FROM deployments ORDER BY model"
            ).fetchall()
        return [Deployment(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def deployment(self, model: str) -> Deployment | None:
        return next((d for d in self.deployments() if d.model == model), None)

    # API keys.

    def create_key(self, name: str) -> str:
        """Create a key and return it; only its digest is kept."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._connect() as conn:
                conn.execute(
                    "INSERT INTO api_keys(name, prefix, digest, created_at) VALUES (?, ?, ?, ?)",
                    (name, key[: len(KEY_PREFIX) + 4], key_digest(key), time.time()),
                )
        except sqlite3.IntegrityError:
            raise ApplianceError(
                f"an API key named {name!r} already exists",
                hint="Pick another name, or revoke it first with `appliance key revoke NAME`.",
            ) from None
        return key

    def revoke_key(self, name: str) -> bool:
        with self._connect() as conn:
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (time.time(), name),
            )
            return cur.rowcount > 0

    def list_keys(self) -> list[ApiKey]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT name, prefix, created_at, revoked_at FROM api_keys ORDER BY id"
            ).fetchall()
        return [ApiKey(*r) for r in rows]

    def active_key_digests(self) -> dict[str, str]:
        """digest -> key name, for every key that is not revoked."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT digest, name FROM api_keys WHERE revoked_at IS NULL"
            ).fetchall()
        return {digest: name for digest, name in rows}
