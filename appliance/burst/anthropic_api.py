"""Anthropic's Messages API (`POST /v1/messages`), translated to and from OpenAI's chat.

Request: system and developer messages become `system` (text blocks, in order); user
text and image parts become content blocks; an assistant's `tool_calls` become
`tool_use` blocks and `tool` messages `tool_result` blocks in a user turn (consecutive
turns of one role are merged, as Messages wants them alternating); `max_tokens` is
required there (the provider's `default_max_tokens` when the client gave none); `stop`
becomes `stop_sequences`; tools get `input_schema`; tool_choice auto/required/a
function/none becomes auto/any/tool/none, `parallel_tool_calls: false` becomes
`disable_parallel_tool_use`. What has no equivalent is refused (see RULES).

Answer: text blocks join into `content`, `tool_use` blocks become `tool_calls` (the
input as a JSON string); stop reasons map end_turn/stop_sequence/pause_turn -> stop,
max_tokens/model_context_window_exceeded -> length, tool_use -> tool_calls, refusal ->
content_filter; input tokens (with cache reads and writes) and output tokens are usage.

Stream: message_start gives the role chunk and the input tokens; content_block_start of
a tool_use gives the tool call's id and name, text_delta and input_json_delta the
content and argument deltas; message_delta the finish_reason and output tokens;
message_stop ends it; ping is skipped; an `error` event raises `ProviderError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from appliance.burst import errors
from appliance.burst.base import (
    ChunkWriter,
    Route,
    Rule,
    Usage,
    message_api_rules,
    parse_data_url,
    refuse,
    text_of,
    whole,
)
from appliance.burst.client import HttpRequest, Provider, sse_events
from appliance.burst.credentials import Secret, api_key
from appliance.burst.errors import ProviderError, Unhonourable
from appliance.burst.settings import ProviderConfig
from appliance.gateway.validate import Checked

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


RULES: dict[str, Rule | None] = {
    **message_api_rules("Messages", "Anthropic's temperature"),
    "top_k": None,
    "reasoning_effort": lambda _: "extended thinking is not mapped; leave it out.",
}


class AnthropicProvider(Provider):
    type = "anthropic"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        key = api_key(name, config)
        assert key is not None  # the config requires one
        self.key: Secret = key

    def secrets(self) -> list[Secret]:
        return [self.key]

    def build(self, checked: Checked, route: Route, stream: bool) -> HttpRequest:
        body = to_messages(self.name, checked, route.remote_model, self.config.default_max_tokens)
        if stream:
            body["stream"] = True
        headers = {
            "content-type": "application/json",
            "x-api-key": self.key.reveal(),
            "anthropic-version": self.config.anthropic_version,
        }
        return HttpRequest(f"{self.config.base_url}/v1/messages", headers, orjson.dumps(body))

    def read_whole(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        return from_message(orjson.loads(body))

    async def translate(
        self, response: aiohttp.ClientResponse, writer: ChunkWriter, usage: Usage
    ) -> AsyncIterator[bytes]:
        stream = StreamTranslator(self.name, writer, usage)
        async for kind, data in sse_events(response):
            out = stream.feed(kind, orjson.loads(data))
            if out:
                yield out
            if stream.done:
                return

    def read_error(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> ProviderError:
        message = kind = None
        try:
            error = orjson.loads(body).get("error")
            if isinstance(error, dict):
                message, kind = error.get("message"), error.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return errors.from_status(
            self.name,
            status,
            str(message) if message else None,
            str(kind) if kind else None,
            errors.retry_after(headers),
        )


# The request.


def to_messages(
    provider: str, checked: Checked, model: str, default_max_tokens: int
) -> dict[str, Any]:
    source = checked.body
    refuse(provider, source, RULES)
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(checked.messages or []):
        role = message["role"]
        if message.get("name") is not None:
            raise Unhonourable(
                provider, f"messages[{i}].name", "Messages has no participant names."
            )
        if role in ("system", "developer"):
            system.append({"type": "text", "text": text_of(message["content"])})
            continue
        if role == "user":
            blocks = _user_blocks(provider, message["content"], i)
        elif role == "assistant":
            blocks = _assistant_blocks(provider, message, i)
            role = "assistant"
        else:  # tool
            blocks = [
                {
                    "type": "tool_result",
                    "tool_use_id": message["tool_call_id"],
                    "content": text_of(message["content"]),
                }
            ]
            role = "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": checked.max_tokens or default_max_tokens,
        "messages": turns,
    }
    if system:
        body["system"] = system
    for name in ("temperature", "top_p", "top_k"):
        if name in source:
            body[name] = source[name]
    stop = source.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if checked.tools:
        body["tools"] = [_tool(tool["function"]) for tool in checked.tools]
    choice = _tool_choice(source.get("tool_choice"), source.get("parallel_tool_calls"))
    if choice is not None and checked.tools:
        body["tool_choice"] = choice
    return body


def _user_blocks(provider: str, content: Any, i: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if part["type"] == "text":
            blocks.append({"type": "text", "text": part["text"]})
        elif part["type"] == "image_url":
            url = part["image_url"]["url"]
            inline = parse_data_url(url)
            if inline is None:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
            elif inline[0] in IMAGE_TYPES:
                source = {"type": "base64", "media_type": inline[0], "data": inline[1]}
                blocks.append({"type": "image", "source": source})
            else:
                raise Unhonourable(
                    provider,
                    f"messages[{i}].content[{j}].image_url",
                    f"Messages takes {', '.join(IMAGE_TYPES)} images, not {inline[0]}.",
                )
        else:
            raise Unhonourable(
                provider,
                f"messages[{i}].content[{j}]",
                f"a '{part['type']}' part has no Messages equivalent here.",
            )
    return blocks


def _assistant_blocks(provider: str, message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = text_of(message.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": fn["name"],
                "input": orjson.loads(fn["arguments"] or "{}"),
            }
        )
    if not blocks:
        blocks.append({"type": "text", "text": ""})
    return blocks


def _tool(fn: dict[str, Any]) -> dict[str, Any]:
    tool: dict[str, Any] = {
        "name": fn["name"],
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        tool["description"] = fn["description"]
    return tool


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice == "none":
        return {"type": "none"}
    if choice is None or choice == "auto":
        result: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    else:
        result = {"type": "tool", "name": choice["function"]["name"]}
    if parallel is False:
        result["disable_parallel_tool_use"] = True
    elif choice is None:
        return None
    return result


# The answer.


def _usage(usage: dict[str, Any]) -> int:
    return sum(
        int(usage.get(name) or 0)
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


def from_message(message: dict[str, Any]) -> tuple[dict[str, Any], Usage]:
    if message.get("type") != "message":
        raise ValueError("not a message")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message["content"]:
        if block["type"] == "text":
            texts.append(block["text"])
        elif block["type"] == "tool_use":
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": orjson.dumps(block["input"]).decode(),
                    },
                }
            )
    usage = Usage(_usage(message["usage"]), int(message["usage"].get("output_tokens") or 0))
    content = "".join(texts) if texts or not calls else None
    reason = STOP_REASONS.get(message.get("stop_reason") or "end_turn", "stop")
    return whole(
        f"chatcmpl-{message['id']}", message["model"], content, calls, reason, usage
    ), usage


class StreamTranslator:
    """Messages stream events in, OpenAI chunks out (bytes), one event at a time."""

    def __init__(self, provider: str, writer: ChunkWriter, usage: Usage) -> None:
        self.provider = provider
        self.writer = writer
        self.usage = usage
        self.tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self.done = False

    def feed(self, kind: str, event: dict[str, Any]) -> bytes:
        kind = event.get("type", kind)
        w = self.writer
        if kind == "message_start":
            message = event["message"]
            w.id = f"chatcmpl-{message['id']}"
            w.model = message.get("model", w.model)
            self.usage.prompt_tokens = _usage(message.get("usage") or {})
            self.usage.completion_tokens = int(
                (message.get("usage") or {}).get("output_tokens") or 0
            )
            return w.role()
        if kind == "content_block_start":
            block = event["content_block"]
            if block["type"] == "tool_use":
                index = self.tools[event["index"]] = len(self.tools)
                call = {
                    "index": index,
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": ""},
                }
                return w.delta({"tool_calls": [call]})
            if block["type"] == "text" and block.get("text"):
                return w.delta({"content": block["text"]})
            return b""
        if kind == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                return w.delta({"content": delta["text"]})
            if delta["type"] == "input_json_delta" and event["index"] in self.tools:
                call = {
                    "index": self.tools[event["index"]],
                    "function": {"arguments": delta["partial_json"]},
                }
                return w.delta({"tool_calls": [call]})
            return b""  # thinking and signature deltas: not asked for
        if kind == "message_delta":
            usage = event.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self.usage.completion_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens") is not None:
                self.usage.prompt_tokens = _usage(usage)
            reason = (event.get("delta") or {}).get("stop_reason")
            return w.finish(STOP_REASONS.get(reason or "end_turn", "stop"))
        if kind == "message_stop":
            self.done = True
            return w.usage(self.usage)
        if kind == "error":
            error = event.get("error") or {}
            status = {"overloaded_error": 529, "rate_limit_error": 429}.get(
                str(error.get("type")), 500
            )
            raise errors.from_status(
                self.provider, status, error.get("message"), error.get("type"), None
            )
        return b""  # ping, content_block_stop, and event types added later
