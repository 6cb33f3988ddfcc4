"""The audit log: an append-only record of every admin action and every refused request.

Admin actions (keys created, rotated, revoked or deleted; models added or removed; the
appliance started with a configuration) are written by the CLI as they happen; refused
requests (401, 403, 429, ...) come from the gateways through the ledger's spool. Records
hold who (the OS user and host for admin actions, the key's name for requests), what,
when and from where (the SSH client or terminal; the client address) — never a prompt,
an answer or a secret.

Tamper evidence: each record carries the hash of the one before it and its own hash over
both, so changing, removing or reordering any record breaks the chain from there on;
`appliance audit verify` walks it. Pruning old records keeps the hash they chained from
(the anchor), so what remains still verifies.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

GENESIS = "0" * 64
_HASHED = ("id", "ts", "actor", "action", "target", "detail", "source")


def record_hash(prev_hash: str, record: dict[str, Any]) -> str:
    """The hash of one record, chained to the one before it (canonical JSON)."""
    body = {k: record.get(k) for k in ("id", "ts", "actor", "action", "target", "detail", "source")}
    return hashlib.sha256(
        prev_hash.encode() + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def admin_event(
    action: str, target: str | None, detail: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An admin action by whoever runs this command, from wherever they are."""
    user = getpass.getuser()
    if os.environ.get("SUDO_USER"):
        user = f"{os.environ['SUDO_USER']} (as {user})"
    ssh = os.environ.get("SSH_CLIENT", "").split()
    if ssh:
        source = f"ssh from {ssh[0]}"
    else:
        try:
            source = f"terminal {os.ttyname(0)}"
        except OSError:
            source = "no terminal"
    return {
        "id": uuid.uuid4().hex,
        "ts": time.time(),
        "actor": f"{user}@{socket.gethostname()}",
        "action": action,
        "target": target,
        "detail": detail or {},
        "source": source,
    }


@dataclass(frozen=True)
class Verdict:
    records: int
    first_bad: int | None  # seq of the first record that does not verify
    reason: str

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def verify(records: list[dict[str, Any]], anchor: str) -> Verdict:
    """Walk the chain from the anchor; the first record that does not verify, and why."""
    prev = anchor
    for record in records:
        if record["prev_hash"] != prev:
            return Verdict(len(records), record["seq"], "its previous hash does not match")
        if record_hash(prev, record) != record["hash"]:
            return Verdict(len(records), record["seq"], "its content does not match its hash")
        prev = record["hash"]
    return Verdict(len(records), None, "")
