"""Errors in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}.

Every error the gateway answers goes through `error_response`, so clients written
against OpenAI see the shapes they expect. 5xx messages never carry internals.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    """An error to answer with, already classified for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        engine: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        # The engine's own refusal, passed on: not the gateway's (metrics tell them apart).
        self.engine = engine

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def error_response(err: GatewayError, request_id: str) -> Response:
    return Response(
        orjson.dumps(err.body()),
        status_code=err.status,
        media_type="application/json",
        headers={**err.headers, "x-request-id": request_id},
    )


def internal_error(request_id: str) -> GatewayError:
    return GatewayError(
        500,
        f"The gateway failed to handle this request (request id {request_id}). "
        "The appliance operator can find it in the gateway log.",
        type="server_error",
        code="internal_error",
    )


def sse_error_event(err: GatewayError) -> bytes:
    """An error delivered inside an event stream that has already started."""
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"
