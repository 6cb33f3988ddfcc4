"""The shapes inside request bodies, checked against OpenAI's schema.

Private to `appliance.gateway.validate`, which owns the contract. Here are the typed
checks everything is built from and the nested shapes of a chat request: messages and
their content parts, tool calls, tools, tool_choice and response_format, as OpenAI's
OpenAPI spec draws them (openai/openai-openapi, CreateChatCompletionRequest and the
schemas it references). Each check raises the gateway's 400 with `param` naming the
exact field, e.g. `messages[2].tool_calls[0].function.arguments`.

Types are strict, as OpenAI's are: no "1" for 1, no true for 1 (2.0 is an integer, as
in JSON Schema). Paths
are built only as deep as the walk goes, so a small request costs a few string joins.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from typing import Any

import orjson

from appliance.gateway.errors import GatewayError, invalid

# OpenAI's rule for function and json_schema names.
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
INT64 = (-(2**63), 2**63 - 1)


# Typed checks.


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def join(param: str, key: str) -> str:
    return f"{param}.{key}" if param else key


def wrong_type(param: str, expected: str, value: Any) -> GatewayError:
    return invalid(f"'{param}' must be {expected}; got {kind(value)}.", param, "invalid_type")


def missing(param: str) -> GatewayError:
    return invalid(f"'{param}' is required.", param, "missing_required_parameter")


def unsupported(param: str, why: str) -> GatewayError:
    return invalid(
        f"'{param}' is not supported by this appliance: {why}", param, "unsupported_parameter"
    )


def unsupported_value(param: str, value: Any, why: str) -> GatewayError:
    return invalid(
        f"'{param}' is {value!r}, which this appliance does not support: {why}",
        param,
        "unsupported_value",
    )


def unknown(param: str, key: str, known: Collection[str]) -> GatewayError:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    hint = f" Did you mean '{close[0]}'?" if close else " Remove it."
    return invalid(f"Unknown parameter: '{param}'.{hint}", param, "unknown_parameter")


def string(value: Any, param: str, *, empty: bool = True, max_len: int | None = None) -> str:
    if not isinstance(value, str):
        raise wrong_type(param, "a string", value)
    if not empty and not value:
        raise invalid(f"'{param}' must not be empty.", param)
    if max_len is not None and len(value) > max_len:
        raise invalid(
            f"'{param}' is {len(value)} characters long; at most {max_len} are allowed.", param
        )
    return value


def boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise wrong_type(param, "true or false", value)
    return value


def integer(value: Any, param: str, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema's integers include 2.0, and clients in Java send it
    elif isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(param, "an integer", value)
    if not low <= value <= high:
        raise invalid(f"'{param}' must be between {low} and {high}; got {value}.", param)
    return value


def number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(param, "a number", value)
    if not low <= value <= high:
        raise invalid(f"'{param}' must be between {low:g} and {high:g}; got {value}.", param)
    return value


def not_one_of(param: str, options: tuple[str, ...], value: Any) -> GatewayError:
    if not isinstance(value, str):
        return wrong_type(param, "a string", value)
    listed = ", ".join(f"'{o}'" for o in options)
    return invalid(f"'{param}' must be one of {listed}; got {value!r}.", param)


def choice(value: Any, param: str, options: tuple[str, ...]) -> str:
    if value not in options or not isinstance(value, str):
        raise not_one_of(param, options, value)
    return value


def obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise wrong_type(param, "an object", value)
    return value


def keys(
    value: dict[str, Any],
    param: str,
    known: frozenset[str],
    extensions: frozenset[str] = frozenset(),
    prefix: str = "",
    depth: int = 0,
) -> None:
    """Unknown keys are a 400, except `prefix.key` names the engine accepts (its value
    is then the engine's to judge, but no deeper than `depth`)."""
    if value.keys() <= known:
        return
    for key in value:
        if key in known:
            continue
        if f"{prefix}.{key}" not in extensions:
            raise unknown(join(param, key), key, known)
        free_json(value[key], join(param, key), depth)


def too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (the value itself is level 1)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def free_json(value: Any, param: str, limit: int) -> None:
    """Free-form JSON (schemas, extension values) is forwarded as is, but never deep:
    engines recurse over it, and orjson.dumps stops at 254 levels."""
    if too_deep(value, limit):
        raise invalid(f"'{param}' nests more than {limit} levels deep.", param, "too_deep")


# Messages.

ROLE_FIELDS = {
    "system": frozenset({"role", "content", "name"}),
    "developer": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset(
        {"role", "content", "refusal", "name", "audio", "tool_calls", "function_call"}
    ),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
_ROLES = tuple(ROLE_FIELDS)
# Content parts each role may carry (ChatCompletionRequest<Role>MessageContentPart).
_ROLE_PARTS = {
    "system": ("text",),
    "developer": ("text",),
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
    "tool": ("text",),
}
_PART_FIELDS = {
    "text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "refusal": frozenset({"type", "refusal"}),
    "image_url": frozenset({"type", "image_url", "prompt_cache_breakpoint"}),
    "input_audio": frozenset({"type", "input_audio", "prompt_cache_breakpoint"}),
    "file": frozenset({"type", "file", "prompt_cache_breakpoint"}),
}
# Media parts need a model that reads them; the gateway passes `content.<type>` in the
# extensions for such models. Text models answer them with a clear 400 instead.
_MEDIA = {"image_url": "images", "input_audio": "audio", "file": "files"}


def messages(value: Any, max_messages: int, extensions: frozenset[str], depth: int) -> None:
    if value is None:
        raise missing("messages")
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty array.", "messages", "invalid_type")
    if len(value) > max_messages:
        raise invalid(
            f"'messages' has {len(value)} messages; at most {max_messages} are allowed.",
            "messages",
        )
    for i, item in enumerate(value):
        message(item, f"messages[{i}]", extensions, depth)


def message(value: Any, param: str, extensions: frozenset[str], depth: int) -> None:
    if not isinstance(value, dict):
        raise wrong_type(param, "a message object", value)
    role = value.get("role")
    if role is None:
        raise missing(f"{param}.role")
    if not isinstance(role, str):
        raise wrong_type(f"{param}.role", "a string", role)
    fields = ROLE_FIELDS.get(role)
    if fields is None:
        if role == "function":
            raise unsupported_value(
                f"{param}.role",
                role,
                "it is deprecated; send the result as a 'tool' message with the "
                "tool_call_id it answers.",
            )
        raise not_one_of(f"{param}.role", _ROLES, role)
    keys(value, param, fields, extensions, "messages", depth)
    if (name := value.get("name")) is not None:
        string(name, f"{param}.name")
    content = value.get("content")
    if role == "assistant":
        _assistant(value, param, depth)
        if content is None:
            if not value.get("tool_calls"):
                raise invalid(
                    f"'{param}.content' is required unless the message has 'tool_calls'.",
                    f"{param}.content",
                    "missing_required_parameter",
                )
            return
    elif role == "tool":
        if (call_id := value.get("tool_call_id")) is None:
            raise missing(f"{param}.tool_call_id")
        string(call_id, f"{param}.tool_call_id")
    if content is None:
        raise missing(f"{param}.content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise wrong_type(f"{param}.content", "a string or an array of content parts", content)
    if not content:
        raise invalid(
            f"'{param}.content' must not be an empty array; send a string or some parts.",
            f"{param}.content",
        )
    allowed = _ROLE_PARTS[role]
    for j, part in enumerate(content):
        _part(part, f"{param}.content[{j}]", role, allowed, extensions)


def _assistant(value: dict[str, Any], param: str, depth: int) -> None:
    if value.get("audio") is not None:
        raise unsupported(
            f"{param}.audio", "the models answer in text; send the transcript as 'content'."
        )
    if value.get("function_call") is not None:
        raise unsupported(
            f"{param}.function_call", "it is deprecated; send the call in 'tool_calls'."
        )
    if (refusal := value.get("refusal")) is not None:
        string(refusal, f"{param}.refusal")
    calls = value.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise wrong_type(f"{param}.tool_calls", "an array of tool calls", calls)
    for k, call in enumerate(calls):
        tool_call(call, f"{param}.tool_calls[{k}]", depth)


def _part(
    value: Any, param: str, role: str, allowed: tuple[str, ...], extensions: frozenset[str]
) -> None:
    if not isinstance(value, dict):
        raise wrong_type(param, "a content part object", value)
    type_ = value.get("type")
    if type_ is None:
        raise missing(f"{param}.type")
    if not isinstance(type_, str):
        raise wrong_type(f"{param}.type", "a string", type_)
    if type_ not in allowed:
        if type_ in _PART_FIELDS:
            listed = " or ".join(f"'{t}'" for t in allowed)
            raise invalid(
                f"'{param}.type' is {type_!r}, but {role} messages take only {listed} parts.",
                f"{param}.type",
            )
        raise not_one_of(f"{param}.type", allowed, type_)
    if type_ in _MEDIA and f"content.{type_}" not in extensions:
        raise unsupported_value(
            f"{param}.type",
            type_,
            f"the model takes text only, not {_MEDIA[type_]}; send the content as text, or "
            "call a model that reads them.",
        )
    keys(value, param, _PART_FIELDS[type_])
    if type_ == "text" or type_ == "refusal":
        field = value.get(type_)
        if field is None:
            raise missing(f"{param}.{type_}")
        string(field, f"{param}.{type_}")
    else:
        inner = value.get(type_)
        if inner is None:
            raise missing(f"{param}.{type_}")
        obj(inner, f"{param}.{type_}")
        free_json(inner, f"{param}.{type_}", 4)  # OpenAI's media parts are flat objects
        if type_ == "image_url":
            keys(inner, f"{param}.image_url", frozenset({"url", "detail"}))
            if (url := inner.get("url")) is None:
                raise missing(f"{param}.image_url.url")
            string(url, f"{param}.image_url.url", empty=False)
            if (detail := inner.get("detail")) is not None:
                choice(detail, f"{param}.image_url.detail", ("auto", "low", "high"))
    if (breakpoint := value.get("prompt_cache_breakpoint")) is not None:
        bp = obj(breakpoint, f"{param}.prompt_cache_breakpoint")
        keys(bp, f"{param}.prompt_cache_breakpoint", frozenset({"mode"}))
        choice(bp.get("mode"), f"{param}.prompt_cache_breakpoint.mode", ("explicit",))


# Tool calls, tools and tool_choice.

_CUSTOM_TOOLS = (
    "custom tools are valid OpenAI, but no engine here runs them; "
    "use function tools (type 'function') with a JSON schema for their parameters."
)


def tool_call(value: Any, param: str, depth: int) -> None:
    if not isinstance(value, dict):
        raise wrong_type(param, "a tool call object", value)
    type_ = value.get("type")
    if type_ == "custom":
        raise unsupported_value(f"{param}.type", type_, _CUSTOM_TOOLS)
    if type_ is None:
        raise missing(f"{param}.type")
    choice(type_, f"{param}.type", ("function",))
    keys(value, param, frozenset({"id", "type", "function"}))
    if (call_id := value.get("id")) is None:
        raise missing(f"{param}.id")
    string(call_id, f"{param}.id")
    fn = value.get("function")
    if fn is None:
        raise missing(f"{param}.function")
    obj(fn, f"{param}.function")
    keys(fn, f"{param}.function", frozenset({"name", "arguments"}))
    if (name := fn.get("name")) is None:
        raise missing(f"{param}.function.name")
    string(name, f"{param}.function.name", empty=False)
    arguments = fn.get("arguments")
    if arguments is None:
        raise missing(f"{param}.function.arguments")
    where = f"{param}.function.arguments"
    string(arguments, where)
    expected = 'a JSON object encoded as a string, like \'{"city": "Paris"}\''
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise invalid(f"'{where}' must be {expected}; it is not valid JSON.", where) from None
    if not isinstance(parsed, dict):
        # Chat templates iterate over the arguments as a mapping.
        raise invalid(f"'{where}' must be {expected}; it holds {kind(parsed)}.", where)
    free_json(parsed, where, depth)


def tools(value: Any, max_tools: int, depth: int) -> None:
    if not isinstance(value, list):
        raise wrong_type("tools", "an array of tools", value)
    if len(value) > max_tools:
        raise invalid(f"'tools' has {len(value)} tools; at most {max_tools} are allowed.", "tools")
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise wrong_type(param, "a tool object", tool)
        type_ = tool.get("type")
        if type_ == "custom":
            raise unsupported_value(f"{param}.type", type_, _CUSTOM_TOOLS)
        if type_ is None:
            raise missing(f"{param}.type")
        choice(type_, f"{param}.type", ("function",))
        keys(tool, param, frozenset({"type", "function"}))
        fn = tool.get("function")
        if fn is None:
            raise missing(f"{param}.function")
        obj(fn, f"{param}.function")
        keys(fn, f"{param}.function", frozenset({"name", "description", "parameters", "strict"}))
        _name(fn.get("name"), f"{param}.function.name")
        if (description := fn.get("description")) is not None:
            string(description, f"{param}.function.description")
        if (parameters := fn.get("parameters")) is not None:
            obj(parameters, f"{param}.function.parameters")
            free_json(parameters, f"{param}.function.parameters", depth)
        if (strict := fn.get("strict")) is not None:
            boolean(strict, f"{param}.function.strict")


def tool_names(value: Any) -> set[str]:
    """Function names in a checked `tools` array."""
    return {tool["function"]["name"] for tool in value or ()}


def tool_choice(value: Any, names: set[str]) -> None:
    param = "tool_choice"
    if isinstance(value, str):
        choice(value, param, ("none", "auto", "required"))
        if value == "required" and not names:
            raise invalid("'tool_choice' is 'required', but the request has no 'tools'.", param)
        return
    if not isinstance(value, dict):
        raise wrong_type(param, "'none', 'auto', 'required' or an object", value)
    type_ = value.get("type")
    if type_ == "custom":
        raise unsupported_value(f"{param}.type", type_, _CUSTOM_TOOLS)
    if type_ == "allowed_tools":
        raise unsupported_value(
            f"{param}.type",
            type_,
            "the engines cannot narrow the tools per request; send only the allowed tools "
            "in 'tools'.",
        )
    if type_ is None:
        raise missing(f"{param}.type")
    choice(type_, f"{param}.type", ("function", "allowed_tools", "custom"))
    keys(value, param, frozenset({"type", "function"}))
    fn = value.get("function")
    if fn is None:
        raise missing(f"{param}.function")
    obj(fn, f"{param}.function")
    keys(fn, f"{param}.function", frozenset({"name"}))
    name = fn.get("name")
    if name is None:
        raise missing(f"{param}.function.name")
    string(name, f"{param}.function.name")
    if name not in names:
        raise invalid(
            f"'{param}.function.name' is {name!r}, which is not a function in 'tools'.",
            f"{param}.function.name",
        )


def _name(value: Any, param: str) -> None:
    if value is None:
        raise missing(param)
    string(value, param)
    if not _NAME.fullmatch(value):
        raise invalid(
            f"'{param}' must be 1 to 64 letters, digits, underscores or dashes; got {value!r}.",
            param,
        )


# response_format.


def response_format(value: Any, depth: int) -> None:
    param = "response_format"
    obj(value, param)
    type_ = value.get("type")
    if type_ is None:
        raise missing(f"{param}.type")
    choice(type_, f"{param}.type", ("text", "json_object", "json_schema"))
    if type_ != "json_schema":
        keys(value, param, frozenset({"type"}))
        return
    keys(value, param, frozenset({"type", "json_schema"}))
    spec = value.get("json_schema")
    if spec is None:
        raise missing(f"{param}.json_schema")
    obj(spec, f"{param}.json_schema")
    keys(spec, f"{param}.json_schema", frozenset({"name", "description", "schema", "strict"}))
    _name(spec.get("name"), f"{param}.json_schema.name")
    if (description := spec.get("description")) is not None:
        string(description, f"{param}.json_schema.description")
    if (schema := spec.get("schema")) is not None:
        obj(schema, f"{param}.json_schema.schema")
        free_json(schema, f"{param}.json_schema.schema", depth)
    if (strict := spec.get("strict")) is not None:
        boolean(strict, f"{param}.json_schema.strict")
