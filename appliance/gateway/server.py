"""The gateway's HTTP front: uvicorn, with reads bounded before the app sees a request.

uvicorn alone bounds neither how long a client may take to send its request line and
headers (a slowloris client holds a connection forever by trickling bytes), nor how big
they may be, nor how many connections anyone may hold. A small subclass of uvicorn's
httptools protocol adds, per connection:

- a header deadline: the request line and headers must be complete `header_timeout_s`
  after connecting, or after the first byte of the next request on a kept-alive
  connection (between requests uvicorn's keep-alive timeout applies); then 408 and close;
- a cap on request line plus headers: 431;
- caps on open connections, in all and per client address: 503 with Retry-After, sent
  once the refused client's headers are in (answering before it has written its request
  would make its kernel see a reset instead of the answer).

Bodies are bounded in the app (size and time), where the answer is an OpenAI envelope
like every other. The listening socket is bound here, not inside uvicorn, so that the
address really bound is known (and reported) and "address in use" is a clear error.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from appliance.config import GatewayLimits
from appliance.errors import ConfigError
from appliance.gateway.replicas import LocalCounts

log = logging.getLogger("appliance.gateway")

# A refused connection gets this long to send its headers and read the 503.
REFUSED_GRACE_S = 2.0


def raw_error(
    status: int,
    message: str,
    code: str,
    *,
    type: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> bytes:
    """A whole HTTP/1.1 response with an OpenAI error envelope; the connection then closes."""
    body = orjson.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})
    lines = [STATUS_LINE[status]]
    for name, value in {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **(headers or {}),
    }.items():
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join([*lines, b"\r\n", body])


class Counter(Protocol):
    """Counts by name with a cap (LocalCounts, or SharedCounts across worker processes)."""

    def try_acquire(self, name: str, capacity: int | None) -> bool: ...

    def release(self, name: str) -> None: ...


_ALL = "\0connections"


def guarded_protocol(
    limits: GatewayLimits,
    retry_after_s: int,
    counter: Counter | None = None,
    workers: int = 1,
    refused: Callable[[str], None] | None = None,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the guards above, for one server's limits.

    The cap on all connections holds across every worker process when `counter` is
    shared. The per-client cap is each worker's share of it (the kernel spreads one
    client's connections over the workers evenly): counting every client address in
    shared memory would let a scan of addresses fill the table."""
    counts = counter or LocalCounts()
    local = LocalCounts()
    # Each refusal here, by the reason the metrics give it (appliance_rejections_total).
    count_refusal = refused or (lambda reason: None)
    per_client = -(-limits.max_connections_per_client // workers)  # ceiling
    busy = {"retry-after": str(retry_after_s)}

    class GuardedProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _held: tuple[str, ...] = ()  # what this connection counts against
        _refusal: bytes | None = None  # the answer for a connection over a cap

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else None
            if not counts.try_acquire(_ALL, limits.max_connections):
                self._refuse(
                    f"The gateway holds its maximum of {limits.max_connections} connections; "
                    f"retry in {retry_after_s} seconds."
                )
            elif host is not None and per_client and not local.try_acquire(host, per_client):
                counts.release(_ALL)
                self._refuse(
                    f"This client holds its maximum of {limits.max_connections_per_client} "
                    "connections to the gateway; reuse connections (keep-alive) or close some."
                )
            else:
                self._held = (host,) if host is not None and per_client else ()
            timeout = REFUSED_GRACE_S if self._refusal else limits.header_timeout_s
            self._arm(timeout)

        def _refuse(self, message: str) -> None:
            count_refusal("too_many_connections")
            self._refusal = raw_error(
                503, message, "too_many_connections", type="server_error", headers=busy
            )

        def _arm(self, timeout: float) -> None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(timeout, self._header_deadline)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._header_bytes or self._refusal:
                if not self._refusal:
                    count_refusal("request_timeout")
                self.transport.write(
                    self._refusal
                    or raw_error(
                        408,
                        f"The request line and headers did not arrive within "
                        f"{limits.header_timeout_s:g} seconds.",
                        "request_timeout",
                    )
                )
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._refusal is None:
                counts.release(_ALL)
                for name in self._held:
                    local.release(name)
            self._held = ()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # the next request on a kept-alive connection
                self._arm(limits.header_timeout_s)

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > limits.max_header_bytes and not self.transport.is_closing():
                self._disarm()
                count_refusal("request_too_large")
                self.transport.write(
                    raw_error(
                        431,
                        f"The request line and headers exceed {limits.max_header_bytes} bytes.",
                        "headers_too_large",
                    )
                )
                self.transport.close()

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self._count(len(url) + 16)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self.transport.is_closing():
                return
            super().on_header(name, value)
            self._count(len(name) + len(value) + 4)

        def on_headers_complete(self) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            if self._refusal is not None:
                self.transport.write(self._refusal)
                self.transport.close()
                return
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            # httptools rejected the bytes (not HTTP/1.1): still answer in the envelope.
            self._disarm()
            count_refusal("invalid_request")
            self.transport.write(
                raw_error(400, f"{msg} The gateway speaks HTTP/1.1.", "invalid_http")
            )
            self.transport.close()

        def on_body(self, body: bytes) -> None:
            if self.cycle is None or self.transport.is_closing():
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            if self.cycle is None or self.transport.is_closing():
                return
            super().on_message_complete()

    return GuardedProtocol


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, or a ConfigError that says what holds the address.

    With `reuse_port`, every gateway worker binds its own socket in one SO_REUSEPORT
    group and the kernel spreads new connections over them evenly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server(
            (host, port), family=family, backlog=2048, reuse_port=reuse_port
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"the gateway cannot listen on {host}:{port}: the address is already in use",
                hint=f"Another process holds it (`ss -ltnp 'sport = :{port}'` names it): stop "
                "it, or set gateway.port in appliance.toml to a free port.",
            ) from None
        raise ConfigError(
            f"the gateway cannot listen on {host}:{port}: {exc.strerror}",
            hint="Set gateway.host to an address of this machine (127.0.0.1 for this machine "
            "only).",
        ) from None
    sock.set_inheritable(True)
    return sock


def bound_address(sock: socket.socket) -> tuple[str, int]:
    address: Any = sock.getsockname()
    return str(address[0]), int(address[1])
