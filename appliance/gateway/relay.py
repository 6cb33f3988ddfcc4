"""What passes between the engine and the client, read on the way: model names and usage.

An engine may call the model by another name (`ModelRewriter` swaps it back, event by
event). The gateway needs every answer's token usage (the ledger, the tokens-per-minute
bucket), so a stream always asks the engine for it (`stream_options.include_usage`); when
the client did not ask, `StreamTap` takes the usage-only event out before it reaches
the client, which then sees exactly the stream it asked for. Events are passed on whole:
a chunk is cut after its last complete event and the rest waits for the next chunk.
"""

from __future__ import annotations

from typing import Any

import orjson

_USAGE = b'"usage"'
_NO_CHOICES = b'"choices":[]'


class ModelRewriter:
    """Swaps the engine's name for the model with the public one, event by event."""

    def __init__(self, engine_model: str, public: str) -> None:
        self.old = orjson.dumps(engine_model)
        self.new = orjson.dumps(public)
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.pending = data
            return b""
        self.pending = data[cut + 2 :]
        return data[: cut + 2].replace(self.old, self.new)

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest.replace(self.old, self.new)


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The `usage` object of a whole (non-streaming) answer, if it has one."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return usage if isinstance(usage, dict) else None


class StreamTap:
    """Events of one stream on their way to the client: usage kept (and hidden when the
    client did not ask for it), names rewritten when the engine uses another."""

    def __init__(self, rewriter: ModelRewriter | None, hide_usage: bool) -> None:
        self.rewriter = rewriter
        self.hide_usage = hide_usage
        self.usage: dict[str, Any] | None = None
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.pending = data
            return b""
        if cut + 2 == len(data):  # the usual chunk: whole events, nothing to copy
            whole, self.pending = data, b""
        else:
            whole, self.pending = data[: cut + 2], data[cut + 2 :]
        if self.rewriter is not None:
            whole = whole.replace(self.rewriter.old, self.rewriter.new)
        if _USAGE in whole:
            whole = self._take_usage(whole)
        return whole

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        if self.rewriter is not None:
            rest = rest.replace(self.rewriter.old, self.rewriter.new)
        return self._take_usage(rest) if _USAGE in rest else rest

    def _take_usage(self, events: bytes) -> bytes:
        kept = []
        for event in events.split(b"\n\n"):
            if _USAGE in event and event.startswith(b"data:"):
                try:
                    payload = orjson.loads(event[5:])
                except orjson.JSONDecodeError:
                    kept.append(event)
                    continue
                usage = payload.get("usage") if isinstance(payload, dict) else None
                if isinstance(usage, dict):
                    self.usage = usage
                    if self.hide_usage and _NO_CHOICES in event:
                        continue
            kept.append(event)
        return b"\n\n".join(kept)
