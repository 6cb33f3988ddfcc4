"""Fake cloud providers on loopback that speak each provider's real wire format.

    python -m appliance.testing.fake_clouds --port 9100 --delay-ms 20 --log seen.jsonl
    # a process of its own (benchmarks: off the load generator's cores); on SIGTERM it
    # writes every request body it received to the log, one JSON line each

    with FakeCloud() as cloud:              # one aiohttp server, in a thread of its own
        cloud.url                           # http://127.0.0.1:<port>
        cloud.requests                      # every request: path, headers, body
        cloud.faults.append(Fault(429, retry_after=2))   # the next request gets it

Routes, one server for all (each checks its own credentials):

- Anthropic Messages: POST /v1/messages (`x-api-key` or, as the anthropic SDK 2.x sends
  it, `Authorization: Bearer`; `anthropic-version` required), JSON and
  SSE (message_start, content_block_start/delta/stop with text_delta and
  input_json_delta, ping, message_delta, message_stop, error), errors as
  {"type": "error", "error": {"type", "message"}} with Anthropic's types.
- Bedrock: POST /model/{modelId}/converse and /converse-stream (the SigV4 signature
  verified over the request as it arrived), Converse JSON, and ConverseStream as binary
  `application/vnd.amazon.eventstream` frames (prelude, headers, payload, CRC32s, as
  AWS publishes the framing), errors with `x-amzn-ErrorType` and {"message"}, stream
  exceptions as exception frames.
- OpenAI: POST /v1/chat/completions (`Authorization: Bearer`); Azure OpenAI: POST
  /openai/deployments/{deployment}/chat/completions?api-version=... (`api-key`). JSON
  and SSE chunks, include_usage, errors in OpenAI's envelope; Azure's
  DeploymentNotFound.

The answer depends only on the request: with tools (and tool_choice not "none") and no
tool result yet, a call of the first tool with {"city": "Paris"}; otherwise the text
"Hello from the cloud." in four pieces. Prompt tokens are the words in the messages.
The tests check these fakes against the providers' own SDKs (tests/test_fakeclouds.py).
"""

from __future__ import annotations

import asyncio
import binascii
import json
import re
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from appliance.testing.loop_thread import LoopThread

ANTHROPIC_KEY = "sk-ant-fake-0123456789abcdef"
OPENAI_KEY = "sk-openai-fake-0123456789abcdef"
AZURE_KEY = "azure-fake-0123456789abcdef"
AWS_KEY_ID = "AKIAFAKEFAKEFAKE0000"
AWS_SECRET = "fake/aws+secret0123456789abcdefghijklmnop"
PIECES = ["Hello", " from", " the", " cloud."]
TOOL_ARGS = ['{"ci', 'ty": "Pa', 'ris"}']


@dataclass
class Fault:
    """What the next request gets instead of an answer."""

    status: int = 500
    retry_after: float | None = None
    kind: str = "status"  # status | stream_error | hang | drop | corrupt (Bedrock: a bad CRC)
    seconds: float = 0.0  # hang: for this long
    after: int = 0  # stream_error: after this many pieces of text


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class _Plan:
    text: list[str] = field(default_factory=list)
    tool: tuple[str, str] | None = None  # (id, name)
    prompt_tokens: int = 0


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_words(v) for k, v in value.items() if k in ("text", "content", "json"))
    return 0


def _plan(tool: str | None, tool_choice_none: bool, last_is_result: bool, prompt: int) -> _Plan:
    """The answer: a call of `tool` (the first tool) unless it may not or was answered."""
    if tool and not tool_choice_none and not last_is_result:
        return _Plan(tool=(f"call_{uuid.uuid4().hex[:12]}", tool), prompt_tokens=prompt)
    return _Plan(text=list(PIECES), prompt_tokens=prompt)


# Bedrock's event stream framing: prelude (total length, headers length), prelude CRC,
# headers, payload, message CRC; big-endian; string headers are type 7.


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    encoded = b""
    for name, value in headers.items():
        raw = value.encode()
        encoded += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(raw)) + raw
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def event_frame(kind: str, body: dict[str, Any]) -> bytes:
    headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
    return frame(headers, json.dumps({**body, "p": "abcdefgh"}).encode())


def exception_frame(kind: str, message: str) -> bytes:
    headers = {
        ":exception-type": kind,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return frame(headers, json.dumps({"message": message}).encode())


class FakeCloud(LoopThread):
    def __init__(self, delay_s: float = 0.0, port: int = 0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.port = port
        self.requests: list[Seen] = []
        self.faults: list[Fault] = []
        self.url = ""
        self.raw = b""  # the last request's body, as it arrived
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_post("/model/{model}/converse", self.converse)
        app.router.add_post("/model/{model}/converse-stream", self.converse_stream)
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    @staticmethod
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def paths(self) -> list[str]:
        return [seen.path for seen in self.requests]

    async def _record(self, request: web.Request) -> dict[str, Any]:
        raw = self.raw = await request.read()
        body = json.loads(raw) if raw else {}
        self.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        return body

    def _fault(self) -> Fault | None:
        return self.faults.pop(0) if self.faults else None

    async def _pause(self) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    @staticmethod
    async def _hang_or_drop(request: web.Request, fault: Fault) -> web.StreamResponse | None:
        if fault.kind == "hang":
            await asyncio.sleep(fault.seconds)
        if fault.kind == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        return None

    # Anthropic.

    @staticmethod
    def _anthropic_error(status: int, kind: str, message: str, **headers: str) -> web.Response:
        body = {"type": "error", "error": {"type": kind, "message": message}}
        return web.json_response(body, status=status, headers=headers)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        # Anthropic documents x-api-key; its current SDK (2.x) sends a Bearer token.
        bearer = request.headers.get("authorization") == f"Bearer {ANTHROPIC_KEY}"
        if request.headers.get("x-api-key") != ANTHROPIC_KEY and not bearer:
            return self._anthropic_error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self._anthropic_error(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
        fault = self._fault()
        if fault is not None and fault.kind != "stream_error":
            if (dropped := await self._hang_or_drop(request, fault)) is not None:
                return dropped
            kinds = {429: "rate_limit_error", 529: "overloaded_error", 400: "invalid_request_error"}
            extra = {"retry-after": str(fault.retry_after)} if fault.retry_after else {}
            return self._anthropic_error(
                fault.status, kinds.get(fault.status, "api_error"), "Fault injected.", **extra
            )
        if "max_tokens" not in body:
            return self._anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
        messages = body["messages"]
        last = messages[-1]["content"] if messages else []
        result = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        tools = body.get("tools") or []
        none = (body.get("tool_choice") or {}).get("type") == "none"
        plan = _plan(tools[0]["name"] if tools else None, none, result, _words(messages))
        if plan.tool:
            plan.tool = (f"toolu_{uuid.uuid4().hex[:12]}", plan.tool[1])
        message_id = f"msg_{uuid.uuid4().hex[:12]}"
        stop = "tool_use" if plan.tool else "end_turn"
        if not body.get("stream"):
            await self._pause()
            content: list[dict[str, Any]] = []
            if plan.text:
                content.append({"type": "text", "text": "".join(plan.text)})
            if plan.tool:
                content.append(
                    {
                        "type": "tool_use",
                        "id": plan.tool[0],
                        "name": plan.tool[1],
                        "input": {"city": "Paris"},
                    }
                )
            return web.json_response(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": content,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 4},
                }
            )
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)

        async def send(kind: str, data: dict[str, Any]) -> None:
            await self._pause()
            await response.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

        await send(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 1},
                },
            },
        )
        await send("ping", {"type": "ping"})
        if plan.text:
            await send(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            for i, piece in enumerate(plan.text):
                if fault is not None and i == fault.after:
                    error = {"type": "overloaded_error", "message": "Overloaded"}
                    await send("error", {"type": "error", "error": error})
                    return response
                delta = {"type": "text_delta", "text": piece}
                await send(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        if plan.tool:
            block = {"type": "tool_use", "id": plan.tool[0], "name": plan.tool[1], "input": {}}
            await send(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            for piece in TOOL_ARGS:
                delta = {"type": "input_json_delta", "partial_json": piece}
                await send(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
            await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 4},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        return response

    # Bedrock.

    @staticmethod
    def _bedrock_error(status: int, code: str, message: str, **headers: str) -> web.Response:
        headers = {
            "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": str(uuid.uuid4()),
            **headers,
        }
        return web.json_response({"message": message}, status=status, headers=headers)

    def _bedrock_check(self, request: web.Request, raw: bytes) -> web.Response | None:
        """Verify the SigV4 signature as AWS would: recompute it (with botocore's signer,
        at the request's own X-Amz-Date) over what arrived, and compare."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        auth = request.headers.get("authorization", "")
        match = re.fullmatch(
            r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/bedrock/aws4_request, "
            r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})",
            auth,
        )
        if match is None or match.group(1) != AWS_KEY_ID or "x-amz-date" not in request.headers:
            return self._bedrock_error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        signed = match.group(4).split(";")
        headers = {name: request.headers.get(name, "") for name in signed}
        url = f"http://{request.host}{request.raw_path}"
        copy = AWSRequest(method=request.method, url=url, data=raw, headers=headers)
        copy.context["timestamp"] = request.headers["x-amz-date"]
        signer = SigV4Auth(Credentials(AWS_KEY_ID, AWS_SECRET), "bedrock", match.group(3))
        string_to_sign = signer.string_to_sign(copy, signer.canonical_request(copy))
        if signer.signature(string_to_sign, copy) != match.group(5):
            return self._bedrock_error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method.",
            )
        return None

    def _bedrock_plan(self, body: dict[str, Any]) -> _Plan:
        messages = body.get("messages") or []
        last = messages[-1]["content"] if messages else []
        result = any("toolResult" in block for block in last)
        tools = (body.get("toolConfig") or {}).get("tools") or []
        name = tools[0]["toolSpec"]["name"] if tools else None
        plan = _plan(name, False, result, _words(messages))
        if plan.tool:
            plan.tool = (f"tooluse_{uuid.uuid4().hex[:12]}", plan.tool[1])
        return plan

    _BEDROCK_CODES = {
        429: "ThrottlingException",
        400: "ValidationException",
        500: "InternalServerException",
        503: "ServiceUnavailableException",
    }

    async def _bedrock_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if (dropped := await self._hang_or_drop(request, fault)) is not None:
            return dropped
        code = self._BEDROCK_CODES.get(fault.status, "InternalServerException")
        return self._bedrock_error(fault.status, code, "Fault injected.")

    async def converse(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if (refused := self._bedrock_check(request, self.raw)) is not None:
            return refused
        if (fault := self._fault()) is not None:
            return await self._bedrock_fault(request, fault)
        if "inferenceConfig" not in body or not body.get("messages"):
            return self._bedrock_error(400, "ValidationException", "messages: required")
        await self._pause()
        plan = self._bedrock_plan(body)
        content: list[dict[str, Any]] = []
        if plan.text:
            content.append({"text": "".join(plan.text)})
        if plan.tool:
            content.append(
                {
                    "toolUse": {
                        "toolUseId": plan.tool[0],
                        "name": plan.tool[1],
                        "input": {"city": "Paris"},
                    }
                }
            )
        return web.json_response(
            {
                "output": {"message": {"role": "assistant", "content": content}},
                "stopReason": "tool_use" if plan.tool else "end_turn",
                "usage": {
                    "inputTokens": plan.prompt_tokens,
                    "outputTokens": 4,
                    "totalTokens": plan.prompt_tokens + 4,
                },
                "metrics": {"latencyMs": 12},
            }
        )

    async def converse_stream(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if (refused := self._bedrock_check(request, self.raw)) is not None:
            return refused
        fault = self._fault()
        if fault is not None and fault.kind not in ("stream_error", "corrupt"):
            return await self._bedrock_fault(request, fault)
        plan = self._bedrock_plan(body)
        response = web.StreamResponse(
            headers={"content-type": "application/vnd.amazon.eventstream"}
        )
        await response.prepare(request)

        async def send(data: bytes) -> None:
            await self._pause()
            await response.write(data)

        await send(event_frame("messageStart", {"role": "assistant"}))
        if fault is not None and fault.kind == "corrupt":
            bad = bytearray(event_frame("contentBlockDelta", {"contentBlockIndex": 0}))
            bad[-6] ^= 0xFF
            await send(bytes(bad))
            return response
        if plan.text:
            for i, piece in enumerate(plan.text):
                if fault is not None and i == fault.after:
                    message = "Too many tokens, please wait."
                    await send(exception_frame("throttlingException", message))
                    return response
                delta = {"contentBlockIndex": 0, "delta": {"text": piece}}
                await send(event_frame("contentBlockDelta", delta))
            await send(event_frame("contentBlockStop", {"contentBlockIndex": 0}))
        if plan.tool:
            start = {"toolUse": {"toolUseId": plan.tool[0], "name": plan.tool[1]}}
            await send(event_frame("contentBlockStart", {"contentBlockIndex": 0, "start": start}))
            for piece in TOOL_ARGS:
                delta = {"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}}
                await send(event_frame("contentBlockDelta", delta))
            await send(event_frame("contentBlockStop", {"contentBlockIndex": 0}))
        stop = "tool_use" if plan.tool else "end_turn"
        await send(event_frame("messageStop", {"stopReason": stop}))
        usage = {
            "inputTokens": plan.prompt_tokens,
            "outputTokens": 4,
            "totalTokens": plan.prompt_tokens + 4,
        }
        await send(event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
        return response

    # OpenAI and Azure OpenAI.

    @staticmethod
    def _openai_error(
        status: int, message: str, type_: str, code: str | None, **headers: str
    ) -> web.Response:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return web.json_response(body, status=status, headers=headers)

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if request.headers.get("authorization") != f"Bearer {OPENAI_KEY}":
            given = request.headers.get("authorization", "")[-4:]
            return self._openai_error(
                401,
                f"Incorrect API key provided: sk-...{given}.",
                "invalid_request_error",
                "invalid_api_key",
            )
        return await self._chat(request, body, body.get("model", ""))

    async def azure(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if request.headers.get("api-key") != AZURE_KEY:
            return self._openai_error(
                401,
                "Access denied due to invalid subscription key or wrong API endpoint.",
                "invalid_request_error",
                "401",
            )
        if not request.query.get("api-version"):
            return self._openai_error(404, "Resource not found", "invalid_request_error", "404")
        deployment = request.match_info["deployment"]
        if deployment.startswith("missing"):
            body = {
                "error": {
                    "code": "DeploymentNotFound",
                    "message": "The API deployment for this resource does not exist.",
                }
            }
            return web.json_response(body, status=404)
        return await self._chat(request, body, deployment)

    async def _chat(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        fault = self._fault()
        if fault is not None and fault.kind != "stream_error":
            if (dropped := await self._hang_or_drop(request, fault)) is not None:
                return dropped
            headers = {}
            if fault.retry_after is not None:
                headers = {
                    "retry-after": str(fault.retry_after),
                    "x-ratelimit-remaining-requests": "0",
                }
            if fault.status == 429:
                return self._openai_error(
                    429,
                    "Rate limit reached for requests.",
                    "requests",
                    "rate_limit_exceeded",
                    **headers,
                )
            return self._openai_error(
                fault.status, "The server had an error.", "server_error", None, **headers
            )
        messages = body.get("messages") or []
        tools = body.get("tools") or []
        result = bool(messages) and messages[-1].get("role") == "tool"
        none = body.get("tool_choice") == "none"
        plan = _plan(
            tools[0]["function"]["name"] if tools else None, none, result, _words(messages)
        )
        chat_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": 4,
            "total_tokens": plan.prompt_tokens + 4,
        }
        finish = "tool_calls" if plan.tool else "stop"
        if not body.get("stream"):
            await self._pause()
            message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.text) or None}
            if plan.tool:
                message["tool_calls"] = [
                    {
                        "id": plan.tool[0],
                        "type": "function",
                        "function": {"name": plan.tool[1], "arguments": '{"city": "Paris"}'},
                    }
                ]
            return web.json_response(
                {
                    "id": chat_id,
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                    ],
                    "usage": usage,
                }
            )
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            await self._pause()
            chunk = {
                "id": chat_id,
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": choices,
                **({"usage": None} if include_usage else {}),
                **extra,
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        def choice(delta: dict[str, Any], reason: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]

        await send(choice({"role": "assistant", "content": ""}))
        for i, piece in enumerate(plan.text):
            if fault is not None and i == fault.after:
                error = {
                    "message": "The server had an error.",
                    "type": "server_error",
                    "code": None,
                }
                await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
                return response
            await send(choice({"content": piece}))
        if plan.tool:
            first = {
                "index": 0,
                "id": plan.tool[0],
                "type": "function",
                "function": {"name": plan.tool[1], "arguments": ""},
            }
            await send(choice({"tool_calls": [first]}))
            for piece in TOOL_ARGS:
                await send(choice({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        await send(choice({}, finish))
        if include_usage:
            await send([], usage=usage)
        await response.write(b"data: [DONE]\n\n")
        return response


def main(argv: list[str] | None = None) -> None:
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="Fake cloud providers on loopback.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause before each event")
    parser.add_argument("--log", required=True, help="where the request bodies go at exit")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeCloud(args.delay_ms / 1000, args.port) as cloud:
        stop.wait()
        seen = [json.dumps(s.body) + "\n" for s in cloud.requests]
    with open(args.log, "w") as log:
        log.writelines(seen)


if __name__ == "__main__":
    main()
