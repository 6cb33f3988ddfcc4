"""The OpenAI-compatible HTTP API: admit, then forward.

A request is admitted before anything reaches an engine, in this order: API key (before
the body is read), body size and time (413/408), JSON and schema (`validate`, 400 with
`param`), model known and up (404/503), prompt plus `max_tokens` within the model's
context, counted with its own tokenizer (400 `context_length_exceeded`), then room on a
replica: at most the plan's `max_num_seqs` per replica, then a bounded wait in line, then
503 with Retry-After. A model scaled to zero first gets a replica: its requests wait for
one to start (`cold_start_timeout_s`, then 503 with Retry-After), and the answer says how
long they waited (`x-appliance-cold-start-ms`). Every error is the OpenAI envelope.

The engine's bytes are streamed back unchanged except for the model name, rewritten when
an engine calls the model by another name. A client that goes away, streaming or not,
cancels its request here, and closing the upstream connection cancels it in the engine.
A pooled connection the engine had closed is never the cause of an error: a request
that fails on a reused connection before any answer is sent again on a new one.

The inference routes are raw ASGI (no per-request Starlette objects): they carry every
token of every answer, and the gateway's overhead budget is a few percent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.burst import NoRoute, ProviderError, StreamAnswer
from appliance.config import GatewayLimits
from appliance.gateway import validate
from appliance.gateway.access import AccessLog
from appliance.gateway.auth import KeyChecker
from appliance.gateway.deployments import MODALITY_PARTS, DeploymentBook, ModelInfo
from appliance.gateway.errors import GatewayError, error_response, internal_error, sse_error_event
from appliance.gateway.limits import SharedLimits, limited
from appliance.gateway.metrics import GatewayMetrics, upstream_of
from appliance.gateway.overflow import Overflow
from appliance.gateway.prefix import SESSION_HEADER
from appliance.gateway.prefix import Route as PrefixRoute
from appliance.gateway.relay import ModelRewriter, StreamTap, usage_of
from appliance.gateway.replicas import ColdStartTimeout, Overloaded, Replica, ReplicaTable
from appliance.gateway.tokens import PromptCounter, TemplateRefused
from appliance.gateway.upstream import ConnectFailed, EnginePool, EngineResponse, UpstreamError
from appliance.keys import KeyRecord
from appliance.ledger import Spool, UsageRow, body_line, refusal_line

log = logging.getLogger("appliance.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Check = Callable[[dict[str, Any], validate.Caps, frozenset[str]], validate.Checked]

SSE_DONE = b"data: [DONE]\n\n"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# A client's own request id is echoed only when it is this tame (it goes into headers/logs).
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Prompts shorter than this (characters of text) are counted on the event loop: a thread
# hop costs more than the count (tens of microseconds); longer ones go to a counting
# thread, where encoding releases the GIL (see tokens.py).
INLINE_COUNT_CHARS = 16 * 1024
_VLLM_EXTENSIONS = validate.extensions_for("vllm")
_SESSION_HEADER = SESSION_HEADER.encode()
# A kept streamed answer stops growing here (a runaway generation must not fill memory).
KEPT_CHUNKS_MAX = 20_000
# Refusals the audit log keeps besides the 4xx ones: the gateway shedding load.
_REFUSALS = {"model_overloaded", "too_many_connections"}
# Where a request ran, and why (docs/cloud-overflow.md): on every answer.
UPSTREAM_HEADER = "x-appliance-upstream"
# On an answer that waited for a model scaled to zero to start a replica: the wait, in ms.
COLD_START_HEADER = "x-appliance-cold-start-ms"
_IMAGE_PART = MODALITY_PARTS["image"]


@dataclass(frozen=True)
class GatewaySettings:
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    retry_after_s: int = 5
    cold_start_timeout_s: float = 300.0
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    # Identifies this gateway process to its supervisor (in /healthz and /readyz).
    instance: str = ""
    # The address really bound, e.g. https://0.0.0.0:8443 (in /healthz).
    listen: str = ""

    @property
    def caps(self) -> validate.Caps:
        lim = self.limits
        return validate.Caps(
            max_n=lim.max_n,
            max_messages=lim.max_messages,
            max_stop=lim.max_stop,
            max_tokens=lim.max_tokens,
            max_json_depth=lim.max_json_depth,
        )


def _engine_error_body(status: int, raw: bytes) -> GatewayError:
    """An engine's error, kept when it is already an OpenAI envelope."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if status >= 500:
        # An engine's 5xx can carry tracebacks and paths: log it, tell the client little.
        log.warning("engine answered %d: %s", status, raw[:2000].decode(errors="replace"))
        return GatewayError(
            502,
            "The model's engine failed while handling the request; retry shortly.",
            type="server_error",
            code="engine_error",
        )
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message") or "The engine rejected the request.")
        param = err.get("param")
        code = err.get("code")
        return GatewayError(
            status if 400 <= status < 500 else 502,
            message,
            type=str(err.get("type") or "invalid_request_error"),
            param=param if isinstance(param, str) else None,
            code=code if isinstance(code, str) else None,
            engine=True,
        )
    detail = body.get("detail") if isinstance(body, dict) else None
    message = str(detail) if detail else "The engine rejected the request."
    return GatewayError(
        status if 400 <= status < 500 else 502, message, code="engine_rejected", engine=True
    )


def _engine_unreachable() -> GatewayError:
    return GatewayError(
        502,
        "The model's engine could not be reached; retry shortly.",
        type="server_error",
        code="engine_error",
    )


class _ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Gateway:
    def __init__(
        self,
        table: ReplicaTable,
        keys: KeyChecker,
        settings: GatewaySettings,
        book: DeploymentBook | None = None,
        quota: SharedLimits | None = None,
        spool: Spool | None = None,
        metrics: GatewayMetrics | None = None,
        access: AccessLog | None = None,
        overflow: Overflow | None = None,
    ) -> None:
        self.table = table
        self.overflow = overflow
        self.quota = quota
        self.spool = spool
        self.metrics = metrics or GatewayMetrics(table)
        self.access = access
        self.keys = keys
        self.settings = settings
        self.limits = settings.limits
        self.caps = settings.caps
        self.book = book or DeploymentBook(None, None)
        self.engines = EnginePool(settings.connect_timeout_s, settings.request_timeout_s)
        self.in_flight = 0
        # Long prompts are counted here, never in the default executor the state reads use.
        self._counting = concurrent.futures.ThreadPoolExecutor(2, "prompt-count")

    async def startup(self) -> None:
        # Read at start, not at the first request: a disk that fills later must find
        # the keys and records already in hand.
        await self.book.refresh(force=True)
        await self.keys.prime()
        if self.overflow is not None:
            await self.overflow.start()

    async def shutdown(self) -> None:
        self.engines.close()
        if self.overflow is not None:
            await self.overflow.close()
        self._counting.shutdown(wait=False, cancel_futures=True)
        if self.access is not None:
            self.access.close()

    # Plain endpoints.

    def _ready(self) -> bool:
        """Ready: the replica table is loaded and every model has a healthy replica (or
        is scaled to zero: a request starts one)."""
        return self.table.ready()

    async def healthz(self, request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "instance": self.settings.instance, "listen": self.settings.listen}
        )

    async def readyz(self, request: Request) -> Response:
        ready = self._ready()
        body: dict[str, Any] = {"ready": ready, "instance": self.settings.instance}
        # Which models exist is for key holders only.
        if not self.keys.enabled or await self.keys.key(request.headers.get("authorization")):
            body["models"] = self.table.healthy_counts()
        return JSONResponse(body, status_code=200 if ready else 503)

    async def models(self, request: Request) -> Response:
        request_id = uuid.uuid4().hex
        try:
            key = await self.keys.check(request.headers.get("authorization"))
        except GatewayError as err:
            return error_response(err, request_id)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "appliance"}
            for m in self.table.models
            if key is None or key.policy.allows(m)
        ]
        return JSONResponse({"object": "list", "data": data}, headers={"x-request-id": request_id})

    async def model(self, request: Request) -> Response:
        request_id = uuid.uuid4().hex
        name = request.path_params["model"]
        try:
            key = await self.keys.check(request.headers.get("authorization"))
            if not self.table.knows(name) or (key is not None and not key.policy.allows(name)):
                raise self._not_found(name)
        except GatewayError as err:
            return error_response(err, request_id)
        return JSONResponse(
            {"id": name, "object": "model", "created": 0, "owned_by": "appliance"},
            headers={"x-request-id": request_id},
        )

    async def prometheus(self, request: Request) -> Response:
        """GET /metrics, for admin keys only: one port, one exposure policy (see
        docs/observability.md). Prometheus sends the key (`authorization`)."""
        request_id = uuid.uuid4().hex
        try:
            key = await self.keys.check(request.headers.get("authorization"))
            if key is not None and key.policy.scope != "admin":
                raise GatewayError(
                    403,
                    f"The API key '{key.name}' is a user key; /metrics needs an admin key. "
                    "Create one with `appliance key create NAME --admin` and give it to "
                    "Prometheus (authorization.credentials_file).",
                    type="permission_error",
                    code="admin_key_required",
                )
        except GatewayError as err:
            return error_response(err, request_id)
        # Reading every worker's files is file I/O: off the event loop.
        body = await asyncio.to_thread(self.metrics.render)
        return Response(body, media_type=PROMETHEUS_TEXT)

    def _not_found(self, model: str) -> GatewayError:
        return GatewayError(
            404,
            f"The model '{model}' does not exist on this appliance. "
            "GET /v1/models lists the models it serves.",
            param="model",
            code="model_not_found",
        )

    def _unavailable(self, model: str) -> GatewayError:
        return GatewayError(
            503,
            f"No healthy replica of '{model}' is available right now; retry after "
            f"{self.settings.retry_after_s} seconds.",
            type="server_error",
            code="model_unavailable",
            headers={"retry-after": str(self.settings.retry_after_s)},
        )

    def _cold_start_timeout(self, model: str, waited_s: float) -> GatewayError:
        return GatewayError(
            503,
            f"The model '{model}' was scaled to zero and no replica of it started within "
            f"{waited_s:.0f} seconds (gateway.cold_start_timeout_s); it is still starting: "
            f"retry after {self.settings.retry_after_s} seconds.",
            type="server_error",
            code="model_cold_start_timeout",
            headers={"retry-after": str(self.settings.retry_after_s)},
        )

    def _busy(self, message: str) -> GatewayError:
        return GatewayError(
            503,
            f"{message}; retry after {self.settings.retry_after_s} seconds.",
            type="server_error",
            code="model_overloaded",
            headers={"retry-after": str(self.settings.retry_after_s)},
        )

    # Inference endpoints: raw ASGI.

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, path: str, check: Check
    ) -> None:
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"")
        request_id = given.decode() if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        if self.in_flight >= self.limits.max_in_flight:
            err = self._busy(
                f"The gateway is handling its maximum of {self.limits.max_in_flight} requests"
            )
            self.metrics.refused("overloaded")
            await _send_error(send, err, request_id)
            return
        self.in_flight += 1
        client = scope.get("client")
        row = UsageRow(request_id, path, client=client[0] if client else None)
        try:
            await self._handle(headers, receive, send, path, check, row)
        except _ClientGone:
            row.status, row.error = 499, "client_closed_request"
            log.info("request %s: the client went away before the answer was complete", request_id)
        except GatewayError as err:
            row.status, row.error = err.status, err.code
            self._emit(row, err)  # before the answer: see ledger.py
            await _send_error(send, err, request_id)
        except Exception:
            log.exception("request %s failed", request_id)
            failure = internal_error(request_id)
            row.status, row.error = failure.status, failure.code
            self._emit(row)
            await _send_error(send, failure, request_id)
        finally:
            self.in_flight -= 1
            self._emit(row)

    def _emit(self, row: UsageRow, err: GatewayError | None = None) -> None:
        """The request's row is complete (once): write its ledger row (first: it is the
        record that must survive), an audit record if it was refused, then count it in
        the metrics and write its access log line."""
        if row.duration_ms is not None:
            return
        now = time.time()
        row.duration_ms = round((now - row.ts) * 1000, 3)
        if self.spool is not None:
            self.spool.write(row.to_json())
            if err is not None and (400 <= err.status < 500 or err.code in _REFUSALS):
                detail = {"status": err.status, "code": err.code, "path": row.path}
                if row.model:
                    detail["model"] = row.model
                self.spool.write(
                    refusal_line(
                        row.key or "anonymous", "request refused", row.model, detail, row.client
                    )
                )
        self.metrics.record(row, err, now)
        if self.access is not None:
            self.access.write(row, upstream_of(row))

    async def _handle(
        self,
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
        path: str,
        check: Check,
        row: UsageRow,
    ) -> None:
        request_id = row.request_id
        authorization = headers.get(b"authorization")
        key = await self.keys.check(authorization.decode("latin-1") if authorization else None)
        row.key = key.name if key is not None else None
        raw = await self._read_body(headers, receive)
        body = validate.parse_body(raw)
        await self.book.refresh()
        info = None
        model = body.get("model")
        if isinstance(model, str):
            info = self.book.get(model)
            if info is None and self.table.knows(model):
                info = await self.book.recheck(model)  # just added: read its record now
        # A model without a record yet (static replicas): the fake engine speaks vLLM.
        extensions = info.extensions if info is not None else _VLLM_EXTENSIONS
        # Image parts for a text-only model may still run at a provider whose model reads
        # them: the request is then checked as if the model did, and may only overflow.
        cloud_only: GatewayError | None = None
        overflow = self.overflow
        if (
            overflow is not None
            and check is validate.chat_request
            and _IMAGE_PART not in extensions
            and isinstance(model, str)
            and overflow.reads_images(model)
        ):
            try:
                checked = check(body, self.caps, extensions)
            except GatewayError as refused:
                checked = check(body, self.caps, extensions | {_IMAGE_PART})
                cloud_only = refused  # the answer if it cannot overflow
        else:
            checked = check(body, self.caps, extensions)
        model = row.model = checked.model
        row.stream = checked.stream
        if key is not None and not key.policy.allows(model):
            raise _not_allowed(key, model)
        if not self.table.loaded:
            raise self._unavailable(model)
        if not self.table.knows(model):
            raise self._not_found(model)
        self.table.note_request(model)  # demand, which the supervisor scales on
        if key is not None:
            checked = _within_key_caps(key, checked)
        # The key's token limits need the exact count; the context alone may not.
        exact = key is not None and (
            key.policy.tpm is not None or key.policy.max_prompt_tokens is not None
        )
        # The local context does not bound a request that can only run at a provider.
        tally = None if cloud_only else await self._check_context(checked, info, exact)
        try:
            prompt_tokens = tally.exact if tally is not None else None
            most = key.policy.max_prompt_tokens if key is not None else None
            if most is not None and prompt_tokens is not None and prompt_tokens > most:
                raise _key_cap(
                    f"This request's prompt has {prompt_tokens} tokens; the key "
                    f"'{key.name if key else ''}' allows at most {most}.",
                    "messages" if checked.messages is not None else "prompt",
                )
            row.prompt_tokens = prompt_tokens
            exchange = _Exchange(row)
            exchange.tally = tally
            exchange.key = key
            exchange.cloud_only = cloud_only
            exchange.route = self._route(headers, checked)
            if key is not None and key.policy.log_bodies_days:
                exchange.keep_days = key.policy.log_bodies_days
                exchange.request = raw
            grant = None
            if key is not None and self.quota is not None and limited(key):
                grant = self.quota.admit(key, prompt_tokens)
                exchange.headers.update(grant.headers)
            # From here on a client that leaves cancels the work: watch for it.
            task = asyncio.current_task()
            assert task is not None
            watcher = asyncio.ensure_future(_watch_disconnect(receive, task, exchange))
            try:
                if self.overflow is None:  # straight to the local path: nothing added
                    await self._forward(send, request_id, path, checked, info, raw, body, exchange)
                else:
                    local = functools.partial(
                        self._forward, send, request_id, path, checked, info, raw, body, exchange
                    )
                    await self._forward_or_overflow(
                        local, send, request_id, checked, info, exchange
                    )
            except asyncio.CancelledError:
                if not exchange.gone:
                    raise
                task.uncancel()
                raise _ClientGone from None
            finally:
                watcher.cancel()
                if grant is not None:
                    assert key is not None and self.quota is not None
                    self.quota.release(grant)
                    if row.completion_tokens:
                        self.quota.settle(key, row.completion_tokens)
        finally:
            # A prompt admitted on its bound alone is counted when the engine gave no count
            # (a failed request): the ledger's row has the number either way.
            if row.prompt_tokens is None and tally is not None:
                row.prompt_tokens = tally.total()

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = GatewayError(
            413,
            f"The request body is larger than the gateway's limit of {limit} bytes.",
            code="request_too_large",
            headers={"connection": "close"},
        )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if not length.isdigit():
                raise GatewayError(400, "Content-Length is not a number.", code="invalid_request")
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise GatewayError(
                408,
                f"The request body did not arrive within {self.limits.body_timeout_s:g} seconds.",
                code="request_timeout",
                headers={"connection": "close"},
            ) from None
        return b"".join(chunks)

    async def _check_context(
        self, checked: validate.Checked, info: ModelInfo | None, exact: bool
    ) -> _Tally | None:
        """Prompt tokens, after checking prompt + max_tokens against the model's context;
        None when uncounted. Unless `exact`, a short prompt whose upper bound plainly fits
        is left uncounted for now (`_Tally.later`)."""
        if info is None:
            return None
        limit = info.max_model_len
        counter = info.counter
        wanted = checked.max_tokens
        if counter is None:
            if limit is not None and wanted is not None and wanted >= limit:
                raise _context_error(
                    limit, None, wanted, "messages" if checked.messages else "prompt"
                )
            return None
        tally = _Tally()
        if checked.messages is not None:
            kwargs = checked.body.get("chat_template_kwargs")
            template_kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
            for key in ("add_generation_prompt", "continue_final_message"):
                if key in checked.body:
                    template_kwargs[key] = checked.body[key]
            messages, tools = checked.messages, checked.tools
            chars = _text_chars(messages)
            count: Callable[[bool], int]
            bound = None
            try:
                if chars < INLINE_COUNT_CHARS:
                    # Rendered here once: the bound and the count both read the text.
                    text = counter.render(messages, tools, template_kwargs) or ""
                    count = functools.partial(counter.rendered, text)
                    bound = None if exact else counter.at_most(text, False)
                else:
                    count = functools.partial(counter.chat, messages, tools, template_kwargs)
                await self._count(count, chars, counter, limit, wanted, "messages", tally, bound)
            except TemplateRefused as exc:
                raise GatewayError(
                    400, str(exc), param="messages", code="invalid_messages"
                ) from None
        else:
            items = checked.prompts if checked.prompts is not None else checked.inputs or []
            param = "prompt" if checked.prompts is not None else "input"
            for item in items:
                # Token ids count as they are (`prompt`): no bound needed.
                bound = counter.at_most(item, True) if isinstance(item, str) and not exact else None
                await self._count(
                    functools.partial(counter.prompt, item),
                    len(item) if isinstance(item, str) else 0,
                    counter,
                    limit,
                    wanted,
                    param,
                    tally,
                    bound,
                )
        return tally

    async def _count(
        self,
        count: Callable[[bool], int],
        chars: int,
        counter: PromptCounter,
        limit: int | None,
        wanted: int | None,
        param: str,
        tally: _Tally,
        bound: int | None = None,
    ) -> None:
        """One prompt's tokens into `tally`, checked against the context: short texts on
        the loop (or not at all when `bound` shows they fit), long ones in a counting
        thread, absurd ones refused on their length alone."""
        # Embeddings: the input alone must fit; a completion needs room for at least one.
        room = 0 if param == "input" else (wanted or 1)
        if chars < INLINE_COUNT_CHARS:
            if bound is not None and (limit is None or bound + room <= limit):
                tally.later.append(count)
                return
            tokens = count(False)
            tally.counted += tokens
        else:
            at_least = counter.at_least(chars)
            if limit is not None and at_least + room > limit:
                raise _context_error(limit, at_least, wanted, param, at_least=True)
            loop = asyncio.get_running_loop()
            tokens = await loop.run_in_executor(self._counting, count, True)
            tally.counted += tokens
        if limit is not None and tokens + room > limit:
            raise _context_error(limit, tokens, wanted, param)

    # Forwarding.

    async def _open_upstream(
        self, request_id: str, path: str, data: bytes, replica: Replica
    ) -> EngineResponse:
        """POST to the replica (a pooled connection the engine had closed is retried once
        on a new one by the pool: the engine never saw the request)."""
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if replica.api_key:
            headers["authorization"] = f"Bearer {replica.api_key}"
        return await self.engines.post(replica.url, path, data, headers)

    def _route(self, headers: dict[bytes, bytes], checked: validate.Checked) -> PrefixRoute | None:
        """The prompt's prefix keys and session, for the replica choice (routing.py)."""
        session = headers.get(_SESSION_HEADER)
        return self.table.chooser.route(
            checked.model,
            checked.messages,
            checked.prompts,
            session.decode("latin-1") if session else None,
        )

    async def _acquire(
        self,
        model: str,
        info: ModelInfo | None,
        tried: frozenset[str],
        route: PrefixRoute | None = None,
    ) -> Replica:
        capacity = None
        if info is not None:
            capacity = info.max_num_seqs or self.limits.cpu_max_num_seqs
        try:
            replica = await self.table.admit(
                model,
                capacity,
                self.limits.queue_per_replica,
                self.limits.queue_timeout_s,
                exclude=tried,
                route=route,
            )
        except Overloaded as exc:
            raise self._busy(exc.reason[0].upper() + exc.reason[1:]) from None
        if replica is None:
            raise self._unavailable(model)
        return replica

    async def _forward_or_overflow(
        self,
        local: Callable[[], Awaitable[None]],
        send: Send,
        request_id: str,
        checked: validate.Checked,
        info: ModelInfo | None,
        exchange: _Exchange,
    ) -> None:
        """`local` (the request's `_forward`), or a cloud provider instead of it or after it."""
        overflow = self.overflow
        assert overflow is not None
        if checked.messages is None or not overflow.serves(checked.model):
            await local()
            return
        # Cloud overflow (overflow.py): before the local line, or after a local failure.
        model = checked.model
        overflow.shares.count(model)
        if exchange.cloud_only is not None:
            if await self._overflow(overflow, send, request_id, checked, exchange, "images"):
                return
            err = exchange.cloud_error or exchange.cloud_only
            err.headers = {**err.headers, UPSTREAM_HEADER: exchange.headers[UPSTREAM_HEADER]}
            raise err
        capacity = None
        if info is not None:
            capacity = info.max_num_seqs or self.limits.cpu_max_num_seqs
        reason = overflow.trigger(model, capacity)
        if reason is not None and await self._overflow(
            overflow, send, request_id, checked, exchange, reason
        ):
            return
        exchange.queued_at, exchange.ahead = time.time(), overflow.ahead(model, capacity)
        try:
            await local()
        except GatewayError as err:
            reason = overflow.after_local(err.code)
            if reason is not None and await self._overflow(
                overflow, send, request_id, checked, exchange, reason
            ):
                return
            err.headers = {**err.headers, UPSTREAM_HEADER: exchange.headers[UPSTREAM_HEADER]}
            raise

    async def _overflow(
        self,
        overflow: Overflow,
        send: Send,
        request_id: str,
        checked: validate.Checked,
        exchange: _Exchange,
        reason: str,
    ) -> bool:
        """Send the request to a cloud provider if policy lets it and one can take it;
        True when the answer went to the client. Once per request: a request that stays
        local is answered locally (it waits, or gets the local 429/503)."""
        if exchange.overflow_decided:
            return False
        exchange.overflow_decided = True
        key = exchange.key
        refused = overflow.refusal(key) or overflow.take_share(checked.model)
        if refused is not None:
            self._stays_local(exchange, reason, refused.code, refused.message)
            return False
        assert key is not None  # anonymous requests are refused above
        tally = exchange.tally
        # The worst case held against the caps needs the prompt's tokens; uncounted (no
        # tokenizer, or images), its characters bound them (a token is at least one).
        prompt = tally.total() if tally is not None else _text_chars(checked.messages or [])
        sent: list[str] = []
        row = exchange.row
        try:
            if checked.stream:
                streamed = await overflow.burst.stream(checked, key.name, prompt, sent)
            else:
                whole = await overflow.burst.complete(checked, key.name, prompt, sent)
        except NoRoute as err:
            self._stays_local(exchange, reason, err.reason, err.why)
            return False
        except GatewayError as err:  # every provider tried failed (ProviderError, Unhonourable)
            provider = err.provider if isinstance(err, ProviderError) else (sent or ["-"])[-1]
            self.metrics.cloud_failed(checked.model, provider, err.code or "error")
            self._audit_overflow(exchange, reason, sent, None, err.status, err.code)
            exchange.cloud_error = err
            self._stays_local(exchange, reason, "provider_failed", err.message, audit=False)
            return False
        except BaseException:  # the client left: what was sent is on record all the same
            if sent:
                self._audit_overflow(exchange, reason, sent, None, 499, "client_closed_request")
            raise
        provider = (streamed if checked.stream else whole).route.provider
        self.metrics.overflowed(checked.model, provider, reason)
        row.upstream, row.upstream_reason = provider, reason
        exchange.headers[UPSTREAM_HEADER] = f"{provider}; reason={reason}"
        try:
            if checked.stream:
                await self._relay_cloud(send, request_id, exchange, streamed)
            else:
                row.cost = whole.cost
                raw = orjson.dumps(whole.body)
                if exchange.keep_days:
                    exchange.kept.append(raw)
                self._answered(exchange, whole.usage.openai())
                await _send_whole(send, 200, raw, request_id, exchange.headers)
        finally:
            status = row.status if exchange.answered else 499
            self._audit_overflow(exchange, reason, sent, provider, status, row.error)
            overflow.on_status(overflow.burst.status())
        return True

    async def _relay_cloud(
        self, send: Send, request_id: str, exchange: _Exchange, answer: StreamAnswer
    ) -> None:
        """A provider's stream to the client; the last event is held back until the
        ledger row is written (as for a local stream)."""
        row = exchange.row
        await _start_stream(send, request_id, exchange.headers)
        held = b""
        try:
            try:
                async for event in answer.events:
                    if row.ttft_ms is None:
                        row.ttft_ms = round((time.time() - row.ts) * 1000, 3)
                    if exchange.keep_days and len(exchange.kept) < KEPT_CHUNKS_MAX:
                        exchange.kept.append(event)
                    if held:
                        await send({"type": "http.response.body", "body": held, "more_body": True})
                    held = event
            except ProviderError as err:  # after the first token: the stream ends in an error
                if held:
                    await send({"type": "http.response.body", "body": held, "more_body": True})
                row.error = err.code
                row.cost = answer.route.cost(answer.usage)
                self._answered(exchange, answer.usage.openai(), status=err.status)
                event = sse_error_event(err)
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return
        finally:
            await answer.aclose()
        row.cost = answer.cost
        self._answered(exchange, answer.usage.openai())
        await send({"type": "http.response.body", "body": held, "more_body": False})

    def _stays_local(
        self, exchange: _Exchange, trigger: str, code: str, why: str, audit: bool = True
    ) -> None:
        """A trigger fired but the request may not, or could not, leave."""
        row = exchange.row
        exchange.headers[UPSTREAM_HEADER] = f"local; overflow_refused={code}"
        self.metrics.overflow_refused(row.model, code)
        if audit and self.spool is not None:
            detail: dict[str, Any] = {
                "request_id": row.request_id,
                "trigger": trigger,
                "refusal": code,
                "why": why,
            }
            if exchange.key is not None:
                detail["data_class"] = exchange.key.policy.data_class
            self.spool.write(
                refusal_line(
                    row.key or "anonymous", "cloud overflow refused", row.model, detail, row.client
                )
            )

    def _audit_overflow(
        self,
        exchange: _Exchange,
        trigger: str,
        sent: list[str],
        answered_by: str | None,
        status: int,
        error: str | None,
    ) -> None:
        """The request left the site: every provider it reached, and how it ended."""
        if self.spool is None:
            return
        row = exchange.row
        key = exchange.key
        detail: dict[str, Any] = {
            "request_id": row.request_id,
            "trigger": trigger,
            "providers": sent,
            "answered_by": answered_by,
            "status": status,
            "data_class": key.policy.data_class if key is not None else None,
        }
        if error:
            detail["error"] = error
        if row.cost is not None:
            detail["cost"] = row.cost
        self.spool.write(
            refusal_line(row.key or "anonymous", "cloud overflow", row.model, detail, row.client)
        )

    async def _forward(
        self,
        send: Send,
        request_id: str,
        path: str,
        checked: validate.Checked,
        info: ModelInfo | None,
        raw: bytes,
        body: dict[str, Any],
        exchange: _Exchange,
    ) -> None:
        model = checked.model
        forwarded = checked.body
        options = forwarded.get("stream_options")
        if checked.stream and not (isinstance(options, dict) and options.get("include_usage")):
            # The ledger needs the usage; the tap hides it from a client that did not ask.
            forwarded = {**forwarded, "stream_options": {**(options or {}), "include_usage": True}}
            exchange.hide_usage = True
        if self.table.cold(model):
            try:
                waited = await self.table.wait_warm(model, self.settings.cold_start_timeout_s)
            except ColdStartTimeout as exc:
                raise self._cold_start_timeout(model, exc.waited_s) from None
            exchange.headers[COLD_START_HEADER] = str(round(waited * 1000))
            self.metrics.cold_started(model, waited)
        tried: set[str] = set()
        while True:
            replica = await self._acquire(model, info, frozenset(tried), exchange.route)
            exchange.row.replica = replica.replica_id
            try:
                payload: dict[str, Any] | None = None
                if replica.rewrites_request:
                    payload = {**forwarded, "model": replica.engine_model}
                elif forwarded is not body:
                    payload = forwarded
                try:
                    data = raw if payload is None else orjson.dumps(payload)
                except orjson.JSONEncodeError:
                    raise GatewayError(
                        400, "The request body is nested too deeply.", code="invalid_json"
                    ) from None
                try:
                    upstream = await self._open_upstream(request_id, path, data, replica)
                    break
                except ConnectFailed:
                    # Nothing reached the engine: safe to try another replica.
                    self.table.mark_failed(replica)
                    self.metrics.engine_failed(model, replica.replica_id)
                    tried.add(replica.replica_id)
                    log.warning("replica %s of %s refused a connection", replica.replica_id, model)
                except (TimeoutError, UpstreamError):
                    raise _engine_unreachable() from None
            except BaseException:
                self.table.release(replica)
                raise
            self.table.release(replica)
        exchange.acquired_at = time.time()
        await self._answer(send, exchange, request_id, checked, replica, upstream)

    async def _answer(
        self,
        send: Send,
        exchange: _Exchange,
        request_id: str,
        checked: validate.Checked,
        replica: Replica,
        upstream: EngineResponse,
    ) -> None:
        finished = False
        try:
            if upstream.status != 200 or not checked.stream:
                try:
                    raw = await upstream.read()
                except (TimeoutError, UpstreamError):
                    raise GatewayError(
                        502,
                        "The model's engine failed while answering; retry shortly.",
                        type="server_error",
                        code="engine_error",
                    ) from None
                finished = True
                if upstream.status != 200:
                    raise _engine_error_body(upstream.status, raw)
                if replica.rewrites_response:
                    raw = raw.replace(
                        orjson.dumps(replica.response_model), orjson.dumps(checked.model)
                    )
                if exchange.keep_days:
                    exchange.kept.append(raw)
                self._answered(exchange, usage_of(raw))
                await _send_whole(send, 200, raw, request_id, exchange.headers)
                return
            await _start_stream(send, request_id, exchange.headers)
            finished = await self._relay(
                send, exchange, replica, upstream, checked.model, request_id
            )
        finally:
            self.table.release(replica)
            if finished:
                upstream.release()
            else:
                # Closing the connection is what tells the engine to stop generating.
                upstream.close()

    async def _relay(
        self,
        send: Send,
        exchange: _Exchange,
        replica: Replica,
        upstream: EngineResponse,
        model: str,
        request_id: str,
    ) -> bool:
        """Stream the engine's events to the client; True when the engine finished."""
        rewriter = (
            ModelRewriter(replica.response_model, model) if replica.rewrites_response else None
        )
        tap = StreamTap(rewriter, exchange.hide_usage)
        tail = b""
        try:
            while piece := await upstream.readany():
                chunk = tap.feed(piece)
                if not chunk:
                    continue
                if exchange.row.ttft_ms is None:  # from the request's arrival
                    exchange.row.ttft_ms = round((time.time() - exchange.row.ts) * 1000, 3)
                tail = chunk
                if exchange.keep_days and len(exchange.kept) < KEPT_CHUNKS_MAX:
                    exchange.kept.append(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if rest := tap.flush():
                tail = rest
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except (TimeoutError, UpstreamError) as exc:
            log.warning("engine stream for %s broke (request %s): %r", model, request_id, exc)
            self.table.mark_failed(replica)
            event = sse_error_event(
                GatewayError(
                    502,
                    "The model's engine stopped while streaming this response; retry the request.",
                    type="server_error",
                    code="engine_error",
                )
            )
            exchange.row.status, exchange.row.error = 502, "engine_error"
            self._answered(exchange, tap.usage, status=502)
            await send({"type": "http.response.body", "body": event, "more_body": False})
            return False
        # An engine may end the stream without OpenAI's terminator (the first CPU engine,
        # transformers serve, did); clients other than the openai package wait for it.
        last = b"" if tail.rstrip().endswith(b"data: [DONE]") else SSE_DONE
        self._answered(exchange, tap.usage)
        await send({"type": "http.response.body", "body": last, "more_body": False})
        return True

    def _answered(
        self, exchange: _Exchange, usage: dict[str, Any] | None, status: int = 200
    ) -> None:
        """Just before the last byte: the row is complete and written (ledger.py)."""
        exchange.answered = True
        row = exchange.row
        row.status = status
        if row.ttft_ms is None and status == 200:  # a whole answer: its first token is all
            row.ttft_ms = round((time.time() - row.ts) * 1000, 3)
        if usage:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            row.prompt_tokens = prompt if isinstance(prompt, int) else row.prompt_tokens
            row.completion_tokens = completion if isinstance(completion, int) else None
        if row.prompt_tokens is None and exchange.tally is not None:
            row.prompt_tokens = exchange.tally.total()
        local = exchange.acquired_at and not row.upstream
        if self.overflow is not None and local and status == 200:
            # The local pace the latency trigger estimates from (overflow.py).
            assert row.ttft_ms is not None
            now, acquired = time.time(), exchange.acquired_at
            waited = acquired - exchange.queued_at if exchange.queued_at else 0.0
            self.overflow.observe(
                row.model or "",
                row.ttft_ms / 1000 - (acquired - row.ts),
                now - acquired,
                waited,
                exchange.ahead,
            )
        if self.spool is not None and exchange.keep_days:
            answer = b"".join(exchange.kept)
            self.spool.write(body_line(row, exchange.keep_days, exchange.request, answer))
        self._emit(row)


def _text_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in the messages (strings and text parts)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def _not_allowed(key: KeyRecord, model: str) -> GatewayError:
    allowed = ", ".join(key.policy.models or ())
    return GatewayError(
        403,
        f"The API key '{key.name}' may not use the model '{model}' (it may use: {allowed}). "
        "Ask the appliance admin to extend the key's models.",
        type="permission_error",
        param="model",
        code="model_not_allowed",
    )


def _key_cap(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="key_limit_exceeded")


def _within_key_caps(key: KeyRecord, checked: validate.Checked) -> validate.Checked:
    """The key's max_tokens cap: a larger ask is refused, a missing one is set to the cap
    (the engine would otherwise generate up to the end of the context)."""
    cap = key.policy.max_tokens
    if cap is None:
        return checked
    if checked.max_tokens is not None:
        if checked.max_tokens > cap:
            param = (
                "max_completion_tokens" if "max_completion_tokens" in checked.body else "max_tokens"
            )
            raise _key_cap(
                f"This request asks for {checked.max_tokens} tokens; the key '{key.name}' "
                f"allows at most {cap}.",
                param,
            )
        return checked
    field = "max_completion_tokens" if checked.messages is not None else "max_tokens"
    return dataclasses.replace(checked, max_tokens=cap, body={**checked.body, field: cap})


def _context_error(
    limit: int, prompt: int | None, wanted: int | None, param: str, at_least: bool = False
) -> GatewayError:
    what = {"messages": "messages", "prompt": "prompt", "input": "input"}[param]
    count = f"at least {prompt}" if at_least else f"{prompt}"
    if prompt is None:
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{wanted} tokens in the completion alone. Please reduce max_tokens."
        )
    elif wanted is None or at_least:
        message = (
            f"This model's maximum context length is {limit} tokens. However, your {what} "
            f"resulted in {count} tokens. Please reduce the length of the {what}."
        )
    else:
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt + wanted} tokens ({prompt} in the {what}, {wanted} in the completion). "
            f"Please reduce the length of the {what} or completion."
        )
    return GatewayError(400, message, param=param, code="context_length_exceeded")


class _Tally:
    """A request's prompt tokens: those counted, and prompts admitted on an upper bound
    alone, counted only if the number is wanted (`total`)."""

    __slots__ = ("counted", "later")

    def __init__(self) -> None:
        self.counted = 0
        self.later: list[Callable[[bool], int]] = []

    @property
    def exact(self) -> int | None:
        """The count, when every prompt was counted."""
        return None if self.later else self.counted

    def total(self) -> int:
        """The count, counting now what was left (short prompts: on the loop)."""
        self.counted += sum(count(False) for count in self.later)
        self.later.clear()
        return self.counted


class _Exchange:
    """One request's relation to its client once the body is in."""

    __slots__ = (
        "acquired_at", "ahead", "answered", "cloud_error", "cloud_only", "gone", "headers",
        "hide_usage", "keep_days", "kept", "key", "overflow_decided", "queued_at", "request",
        "route", "row", "tally",
    )  # fmt: skip

    def __init__(self, row: UsageRow) -> None:
        self.row = row
        self.route: PrefixRoute | None = None  # the prompt's prefix keys, for the replica choice
        self.tally: _Tally | None = None  # the prompt's tokens, or how to count them
        self.key: KeyRecord | None = None
        # The key's rate-limit headers, and where the request ran.
        self.headers: dict[str, str] = {UPSTREAM_HEADER: "local"}
        # With overflow on: when the request went to the local line, how many were in it
        # then, and when a local replica was acquired (wall clock): the local pace.
        self.queued_at = 0.0
        self.ahead: int | None = None
        self.acquired_at = 0.0
        # Cloud overflow: decided once; the 400 for images a local model cannot read
        # (the request may only overflow); the error of the providers it went to.
        self.overflow_decided = False
        self.cloud_only: GatewayError | None = None
        self.cloud_error: GatewayError | None = None
        self.hide_usage = False  # the engine was asked for usage the client did not want
        # A key that keeps its bodies: for how long, the request, and the answer so far.
        self.keep_days: int | None = None
        self.request = b""
        self.kept: list[bytes] = []
        # Set just before the last part of the answer is sent: uvicorn's `receive` says
        # "disconnect" for a finished answer too, which must not cancel anything.
        self.answered = False
        self.gone = False  # the client disconnected first


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], exchange: _Exchange) -> None:
    """Once the body is read, `receive` returns only when the client disconnects (or the
    answer is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not exchange.answered:
        exchange.gone = True
        task.cancel()


async def _send_whole(
    send: Send, status: int, body: bytes, request_id: str, extra: dict[str, str] | None = None
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _start_stream(send: Send, request_id: str, extra: dict[str, str]) -> None:
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-request-id", request_id.encode()),
        *((k.encode(), v.encode()) for k, v in extra.items()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})


async def _send_error(send: Send, err: GatewayError, request_id: str) -> None:
    with contextlib.suppress(RuntimeError):  # the response had already started
        await _send_whole(send, err.status, orjson.dumps(err.body()), request_id, err.headers)


class _Endpoint:
    """One inference route as a raw ASGI app (Starlette passes non-functions through)."""

    def __init__(self, gateway: Gateway, path: str, check: Check) -> None:
        self.gateway = gateway
        self.path = path
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gateway.handle(scope, receive, send, self.path, self.check)


def create_app(
    table: ReplicaTable,
    keys: KeyChecker | None = None,
    settings: GatewaySettings | None = None,
    on_shutdown: Callable[[], None] | None = None,
    book: DeploymentBook | None = None,
    quota: SharedLimits | None = None,
    spool: Spool | None = None,
    heartbeat: Callable[[], None] | None = None,
    metrics: GatewayMetrics | None = None,
    access: AccessLog | None = None,
    overflow: Overflow | None = None,
) -> GatewayApp:
    gateway = Gateway(
        table,
        keys or KeyChecker(None),
        settings or GatewaySettings(),
        book,
        quota,
        spool,
        metrics,
        access,
        overflow,
    )

    async def beat() -> None:
        # The event loop proves it runs: a worker that stops beating is restarted.
        assert heartbeat is not None
        while True:
            heartbeat()
            await asyncio.sleep(1.0)

    async def sample() -> None:
        # A gauge set once a second costs the request path nothing.
        while True:
            gateway.metrics.set_in_flight(gateway.in_flight)
            await asyncio.sleep(1.0)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.startup()
        beating = asyncio.ensure_future(beat()) if heartbeat is not None else None
        sampling = asyncio.ensure_future(sample())
        try:
            yield
        finally:
            sampling.cancel()
            if beating is not None:
                beating.cancel()
            await gateway.shutdown()
            if on_shutdown is not None:
                on_shutdown()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}; use {allow}."
        else:
            message = (
                f"No route {request.method} {request.url.path} on this gateway; the API lives "
                "under /v1 (chat/completions, completions, embeddings, models)."
            )
        err = GatewayError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
        return error_response(err, uuid.uuid4().hex)

    routes = [
        Route("/healthz", gateway.healthz),
        Route("/readyz", gateway.readyz),
        Route("/metrics", gateway.prometheus),
        Route("/v1/models", gateway.models),
        Route("/v1/models/{model:path}", gateway.model),
    ]
    inference = {
        path: _Endpoint(gateway, path, check)
        for path, check in (
            ("/v1/chat/completions", validate.chat_request),
            ("/v1/completions", validate.completion_request),
            ("/v1/embeddings", validate.embedding_request),
        )
    }
    # Registered with Starlette too, for its 405 (with Allow) on other methods.
    routes += [Route(path, endpoint, methods=["POST"]) for path, endpoint in inference.items()]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    app.state.gateway = gateway
    return GatewayApp(app, inference)


class GatewayApp:
    """The ASGI app: inference POSTs go straight to their handlers, everything else through
    Starlette. Starlette's middleware wraps `send` twice, which the handlers pay on every
    streamed chunk; they catch their own errors, so they need none of it."""

    def __init__(self, starlette: Starlette, inference: dict[str, _Endpoint]) -> None:
        self.starlette = starlette
        self.inference = inference

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.starlette.state.gateway
        return gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.inference.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.starlette(scope, receive, send)
