"""The gateway's HTTP/1.1 client for its engines: keep-alive connections on plain asyncio
protocols, responses parsed by httptools (llhttp, the parser uvicorn serves with).

Why not aiohttp's client: a stream is 10^2-10^4 small chunks, and aiohttp spends per chunk
a StreamReader feed, a flow-control check, a timer reschedule and a future for the
reading task; per request, a ClientRequest, its headers multidict and a connector lookup.
Here a chunk is one parser callback appending to a list and waking one future; a request
is one `write` of bytes built with one format, and the silence timer is re-armed only when
it fires (benchmarks/gateway_overhead.py measures the gateway's CPU per chunk).

The engines are ours: HTTP/1.1 over TCP (TLS if the URL says https), JSON bodies, answers
with Content-Length, chunked or read to close. What can go wrong, drawn as exceptions:

    UpstreamError         the connection broke or the answer is not HTTP (the engine may
    |                     have seen the request: not retried on another replica)
    +-- ConnectFailed     no connection was made (nothing reached the engine)
    TimeoutError          no byte for `read_timeout_s` (silence, not a whole-answer limit)

A pooled connection that the engine closed while it sat idle fails before any byte of an
answer; that request is sent once more on a new connection (the engine never saw it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

log = logging.getLogger("appliance.gateway")

# Body bytes read from the engine but not yet passed on; above it, reading pauses (a slow
# client must not make the gateway hold a whole long answer).
HIGH_WATER = 1 << 20


class UpstreamError(Exception):
    """The engine's connection broke, or what came back is not HTTP."""


class ConnectFailed(UpstreamError):
    """No connection to the engine: the request reached nothing."""


@functools.lru_cache(maxsize=1024)
def _endpoint(url: str) -> tuple[str, int, bool, bytes]:
    """host, port, TLS and the Host header's bytes of an engine's base URL."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectFailed(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if tls else 80)
    return parts.hostname, port, tls, parts.netloc.encode("idna")


class _Connection(asyncio.Protocol):
    """One TCP connection to an engine, carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.body: list[bytes] = []
        self.size = 0
        self.got_bytes = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self._framed = False  # Content-Length or chunked: the answer ends without a close

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_data = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the engine switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the engine's answer is not HTTP/1.1: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and not self._framed:
            self.complete = True  # an answer read to close is whole at the close
            self._wake()
        elif not self.complete:
            why = f": {exc!r}" if exc is not None else ""
            self._fail(UpstreamError(f"the engine closed the connection{why}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key in ("content-length", "transfer-encoding"):
            self._framed = True
        self.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self.headers = {}
            self._framed = False
            return
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.size += len(body)
        if self.size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:
            return  # the end of an interim answer
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # Waiting, for the EngineResponse.

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    async def wait(self, timeout_s: float) -> None:
        """Until the parser has something new (headers, body, the end) or it fails."""
        if self.error is not None:
            raise self.error
        self.waiter = self.loop.create_future()
        if self.timer is None:
            self.timer = self.loop.call_later(timeout_s, self._silence, timeout_s)
        await self.waiter

    def _silence(self, timeout_s: float) -> None:
        """The silence timer: re-armed from the last byte, rather than on every byte."""
        quiet = time.monotonic() - self.last_data
        if quiet < timeout_s:
            self.timer = self.loop.call_later(timeout_s - quiet, self._silence, timeout_s)
            return
        self.timer = None
        self._fail(TimeoutError(f"the engine sent nothing for {timeout_s:g} s"))

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.last_data = time.monotonic()
        self.transport.write(request)

    def take(self) -> bytes:
        """The body bytes read so far, and reading resumed if it was paused."""
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.size = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


class EngineResponse:
    """An engine's answer: status and headers in hand, the body read as it comes."""

    __slots__ = ("_conn", "_key", "_pool", "headers", "status")

    def __init__(self, pool: EnginePool, key: tuple[str, int, bool], conn: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    async def readany(self) -> bytes:
        """The body bytes that came since the last call; b"" once the answer is whole."""
        conn = self._conn
        while not conn.body:
            if conn.complete:
                return b""
            await conn.wait(self._pool.read_timeout_s)
        return conn.take()

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        while not conn.complete:
            await conn.wait(self._pool.read_timeout_s)
        return conn.take()

    def release(self) -> None:
        """Done with it: a whole answer on a keep-alive connection goes back to the pool."""
        conn = self._conn
        conn.stop_timer()
        if conn.complete and conn.keep_alive and not conn.closed and not conn.body:
            self._pool._put(self._key, conn)
        else:
            self.close()

    def close(self) -> None:
        """Drop the connection (what tells an engine to stop generating)."""
        conn = self._conn
        conn.stop_timer()
        if conn.transport is not None:
            conn.transport.close()


class EnginePool:
    """Keep-alive connections to the engines, by host and port."""

    def __init__(
        self, connect_timeout_s: float, read_timeout_s: float, keepalive_s: float = 4.0
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        # Below the engines' own keep-alive (uvicorn's default is 5 s), so a pooled
        # connection is rarely one the engine is about to close.
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(
        self, url: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> EngineResponse:
        """POST `body` to `url` + `path`; the answer once its headers are in."""
        host, port, tls, host_header = _endpoint(url)
        key = (host, port, tls)
        lines = [
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n"
            % (path.encode(), host_header, len(body))
        ]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} holds a line break")
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        lines.append(b"\r\n")
        lines.append(body)
        request = b"".join(lines)
        for _ in range(2):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port, tls)
            conn.send(request)
            try:
                while not conn.headers_done:
                    await conn.wait(self.read_timeout_s)
            except UpstreamError:
                if conn.transport is not None:
                    conn.transport.close()
                if reused and not conn.got_bytes:
                    log.info("engine %s had closed a pooled connection; retrying", url)
                    continue
                raise
            except BaseException:
                conn.stop_timer()
                if conn.transport is not None:
                    conn.transport.close()
                raise
            return EngineResponse(self, key, conn)
        raise UpstreamError("the engine closed two connections in a row before answering")

    def _take(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.closed or now - conn.idle_since >= self.keepalive_s:
                if conn.transport is not None:
                    conn.transport.close()
                continue
            conn._reset()
            return conn
        return None

    def _put(self, key: tuple[str, int, bool], conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(key, [])
        if idle and (idle[0].closed or conn.idle_since - idle[0].idle_since >= self.keepalive_s):
            self._idle[key] = idle = [c for c in idle if not c.closed]  # prune the dead
        idle.append(conn)

    async def _connect(self, host: str, port: int, tls: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            context = self._tls
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if tls else None,
                ),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise ConnectFailed(
                f"no connection to {host}:{port} within {self.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, no such host, TLS handshake
            raise ConnectFailed(f"no connection to {host}:{port}: {exc}") from None
        return conn

    def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
