"""Appliance state in one embedded SQLite file: deployed models and API keys.

Each call opens a short-lived connection so that the CLI, the supervisor and the
gateway can share the file safely (WAL mode). API keys are stored as SHA-256 digests
with their policy (appliance.keys); the key itself is shown once, at creation or
rotation, and never stored or logged. Every change to keys bumps `keys_version`, which
gateways poll twice a second: a revocation takes effect within a second everywhere.
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
from pathlib import Path
from typing import Any

from appliance.audit import GENESIS, record_hash
from appliance.catalog import ModelEntry
from appliance.control.records import Deployment
from appliance.errors import ApplianceError
from appliance.keys import KEY_PREFIX, KeyPolicy, KeyRecord, validate_key_name
from appliance.planner.plan import Plan

SCHEMA = """
-- One deployment record per model (appliance.control.records.Deployment): the plan and
-- the catalog entry it was made from, as JSON; the engine is the plan's.
CREATE TABLE IF NOT EXISTS deployments (
    model       TEXT PRIMARY KEY,
    plan        TEXT NOT NULL,
    entry       TEXT,
    added_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    prefix      TEXT NOT NULL,
    digest      TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    revoked_at  REAL,
    policy      TEXT NOT NULL DEFAULT '{}',
    rotated_at  REAL
);
CREATE TABLE IF NOT EXISTS meta (
    name        TEXT PRIMARY KEY,
    value       INTEGER NOT NULL
);
-- One row per request (appliance.ledger). `id` is the row's own, so moving a spool
-- file twice (after a crash) adds nothing.
CREATE TABLE IF NOT EXISTS usage (
    id                  TEXT PRIMARY KEY,
    ts                  REAL NOT NULL,
    request_id          TEXT NOT NULL,
    path                TEXT NOT NULL,
    key                 TEXT,
    model               TEXT,
    replica             TEXT,
    client              TEXT,
    stream              INTEGER NOT NULL DEFAULT 0,
    status              INTEGER NOT NULL,
    error               TEXT,
    prompt_tokens       INTEGER,
    completion_tokens   INTEGER,
    ttft_ms             REAL,
    duration_ms         REAL,
    upstream            TEXT,   -- the cloud provider that answered; NULL: a local replica
    upstream_reason     TEXT,   -- why it went there (appliance.burst)
    cost                REAL    -- what the provider charges for it, from [burst] prices
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage(ts);
-- Append-only; each record carries the hash of the one before (appliance.audit).
CREATE TABLE IF NOT EXISTS audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    ts          REAL NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT,
    detail      TEXT NOT NULL,
    source      TEXT,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
-- Prompts and answers, only for keys whose policy sets log_bodies_days; pruned when due.
CREATE TABLE IF NOT EXISTS bodies (
    id          TEXT PRIMARY KEY,
    ts          REAL NOT NULL,
    expires_at  REAL NOT NULL,
    request_id  TEXT NOT NULL,
    key         TEXT NOT NULL,
    model       TEXT,
    request     TEXT NOT NULL,
    response    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_anchor (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    hash        TEXT NOT NULL,
    pruned      INTEGER NOT NULL
);
-- A name is taken only while its key is active: revoking frees it for a new key.
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys(name)
    WHERE revoked_at IS NULL;
"""

SCHEMA_VERSION = 4
# An audit record (appliance.audit.admin_event), written in the same transaction as the
# change it records: the change and its record land together or not at all.
Event = dict[str, Any]


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
    columns = {r[1] for r in conn.execute("PRAGMA table_info(api_keys)").fetchall()}
    if columns and "policy" not in columns:
        # 1 -> 2: keys carry a policy (scope, models, limits, expiry); old keys get the
        # default one, which is what they could do before.
        conn.executescript(
            """
            ALTER TABLE api_keys ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
            ALTER TABLE api_keys ADD COLUMN rotated_at REAL;
            """
        )
    usage = {r[1] for r in conn.execute("PRAGMA table_info(usage)").fetchall()}
    if usage and "upstream" not in usage:
        # 2 -> 3: a request may run at a cloud provider (appliance.burst); rows written
        # before ran locally (NULL) and cost nothing there.
        conn.executescript(
            """
            ALTER TABLE usage ADD COLUMN upstream TEXT;
            ALTER TABLE usage ADD COLUMN upstream_reason TEXT;
            ALTER TABLE usage ADD COLUMN cost REAL;
            """
        )
    deployments = {r[1] for r in conn.execute("PRAGMA table_info(deployments)").fetchall()}
    if deployments and "entry" not in deployments:
        # 3 -> 4: a deployment keeps the catalog entry its plan was made from (rows from
        # before have none: the supervisor uses the catalog's); the engine column, a copy
        # of the plan's engine that nothing read, goes.
        conn.executescript(
            """
            ALTER TABLE deployments ADD COLUMN entry TEXT;
            ALTER TABLE deployments DROP COLUMN engine;
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


def _chain(conn: sqlite3.Connection, events: list[dict[str, Any]]) -> None:
    """Append audit records after the last one, inside the caller's write transaction."""
    row = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        row = conn.execute("SELECT hash FROM audit_anchor").fetchone()
    prev = row[0] if row else GENESIS
    for event in events:
        if conn.execute("SELECT 1 FROM audit WHERE id = ?", (event["id"],)).fetchone():
            continue
        digest = record_hash(prev, event)
        conn.execute(
            "INSERT INTO audit(id, ts, actor, action, target, detail, source, "
            "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event["id"],
                event["ts"],
                event["actor"],
                event["action"],
                event.get("target"),
                json.dumps(event.get("detail") or {}, sort_keys=True),
                event.get("source"),
                prev,
                digest,
            ),
        )
        prev = digest


def _expired(policy: KeyPolicy, now: float) -> bool:
    return policy.expires_at is not None and now >= policy.expires_at


def _no_active_key(name: str) -> ApplianceError:
    return ApplianceError(
        f"no active key named {name!r}", hint="`appliance key list` shows the keys."
    )


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._ready = False
        # Deployment records by their row: the supervisor reads the table every second,
        # and a record is parsed again only when its row changes.
        self._deployments: dict[tuple[str, str, str | None, float], Deployment] = {}

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

    def add_deployment(
        self,
        model: str,
        plan: Plan,
        entry: ModelEntry | None = None,
        audit: Event | None = None,
    ) -> None:
        """Record what `model` should run: `plan`, made from the catalog `entry`."""
        entry_json = entry.model_dump_json() if entry is not None else None
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO deployments(model, plan, entry, added_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(model) DO UPDATE SET plan=excluded.plan, entry=excluded.entry",
                (model, json.dumps(plan.to_dict(), sort_keys=True), entry_json, time.time()),
            )
            _chain(conn, [audit] if audit else [])

    def remove_deployment(self, model: str, audit: Event | None = None) -> bool:
        with self._connect() as conn:
            removed = conn.execute("DELETE FROM deployments WHERE model = ?", (model,)).rowcount
            if removed:
                _chain(conn, [audit] if audit else [])
            return removed > 0

    def deployments(self) -> list[Deployment]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT model, plan, entry, added_at FROM deployments ORDER BY model"
            ).fetchall()
        known, self._deployments = self._deployments, {}
        for row in rows:
            record = known.get(row)
            if record is None:
                record = Deployment.from_row(*row)
            self._deployments[row] = record
        return list(self._deployments.values())

    def deployment(self, model: str) -> Deployment | None:
        return next((d for d in self.deployments() if d.model == model), None)

    # API keys.

    def _bump_keys(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO meta(name, value) VALUES ('keys_version', 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1"
        )

    def create_key(
        self, name: str, policy: KeyPolicy | None = None, audit: Event | None = None
    ) -> str:
        """Create a key and return it; only its digest is kept."""
        validate_key_name(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._connect() as conn:
                conn.execute(
                    "INSERT INTO api_keys(name, prefix, digest, created_at, policy) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        name,
                        key[: len(KEY_PREFIX) + 4],
                        key_digest(key),
                        time.time(),
                        (policy or KeyPolicy()).model_dump_json(exclude_defaults=True),
                    ),
                )
                self._bump_keys(conn)
                _chain(conn, [audit] if audit else [])
        except sqlite3.IntegrityError:
            raise ApplianceError(
                f"an API key named {name!r} already exists",
                hint="Pick another name, or revoke it first with `appliance key revoke NAME`.",
            ) from None
        return key

    def rotate_key(self, name: str, audit: Event | None = None) -> str:
        """A new key for the active key `name`, same policy; the old one stops working."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._connect() as conn:
            cur = conn.execute(
                "UPDATE api_keys SET prefix = ?, digest = ?, rotated_at = ? "
                "WHERE name = ? AND revoked_at IS NULL",
                (key[: len(KEY_PREFIX) + 4], key_digest(key), time.time(), name),
            )
            if cur.rowcount == 0:
                raise _no_active_key(name)
            self._bump_keys(conn)
            _chain(conn, [audit] if audit else [])
        return key

    def revoke_key(self, name: str, audit: Event | None = None) -> bool:
        with self._connect() as conn:
            cur = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (time.time(), name),
            )
            if cur.rowcount:
                self._bump_keys(conn)
                _chain(conn, [audit] if audit else [])
            return cur.rowcount > 0

    def delete_key(self, name: str, force: bool = False, audit: Event | None = None) -> int:
        """Forget every key named `name` that no longer works (all of them with `force`);
        returns how many. Usage records keep the name."""
        now = time.time()
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT id, revoked_at, policy FROM api_keys WHERE name = ?", (name,)
            ).fetchall()
            if not rows:
                raise ApplianceError(
                    f"no API key named {name!r}", hint="`appliance key list` shows the keys."
                )
            live = [
                r[0]
                for r in rows
                if r[1] is None and not _expired(KeyPolicy.model_validate_json(r[2]), now)
            ]
            if live and not force:
                raise ApplianceError(
                    f"the key {name!r} is active; deleting it would cut off whoever uses it",
                    hint=f"Revoke it first (`appliance key revoke {name}`), or delete it at "
                    "once with --force.",
                )
            conn.execute("DELETE FROM api_keys WHERE name = ?", (name,))
            self._bump_keys(conn)
            _chain(conn, [audit] if audit else [])
        return len(rows)

    def key_records(self) -> list[KeyRecord]:
        """Every key, in creation order (active, revoked and expired)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT id, name, prefix, digest, created_at, revoked_at, rotated_at, policy "
                "FROM api_keys ORDER BY id"
            ).fetchall()
        return [
            KeyRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], KeyPolicy.model_validate_json(r[7]))
            for r in rows
        ]

    def keys_version(self) -> int:
        """Changes whenever a key is created, rotated, revoked or deleted."""
        with self._connect() as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()
        return int(row[0]) if row else 0

    def active_key_digests(self) -> dict[str, str]:
        """digest -> key name, for every key that is neither revoked nor expired."""
        now = time.time()
        return {k.digest: k.name for k in self.key_records() if k.state(now) == "active"}

    # The usage ledger (appliance.ledger).

    _USAGE_COLUMNS = (
        "id", "ts", "request_id", "path", "key", "model", "replica", "client", "stream",
        "status", "error", "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms",
        "upstream", "upstream_reason", "cost",
    )  # fmt: skip

    def insert_usage(self, rows: list[dict[str, Any]]) -> None:
        columns = self._USAGE_COLUMNS
        sql = (
            f"INSERT OR IGNORE INTO usage({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)})"
        )
        with self._connect() as conn:
            conn.executemany(sql, [tuple(row.get(c) for c in columns) for row in rows])

    def insert_bodies(self, rows: list[dict[str, Any]]) -> None:
        columns = ("id", "ts", "expires_at", "request_id", "key", "model", "request", "response")
        with self._connect() as conn:
            conn.executemany(
                f"INSERT OR IGNORE INTO bodies({', '.join(columns)}) VALUES "
                f"({', '.join('?' for _ in columns)})",
                [tuple(row.get(c) for c in columns) for row in rows],
            )

    def bodies(self, key: str) -> list[dict[str, Any]]:
        with self._connect() as conn:
            cur = conn.execute(
                "SELECT ts, expires_at, request_id, model, request, response FROM bodies "
                "WHERE key = ? ORDER BY ts",
                (key,),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def usage_rows(self, since: float = 0.0, until: float | None = None) -> list[dict[str, Any]]:
        with self._connect() as conn:
            cur = conn.execute(
                f"SELECT {', '.join(self._USAGE_COLUMNS)} FROM usage "
                "WHERE ts >= ? AND ts < ? ORDER BY ts",
                (since, until if until is not None else float("inf")),
            )
            return [dict(zip(self._USAGE_COLUMNS, row, strict=True)) for row in cur.fetchall()]

    def cloud_spend(self, since: float) -> tuple[float, dict[str, float]]:
        """What cloud providers cost since `since`: in all, and per key name."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT key, SUM(cost) FROM usage WHERE ts >= ? AND upstream IS NOT NULL "
                "AND cost IS NOT NULL GROUP BY key",
                (since,),
            ).fetchall()
        per_key = {str(k): float(c) for k, c in rows if k is not None}
        return float(sum(c for _, c in rows)), per_key

    # The audit log (appliance.audit).

    def append_audit(self, events: list[dict[str, Any]]) -> None:
        """Append records to the chain, in order, in one write transaction (so that two
        writers never chain from the same record). Records already there are skipped."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            _chain(conn, events)

    def last_audit(self, action: str) -> dict[str, Any] | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT detail FROM audit WHERE action = ? ORDER BY seq DESC LIMIT 1", (action,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def audit_records(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self._connect() as conn:
            cur = conn.execute(
                "SELECT seq, id, ts, actor, action, target, detail, source, prev_hash, hash "
                "FROM audit WHERE ts >= ? ORDER BY seq",
                (since,),
            )
            names = [d[0] for d in cur.description]
            records = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        for record in records:
            record["detail"] = json.loads(record["detail"])
        return records

    def audit_anchor(self) -> tuple[str, int]:
        """(the hash the oldest kept record chains from, how many were pruned before it)."""
        with self._connect() as conn:
            row = conn.execute("SELECT hash, pruned FROM audit_anchor").fetchone()
        return (row[0], int(row[1])) if row else (GENESIS, 0)

    def prune(self, usage_before: float, audit_before: float) -> tuple[int, int]:
        """Drop usage rows and audit records older than the given times; the audit chain
        keeps its anchor (the last dropped record's hash). Returns what was dropped."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            usage = conn.execute("DELETE FROM usage WHERE ts < ?", (usage_before,)).rowcount
            conn.execute("DELETE FROM bodies WHERE expires_at < ?", (time.time(),))
            last = conn.execute(
                "SELECT seq, hash FROM audit WHERE ts < ? ORDER BY seq DESC LIMIT 1",
                (audit_before,),
            ).fetchone()
            audit = 0
            if last is not None:
                audit = conn.execute("DELETE FROM audit WHERE seq <= ?", (last[0],)).rowcount
                conn.execute(
                    "INSERT INTO audit_anchor(id, hash, pruned) VALUES (1, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET hash = excluded.hash, "
                    "pruned = pruned + excluded.pruned",
                    (last[1], audit),
                )
        return usage, audit
