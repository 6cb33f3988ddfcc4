"""AWS Bedrock's Converse and ConverseStream, translated to and from OpenAI's chat.

botocore does what is AWS's: it validates and serialises the Converse parameters from
its own service model, signs the request (SigV4, service `bedrock`), parses the JSON
answer and its error shapes, and decodes the binary event stream of ConverseStream
(`application/vnd.amazon.eventstream`) into events. aiohttp only carries the bytes, so
the gateway's event loop never blocks on boto3's synchronous client. botocore is the
`[bedrock]` extra, imported when a bedrock provider is built.

Request: system and developer messages become `system`; user text and inline images
(png, jpeg, gif, webp data URLs: Converse takes bytes, not URLs) and tool results
(`toolResult`) become user content; an assistant's tool calls become `toolUse`;
`max_tokens` (the provider's `default_max_tokens` when the client gave none),
`temperature`, `top_p` and `stop` go to `inferenceConfig`; tools to `toolConfig` with
tool_choice auto/required/a function as auto/any/tool. Converse has no "none": tools
are then left out, which Converse allows only when no message holds a tool block.

Answer: stop reasons end_turn/stop_sequence -> stop, max_tokens and
model_context_window_exceeded -> length, tool_use -> tool_calls, guardrail_intervened and
content_filtered -> content_filter; usage from inputTokens (with cache reads and
writes) and outputTokens. Stream: messageStart (role chunk), contentBlockStart (a tool
call's id and name), contentBlockDelta (text, or tool input as a JSON fragment),
messageStop (finish_reason), metadata (usage, after messageStop); an exception event
raises `ProviderError`.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import yarl
from multidict import CIMultiDictProxy

from appliance.burst import errors
from appliance.burst.base import (
    ChunkWriter,
    Route,
    Rule,
    Usage,
    completion_id,
    message_api_rules,
    only,
    parse_data_url,
    refuse,
    text_of,
    whole,
)
from appliance.burst.client import HttpRequest, Provider
from appliance.burst.credentials import AwsCredentials, Secret, aws_credentials
from appliance.burst.errors import ProviderError, Unhonourable
from appliance.burst.settings import BEDROCK_EXTRA, ProviderConfig
from appliance.errors import ConfigError
from appliance.gateway.validate import Checked

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
    # The model's output did not parse (a tool call especially): OpenAI has no reason for
    # it, and what came is all there is.
    "malformed_model_output": "stop",
    "malformed_tool_use": "stop",
}
# Bedrock's error codes, as HTTP statuses, for events inside a stream (a whole answer
# carries its status itself).
STREAM_ERRORS = {
    "throttlingException": 429,
    "validationException": 400,
    "serviceUnavailableException": 503,
    "modelStreamErrorException": 424,
    "internalServerException": 500,
}
IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}


RULES: dict[str, Rule | None] = {
    **message_api_rules("Converse", "Converse's temperature"),
    "parallel_tool_calls": only([True], "Converse cannot turn off parallel tool calls."),
    "reasoning_effort": lambda _: "reasoning settings are not mapped; leave it out.",
}


@functools.cache
def _botocore() -> Any:
    """botocore's pieces for bedrock-runtime, loaded once (its service model: 0.25 s)."""
    try:
        import botocore.session
        from botocore import auth, awsrequest, eventstream, parsers, serialize
    except ImportError:
        raise ConfigError(
            "the bedrock provider needs botocore, which is not installed",
            hint=f"Install the extra: {BEDROCK_EXTRA}",
        ) from None
    model = botocore.session.Session().get_service_model("bedrock-runtime")

    class Parts:
        service = model
        serializer = serialize.create_serializer("rest-json", include_validation=True)
        parser = parsers.RestJSONParser()
        event_parser = parsers.EventStreamJSONParser()
        SigV4Auth = auth.SigV4Auth
        prepare = staticmethod(awsrequest.prepare_request_dict)
        create = staticmethod(awsrequest.create_request_object)
        Buffer = eventstream.EventStreamBuffer

    return Parts


class BedrockProvider(Provider):
    type = "bedrock"

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self.aws: AwsCredentials = aws_credentials(name, config)
        self.parts = _botocore()

    def secrets(self) -> list[Secret]:
        return [s for s in (self.aws.secret_access_key, self.aws.session_token) if s]

    def _credentials(self) -> Any:
        from botocore.credentials import Credentials

        token = self.aws.session_token.reveal() if self.aws.session_token else None
        return Credentials(self.aws.access_key_id, self.aws.secret_access_key.reveal(), token)

    def build(self, checked: Checked, route: Route, stream: bool) -> HttpRequest:
        params = to_converse(self.name, checked, route.remote_model, self.config.default_max_tokens)
        operation = self.parts.service.operation_model("ConverseStream" if stream else "Converse")
        try:
            request = self.parts.serializer.serialize_to_request(params, operation)
        except Exception as exc:  # botocore's ParamValidationError: a bug in to_converse
            raise Unhonourable(
                self.name, "messages", f"not expressible in Converse: {exc}"
            ) from None
        self.parts.prepare(request, self.config.base_url)
        aws = self.parts.create(request)
        self.parts.SigV4Auth(self._credentials(), "bedrock", self.config.region).add_auth(aws)
        prepared = aws.prepare()
        headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
        return HttpRequest(prepared.url, headers, prepared.body or b"")

    def url_of(self, request: HttpRequest) -> yarl.URL:
        # Signed as serialised: yarl must not re-quote the path (`%3A` in model ids).
        return yarl.URL(request.url, encoded=True)

    def read_whole(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        operation = self.parts.service.operation_model("Converse")
        try:
            parsed = self.parts.parser.parse(
                {"status_code": 200, "headers": {}, "body": body}, operation.output_shape
            )
        except Exception as exc:  # botocore's ResponseParserError: not Converse's JSON
            raise ValueError(str(exc)) from None
        return from_converse(parsed, route.remote_model)

    async def translate(
        self, response: aiohttp.ClientResponse, writer: ChunkWriter, usage: Usage
    ) -> AsyncIterator[bytes]:
        shape = self.parts.service.operation_model("ConverseStream").output_shape
        stream_shape = shape.members["stream"]
        buffer = self.parts.Buffer()
        translator = StreamTranslator(self.name, writer, usage)
        async for piece in response.content.iter_any():
            buffer.add_data(piece)
            for message in _frames(buffer):
                response_dict = message.to_response_dict()
                try:
                    parsed = self.parts.event_parser.parse(response_dict, stream_shape)
                except Exception as exc:  # botocore's ResponseParserError
                    raise ValueError(str(exc)) from None
                if response_dict["status_code"] != 200:
                    raise _stream_error(self.name, parsed)
                out = translator.feed(parsed)
                if out:
                    yield out

    def read_error(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> ProviderError:
        operation = self.parts.service.operation_model("Converse")
        try:
            parsed = self.parts.parser.parse(
                {"status_code": status, "headers": dict(headers), "body": body},
                operation.output_shape,
            )
            error = parsed.get("Error") or {}
        except Exception:  # not Bedrock's JSON at all (a proxy's page)
            error = {}
        return errors.from_status(
            self.name,
            status,
            error.get("Message") or None,
            error.get("Code") or None,
            errors.retry_after(headers),
        )


def _frames(buffer: Any) -> Any:
    """The whole frames in the buffer; a frame that fails its CRC or its prelude is a
    ValueError (the client reports the stream as unreadable)."""
    from botocore.eventstream import ParserError

    try:
        yield from buffer
    except ParserError as exc:
        raise ValueError(f"event stream: {type(exc).__name__}") from None


def _stream_error(provider: str, parsed: dict[str, Any]) -> ProviderError:
    error = parsed.get("Error") or {}
    code = error.get("Code") or ""
    status = STREAM_ERRORS.get(code[:1].lower() + code[1:], 500)
    return errors.from_status(provider, status, error.get("Message"), code or None, None)


# The request.


def _image(provider: str, part: dict[str, Any], where: str) -> dict[str, Any]:
    inline = parse_data_url(part["image_url"]["url"])
    if inline is None:
        raise Unhonourable(
            provider, where, "Converse takes images as bytes: send a data: URL, not a link."
        )
    media, data = inline
    if media not in IMAGE_FORMATS:
        raise Unhonourable(provider, where, f"Converse takes png, jpeg, gif and webp, not {media}.")
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise Unhonourable(provider, where, "the data: URL is not valid base64.") from None
    return {"image": {"format": IMAGE_FORMATS[media], "source": {"bytes": raw}}}


def to_converse(
    provider: str, checked: Checked, model: str, default_max_tokens: int
) -> dict[str, Any]:
    source = checked.body
    refuse(provider, source, RULES)
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    has_tool_blocks = False
    for i, message in enumerate(checked.messages or []):
        role = message["role"]
        if message.get("name") is not None:
            raise Unhonourable(
                provider, f"messages[{i}].name", "Converse has no participant names."
            )
        if role in ("system", "developer"):
            system.append({"text": text_of(message["content"])})
            continue
        blocks: list[dict[str, Any]] = []
        if role == "user":
            content = message["content"]
            if isinstance(content, str):
                blocks.append({"text": content})
            else:
                for j, part in enumerate(content):
                    where = f"messages[{i}].content[{j}]"
                    if part["type"] == "text":
                        blocks.append({"text": part["text"]})
                    elif part["type"] == "image_url":
                        blocks.append(_image(provider, part, where))
                    else:
                        raise Unhonourable(
                            provider,
                            where,
                            f"a '{part['type']}' part has no Converse equivalent here.",
                        )
        elif role == "assistant":
            if text := text_of(message.get("content")):
                blocks.append({"text": text})
            for call in message.get("tool_calls") or []:
                fn = call["function"]
                blocks.append(
                    {
                        "toolUse": {
                            "toolUseId": call["id"],
                            "name": fn["name"],
                            "input": orjson.loads(fn["arguments"] or "{}"),
                        }
                    }
                )
                has_tool_blocks = True
        else:  # tool
            role = "user"
            result = {
                "toolUseId": message["tool_call_id"],
                "content": [{"text": text_of(message["content"])}],
            }
            blocks.append({"toolResult": result})
            has_tool_blocks = True
        if not blocks:
            blocks.append({"text": ""})
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    config: dict[str, Any] = {"maxTokens": checked.max_tokens or default_max_tokens}
    if "temperature" in source:
        config["temperature"] = float(source["temperature"])
    if "top_p" in source:
        config["topP"] = float(source["top_p"])
    stop = source.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    params: dict[str, Any] = {"modelId": model, "messages": turns, "inferenceConfig": config}
    if system:
        params["system"] = system
    choice = source.get("tool_choice")
    if checked.tools:
        if choice == "none":
            if has_tool_blocks:
                raise Unhonourable(
                    provider,
                    "tool_choice",
                    "Converse has no 'none', and leaving the tools out is not allowed while "
                    "the messages hold tool calls.",
                )
        else:
            tools: dict[str, Any] = {
                "tools": [
                    {
                        "toolSpec": {
                            "name": t["function"]["name"],
                            **(
                                {"description": t["function"]["description"]}
                                if t["function"].get("description")
                                else {}
                            ),
                            "inputSchema": {
                                "json": t["function"].get("parameters")
                                or {"type": "object", "properties": {}}
                            },
                        }
                    }
                    for t in checked.tools
                ]
            }
            if choice == "required":
                tools["toolChoice"] = {"any": {}}
            elif isinstance(choice, dict):
                tools["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
            elif choice == "auto":
                tools["toolChoice"] = {"auto": {}}
            params["toolConfig"] = tools
    return params


# The answer.


def _usage(usage: dict[str, Any]) -> Usage:
    prompt = sum(
        int(usage.get(name) or 0)
        for name in ("inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens")
    )
    return Usage(prompt, int(usage.get("outputTokens") or 0))


def from_converse(parsed: dict[str, Any], model: str) -> tuple[dict[str, Any], Usage]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in parsed["output"]["message"]["content"]:
        if "text" in block:
            texts.append(block["text"])
        elif "toolUse" in block:
            use = block["toolUse"]
            calls.append(
                {
                    "id": use["toolUseId"],
                    "type": "function",
                    "function": {
                        "name": use["name"],
                        "arguments": orjson.dumps(use["input"]).decode(),
                    },
                }
            )
    usage = _usage(parsed.get("usage") or {})
    content = "".join(texts) if texts or not calls else None
    reason = STOP_REASONS.get(parsed.get("stopReason") or "end_turn", "stop")
    return whole(completion_id(), model, content, calls, reason, usage), usage


class StreamTranslator:
    """ConverseStream events (as botocore parses them) in, OpenAI chunks out."""

    def __init__(self, provider: str, writer: ChunkWriter, usage: Usage) -> None:
        self.provider = provider
        self.writer = writer
        self.usage = usage
        self.tools: dict[int, int] = {}  # Converse block index -> OpenAI tool call index

    def feed(self, event: dict[str, Any]) -> bytes:
        w = self.writer
        if "messageStart" in event:
            return w.role()
        if "contentBlockStart" in event:
            start = event["contentBlockStart"]
            use = (start.get("start") or {}).get("toolUse")
            if use is None:
                return b""
            index = self.tools[start["contentBlockIndex"]] = len(self.tools)
            call = {
                "index": index,
                "id": use["toolUseId"],
                "type": "function",
                "function": {"name": use["name"], "arguments": ""},
            }
            return w.delta({"tool_calls": [call]})
        if "contentBlockDelta" in event:
            block = event["contentBlockDelta"]
            delta = block["delta"]
            if "text" in delta:
                return w.delta({"content": delta["text"]})
            if "toolUse" in delta and block["contentBlockIndex"] in self.tools:
                call = {
                    "index": self.tools[block["contentBlockIndex"]],
                    "function": {"arguments": delta["toolUse"]["input"]},
                }
                return w.delta({"tool_calls": [call]})
            return b""  # reasoning content: not asked for
        if "messageStop" in event:
            reason = event["messageStop"].get("stopReason") or "end_turn"
            return w.finish(STOP_REASONS.get(reason, "stop"))
        if "metadata" in event:
            found = _usage(event["metadata"].get("usage") or {})
            self.usage.prompt_tokens = found.prompt_tokens
            self.usage.completion_tokens = found.completion_tokens
            return w.usage(self.usage)
        return b""  # contentBlockStop, and event types added later
