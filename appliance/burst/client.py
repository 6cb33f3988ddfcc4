"""The async HTTP client every provider shares (aiohttp, as the gateway uses).

A provider subclass says how to build its request (`build`), read a whole answer
(`read_whole`), translate its stream (`translate`) and read its error bodies
(`read_error`); this class sends, bounds time (connect, and silence while reading),
maps transport failures to `ProviderError`, and fills in usage, cost and latency.
Secrets reach only the request headers; every message that leaves here is scrubbed of
them as well, in case a provider echoes a header back.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from multidict import CIMultiDictProxy

from appliance.burst import errors
from appliance.burst.base import (
    Answer,
    ChunkWriter,
    Preamble,
    Route,
    StreamAnswer,
    Usage,
    include_usage,
)
from appliance.burst.credentials import Secret
from appliance.burst.errors import ProviderError
from appliance.burst.settings import ProviderConfig
from appliance.gateway.validate import Checked

log = logging.getLogger("appliance.burst")


@dataclass
class HttpRequest:
    url: str
    headers: dict[str, str]
    body: bytes


class Provider(ABC):
    type: str

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self.routes = {
            local: Route(
                name, local, remote.model, remote.input_per_million, remote.output_per_million
            )
            for local, remote in config.models.items()
        }
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def route(self, model: str) -> Route | None:
        return self.routes.get(model)

    def bind(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    # What each provider says.

    @abstractmethod
    def build(self, checked: Checked, route: Route, stream: bool) -> HttpRequest:
        """The provider's request; raises `Unhonourable` for what it cannot do."""

    @abstractmethod
    def read_whole(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        """An OpenAI chat.completion from the provider's whole answer."""

    @abstractmethod
    def translate(
        self, response: aiohttp.ClientResponse, writer: ChunkWriter, usage: Usage
    ) -> AsyncIterator[bytes]:
        """OpenAI SSE events from the provider's stream, usage filled in as it comes, the
        usage chunk included when the client asked for it (`writer.include_usage`);
        `data: [DONE]` is added here."""

    @abstractmethod
    def read_error(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> ProviderError:
        """The provider's error answer, in the OpenAI envelope."""

    def secrets(self) -> list[Secret]:
        return []

    def url_of(self, request: HttpRequest) -> str | yarl.URL:
        return request.url

    # Sending.

    def scrub_text(self, text: str) -> str:
        for secret in self.secrets():
            value = secret.reveal()
            if value and value in text:
                text = text.replace(value, "***")
        return text

    def scrub(self, err: ProviderError) -> ProviderError:
        err.message = self.scrub_text(err.message)
        return err

    async def _send(self, request: HttpRequest) -> aiohttp.ClientResponse:
        if self._session is None:
            raise RuntimeError(f"provider {self.name!r} is not bound to a session")
        try:
            response = await self._session.post(
                self.url_of(request),
                data=request.body,
                headers=request.headers,
                timeout=self.timeout,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            raise errors.unreachable(self.name) from None
        except TimeoutError:
            raise errors.timeout(self.name, "waiting for the answer to start") from None
        except aiohttp.ServerDisconnectedError:
            raise errors.broken(self.name, "it closed the connection") from None
        except aiohttp.ClientError:
            raise errors.unreachable(self.name) from None
        if response.status != 200:
            try:
                body = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                body = b""
            finally:
                response.release()
            err = self.scrub(self.read_error(response.status, response.headers, body))
            # The client sees the mapped error only; the operator gets the provider's own
            # words (5xx bodies are never passed on), scrubbed like every message.
            log.warning(
                "cloud provider %s answered %d: %s",
                self.name,
                response.status,
                self.scrub_text(body[:2000].decode(errors="replace")),
            )
            raise err
        return response

    async def complete(self, checked: Checked, route: Route) -> Answer:
        request = self.build(checked, route, stream=False)
        started = time.monotonic()
        response = await self._send(request)
        try:
            raw = await response.read()
        except TimeoutError:
            raise errors.timeout(self.name, "reading the answer") from None
        except aiohttp.ClientError:
            raise errors.broken(self.name, "the connection broke") from None
        finally:
            response.release()
        try:
            body, usage = self.read_whole(raw, route)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise errors.broken(self.name, "not the expected JSON") from None
        return Answer(route, body, usage, route.cost(usage), time.monotonic() - started)

    async def stream(self, checked: Checked, route: Route) -> StreamAnswer:
        request = self.build(checked, route, stream=True)
        started = time.monotonic()
        response = await self._send(request)
        answer = StreamAnswer(route, events=_empty())
        answer.events = self._events(response, answer, include_usage(checked), started)
        # Closing the connection is what tells the provider to stop generating; after the
        # answer completed (released to the pool) it does nothing.
        answer.closers.append(response.close)
        return answer

    async def _events(
        self,
        response: aiohttp.ClientResponse,
        answer: StreamAnswer,
        with_usage: bool,
        started: float,
    ) -> AsyncIterator[bytes]:
        writer = ChunkWriter(answer.route.remote_model, with_usage)
        finished = False
        try:
            async for event in self.translate(response, writer, answer.usage):
                if answer.first_byte_s is None and not isinstance(event, Preamble):
                    answer.first_byte_s = time.monotonic() - started
                yield event
            answer.cost = answer.route.cost(answer.usage)
            yield writer.done()
            finished = True
        except ProviderError as err:
            raise self.scrub(err) from None
        except TimeoutError:
            raise errors.timeout(self.name, "the stream went silent") from None
        except aiohttp.ClientError:
            raise errors.broken(self.name, "the stream broke") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise errors.broken(self.name, "an event was not the expected JSON") from None
        finally:
            answer.cost = answer.route.cost(answer.usage)
            if finished:
                response.release()
            else:
                # Closing the connection is what tells the provider to stop generating.
                response.close()


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, bytes]]:
    """(event type, data) of each server-sent event; the type is "message" when unnamed.
    Read in pieces of any size and split here: aiohttp's readline caps a line's length,
    and one event (a long tool argument) can be longer."""
    pending = b""
    async for piece in response.content.iter_any():
        pending += piece
        *events, pending = pending.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            if (parsed := _sse_event(event)) is not None:
                yield parsed
    if (parsed := _sse_event(pending)) is not None:
        yield parsed


def _sse_event(event: bytes) -> tuple[str, bytes] | None:
    kind, data = "message", []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            kind = line[6:].strip().decode()
    return (kind, b"\n".join(data)) if data else None
