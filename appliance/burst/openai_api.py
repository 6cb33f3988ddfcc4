"""OpenAI, Azure OpenAI and OpenAI-compatible servers: the request passes through.

The body is the gateway's validated one with the model name mapped. A stream always asks
for usage (the ledger needs it); the usage chunk is taken out again when the client did
not ask for it. Azure addresses a deployment, not a model
(`{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...`) and takes
the key in `api-key`; the others take `Authorization: Bearer`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from appliance.burst import errors
from appliance.burst.base import CHAT_FIELDS, ChunkWriter, Preamble, Route, Usage, refuse
from appliance.burst.client import HttpRequest, Provider, sse_events
from appliance.burst.credentials import Secret, api_key
from appliance.burst.errors import ProviderError, Unhonourable
from appliance.burst.settings import ProviderConfig
from appliance.gateway.validate import Checked


class OpenAIProvider(Provider):
    type = "openai"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self.key: Secret | None = api_key(name, config)
        self.rules: dict[str, Any] = dict.fromkeys(CHAT_FIELDS)

    def secrets(self) -> list[Secret]:
        return [self.key] if self.key is not None else []

    def url(self, route: Route) -> str:
        return f"{self.config.base_url}/chat/completions"

    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key.reveal()}"} if self.key else {}

    def build(self, checked: Checked, route: Route, stream: bool) -> HttpRequest:
        refuse(self.name, checked.body, self.rules)
        for param in self.config.unsupported_params:
            top, _, inner = param.partition(".")
            value = checked.body.get(top)
            if value is None:
                continue
            if inner and not (isinstance(value, dict) and value.get("type") == inner):
                continue
            raise Unhonourable(self.name, param, "the provider's configuration says it cannot.")
        body = {**checked.body, "model": route.remote_model}
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        headers = {"content-type": "application/json", **self.auth()}
        return HttpRequest(self.url(route), headers, orjson.dumps(body))

    def read_whole(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        answer = orjson.loads(body)
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise ValueError("not a chat.completion")
        return answer, _usage(answer.get("usage"))

    async def translate(
        self, response: aiohttp.ClientResponse, writer: ChunkWriter, usage: Usage
    ) -> AsyncIterator[bytes]:
        async for _, data in sse_events(response):
            if data.strip() == b"[DONE]":
                return
            chunk = orjson.loads(data)
            if isinstance(chunk.get("error"), dict):
                error = chunk["error"]
                raise errors.from_status(
                    self.name, 500, error.get("message"), error.get("code"), None
                )
            if isinstance(chunk.get("usage"), dict):
                found = _usage(chunk["usage"])
                usage.prompt_tokens, usage.completion_tokens = (
                    found.prompt_tokens,
                    found.completion_tokens,
                )
                if not writer.include_usage:
                    if not chunk.get("choices"):
                        continue
                    chunk.pop("usage")
                    data = orjson.dumps(chunk)
            elif not writer.include_usage and "usage" in chunk:
                chunk.pop("usage")
                data = orjson.dumps(chunk)
            event = b"data: " + data + b"\n\n"
            yield Preamble(event) if _no_token(chunk) else event

    def read_error(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> ProviderError:
        message = code = param = None
        try:
            parsed = orjson.loads(body)
            error = parsed.get("error") if isinstance(parsed, dict) else None
            if isinstance(error, dict):
                message, code, param = error.get("message"), error.get("code"), error.get("param")
        except orjson.JSONDecodeError:
            pass
        return errors.from_status(
            self.name,
            status,
            str(message) if message else None,
            str(code) if code else None,
            errors.retry_after(headers),
            str(param) if param else None,
        )


class OpenAICompatibleProvider(OpenAIProvider):
    type = "openai_compatible"


class AzureOpenAIProvider(OpenAIProvider):
    type = "azure_openai"

    def url(self, route: Route) -> str:
        return (
            f"{self.config.base_url}/openai/deployments/{quote(route.remote_model, safe='')}"
            f"/chat/completions?api-version={quote(self.config.api_version, safe='')}"
        )

    def auth(self) -> dict[str, str]:
        return {"api-key": self.key.reveal()} if self.key else {}


def _no_token(chunk: dict[str, Any]) -> bool:
    """A chunk with only the role (and empty content) in it: OpenAI's first."""
    choices = chunk.get("choices")
    if not choices or chunk.get("usage"):
        return False
    return all(
        not c.get("finish_reason")
        and not (c.get("delta") or {}).get("content")
        and not (c.get("delta") or {}).get("tool_calls")
        for c in choices
    )


def _usage(value: Any) -> Usage:
    if not isinstance(value, dict):
        return Usage()
    return Usage(int(value.get("prompt_tokens") or 0), int(value.get("completion_tokens") or 0))
