"""Admission checks on request bodies: each rule, and each input that crashed an engine."""

from __future__ import annotations

import timeit
from typing import Any

import orjson
import pytest

from appliance.engines import ADAPTERS
from appliance.gateway import validate
from appliance.gateway.errors import GatewayError
from appliance.gateway.validate import Caps, chat_request, completion_request, embedding_request

VLLM = validate.extensions_for("vllm")
USER = {"role": "user", "content": "hi"}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def history(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER, *messages], **fields}


def says(content: Any, role: str = "user") -> dict[str, Any]:
    return chat(messages=[{"role": role, "content": content}])


def raw_call(function: Any, type_: str = "function") -> dict[str, Any]:
    return history({"role": "assistant", "tool_calls": [{"id": "c", "type": type_, **function}]})


def json_schema(**spec: Any) -> dict[str, Any]:
    return chat(response_format={"type": "json_schema", "json_schema": spec})


def call(arguments: Any = "{}", **fields: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": arguments},
        **fields,
    }


def tool(name: str = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def rejected(check: Any, body: dict[str, Any], ext: frozenset[str] = VLLM, caps: Caps = Caps()):
    with pytest.raises(GatewayError) as info:
        check(body, caps, ext)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error" and err.message
    return err


CHAT_REJECTS = [
    # The inputs that crashed engines (issue 8).
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type"),
    (chat(messages=[{"role": "user", "content": {"a": 1}}]), "messages[0].content", "invalid_type"),
    (
        history({"role": "assistant", "tool_calls": [call("{not json")]}),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
    ),
    (
        history({"role": "assistant", "tool_calls": [call("[1, 2]")]}),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
    ),
    (
        history({"role": "assistant", "tool_calls": [call(orjson.dumps(nested(100)).decode())]}),
        "messages[1].tool_calls[0].function.arguments",
        "too_deep",
    ),
    (raw_call({"custom": {"name": "x", "input": "y"}}, "custom"), "messages[1].tool_calls[0].type",
     "unsupported_value"),
    (chat(logit_bias={"abc": 1}), "logit_bias.abc", "invalid_value"),
    (chat(logit_bias={"-1": 1}), "logit_bias.-1", "invalid_value"),
    (chat(logit_bias={"5": 101}), "logit_bias.5", "invalid_value"),
    (chat(logit_bias={"5": True}), "logit_bias.5", "invalid_type"),
    (chat(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias", "invalid_value"),
    (says(nested(300)), "messages[0].content", "invalid_type"),
    (says([[[[[["deep"]]]]]]), "messages[0].content[0]", "invalid_type"),
    # Messages.
    (chat(messages=[]), "messages", "invalid_type"),
    (chat(messages=[USER] * 3), "messages", "invalid_value"),
    (chat(messages=["hi"]), "messages[0]", "invalid_type"),
    (chat(messages=[{"content": "x"}]), "messages[0].role", "missing_required_parameter"),
    (chat(messages=[{"role": 1, "content": "x"}]), "messages[0].role", "invalid_type"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "invalid_value"),
    (chat(messages=[{"role": "function", "name": "f", "content": "x"}]), "messages[0].role",
     "unsupported_value"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": "x", "contnet": "y"}]), "messages[0].contnet",
     "unknown_parameter"),
    (chat(messages=[{"role": "user", "content": "x", "tool_call_id": "1"}]),
     "messages[0].tool_call_id", "unknown_parameter"),
    (chat(messages=[{"role": "user", "content": []}]), "messages[0].content", "invalid_value"),
    (chat(messages=[{"role": "user", "content": "x", "name": 3}]), "messages[0].name",
     "invalid_type"),
    (history({"role": "assistant"}), "messages[1].content", "missing_required_parameter"),
    (history({"role": "assistant", "content": "x", "audio": {"id": "a"}}), "messages[1].audio",
     "unsupported_parameter"),
    (history({"role": "assistant", "content": None, "function_call": {"name": "f"}}),
     "messages[1].function_call", "unsupported_parameter"),
    (history({"role": "assistant", "content": "x", "refusal": 1}), "messages[1].refusal",
     "invalid_type"),
    (history({"role": "tool", "content": "x"}), "messages[1].tool_call_id",
     "missing_required_parameter"),
    (history({"role": "tool", "content": "x", "tool_call_id": 7}), "messages[1].tool_call_id",
     "invalid_type"),
    # Content parts.
    (chat(messages=[{"role": "user", "content": ["x"]}]), "messages[0].content[0]", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content[0].type",
     "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": [{"type": ["text"]}]}]),
     "messages[0].content[0].type", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"type": "video"}]}]),
     "messages[0].content[0].type", "invalid_value"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
     "messages[0].content[0].text", "invalid_type"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     "messages[0].content[0].text", "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}]),
     "messages[0].content[0].extra", "unknown_parameter"),
    (chat(messages=[{"role": "system", "content": [{"type": "refusal", "refusal": "no"}]}]),
     "messages[0].content[0].type", "invalid_value"),
    (says([{"type": "image_url", "image_url": {"url": "u"}}]),
     "messages[0].content[0].type", "unsupported_value"),
    (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0].type", "unsupported_value"),
    (chat(messages=[{"role": "user", "content": [{"type": "file", "file": {}}]}]),
     "messages[0].content[0].type", "unsupported_value"),
    # Tool calls.
    (history({"role": "assistant", "tool_calls": {}}), "messages[1].tool_calls", "invalid_type"),
    (history({"role": "assistant", "tool_calls": [call(5)]}),
     "messages[1].tool_calls[0].function.arguments", "invalid_type"),
    (history({"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}),
     "messages[1].tool_calls[0].id", "missing_required_parameter"),
    (history({"role": "assistant", "tool_calls": [call(extra=1)]}),
     "messages[1].tool_calls[0].extra", "unknown_parameter"),
    (raw_call({"function": {"arguments": "{}"}}),
     "messages[1].tool_calls[0].function.name", "missing_required_parameter"),
    (raw_call({"function": {"name": "f"}}),
     "messages[1].tool_calls[0].function.arguments", "missing_required_parameter"),
    # Tools and tool_choice.
    (chat(tools={}), "tools", "invalid_type"),
    (chat(tools=[tool()] * 3), "tools", "invalid_value"),
    (chat(tools=[{"type": "custom", "custom": {}}]), "tools[0].type", "unsupported_value"),
    (chat(tools=[{"function": {"name": "f"}}]), "tools[0].type", "missing_required_parameter"),
    (chat(tools=[tool("has space")]), "tools[0].function.name", "invalid_value"),
    (chat(tools=[tool(parameters=[])]), "tools[0].function.parameters", "invalid_type"),
    (chat(tools=[tool(parameters=nested(65))]), "tools[0].function.parameters", "too_deep"),
    (chat(tools=[tool(strict="yes")]), "tools[0].function.strict", "invalid_type"),
    (chat(tools=[tool(descripton="x")]), "tools[0].function.descripton", "unknown_parameter"),
    (chat(tool_choice="always"), "tool_choice", "invalid_value"),
    (chat(tool_choice="required"), "tool_choice", "invalid_value"),
    (chat(tools=[tool()], tool_choice={"type": "function", "function": {"name": "g"}}),
     "tool_choice.function.name", "invalid_value"),
    (chat(tools=[tool()], tool_choice={"type": "custom", "custom": {"name": "f"}}),
     "tool_choice.type", "unsupported_value"),
    (chat(tools=[tool()], tool_choice={"type": "allowed_tools", "allowed_tools": {}}),
     "tool_choice.type", "unsupported_value"),
    # response_format.
    (chat(response_format="json"), "response_format", "invalid_type"),
    (chat(response_format={"type": "xml"}), "response_format.type", "invalid_value"),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema",
     "missing_required_parameter"),
    (json_schema(schema={}),
     "response_format.json_schema.name", "missing_required_parameter"),
    (json_schema(name="a", schema=nested(70)),
     "response_format.json_schema.schema", "too_deep"),
    (chat(response_format={"type": "json_object", "schema": {}}), "response_format.schema",
     "unknown_parameter"),
    # Sampling fields and caps.
    (chat(temperature=7), "temperature", "invalid_value"),
    (chat(temperature="1"), "temperature", "invalid_type"),
    (chat(temperature=True), "temperature", "invalid_type"),
    (chat(top_p=1.5), "top_p", "invalid_value"),
    (chat(presence_penalty=-3), "presence_penalty", "invalid_value"),
    (chat(frequency_penalty=2.5), "frequency_penalty", "invalid_value"),
    (chat(max_tokens=0), "max_tokens", "invalid_value"),
    (chat(max_tokens="5"), "max_tokens", "invalid_type"),
    (chat(max_tokens=5.5), "max_tokens", "invalid_type"),
    (chat(max_tokens=2**21), "max_tokens", "invalid_value"),
    (chat(max_completion_tokens=0), "max_completion_tokens", "invalid_value"),
    (chat(n=9), "n", "invalid_value"),
    (chat(n=True), "n", "invalid_type"),
    (chat(seed=2**63), "seed", "invalid_value"),
    (chat(stop=5), "stop", "invalid_type"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
    (chat(stop=["a", ""]), "stop[1]", "invalid_value"),
    (chat(stop="x" * 257), "stop", "invalid_value"),
    (chat(logprobs=1), "logprobs", "invalid_type"),
    (chat(top_logprobs=21, logprobs=True), "top_logprobs", "invalid_value"),
    (chat(top_logprobs=2), "top_logprobs", "invalid_value"),
    (chat(stream="yes"), "stream", "invalid_type"),
    (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (chat(stream=True, stream_options={"include_usage": "y"}), "stream_options.include_usage",
     "invalid_type"),
    (chat(stream=True, stream_options={"usage": True}), "stream_options.usage",
     "unknown_parameter"),
    (chat(reasoning_effort="extreme"), "reasoning_effort", "invalid_value"),
    (chat(parallel_tool_calls="no"), "parallel_tool_calls", "invalid_type"),
    # Valid OpenAI that no local engine honours.
    (chat(audio={"voice": "alloy", "format": "wav"}), "audio", "unsupported_parameter"),
    (chat(modalities=["text", "audio"]), "modalities[1]", "unsupported_value"),
    (chat(prediction={"type": "content", "content": "x"}), "prediction", "unsupported_parameter"),
    (chat(web_search_options={}), "web_search_options", "unsupported_parameter"),
    (chat(moderation={"model": "m"}), "moderation", "unsupported_parameter"),
    (chat(functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    (chat(function_call="auto"), "function_call", "unsupported_parameter"),
    (chat(service_tier="flex"), "service_tier", "unsupported_value"),
    (chat(service_tier="gold"), "service_tier", "invalid_value"),
    (chat(verbosity="low"), "verbosity", "unsupported_value"),
    (chat(store=True), "store", "unsupported_value"),
    # Advisory fields are still checked.
    (chat(metadata={"k": 1}), "metadata.k", "invalid_type"),
    (chat(metadata={str(i): "v" for i in range(17)}), "metadata", "invalid_value"),
    (chat(safety_identifier="x" * 65), "safety_identifier", "invalid_value"),
    (chat(user=5), "user", "invalid_type"),
    (chat(prompt_cache_retention="forever"), "prompt_cache_retention", "invalid_value"),
    # Unknown and extension fields.
    (chat(temprature=1), "temprature", "unknown_parameter"),
    (chat(guided_json={}), "guided_json", "unknown_parameter"),
    (chat(top_k=5, chat_template_kwargs={"a": nested(64)}), "chat_template_kwargs", "too_deep"),
    (chat(priority=1), "priority", "unknown_parameter"),
    (chat(prompt="x"), "prompt", "unknown_parameter"),
    ({"messages": [USER]}, "model", "missing_required_parameter"),
    (chat(model=""), "model", "invalid_type"),
    (chat(model=["m"]), "model", "invalid_type"),
    ({"model": "m"}, "messages", "missing_required_parameter"),
]  # fmt: skip
SMALL = Caps(max_messages=2, max_tools=2)


@pytest.mark.parametrize(("body", "param", "code"), CHAT_REJECTS)
def test_chat_rejects(body: dict[str, Any], param: str, code: str | None) -> None:
    err = rejected(chat_request, body, caps=SMALL)
    assert err.param == param
    if code is not None:
        assert err.code == code, err.message


def test_unknown_fields_suggest_the_close_one() -> None:
    assert "Did you mean 'temperature'?" in rejected(chat_request, chat(temprature=1)).message
    assert "top_k" in rejected(chat_request, chat(top_k=1), ext=frozenset()).message
    assert "vllm" in rejected(chat_request, chat(top_k=1), ext=frozenset()).message
    assert "structured_outputs" in rejected(chat_request, chat(guided_json={})).message


def test_unsupported_fields_say_so() -> None:
    err = rejected(chat_request, chat(audio={"voice": "alloy", "format": "wav"}))
    assert "not supported by this appliance" in err.message
    custom = {"type": "custom", "custom": {"name": "x"}}
    assert "no engine here runs them" in rejected(chat_request, chat(tools=[custom])).message


def test_extensions_pass_only_for_the_engine_that_takes_them() -> None:
    body = chat(top_k=5, min_p=0.1, chat_template_kwargs={"enable_thinking": False})
    assert chat_request(body, Caps(), VLLM).body == body
    assert validate.extensions_for("no-such-engine") == frozenset()
    err = rejected(chat_request, body, ext=validate.extensions_for("no-such-engine"))
    assert err.param == "top_k" and "extension of the trtllm and vllm engines" in err.message
    with_reasoning = history({"role": "assistant", "content": "4", "reasoning_content": "2+2"})
    chat_request(with_reasoning, Caps(), VLLM)
    err = rejected(chat_request, with_reasoning, ext=frozenset())
    assert err.param == "messages[1].reasoning_content"
    usage = chat(stream=True, stream_options={"continuous_usage_stats": True})
    chat_request(usage, Caps(), VLLM)
    # An extension's value is the engine's to judge, but never deep.
    deep = history({"role": "assistant", "content": "4", "reasoning_content": nested(65)})
    assert rejected(chat_request, deep).param == "messages[1].reasoning_content"
    deep = chat(stream=True, stream_options={"continuous_usage_stats": nested(65)})
    assert rejected(chat_request, deep).code == "too_deep"


def test_every_adapter_names_its_extensions() -> None:
    assert set(ADAPTERS) == {"vllm", "trtllm"}
    assert {"top_k", "min_p", "chat_template_kwargs", "structured_outputs"} <= VLLM
    # Never the client's to set: the appliance schedules and names requests itself.
    for adapter in ADAPTERS.values():
        assert not {"priority", "request_id", "kv_transfer_params"} & adapter.request_extensions


def test_a_valid_chat_request_passes_unchanged() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "really"}], "name": "s"},
            {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
            {"role": "assistant", "content": None, "tool_calls": [call('{"city": "Paris"}')]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "20C"}]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        ],
        "tools": [tool(description="d", parameters={"type": "object"}, strict=True)],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
        "logit_bias": {"50256": -100, "7": 2.5},
        "stop": ["\n\n", "END"],
        "n": 2,
        "seed": -5,
        "logprobs": True,
        "top_logprobs": 3,
        "max_completion_tokens": 64,
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
        "reasoning_effort": "low",
        "parallel_tool_calls": False,
    }
    checked = chat_request(body, Caps(), VLLM)
    assert checked.body is body  # nothing to strip: forwarded without a copy
    assert (checked.model, checked.stream, checked.max_tokens, checked.n) == ("m", True, 64, 2)
    assert checked.messages is body["messages"] and checked.tools is body["tools"]


def test_advisory_fields_and_nulls_are_not_forwarded() -> None:
    body = chat(
        user="u",
        metadata={"team": "a"},
        store=False,
        safety_identifier="hash",
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        prompt_cache_options={"ttl": "30m", "mode": "implicit"},
        service_tier="auto",
        modalities=["text"],
        verbosity="medium",
        temperature=None,
        tools=None,
        stop=[],
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    checked = chat_request(body, Caps(), VLLM)
    assert checked.body == {
        "model": "m",
        "messages": [USER],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "user" in body  # the caller's dict is left alone
    assert checked.max_tokens is None and checked.n == 1


def test_integers_may_be_written_with_a_zero_fraction() -> None:
    checked = chat_request(chat(max_tokens=64.0, n=2.0, seed=7.0), Caps(), VLLM)
    assert (checked.max_tokens, checked.n) == (64, 2)
    assert type(checked.max_tokens) is int and type(checked.n) is int
    assert completion_request({"model": "m", "prompt": [1.0, 2]}, Caps()).prompts == [[1.0, 2]]


COMPLETION_REJECTS = [
    ({"model": "m"}, "prompt", "missing_required_parameter"),
    ({"model": "m", "prompt": None}, "prompt", "missing_required_parameter"),
    ({"model": "m", "prompt": []}, "prompt", "invalid_type"),
    ({"model": "m", "prompt": ""}, "prompt", "invalid_value"),
    ({"model": "m", "prompt": 5}, "prompt", "invalid_type"),
    ({"model": "m", "prompt": ["a", 1]}, "prompt[1]", "invalid_type"),
    ({"model": "m", "prompt": [1, -2]}, "prompt[1]", "invalid_value"),
    ({"model": "m", "prompt": [1, True]}, "prompt[1]", "invalid_value"),
    ({"model": "m", "prompt": [1, 2**31]}, "prompt[1]", "invalid_value"),
    ({"model": "m", "prompt": [[1], []]}, "prompt[1]", "invalid_type"),
    ({"model": "m", "prompt": [[1], ["a"]]}, "prompt[1][0]", "invalid_value"),
    ({"model": "m", "prompt": [{"a": 1}]}, "prompt[0]", "invalid_type"),
    ({"model": "m", "prompt": ["a"] * 3}, "prompt", "invalid_value"),
    ({"model": "m", "prompt": "a", "suffix": "b"}, "suffix", "unsupported_parameter"),
    ({"model": "m", "prompt": "a", "best_of": 3}, "best_of", "unsupported_value"),
    ({"model": "m", "prompt": "a", "best_of": 21}, "best_of", "invalid_value"),
    ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs", "invalid_value"),
    ({"model": "m", "prompt": "a", "logprobs": True}, "logprobs", "invalid_type"),
    ({"model": "m", "prompt": "a", "echo": 1}, "echo", "invalid_type"),
    ({"model": "m", "prompt": "a", "messages": []}, "messages", "unknown_parameter"),
    ({"model": "m", "prompt": "a", "logit_bias": {"x": 1}}, "logit_bias.x", "invalid_value"),
]


@pytest.mark.parametrize(("body", "param", "code"), COMPLETION_REJECTS)
def test_completion_rejects(body: dict[str, Any], param: str, code: str) -> None:
    err = rejected(completion_request, body, caps=Caps(max_inputs=2))
    assert (err.param, err.code) == (param, code), err.message


def test_completion_prompts_in_all_four_forms() -> None:
    forms: list[tuple[Any, list[Any]]] = [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ]
    for prompt, prompts in forms:
        checked = completion_request({"model": "m", "prompt": prompt, "max_tokens": 3}, Caps())
        assert checked.prompts == prompts and checked.max_tokens == 3 and not checked.stream


def test_best_of_goes_to_the_engine_that_has_it() -> None:
    body = {"model": "m", "prompt": "a", "best_of": 3, "n": 2}
    assert completion_request(body, Caps(), validate.extensions_for("trtllm")).body == body
    assert "best_of" not in completion_request({**body, "best_of": 1}, Caps(), VLLM).body


EMBEDDING_REJECTS = [
    ({"model": "m"}, "input", "missing_required_parameter"),
    ({"model": "m", "input": []}, "input", "invalid_type"),
    ({"model": "m", "input": [""]}, "input[0]", "invalid_value"),
    ({"model": "m", "input": "a", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
    ({"model": "m", "input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"model": "m", "input": "a", "stream": True}, "stream", "unknown_parameter"),
    ({"model": 5, "input": "a"}, "model", "invalid_type"),
]


@pytest.mark.parametrize(("body", "param", "code"), EMBEDDING_REJECTS)
def test_embedding_rejects(body: dict[str, Any], param: str, code: str) -> None:
    err = rejected(embedding_request, body)
    assert (err.param, err.code) == (param, code), err.message


def test_embedding_inputs() -> None:
    body = {"model": "m", "input": ["a", "b"], "encoding_format": "base64", "user": "u"}
    checked = embedding_request(body, Caps(), VLLM)
    assert checked.inputs == ["a", "b"] and checked.n == 1 and not checked.stream
    assert checked.body == {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}


def test_parse_body_rejects_what_is_not_a_json_object() -> None:
    for raw in (b"", b"{", b"[]", b'"x"', b"[" * 1100 + b"]" * 1100, b'{"a": "\\ud800"}'):
        with pytest.raises(GatewayError) as info:
            validate.parse_body(raw)
        assert info.value.status == 400 and info.value.code == "invalid_json"


def test_depth_is_bounded_wherever_json_is_free_form() -> None:
    deep = Caps(max_json_depth=3)
    chat_request(chat(tools=[tool(parameters=nested(3))]), deep)
    err = rejected(chat_request, chat(tools=[tool(parameters=nested(4))]), caps=deep)
    assert err.code == "too_deep" and "3 levels" in err.message


def test_a_small_chat_request_validates_in_well_under_100_us() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0.7,
        "max_tokens": 128,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    caps = Caps()
    runs = 2000
    # The best of a few rounds: the figure is about this code, not about a busy machine.
    per_call = min(timeit.repeat(lambda: chat_request(body, caps, VLLM), number=runs, repeat=5))
    assert per_call / runs < 100e-6
