"""Checks on request bodies before they reach an engine.

Only what the gateway needs and what every engine agrees on is checked here; anything
else passes through for the engine to judge. Each failure names the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.gateway.errors import invalid


@dataclass(frozen=True)
class Caps:
    max_n: int = 8
    max_messages: int = 2048
    max_stop: int = 4
    max_stop_chars: int = 256
    max_tools: int = 128
    max_tokens: int = 1_048_576
    max_json_depth: int = 64


@dataclass(frozen=True)
class Checked:
    model: str
    stream: bool
    max_tokens: int | None
    n: int
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    prompts: list[str | list[int]] | None = None
    inputs: list[str | list[int]] | None = None
    body: dict[str, Any] = field(default_factory=dict)


def extensions_for(engine: str) -> frozenset[str]:
    return frozenset()


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise invalid("The request body is empty; send a JSON object.", None, "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_json")
    return body


def _number(body: dict[str, Any], name: str, low: float, high: float | None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{name}' must be a number.", name, "invalid_type")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(f"'{name}' must be {bound}; got {value}.", name)


def _positive_int(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer.", name, "invalid_type")
    if value < 1:
        raise invalid(f"'{name}' must be at least 1; got {value}.", name)


def _text_or_array(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        raise invalid(f"'{name}' is required.", name, "missing_required_parameter")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise invalid(f"'{name}' must be a string or a non-empty array.", name, "invalid_type")


def _common(body: dict[str, Any]) -> tuple[str, bool]:
    model = body.get("model")
    if model is None:
        raise invalid("'model' is required.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise invalid("'model' must be a non-empty string.", "model", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false.", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object.", "stream_options", "invalid_type")
        if not stream:
            raise invalid(
                "'stream_options' is only allowed when 'stream' is true.", "stream_options"
            )
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise invalid(
                "'stream_options.include_usage' must be true or false.",
                "stream_options.include_usage",
                "invalid_type",
            )
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _positive_int(body, "max_tokens")
    _positive_int(body, "n")
    return model, stream


def _checked(body: dict[str, Any], model: str, stream: bool, **kw: Any) -> Checked:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return Checked(model, stream, max_tokens, body.get("n") or 1, body=body, **kw)


def _listed(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]
    return list(value)


def chat_request(
    body: dict[str, Any], caps: Caps = Caps(), extensions: frozenset[str] = frozenset()
) -> Checked:
    """Validate a chat completion request."""
    model, stream = _common(body)
    _positive_int(body, "max_completion_tokens")
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array.", "messages", "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"'messages[{i}]' must be an object.", f"messages[{i}]", "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(
                f"'messages[{i}].role' is required.",
                f"messages[{i}].role",
                "missing_required_parameter",
            )
    return _checked(body, model, stream, messages=messages, tools=body.get("tools"))


def completion_request(
    body: dict[str, Any], caps: Caps = Caps(), extensions: frozenset[str] = frozenset()
) -> Checked:
    """Validate a legacy completion request."""
    model, stream = _common(body)
    _text_or_array(body, "prompt")
    return _checked(body, model, stream, prompts=_listed(body["prompt"]))


def embedding_request(
    body: dict[str, Any], caps: Caps = Caps(), extensions: frozenset[str] = frozenset()
) -> Checked:
    """Validate an embeddings request: embeddings never stream."""
    model, _ = _common({k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    _text_or_array(body, "input")
    return _checked(body, model, False, inputs=_listed(body["input"]))
