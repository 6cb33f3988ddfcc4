"""The access log: one JSON line per request, `<home>/logs/access.log`, rotated by size.

Written when the request's ledger row is complete (`Gateway._emit`), from that row, by
every gateway worker into the one file (`SharedRotatingFile`). A line says who (the key's
name, the client's address), what (path, model, whether streamed), where it ran (replica,
upstream), how it ended (status, error code) and how long it took (time to first token and
in all, in milliseconds), and the tokens; never the key itself, never a prompt or an
answer. `time` is the request's arrival, UTC.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from appliance.ledger import UsageRow
from appliance.logs import SharedRotatingFile


def access_time(ts: float) -> str:
    """2026-12-02T06:01:45.123Z"""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class AccessLog:
    def __init__(self, path: Path) -> None:
        self.file = SharedRotatingFile(path)

    def write(self, row: UsageRow, upstream: str) -> None:
        self.file.write(
            orjson.dumps(
                {
                    "time": access_time(row.ts),
                    "request_id": row.request_id,
                    "key": row.key,
                    "client": row.client,
                    "path": row.path,
                    "model": row.model,
                    "stream": row.stream,
                    "replica": row.replica,
                    "upstream": upstream,
                    "status": row.status,
                    "error": row.error,
                    "prompt_tokens": row.prompt_tokens,
                    "completion_tokens": row.completion_tokens,
                    "ttft_ms": row.ttft_ms,
                    "duration_ms": row.duration_ms,
                }
            )
            + b"\n"
        )

    def close(self) -> None:
        self.file.close()
