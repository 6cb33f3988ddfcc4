"""The OpenAI-compatible HTTP API.

Requests are checked, authorised and routed here; the engine's bytes are streamed back
unchanged except for the model name, which is rewritten when an engine calls the model
by another name. A client that goes away closes the upstream connection, which cancels
the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from appliance.gateway import validate
from appliance.gateway.errors import (
    GatewayError,
    error_response,
    internal_error,
    sse_error_event,
)
from appliance.gateway.replicas import Replica, ReplicaTable
from appliance.gateway.validate import Caps, Checked

log = logging.getLogger("appliance.gateway")

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class GatewaySettings:
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    retry_after_s: int = 5


class KeyChecker:
    """API keys by SHA-256 digest, reloaded from the state file every few seconds."""

    def __init__(self, load: Callable[[], dict[str, str]] | None, reload_s: float = 5.0) -> None:
        self._load = load
        self._reload_s = reload_s
        self._digests: dict[str, str] = {}
        self._loaded_at = float("-inf")

    @property
    def enabled(self) -> bool:
        return self._load is not None

    async def check(self, request: Request) -> str | None:
        """The key's name; raises 401 when the key is missing or unknown."""
        if self._load is None:
            return None
        if time.monotonic() - self._loaded_at > self._reload_s:
            self._digests = await asyncio.to_thread(self._load)
            self._loaded_at = time.monotonic()
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise GatewayError(
                401,
                "No API key provided. Send it as 'Authorization: Bearer <key>'; an admin "
                "creates keys with `appliance key create NAME`.",
                code="invalid_api_key",
            )
        name = self._digests.get(hashlib.sha256(key.strip().encode()).hexdigest())
        if name is None:
            # Never echo the key back: it may be a real secret sent to the wrong place.
            raise GatewayError(
                401,
                "Incorrect API key provided. Ask the appliance admin for a valid key.",
                code="invalid_api_key",
            )
        return name


class ModelRewriter:
    """Swaps the engine's name for the model with the public one, event by event."""

    def __init__(self, engine_model: str, public: str) -> None:
        self.old = orjson.dumps(engine_model)
        self.new = orjson.dumps(public)
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self.pending = data
            return b""
        self.pending = data[cut + 2 :]
        return data[: cut + 2].replace(self.old, self.new)

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest.replace(self.old, self.new)


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
        return GatewayError(
            status,
            message,
            type=str(err.get("type") or "invalid_request_error"),
            param=err.get("param"),
            code=err.get("code"),
        )
    detail = body.get("detail") if isinstance(body, dict) else None
    message = str(detail) if detail else "The engine rejected the request."
    return GatewayError(status, message, code="engine_rejected")


class Gateway:
    def __init__(self, table: ReplicaTable, keys: KeyChecker, settings: GatewaySettings) -> None:
        self.table = table
        self.keys = keys
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None

    async def startup(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            # No limit on a whole answer (long generations are fine); a limit on silence.
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout_s,
                sock_read=self.settings.request_timeout_s,
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()

    # Plain endpoints.

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        body = {"ready": self.table.loaded, "models": self.table.counts()}
        return JSONResponse(body, status_code=200 if self.table.loaded else 503)

    async def models(self, request: Request) -> Response:
        request_id = uuid.uuid4().hex
        try:
            await self.keys.check(request)
        except GatewayError as err:
            return error_response(err, request_id)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "appliance"}
            for m in self.table.models
        ]
        return JSONResponse({"object": "list", "data": data}, headers={"x-request-id": request_id})

    async def model(self, request: Request) -> Response:
        request_id = uuid.uuid4().hex
        name = request.path_params["model"]
        try:
            await self.keys.check(request)
            if not self.table.knows(name):
                raise self._not_found(name)
        except GatewayError as err:
            return error_response(err, request_id)
        return JSONResponse(
            {"id": name, "object": "model", "created": 0, "owned_by": "appliance"},
            headers={"x-request-id": request_id},
        )

    # Inference endpoints.

    async def chat(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/chat/completions", validate.chat_request)

    async def completions(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/completions", validate.completion_request)

    async def embeddings(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/embeddings", validate.embedding_request)

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

    async def _proxy(
        self,
        request: Request,
        path: str,
        check: Callable[[dict[str, Any], Caps, frozenset[str]], Checked],
    ) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            await self.keys.check(request)
            body = validate.parse_body(await request.body())
            # TODO: the extensions of the replica's engine, once Replica names it.
            checked = check(body, Caps(), validate.extensions_for("vllm"))
            model, stream, body = checked.model, checked.stream, checked.body
            if not self.table.loaded:
                raise self._unavailable(model)
            if not self.table.knows(model):
                raise self._not_found(model)
            return await self._forward(request_id, path, body, model, stream)
        except GatewayError as err:
            return error_response(err, request_id)
        except Exception:
            log.exception("request %s failed", request_id)
            return error_response(internal_error(request_id), request_id)

    async def _open_upstream(
        self, request_id: str, path: str, body: dict[str, Any], model: str
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        """Send the request to a replica; a replica that refuses the connection is skipped."""
        assert self.session is not None
        tried: set[str] = set()
        while True:
            replica = self.table.pick(model, frozenset(tried))
            if replica is None:
                raise self._unavailable(model)
            payload = body
            if replica.rewrites_request:
                payload = {**body, "model": replica.engine_model}
            self.table.acquire(replica)
            try:
                upstream = await self.session.post(
                    replica.url + path,
                    data=orjson.dumps(payload),
                    headers={"content-type": "application/json", "x-request-id": request_id},
                )
                return replica, upstream
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                # Nothing reached the engine: safe to try another replica.
                self.table.release(replica)
                self.table.mark_failed(replica)
                tried.add(replica.replica_id)
                log.warning("replica %s of %s refused a connection", replica.replica_id, model)
            except BaseException:
                self.table.release(replica)
                raise

    async def _forward(
        self, request_id: str, path: str, body: dict[str, Any], model: str, stream: bool
    ) -> Response:
        try:
            replica, upstream = await self._open_upstream(request_id, path, body, model)
        except (TimeoutError, aiohttp.ClientError):
            raise GatewayError(
                502,
                "The model's engine could not be reached; retry shortly.",
                type="server_error",
                code="engine_error",
            ) from None
        headers = {"x-request-id": request_id}
        if upstream.status != 200 or not stream:
            try:
                raw = await upstream.read()
            except (TimeoutError, aiohttp.ClientError):
                upstream.close()
                raise GatewayError(
                    502,
                    "The model's engine failed while answering; retry shortly.",
                    type="server_error",
                    code="engine_error",
                ) from None
            finally:
                self.table.release(replica)
            if upstream.status != 200:
                raise _engine_error_body(upstream.status, raw)
            if replica.rewrites_response:
                raw = raw.replace(orjson.dumps(replica.response_model), orjson.dumps(model))
            return Response(raw, status_code=200, media_type="application/json", headers=headers)
        return StreamingResponse(
            self._relay(replica, upstream, model, request_id),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )

    async def _relay(
        self, replica: Replica, upstream: aiohttp.ClientResponse, model: str, request_id: str
    ) -> AsyncIterator[bytes]:
        rewriter = (
            ModelRewriter(replica.response_model, model) if replica.rewrites_response else None
        )
        finished = False
        tail = b""
        try:
            async for chunk in upstream.content.iter_any():
                if rewriter is not None:
                    chunk = rewriter.feed(chunk)
                    if not chunk:
                        continue
                tail = chunk
                yield chunk
            if rewriter is not None and (rest := rewriter.flush()):
                tail = rest
                yield rest
            finished = True
            # Some engines (transformers serve) end the stream without OpenAI's terminator;
            # clients other than the openai package wait for it.
            if not tail.rstrip().endswith(b"data: [DONE]"):
                yield SSE_DONE
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("engine stream for %s broke (request %s): %r", model, request_id, exc)
            self.table.mark_failed(replica)
            yield sse_error_event(
                GatewayError(
                    502,
                    "The model's engine stopped while streaming this response; retry the request.",
                    type="server_error",
                    code="engine_error",
                )
            )
        finally:
            self.table.release(replica)
            if finished:
                upstream.release()
            else:
                # Closing the connection is what tells the engine to stop generating.
                upstream.close()


def create_app(
    table: ReplicaTable,
    keys: KeyChecker | None = None,
    settings: GatewaySettings | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> Starlette:
    gateway = Gateway(table, keys or KeyChecker(None), settings or GatewaySettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.startup()
        try:
            yield
        finally:
            await gateway.shutdown()
            if on_shutdown is not None:
                on_shutdown()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = (
                f"No route {request.method} {request.url.path} on this gateway; the API lives "
                "under /v1 (chat/completions, completions, embeddings, models)."
            )
        err = GatewayError(exc.status_code, message, code=code)
        return error_response(err, uuid.uuid4().hex)

    routes = [
        Route("/healthz", gateway.healthz),
        Route("/readyz", gateway.readyz),
        Route("/v1/models", gateway.models),
        Route("/v1/models/{model:path}", gateway.model),
        Route("/v1/chat/completions", gateway.chat, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/embeddings", gateway.embeddings, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    app.state.gateway = gateway
    return app
