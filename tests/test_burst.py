"""The cloud-overflow provider layer against the fake providers, through the official clients.

A small stand-in for the gateway (`Shim`: validate the body as the gateway does, hand it
to `Burst`, answer JSON or SSE) puts the translated answers in front of the `openai`
client, which must see what it sees from a local model. Each provider's fake checks the
provider's own wire format (tests/test_fakeclouds.py holds the fakes to the SDKs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from appliance.burst import Burst, NoRoute, ProviderError, Unhonourable
from appliance.burst.health import Breaker, Latency, order
from appliance.burst.settings import BreakerConfig, BurstConfig, PolicyConfig
from appliance.burst.spend import Hold, SpendBook, month_start
from appliance.config import parse_config
from appliance.errors import ConfigError
from appliance.gateway import validate
from appliance.gateway.errors import GatewayError, sse_error_event
from appliance.state import SCHEMA_VERSION, State
from appliance.testing.fake_clouds import (
    ANTHROPIC_KEY,
    AWS_KEY_ID,
    AWS_SECRET,
    AZURE_KEY,
    OPENAI_KEY,
    FakeCloud,
    Fault,
)
from appliance.testing.loop_thread import LoopThread

SECRETS = (ANTHROPIC_KEY, AWS_SECRET, AZURE_KEY, OPENAI_KEY)
PRICE = {"input_per_million": 3.0, "output_per_million": 15.0}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
KINDS = ("anthropic", "bedrock", "azure_openai", "openai")


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh(cloud: FakeCloud) -> None:
    cloud.faults.clear()
    cloud.requests.clear()


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def providers(
    cloud: FakeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict[str, Any]]:
    monkeypatch.setenv("BURST_AZURE_KEY", AZURE_KEY)
    monkeypatch.setenv("BURST_OPENAI_KEY", OPENAI_KEY)
    aws = _private(
        tmp_path / "aws",
        f"[default]\naws_access_key_id = {AWS_KEY_ID}\naws_secret_access_key = {AWS_SECRET}\n",
    )
    return {
        "anthropic": {
            "type": "anthropic",
            "endpoint": cloud.url,
            "api_key_file": str(_private(tmp_path / "anthropic", ANTHROPIC_KEY + "\n")),
            "default_max_tokens": 333,
            "models": {"llama": {"model": "claude-sonnet-x", **PRICE}},
        },
        "bedrock": {
            "type": "bedrock",
            "endpoint": cloud.url,
            "region": "us-east-1",
            "aws_credentials_file": str(aws),
            "models": {"llama": {"model": "anthropic.claude-v2:1", **PRICE}},
        },
        "azure_openai": {
            "type": "azure_openai",
            "endpoint": cloud.url,
            "api_key_env": "BURST_AZURE_KEY",
            "models": {"llama": {"model": "gpt-deployment", **PRICE}},
        },
        "openai": {
            "type": "openai",
            "endpoint": f"{cloud.url}/v1",
            "api_key_env": "BURST_OPENAI_KEY",
            "models": {"llama": {"model": "gpt-x", **PRICE}},
        },
    }


def _config(providers: dict[str, dict[str, Any]], *names: str, **policy: Any) -> BurstConfig:
    return BurstConfig.model_validate(
        {
            "enabled": True,
            "providers": {name: providers[name] for name in names},
            "policy": {"monthly_cap": 100.0, "opt_in_keys": ["*"], **policy},
            "breaker": {"errors": 2, "window_s": 60, "cooldown_s": 30},
        }
    )


class Shim(LoopThread):
    """The gateway's part, reduced: validate, hand to Burst, answer JSON or SSE."""

    def __init__(self, burst: Burst) -> None:
        super().__init__()
        self.burst = burst
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _start(self) -> None:
        await self.burst.start()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"

    async def _stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        await self.burst.close()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(api_key="unused", base_url=self.url, max_retries=0)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            # As the gateway does for a model whose catalog entry reads images.
            images = frozenset({"content.image_url"})
            checked = validate.chat_request(
                validate.parse_body(await request.read()), extensions=images
            )
            if not checked.stream:
                answer = await self.burst.complete(checked, "alice", 10)
                return web.json_response(answer.body)
            stream = await self.burst.stream(checked, "alice", 10)
        except GatewayError as err:
            return web.Response(
                body=orjson.dumps(err.body()),
                status=err.status,
                headers={**err.headers, "content-type": "application/json"},
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            async for event in stream.events:
                await response.write(event)
        except ProviderError as err:
            await response.write(sse_error_event(err))
        return response


@pytest.fixture
def shim(providers: dict[str, dict[str, Any]], request: pytest.FixtureRequest) -> Iterator[Shim]:
    names = request.param if isinstance(request.param, tuple) else (request.param,)
    with Shim(Burst(_config(providers, *names))) as running:
        yield running


def _ask(**extra: Any) -> dict[str, Any]:
    return {
        "model": "llama",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi there"},
        ],
        **extra,
    }


def _refused(burst: Burst, body: dict[str, Any], stream: bool = False) -> ProviderError:
    """The ProviderError that one request through `burst` ends in (started, then closed)."""

    async def go() -> ProviderError:
        await burst.start()
        try:
            with pytest.raises(ProviderError) as caught:
                send = burst.stream if stream else burst.complete
                await send(validate.chat_request(body), "alice", 10)
            return caught.value
        finally:
            await burst.close()

    return asyncio.run(go())


# The same answer, through every translator, as the openai client sees it.


@pytest.mark.parametrize("shim", KINDS, indirect=True)
def test_a_whole_answer_reads_as_openais(shim: Shim) -> None:
    answer = shim.client().chat.completions.create(**_ask())
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "Hello from the cloud."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 4


@pytest.mark.parametrize("shim", KINDS, indirect=True)
def test_a_stream_has_the_shape_of_a_local_models(shim: Shim) -> None:
    chunks = list(
        shim.client().chat.completions.create(
            **_ask(), stream=True, stream_options={"include_usage": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == "Hello from the cloud."
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    # The usage chunk comes last, with no choices, only when asked for.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(shim.client().chat.completions.create(**_ask(), stream=True))
    assert all(c.choices and c.usage is None for c in plain)


@pytest.mark.parametrize("shim", KINDS, indirect=True)
def test_tool_calls_stream_as_openai_tool_call_deltas(shim: Shim) -> None:
    chunks = list(
        shim.client().chat.completions.create(**_ask(tools=TOOLS, tool_choice="auto"), stream=True)
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function and calls[0].function.name == "weather"
    assert calls[0].type == "function"
    arguments = "".join((tc.function.arguments or "") for tc in calls if tc.function)
    assert orjson.loads(arguments) == {"city": "Paris"}
    assert {tc.index for tc in calls} == {0}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = shim.client().chat.completions.create(**_ask(tools=TOOLS))
    call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "weather"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert whole.choices[0].finish_reason == "tool_calls"


# What each provider was sent.


@pytest.mark.parametrize("shim", ["anthropic"], indirect=True)
def test_anthropic_gets_system_blocks_max_tokens_tool_blocks_and_choices(
    shim: Shim, cloud: FakeCloud
) -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": [{"type": "text", "text": "and so?"}]},
    ]
    answer = shim.client().chat.completions.create(
        model="llama",
        messages=history,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "weather"}},
        parallel_tool_calls=False,
        stop="END",
        temperature=0.5,
    )
    assert answer.choices[0].message.content == "Hello from the cloud."
    sent = cloud.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    body = sent.body
    assert body["model"] == "claude-sonnet-x"
    assert body["max_tokens"] == 333  # the provider's default: Messages requires one
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["stop_sequences"] == ["END"]
    assert body["temperature"] == 0.5
    assert body["tool_choice"] == {
        "type": "tool",
        "name": "weather",
        "disable_parallel_tool_use": True,
    }
    assert body["tools"][0]["input_schema"]["properties"] == {"city": {"type": "string"}}
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]  # the tool result and the text: one turn
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}
    ]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "text", "text": "and so?"},
    ]
    shim.client().chat.completions.create(**_ask(tools=TOOLS, tool_choice="required"))
    assert cloud.requests[-1].body["tool_choice"] == {"type": "any"}
    shim.client().chat.completions.create(**_ask(tools=TOOLS, tool_choice="none"))
    assert cloud.requests[-1].body["tool_choice"] == {"type": "none"}


@pytest.mark.parametrize("shim", ["bedrock"], indirect=True)
def test_bedrock_gets_a_signed_converse_request(shim: Shim, cloud: FakeCloud) -> None:
    pixel = "iVBORw0KGgo="
    shim.client().chat.completions.create(
        model="llama",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
                ],
            },
        ],
        max_tokens=50,
        top_p=0.9,
        stop=["A", "B"],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
    )
    sent = cloud.requests[-1]
    assert sent.path == "/model/anthropic.claude-v2:1/converse"
    assert sent.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/")
    assert "/us-east-1/bedrock/aws4_request" in sent.headers["authorization"]
    body = sent.body
    assert body["system"] == [{"text": "Be brief."}]
    assert body["inferenceConfig"] == {"maxTokens": 50, "topP": 0.9, "stopSequences": ["A", "B"]}
    assert body["messages"][0]["content"][1] == {
        "image": {"format": "png", "source": {"bytes": pixel}}
    }
    assert body["toolConfig"]["toolChoice"] == {"any": {}}
    assert body["toolConfig"]["tools"][0]["toolSpec"]["name"] == "weather"


@pytest.mark.parametrize("shim", ["azure_openai"], indirect=True)
def test_azure_gets_its_deployment_url_and_api_key(shim: Shim, cloud: FakeCloud) -> None:
    shim.client().chat.completions.create(**_ask())
    sent = cloud.requests[-1]
    assert sent.path == "/openai/deployments/gpt-deployment/chat/completions"
    assert sent.query == {"api-version": "2024-10-21"}
    assert sent.headers["api-key"] == AZURE_KEY
    assert "authorization" not in {k.lower() for k in sent.headers}


@pytest.mark.parametrize("shim", ["openai"], indirect=True)
def test_openai_gets_the_mapped_model_and_a_stream_always_asks_for_usage(
    shim: Shim, cloud: FakeCloud
) -> None:
    list(shim.client().chat.completions.create(**_ask(), stream=True, seed=7))
    sent = cloud.requests[-1]
    assert sent.body["model"] == "gpt-x"
    assert sent.body["seed"] == 7
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"


# What a provider cannot honour is refused, naming both, and nothing is sent.


@pytest.mark.parametrize(
    ("shim", "extra", "param"),
    [
        ("anthropic", {"n": 2}, "n"),
        ("anthropic", {"logprobs": True}, "logprobs"),
        ("anthropic", {"seed": 1}, "seed"),
        ("anthropic", {"temperature": 1.5}, "temperature"),
        ("anthropic", {"presence_penalty": 0.5}, "presence_penalty"),
        (
            "anthropic",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ("bedrock", {"seed": 1}, "seed"),
        ("bedrock", {"parallel_tool_calls": False, "tools": TOOLS}, "parallel_tool_calls"),
        ("bedrock", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
    indirect=["shim"],
)
def test_an_unhonourable_parameter_is_a_400_naming_it_and_the_provider(
    shim: Shim, cloud: FakeCloud, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        shim.client().chat.completions.create(**_ask(**extra))
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["code"] == "unsupported_parameter"
    message = error["message"]
    assert "cloud provider" in message
    assert "'anthropic'" in message or "'bedrock'" in message
    assert cloud.requests == []


@pytest.mark.parametrize("shim", ["bedrock"], indirect=True)
def test_bedrock_refuses_image_links_it_cannot_fetch(shim: Shim, cloud: FakeCloud) -> None:
    link = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        shim.client().chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": [link]}],  # type: ignore[list-item]
        )
    assert cloud.requests == []


def test_configured_unsupported_params_are_refused(
    providers: dict[str, dict[str, Any]], cloud: FakeCloud
) -> None:
    providers["openai"]["type"] = "openai_compatible"
    providers["openai"]["unsupported_params"] = ["logit_bias", "response_format.json_schema"]
    burst = Burst(_config(providers, "openai"))
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    for extra, param in (
        ({"logit_bias": {"1": 1}}, "logit_bias"),
        ({"response_format": schema}, "response_format.json_schema"),
    ):
        checked = validate.chat_request(_ask(**extra))
        with pytest.raises(Unhonourable) as caught:
            asyncio.run(burst.complete(checked, "alice", 10))
        assert caught.value.param == param
    assert cloud.requests == []


# Provider errors, in the OpenAI envelope, with the provider named.


@pytest.mark.parametrize("shim", KINDS, indirect=True)
def test_throttling_is_a_429_with_retry_after_naming_the_provider(
    shim: Shim, cloud: FakeCloud
) -> None:
    cloud.faults.append(Fault(429, retry_after=7))
    with pytest.raises(openai.RateLimitError) as caught:
        shim.client().chat.completions.create(**_ask())
    assert "Cloud provider" in caught.value.message
    assert caught.value.code == "rate_limit_exceeded"
    if shim.burst.config.providers[next(iter(shim.burst.providers))].type != "bedrock":
        # Bedrock sends no Retry-After; the others do, and it is passed on.
        assert caught.value.response.headers["retry-after"] == "7"


@pytest.mark.parametrize("shim", KINDS, indirect=True)
def test_a_provider_failure_is_a_502_that_hides_its_body(shim: Shim, cloud: FakeCloud) -> None:
    cloud.faults.append(Fault(500))
    with pytest.raises(openai.InternalServerError) as caught:
        shim.client().chat.completions.create(**_ask())
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    assert "Fault injected" not in caught.value.message


@pytest.mark.parametrize("shim", ["anthropic", "bedrock", "openai"], indirect=True)
def test_an_error_inside_a_stream_ends_it_with_an_error_event(shim: Shim, cloud: FakeCloud) -> None:
    cloud.faults.append(Fault(kind="stream_error", after=2))
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in shim.client().chat.completions.create(**_ask(), stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello from"
    assert "Cloud provider" in caught.value.message
    (name,) = shim.burst.providers
    assert len(shim.burst.breakers[name].failures) == 1
    assert shim.burst.spend.held == 0


def test_a_corrupt_event_stream_frame_is_an_unreadable_answer(
    providers: dict[str, dict[str, Any]], cloud: FakeCloud
) -> None:
    burst = Burst(_config(providers, "bedrock"))
    cloud.faults.append(Fault(kind="corrupt"))

    err = _refused(burst, _ask(stream=True), stream=True)
    assert err.status == 502 and err.code == "upstream_error" and err.counts
    assert "could not be read" in err.message
    assert burst.spend.held == 0


def test_a_timeout_is_a_504_and_counts_for_the_breaker(
    providers: dict[str, dict[str, Any]], cloud: FakeCloud
) -> None:
    providers["openai"]["read_timeout_s"] = 0.2
    burst = Burst(_config(providers, "openai"))
    cloud.faults.append(Fault(kind="hang", seconds=1.0))

    err = _refused(burst, _ask())
    assert err.status == 504 and err.code == "upstream_timeout" and err.counts
    assert len(burst.breakers["openai"].failures) == 1


def test_a_4xx_about_the_request_is_passed_on_and_not_counted(
    providers: dict[str, dict[str, Any]], cloud: FakeCloud
) -> None:
    burst = Burst(_config(providers, "anthropic"))
    cloud.faults.append(Fault(400))

    err = _refused(burst, _ask())
    assert err.status == 400 and not err.counts
    assert "Fault injected." in err.message and "'anthropic'" in err.message
    assert len(burst.breakers["anthropic"].failures) == 0


# Failing over, the breaker, the spend caps.


@pytest.mark.parametrize("shim", [("openai", "anthropic")], indirect=True)
def test_a_failing_provider_opens_its_breaker_and_traffic_goes_to_the_next(
    shim: Shim, cloud: FakeCloud
) -> None:
    for _ in range(2):
        cloud.faults.append(Fault(503))  # openai fails, anthropic answers
        answer = shim.client().chat.completions.create(**_ask())
        assert answer.model == "claude-sonnet-x"
    assert shim.burst.breakers["openai"].state == "open"
    before = len(cloud.requests)
    shim.client().chat.completions.create(**_ask())
    assert cloud.paths()[before:] == ["/v1/messages"]  # openai is not even tried


def test_the_breaker_opens_probes_once_and_closes_or_reopens() -> None:
    now = [0.0]
    breaker = Breaker(BreakerConfig(errors=3, window_s=10, cooldown_s=5), clock=lambda: now[0])
    breaker.failure()
    now[0] = 11.0  # the first failure leaves the window
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.acquire()
    now[0] += 5
    assert breaker.state == "half_open"
    assert breaker.acquire()  # the probe
    assert not breaker.acquire()  # only one
    breaker.failure()  # the probe failed: another cool-down
    assert breaker.state == "open"
    now[0] += 5
    assert breaker.acquire()
    breaker.success()
    assert breaker.state == "closed" and breaker.acquire() and breaker.acquire()


def test_a_cancelled_probe_frees_the_half_open_slot() -> None:
    now = [0.0]
    breaker = Breaker(BreakerConfig(errors=1, window_s=10, cooldown_s=1), clock=lambda: now[0])
    breaker.failure()
    now[0] = 2.0
    assert breaker.acquire()
    breaker.release()
    assert breaker.acquire()


def test_the_faster_provider_is_preferred_and_an_unmeasured_one_is_tried_first() -> None:
    latency = {name: Latency(0.5) for name in ("a", "b", "c")}
    latency["a"].observe(2.0)
    latency["b"].observe(0.5)
    assert order(["a", "b", "c"], latency) == ["c", "b", "a"]
    latency["c"].observe(4.0)
    latency["a"].observe(0.0)  # EWMA: 2.0 + 0.5 * (0 - 2.0) = 1.0
    assert latency["a"].value == 1.0
    assert order(["a", "b", "c"], latency) == ["b", "a", "c"]


def test_spend_stops_at_the_cap_global_and_per_key() -> None:
    now = [month_start(1_800_000_000.0) + 3600]
    book = SpendBook(
        PolicyConfig(monthly_cap=1.0, key_monthly_cap=0.5, key_caps={"big": 0.9}),
        clock=lambda: now[0],
    )
    held = book.hold("alice", 0.3)
    assert isinstance(held, Hold)
    assert "key's monthly" in str(book.hold("alice", 0.3))  # 0.6 > 0.5, while held
    book.settle(held, 0.1)
    assert isinstance(book.hold("alice", 0.3), Hold)  # 0.1 spent + 0.3 = 0.4: within 0.5
    big = book.hold("big", 0.5)
    assert isinstance(big, Hold)
    assert "monthly cloud spend cap (1)" in str(book.hold("big", 0.3))  # 1.1 > 1.0 in all
    # A new month starts from nothing.
    now[0] = month_start(now[0]) + 40 * 86400
    assert book.spent() == pytest.approx(0.8)  # holds still out count
    book.settle(big, 0.5)
    assert book.spent("big") == 0.0


def test_the_ledgers_spend_and_fresh_costs_both_count(tmp_path: Path) -> None:
    now = [month_start(1_800_000_000.0) + 3600]
    book = SpendBook(PolicyConfig(monthly_cap=1.0), clock=lambda: now[0], lag_s=5)
    held = book.hold("alice", 0.2)
    assert isinstance(held, Hold)
    book.settle(held, 0.2)
    book.refresh(0.5, {"alice": 0.5})  # the ledger does not have that row yet
    assert book.spent() == pytest.approx(0.7)
    now[0] += 6
    book.refresh(0.7, {"alice": 0.7})  # now it does
    assert book.spent() == pytest.approx(0.7)


@pytest.mark.parametrize("shim", ["openai"], indirect=True)
def test_overflow_stops_at_the_spend_cap(shim: Shim, cloud: FakeCloud) -> None:
    # Worst case of a request: its 10 prompt tokens at 3/M and 100 completion tokens at
    # 15/M; what one really costs: the fake's 4 prompt and 4 completion tokens.
    worst = (10 * 3.0 + 100 * 15.0) / 1e6
    cost = (4 * 3.0 + 4 * 15.0) / 1e6
    cap = worst + 5.5 * cost
    shim.burst.spend.policy = PolicyConfig(monthly_cap=cap, opt_in_keys=["*"])
    answered = 0
    with pytest.raises(openai.APIStatusError) as caught:
        for _ in range(20):
            shim.client().chat.completions.create(**_ask(max_tokens=100))
            answered += 1
    # Six fit (the sixth's worst case still does), the seventh's would cross the cap.
    assert answered == 6
    assert caught.value.status_code == 503
    assert "spend cap" in caught.value.message
    assert len(cloud.requests) == answered
    assert shim.burst.spend.spent() == pytest.approx(6 * cost)


def test_policy_refusals() -> None:
    config = BurstConfig.model_validate(
        {"enabled": True, "policy": {"opt_in_keys": ["ci"], "monthly_cap": 1.0}}
        | {"providers": {"x": {"type": "openai_compatible", "endpoint": "http://127.0.0.1:1"}}}
    )
    burst = Burst(config)
    assert burst.refusal("ci", "public") is None
    assert "data class 'internal'" in str(burst.refusal("ci", "internal"))
    assert "opted in" in str(burst.refusal("alice", "public"))
    assert "anonymous" in str(burst.refusal(None, "public"))
    assert "off" in str(Burst(BurstConfig()).refusal("ci", "public"))


def test_no_route_says_why() -> None:
    config = BurstConfig.model_validate(
        {"providers": {"x": {"type": "openai_compatible", "endpoint": "http://127.0.0.1:1"}}}
    )
    with pytest.raises(NoRoute, match="no provider maps"):
        asyncio.run(Burst(config).complete(validate.chat_request(_ask()), "alice", 1))


# Configuration and credentials.


def test_config_takes_the_burst_section_and_resolves_credential_paths(tmp_path: Path) -> None:
    config = parse_config(
        {
            "burst": {
                "enabled": True,
                "policy": {"monthly_cap": 10.0},
                "providers": {
                    "claude": {
                        "type": "anthropic",
                        "api_key_file": "secrets/claude",
                        "models": {"llama": {"model": "claude-x", **PRICE}},
                    }
                },
            }
        },
        tmp_path / "appliance.toml",
    )
    assert config.burst.providers["claude"].api_key_file == tmp_path / "secrets/claude"
    assert config.burst.policy.data_classes == ["public"]


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        ({"type": "anthropic"}, "needs api_key_env or api_key_file"),
        ({"type": "anthropic", "api_key_env": "sk-ant-123"}, "not the key itself"),
        ({"type": "azure_openai", "api_key_env": "K"}, "needs endpoint"),
        ({"type": "bedrock"}, "needs region"),
        ({"type": "bedrock", "region": "us-east-1", "api_key_env": "K"}, "AWS credentials"),
        ({"type": "openai", "api_key_env": "K", "models": {"m": {"model": "x"}}}, "required"),
    ],
)
def test_config_errors_name_the_field(
    tmp_path: Path, provider: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config({"burst": {"providers": {"p": provider}}}, tmp_path / "a.toml")
    assert "burst.providers.p" in str(caught.value)
    assert "sk-ant-123" not in str(caught.value)


def test_enabled_without_a_spend_cap_is_refused(tmp_path: Path) -> None:
    provider = {"type": "openai_compatible", "endpoint": "http://127.0.0.1:1"}
    with pytest.raises(ConfigError, match="monthly_cap is 0"):
        parse_config(
            {"burst": {"enabled": True, "providers": {"p": provider}}}, tmp_path / "a.toml"
        )


def test_restricted_data_can_never_leave(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"burst\.policy\.data_classes"):
        parse_config({"burst": {"policy": {"data_classes": ["restricted"]}}}, tmp_path / "a.toml")


def test_bedrock_without_botocore_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "botocore" else real(name)
    )
    with pytest.raises(ConfigError, match=r"appliance\[bedrock\]"):
        parse_config(
            {"burst": {"providers": {"aws": {"type": "bedrock", "region": "us-east-1"}}}},
            tmp_path / "a.toml",
        )


def test_a_key_file_others_can_read_is_refused(
    providers: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = Path(providers["anthropic"]["api_key_file"])
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by others") as caught:
        Burst(_config(providers, "anthropic"))
    assert f"chmod 600 {path}" in str(caught.value)
    assert ANTHROPIC_KEY not in str(caught.value)


def test_a_missing_key_variable_is_named(
    providers: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BURST_OPENAI_KEY")
    with pytest.raises(ConfigError, match=r"\$BURST_OPENAI_KEY is empty or unset"):
        Burst(_config(providers, "openai"))


def test_credentials_never_reach_logs_errors_or_reprs(
    providers: dict[str, dict[str, Any]],
    cloud: FakeCloud,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    async def failures(burst: Burst, faults: list[Fault]) -> None:
        texts.extend([repr(burst.providers), repr(burst.config), str(burst.status())])
        texts.extend(repr(vars(p)) for p in burst.providers.values())
        await burst.start()
        try:
            for fault in faults:
                cloud.faults.append(fault)
                with pytest.raises(GatewayError) as caught:
                    await burst.complete(validate.chat_request(_ask()), "alice", 10)
                err = caught.value
                texts.extend([str(err), repr(err), orjson.dumps(err.body()).decode()])
        finally:
            await burst.close()

    for name in KINDS:
        faults = [Fault(500), Fault(429, retry_after=1), Fault(400), Fault(kind="drop")]
        asyncio.run(failures(Burst(_config(providers, name)), faults))
    # Wrong credentials: the fakes answer 401 or 403; OpenAI's echoes the key's end.
    monkeypatch.setenv("BURST_OPENAI_KEY", "sk-wrong-" + OPENAI_KEY)
    wrong = Burst(_config(providers, "openai"))
    asyncio.run(failures(wrong, []))

    async def refused() -> GatewayError:
        await wrong.start()
        try:
            with pytest.raises(GatewayError) as caught:
                await wrong.complete(validate.chat_request(_ask()), "alice", 10)
            return caught.value
        finally:
            await wrong.close()

    err = asyncio.run(refused())
    assert err.status == 502 and err.code == "upstream_auth_error"
    texts.extend([str(err), orjson.dumps(err.body()).decode(), caplog.text])
    everything = "\n".join(texts)
    assert everything.count("Cloud provider") >= 17
    # The operator's log has the providers' own words, the 401 included.
    assert "cloud provider openai answered 401: " in caplog.text
    assert "cloud provider anthropic answered 500: " in caplog.text
    for secret in SECRETS:
        assert secret not in everything
        assert secret[-12:] not in everything


# The ledger keeps where each request ran and what it cost.


def test_state_migrates_usage_rows_to_carry_upstream_and_cost(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE usage (id TEXT PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL,
                path TEXT NOT NULL, key TEXT, model TEXT, replica TEXT, client TEXT,
                stream INTEGER NOT NULL DEFAULT 0, status INTEGER NOT NULL, error TEXT,
                prompt_tokens INTEGER, completion_tokens INTEGER, ttft_ms REAL,
                duration_ms REAL);
            INSERT INTO usage(id, ts, request_id, path, key, status) VALUES
                ('old', 1.0, 'r0', '/v1/chat/completions', 'alice', 200);
            PRAGMA user_version = 2;
            """
        )
    os.chmod(path, 0o600)
    state = State(path)
    row = {"path": "/v1/chat/completions", "status": 200, "stream": 0}
    state.insert_usage(
        [
            {**row, "id": "a", "ts": 10.0, "request_id": "r1", "key": "alice"}
            | {"upstream": "claude", "upstream_reason": "latency", "cost": 0.25},
            {**row, "id": "b", "ts": 11.0, "request_id": "r2", "key": "bob"}
            | {"upstream": "aws", "cost": 0.5},
            {**row, "id": "c", "ts": 12.0, "request_id": "r3", "key": "bob"},
        ]
    )
    rows = {row["id"]: row for row in state.usage_rows()}
    assert rows["old"]["upstream"] is None and rows["old"]["cost"] is None
    assert rows["a"]["upstream"] == "claude" and rows["a"]["upstream_reason"] == "latency"
    assert state.cloud_spend(since=5.0) == (0.75, {"alice": 0.25, "bob": 0.5})
    with sqlite3.connect(path) as conn:
        # Brought up to the current schema, past the usage columns' version 3.
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_unknown_deployment_is_the_operators_problem_and_counts(
    providers: dict[str, dict[str, Any]], cloud: FakeCloud
) -> None:
    providers["azure_openai"]["models"]["llama"]["model"] = "missing-deployment"
    burst = Burst(_config(providers, "azure_openai"))

    err = _refused(burst, _ask())
    assert err.status == 502 and err.code == "upstream_model_not_found" and err.counts


@pytest.mark.parametrize("shim", [("anthropic", "openai")], indirect=True)
def test_a_stream_failing_before_its_first_event_goes_to_the_next_provider(
    shim: Shim, cloud: FakeCloud
) -> None:
    cloud.faults.append(Fault(kind="stream_error"))  # Anthropic: message_start, then error
    shim.burst.latency["openai"].observe(9.0)  # so that anthropic is tried first
    chunks = list(shim.client().chat.completions.create(**_ask(), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the cloud."
    assert chunks[0].model == "gpt-x"
    assert cloud.paths() == ["/v1/messages", "/v1/chat/completions"]
    assert len(shim.burst.breakers["anthropic"].failures) == 1


def test_a_stream_abandoned_before_it_is_read_closes_its_books(
    providers: dict[str, dict[str, Any]], cloud: FakeCloud
) -> None:
    config = _config(providers, "openai")
    now = [0.0]
    burst = Burst(config, clock=lambda: now[0])
    breaker = burst.breakers["openai"]
    breaker.failure()
    breaker.failure()  # open
    now[0] = 31.0  # half-open: this stream is the probe

    async def go() -> None:
        await burst.start()
        try:
            answer = await burst.stream(validate.chat_request(_ask(stream=True)), "alice", 10)
            assert breaker.probing and burst.spend.held > 0
            await answer.aclose()  # the client left before a byte was relayed
        finally:
            await burst.close()

    asyncio.run(go())
    assert not breaker.probing and breaker.state == "half_open"
    assert burst.spend.held == 0


def test_every_burst_key_is_documented() -> None:
    from pydantic import BaseModel

    from appliance.burst import settings

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    section = doc[doc.index("### `[burst]`") : doc.index("### `[store]`")]
    models: list[type[BaseModel]] = [
        settings.BurstConfig,
        settings.ProviderConfig,
        settings.RemoteModel,
        settings.TriggerConfig,
        settings.PolicyConfig,
        settings.BreakerConfig,
    ]
    missing = [
        f"{model.__name__}.{name}"
        for model in models
        for name in model.model_fields
        if not any(
            form in section for form in (f"`{name}`", f".{name}`", f"`{name}.", f"`[burst.{name}")
        )
    ]
    assert missing == []


# The mappings are complete: a field the gateway forwards, a stop reason or a stream
# event botocore knows, each has its translation (or its refusal).

# What validate.chat_request accepts but never forwards (advisory, or refused there).
NOT_FORWARDED = {
    "user", "metadata", "store", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "service_tier", "verbosity",
    "modalities", "audio", "prediction", "web_search_options", "moderation", "functions",
    "function_call",
}  # fmt: skip


def test_every_forwarded_chat_field_is_mapped_or_refused_by_each_translator() -> None:
    from appliance.burst import anthropic_api, bedrock_api
    from appliance.burst.base import CHAT_FIELDS

    assert set(validate._CHAT) - NOT_FORWARDED == CHAT_FIELDS
    for rules in (anthropic_api.RULES, bedrock_api.RULES):
        assert set(rules) >= CHAT_FIELDS


def test_every_bedrock_stop_reason_and_stream_event_is_handled() -> None:
    from appliance.burst import bedrock_api

    model = bedrock_api._botocore().service
    assert set(model.shape_for("StopReason").enum) == set(bedrock_api.STOP_REASONS)
    events = set(model.operation_model("ConverseStream").output_shape.members["stream"].members)
    handled = {"messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop"}
    handled |= {"messageStop", "metadata"}
    errors = {name[:1].lower() + name[1:] for name in bedrock_api.STREAM_ERRORS}
    assert events == handled | errors


def test_every_anthropic_stop_reason_and_stream_event_is_handled() -> None:
    import typing

    import anthropic.types

    from appliance.burst import anthropic_api

    def kinds(annotated: Any) -> set[str]:
        members = typing.get_args(typing.get_args(annotated)[0])
        return {typing.get_args(m.model_fields["type"].annotation)[0] for m in members}

    assert set(typing.get_args(anthropic.types.StopReason)) == set(anthropic_api.STOP_REASONS)
    assert kinds(anthropic.types.RawMessageStreamEvent) == {
        "message_start", "message_delta", "message_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
    }  # fmt: skip
    # Translated: text and tool input; thinking, signature and citations are not asked for.
    assert kinds(anthropic.types.RawContentBlockDelta) == {
        "text_delta",
        "input_json_delta",
        "citations_delta",
        "thinking_delta",
        "signature_delta",
    }


# Events split anywhere by the network are put back together.


class _Pieces:
    """Stands in for aiohttp's response: `content.iter_any()` yields these pieces."""

    def __init__(self, data: bytes, size: int) -> None:
        self.pieces = [data[i : i + size] for i in range(0, len(data), size)]
        self.content = self

    async def iter_any(self) -> Any:
        for piece in self.pieces:
            yield piece


def test_server_sent_events_split_anywhere_are_whole_again() -> None:
    from appliance.burst.client import sse_events

    data = b'event: ping\r\ndata: {"a": 1}\r\n\r\ndata: line one\ndata: line two\n\n: note\n\n'

    async def read(size: int) -> list[tuple[str, bytes]]:
        return [e async for e in sse_events(_Pieces(data, size))]  # type: ignore[arg-type]

    for size in (1, 3, 7, len(data)):
        assert asyncio.run(read(size)) == [
            ("ping", b'{"a": 1}'),
            ("message", b"line one\nline two"),
        ]


def test_bedrock_frames_split_anywhere_decode_the_same(
    providers: dict[str, dict[str, Any]],
) -> None:
    from appliance.burst.base import ChunkWriter, Usage
    from appliance.testing.fake_clouds import event_frame

    provider = Burst(_config(providers, "bedrock")).providers["bedrock"]
    data = b"".join(
        [
            event_frame("messageStart", {"role": "assistant"}),
            event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}}),
            event_frame("messageStop", {"stopReason": "max_tokens"}),
            event_frame("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1}}),
        ]
    )

    async def read(size: int) -> tuple[list[dict[str, Any]], Usage]:
        usage = Usage()
        writer = ChunkWriter("m", include_usage=True, id_="chatcmpl-1")
        stream = provider.translate(_Pieces(data, size), writer, usage)  # type: ignore[arg-type]
        events = [orjson.loads(e.removeprefix(b"data: ")) async for e in stream]
        return events, usage

    for size in (1, 5, 64, len(data)):
        events, usage = asyncio.run(read(size))
        assert [e["choices"][0]["delta"] for e in events[:3]] == [
            {"role": "assistant", "content": ""},
            {"content": "Hi"},
            {},
        ]
        assert events[2]["choices"][0]["finish_reason"] == "length"
        assert events[3]["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        assert usage.prompt_tokens == 3


@pytest.mark.parametrize("shim", [KINDS], indirect=True)
def test_concurrent_streams_all_complete_and_every_hold_is_settled(shim: Shim) -> None:
    async def one(client: openai.AsyncOpenAI) -> tuple[str, float]:
        stream = await client.chat.completions.create(
            **_ask(), stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        usage = chunks[-1].usage
        assert usage is not None
        cost = (usage.prompt_tokens * 3.0 + usage.completion_tokens * 15.0) / 1e6
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), cost

    async def many() -> list[tuple[str, float]]:
        async with openai.AsyncOpenAI(api_key="unused", base_url=shim.url) as client:
            return await asyncio.gather(*(one(client) for _ in range(24)))

    answers = asyncio.run(many())
    assert [text for text, _ in answers] == ["Hello from the cloud."] * 24
    assert shim.burst.spend.held == 0
    assert shim.burst.spend.spent() == pytest.approx(sum(cost for _, cost in answers))
    assert all(b.state == "closed" and not b.probing for b in shim.burst.breakers.values())
    assert any(latency.value is not None for latency in shim.burst.latency.values())
