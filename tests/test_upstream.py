"""The gateway's engine client (appliance/gateway/upstream.py) against raw servers on
loopback that answer exactly the bytes each case needs: framing, keep-alive, an engine
closing an idle connection, dying mid-answer, falling silent, and refusing to connect."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from appliance.gateway.upstream import ConnectFailed, EnginePool, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def _run(
    handler: Handler, body: Callable[[str, EnginePool], Awaitable[None]], **pool: float
) -> None:
    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        engines = EnginePool(pool.get("connect", 2.0), pool.get("read", 5.0), pool.get("keep", 4.0))
        try:
            await body(f"http://127.0.0.1:{port}", engines)
        finally:
            engines.close()
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_chunked_stream_then_the_connection_is_reused() -> None:
    connections: list[int] = []
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in (b"data: one\n\n", b"data: two\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def body(url: str, engines: EnginePool) -> None:
        for _ in range(3):
            answer = await engines.post(url, "/v1/x", b'{"a":1}', {"x-request-id": "r1"})
            assert answer.status == 200
            pieces = []
            while piece := await answer.readany():
                pieces.append(piece)
            assert b"".join(pieces) == b"data: one\n\ndata: two\n\n"
            answer.release()

    _run(handler, body)
    assert len(connections) == 1  # three answers on one kept-alive connection
    assert seen[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert b"x-request-id: r1\r\n" in seen[0] and seen[0].endswith(b'\r\n\r\n{"a":1}')


def test_content_length_and_read_to_close_bodies() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await _read_request(reader)
            if b"/close" in request:  # no length, no chunking: the body ends at the close
                writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
                await writer.drain()
                writer.close()
                return
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 5\r\n\r\nnope!")
            await writer.drain()

    async def body(url: str, engines: EnginePool) -> None:
        answer = await engines.post(url, "/len", b"{}", {})
        assert (answer.status, await answer.read()) == (404, b"nope!")
        assert answer.headers["content-length"] == "5"
        answer.release()
        answer = await engines.post(url, "/close", b"{}", {})
        assert await answer.read() == b"until the end"
        answer.release()

    _run(handler, body)


def test_a_pooled_connection_the_engine_closed_is_retried_on_a_new_one() -> None:
    requests: list[int] = []  # the connection number of each request received

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(set(requests)) + 1
        await _read_request(reader)
        requests.append(number)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # The engine's keep-alive runs out just as the next request arrives: it closes
        # without answering (the gateway cannot have seen the close before sending).
        await _read_request(reader)
        requests.append(number)
        writer.transport.abort()

    async def body(url: str, engines: EnginePool) -> None:
        for _ in range(2):
            answer = await engines.post(url, "/", b"{}", {})
            assert await answer.read() == b"ok"
            answer.release()

    _run(handler, body)
    # The second request went out on the pooled connection, then once more on a new one.
    assert requests == [1, 1, 2]


def test_an_engine_that_dies_mid_answer_is_an_upstream_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    async def body(url: str, engines: EnginePool) -> None:
        answer = await engines.post(url, "/", b"{}", {})
        assert await answer.readany() == b"hello"
        with pytest.raises(UpstreamError, match="closed the connection"):
            await answer.readany()
        answer.close()

    _run(handler, body)


def test_an_answer_that_is_not_http_is_an_upstream_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()

    async def body(url: str, engines: EnginePool) -> None:
        with pytest.raises(UpstreamError, match="not HTTP"):
            await engines.post(url, "/", b"{}", {})

    _run(handler, body)


def test_silence_past_the_read_timeout_is_a_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        # Bytes every 0.2 s keep a 0.5 s silence timer from firing; then nothing.
        for _ in range(4):
            await asyncio.sleep(0.2)
            writer.write(b"1\r\n.\r\n")
            await writer.drain()
        await asyncio.sleep(5)

    async def body(url: str, engines: EnginePool) -> None:
        answer = await engines.post(url, "/", b"{}", {})
        got = b""
        with pytest.raises(TimeoutError, match=r"sent nothing for 0\.5 s"):
            while piece := await answer.readany():
                got += piece
        assert got == b"hi...."  # every byte before the silence arrived
        answer.close()

    _run(handler, body, read=0.5)


async def _never_called(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    raise AssertionError("the test expects no request to reach a server")


def test_a_refused_connection_is_connect_failed() -> None:
    async def body(url: str, engines: EnginePool) -> None:
        # A port that was just free: nothing listens there.
        server = await asyncio.start_server(_never_called, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectFailed, match=f"127.0.0.1:{port}"):
            await engines.post(f"http://127.0.0.1:{port}", "/", b"{}", {})
        with pytest.raises(ConnectFailed, match="not an http"):
            await engines.post("ftp://127.0.0.1:21", "/", b"{}", {})

    _run(_never_called, body)


def test_a_header_value_with_a_line_break_is_refused() -> None:
    async def body(url: str, engines: EnginePool) -> None:
        with pytest.raises(ValueError, match="line break"):
            await engines.post(url, "/", b"{}", {"x-request-id": "a\r\nx-evil: 1"})

    _run(_never_called, body)


def test_a_long_unread_answer_pauses_reading_and_arrives_whole() -> None:
    block = b"x" * 65536
    blocks = 64  # 4 MiB, above the pool's high-water mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(block) * blocks))
        for _ in range(blocks):
            writer.write(block)
            await writer.drain()

    async def body(url: str, engines: EnginePool) -> None:
        answer = await engines.post(url, "/", b"{}", {})
        await asyncio.sleep(0.5)  # a slow client: the engine fills the buffer meanwhile
        assert answer._conn.paused
        got = 0
        while piece := await answer.readany():
            got += len(piece)
        assert got == len(block) * blocks
        answer.release()

    _run(handler, body)
