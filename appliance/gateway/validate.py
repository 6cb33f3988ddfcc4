"""Admission checks on request bodies, before anything reaches an engine.

Engines are not hardened against hostile input (a number as `content`, tool-call
`arguments` that are not JSON, `logit_bias: {"abc": 1}` all crashed one), so chat,
completion and embedding bodies are checked here against OpenAI's schema
(openai/openai-openapi: CreateChatCompletionRequest, CreateCompletionRequest,
CreateEmbeddingRequest and what they reference; nested shapes live in `schema`).
Every failure is a 400 `invalid_request_error` whose `param` names the field.

What passes, and what is forwarded (`Checked.body`):

- OpenAI's fields, type-checked strictly and bounded by `Caps`.
- A field the model's engine accepts as an extension (`extensions_for`, read from the
  adapters' `request_extensions`), depth-bounded and otherwise left to the engine. A
  dotted name such as `messages.reasoning_content` is a field inside that object.
- An unknown field is a 400 `unknown_parameter`, with a "did you mean" when close to a
  known one: OpenAI's answer, where the engines would drop it without a word.
- A top-level null is the same as leaving the field out, and is not forwarded.
- Valid OpenAI that no local engine honours is a 400 `unsupported_parameter` saying so,
  never a silent drop: `audio`, `modalities` with "audio", `prediction`,
  `web_search_options`, `moderation`, `functions`/`function_call` (use tools), `store:
  true`, `service_tier` other than auto/default, `verbosity` other than medium, custom
  tools and tool calls, `tool_choice` allowed_tools, assistant `audio`, image, audio
  and file content parts (unless the extensions name `content.image_url` etc. for a
  model that reads them), `suffix`, and `best_of` above 1 on engines without it.
- Advisory fields that change nothing about the answer are accepted, checked and not
  forwarded (engines reject or log them): `user`, `metadata`, `store: false`,
  `safety_identifier`, `prompt_cache_key`, `prompt_cache_retention`,
  `prompt_cache_options`, `service_tier` auto/default, `modalities: ["text"]`,
  `verbosity: "medium"`, `stream_options.include_obfuscation`. Text parts'
  `prompt_cache_breakpoint` is accepted and left in place (engines ignore it).
- Free-form JSON (tool parameters, json_schema.schema, tool-call arguments, extension
  values) nests at most `Caps.max_json_depth` levels, so nothing deep reaches an
  engine or orjson.dumps (254 levels).

Cost, timeit best of 5 on the 2-core dev machine: a small chat request (system + user
message, four sampling fields) 7 us; one with a tool, its call and the tool's answer
17 us. tests/test_validate.py holds the small one to well under 100 us.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.gateway import schema
from appliance.gateway.errors import GatewayError, invalid
from appliance.gateway.schema import INT64, missing, unsupported, unsupported_value


@dataclass(frozen=True)
class Caps:
    """Bounds for a shared endpoint; the gateway fills them from its config."""

    max_n: int = 8
    max_messages: int = 2048
    max_stop: int = 4
    max_stop_chars: int = 256
    max_tools: int = 128
    # An absolute ceiling; the context-length check is done with the tokenizer elsewhere.
    max_tokens: int = 1_048_576
    max_json_depth: int = 64
    max_logit_bias: int = 1024
    # Prompts per completion request and inputs per embedding request (OpenAI's 2048).
    max_inputs: int = 2048


@dataclass(frozen=True)
class Checked:
    model: str
    stream: bool
    max_tokens: int | None  # max_completion_tokens, else max_tokens; None when absent
    n: int  # choices per prompt
    messages: list[dict[str, Any]] | None = None  # chat: as sent (for the chat template)
    tools: list[dict[str, Any]] | None = None  # chat: as sent
    prompts: list[str | list[int]] | None = None  # completions: each prompt
    inputs: list[str | list[int]] | None = None  # embeddings: each input
    body: dict[str, Any] = field(default_factory=dict)  # what to forward to the engine


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


# A restriction, not an extension: set for models whose catalog entry names no tool-call
# parser. vLLM then answers no tool request, not even a named or required tool choice
# ("requires --tool-call-parser to be set"): the gateway says why, in the client's terms.
NO_TOOL_CALLS = "!tools"


@functools.cache
def extensions_for(engine: str) -> frozenset[str]:
    """The extra request fields an engine accepts; none for an engine we do not know."""
    from appliance.engines import ADAPTERS

    adapter = ADAPTERS.get(engine)
    return adapter.request_extensions if adapter is not None else frozenset()


# A rule checks one top-level field (never null: nulls are dropped first) and returns
# True when the field is to be dropped from what is forwarded.
Rule = Callable[[Any, str, Caps, frozenset[str]], bool | None]


def _later(value: Any, param: str, caps: Caps, ext: frozenset[str]) -> None:
    """Required or cross-field: checked after the loop, in a fixed order."""


def _number(low: float, high: float) -> Rule:
    def check(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
        schema.number(v, p, low, high)

    return check


def _integer(low: int, high: int) -> Rule:
    def check(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
        schema.integer(v, p, low, high)

    return check


def _choice(*options: str) -> Rule:
    def check(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
        schema.choice(v, p, options)

    return check


def _boolean(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    schema.boolean(v, p)


def _advisory(rule: Rule) -> Rule:
    def check(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> bool:
        rule(v, p, caps, ext)
        return True

    return check


def _unsupported(why: str) -> Rule:
    def check(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
        raise unsupported(p, why)

    return check


def _default_only(options: tuple[str, ...], accepted: tuple[str, ...], why: str) -> Rule:
    """An enum of which only the values asking for what the engines do anyway pass."""

    def check(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> bool:
        if schema.choice(v, p, options) not in accepted:
            raise unsupported_value(p, v, why)
        return True

    return check


def _string(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    schema.string(v, p)


def _max_tokens(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    schema.integer(v, p, 1, caps.max_tokens)


def _n(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    schema.integer(v, p, 1, caps.max_n)


def _stop(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> bool | None:
    if isinstance(v, str):
        _stop_string(v, p, caps)
        return None
    if not isinstance(v, list):
        raise schema.wrong_type(p, "a string or an array of strings", v)
    if len(v) > caps.max_stop:
        raise invalid(f"'{p}' has {len(v)} strings; at most {caps.max_stop} are allowed.", p)
    for i, item in enumerate(v):
        _stop_string(item, f"{p}[{i}]", caps)
    return not v  # [] means no stop strings, as absent does


def _stop_string(v: Any, p: str, caps: Caps) -> None:
    schema.string(v, p, empty=False, max_len=caps.max_stop_chars)


def _logit_bias(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    bias = schema.obj(v, p)
    if len(bias) > caps.max_logit_bias:
        raise invalid(
            f"'{p}' has {len(bias)} entries; at most {caps.max_logit_bias} are allowed.", p
        )
    for token, value in bias.items():
        where = f"{p}.{token}"
        if not (token.isascii() and token.isdigit() and len(token) <= 10) or int(token) >= 2**31:
            raise invalid(
                f"'{p}' maps token ids, written as integer strings like \"1234\", to a bias "
                f"from -100 to 100; {token!r} is not a token id.",
                where,
            )
        schema.number(value, where, -100, 100)


def _stream_options(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    options = schema.obj(v, p)
    known = frozenset({"include_usage", "include_obfuscation"})
    schema.keys(options, p, known, ext, p, caps.max_json_depth)
    for name in ("include_usage", "include_obfuscation"):
        if (flag := options.get(name)) is not None:
            schema.boolean(flag, f"{p}.{name}")


def _metadata(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    # OpenAI's limits: 16 pairs, keys up to 64 characters, string values up to 512.
    pairs = schema.obj(v, p)
    if len(pairs) > 16:
        raise invalid(f"'{p}' has {len(pairs)} pairs; at most 16 are allowed.", p)
    for key, value in pairs.items():
        schema.string(key, f"{p} key", max_len=64)
        schema.string(value, f"{p}.{key}", max_len=512)


def _prompt_cache_options(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    options = schema.obj(v, p)
    schema.keys(options, p, frozenset({"ttl", "mode"}))
    if (ttl := options.get("ttl")) is not None:
        schema.choice(ttl, f"{p}.ttl", ("30m",))
    if (mode := options.get("mode")) is not None:
        schema.choice(mode, f"{p}.mode", ("implicit", "explicit"))


def _modalities(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> bool:
    if not isinstance(v, list):
        raise schema.wrong_type(p, "an array", v)
    for i, item in enumerate(v):
        if schema.choice(item, f"{p}[{i}]", ("text", "audio")) == "audio":
            raise unsupported_value(f"{p}[{i}]", item, "the models answer in text only.")
    return True


def _store(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> bool:
    if schema.boolean(v, p):
        raise unsupported_value(p, v, "it keeps no completions for distillation or evals.")
    return True


def _safety_identifier(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    schema.string(v, p, max_len=64)


def _response_format(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> None:
    schema.response_format(v, caps.max_json_depth)


def _best_of(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> bool:
    schema.integer(v, p, 0, 20)
    if p in ext:
        return False
    if v > 1:
        raise unsupported_value(p, v, "this model's engine has no best_of; use 'n'.")
    return True


def _suffix(v: Any, p: str, caps: Caps, ext: frozenset[str]) -> bool:
    if schema.string(v, p):
        raise unsupported(p, "the engines do not fill in text before a suffix.")
    return True


_SAMPLING: dict[str, Rule] = {
    "model": _later,
    "stream": _boolean,
    "stream_options": _stream_options,
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logit_bias": _logit_bias,
    "max_tokens": _max_tokens,
    "n": _n,
    "seed": _integer(*INT64),
    "stop": _stop,
    "user": _advisory(_string),
}

_CHAT: dict[str, Rule] = {
    **_SAMPLING,
    "messages": _later,
    "tools": _later,
    "tool_choice": _later,
    "max_completion_tokens": _max_tokens,
    "logprobs": _boolean,
    "top_logprobs": _integer(0, 20),
    "response_format": _response_format,
    "parallel_tool_calls": _boolean,
    "reasoning_effort": _choice("none", "minimal", "low", "medium", "high", "xhigh", "max"),
    "metadata": _advisory(_metadata),
    "store": _store,
    "safety_identifier": _advisory(_safety_identifier),
    "prompt_cache_key": _advisory(_string),
    "prompt_cache_retention": _advisory(_choice("in_memory", "24h")),
    "prompt_cache_options": _advisory(_prompt_cache_options),
    "service_tier": _default_only(
        ("auto", "default", "flex", "scale", "priority", "fast"),
        ("auto", "default"),
        "it has one service tier; send 'auto' or 'default', or leave it out.",
    ),
    "verbosity": _default_only(
        ("low", "medium", "high"),
        ("medium",),
        "no model here takes a verbosity setting; ask for it in the messages.",
    ),
    "modalities": _modalities,
    "audio": _unsupported("the models answer in text only."),
    "prediction": _unsupported("no engine here uses predicted outputs; leave it out."),
    "web_search_options": _unsupported(
        "the appliance does not search the web; put what the model needs in the messages."
    ),
    "moderation": _unsupported("the appliance has no moderation service."),
    "functions": _unsupported("it is deprecated; send the functions as 'tools'."),
    "function_call": _unsupported("it is deprecated; use 'tool_choice'."),
}

_COMPLETION: dict[str, Rule] = {
    **_SAMPLING,
    "prompt": _later,
    "echo": _boolean,
    "logprobs": _integer(0, 5),
    "best_of": _best_of,
    "suffix": _suffix,
}

_EMBEDDING: dict[str, Rule] = {
    "model": _later,
    "input": _later,
    "encoding_format": _choice("float", "base64"),
    "dimensions": _integer(1, 65536),
    "user": _advisory(_string),
}

# Fields older engines took, with what replaced them (vLLM now drops them silently).
_REPLACED = {
    name: "response_format (a json_schema), or the engine's structured_outputs"
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
}


def _walk(
    body: dict[str, Any], rules: dict[str, Rule], caps: Caps, ext: frozenset[str]
) -> dict[str, Any]:
    """Checks every top-level field; returns the body to forward."""
    drop: list[str] = []
    for key, value in body.items():
        rule = rules.get(key)
        if value is None:
            if rule is None and (key not in ext or "." in key):
                raise _unknown(key, rules, ext)
            drop.append(key)
        elif rule is not None:
            if rule(value, key, caps, ext):
                drop.append(key)
        elif key in ext and "." not in key:
            schema.free_json(value, key, caps.max_json_depth)
        else:
            raise _unknown(key, rules, ext)
    if not drop:
        return body
    return {k: v for k, v in body.items() if k not in drop}


def _unknown(key: str, rules: dict[str, Rule], ext: frozenset[str]) -> GatewayError:
    if key in _REPLACED:
        return invalid(
            f"'{key}' is no longer supported; use {_REPLACED[key]}.", key, "unknown_parameter"
        )
    from appliance.engines import ADAPTERS

    owners = sorted(name for name, a in ADAPTERS.items() if key in a.request_extensions)
    if owners:
        return invalid(
            f"'{key}' is an extension of the {' and '.join(owners)} "
            f"engine{'s' if len(owners) > 1 else ''}, which this model is not served by; "
            "remove it.",
            key,
            "unknown_parameter",
        )
    return schema.unknown(key, key, {*rules, *(e for e in ext if "." not in e)})


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' must be a non-empty string.", "model", "invalid_type")
    return model


def _stream(body: dict[str, Any], forward: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is None:
        return stream, forward
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if "include_obfuscation" in options:
        # No engine pads chunks, and TensorRT-LLM rejects the key: honoured by leaving it out.
        options = {k: v for k, v in options.items() if k != "include_obfuscation"}
        forward = {**forward, "stream_options": options}
    return stream, forward


def chat_request(
    body: dict[str, Any], caps: Caps = Caps(), extensions: frozenset[str] = frozenset()
) -> Checked:
    """Validate a chat completion request."""
    model = _model(body)
    forward = _walk(body, _CHAT, caps, extensions)
    stream, forward = _stream(body, forward)
    if (top := body.get("top_logprobs")) and body.get("logprobs") is not True:
        raise invalid(f"'top_logprobs' is {top}, which needs 'logprobs': true.", "top_logprobs")
    tools = body.get("tools")
    if tools is not None:
        schema.tools(tools, caps.max_tools, caps.max_json_depth)
    if (tool_choice := body.get("tool_choice")) is not None:
        schema.tool_choice(tool_choice, schema.tool_names(tools))
    if tools and tool_choice != "none" and NO_TOOL_CALLS in extensions:
        raise invalid(
            f"{model} cannot return tool calls: its catalog entry names no tool-call parser, "
            "so its engine cannot tell a call from text. Send the request without 'tools' "
            "(or with tool_choice 'none'), or use a model whose entry has a tool_parser "
            "(`appliance model show NAME`).",
            "tools",
            "unsupported_value",
        )
    messages = body.get("messages")
    schema.messages(messages, caps.max_messages, extensions, caps.max_json_depth)
    limit = body.get("max_completion_tokens")
    return Checked(
        model=model,
        stream=stream,
        max_tokens=_int(limit if limit is not None else body.get("max_tokens")),
        n=int(body.get("n") or 1),
        messages=messages,
        tools=tools,
        body=forward,
    )


def completion_request(
    body: dict[str, Any], caps: Caps = Caps(), extensions: frozenset[str] = frozenset()
) -> Checked:
    """Validate a legacy completion request."""
    model = _model(body)
    forward = _walk(body, _COMPLETION, caps, extensions)
    stream, forward = _stream(body, forward)
    prompts = _batch(body.get("prompt"), "prompt", caps)
    return Checked(
        model=model,
        stream=stream,
        max_tokens=_int(body.get("max_tokens")),
        n=int(body.get("n") or 1),
        prompts=prompts,
        body=forward,
    )


def embedding_request(
    body: dict[str, Any], caps: Caps = Caps(), extensions: frozenset[str] = frozenset()
) -> Checked:
    """Validate an embeddings request; embeddings never stream."""
    model = _model(body)
    forward = _walk(body, _EMBEDDING, caps, extensions)
    inputs = _batch(body.get("input"), "input", caps)
    return Checked(model=model, stream=False, max_tokens=None, n=1, inputs=inputs, body=forward)


def _int(value: int | float | None) -> int | None:
    return None if value is None else int(value)


_TOKEN_ID = "a token id (an integer from 0 to 2147483647)"


def _batch(value: Any, param: str, caps: Caps) -> list[str | list[int]]:
    """A prompt or input in OpenAI's four forms, as a list of strings or token lists."""
    if value is None:
        raise missing(param)
    if isinstance(value, str):
        schema.string(value, param, empty=False)
        return [value]
    if not isinstance(value, list) or not value:
        raise invalid(f"'{param}' must be a string or a non-empty array.", param, "invalid_type")
    if len(value) > caps.max_inputs:
        raise invalid(
            f"'{param}' has {len(value)} items; at most {caps.max_inputs} are allowed.", param
        )
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            schema.string(item, f"{param}[{i}]", empty=False)
        return list(value)
    if isinstance(first, int | float) and not isinstance(first, bool):
        _token_ids(value, param)
        return [value]
    if not isinstance(first, list):
        raise schema.wrong_type(f"{param}[0]", "a string, a token id or an array of them", first)
    for i, item in enumerate(value):
        if not isinstance(item, list) or not item:
            raise schema.wrong_type(f"{param}[{i}]", "a non-empty array of token ids", item)
        _token_ids(item, f"{param}[{i}]")
    return list(value)


def _token_ids(ids: list[Any], param: str) -> None:
    # `type(t) is int` leaves out bools; the fast path avoids a loop of checks per token.
    if all(type(t) is int for t in ids) and min(ids) >= 0 and max(ids) < 2**31:
        return
    for i, t in enumerate(ids):
        whole = type(t) is int or (type(t) is float and t.is_integer())
        if not whole or not 0 <= t < 2**31:
            raise invalid(f"'{param}[{i}]' must be {_TOKEN_ID}; got {t!r}.", f"{param}[{i}]")
