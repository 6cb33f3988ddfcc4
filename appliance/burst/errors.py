"""What can go wrong at a cloud provider, in the OpenAI envelope, with the provider named.

    GatewayError (appliance.gateway.errors)    an answer in the OpenAI envelope
    ├── Unhonourable    400: the request asks for what this provider cannot do
    └── ProviderError   the provider refused, failed, throttled or timed out

A `ProviderError` says whether the provider's circuit breaker counts it (`counts`: 5xx,
429, timeouts and broken connections are the provider's trouble; a 4xx about the request
is the request's; a 404 means the configured model does not exist there, so it counts)
and whether another provider may be tried (`retryable`). Its message
is the provider's own message for 4xx (it is about the client's request), and a generic
one for 5xx and transport failures (their bodies can carry internals). No message ever
carries a credential: the request headers are never part of one.
"""

from __future__ import annotations

from typing import Any

from appliance.gateway.errors import GatewayError

MESSAGE_MAX = 1000


class Unhonourable(GatewayError):
    def __init__(self, provider: str, param: str, why: str) -> None:
        super().__init__(
            400,
            f"'{param}' cannot be sent to the cloud provider {provider!r}: {why}",
            param=param,
            code="unsupported_parameter",
        )
        self.provider = provider


class ProviderError(GatewayError):
    def __init__(
        self,
        provider: str,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        counts: bool,
        retry_after_s: float | None = None,
        param: str | None = None,
    ) -> None:
        headers = {}
        if retry_after_s is not None:
            headers = {
                "retry-after": str(max(1, round(retry_after_s))),
                "retry-after-ms": str(round(retry_after_s * 1000)),
            }
        super().__init__(
            status,
            f"Cloud provider {provider!r}: {message}",
            type=type,
            param=param,
            code=code,
            headers=headers,
        )
        self.provider = provider
        self.counts = counts
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """Another provider (or the local model) may take the request instead."""
        return self.counts


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_MAX else text[:MESSAGE_MAX] + "..."


def retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds; a date is not parsed)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def from_status(
    provider: str,
    status: int,
    message: str | None,
    code: str | None,
    retry_s: float | None,
    param: str | None = None,
) -> ProviderError:
    """The provider answered `status` with (its own) message and code."""
    if status == 429:
        return ProviderError(
            provider,
            429,
            _clip(message or "rate limit reached") + "; retry later.",
            type="requests",
            code="rate_limit_exceeded",
            counts=True,
            retry_after_s=retry_s,
        )
    if status >= 500 or status in (408, 424):
        # Overloaded (Anthropic's 529), failed, timed out: not the client's fault, and the
        # body is not the client's to see.
        return ProviderError(
            provider,
            502 if status != 503 and status != 529 else 503,
            f"failed to answer (HTTP {status}{', ' + code if code else ''}); retry shortly.",
            type="server_error",
            code="upstream_error",
            counts=True,
            retry_after_s=retry_s,
        )
    if status in (401, 403):
        # Our credentials, not the client's: the client can do nothing, the operator can.
        return ProviderError(
            provider,
            502,
            f"refused the appliance's credentials (HTTP {status}); the appliance operator "
            "must check them.",
            type="server_error",
            code="upstream_auth_error",
            counts=True,
        )
    if status == 404:
        # The mapped model or deployment does not exist there: the configuration's fault,
        # and every request for the model will meet it.
        return ProviderError(
            provider,
            502,
            "does not know the model or deployment it was sent (HTTP 404); the appliance "
            "operator must check [burst.providers] models.",
            type="server_error",
            code="upstream_model_not_found",
            counts=True,
        )
    return ProviderError(
        provider,
        status if 400 <= status < 500 else 400,
        _clip(message or f"refused the request (HTTP {status})"),
        type="invalid_request_error",
        code=code or "upstream_rejected",
        counts=False,
        param=param,
    )


def timeout(provider: str, what: str) -> ProviderError:
    return ProviderError(
        provider,
        504,
        f"did not answer in time ({what}); retry shortly.",
        type="server_error",
        code="upstream_timeout",
        counts=True,
    )


def unreachable(provider: str) -> ProviderError:
    return ProviderError(
        provider,
        502,
        "could not be reached; retry shortly.",
        type="server_error",
        code="upstream_unreachable",
        counts=True,
    )


def broken(provider: str, what: str) -> ProviderError:
    return ProviderError(
        provider,
        502,
        f"sent an answer that could not be read ({what}); retry shortly.",
        type="server_error",
        code="upstream_error",
        counts=True,
    )
