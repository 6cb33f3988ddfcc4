"""What every provider shares: the route, usage and cost, the OpenAI shapes it answers in.

A provider turns the gateway's validated chat request (`Checked`) into its own request
and its answer back into OpenAI's: a whole `chat.completion`, or `chat.completion.chunk`
events shaped as a local vLLM streams them (a role chunk, content or tool-call deltas, a
chunk with `finish_reason`, then, when the client asked with
`stream_options.include_usage`, a usage chunk with empty `choices`, and `data: [DONE]`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.burst.errors import Unhonourable
from appliance.gateway.validate import Checked
from appliance.prices import token_cost

# Every top-level field `validate.chat_request` forwards for a chat request (advisory
# fields are already gone). A translator maps each or refuses it; an engine extension
# (vLLM's top_k, ...) is refused unless a translator maps it.
CHAT_FIELDS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "temperature", "top_p",
        "presence_penalty", "frequency_penalty", "logit_bias", "max_tokens",
        "max_completion_tokens", "n", "seed", "stop", "tools", "tool_choice", "logprobs",
        "top_logprobs", "response_format", "parallel_tool_calls", "reasoning_effort",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Route:
    """One provider's answer to "where does this local model go": its name there, prices."""

    provider: str
    local_model: str
    remote_model: str
    input_per_million: float
    output_per_million: float

    def cost(self, usage: Usage) -> float:
        return token_cost(
            usage.prompt_tokens,
            usage.completion_tokens,
            self.input_per_million,
            self.output_per_million,
        )


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class Answer:
    """A whole answer: OpenAI's `chat.completion` body, its usage and what it cost."""

    route: Route
    body: dict[str, Any]
    usage: Usage
    cost: float
    latency_s: float


@dataclass
class StreamAnswer:
    """A streamed answer: iterate `events` for SSE bytes (ending in `data: [DONE]`).
    `usage` and `cost` are final once the iteration ends; `first_byte_s` is the time to
    the provider's first token (the first event past the role chunk). The iterator
    raises `ProviderError` when the provider's stream fails. `aclose()` ends it early
    (the client left): the upstream request is cancelled and the books are closed,
    whether or not iteration had begun."""

    route: Route
    events: AsyncIterator[bytes]
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0
    first_byte_s: float | None = None
    # Run by aclose(), each at most once: iterators to close, then plain callbacks.
    inner: list[AsyncIterator[bytes]] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    async def aclose(self) -> None:
        for events in (self.events, *self.inner):
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        closers, self.closers, self.inner = self.closers, [], []
        for closer in closers:
            closer()


class Preamble(bytes):
    """An event that carries no token yet (the role chunk): a stream that fails after it
    has still told the client nothing, so another provider may take the request."""


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def whole(
    id_: str,
    model: str,
    content: str | None,
    tool_calls: list[dict[str, Any]],
    finish_reason: str,
    usage: Usage,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": usage.openai(),
    }


class ChunkWriter:
    """OpenAI's stream chunks for one answer, as SSE bytes."""

    def __init__(self, model: str, include_usage: bool, id_: str | None = None) -> None:
        self.id = id_ or completion_id()
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._event(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def role(self) -> bytes:
        return Preamble(self.delta({"role": "assistant", "content": ""}))

    def finish(self, reason: str) -> bytes:
        return self.delta({}, reason)

    def usage(self, usage: Usage) -> bytes:
        return self._event([], usage=usage.openai()) if self.include_usage else b""

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"


def include_usage(checked: Checked) -> bool:
    options = checked.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


Rule = Callable[[Any], str | None]


def refuse(provider: str, body: dict[str, Any], rules: dict[str, Rule | None]) -> None:
    """Refuse every field of `body` the provider cannot honour. `rules` maps each field
    the translator handles to None (always honoured) or a check returning why not."""
    for name, value in body.items():
        if name not in rules:
            why = (
                "it is an extension of the local model's engine, which the provider does not take."
                if name not in CHAT_FIELDS
                else "the provider has no equivalent."
            )
            raise Unhonourable(provider, name, why)
        check = rules[name]
        if check is not None and (reason := check(value)) is not None:
            raise Unhonourable(provider, name, reason)


def only(values: Iterable[Any], why: str) -> Rule:
    """A rule that accepts only values that ask for nothing (false, 0, 1, "text"...)."""
    allowed = list(values)
    return lambda value: None if value in allowed else why


def message_api_rules(api: str, temperature_of: str) -> dict[str, Rule | None]:
    """The fields Anthropic Messages and Bedrock Converse share: one answer per request,
    temperature 0-1, no log probabilities, seed, penalties, logit bias or JSON mode. `api`
    names the API in the reasons; each translator adds or overrides its own fields."""

    def response_format(value: Any) -> str | None:
        if value.get("type") == "text":
            return None
        return f"{api} has no JSON mode; describe the format in the messages, or use a tool."

    return {
        "model": None,
        "messages": None,
        "stream": None,
        "stream_options": None,
        "temperature": lambda v: None if v <= 1 else f"{temperature_of} goes from 0 to 1.",
        "top_p": None,
        "max_tokens": None,
        "max_completion_tokens": None,
        "stop": None,
        "tools": None,
        "tool_choice": None,
        "parallel_tool_calls": None,
        "n": only([1], f"{api} returns one answer per request; send n requests."),
        "logprobs": only([False], f"{api} returns no log probabilities."),
        "top_logprobs": only([0], f"{api} returns no log probabilities."),
        "seed": lambda _: f"{api} has no seed.",
        "presence_penalty": only([0], f"{api} has no presence penalty."),
        "frequency_penalty": only([0], f"{api} has no frequency penalty."),
        "logit_bias": only([{}], f"{api} has no logit bias."),
        "response_format": response_format,
    }


def text_of(content: Any) -> str:
    """The text of a message whose content is a string or text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:image/png;base64,...` URL, else None."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, data = url[5:].split(";base64,", 1)
    return head, data
