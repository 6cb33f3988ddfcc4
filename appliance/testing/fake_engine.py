"""A fake OpenAI-compatible engine: the real wire format, no model.

It stands in for vLLM where no GPU is at hand (gateway tests, the overhead benchmark).
Every completion is the same fixed run of tokens, capped by the request's ``max_tokens``,
emitted at a fixed inter-token delay; the first token comes one delay after the request.
The token schedule is kept against deadlines, not chained sleeps, so that a busy event
loop (the fake shares its cores with the gateway and the load generator) does not
stretch it: like a GPU engine, its cadence does not depend on its CPU.

Responses follow vLLM's OpenAI server: chunk and object shapes, the role chunk sent
together with the first token, ``stream_options.include_usage``, and ``/metrics`` in
Prometheus text with vLLM's metric names and labels. ``max_running`` plays vLLM's
``--max-num-seqs``: requests beyond it wait, and show as ``vllm:num_requests_waiting``.
``/v1/embeddings`` answers every input with the same 8-float vector, at once.
Any JSON body gets a 200 or a 4xx in OpenAI's envelope, never a 500: the gateway's fuzz
test sends it spec-valid requests of every shape.

It is a raw ASGI app with pre-encoded bytes because it must be cheap per request.

    python -m appliance.testing.fake_engine --port 8001 --model fake --tokens 32 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import struct
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_WORDS = (
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog",
    " while", " a", " fake", " engine", " streams", " tokens", " at", " a", " steady",
    " pace", ".",
)  # fmt: skip

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_DONE = b"data: [DONE]\n\n"


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Request:
    """One in-flight completion: whether its client is still there, and its current pause."""

    __slots__ = ("gone", "waiter")

    def __init__(self) -> None:
        self.gone = False
        self.waiter: asyncio.Future[None] | None = None


async def _watch_disconnect(receive: Receive, req: _Request) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    req.gone = True
    if req.waiter is not None and not req.waiter.done():
        req.waiter.set_result(None)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FakeEngine:
    """The ASGI app. ``create_app`` builds one; its counters feed ``/metrics``."""

    def __init__(self, model: str, tokens: int, delay_s: float, *, max_running: int = 256) -> None:
        self.launch_info: dict[str, Any] | None = None
        self.api_key: str | None = None  # set: /v1 requires "Authorization: Bearer <key>"
        if tokens < 1:
            raise ValueError("tokens must be at least 1")
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.model = model
        self.tokens = tokens
        self.delay_s = delay_s
        self.max_running = max_running
        self.created = int(time.time())
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_total: dict[str, int] = {}
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the loop
        self._ids = itertools.count()
        self._id_prefix = os.urandom(6).hex()

        words = [_WORDS[i % len(_WORDS)] for i in range(tokens)]
        self._texts = ["".join(words[:n]) for n in range(tokens + 1)]
        model_json = orjson.dumps(model)
        # A chunk is head + id + mid + created + tail-for-its-token; only id and created vary.
        self._chat_mid = b'","object":"chat.completion.chunk","created":'
        self._text_mid = b'","object":"text_completion","created":'
        self._model_part = b',"model":' + model_json + b',"choices":'
        self._chat_role = b'[{"index":0,"delta":{"role":"assistant","content":""},' + (
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )
        self._chat_tok = [b'[{"index":0,"delta":{"content":' + orjson.dumps(w) for w in words]
        self._text_tok = [b'[{"index":0,"text":' + orjson.dumps(w) for w in words]
        self._chat_tok_end = b'},"logprobs":null,"finish_reason":'
        self._text_tok_end = b',"logprobs":null,"finish_reason":'
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": model,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "vllm",
                        "root": model,
                        "parent": None,
                        "max_model_len": 8192,
                    }
                ],
            }
        )
        self._labels = f'model_name="{_label(model)}",engine="0"'

    # ASGI entry point

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        method = scope["method"]
        if self.api_key is not None and path.startswith("/v1"):
            # vLLM's --api-key (VLLM_API_KEY): /v1 needs the bearer key; health and
            # metrics stay open. Its answer, exactly.
            given = dict(scope["headers"]).get(b"authorization", b"")
            if given != b"Bearer " + self.api_key.encode():
                await _respond(send, 401, b'{"error":"Unauthorized"}')
                return
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            if method != "POST":
                await _respond(
                    send, 405, _error_body("Method Not Allowed", "invalid_request_error", None)
                )
            elif path == "/v1/embeddings":
                await self._embeddings(receive, send)
            else:
                await self._completion(receive, send, chat=path == "/v1/chat/completions")
        elif path == "/debug/launch" and self.launch_info is not None:
            # What this process was started with: stand-in engines prove placement.
            await _respond(send, 200, orjson.dumps(self.launch_info))
        elif path in ("/health", "/v1/models", "/metrics"):
            if method != "GET":
                await _respond(
                    send, 405, _error_body("Method Not Allowed", "invalid_request_error", None)
                )
            elif path == "/health":
                await _respond(send, 200, b"", [])
            elif path == "/v1/models":
                await _respond(send, 200, self._models_body)
            else:
                await _respond(send, 200, self.metrics_text().encode(), _METRICS_HEADERS)
        else:
            await _respond(
                send, 404, _error_body(f"No route for {path}", "invalid_request_error", None)
            )

    # Completions

    async def _completion(self, receive: Receive, send: Send, *, chat: bool) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            params = self._parse(body, chat=chat)
        except _BadRequest as exc:
            await _respond(
                send, 400, _error_body(exc.message, "invalid_request_error", None, exc.param)
            )
            return
        if params is None:
            await _respond(send, 404, self._model_not_found(body))
            return
        n, prompt_tokens, stream, include_usage = params

        req = _Request()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, req))
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        try:
            if stream:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
            self.running += 1
            try:
                if stream:
                    done = await self._stream(send, req, n, prompt_tokens, include_usage, chat)
                else:
                    done = await self._whole(send, req, n, prompt_tokens, chat)
            finally:
                self.running -= 1
                self._slots.release()
            reason = ("length" if n < self.tokens else "stop") if done else "abort"
            self.success_total[reason] = self.success_total.get(reason, 0) + 1
        finally:
            watcher.cancel()

    def _parse(self, body: bytes, *, chat: bool) -> tuple[int, int, bool, bool] | None:
        """(tokens to emit, prompt tokens, stream, include_usage); None for a wrong model."""
        try:
            params = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _BadRequest("The request body is not valid JSON.") from None
        if not isinstance(params, dict):
            raise _BadRequest("The request body must be a JSON object.")
        model = params.get("model", self.model)
        if model != self.model:
            return None
        if chat:
            messages = params.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("'messages' must be a non-empty list.", "messages")
            chars = 0
            for m in messages:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    chars += len(content)
                elif isinstance(content, list):
                    chars += sum(
                        len(p["text"])
                        for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str)
                    )
            limit = params.get("max_completion_tokens")
            limit_name = "max_completion_tokens"
            if limit is None:
                limit, limit_name = params.get("max_tokens"), "max_tokens"
        else:
            prompt = params.get("prompt")
            if isinstance(prompt, str):
                chars = len(prompt)
            elif isinstance(prompt, list) and prompt:
                chars = sum(len(p) if isinstance(p, str | list) else 1 for p in prompt)
            else:
                raise _BadRequest("'prompt' must be a string or a non-empty list.", "prompt")
            limit, limit_name = params.get("max_tokens"), "max_tokens"
        n = self.tokens
        if limit is not None:
            if isinstance(limit, float) and limit.is_integer():
                limit = int(limit)  # vLLM's pydantic takes 8.0 for 8
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise _BadRequest(f"'{limit_name}' must be a positive integer.", limit_name)
            n = min(n, limit)
        stream = params.get("stream") is True
        options = params.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        return n, max(1, chars // 4), stream, include_usage

    # Embeddings: every input gets the same short vector.

    async def _embeddings(self, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            params = orjson.loads(body)
            if not isinstance(params, dict):
                raise _BadRequest("The request body must be a JSON object.")
            if params.get("model", self.model) != self.model:
                await _respond(send, 404, self._model_not_found(body))
                return
            count, tokens = _embedding_inputs(params.get("input"))
            dimensions = params.get("dimensions")
            if dimensions is not None and dimensions != len(_EMBEDDING):
                # What vLLM says for a model without Matryoshka embeddings.
                raise _BadRequest("Model does not support matryoshka representation", "dimensions")
        except orjson.JSONDecodeError:
            exc = _BadRequest("The request body is not valid JSON.")
            await _respond(send, 400, _error_body(exc.message, "invalid_request_error", None))
            return
        except _BadRequest as exc:
            await _respond(
                send, 400, _error_body(exc.message, "invalid_request_error", None, exc.param)
            )
            return
        vector = _EMBEDDING_B64 if params.get("encoding_format") == "base64" else _EMBEDDING
        answer = {
            "id": f"embd-{self._id_prefix}{next(self._ids):010x}",
            "object": "list",
            "created": int(time.time()),
            "model": self.model,
            "data": [
                {"index": i, "object": "embedding", "embedding": vector} for i in range(count)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }
        self.prompt_tokens_total += tokens
        await _respond(send, 200, orjson.dumps(answer))

    def _model_not_found(self, body: bytes) -> bytes:
        model = orjson.loads(body).get("model")
        return _error_body(
            f"The model `{model}` does not exist.",
            "invalid_request_error",
            "model_not_found",
            "model",
        )

    def _new_id(self, chat: bool) -> bytes:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return f"{prefix}{self._id_prefix}{next(self._ids):010x}".encode()

    async def _pause(self, req: _Request, until: float) -> None:
        if req.gone:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        req.waiter = fut
        handle = loop.call_at(until, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            req.waiter = None

    async def _stream(
        self, send: Send, req: _Request, n: int, prompt_tokens: int, include_usage: bool, chat: bool
    ) -> bool:
        loop = asyncio.get_running_loop()
        start = loop.time()
        created = int(time.time())
        head = (
            b'data: {"id":"'
            + self._new_id(chat)
            + (self._chat_mid if chat else self._text_mid)
            + str(created).encode()
            + self._model_part
        )
        toks = self._chat_tok if chat else self._text_tok
        tok_end = self._chat_tok_end if chat else self._text_tok_end
        finish = b'"length"}]}\n\n' if n < self.tokens else b'"stop"}]}\n\n'
        for i in range(n):
            await self._pause(req, start + (i + 1) * self.delay_s)
            if req.gone:
                return False
            last = i == n - 1
            chunk = head + toks[i] + tok_end + (finish if last else b"null}]}\n\n")
            if i == 0 and chat:
                chunk = head + self._chat_role + chunk
            self.generation_tokens_total += 1
            if not last:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self.prompt_tokens_total += prompt_tokens
        if include_usage:
            usage = orjson.dumps(_usage(prompt_tokens, n))
            chunk += head + b'[],"usage":' + usage + b"}\n\n"
        await send({"type": "http.response.body", "body": chunk + _DONE, "more_body": False})
        return True

    async def _whole(
        self, send: Send, req: _Request, n: int, prompt_tokens: int, chat: bool
    ) -> bool:
        loop = asyncio.get_running_loop()
        await self._pause(req, loop.time() + n * self.delay_s)
        if req.gone:
            return False
        self.prompt_tokens_total += prompt_tokens
        self.generation_tokens_total += n
        text = self._texts[n]
        finish_reason = "length" if n < self.tokens else "stop"
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = {
            "id": self._new_id(chat).decode(),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": _usage(prompt_tokens, n),
        }
        await _respond(send, 200, orjson.dumps(body))
        return True

    # Metrics

    def metrics_text(self) -> str:
        """The engine's state in Prometheus text format, named and labelled as vLLM does."""
        labels = self._labels
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {self.running / self.max_running}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(self.prompt_tokens_total)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {float(self.generation_tokens_total)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason in ("stop", "length", "abort"):
            count = float(self.success_total.get(reason, 0))
            lines.append(
                f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {count}'
            )
        return "\n".join(lines) + "\n"


_METRICS_HEADERS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
_EMBEDDING = [0.5, -0.25, 0.125, 0.0, 0.75, -0.5, 0.25, -0.125]
_EMBEDDING_B64 = base64.b64encode(struct.pack("<8f", *_EMBEDDING)).decode()


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client left first."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


def _embedding_inputs(value: Any) -> tuple[int, int]:
    """(inputs, prompt tokens) for OpenAI's four input forms."""
    if isinstance(value, str):
        return 1, max(1, len(value) // 4)
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return 1, len(value)
        if all(isinstance(v, str | list) for v in value):
            return len(value), sum(
                max(1, len(v) // 4 if isinstance(v, str) else len(v)) for v in value
            )
    raise _BadRequest("'input' must be a string, an array of strings or of token ids.", "input")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON_HEADERS
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(model: str, tokens: int, delay_s: float, *, max_running: int = 256) -> FakeEngine:
    """A fake engine serving ``model``: ``tokens`` tokens, ``delay_s`` apart, per completion."""
    return FakeEngine(model, tokens, delay_s, max_running=max_running)


VLLM_SERVER = ["-m", "vllm.entrypoints.openai.api_server"]


def _vllm_compatible(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """`--model W --served-model-name N --host H --port P ...`: the command line the
    appliance gives vLLM's OpenAI server module (after `python -m ...`).

    Other vLLM flags are accepted and reported, not acted on, except `--max-num-seqs`
    (requests beyond it wait, as in vLLM): this stands in for vLLM where no GPU is at
    hand (placement and scaling tests on Ray with declared GPUs). FAKE_ENGINE_TOKENS and
    FAKE_ENGINE_DELAY_MS in its environment (a model's `engine_env`) set the answers'
    length and pace (8 tokens 5 ms apart). On SIGTERM it cuts off the requests in flight
    and exits, as vLLM does with its default `--shutdown-timeout 0` ("abort" mode); a
    completion's id is its process's own prefix and a counter, so a test can tell which
    engine answered.
    """
    parser = argparse.ArgumentParser(prog="fake-vllm")
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--distributed-executor-backend", default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args, _ = parser.parse_known_args(argv)
    info: dict[str, Any] = {
        "argv": ["python3", *VLLM_SERVER, *argv],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }
    if args.distributed_executor_backend == "ray":
        from appliance.testing.ray_executor import start_workers

        # Before serving, as vLLM places its workers before it answers /health.
        info["ray_address"] = os.environ.get("RAY_ADDRESS")
        info["bundle_indices"] = os.environ.get("VLLM_RAY_BUNDLE_INDICES")
        info["ranks"] = start_workers(args.tensor_parallel_size * args.pipeline_parallel_size)
    ns = argparse.Namespace(
        host=args.host,
        port=args.port,
        model=args.served_model_name,
        tokens=int(os.environ.get("FAKE_ENGINE_TOKENS", "8")),
        delay_ms=float(os.environ.get("FAKE_ENGINE_DELAY_MS", "5")),
        max_running=args.max_num_seqs,
    )
    return ns, info


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == VLLM_SERVER:
        # Standing in for `python -m vllm.entrypoints.openai.api_server ...`.
        args, info = _vllm_compatible(argv[2:])
        _run(args, info)
        return
    parser = argparse.ArgumentParser(
        prog="python -m appliance.testing.fake_engine",
        description="A fake OpenAI-compatible engine speaking vLLM's wire format.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="fake", help="the served model name")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="inter-token delay")
    parser.add_argument(
        "--max-running", type=int, default=256, help="concurrent requests before queueing"
    )
    _run(parser.parse_args(argv), None)


def _run(args: argparse.Namespace, launch_info: dict[str, Any] | None) -> None:
    import uvicorn

    app = create_app(args.model, args.tokens, args.delay_ms / 1000, max_running=args.max_running)
    app.launch_info = launch_info
    if launch_info is not None:  # standing in for vLLM: honour its key as vLLM does
        app.api_key = os.environ.get("VLLM_API_KEY") or None
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        # Standing in for vLLM: no grace for requests in flight (uvicorn's default waits
        # for them), so only the appliance's own drain can save them at a scale-down.
        timeout_graceful_shutdown=0 if launch_info is not None else None,
    )


if __name__ == "__main__":
    main()
